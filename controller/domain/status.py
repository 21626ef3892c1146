"""The status builder: one function that says, per workspace, where it stands — phase,
per-plugin state, drift, last error, next retry, restart budget. Pure; the CLI prints it
and the operator mirrors it into the Workspace status."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from controller.domain import planner
from controller.domain.models import RUNTIME_KEY, DesiredWorkspace, Observed, Phase, Policy
from controller.domain.reasons import InvalidReason


class PluginState(enum.StrEnum):
    INSTALLED = "Installed"
    PENDING = "Pending"
    FAILED = "Failed"
    HELD = "Held"
    REMOVING = "Removing"  # installed by us, no longer declared
    REFUSED = "Refused"  # the policy forbids installing it (an unpinned source)


@dataclass(frozen=True, slots=True)
class PluginStatus:
    name: str
    source: str
    state: PluginState
    message: str = ""
    attempts: int = 0
    next_retry_at: datetime | None = None


@dataclass(frozen=True)
class WorkspaceStatus:
    workspace_id: str
    object_ref: str | None
    template: str | None
    phase: Phase
    desired: int
    installed: int  # desired plugins the runtime reports as installed, as declared
    plugins: tuple[PluginStatus, ...]
    in_sync: bool
    error: str | None  # the most relevant error: invalid desired state or last failure
    next_retry_at: datetime | None
    restart_pending: bool
    restarts_left: int
    last_seen_at: datetime | None
    report_at: datetime | None
    invalid: InvalidReason | None = None  # why desired state is unusable (phase Invalid)

    @property
    def drift(self) -> tuple[str, ...]:
        return tuple(f"{p.name}: {p.state.value.lower()}" for p in self.plugins
                     if p.state is not PluginState.INSTALLED)


def build(
    desired: DesiredWorkspace | None, observed: Observed | None, now: datetime, policy: Policy,
    *, desired_known: bool = True,
) -> WorkspaceStatus:
    phase = planner.phase_of(desired, observed, now, policy, desired_known=desired_known)
    report = observed.report if observed else None
    attempts = observed.attempts if observed else {}
    restarts_used = len(planner.recent_restarts(observed, now, policy)) if observed else 0
    restart_pending = bool(observed and observed.restart_pending)
    held = restart_pending and restarts_used >= policy.restart_budget

    plugins: list[PluginStatus] = []
    wanted = desired.plugins if desired and desired.error is None else {}
    for name in sorted(wanted):
        want = wanted[name]
        have = report.get(name) if report is not None else None
        attempt = attempts.get(name)
        if have is not None and have.satisfies(want):
            state = PluginState.HELD if held else PluginState.INSTALLED
            message = "installed; restart held: budget spent" if held else ""
            plugins.append(PluginStatus(name, want.source, state, message))
        elif (refusal := policy.refusal(want)) is not None:
            plugins.append(PluginStatus(name, want.source, PluginState.REFUSED, refusal))
        elif attempt is not None:
            plugins.append(PluginStatus(name, want.source, PluginState.FAILED,
                                        attempt.last_error, attempt.failures,
                                        attempt.next_retry_at))
        else:
            message = ("waiting for the runtime's report" if report is None
                       else "missing" if have is None else f"installed from {have.source}")
            plugins.append(PluginStatus(name, want.source, PluginState.PENDING, message))
    # Only a managed workspace with usable desired state has plugins to remove: the loop
    # leaves an unmanaged or invalid one (and one whose desired state is not at hand) alone.
    removable = observed.owned if observed and desired and desired.error is None else {}
    for name in sorted(removable):
        if name in wanted or report is None or name not in report:
            continue
        attempt = attempts.get(name)
        plugins.append(PluginStatus(
            name, report[name].source, PluginState.REMOVING,
            attempt.last_error if attempt else "no longer declared",
            attempt.failures if attempt else 0, attempt.next_retry_at if attempt else None))

    runtime_attempt = attempts.get(RUNTIME_KEY)
    latest = max(attempts.values(), key=lambda a: a.last_attempt_at, default=None)
    error = desired.error if desired and desired.error else (
        latest.last_error if latest else observed.runtime_error if observed else None)
    retries = [a.next_retry_at for a in attempts.values()]
    installed = sum(1 for p in plugins if p.state in (PluginState.INSTALLED, PluginState.HELD))
    in_sync = (
        phase is Phase.ONLINE and report is not None and not restart_pending
        and all(p.state is PluginState.INSTALLED for p in plugins)
        and runtime_attempt is None
    )
    return WorkspaceStatus(
        workspace_id=(desired.workspace_id if desired else observed.workspace_id if observed
                      else "?"),
        object_ref=desired.object_ref if desired else None,
        template=desired.template if desired else None,
        phase=phase,
        desired=len(wanted),
        installed=installed,
        plugins=tuple(plugins),
        in_sync=in_sync,
        error=error,
        next_retry_at=min(retries, default=None),
        restart_pending=restart_pending,
        restarts_left=max(0, policy.restart_budget - restarts_used),
        last_seen_at=observed.last_seen_at if observed else None,
        report_at=observed.report_at if observed else None,
        invalid=desired.reason if desired else None,
    )
