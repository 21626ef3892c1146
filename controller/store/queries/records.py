"""What passes did (the loop's writes): reports, ownership, attempts and restarts, applied
in one round trip per table for many workspaces at once."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    current = _lock(session, sorted({changes.workspace_id for changes, _ in records}))
    batch = _Batch()
    for changes, now in records:
        if changes.workspace_id in current:
            batch.add(changes, now, current[changes.workspace_id])
    if not batch.rows:
        return
    _update_workspaces(session, batch.rows)
    tables = Base.metadata.tables
    _replace_rows(session, tables[OwnedPluginRow.__tablename__], "name",
                  gone=batch.owned_gone, new=batch.owned_new)
    _replace_rows(session, tables[AttemptRow.__tablename__], "key",
                  gone=batch.attempts_gone, new=batch.attempts_new)
    restart_table = tables[RestartRow.__tablename__]
    if batch.forgotten:
        session.execute(delete(restart_table).where(
            restart_table.c.workspace_id == bindparam("b_id"),
            restart_table.c.at < bindparam("b_before")), batch.forgotten)
    if batch.restarts:
        session.execute(insert(restart_table), batch.restarts)


#: What apply_many reads of a workspace before writing: its report, error and report seq.
Stored = tuple[list[dict[str, str | bool]] | None, str | None, int | None]


def _lock(session: Session, ids: list[str]) -> dict[str, Stored]:
    """Lock the workspaces' rows (in a fixed order, so that two writers never deadlock) and
    read the reports that patches apply to."""
    table = Base.metadata.tables[WorkspaceRow.__tablename__]
    if session.get_bind().dialect.name == "sqlite":
        # pysqlite opens its transaction at the first write, so the SELECT below would run
        # outside it and a register committed by another process in between would be
        # overwritten. A write that changes nothing takes SQLite's write lock first: the
        # rows read are then the rows updated (what FOR UPDATE does on PostgreSQL).
        session.execute(update(table).where(false()).values(dormant=table.c.dormant))
    return {row.workspace_id: (row.report, row.runtime_error, row.report_seq)
            for row in session.execute(
        select(table.c.workspace_id, table.c.report, table.c.runtime_error, table.c.report_seq)
        .where(table.c.workspace_id.in_(ids))
        .order_by(table.c.workspace_id).with_for_update())}


@dataclass
class _Batch:
    """The parameters of apply_many's statements, one executemany each."""

    rows: list[dict[str, object]] = field(default_factory=list)
    owned_gone: list[dict[str, object]] = field(default_factory=list)
    owned_new: list[dict[str, object]] = field(default_factory=list)
    attempts_gone: list[dict[str, object]] = field(default_factory=list)
    attempts_new: list[dict[str, object]] = field(default_factory=list)
    restarts: list[dict[str, object]] = field(default_factory=list)
    forgotten: list[dict[str, object]] = field(default_factory=list)

    def add(self, changes: Changes, now: datetime, stored: Stored) -> None:
        workspace_id = changes.workspace_id
        self.rows.append(_workspace_row(changes, now, stored))
        disowned = set(changes.disown)
        for name in {plugin.name for plugin in changes.own} | disowned:
            self.owned_gone.append({"b_id": workspace_id, "b_name": name})
        self.owned_new += [{"workspace_id": workspace_id, "name": plugin.name,
                            "source": plugin.source, "digest": plugin.digest,
                            "installed_at": now}
                           for plugin in changes.own if plugin.name not in disowned]
        for key in set(changes.clear_attempts) | set(changes.attempts):
            self.attempts_gone.append({"b_id": workspace_id, "b_key": key})
        self.attempts_new += [{"workspace_id": workspace_id, "key": key,
                               "failures": attempt.failures,
                               "last_error": attempt.last_error[:4000],
                               "last_attempt_at": attempt.last_attempt_at,
                               "next_retry_at": attempt.next_retry_at}
                              for key, attempt in changes.attempts.items()]
        if changes.restarted_at is not None:
            self.restarts.append({"workspace_id": workspace_id, "at": changes.restarted_at})
        if changes.forget_restarts_before is not None:
            self.forgotten.append({"b_id": workspace_id,
                                   "b_before": changes.forget_restarts_before})


def _workspace_row(changes: Changes, now: datetime, stored: Stored) -> dict[str, object]:
    """The workspace row's parameters: its report patched by what the actions saw and did."""
    row: dict[str, object] = {"b_id": changes.workspace_id,
                              "b_pending": changes.restart_pending, "b_seq": changes.report_seq}
    if not (changes.report_replace is not None or changes.report_put or changes.report_drop
            or changes.report_forget):
        row.update(b_touch=False, b_at=None, b_report=None, b_digest=None)
        return row
    stored_report, error, stored_seq = stored
    report = report_from_json(stored_report)
    # A stored report the runtime built after every answer of these actions (a higher seq:
    # it reported since, e.g. right after a restart) already holds their effects: what they
    # saw (a GET /plugins) does not replace it, and a restart does not make it unknown
    # (forgetting it would only cost another GET /plugins).
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
               b_digest=None if report is None else report_digest(report.values(), error))
    return row


def _update_workspaces(session: Session, rows: list[dict[str, object]]) -> None:
    table = Base.metadata.tables[WorkspaceRow.__tablename__]
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


def _replace_rows(session: Session, table: Table, key: str, *, gone: list[dict[str, object]],
                  new: list[dict[str, object]]) -> None:
    """Delete rows by (workspace, `key`) given as b_id/b_<key>, then insert `new` (one
    executemany each)."""
    if gone:
        session.execute(delete(table).where(table.c.workspace_id == bindparam("b_id"),
                                            table.c[key] == bindparam(f"b_{key}")), gone)
    if new:
        session.execute(insert(table), new)
