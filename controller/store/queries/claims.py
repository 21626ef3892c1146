"""Claims: which replica is acting on a workspace right now, until when."""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime

from sqlalchemy import (
    select,
    update,
)
from sqlalchemy.orm import Session

from controller.store.queries.reports import CLOCK_SKEW
from controller.store.tables import (
    WorkspaceRow,
)


def claim(session: Session, workspace_ids: Collection[str], replica: str, *, now: datetime,
          until: datetime) -> set[str]:
    """Claim these workspaces for `replica` until `until`: those that no other replica holds
    (or whose claim ran out, or runs out more than CLOCK_SKEW later than a claim made now
    would: a clock that jumped back). One conditional UPDATE: on PostgreSQL a concurrent
    claim of the same row waits for this one to commit and then finds it taken; SQLite has
    a single writer. Returns the ids claimed."""
    if not workspace_ids:
        return set()
    result = session.execute(
        update(WorkspaceRow)
        .where(WorkspaceRow.workspace_id.in_(list(workspace_ids)),
               WorkspaceRow.claimed_by.is_(None) | (WorkspaceRow.claimed_by == replica)
               | (WorkspaceRow.claimed_until < now)
               | (WorkspaceRow.claimed_until > until + CLOCK_SKEW))
        .values(claimed_by=replica, claimed_until=until)
        .returning(WorkspaceRow.workspace_id)
        .execution_options(synchronize_session=False))
    return set(result.scalars())


def claim_of(session: Session, workspace_id: str) -> tuple[str, datetime] | None:
    """Which replica holds a claim on this workspace and until when (it may have run out)."""
    row = session.execute(select(WorkspaceRow.claimed_by, WorkspaceRow.claimed_until)
                          .where(WorkspaceRow.workspace_id == workspace_id)).first()
    if row is None or row.claimed_by is None or row.claimed_until is None:
        return None
    return row.claimed_by, row.claimed_until


def release(session: Session, workspace_ids: Collection[str], replica: str) -> None:
    """Give back this replica's claims on these workspaces."""
    if not workspace_ids:
        return
    session.execute(
        update(WorkspaceRow)
        .where(WorkspaceRow.workspace_id.in_(list(workspace_ids)),
               WorkspaceRow.claimed_by == replica)
        .values(claimed_by=None, claimed_until=None)
        .execution_options(synchronize_session=False))
