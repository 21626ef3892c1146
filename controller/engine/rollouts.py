"""Rollouts in the loop: before a pass plans anything, each template's rollout is brought up
to date (a new revision starts one; a healthy wave lets the next through; too many
unhealthy workspaces halt it), and the desired state is rewritten so that each workspace of
a template in flight asks for the revision its wave allows. The pass then converges that, as
it converges anything else: a workspace held back gets no call for the new revision.

Every reader goes through `gate`: the loop, `reconcile --once`, the operator, `plan`,
`status`, `explain`, so all of them agree on who is on which revision."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from functools import partial
from typing import Any

from controller.domain import planner, rollout
from controller.domain.desired import Desired, TemplateObject
from controller.domain.models import DesiredWorkspace, Observed, Policy
from controller.domain.rollout import Health, Revision, Rollout, RolloutPhase, Summary
from controller.store import DatabaseError, Sessions, in_thread, queries

log = logging.getLogger("pluginctl.rollout")


@dataclass(frozen=True)
class Gated:
    """The desired state each workspace is held to now, and the rollouts that decided it."""

    desired: Desired
    rollouts: Mapping[str, Rollout] = field(default_factory=dict)  # by template "ns/name"
    members: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # template -> ids
    moved: Mapping[str, frozenset[str]] = field(default_factory=dict)  # on the target
    # what this pass judged of the waves of progressing rollouts: template -> workspace
    health: Mapping[str, Mapping[str, Health]] = field(default_factory=dict)

    def held(self, before: Desired) -> dict[str, DesiredWorkspace]:
        """The workspaces held to their template's stable revision (`before`: the desired
        state given to `gate`)."""
        if self.desired is before:
            return {}
        return {workspace_id: wanted for workspace_id, wanted in self.desired.workspaces.items()
                if wanted is not before.workspaces.get(workspace_id)}

    def template_of(self, workspace_id: str) -> str | None:
        wanted = self.desired.workspaces.get(workspace_id)
        return wanted.template_key if wanted is not None else None


def members_of(desired: Desired) -> dict[str, tuple[str, ...]]:
    """The valid workspaces of each template: the population its waves are cut from."""
    members: dict[str, list[str]] = {}
    for workspace_id, wanted in desired.workspaces.items():
        key = wanted.template_key
        if key is not None and wanted.error is None:
            members.setdefault(key, []).append(workspace_id)
    return {key: tuple(sorted(ids)) for key, ids in members.items()}


def spec_of(desired: Desired, key: str) -> rollout.RolloutSpec | None:
    template = desired.templates.get(key)
    return template.rollout if template is not None else None


async def gate(desired: Desired, sessions: Sessions, policy: Policy, *, now: datetime,
               advance: bool) -> Gated:
    """Bring every template's rollout up to date and hold each workspace to its revision.
    `advance`: store what changed (a pass that acts); else only look (plan, status, a dry
    run), which shows what the next pass would do."""
    usable = {key: t for key, t in desired.templates.items() if t.error is None}
    if not usable or not (advance or any(t.rollout for t in usable.values())):
        return Gated(desired)  # nothing can be held back: no read (steady passes stay light)
    stored, let_through = await in_thread(sessions, _load)
    members = members_of(desired)
    rollouts: dict[str, Rollout] = {}
    for key, template in usable.items():
        rollouts[key] = rollout.observe(stored.get(key), template=key,
                                        current=Revision.of(template.plugins),
                                        spec=template.rollout, now=now)
    def kept(r: Rollout) -> frozenset[str]:
        revision, ids = let_through.get(r.template, (None, frozenset()))
        return ids if r.target is not None and revision == r.target.digest else frozenset()

    health: dict[str, dict[str, Health]] = {}
    if advance:
        rollouts = await _advance(rollouts, usable, wanted=desired.workspaces,
                                  members=members, stored=stored, health=health, kept=kept,
                                  sessions=sessions, policy=policy, now=now)
    moved = {key: rollout.on_target(r, spec_of(desired, key), members.get(key, ()), kept(r))
             for key, r in rollouts.items() if r.in_flight}
    if advance:
        await _keep(rollouts, moved, let_through, sessions=sessions)
    return Gated(_held(desired, rollouts, moved=moved), rollouts, members, moved, health)


def _load(session: Any) -> tuple[dict[str, Rollout], dict[str, tuple[str, frozenset[str]]]]:
    return queries.load_rollouts(session), queries.load_let_through(session)


async def _keep(rollouts: Mapping[str, Rollout], moved: Mapping[str, frozenset[str]],
                let_through: Mapping[str, tuple[str, frozenset[str]]], *,
                sessions: Sessions) -> None:
    """Store the workspaces let through to each rollout's target that are not stored yet;
    forget those of a rollout that ended or moved on to another revision."""
    changes: dict[str, tuple[str | None, frozenset[str]]] = {}
    for key, r in rollouts.items():
        revision, ids = let_through.get(key, (None, frozenset()))
        if key in moved and r.target is not None:
            new = moved[key] - ids if revision == r.target.digest else moved[key]
            if new or (revision is not None and revision != r.target.digest):
                changes[key] = (r.target.digest, new)
        elif revision is not None:
            changes[key] = (None, frozenset())
    if not changes:
        return
    try:
        await in_thread(sessions, partial(queries.save_let_through, changes=changes))
    except DatabaseError as error:  # this pass's waves stand; the next one stores them
        log.warning("could not store the workspaces let through: %s", error)


def _held(desired: Desired, rollouts: Mapping[str, Rollout], *,
          moved: Mapping[str, frozenset[str]]) -> Desired:
    """`desired` with every workspace of a template in flight that is not on the target
    asking for the stable revision instead."""
    if not moved:
        return desired
    workspaces = dict(desired.workspaces)
    for workspace_id, wanted in desired.workspaces.items():
        key = wanted.template_key
        if key is not None and key in moved and workspace_id not in moved[key]:
            workspaces[workspace_id] = rollout.at_revision(wanted, rollouts[key].stable)
    return replace(desired, workspaces=workspaces)


async def _advance(rollouts: dict[str, Rollout], templates: Mapping[str, TemplateObject], *,
                   wanted: Mapping[str, DesiredWorkspace],
                   members: Mapping[str, Sequence[str]], stored: Mapping[str, Rollout],
                   health: dict[str, dict[str, Health]],
                   kept: Callable[[Rollout], frozenset[str]], sessions: Sessions,
                   policy: Policy, now: datetime) -> dict[str, Rollout]:
    """Judge the waves of progressing rollouts (into `health`) and store every rollout that
    changed; where another replica stored one first, take its version."""
    for key, current in list(rollouts.items()):
        spec = templates[key].rollout
        if current.phase is RolloutPhase.PROGRESSING and spec is not None:
            ids = members.get(key, ())
            health[key] = await _health(current, spec, ids, kept(current), wanted=wanted,
                                        sessions=sessions, policy=policy, now=now)
            rollouts[key] = rollout.evaluate(current, spec, health[key], total=len(ids),
                                             now=now)
    changed = [r for key, r in rollouts.items() if r != stored.get(key)]
    if not changed:
        return rollouts
    try:
        saved = await in_thread(sessions, partial(queries.save_rollouts, changed=changed, now=now))
    except DatabaseError as error:  # the next pass decides again from what is stored
        log.warning("could not store rollout progress: %s", error)
        return {key: stored.get(key, r) for key, r in rollouts.items()}
    for key, r in saved.items():
        before = stored.get(key)
        rollouts[key] = r
        if before is not None:
            _say(before, r, total=len(members.get(key, ())))
    return rollouts


def _say(before: Rollout, after: Rollout, *, total: int) -> None:
    """One log line per step a rollout takes."""
    if after.phase is RolloutPhase.HALTED and before.phase is not RolloutPhase.HALTED:
        log.error("rollout of template %s halted: %s", after.template, after.message)
    elif after.target is not None and after.target != before.target:
        log.info("template %s: revision %s rolls out in waves (stable: %s)", after.template,
                 after.target.short, after.stable.short)
    elif after.phase is RolloutPhase.PROGRESSING and after.wave != before.wave:
        log.info("template %s: wave %d of revision %s starts", after.template, after.wave + 1,
                 after.target.short if after.target else "?")
    elif after.phase is RolloutPhase.COMPLETE and before.phase is not RolloutPhase.COMPLETE:
        log.info("template %s: %s", after.template, after.message or "rollout complete")
    del total


async def _health(current: Rollout, spec: rollout.RolloutSpec, ids: Sequence[str],
                  kept: frozenset[str], *, wanted: Mapping[str, DesiredWorkspace],
                  sessions: Sessions, policy: Policy, now: datetime) -> dict[str, Health]:
    """How each workspace let through to the target is doing (`wanted`: on the target;
    `kept`: those stored as let through)."""
    assert current.target is not None and current.counted_since is not None
    moved = rollout.on_target(current, spec, ids, kept)
    if not moved:
        return {}
    since = current.counted_since
    observed, installs = await in_thread(sessions, partial(
        queries.rollout_health_inputs, workspace_ids=moved, since=since, now=now,
        restart_window=policy.restart_window))
    health: dict[str, Health] = {}
    for workspace_id in sorted(moved):
        seen = observed.get(workspace_id)
        if seen is not None:
            judged = judge(seen, wanted[workspace_id], since=since,
                           installed=installs.get(workspace_id), policy=policy, now=now)
            if judged is not None:
                health[workspace_id] = judged
    return health


def judge(seen: Observed, wanted: DesiredWorkspace, *, since: datetime,
          installed: datetime | None, policy: Policy, now: datetime) -> Health | None:
    """A workspace on the target revision as its wave's health sees it; None: it does not
    count (offline since before the rollout, or never registered).

    Unhealthy: an install or runtime call that failed since the rollout began (or was
    resumed); gone offline since then; or registered again after something of the rollout
    was installed on it, without a restart the controller asked for (a crash), within the
    last half of the restart budget's window."""
    online = seen.is_online(now, policy.offline_after)
    if not online:
        if seen.last_seen_at is not None and seen.last_seen_at >= since - policy.offline_after:
            return Health(False, f"went offline (last heartbeat {seen.last_seen_at:%H:%M:%S})")
        return None
    failures = sorted((key, a) for key, a in seen.attempts.items()
                      if a.last_attempt_at >= since)
    if failures:
        key, attempt = failures[0]
        what = "runtime call" if key.startswith("@") else f"install of {key}"
        return Health(False, f"{what} failed: {attempt.last_error}")
    # The restarts loaded are those of the budget's window: judge the registers well inside
    # it, where a restart the controller asked for is surely known.
    recent = now - policy.restart_window / 2
    if (installed is not None and seen.registered_at is not None
            and seen.registered_at > installed and seen.registered_at >= recent
            and not any(installed <= at <= seen.registered_at for at in seen.restarts)):
        return Health(False, f"registered again at {seen.registered_at:%H:%M:%S} after the "
                             f"rollout installed on it (a crash?)")
    return Health(planner.plan(wanted, seen, now, policy).in_sync)


