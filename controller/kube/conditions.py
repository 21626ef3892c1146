"""The status mirror: what the Workspace and WorkspaceTemplate `status` should say (kstatus
conditions Ready/Reconciling/Stalled with observedGeneration), whether that differs from
what is there, and which Events a pass's outcomes deserve. Pure: the operator applies it."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from controller.domain.models import Action, ActionKind, Outcome, Phase
from controller.domain.planner import Held
from controller.domain.reasons import InvalidReason
from controller.domain.rollout import RolloutPhase, Summary
from controller.domain.status import PluginState, WorkspaceStatus

REQUESTED_AT = "reconcile.pluginctl.dev/requestedAt"
#: On a WorkspaceTemplate: resume | abort | promote its rollout; cleared once applied.
ROLLOUT_COMMAND = "reconcile.pluginctl.dev/rollout"
WORKSPACE_ID_LABEL = "pluginctl.dev/workspace-id"
WORKSPACE_LABEL = "pluginctl.dev/workspace"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "pluginctl"
TOKEN_KEY = "token"
CONTROLLER_SECRET_KEY = "controller-secret"  # with --runtime-secret-per-workspace


class ConditionReason(enum.StrEnum):
    """Every reason a Workspace condition can give: users, `kubectl wait` and GitOps health
    checks match on these, so they never change with the wording of a message."""

    IN_SYNC = "InSync"
    NOT_STALLED = "NotStalled"
    SUSPENDED = "Suspended"
    DORMANT = "Dormant"
    UNREGISTERED = "Unregistered"
    OFFLINE = "Offline"
    WAITING_FOR_RUNTIME = "WaitingForRuntime"
    GUARD_HOLDING = "GuardHolding"
    REFUSED = "Refused"
    FAILED = "Failed"
    RESTART_HELD = "RestartHeld"
    RESTART_PENDING = "RestartPending"
    PROGRESSING = "Progressing"
    DUPLICATE_WORKSPACE_ID = "DuplicateWorkspaceId"
    TEMPLATE_NOT_FOUND = "TemplateNotFound"
    INVALID_SPEC = "InvalidSpec"
    # WorkspaceTemplate
    ROLLOUT_COMPLETE = "RolloutComplete"
    ROLLOUT_PROGRESSING = "RolloutProgressing"
    ROLLOUT_HALTED = "RolloutHalted"
    ROLLOUT_ABORTED = "RolloutAborted"


#: Why desired state is unusable, as a condition reason: the one place the two meet.
INVALID_CONDITION: Mapping[InvalidReason, ConditionReason] = {
    InvalidReason.DUPLICATE_WORKSPACE_ID: ConditionReason.DUPLICATE_WORKSPACE_ID,
    InvalidReason.TEMPLATE_NOT_FOUND: ConditionReason.TEMPLATE_NOT_FOUND,
    **{reason: ConditionReason.INVALID_SPEC for reason in (
        InvalidReason.UNREADABLE, InvalidReason.NOT_A_MAPPING, InvalidReason.FOREIGN_VERSION,
        InvalidReason.BAD_METADATA, InvalidReason.BAD_SPEC, InvalidReason.DEFINED_TWICE,
        InvalidReason.BAD_WORKSPACE_ID, InvalidReason.BAD_PLUGIN,
        InvalidReason.CONFLICTING_PLUGIN, InvalidReason.TEMPLATE_INVALID)},
}


@dataclass(frozen=True, slots=True)
class Condition:
    type: str
    status: str  # "True" | "False"
    reason: ConditionReason
    message: str


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # Normal | Warning
    reason: str
    message: str


def _iso(value: datetime | None) -> str | None:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ") if value else None


def conditions_for(state: WorkspaceStatus, guard: Held | None = None
                   ) -> tuple[Condition, Condition, Condition]:
    """Ready, Reconciling, Stalled. No timestamps in messages: a heartbeat never writes.
    `guard`: why the blast-radius guard held the pass (a workspace it left out of sync is
    stalled until someone looks). Only its limit is written, never its counts: those move
    with the fleet and would rewrite every held Workspace each pass."""
    R = ConditionReason
    Said = tuple[str, ConditionReason, str]

    def make(ready: Said, reconciling: Said, stalled: Said
             ) -> tuple[Condition, Condition, Condition]:
        return (Condition("Ready", *ready), Condition("Reconciling", *reconciling),
                Condition("Stalled", *stalled))

    plugins = f"{state.installed}/{state.desired} plugins installed"
    not_stalled: Said = ("False", R.NOT_STALLED, "")
    reason: ConditionReason
    match state.phase:
        case Phase.INVALID:
            reason = INVALID_CONDITION[state.invalid or InvalidReason.BAD_SPEC]
            return make(("False", reason, state.error or ""), ("False", reason, ""),
                        ("True", reason, state.error or ""))
        case Phase.SUSPENDED:
            return make(("False", R.SUSPENDED, "spec.suspend is true: no calls are made"),
                        ("False", R.SUSPENDED, ""), not_stalled)
        case Phase.DORMANT:
            return make(("False", R.DORMANT, "paused by an operator (pluginctl workspace "
                                             "resume to undo)"),
                        ("False", R.DORMANT, ""), not_stalled)
        case Phase.UNREGISTERED | Phase.OFFLINE:
            unregistered = state.phase is Phase.UNREGISTERED
            reason = R.UNREGISTERED if unregistered else R.OFFLINE
            message = ("waiting for the runtime to register" if unregistered
                       else "the runtime has not been seen recently")
            return make(("False", reason, message), ("True", R.WAITING_FOR_RUNTIME, message),
                        not_stalled)
    if state.in_sync:
        return make(("True", R.IN_SYNC, plugins), ("False", R.IN_SYNC, ""), not_stalled)
    if guard is not None:
        message = (f"{plugins}; the blast-radius guard holds every pass: it would go over "
                   f"{guard.limit} (the controller's log and pluginctl plan say what it "
                   "would do; pluginctl reconcile --once --force goes ahead)")
        return make(("False", R.GUARD_HOLDING, message), ("False", R.GUARD_HOLDING, ""),
                    ("True", R.GUARD_HOLDING, message))
    states = {p.state for p in state.plugins}
    refused = [p for p in state.plugins if p.state is PluginState.REFUSED]
    if refused:
        # Nothing will change until the spec (or the controller's policy) does: stalled.
        message = f"{plugins}; {refused[0].name}: {refused[0].message}"
        return make(("False", R.REFUSED, message), ("False", R.REFUSED, ""),
                    ("True", R.REFUSED, message))
    if PluginState.FAILED in states:
        reason = R.FAILED
    elif PluginState.HELD in states or state.restart_pending:
        reason = R.RESTART_HELD if PluginState.HELD in states else R.RESTART_PENDING
    else:
        reason = R.PROGRESSING
    failed = [p for p in state.plugins if p.state is PluginState.FAILED]
    message = plugins + (f"; {failed[0].name}: {failed[0].message}" if failed else "")
    return make(("False", reason, message), ("True", reason, message), not_stalled)


def workspace_status(
    state: WorkspaceStatus,
    obj: Mapping[str, Any],
    now: datetime,
    *, token_secret: str | None,
    guard: Held | None = None,
) -> dict[str, Any]:
    """The full status of one Workspace object."""
    metadata = obj.get("metadata", {})
    previous = obj.get("status") or {}
    generation = metadata.get("generation")
    conditions = _written(conditions_for(state, guard), previous, generation, now)
    plugins = []
    for plugin in state.plugins:
        entry: dict[str, Any] = {"name": plugin.name, "source": plugin.source,
                                 "state": plugin.state.value, "message": plugin.message,
                                 "attempts": plugin.attempts}
        if plugin.next_retry_at is not None:
            entry["nextRetryAt"] = _iso(plugin.next_retry_at)
        plugins.append(entry)
    status: dict[str, Any] = {
        "workspaceId": state.workspace_id,
        "phase": state.phase.value,
        "pluginsReady": f"{state.installed}/{state.desired}",
        "plugins": plugins,
        "conditions": conditions,
        "observedGeneration": generation,
    }
    requested = (metadata.get("annotations") or {}).get(REQUESTED_AT)
    if requested is not None:
        status["lastHandledReconcileAt"] = requested
    elif "lastHandledReconcileAt" in previous:
        status["lastHandledReconcileAt"] = previous["lastHandledReconcileAt"]
    if token_secret is not None:
        status["tokenSecretName"] = token_secret
    return status


def _written(conditions: Iterable[Condition], previous: Mapping[str, Any],
             generation: int | None, now: datetime) -> list[dict[str, Any]]:
    """Conditions as status holds them: a condition whose status did not change keeps its
    lastTransitionTime."""
    old_conditions = {c.get("type"): c for c in previous.get("conditions") or []}
    written = []
    for condition in conditions:
        old = old_conditions.get(condition.type)
        unchanged = old is not None and old.get("status") == condition.status
        written.append({
            "type": condition.type,
            "status": condition.status,
            "reason": condition.reason.value,
            "message": condition.message,
            "observedGeneration": generation,
            "lastTransitionTime": old.get("lastTransitionTime") if unchanged and old
            else _iso(now),
        })
    return written


#: What a template's status says of its rollout: kept as it is by a mirror that knows
#: nothing new of it (after a pass about a few workspaces, which judges no wave).
ROLLOUT_FIELDS = ("revision", "rollout", "conditions")


def template_status(obj: Mapping[str, Any], plugin_count: int, ready: int, total: int, *,
                    rollout: Summary | None, error: str | None, now: datetime
                    ) -> dict[str, Any]:
    """The status of one WorkspaceTemplate: how many of its workspaces are Ready, and its
    rollout with kstatus conditions. Ready is True once no rollout is in flight (the
    template's current revision is the stable one for all its workspaces): `kubectl wait
    --for=condition=Ready wst/NAME` waits for a rollout to finish. A halted or aborted
    rollout is Stalled: it waits for a person. `rollout`: None when the template has no
    spec.rollout and nothing in flight. No timestamps in messages nor counts that move
    with time, so a rollout writes only when it moves."""
    metadata = obj.get("metadata", {})
    previous = obj.get("status") or {}
    generation = metadata.get("generation")
    status: dict[str, Any] = {
        "pluginCount": plugin_count,
        "workspaces": f"{ready}/{total}",
        "workspaceCount": total,
        "readyCount": ready,
        "observedGeneration": generation,
    }
    if rollout is not None:
        r = rollout.rollout
        status["revision"] = (r.target or r.stable).short
        status["rollout"] = rollout_status(rollout)
    status["conditions"] = _written(template_conditions(rollout, error), previous,
                                    generation, now)
    return status


def rollout_status(s: Summary) -> dict[str, Any]:
    r = s.rollout
    said: dict[str, Any] = {"phase": r.phase.value, "stableRevision": r.stable.short,
                            "workspaces": s.total}
    if s.steps:
        said["steps"] = list(s.steps)
    if r.target is not None:
        said.update({"targetRevision": r.target.short, "wave": r.wave + 1,
                     "waves": len(s.steps) or 1, "updated": s.updated,
                     "startedAt": _iso(r.started_at)})
        if r.phase is RolloutPhase.PROGRESSING:
            said.update(healthy=s.healthy, failed=len(s.failed),
                        waveHealthySince=_iso(r.healthy_since))
    if r.message:
        said["message"] = r.message
    return said


def template_conditions(rollout: Summary | None, error: str | None
                        ) -> tuple[Condition, Condition, Condition]:
    R = ConditionReason
    if error is not None:
        return (Condition("Ready", "False", R.INVALID_SPEC, error),
                Condition("Reconciling", "False", R.INVALID_SPEC, ""),
                Condition("Stalled", "True", R.INVALID_SPEC, error))
    if rollout is None or rollout.rollout.target is None or rollout.done:
        if rollout is None or not rollout.steps:
            message = "no spec.rollout: a change goes to every workspace at once"
        else:
            message = f"revision {(rollout.rollout.stable).short} rolled out"
        return (Condition("Ready", "True", R.ROLLOUT_COMPLETE, message),
                Condition("Reconciling", "False", R.ROLLOUT_COMPLETE, ""),
                Condition("Stalled", "False", R.NOT_STALLED, ""))
    r = rollout.rollout
    assert r.target is not None
    waves = len(rollout.steps) or 1
    where = (f"revision {r.target.short} at wave {r.wave + 1} of {waves}: "
             f"{rollout.updated}/{rollout.total} workspaces updated")
    match r.phase:
        case RolloutPhase.HALTED:
            message = (f"rollout of revision {r.target.short} halted: {r.message} "
                       f"(pluginctl rollout status; annotate "
                       f"{ROLLOUT_COMMAND}=resume after a fix, or =abort)")
            return (Condition("Ready", "False", R.ROLLOUT_HALTED, message),
                    Condition("Reconciling", "False", R.ROLLOUT_HALTED, ""),
                    Condition("Stalled", "True", R.ROLLOUT_HALTED, message))
        case RolloutPhase.ABORTED:
            message = (f"{r.message}; the template still declares {r.target.short}: change "
                       f"it, or annotate {ROLLOUT_COMMAND}=resume to roll it out again")
            return (Condition("Ready", "False", R.ROLLOUT_ABORTED, message),
                    Condition("Reconciling", "False", R.ROLLOUT_ABORTED, ""),
                    Condition("Stalled", "True", R.ROLLOUT_ABORTED, message))
    return (Condition("Ready", "False", R.ROLLOUT_PROGRESSING, where),
            Condition("Reconciling", "True", R.ROLLOUT_PROGRESSING, where),
            Condition("Stalled", "False", R.NOT_STALLED, ""))


def rollout_events(previous: Mapping[str, Any], new: Mapping[str, Any]) -> list[Event]:
    """The Events a template's rollout deserves between two statuses: it started, a wave
    was let through, it halted, completed or was aborted."""
    before, after = previous.get("rollout") or {}, new.get("rollout") or {}
    phase, target = after.get("phase"), after.get("targetRevision")
    moved = before.get("targetRevision") != target
    if phase == RolloutPhase.HALTED and (moved or before.get("phase") != phase):
        return [Event("Warning", ConditionReason.ROLLOUT_HALTED,
                      f"rollout of revision {target} halted: {after.get('message', '')}")]
    if phase == RolloutPhase.ABORTED and (moved or before.get("phase") != phase):
        return [Event("Warning", ConditionReason.ROLLOUT_ABORTED, after.get("message", ""))]
    if phase == RolloutPhase.PROGRESSING and before and moved:
        return [Event("Normal", "RolloutStarted",
                      f"revision {target} rolls out in {after.get('waves')} waves "
                      f"(previous: {after.get('stableRevision')})")]
    if phase == RolloutPhase.PROGRESSING and after.get("wave") != before.get("wave"):
        return [Event("Normal", "RolloutWave",
                      f"revision {target}: wave {after.get('wave')} of {after.get('waves')} "
                      f"let through")]
    if (phase == RolloutPhase.COMPLETE and before.get("phase") not in (None, phase)
            and before.get("targetRevision")):
        return [Event("Normal", ConditionReason.ROLLOUT_COMPLETE,
                      after.get("message") or f"revision {after.get('stableRevision')} "
                                              f"rolled out")]
    return []


def status_patch(previous: Mapping[str, Any] | None,
                 new: Mapping[str, Any]) -> dict[str, Any] | None:
    """The merge patch that turns `previous` into `new`, or None when they are equal (no
    write at all: a steady state never touches the API server)."""
    previous = previous or {}
    if dict(previous) == dict(new):
        return None
    patch: dict[str, Any] = dict(new)
    for key in previous:
        if key not in new:
            patch[key] = None  # merge patch: null removes the field
    return patch


def is_ready(status: Mapping[str, Any] | None) -> bool:
    for condition in (status or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


_FAILED_REASON = {ActionKind.INSTALL: "InstallFailed", ActionKind.REMOVE: "RemoveFailed",
                  ActionKind.OBSERVE: "ObserveFailed", ActionKind.RESTART: "RestartFailed"}


def _subject(action: Action) -> str:
    return action.plugin.name if action.plugin else "the runtime"


def events_for(outcomes: Iterable[Outcome], failing_before: Iterable[str],
               held_now: bool, *, held_before: bool,
               trigger_of: Callable[[Action], str] | None = None) -> list[Event]:
    """Events for what a pass did: installs, removals, restarts, the first failure of a
    streak (not one per retry), and a restart hold when it begins. Each action's Event says
    what started it (`trigger_of`: periodic, registry, manual, retry, template-change)."""
    already_failing = set(failing_before)
    events = []

    def said(action: Action, message: str) -> str:
        return message if trigger_of is None else f"{message} [trigger: {trigger_of(action)}]"

    for outcome in outcomes:
        action = outcome.action
        if not outcome.ok:
            if action.key not in already_failing:
                already_failing.add(action.key)
                events.append(Event("Warning", _FAILED_REASON.get(action.kind, "Failed"),
                                    said(action, f"{action.kind.value} {_subject(action)} "
                                                 f"failed: {outcome.message} (retrying with "
                                                 "backoff)")))
            continue
        match action.kind:
            case ActionKind.INSTALL if action.plugin is not None:
                events.append(Event("Normal", "Installed", said(
                    action, f"installed {action.plugin.name} from {action.plugin.source} "
                            f"({action.reason})")))
            case ActionKind.REMOVE if action.plugin is not None:
                events.append(Event("Normal", "Removed", said(
                    action, f"removed {action.plugin.name}: {action.reason}")))
            case ActionKind.RESTART:
                events.append(Event("Normal", "Restarted", said(
                    action, f"restarted the runtime: {action.reason}")))
    if held_now and not held_before:
        events.append(Event("Warning", "RestartHeld", "a restart is needed but the restart "
                            "budget is spent; held until the budget allows it"))
    return events


def combined(events: Iterable[Event]) -> list[Event]:
    """One object's Events from one mirror, one per type and reason: three plugins
    installed in one pass are one `Installed` Event naming the three (in order), not three
    API writes. The first of each kind keeps its place."""
    merged: dict[tuple[str, str], list[str]] = {}
    for event in events:
        merged.setdefault((event.type, event.reason), []).append(event.message)
    return [Event(kind, reason, "; ".join(messages))
            for (kind, reason), messages in merged.items()]


def token_secret_name(workspace_name: str) -> str:
    suffix = "-pluginctl-token"
    if len(workspace_name) + len(suffix) <= 253:
        return workspace_name + suffix
    digest = hashlib.sha256(workspace_name.encode()).hexdigest()[:10]
    return f"{workspace_name[:253 - len(suffix) - 11]}-{digest}{suffix}"
