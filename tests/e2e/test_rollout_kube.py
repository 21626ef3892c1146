"""Progressive rollouts on the real API server: the CRD refuses bad steps, and the operator
writes each template's rollout into `status.rollout` with kstatus conditions, so that a
kubectl user follows (`kubectl wait --for=condition=Ready wst/NAME`), sees a halt (Stalled,
RolloutHalted, a Warning Event) and acts on it (`reconcile.pluginctl.dev/rollout`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.agent.simulated import Faults, ReferenceRuntime
from tests.e2e.test_kubectl_plugin import kubectl_pluginctl, plugin_env
from tests.e2e.test_kubernetes import (
    NOTES,
    SEO,
    Operator,
    apply,
    namespace,
    operators,
    runtime_for,
    wait_ready,
    workspace,
)
from tests.support import kube
from tests.support.helpers import wait_for

pytestmark = pytest.mark.kubernetes
__all__ = ["namespace", "operators"]  # fixtures shared with test_kubernetes

BROKEN = ("broken", "local://plugins/broken")
EXTRA = ("extra", "local://plugins/extra")
NAMES = [f"r{i}" for i in range(4)]


def rolled(name: str, *plugins: tuple[str, str], steps: list[int] | None = None,
           bake: int = 0) -> dict[str, object]:
    """A template rolled out in waves: [25, 100] of four workspaces is one, then the rest."""
    return {"kind": "WorkspaceTemplate", "metadata": {"name": name}, "spec": {
        "rollout": {"steps": steps or [25, 100], "bakeSeconds": bake,
                    "maxFailedWorkspaces": 0},
        "plugins": [{"name": n, "source": s} for n, s in plugins]}}


def test_the_crd_refuses_bad_rollout_steps(plane: kube.ControlPlane, namespace: str) -> None:
    def refused(rollout: dict[str, object]) -> str:
        body = rolled("bad", SEO)
        body["spec"]["rollout"] = rollout  # type: ignore[index]
        body.update(apiVersion="pluginctl.dev/v1alpha1")
        result = plane.kubectl("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(body),
                               check=False)
        assert result.returncode != 0, result.stdout
        return result.stderr

    assert "strictly increasing" in refused({"steps": [50, 25, 100]})
    assert "strictly increasing" in refused({"steps": [25, 25, 100]})
    assert "end at 100" in refused({"steps": [5, 50]})
    assert "should be greater than or equal to 1" in refused({"steps": [0, 100]})
    assert "should be greater than or equal to 0" in refused(
        {"steps": [100], "bakeSeconds": -1})
    # Nothing was created by any of them; a good one is admitted.
    assert plane.kubectl("get", "wst", "bad", "-n", namespace, check=False).returncode != 0
    apply(plane, namespace, rolled("good", SEO, steps=[5, 25, 100], bake=300))


def status_of(plane: kube.ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    out = plane.kubectl("get", "wst", name, "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out).get("status") or {})


def condition(status: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == kind), {})


def events_of(plane: kube.ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    out = plane.kubectl("get", "events", "-n", namespace, "-o", "json", "--field-selector",
                        f"involvedObject.kind=WorkspaceTemplate,involvedObject.name={name}"
                        ).stdout
    return list(json.loads(out)["items"])


async def kubectl_wait(plane: kube.ControlPlane, namespace: str, what: str, *,
                       timeout: int = 60) -> None:
    result = await asyncio.to_thread(
        plane.kubectl, "wait", "-n", namespace, what, "--timeout", f"{timeout}s",
        "wst/research", check=False, timeout=timeout + 30)
    assert result.returncode == 0, result.stdout + result.stderr


def puts(runtime: ReferenceRuntime, plugin: str) -> int:
    return sum(1 for c in runtime.calls if c.method == "PUT" and c.path.endswith(f"/{plugin}"))


async def test_a_template_rollout_on_the_api_server_halts_resumes_and_aborts(
        plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
        runtimes: list[ReferenceRuntime], tmp_path: Path) -> None:
    apply(plane, namespace, rolled("research", SEO, NOTES),
          *(workspace(n, "research") for n in NAMES))
    operator = operators()
    faults = Faults(failing_plugins={"broken", "extra"}, restart_required=False)
    fleet = {n: await runtime_for(plane, namespace, n, operator.registry, runtimes,
                                  faults=faults) for n in NAMES}
    await wait_ready(plane, namespace, *NAMES)
    await kubectl_wait(plane, namespace, "--for=condition=Ready")
    first = status_of(plane, namespace, "research")
    assert first["rollout"]["phase"] == "Complete" and first["revision"]

    # A bad release: the first wave (one of four) fails it, and the rollout halts there.
    apply(plane, namespace, rolled("research", SEO, NOTES, BROKEN))
    await kubectl_wait(plane, namespace, "--for=condition=Stalled")
    halted = status_of(plane, namespace, "research")
    stalled = condition(halted, "Stalled")
    assert stalled["reason"] == "RolloutHalted", halted
    assert "broken" in stalled["message"] and condition(halted, "Ready")["status"] == "False"
    expected = {"phase": "Halted", "wave": 1, "waves": 2, "updated": 1, "workspaces": 4,
                "stableRevision": first["revision"]}
    assert {k: halted["rollout"].get(k) for k in expected} == expected, halted
    tried = [n for n in NAMES if puts(fleet[n], "broken")]
    assert len(tried) == 1, "only the first wave is called for the new revision"
    warnings = await wait_for(lambda: [e for e in events_of(plane, namespace, "research")
                                       if e["reason"] == "RolloutHalted"],
                              "a RolloutHalted Event", 30, blocking=True, every=0.25)
    assert warnings[0]["type"] == "Warning"
    printed = plane.kubectl("get", "wst", "research", "-n", namespace).stdout
    assert "Halted" in printed.splitlines()[1], printed
    env = plugin_env(kube.kubeconfig_in_namespace(plane, namespace, tmp_path / "kubeconfig"))
    held = next(n for n in NAMES if n not in tried)
    code, out, err = await kubectl_pluginctl(env, "explain", held)
    assert code == 0, out + err  # Ready on the stable revision
    assert f"rolling out revision {halted['rollout']['targetRevision']} (Halted, wave 1 of 2" \
        in out and f"stay on {first['revision']}" in out, out

    # A command the operator does not know: refused with an Event, and the annotation goes.
    annotate(plane, namespace, "bogus")
    await wait_for(lambda: any(e["reason"] == "RolloutCommandRefused" and "bogus" in
                               e["message"] for e in events_of(plane, namespace, "research")),
                   "the refusal Event", 30, blocking=True, every=0.25)
    await wait_for(lambda: annotation(plane, namespace) == "", "the annotation removed", 30,
                   blocking=True, every=0.25)
    assert status_of(plane, namespace, "research")["rollout"]["phase"] == "Halted"

    # The fix reaches the runtimes; `resume` lets the rollout go on to the end.
    faults.failing_plugins.discard("broken")
    annotate(plane, namespace, "resume")
    await kubectl_wait(plane, namespace, "--for=condition=Ready")
    assert all("broken" in runtime.plugins for runtime in fleet.values())
    done = status_of(plane, namespace, "research")
    assert done["rollout"]["phase"] == "Complete" and done["revision"] != first["revision"]
    assert annotation(plane, namespace) == ""
    steps = {"RolloutStarted", "RolloutHalted", "RolloutCommand", "RolloutWave",
             "RolloutComplete"}
    # Events go out behind the status writes (once those have rested): wait for them.
    await wait_for(lambda: steps <= {e["reason"] for e in events_of(plane, namespace,
                                                                    "research")},
                   f"the Events {sorted(steps)}", 30, blocking=True, every=0.25)

    # A release on its way (a long bake holds it at the first wave), aborted: the first
    # wave goes back to what it had, and the rest never heard of it.
    faults.failing_plugins.clear()
    apply(plane, namespace, rolled("research", SEO, NOTES, BROKEN, EXTRA, bake=3600))
    moved = await wait_for(lambda: [n for n in NAMES if "extra" in fleet[n].plugins],
                           "the first wave on the new revision", 30, every=0.1)
    assert len(moved) == 1
    await wait_for(lambda: status_of(plane, namespace, "research")["rollout"].get(
        "phase") == "Progressing", "the status on the new revision", 30, blocking=True,
        every=0.25)
    annotate(plane, namespace, "abort")
    await wait_for(lambda: condition(status_of(plane, namespace, "research"), "Stalled"
                                     ).get("reason") == "RolloutAborted",
                   "the rollout aborted", 30, blocking=True, every=0.25)
    await wait_for(lambda: not any("extra" in r.plugins for r in fleet.values()),
                   "extra removed from the first wave", 30, every=0.1)
    assert condition(status_of(plane, namespace, "research"), "Ready")["status"] == "False"
    assert [n for n in NAMES if puts(fleet[n], "extra")] == moved
    assert all(set(r.plugins) == {"seo-all", "notes", "broken"} for r in fleet.values())


def annotate(plane: kube.ControlPlane, namespace: str, command: str) -> None:
    plane.kubectl("annotate", "--overwrite", "-n", namespace, "wst/research",
                  f"reconcile.pluginctl.dev/rollout={command}")


def annotation(plane: kube.ControlPlane, namespace: str) -> str:
    return plane.kubectl("get", "wst", "research", "-n", namespace, "-o",
                         r"jsonpath={.metadata.annotations.reconcile\.pluginctl\.dev/rollout}"
                         ).stdout
