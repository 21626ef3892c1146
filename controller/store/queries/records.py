"""What passes did (the loop's writes): reports, ownership, attempts and restarts, applied
in one round trip per table for many workspaces at once."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    String,
    Table,
    bindparam,
    case,
    cast,
    delete,
    false,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from controller.domain.models import (
    plugins_by_name,
    report_digest,
)
from controller.domain.outcomes import Changes
from controller.store.queries.rows import report_from_json, report_to_json
from controller.store.tables import (
    AttemptRow,
    Base,
    OwnedPluginRow,
    RestartRow,
    WorkspaceRow,
)


def apply_many(session: Session, records: list[tuple[Changes, datetime]]) -> None:
    """Record what several workspaces' passes did, on top of whatever is stored now, in a
    fixed number of statements (Core, not the ORM: this runs for every workspace acted on).
    Workspaces deleted meanwhile are skipped."""
    records = [(changes, now) for changes, now in records if not changes.empty]
    if not records:
        return
    table = Base.metadata.tables[WorkspaceRow.__tablename__]
    owned_table = Base.metadata.tables[OwnedPluginRow.__tablename__]
    attempt_table = Base.metadata.tables[AttemptRow.__tablename__]
    ids = sorted({changes.workspace_id for changes, _ in records})
    if session.get_bind().dialect.name == "sqlite":
        # pysqlite opens its transaction at the first write, so the SELECT below would run
        # outside it and a register committed by another process in between would be
        # overwritten. A write that changes nothing takes SQLite's write lock first: the
        # rows read are then the rows updated (what FOR UPDATE does on PostgreSQL).
        session.execute(update(table).where(false()).values(dormant=table.c.dormant))
    # Lock the rows (in a fixed order, so that two writers never deadlock) and read the
    # reports that patches apply to.
    current = {row.workspace_id: (row.report, row.runtime_error, row.report_seq)
               for row in session.execute(
        select(table.c.workspace_id, table.c.report, table.c.runtime_error, table.c.report_seq)
        .where(table.c.workspace_id.in_(ids))
        .order_by(table.c.workspace_id).with_for_update())}
    records = [(changes, now) for changes, now in records if changes.workspace_id in current]
    if not records:
        return

    rows: list[dict[str, object]] = []
    owned_gone: list[dict[str, object]] = []
    owned_new: list[dict[str, object]] = []
    attempts_gone: list[dict[str, object]] = []
    attempts_new: list[dict[str, object]] = []
    restarts: list[dict[str, object]] = []
    forgotten: list[dict[str, object]] = []
    for changes, now in records:
        workspace_id = changes.workspace_id
        row: dict[str, object] = {"b_id": workspace_id, "b_pending": changes.restart_pending,
                                  "b_seq": changes.report_seq}
        if (changes.report_replace is not None or changes.report_put or changes.report_drop
                or changes.report_forget):
            stored, error, stored_seq = current[workspace_id]
            report = report_from_json(stored)
            # A stored report the runtime built after every answer of these actions (a
            # higher seq: it reported since, e.g. right after a restart) already holds their
            # effects: what they saw (a GET /plugins) does not replace it, and a restart does
            # not make it unknown (forgetting it would only cost another GET /plugins).
            newer = (changes.report_seq is not None and stored_seq is not None
                     and stored_seq > changes.report_seq)
            if changes.report_replace is not None and not newer:
                report = plugins_by_name(list(changes.report_replace))
            if report is not None:
                for plugin in changes.report_put:
                    report[plugin.name] = plugin
                for name in changes.report_drop:
                    report.pop(name, None)
            if changes.report_forget and not newer:
                report = None
            row.update(b_touch=True, b_at=now,
                       b_report=None if report is None else report_to_json(report.values()),
                       b_digest=None if report is None else report_digest(report.values(),
                                                                           error))
        else:
            row.update(b_touch=False, b_at=None, b_report=None, b_digest=None)
        rows.append(row)
        disowned = set(changes.disown)
        for name in {plugin.name for plugin in changes.own} | disowned:
            owned_gone.append({"b_id": workspace_id, "b_name": name})
        owned_new += [{"workspace_id": workspace_id, "name": plugin.name,
                       "source": plugin.source, "digest": plugin.digest, "installed_at": now}
                      for plugin in changes.own if plugin.name not in disowned]
        for key in set(changes.clear_attempts) | set(changes.attempts):
            attempts_gone.append({"b_id": workspace_id, "b_key": key})
        attempts_new += [{"workspace_id": workspace_id, "key": key, "failures": attempt.failures,
                          "last_error": attempt.last_error[:4000],
                          "last_attempt_at": attempt.last_attempt_at,
                          "next_retry_at": attempt.next_retry_at}
                         for key, attempt in changes.attempts.items()]
        if changes.restarted_at is not None:
            restarts.append({"workspace_id": workspace_id, "at": changes.restarted_at})
        if changes.forget_restarts_before is not None:
            forgotten.append({"b_id": workspace_id, "b_before": changes.forget_restarts_before})

    # Typed parameters; PostgreSQL cannot guess the type of `NULL IS NULL`, hence one cast
    # (booleans cast the same on every backend; datetimes and JSON would not on SQLite).
    touch = bindparam("b_touch", type_=Boolean())
    pending = cast(bindparam("b_pending", type_=Boolean()), Boolean())
    seq = cast(bindparam("b_seq", type_=BigInteger()), BigInteger())
    session.execute(
        update(table).where(table.c.workspace_id == bindparam("b_id"))
        .values(
            # Something happened: the next pass looks at the workspace in full.
            synced_digest=None,
            restart_pending=case((pending.is_(None), table.c.restart_pending), else_=pending),
            report=case((touch, bindparam("b_report", type_=table.c.report.type)),
                        else_=table.c.report),
            report_digest=case((touch, bindparam("b_digest", type_=String(64))),
                               else_=table.c.report_digest),
            report_at=case((touch, bindparam("b_at", type_=table.c.report_at.type)),
                           else_=table.c.report_at),
            # The runtime's seq of what was done: a report it built earlier (lower seq) and
            # that arrives later is then ignored instead of undoing these changes.
            report_seq=case((seq.is_(None), table.c.report_seq),
                            (table.c.report_seq.is_(None), seq),
                            (table.c.report_seq < seq, seq),
                            else_=table.c.report_seq),
        ), rows)
    _replace_rows(session, owned_table, "name", owned_gone, owned_new)
    _replace_rows(session, attempt_table, "key", attempts_gone, attempts_new)
    restart_table = Base.metadata.tables[RestartRow.__tablename__]
    if forgotten:
        session.execute(delete(restart_table).where(
            restart_table.c.workspace_id == bindparam("b_id"),
            restart_table.c.at < bindparam("b_before")), forgotten)
    if restarts:
        session.execute(insert(restart_table), restarts)


def _replace_rows(session: Session, table: Table, key: str, gone: list[dict[str, object]],
                  new: list[dict[str, object]]) -> None:
    """Delete rows by (workspace, `key`) given as b_id/b_<key>, then insert `new` (one
    executemany each)."""
    if gone:
        session.execute(delete(table).where(table.c.workspace_id == bindparam("b_id"),
                                            table.c[key] == bindparam(f"b_{key}")), gone)
    if new:
        session.execute(insert(table), new)