# --- a person's commands ----------------------------------------------------------------------

COMMANDS: dict[str, Callable[[Rollout, datetime], Rollout]] = {
    "resume": rollout.resume,
    "abort": lambda current, now: rollout.abort(current),
    "promote": lambda current, now: rollout.promote(current),
}


async def command(sessions: Sessions, template: str, action: str, *, now: datetime
                  ) -> Rollout:
    """Apply `action` (resume, abort, promote) to the stored rollout of `template`
    ("namespace/name"); the rollout as stored after it. RolloutError if it does not apply."""
    change = COMMANDS[action]

    def run(session: Any) -> Rollout:
        current = queries.load_rollouts(session).get(template)
        if current is None:
            raise rollout.RolloutError(f"template {template} has no rollout on record (a "
                                       f"pass records one when it first sees the template)")
        stored = queries.save_rollout(session, change(current, now), now=now)
        if stored is None:
            raise rollout.RolloutError(f"template {template}: the rollout changed while this "
                                       f"command ran; look at it again and retry")
        return stored

    return await in_thread(sessions, run)


# --- what `rollout status` shows ---------------------------------------------------------------

async def summarize(gated: Gated, template: str, sessions: Sessions, policy: Policy, *,
                    now: datetime) -> Summary:
    """`template`'s rollout with the health of the workspaces on its target (read only)."""
    current = gated.rollouts.get(template)
    if current is None:
        known = ", ".join(sorted(gated.desired.templates)) or "none"
        raise rollout.RolloutError(f"no template {template} in the desired state (known: "
                                   f"{known})")
    spec = spec_of(gated.desired, template)
    ids = gated.members.get(template, ())
    moved = gated.moved.get(template, frozenset())
    health: dict[str, Health] = {}
    if moved and current.target is not None and spec is not None:
        health = await _health(replace(current, counted_since=current.counted_since or now),
                               spec, ids, moved, wanted=gated.desired.workspaces,
                               sessions=sessions, policy=policy, now=now)
    return _summary(gated, template, health, now=now)


