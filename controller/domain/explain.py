"""`pluginctl explain`: why one workspace is or is not in sync — which declaration asks for
each plugin, what its runtime last reported and when, who owns what, the last error, the
next retry, the restart budget left, and what the next pass would do. Pure: built from the
same desired state, observed state and planner the pass uses."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from controller.domain import planner, status
from controller.domain.models import (
    RUNTIME_KEY,
    DesiredWorkspace,
    Observed,
    Phase,
    Plugin,
    Policy,
    WaitKind,
)
from controller.domain.status import PluginState

#: The state of a reported plugin the loop does not act on: neither declared nor pluginctl's
#: to remove, or on a workspace it does not manage (unmanaged, invalid). Not a PluginState:
#: the Workspace status never lists such plugins.
LEFT_ALONE = "LeftAlone"


@dataclass(frozen=True, slots=True)
class Claim:
    """The replica acting on the workspace right now, if any."""

    replica: str
    until: datetime


@dataclass(frozen=True, slots=True)
class PluginExplanation:
    name: str
    declared_by: str | None  # "WorkspaceTemplate ns/base spec.plugins[0]"; None: not declared
    wanted: Plugin | None
    installed: Plugin | None  # as the runtime last reported it
    owner: str  # "pluginctl" (installed because declared), "not pluginctl", or "-"
    state: str  # a PluginState, or LEFT_ALONE for a plugin the loop does not act on
    message: str
    failures: int
    next_retry_at: datetime | None


@dataclass(frozen=True)
class Explanation:
    workspace_id: str
    object_ref: str | None
    template: str | None
    phase: Phase
    in_sync: bool
    verdict: str  # one sentence: the answer to "why"
    url: str | None
    registered_at: datetime | None
    last_seen_at: datetime | None
    report_at: datetime | None
    plugins: tuple[PluginExplanation, ...]
    runtime_error: str | None  # the last observe/restart failure
    runtime_next_retry_at: datetime | None
    restart_pending: bool
    restarts_used: int
    restart_budget: int
    restart_budget_frees_at: datetime | None  # when the oldest counted restart leaves the window
    next_pass: tuple[str, ...]  # what the next pass would do or wait for, in words
    claim: Claim | None


def explain(desired: DesiredWorkspace | None, observed: Observed | None, now: datetime,
            *, policy: Policy, claim: Claim | None = None) -> Explanation:
    state = status.build(desired, observed, now, policy)
    report = observed.report if observed is not None else None
    owned = observed.owned if observed is not None else {}
    declared_by = desired.declared_by if desired is not None else {}
    namespace = desired.object_ref.partition("/")[0] if desired is not None else ""

    def declaration(name: str) -> str | None:
        origin = declared_by.get(name)
        if origin is None:
            return None
        return f"{origin.kind} {namespace}/{origin.name} spec.plugins[{origin.index}]"

    def owner(name: str) -> str:
        if report is None or name not in report:
            return "-"
        return "pluginctl" if name in owned else "not pluginctl"

    plugins = []
    shown = set()
    for plugin_state in state.plugins:
        shown.add(plugin_state.name)
        wanted = desired.plugins.get(plugin_state.name) if desired is not None else None
        plugins.append(PluginExplanation(
            plugin_state.name, declaration(plugin_state.name), wanted,
            report.get(plugin_state.name) if report is not None else None,
            owner(plugin_state.name), plugin_state.state.value, plugin_state.message,
            plugin_state.attempts, plugin_state.next_retry_at))
    for name in sorted(report or {}):
        if name in shown or report is None:
            continue
        # Plugins status.build lists (declared, or ours to remove) are shown above; the rest
        # the loop leaves where they are.
        plugins.append(PluginExplanation(
            name, None, None, report[name], owner(name), LEFT_ALONE,
            _left_alone(state.phase, mine=name in owned), 0, None))

    restarts = planner.recent_restarts(observed, now, policy) if observed is not None else []
    runtime_attempt = observed.attempts.get(RUNTIME_KEY) if observed is not None else None
    next_pass = _next_pass(desired, observed, now, policy=policy, phase=state.phase)
    return Explanation(
        workspace_id=state.workspace_id, object_ref=state.object_ref, template=state.template,
        phase=state.phase, in_sync=state.in_sync,
        verdict=_verdict(state, desired, observed, now=now, policy=policy),
        url=observed.url if observed is not None else None,
        registered_at=observed.registered_at if observed is not None else None,
        last_seen_at=state.last_seen_at, report_at=state.report_at,
        plugins=tuple(plugins),
        runtime_error=(runtime_attempt.last_error if runtime_attempt else
                       observed.runtime_error if observed is not None else None),
        runtime_next_retry_at=runtime_attempt.next_retry_at if runtime_attempt else None,
        restart_pending=state.restart_pending, restarts_used=len(restarts),
        restart_budget=policy.restart_budget,
        restart_budget_frees_at=restarts[0] + policy.restart_window if restarts else None,
        next_pass=next_pass, claim=claim if claim is not None and claim.until > now else None,
    )


def _left_alone(phase: Phase, *, mine: bool) -> str:
    if not mine:
        return "not declared and not installed by pluginctl: never touched"
    if phase is Phase.UNMANAGED:
        return ("installed by pluginctl; no Workspace declares this id any more, so it is "
                "left as it is")
    return "installed by pluginctl; left as it is while the desired state cannot be used"


def _verdict(state: status.WorkspaceStatus, desired: DesiredWorkspace | None,
             observed: Observed | None, *, now: datetime, policy: Policy) -> str:
    match state.phase:
        case Phase.UNMANAGED:
            return ("no Workspace declares this id: pluginctl makes no calls to it and "
                    "leaves its plugins alone")
        case Phase.INVALID:
            return f"its desired state cannot be used: {state.error}"
        case Phase.SUSPENDED:
            return "suspended (spec.suspend): no calls until it is resumed"
        case Phase.DORMANT:
            return "paused (`pluginctl workspace pause`): no calls until it is resumed"
        case Phase.UNREGISTERED:
            return "its runtime has not registered yet: nothing to call"
        case Phase.OFFLINE:
            seen = observed.last_seen_at if observed is not None else None
            since = f"{age(seen, now)} ago" if seen is not None else "never"
            return (f"offline: last heartbeat {since} (offline after "
                    f"{policy.offline_after.total_seconds():g}s); no calls until it is back")
    if state.in_sync:
        return "in sync: every declared plugin is installed as declared"
    reasons = [f"{p.name} {p.state.value.lower()}" + (f" ({p.message})" if p.message else "")
               for p in state.plugins if p.state is not PluginState.INSTALLED]
    if observed is not None and observed.report is None:
        reasons.insert(0, "no report from the runtime since it registered")
    if state.restart_pending:
        reasons.append("a restart is pending")
    if observed is not None and RUNTIME_KEY in observed.attempts:
        reasons.append(f"the runtime failed: {observed.attempts[RUNTIME_KEY].last_error}")
    return "out of sync: " + "; ".join(reasons)


def _next_pass(desired: DesiredWorkspace | None, observed: Observed | None, now: datetime,
               *, policy: Policy, phase: Phase) -> tuple[str, ...]:
    if phase is Phase.UNMANAGED:
        return ("nothing: no Workspace declares it, so no calls are made",)
    if desired is None or observed is None or phase is not Phase.ONLINE:
        return ("nothing: it is not an online, managed workspace",)
    plan = planner.plan(desired, observed, now, policy)
    lines = [action.describe() for action in plan.actions]
    for wait in plan.waits:
        if wait.kind is WaitKind.REFUSED:
            lines.append(f"refuse {wait.key}: {wait.reason}")
        else:
            lines.append(f"wait until {wait.until:%Y-%m-%d %H:%M:%S} UTC: {wait.reason}"
                         if wait.until else f"wait: {wait.reason}")
    return tuple(lines) or ("nothing: it is in sync",)


def age(then: datetime, now: datetime) -> str:
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    if seconds < 172800:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"

