"""Keeping the store's tables bounded: rows that no pass, registry or user needs any more
are deleted. The loop runs `prune` about once an hour (engine/loop.py)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Delete, and_, delete, exists, or_, select
from sqlalchemy.orm import Session

from controller.store.queries.tokens import forget_revoked_tokens
from controller.store.tables import AttemptRow, RestartRow, TokenRow, WorkspaceRow

_CHUNK = 1000  # ids per IN (...) list


@dataclass(frozen=True, slots=True)
class Pruned:
    """How many rows one prune deleted (a forgotten workspace's own rows not counted)."""

    tokens: int = 0
    restarts: int = 0
    attempts: int = 0
    workspaces: int = 0

    @property
    def total(self) -> int:
        return self.tokens + self.restarts + self.attempts + self.workspaces

    def __str__(self) -> str:
        return (f"{self.tokens} revoked token(s), {self.restarts} old restart(s), "
                f"{self.attempts} old failure record(s), {self.workspaces} forgotten "
                "workspace(s)")


def prune(session: Session, *, now: datetime, declared: Collection[str] | None,
          forget_after: timedelta | None, restart_window: timedelta) -> Pruned:
    """Delete what has served its time:

    - tokens revoked more than a day ago (registries read recent revocations only);
    - restarts older than the restart budget's window (no budget counts them any more);
    - with `forget_after`: failure records (attempts) whose last try is older than that, and
      the workspaces that are forgotten (see `forget_workspaces`).

    `declared`: the workspace ids that desired state names, or None when it could not be
    read whole (then no workspace is forgotten)."""
    tokens = forget_revoked_tokens(session, now)  # first: a workspace with tokens is kept
    restarts = _deleted(session, delete(RestartRow).where(RestartRow.at < now - restart_window))
    if forget_after is None:
        return Pruned(tokens=tokens, restarts=restarts)
    attempts = _deleted(session, delete(AttemptRow).where(
        AttemptRow.last_attempt_at < now - forget_after))
    workspaces = 0 if declared is None else forget_workspaces(
        session, now=now, declared=declared, before=now - forget_after)
    return Pruned(tokens=tokens, restarts=restarts, attempts=attempts, workspaces=workspaces)


def forget_workspaces(session: Session, *, now: datetime, declared: Collection[str],
                      before: datetime) -> int:
    """Delete the workspaces that no desired state declares, no runtime has reported from
    since `before`, that are not paused (a user's decision), hold no token (a live token
    says a runtime may still come; a revoked one is itself kept a day) and that no replica
    is acting on, with the plugins they owned, their failure records and restarts (the
    schema's ON DELETE CASCADE). A declared workspace is kept however long it is offline:
    its ownership records say which plugins pluginctl installed there."""
    wanted = set(declared)
    candidates = [workspace_id for workspace_id in session.scalars(
        select(WorkspaceRow.workspace_id).where(_forgettable(now, before)))
        if workspace_id not in wanted]
    forgotten = 0
    for start in range(0, len(candidates), _CHUNK):
        # The conditions again: a runtime may have registered since the SELECT.
        forgotten += _deleted(session, delete(WorkspaceRow).where(
            WorkspaceRow.workspace_id.in_(candidates[start:start + _CHUNK]),
            _forgettable(now, before)))
    return forgotten


def _forgettable(now: datetime, before: datetime) -> ColumnElement[bool]:
    return and_(
        or_(WorkspaceRow.last_seen_at.is_(None), WorkspaceRow.last_seen_at < before),
        WorkspaceRow.dormant.is_(False),
        or_(WorkspaceRow.claimed_until.is_(None), WorkspaceRow.claimed_until < now),
        ~exists().where(TokenRow.workspace_id == WorkspaceRow.workspace_id),
    )


def _deleted(session: Session, statement: Delete) -> int:
    result = session.execute(statement.execution_options(synchronize_session=False))
    return int(result.rowcount)  # type: ignore[attr-defined]
