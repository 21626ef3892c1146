"""Facts reported by runtimes (the registry's writes): registers, changed reports, last-seen
times, dormancy."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import TypeVar

from sqlalchemy import (
    ARRAY,
    ColumnElement,
    Connection,
    Select,
    String,
    Update,
    any_,
    bindparam,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.orm import Session

from controller.domain.models import (
    Plugin,
    report_digest,
)
from controller.store.queries.rows import ensure_workspace, report_to_json
from controller.store.tables import (
    Base,
    WorkspaceRow,
)

T = TypeVar("T")


def record_register(
    session: Session, workspace_id: str, url: str, *, report: list[Plugin] | None, now: datetime,
    seq: int | None = None, error: str | None = None,
) -> None:
    """A runtime (re)started: where it is, and what it has if it said so. Without a report the
    old one is dropped, because a restarted box may have lost what it had. The report's seq
    starts again from the register's."""
    record_registers(session, [(workspace_id, url, report, seq, error)], now)


Register = tuple[str, str, list[Plugin] | None, int | None, str | None]


def record_registers(session: Session, registers: list[Register], now: datetime) -> None:
    """record_register for many at once: one query, one batched INSERT for workspaces not
    known yet, one batched UPDATE (a later register of the same workspace wins)."""
    if not registers:
        return
    table = Base.metadata.tables[WorkspaceRow.__tablename__]
    latest = {workspace_id: (url, report, seq, error)
              for workspace_id, url, report, seq, error in registers}
    known = set(session.connection().execute(
        select(table.c.workspace_id).where(table.c.workspace_id.in_(list(latest)))).scalars())
    missing = [{"workspace_id": w, "dormant": False, "restart_pending": False}
               for w in latest if w not in known]
    if missing:
        session.execute(insert(table), missing)
    session.execute(
        update(table).where(table.c.workspace_id == bindparam("b_id")).values(
            url=bindparam("b_url"), registered_at=bindparam("b_now"),
            last_seen_at=bindparam("b_now"), report=bindparam("b_report"),
            report_digest=bindparam("b_digest"), report_at=bindparam("b_report_at"),
            report_seq=bindparam("b_seq"), runtime_error=bindparam("b_error")),
        [{"b_id": workspace_id, "b_url": url, "b_now": now, "b_seq": seq,
          "b_report": None if report is None else report_to_json(report),
          "b_digest": None if report is None else report_digest(report, error),
          "b_report_at": None if report is None else now,
          "b_error": None if report is None else error}
         for workspace_id, (url, report, seq, error) in latest.items()])


def record_changed_report(
    session: Session, workspace_id: str, report: list[Plugin], *, now: datetime,
    seq: int | None = None, error: str | None = None,
) -> bool:
    """Store a reported plugin set if it differs from the stored one (and mark the workspace
    seen), unless `seq` is not above the stored report's. False when nothing was written:
    the same report, a stale seq, or a workspace that never registered."""
    digest = report_digest(report, error)
    conditions = [WorkspaceRow.workspace_id == workspace_id, WorkspaceRow.url.is_not(None),
                  WorkspaceRow.report_digest.is_(None) | (WorkspaceRow.report_digest != digest)]
    values: dict[str, object] = {"report": report_to_json(report), "report_digest": digest,
                                 "report_at": now, "last_seen_at": now, "runtime_error": error}
    if seq is not None:
        conditions.append(WorkspaceRow.report_seq.is_(None) | (WorkspaceRow.report_seq < seq))
        values["report_seq"] = seq
    result = session.execute(
        update(WorkspaceRow).where(*conditions).values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


_WORKSPACES = Base.metadata.tables[WorkspaceRow.__tablename__]


def _among(dialect: str) -> ColumnElement[bool]:
    """`workspace_id IN (the ids)` with the ids bound as one parameter (`ids`, see _ids):
    a PostgreSQL array, a JSON array on SQLite. Unlike an expanding IN, the statement's text
    does not change with the number of ids, so it is compiled and prepared once, and no
    Python work is done per id: the registry's hot queries share the GIL with its event
    loop."""
    workspace_id = _WORKSPACES.c.workspace_id
    if dialect == "postgresql":
        return workspace_id == any_(bindparam("ids", type_=ARRAY(String)))
    if dialect == "sqlite":
        return workspace_id.in_(
            select(func.json_each(bindparam("ids", type_=String)).table_valued("value").c.value))
    return workspace_id.in_(bindparam("ids", expanding=True))


def _ids(dialect: str, ids: list[str]) -> object:
    """The value of _among's `ids` parameter."""
    return json.dumps(ids) if dialect == "sqlite" else ids


def _per_dialect(build: Callable[[str], T]) -> Callable[[str], T]:
    """A statement built once per dialect (building one costs more than running it)."""
    return functools.cache(build)


@_per_dialect
def _stored_report_digests(dialect: str) -> Select[str, str | None, int | None]:
    return (select(_WORKSPACES.c.workspace_id, _WORKSPACES.c.report_digest,
                   _WORKSPACES.c.report_seq)
            .where(_among(dialect), _WORKSPACES.c.url.is_not(None)))


def stored_report_digests(connection: Connection, workspace_ids: Collection[str]
                          ) -> dict[str, tuple[str | None, int | None]]:
    """(report digest, report seq) of each of these workspaces that is registered (one
    query; the registry runs it for every group of heartbeats)."""
    dialect = connection.dialect.name
    rows = connection.execute(_stored_report_digests(dialect),
                              {"ids": _ids(dialect, list(workspace_ids))})
    return {workspace_id: (digest, seq) for workspace_id, digest, seq in rows}


#: Replicas' clocks and batches may disagree by this much; a stored time further ahead than
#: this can only come from a clock that jumped back, and is not trusted.
CLOCK_SKEW = timedelta(minutes=5)


@_per_dialect
def _touch(dialect: str) -> Update:
    seen = _WORKSPACES.c.last_seen_at
    return (update(_WORKSPACES)
            .where(_among(dialect), _WORKSPACES.c.url.is_not(None),
                   seen.is_(None) | (seen < bindparam("seen")) | (seen > bindparam("ahead")))
            .values(last_seen_at=bindparam("seen")))


def touch(session: Session, seen: dict[str, datetime]) -> None:
    """Record batched "still alive" times; never moves last_seen back (batches of several
    replicas arrive out of order) unless it is ahead by more than CLOCK_SKEW (a clock that
    jumped back), and never makes an unregistered workspace look registered. A batch holds
    few distinct times (the registry stamps a whole group of heartbeats at once): one UPDATE
    per time, so that the work in Python is per statement, not per workspace."""
    by_time: dict[datetime, list[str]] = {}
    for workspace_id, at in seen.items():
        by_time.setdefault(at, []).append(workspace_id)
    dialect = session.get_bind().dialect.name
    statement = _touch(dialect)
    for at, ids in by_time.items():
        session.execute(statement, {"ids": _ids(dialect, ids), "seen": at,
                                    "ahead": at + CLOCK_SKEW})


def set_dormant(session: Session, workspace_id: str, dormant: bool) -> None:
    ensure_workspace(session, workspace_id).dormant = dormant