def summaries(gated: Gated, *, now: datetime) -> tuple[Summary, ...]:
    """Every template with `spec.rollout` or a rollout in flight, from what the pass judged
    (no read): what a pass reports to metrics and to the operator's template status. The
    health counts are those of a progressing rollout's waves (judged before it moved on: a
    rollout that just completed has none); else none are judged."""
    return tuple(_summary(gated, key, gated.health.get(key, {}) if r.in_flight else {},
                          now=now)
                 for key, r in sorted(gated.rollouts.items())
                 if r.in_flight or spec_of(gated.desired, key) is not None)


def _summary(gated: Gated, template: str, health: Mapping[str, Health], *, now: datetime
             ) -> Summary:
    current = gated.rollouts[template]
    spec = spec_of(gated.desired, template)
    failed = tuple(sorted((w, h.problem) for w, h in health.items() if h.problem))
    return Summary(template, current, spec.steps if spec else (),
                   len(gated.members.get(template, ())),
                   len(gated.moved.get(template, frozenset())),
                   sum(1 for h in health.values() if h.in_sync and not h.problem), failed,
                   rollout.bake_left(current, spec, now))


def note(gated: Gated, workspace_id: str) -> str | None:
    """For `explain`: which revision of its template a workspace is on while a rollout of it
    is in flight, and why."""
    key = gated.template_of(workspace_id)
    current = gated.rollouts.get(key) if key is not None else None
    if key is None or current is None or not current.in_flight or current.target is None:
        return None
    spec = spec_of(gated.desired, key)
    steps = spec.steps if spec else (100,)
    wave = f"wave {current.wave + 1} of {len(steps)}"
    if workspace_id in gated.moved.get(key, frozenset()):
        return (f"on revision {current.target.short} of template {key}, rolling out "
                f"({wave}; {current.phase.lower()})")
    held = f"on revision {current.stable.short} of template {key}"
    if current.phase is RolloutPhase.ABORTED:
        return f"{held}: the rollout of {current.target.short} was aborted"
    ids = gated.members.get(key, ())
    place = rollout.wave_order(key, current.target.digest, ids).index(workspace_id) \
        if workspace_id in ids else 0
    its = next(i for i in range(len(steps)) if rollout.wave_size(len(ids), steps, i) > place)
    state = (f"halted: {current.message}" if current.phase is RolloutPhase.HALTED
             else f"now at {wave}")
    return (f"{held}; waits for wave {its + 1} of the rollout of {current.target.short}: "
            f"{state}")
