"""Keeping the store's tables bounded: rows that no pass, registry or user needs any more
are deleted. The loop runs `prune` about once an hour (engine/loop.py)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import ColumnElement, Delete, and_, delete, exists, or_, select, update
from sqlalchemy.orm import Session

from controller.store.queries.rollouts import forget_let_through
from controller.store.queries.tokens import forget_revoked_tokens
from controller.store.tables import AttemptRow, RestartRow, RolloutRow, TokenRow, WorkspaceRow

_CHUNK = 1000  # ids per IN (...) list


@dataclass(frozen=True, slots=True)
class Pruned:
    """How many rows one prune deleted (a forgotten workspace's own rows not counted)."""

    tokens: int = 0
    restarts: int = 0
    attempts: int = 0
    workspaces: int = 0
    rollouts: int = 0

    @property
    def total(self) -> int:
        return self.tokens + self.restarts + self.attempts + self.workspaces + self.rollouts

    def __str__(self) -> str:
        return (f"{self.tokens} revoked token(s), {self.restarts} old restart(s), "
                f"{self.attempts} old failure record(s), {self.workspaces} forgotten "
                f"workspace(s), {self.rollouts} rollout(s) of forgotten templates")


def prune(session: Session, *, now: datetime, declared: Collection[str] | None,
          forget_after: timedelta | None, restart_window: timedelta,
          templates: Collection[str] | None = None) -> Pruned:
    """Delete what has served its time:

    - tokens revoked more than a day ago (registries read recent revocations only);
    - restarts older than the restart budget's window (no budget counts them any more);
    - with `forget_after`: failure records (attempts) whose last try is older than that, the
      workspaces that are forgotten (see `forget_workspaces`) and the rollouts of templates
      absent that long (see `forget_rollouts`).

    `declared`: the workspace ids that desired state names, `templates` the templates
    ("namespace/name") it holds; either None when it could not be read whole (then no
    workspace, or no rollout, is forgotten)."""
    tokens = forget_revoked_tokens(session, now)  # first: a workspace with tokens is kept
    restarts = _deleted(session, delete(RestartRow).where(RestartRow.at < now - restart_window))
    if forget_after is None:
        return Pruned(tokens=tokens, restarts=restarts)
    attempts = _deleted(session, delete(AttemptRow).where(
        AttemptRow.last_attempt_at < now - forget_after))
    workspaces = 0 if declared is None else forget_workspaces(
        session, now=now, declared=declared, before=now - forget_after)
    rollouts = 0 if templates is None else forget_rollouts(
        session, now=now, templates=templates, before=now - forget_after)
    forget_let_through(session)  # the workspaces let through to a forgotten rollout
    return Pruned(tokens=tokens, restarts=restarts, attempts=attempts, workspaces=workspaces,
                  rollouts=rollouts)


def forget_rollouts(session: Session, *, now: datetime, templates: Collection[str],
                    before: datetime) -> int:
    """Delete the rollouts of templates that desired state has not held since `before`. Each
    prune notes when it first finds a template absent (`absent_since`) and clears that when
    it finds the template again, so only an absence that every prune in between saw counts;
    a template that comes back later starts afresh (its plugin list is stable at once, as
    for any new template). Writes only what changed."""
    present = set(templates)
    rows = session.execute(select(RolloutRow.template, RolloutRow.absent_since)).all()
    back = [template for template, since in rows if since is not None and template in present]
    gone = [template for template, since in rows if since is None and template not in present]
    due = [template for template, since in rows
           if since is not None and since < before and template not in present]
    for start in range(0, len(back), _CHUNK):
        session.execute(update(RolloutRow).where(
            RolloutRow.template.in_(back[start:start + _CHUNK])).values(absent_since=None))
    for start in range(0, len(gone), _CHUNK):
        session.execute(update(RolloutRow).where(
            RolloutRow.template.in_(gone[start:start + _CHUNK]),
            RolloutRow.absent_since.is_(None)).values(absent_since=now))
    forgotten = 0
    for start in range(0, len(due), _CHUNK):
        forgotten += _deleted(session, delete(RolloutRow).where(
            RolloutRow.template.in_(due[start:start + _CHUNK]),
            RolloutRow.absent_since < before))
    return forgotten


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
