"""Facts reported by runtimes (the registry's writes): registers, changed reports, last-seen
times, dormancy."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime, timedelta

from sqlalchemy import (
    Connection,
    bindparam,
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


# Built once: the registry runs this for every group of heartbeats, and building a statement
# costs more than running it.
_STORED_REPORT_DIGESTS = (
    select(WorkspaceRow.workspace_id, WorkspaceRow.report_digest, WorkspaceRow.report_seq)
    .where(WorkspaceRow.workspace_id.in_(bindparam("ids", expanding=True)),
           WorkspaceRow.url.is_not(None)))


def stored_report_digests(connection: Connection, workspace_ids: Collection[str]
                          ) -> dict[str, tuple[str | None, int | None]]:
    """(report digest, report seq) of each of these workspaces that is registered (one
    query)."""
    rows = connection.execute(_STORED_REPORT_DIGESTS, {"ids": list(workspace_ids)})
    return {workspace_id: (digest, seq) for workspace_id, digest, seq in rows}


#: Replicas' clocks and batches may disagree by this much; a stored time further ahead than
#: this can only come from a clock that jumped back, and is not trusted.
CLOCK_SKEW = timedelta(minutes=5)


def touch(session: Session, seen: dict[str, datetime]) -> None:
    """Record batched "still alive" times; never moves last_seen back (batches of several
    replicas arrive out of order) unless it is ahead by more than CLOCK_SKEW (a clock that
    jumped back), and never makes an unregistered workspace look registered. One
    executemany (pipelined by psycopg)."""
    table = Base.metadata.tables[WorkspaceRow.__tablename__]
    session.execute(
        update(table)
        .where(table.c.workspace_id == bindparam("b_id"), table.c.url.is_not(None),
               table.c.last_seen_at.is_(None) | (table.c.last_seen_at < bindparam("b_seen"))
               | (table.c.last_seen_at > bindparam("b_ahead")))
        .values(last_seen_at=bindparam("b_seen")),
        [{"b_id": workspace_id, "b_seen": at, "b_ahead": at + CLOCK_SKEW}
         for workspace_id, at in seen.items()],
    )


def set_dormant(session: Session, workspace_id: str, dormant: bool) -> None:
    ensure_workspace(session, workspace_id).dormant = dormant
