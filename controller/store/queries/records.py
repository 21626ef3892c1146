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
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session
from sqlalchemy.sql.dml import Insert, Update

from controller.domain.models import (
    plugins_by_name,
    report_digest,
)
from controller.domain.outcomes import Changes
from controller.store.queries.claims import release
from controller.store.queries.rows import report_from_json, report_to_json
from controller.store.tables import (
    AttemptRow,
    Base,
    OwnedPluginRow,
    RestartRow,
    WorkspaceRow,
)


def apply_many(session: Session, records: list[tuple[Changes, datetime]], *,
               release_for: str | None = None) -> None:
    """Record what several workspaces' passes did, on top of whatever is stored now, in a
    fixed number of statements (Core, not the ORM: this runs for every workspace acted on).
    Workspaces deleted meanwhile are skipped. With `release_for`, that replica's claims on
    all of these workspaces are given back in the same statements."""
    ids = sorted({changes.workspace_id for changes, _ in records})
    records = [(changes, now) for changes, now in records if not changes.empty]
    current = _lock(session, sorted({changes.workspace_id for changes, _ in records})) \
        if records else {}
    batch = _Batch()
    for changes, now in records:
        if changes.workspace_id in current:
            batch.add(changes, now, current[changes.workspace_id])
    if batch.rows:
        _update_workspaces(session, batch.rows, release_for=release_for)
    if release_for is not None:
        # The rest (nothing recorded, or deleted meanwhile) in one more statement.
        release(session, sorted(set(ids) - {str(row["b_id"]) for row in batch.rows}),
                release_for)
    if not batch.rows:
        return
    _replace_rows(session, OwnedPluginRow.__tablename__, gone=batch.owned_gone,
                  new=batch.owned_new)
    _replace_rows(session, AttemptRow.__tablename__, gone=batch.attempts_gone,
                  new=batch.attempts_new)
    restart_table = Base.metadata.tables[RestartRow.__tablename__]
    if batch.forgotten:
        session.execute(delete(restart_table).where(
            restart_table.c.workspace_id == bindparam("b_id"),
            restart_table.c.at < bindparam("b_before")), batch.forgotten)
    if batch.restarts:
        session.execute(insert(restart_table), batch.restarts)


#: What apply_many reads of a workspace before writing: its report, error and report seq.
Stored = tuple[list[dict[str, str | bool]] | None, str | None, int | None]


_WORKSPACES = Base.metadata.tables[WorkspaceRow.__tablename__]
# Statements are built once: apply_many runs for every group of workspaces acted on, and
# building a statement (and its cache key) costs more than running it.
_WRITE_LOCK = update(_WORKSPACES).where(false()).values(dormant=_WORKSPACES.c.dormant)
_LOCK = (select(_WORKSPACES.c.workspace_id, _WORKSPACES.c.report, _WORKSPACES.c.runtime_error,
                _WORKSPACES.c.report_seq)
         .where(_WORKSPACES.c.workspace_id.in_(bindparam("ids", expanding=True)))
         .order_by(_WORKSPACES.c.workspace_id).with_for_update())


def _lock(session: Session, ids: list[str]) -> dict[str, Stored]:
    """Lock the workspaces' rows (in a fixed order, so that two writers never deadlock) and
    read the reports that patches apply to."""
    if session.get_bind().dialect.name == "sqlite":
        # pysqlite opens its transaction at the first write, so the SELECT below would run
        # outside it and a register committed by another process in between would be
        # overwritten. A write that changes nothing takes SQLite's write lock first: the
        # rows read are then the rows updated (what FOR UPDATE does on PostgreSQL).
        session.execute(_WRITE_LOCK)
    return {row.workspace_id: (row.report, row.runtime_error, row.report_seq)
            for row in session.execute(_LOCK, {"ids": ids})}


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
        # Rows written anew replace theirs (an upsert); only the others are deleted.
        disowned = set(changes.disown)
        for name in sorted(disowned):
            self.owned_gone.append({"b_id": workspace_id, "b_name": name})
        self.owned_new += [{"workspace_id": workspace_id, "name": plugin.name,
                            "source": plugin.source, "digest": plugin.digest,
                            "installed_at": now}
                           for plugin in changes.own if plugin.name not in disowned]
        for key in sorted(set(changes.clear_attempts) - set(changes.attempts)):
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


def _workspace_update() -> Update:
    table = _WORKSPACES
    # Typed parameters; PostgreSQL cannot guess the type of `NULL IS NULL`, hence one cast
    # (booleans cast the same on every backend; datetimes and JSON would not on SQLite).
    touch = bindparam("b_touch", type_=Boolean())
    pending = cast(bindparam("b_pending", type_=Boolean()), Boolean())
    seq = cast(bindparam("b_seq", type_=BigInteger()), BigInteger())
    # b_mine: the replica whose claim the record gives back (NULL: none is).
    mine = table.c.claimed_by == bindparam("b_mine", type_=String())
    return update(table).where(table.c.workspace_id == bindparam("b_id")).values(
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
        claimed_by=case((mine, None), else_=table.c.claimed_by),
        claimed_until=case((mine, None), else_=table.c.claimed_until),
    )


_UPDATE_WORKSPACES = _workspace_update()


def _update_workspaces(session: Session, rows: list[dict[str, object]], *,
                       release_for: str | None) -> None:
    for row in rows:
        row["b_mine"] = release_for
    session.execute(_UPDATE_WORKSPACES, rows)


def _upsert(table: Table, key: str) -> dict[str, Insert]:
    """INSERT .. ON CONFLICT (workspace, `key`) DO UPDATE, per dialect (an executemany: psycopg
    pipelines it; a multi-row INSERT would cost more to parse on the client than it saves)."""
    statements: dict[str, Insert] = {}
    for dialect, make in (("sqlite", sqlite_insert), ("postgresql", postgresql_insert)):
        upsert = make(table)
        statements[dialect] = upsert.on_conflict_do_update(
            index_elements=[table.c.workspace_id, table.c[key]],
            set_={column.name: upsert.excluded[column.name] for column in table.c
                  if not column.primary_key})
    return statements


_REPLACE = {table.name: (key, delete(table).where(table.c.workspace_id == bindparam("b_id"),
                                                  table.c[key] == bindparam(f"b_{key}")),
                         _upsert(table, key))
            for table, key in ((Base.metadata.tables[OwnedPluginRow.__tablename__], "name"),
                               (Base.metadata.tables[AttemptRow.__tablename__], "key"))}


def _replace_rows(session: Session, table: str, *, gone: list[dict[str, object]],
                  new: list[dict[str, object]]) -> None:
    """Delete rows by (workspace, key) given as b_id/b_<key> (one executemany), and write
    `new` over whatever is stored under the same (workspace, key) (one statement)."""
    _, remove, upsert = _REPLACE[table]
    if gone:
        session.execute(remove, gone)
    if new:
        session.execute(upsert[session.get_bind().dialect.name], new)
