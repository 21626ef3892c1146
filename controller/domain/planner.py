"""The planner: desired x observed x ownership x backoff state x now -> actions, for one
workspace. Pure and deterministic; the executor performs what it returns."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from controller.domain import backoff
from controller.domain.models import (
    RUNTIME_KEY,
    Action,
    ActionKind,
    DesiredWorkspace,
    Observed,
    Phase,
    Plugin,
    Policy,
    Wait,
    WaitKind,
    WorkspacePlan,
)


def phase_of(
    desired: DesiredWorkspace | None, observed: Observed | None, now: datetime, policy: Policy,
    *, desired_known: bool = True,
) -> Phase:
    """Where a workspace stands. With `desired_known=False` (no desired state at hand, e.g.
    `pluginctl status` without manifests) only the runtime's side is judged."""
    if desired_known and desired is None:
        return Phase.UNMANAGED
    if desired is not None and desired.error is not None:
        return Phase.INVALID
    if desired is not None and desired.suspended:
        return Phase.SUSPENDED
    if observed is not None and observed.dormant:
        return Phase.DORMANT
    if observed is None or observed.url is None:
        return Phase.UNREGISTERED
    if not observed.is_online(now, policy.offline_after):
        return Phase.OFFLINE
    return Phase.ONLINE


def recent_restarts(observed: Observed, now: datetime, policy: Policy) -> list[datetime]:
    window_start = now - policy.restart_window
    return sorted(t for t in observed.restarts if window_start < t <= now)


def _drift_reason(have: Plugin | None, want: Plugin) -> str:
    if have is None:
        return "missing"
    if have.source != want.source:
        return f"source {have.source} -> {want.source}"
    if have.modified:
        return "modified on the box since it was installed"
    return f"digest {have.digest or 'unknown'} -> {want.digest}"


def plan(
    desired: DesiredWorkspace, observed: Observed, now: datetime, policy: Policy
) -> WorkspacePlan:
    """Recompute from full state what this workspace needs now. Nothing here depends on how
    the workspace got online: a missed transition is just another difference."""
    workspace_id = observed.workspace_id
    if phase_of(desired, observed, now, policy) is not Phase.ONLINE:
        return WorkspacePlan(workspace_id, (), (), may_restart=False, restart_pending=False)

    actions: list[Action] = []
    waits: list[Wait] = []

    def propose(action: Action) -> None:
        attempt = observed.attempts.get(action.key)
        if attempt is None or backoff.is_due(attempt, now, policy):
            actions.append(action)
        else:
            waits.append(Wait(WaitKind.BACKOFF, action.key, attempt.next_retry_at,
                              f"{action.describe()} failed {attempt.failures}x: "
                              f"{attempt.last_error}"))

    runtime_due = backoff.is_due(observed.attempts.get(RUNTIME_KEY), now, policy)
    restarts = recent_restarts(observed, now, policy)
    may_restart = len(restarts) < policy.restart_budget and runtime_due

    if observed.report is None:
        propose(Action(ActionKind.OBSERVE, "no report from the runtime since it registered"))
        return WorkspacePlan(workspace_id, tuple(actions), tuple(waits), may_restart,
                             observed.restart_pending)
    report = observed.report

    for name in sorted(desired.plugins):
        want = desired.plugins[name]
        have = report.get(name)
        if have is None or not have.satisfies(want):
            refusal = policy.refusal(want)
            if refusal is None:
                propose(Action(ActionKind.INSTALL, _drift_reason(have, want), want))
            else:
                waits.append(Wait(WaitKind.REFUSED, name, None, refusal))

    for name in sorted(observed.owned):
        if name in desired.plugins:
            continue
        mine = observed.owned[name]
        have = report.get(name)
        if have is None:
            actions.append(Action(ActionKind.DISOWN, "no longer declared, already gone", mine))
        elif have.source != mine.source:
            # Replaced by someone else since we installed it: not ours to remove any more.
            actions.append(Action(ActionKind.DISOWN, "replaced outside the controller", mine))
        else:
            propose(Action(ActionKind.REMOVE, "no longer declared", mine))

    if observed.restart_pending:
        if may_restart:
            actions.append(Action(ActionKind.RESTART, "requested by an earlier install"))
        elif not runtime_due:
            propose(Action(ActionKind.RESTART, "requested by an earlier install"))
        else:
            # With a budget of 0 no restart ever frees one: held until the policy changes.
            until = restarts[0] + policy.restart_window if restarts else None
            waits.append(Wait(WaitKind.RESTART_BUDGET, RUNTIME_KEY, until,
                              f"restart budget spent ({policy.restart_budget} per "
                              f"{_human(policy.restart_window)})"))

    return WorkspacePlan(workspace_id, tuple(actions), tuple(waits), may_restart,
                         observed.restart_pending)


#: Fewer removals than this never hold a pass, whatever their share: in a small fleet one
#: plugin dropped from one workspace is already a large share.
GUARD_MIN_REMOVALS = 10


@dataclass(frozen=True, slots=True)
class Held:
    """Why the blast-radius guard holds a pass: what the pass would do (which changes with
    the fleet) and the limit that forbids it (which changes only with the flags)."""

    would: str  # "would act on 2 workspaces"
    limit: str  # "--max-workspaces 1"

    def __str__(self) -> str:
        return f"{self.would}, more than {self.limit}"


def blast_radius(removals: int, declared: int, workspaces: int, policy: Policy
                 ) -> Held | None:
    """Why a pass must hold instead of acting, or None. `removals`: plugins it would remove;
    `declared`: plugins declared on the online workspaces it covers; `workspaces`: how many
    of them it would act on."""
    if policy.max_workspaces and workspaces > policy.max_workspaces:
        return Held(f"would act on {workspaces} workspaces",
                    f"--max-workspaces {policy.max_workspaces}")
    total = declared + removals
    if removals >= GUARD_MIN_REMOVALS and removals > policy.max_removal_share * total:
        return Held(f"would remove {removals} of {total} plugins ({removals / total:.0%})",
                    f"--max-removal-share {policy.max_removal_share:g}")
    return None


def _human(span: timedelta) -> str:
    seconds = int(span.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"
