"""Rollouts: load every template's rollout, store one at the version it was read at."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import replace
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from controller.domain.models import Observed
from controller.domain.rollout import Revision, Rollout, RolloutPhase
from controller.store.queries.observed import load_observed
from controller.store.queries.rows import report_from_json, report_to_json
from controller.store.tables import OwnedPluginRow, RolloutRow, RolloutWorkspaceRow


def _revision(digest: str | None, plugins: list[dict[str, str | bool]] | None
              ) -> Revision | None:
    if digest is None or plugins is None:
        return None
    found = report_from_json(plugins) or {}
    return Revision(digest, tuple(found[name] for name in sorted(found)))


def _rollout(row: RolloutRow) -> Rollout:
    stable = _revision(row.stable_digest, row.stable_plugins)
    assert stable is not None
    return Rollout(
        template=row.template, stable=stable,
        target=_revision(row.target_digest, row.target_plugins),
        phase=RolloutPhase(row.phase), wave=row.wave, started_at=row.started_at,
        counted_since=row.counted_since, healthy_since=row.healthy_since,
        message=row.message, version=row.version)


def load_rollouts(session: Session) -> dict[str, Rollout]:
    return {row.template: _rollout(row) for row in session.scalars(select(RolloutRow))}


def load_let_through(session: Session) -> dict[str, tuple[str, frozenset[str]]]:
    """Per template: the revision its rows are for and the workspaces let through to it (a
    template's rows are all of one revision: `save_let_through` keeps them so)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for template, workspace_id, revision in session.execute(
            select(RolloutWorkspaceRow.template, RolloutWorkspaceRow.workspace_id,
                   RolloutWorkspaceRow.revision)):
        found.setdefault(template, (revision, set()))[1].add(workspace_id)
    return {template: (revision, frozenset(ids)) for template, (revision, ids) in found.items()}


def save_let_through(session: Session, changes: dict[str, tuple[str | None, frozenset[str]]]
                     ) -> None:
    """Per template, (the target's digest, the workspaces let through to it): rows of another
    revision go, missing ones are added (a replica that added them first wins nothing and
    loses nothing). (None, ()): the rollout ended, every row of it goes."""
    make = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
    for template, (revision, workspace_ids) in changes.items():
        stale = delete(RolloutWorkspaceRow).where(RolloutWorkspaceRow.template == template)
        if revision is not None:
            stale = stale.where(RolloutWorkspaceRow.revision != revision)
        session.execute(stale)
        ids = sorted(workspace_ids)
        for start in range(0, len(ids), 500):
            statement = make(RolloutWorkspaceRow).values([
                {"template": template, "workspace_id": w, "revision": revision}
                for w in ids[start:start + 500]])
            session.execute(statement.on_conflict_do_update(
                index_elements=["template", "workspace_id"],
                set_={"revision": statement.excluded.revision}))


def forget_let_through(session: Session) -> int:
    """Rows of templates that have no rollout stored (the prune forgot it)."""
    known = select(RolloutRow.template)
    done = session.execute(delete(RolloutWorkspaceRow).where(
        RolloutWorkspaceRow.template.not_in(known)))
    return int(done.rowcount or 0)  # type: ignore[attr-defined]


def save_rollout(session: Session, rollout: Rollout, *, now: datetime) -> Rollout | None:
    """Store `rollout` if the stored one is still at `rollout.version` (0: none stored yet);
    the stored rollout at its new version, or None when another replica changed it first."""
    values = {
        "stable_digest": rollout.stable.digest,
        "stable_plugins": report_to_json(rollout.stable.plugins),
        "target_digest": rollout.target.digest if rollout.target else None,
        "target_plugins": report_to_json(rollout.target.plugins) if rollout.target else None,
        "phase": rollout.phase.value, "wave": rollout.wave, "started_at": rollout.started_at,
        "counted_since": rollout.counted_since, "healthy_since": rollout.healthy_since,
        "message": rollout.message, "version": rollout.version + 1, "updated_at": now,
    }
    if rollout.version == 0:
        make = sqlite_insert if session.get_bind().dialect.name == "sqlite" \
            else postgresql_insert
        # RETURNING says whether it inserted: through the Session, an INSERT reports no
        # rowcount on PostgreSQL (-1), so that a first insert looked like a lost race.
        inserted = session.execute(
            make(RolloutRow).values(template=rollout.template, **values)
            .on_conflict_do_nothing(index_elements=["template"])
            .returning(RolloutRow.template)).first()
        return replace(rollout, version=1) if inserted is not None else None
    done = session.execute(
        update(RolloutRow).where(RolloutRow.template == rollout.template,
                                 RolloutRow.version == rollout.version).values(**values))
    if done.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return replace(rollout, version=rollout.version + 1)


def installed_since(session: Session, workspace_ids: Collection[str], since: datetime
                    ) -> dict[str, datetime]:
    """The last install at or after `since` on each of these workspaces (none: absent)."""
    found: dict[str, datetime] = {}
    ids = list(workspace_ids)
    for start in range(0, len(ids), 500):  # bound the IN list
        rows = session.execute(
            select(OwnedPluginRow.workspace_id, func.max(OwnedPluginRow.installed_at))
            .where(OwnedPluginRow.workspace_id.in_(ids[start:start + 500]),
                   OwnedPluginRow.installed_at >= since)
            .group_by(OwnedPluginRow.workspace_id))
        for workspace_id, at in rows:
            found[workspace_id] = at  # max() keeps the column's type: UTC-aware
    return found


def save_rollouts(session: Session, changed: list[Rollout], *, now: datetime
                  ) -> dict[str, Rollout]:
    """Store each changed rollout; where another replica stored one first, its version. A
    rollout the prune deleted meanwhile is left out: the next pass sees it afresh."""
    saved: dict[str, Rollout] = {}
    for rollout in changed:
        stored = save_rollout(session, rollout, now=now)
        if stored is None:
            stored = load_rollouts(session).get(rollout.template)
        if stored is not None:
            saved[rollout.template] = stored
    return saved


def rollout_health_inputs(session: Session, *, workspace_ids: Collection[str],
                          since: datetime, now: datetime, restart_window: timedelta
                          ) -> tuple[dict[str, Observed], dict[str, datetime]]:
    """What a wave's health is judged from: the workspaces' observed state (online or not)
    and their last install since `since`."""
    observed = load_observed(session, now=now, restart_window=restart_window,
                             only=sorted(workspace_ids))
    return observed, installed_since(session, workspace_ids, since)
