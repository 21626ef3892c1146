"""The status mirror is pure: conditions, change detection and Events, tested without a
cluster; and the CRDs agree with the core's own validation."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

from controller.domain.models import (
    PLUGIN_NAME_PATTERN,
    SOURCE_PATTERN,
    WORKSPACE_ID_PATTERN,
    Action,
    ActionKind,
    Outcome,
    Phase,
    Plugin,
)
from controller.domain.planner import Held
from controller.domain.reasons import InvalidReason
from controller.domain.rollout import Revision, Rollout, RolloutPhase, Summary
from controller.domain.status import PluginState, PluginStatus, WorkspaceStatus
from controller.kube import conditions as mirror

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CRDS = Path(__file__).parents[2] / "crds"


def state(phase: Phase = Phase.ONLINE, *plugins: PluginStatus, in_sync: bool = True,
          error: str | None = None, restart_pending: bool = False,
          invalid: InvalidReason | None = None) -> WorkspaceStatus:
    installed = sum(p.state is PluginState.INSTALLED for p in plugins)
    return WorkspaceStatus("ws", "ns/ws", "base", phase, len(plugins), installed, plugins,
                           in_sync, error, None, restart_pending, 3, NOW, NOW, invalid)


def conditions(s: WorkspaceStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in mirror.conditions_for(s)}


OK = PluginStatus("a", "local://a", PluginState.INSTALLED)
FAILED = PluginStatus("b", "local://b", PluginState.FAILED, "HTTP 500", 2, NOW)


def test_conditions_follow_kstatus() -> None:
    assert conditions(state(Phase.ONLINE, OK)) == {
        "Ready": ("True", "InSync"), "Reconciling": ("False", "InSync"),
        "Stalled": ("False", "NotStalled")}
    assert conditions(state(Phase.ONLINE, OK, FAILED, in_sync=False)) == {
        "Ready": ("False", "Failed"), "Reconciling": ("True", "Failed"),
        "Stalled": ("False", "NotStalled")}
    dup = state(Phase.INVALID, in_sync=False, error="DuplicateWorkspaceId: x is claimed",
                invalid=InvalidReason.DUPLICATE_WORKSPACE_ID)
    assert conditions(dup)["Stalled"] == ("True", "DuplicateWorkspaceId")
    missing = state(Phase.INVALID, in_sync=False, error="template ns/t not found",
                    invalid=InvalidReason.TEMPLATE_NOT_FOUND)
    assert conditions(missing)["Stalled"] == ("True", "TemplateNotFound")
    assert conditions(state(Phase.UNREGISTERED, in_sync=False))["Reconciling"] == (
        "True", "WaitingForRuntime")
    assert conditions(state(Phase.SUSPENDED, in_sync=False))["Ready"] == ("False", "Suspended")
    refused = PluginStatus("c", "github://o/c", PluginState.REFUSED, "source is not pinned")
    assert conditions(state(Phase.ONLINE, OK, refused, in_sync=False)) == {
        "Ready": ("False", "Refused"), "Reconciling": ("False", "Refused"),
        "Stalled": ("True", "Refused")}


def test_transition_time_is_kept_while_a_condition_holds() -> None:
    obj = {"metadata": {"generation": 3, "annotations": {}}}
    first = mirror.workspace_status(state(Phase.ONLINE, OK), obj, NOW, token_secret="s")
    later = mirror.workspace_status(state(Phase.ONLINE, OK), {**obj, "status": first},
                                    NOW + timedelta(hours=1), token_secret="s")
    assert later == first  # nothing changed: identical, so no write
    assert mirror.status_patch(first, later) is None
    failed = mirror.workspace_status(state(Phase.ONLINE, OK, FAILED, in_sync=False),
                                     {**obj,
                                      "status": first}, NOW + timedelta(hours=2), token_secret="s")
    ready = next(c for c in failed["conditions"] if c["type"] == "Ready")
    stalled = next(c for c in failed["conditions"] if c["type"] == "Stalled")
    assert ready["lastTransitionTime"] == "2026-01-01T02:00:00Z"
    assert stalled["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert all(c["observedGeneration"] == 3 for c in failed["conditions"])


def test_status_patch_removes_fields_that_went_away() -> None:
    patch = mirror.status_patch({"phase": "Online", "lastHandledReconcileAt": "x"},
                                {"phase": "Offline"})
    assert patch == {"phase": "Offline", "lastHandledReconcileAt": None}


def test_requested_at_is_echoed() -> None:
    obj = {"metadata": {"generation": 1,
                        "annotations": {mirror.REQUESTED_AT: "please"}}}
    assert mirror.workspace_status(state(), obj, NOW,
                                   token_secret=None)["lastHandledReconcileAt"] == "please"


def test_events_first_failure_only_and_hold_once() -> None:
    install = Action(ActionKind.INSTALL, "missing", Plugin("b", "local://b"))
    failed = Outcome(install, ok=False, message="HTTP 500")
    first = mirror.events_for([failed], failing_before=[], held_now=False, held_before=False)
    assert [(e.type, e.reason) for e in first] == [("Warning", "InstallFailed")]
    retry = mirror.events_for([failed], failing_before=["b"], held_now=False,
                              held_before=False)
    assert retry == []
    done = mirror.events_for([Outcome(install, ok=True),
                              Outcome(Action(ActionKind.RESTART, "asked"), ok=True)],
                             failing_before=["b"], held_now=False, held_before=False)
    assert [e.reason for e in done] == ["Installed", "Restarted"]
    assert [e.reason for e in mirror.events_for([], [], held_now=True, held_before=False)] == [
        "RestartHeld"]
    assert mirror.events_for([], [], held_now=True, held_before=True) == []


def test_token_secret_names_fit() -> None:
    assert mirror.token_secret_name("alpha") == "alpha-pluginctl-token"
    long = mirror.token_secret_name("x" * 253)
    assert len(long) <= 253 and long.endswith("-pluginctl-token")
    assert long != mirror.token_secret_name("x" * 252 + "y")


def _plugin_schema(crd: str) -> dict[str, object]:
    doc = yaml.safe_load((CRDS / crd).read_text())
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["plugins"]["items"]


def test_crds_validate_like_the_core() -> None:
    for crd in ("workspaces.pluginctl.dev.yaml", "workspacetemplates.pluginctl.dev.yaml"):
        items = _plugin_schema(crd)
        props = items["properties"]  # type: ignore[index]
        assert props["name"]["pattern"] == PLUGIN_NAME_PATTERN  # type: ignore[index]
        rule = items["x-kubernetes-validations"][0]["rule"]  # type: ignore[index]
        assert SOURCE_PATTERN.replace("\\", "\\\\") in rule
    doc = yaml.safe_load((CRDS / "workspaces.pluginctl.dev.yaml").read_text())
    spec = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["properties"]["workspaceId"]["pattern"] == WORKSPACE_ID_PATTERN
    phases = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"]["phase"]["enum"]
    assert set(phases) == {p.value for p in Phase} - {"Unmanaged"}
    states = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"][
        "properties"]["plugins"]["items"]["properties"]["state"]["enum"]
    assert set(states) == {s.value for s in PluginState}


def _descriptions_missing(schema: dict[str, object], path: str) -> list[str]:
    missing = []
    for name, sub in (schema.get("properties") or {}).items():  # type: ignore[attr-defined]
        where = f"{path}.{name}"
        if name not in ("metadata",) and not sub.get("description"):
            missing.append(where)
        missing += _descriptions_missing(sub, where)
        if isinstance(sub.get("items"), dict):
            missing += _descriptions_missing(sub["items"], where + "[]")
    return missing


def test_every_crd_field_has_a_description() -> None:
    for crd in CRDS.glob("*.yaml"):
        schema = yaml.safe_load(crd.read_text())["spec"]["versions"][0]["schema"][
            "openAPIV3Schema"]
        assert _descriptions_missing(schema, crd.name) == []


def test_events_say_what_started_each_action() -> None:
    from controller.engine.queue import Trigger
    from controller.engine.report import WorkspaceResult

    install = Action(ActionKind.INSTALL, "missing", Plugin("b", "local://b"))
    restart = Action(ActionKind.RESTART, "requested by an earlier install")
    result = WorkspaceResult(workspace_id="ws", plans=(),
                             outcomes=(Outcome(install, ok=True), Outcome(restart, ok=True)),
                             prior_failures=frozenset({"b"}), trigger=Trigger.TEMPLATE_CHANGE)
    events = mirror.events_for(result.outcomes, result.prior_failures, held_now=False,
                               held_before=False, trigger_of=result.trigger_of)
    assert [e.message.rpartition(" ")[2] for e in events] == ["retry]", "template-change]"]


def test_a_workspace_the_guard_holds_is_stalled_with_the_reason() -> None:
    pending = PluginStatus("b", "local://b", PluginState.PENDING, "missing")
    held = {c.type: (c.status, c.reason, c.message) for c in mirror.conditions_for(
        state(Phase.ONLINE, OK, pending, in_sync=False),
        guard=Held("would act on 3 workspaces", "--max-workspaces 2"))}
    assert held["Ready"][:2] == ("False", "GuardHolding")
    assert held["Stalled"][:2] == ("True", "GuardHolding")
    assert "it would go over --max-workspaces 2" in held["Stalled"][2]
    assert "3 workspaces" not in held["Stalled"][2]  # counts move; the message must not
    # In sync is in sync, whatever the guard says of the others.
    assert conditions(state(Phase.ONLINE, OK))["Ready"] == ("True", "InSync")
    assert {c.type: c.reason for c in mirror.conditions_for(
        state(Phase.ONLINE, OK), guard=Held("x", "y"))}["Ready"] == "InSync"


def test_a_condition_reason_comes_from_the_reason_never_from_the_wording() -> None:
    """Rewording a message cannot change what `kubectl wait` and health checks match on:
    every reason maps to a condition reason, and the message plays no part in it."""
    assert set(mirror.INVALID_CONDITION) == set(InvalidReason)
    assert {reason.value for reason in mirror.ConditionReason} >= {
        "DuplicateWorkspaceId", "TemplateNotFound", "InvalidSpec"}
    # Messages that say the opposite of their reason, or nothing at all.
    misleading = ("", "DuplicateWorkspaceId: not really", "template ns/t not found",
                  "anything a future edit may write")
    for reason in InvalidReason:
        for message in misleading:
            said = mirror.conditions_for(state(Phase.INVALID, in_sync=False, error=message,
                                               invalid=reason))
            assert {c.type: (c.status, c.reason) for c in said} == {
                "Ready": ("False", mirror.INVALID_CONDITION[reason]),
                "Reconciling": ("False", mirror.INVALID_CONDITION[reason]),
                "Stalled": ("True", mirror.INVALID_CONDITION[reason])}, (reason, message)
            assert said[0].message == message  # the prose is shown, as it is


def test_reasons_from_desired_state_reach_the_conditions_unchanged() -> None:
    """From YAML to the Stalled condition: the user-facing reasons of the e2e suite."""
    from controller.domain import status
    from controller.domain.models import Policy
    from tests.support.helpers import TEMPLATE, desired_from, workspace_yaml

    # A broken template's message begins "template ", as a missing one's does: InvalidSpec.
    broken = TEMPLATE.replace("name: base", "name: broken").replace(
        "local://plugins/notes", "local://other/seo-all")
    desired = desired_from(TEMPLATE, broken,
                           workspace_yaml("a", workspaceId="same"),
                           workspace_yaml("b", workspaceId="same"),
                           workspace_yaml("orphan", templateRef={"name": "nope"}),
                           workspace_yaml("uses-broken", templateRef={"name": "broken"}))

    def stalled(wanted: object) -> str:
        built = status.build(wanted, None, NOW, Policy())  # type: ignore[arg-type]
        return next(c.reason for c in mirror.conditions_for(built) if c.type == "Stalled")

    assert stalled(desired.rejected[0]) == "DuplicateWorkspaceId"
    assert stalled(desired.workspaces["orphan"]) == "TemplateNotFound"
    assert stalled(desired.workspaces["uses-broken"]) == "InvalidSpec"
    assert stalled(desired.workspaces["same"]) == "NotStalled"


def test_one_event_per_kind_and_object_in_a_mirror() -> None:
    installs = [mirror.Event("Normal", "Installed", f"installed {name}") for name in "abc"]
    failed = mirror.Event("Warning", "InstallFailed", "install d failed")
    events = mirror.combined([installs[0], failed, *installs[1:]])
    assert [(e.reason, e.message) for e in events] == [
        ("Installed", "installed a; installed b; installed c"),
        ("InstallFailed", "install d failed")]


# --- templates: the rollout in status, conditions and Events ------------------------------------

V1 = Revision.of([Plugin("notes", "local://plugins/notes")])
V2 = Revision.of([Plugin("notes", "local://plugins/notes"), Plugin("x", "local://plugins/x")])
TEMPLATE = {"metadata": {"name": "research", "namespace": "ns", "generation": 2}}


def summary(phase: RolloutPhase, *, wave: int = 0, updated: int = 1, message: str = "",
            steps: tuple[int, ...] = (25, 100)) -> Summary:
    target = None if phase is RolloutPhase.COMPLETE else V2
    return Summary("ns/research", Rollout("ns/research", V1, target, phase, wave, NOW,
                                          message=message),
                   steps, 4, updated if target else 0, updated, (), None)


def template_conditions(s: Summary | None, error: str | None = None
                        ) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in mirror.template_conditions(s, error)}


def test_a_template_is_ready_once_no_rollout_is_in_flight() -> None:
    assert template_conditions(None)["Ready"] == ("True", "RolloutComplete")
    assert template_conditions(summary(RolloutPhase.COMPLETE))["Ready"] == (
        "True", "RolloutComplete")
    progressing = template_conditions(summary(RolloutPhase.PROGRESSING))
    assert progressing == {"Ready": ("False", "RolloutProgressing"),
                           "Reconciling": ("True", "RolloutProgressing"),
                           "Stalled": ("False", "NotStalled")}
    for phase, reason in ((RolloutPhase.HALTED, "RolloutHalted"),
                          (RolloutPhase.ABORTED, "RolloutAborted")):
        said = template_conditions(summary(phase))
        assert said["Ready"] == ("False", reason) and said["Stalled"] == ("True", reason)
    assert template_conditions(None, "two plugins named notes")["Stalled"] == (
        "True", "InvalidSpec")
    why = "wave 1 of 2: 1 workspace failed (more than 0 allowed): ws-3: install of x failed"
    halted = mirror.template_conditions(summary(RolloutPhase.HALTED, message=why), None)[2]
    assert halted.message.startswith(f"rollout of revision {V2.short} halted: {why} (")
    assert "reconcile.pluginctl.dev/rollout=resume" in halted.message


def test_a_template_status_moves_only_when_its_rollout_does() -> None:
    def status(s: Summary, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        return mirror.template_status(dict(TEMPLATE, status=previous or {}), 2, 1, 4,
                                      rollout=s, error=None, now=NOW)

    first = status(summary(RolloutPhase.PROGRESSING))
    assert first["revision"] == V2.short and first["rollout"] == {
        "phase": "Progressing", "stableRevision": V1.short, "targetRevision": V2.short,
        "steps": [25, 100], "wave": 1, "waves": 2, "workspaces": 4, "updated": 1,
        "healthy": 1, "failed": 0, "startedAt": "2026-01-01T00:00:00Z",
        "waveHealthySince": None}
    assert mirror.status_patch(first, status(summary(RolloutPhase.PROGRESSING), first)) is None
    later = status(summary(RolloutPhase.PROGRESSING), first)
    assert later["conditions"] == first["conditions"]


def test_rollout_events_say_each_step_once() -> None:
    def status(s: Summary) -> dict[str, Any]:
        return {"rollout": mirror.rollout_status(s)}

    complete, halted = status(summary(RolloutPhase.COMPLETE)), status(summary(
        RolloutPhase.HALTED, message="1 workspace failed"))
    wave1, wave2 = status(summary(RolloutPhase.PROGRESSING)), status(summary(
        RolloutPhase.PROGRESSING, wave=1, updated=4))

    def said(before: dict[str, Any], after: dict[str, Any]) -> list[tuple[str, str]]:
        return [(e.type, e.reason) for e in mirror.rollout_events(before, after)]

    assert said({}, complete) == [] and said(complete, complete) == []
    assert said(complete, wave1) == [("Normal", "RolloutStarted")]
    assert said(wave1, wave1) == []
    assert said(wave1, wave2) == [("Normal", "RolloutWave")]
    assert said(wave1, halted) == [("Warning", "RolloutHalted")]
    assert said(halted, halted) == []
    assert said(wave2, complete) == [("Normal", "RolloutComplete")]
    assert said(wave1, status(summary(RolloutPhase.ABORTED))) == [
        ("Warning", "RolloutAborted")]
