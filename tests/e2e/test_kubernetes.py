"""End to end on a real kube-apiserver and etcd (built by .ci/kube-binaries), with the
operator as a local process and kubectl driving and inspecting it, as a user would."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from controller.agent.simulated import Faults, ReferenceRuntime
from controller.domain.tokens import runtime_secret_for
from controller.domain.version import user_agent
from controller.registry.serving import free_port
from controller.sim import processes
from tests.support import kube
from tests.support.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.kubernetes


# `plane`, the session's control plane, is in conftest.py: every Kubernetes module shares it.


@pytest.fixture
def namespace(plane: kube.ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    plane.kubectl("create", "namespace", name)
    try:
        yield name
    finally:
        # Operators of later tests watch cluster-wide: leave nothing of ours behind (a
        # Workspace left here would claim its id before a later test's Workspace of the same
        # name), and say so at once if the delete fails.
        plane.kubectl("delete", "workspaces,workspacetemplates", "--all", "-n", name,
                      "--wait=true", "--timeout=60s", timeout=90)


def apply(plane: kube.ControlPlane, namespace: str, *documents: dict[str, object]) -> None:
    for document in documents:
        document.setdefault("apiVersion", "pluginctl.dev/v1alpha1")
        metadata = document.setdefault("metadata", {})
        assert isinstance(metadata, dict)
        metadata["namespace"] = namespace
    plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(documents))


def template(name: str, *plugins: tuple[str, str]) -> dict[str, object]:
    return {"kind": "WorkspaceTemplate", "metadata": {"name": name},
            "spec": {"plugins": [{"name": n, "source": s} for n, s in plugins]}}


def workspace(name: str, template_name: str | None = "base", **spec: object
              ) -> dict[str, object]:
    body: dict[str, object] = dict(spec)
    if template_name is not None:
        body["templateRef"] = {"name": template_name}
    return {"kind": "Workspace", "metadata": {"name": name}, "spec": body}


SEO = ("seo-all", "gitea://org/repo/agent-skills/seo-all#v1")
NOTES = ("notes", "local://plugins/notes")


class Operator:
    """`pluginctl run --kubernetes` as a local process. Tests judge it by what a user sees
    (conditions, Events, Secrets, the Lease, `/metrics`); its log is for failure messages."""

    def __init__(self, plane: kube.ControlPlane, lease_namespace: str, db: str, identity: str,
                 log_dir: Path, kubeconfig: Path | None = None, extra: tuple[str, ...] = (),
                 log_level: str = "debug") -> None:
        self.port = free_port()
        self.identity = identity
        self.log = log_dir / f"operator-{identity}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controller", "--log-level", log_level, "--log-format",
             "json", "run", "--kubernetes",
             "--db", db, "--listen", f"127.0.0.1:{self.port}", "--interval", "1",
             "--lease-namespace", lease_namespace, "--identity", identity, *extra],
            env=plane.env(kubeconfig), stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"))

    @property
    def registry(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> str:
        with urllib.request.urlopen(self.registry + "/metrics", timeout=10) as response:
            return str(response.read().decode())

    def passes(self, trigger: str = "periodic") -> int:
        """Passes run (in sync, out of sync or failed), from `pluginctl_reconcile_total`;
        0 while the registry does not serve yet."""
        try:
            text = self.metrics()
        except OSError:
            return 0
        return sum(int(sample.value) for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == "pluginctl_reconcile_total"
                   and sample.labels.get("trigger") == trigger)

    def log_records(self) -> tuple[list[dict[str, object]], list[str]]:
        """The log's JSON records, and its lines that are not (Python warnings, tracebacks)."""
        records, other = [], []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                other.append(line)
        return records, other

    def log_tail(self) -> str:
        """The end of the log: to explain a failure, never to decide one."""
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        processes.end(self.process)


@pytest.fixture
def operators(plane: kube.ControlPlane, namespace: str, tmp_path: Path
              ) -> Iterator[Callable[..., Operator]]:
    started: list[Operator] = []
    db = f"sqlite:///{tmp_path / 'operator.db'}"
    subprocess.run([sys.executable, "-m", "controller", "db", "upgrade", "--db", db],
                   check=True, capture_output=True)

    def start(identity: str = "op-a", kubeconfig: Path | None = None,
              lease_namespace: str | None = None, extra: tuple[str, ...] = (),
              log_level: str = "debug") -> Operator:
        operator = Operator(plane, lease_namespace or namespace, db, identity, tmp_path,
                            kubeconfig, extra, log_level)
        started.append(operator)
        return operator

    yield start
    for operator in started:
        operator.stop()
        # Captured, so shown only beside a failure: what the operator said meanwhile.
        print(f"--- the log of operator {operator.identity} ends:\n{operator.log_tail()}")


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/healthz", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def get(plane: kube.ControlPlane, namespace: str, *args: str) -> str:
    return plane.kubectl("get", "-n", namespace, *args).stdout


def lease_holder(plane: kube.ControlPlane, namespace: str) -> str:
    return plane.kubectl("get", "lease", "pluginctl-leader", "-n", namespace, "-o",
                         "jsonpath={.spec.holderIdentity}", check=False).stdout


@dataclass
class Quiet:
    """True once a counter has stood still for `seconds` (while it is sampled)."""

    seconds: float
    value: int = -1
    since: float = 0.0

    def __call__(self, value: int) -> bool:
        now = time.monotonic()
        if value != self.value:
            self.value, self.since = value, now
            return False
        return now - self.since >= self.seconds


def token_of(plane: kube.ControlPlane, namespace: str, workspace_name: str) -> str | None:
    result = plane.kubectl("get", "secret", f"{workspace_name}-pluginctl-token", "-n",
                           namespace, "-o", "jsonpath={.data.token}", check=False)
    return base64.b64decode(result.stdout).decode() if result.returncode == 0 and \
        result.stdout else None


async def runtime_for(plane: kube.ControlPlane, namespace: str, name: str, registry: str,
                      started: list[ReferenceRuntime], *, workspace_id: str | None = None,
                      report: bool = True, faults: Faults | None = None) -> ReferenceRuntime:
    """A reference runtime using the token the operator put in the workspace's Secret."""
    token = await wait_for(lambda: token_of(plane, namespace, name), f"the token Secret of {name}",
                           60, blocking=True, every=0.25)
    runtime = ReferenceRuntime(workspace_id or name, registry_url=registry, token=str(token),
                               report=report, faults=faults, heartbeat_interval=0.3)
    await runtime.start()
    started.append(runtime)
    await runtime.register()
    return runtime


async def wait_ready(plane: kube.ControlPlane, namespace: str, *names: str,
                     timeout: int = 90) -> None:
    result = await asyncio.to_thread(
        plane.kubectl, "wait", "-n", namespace, "--for=condition=Ready",
        f"--timeout={timeout}s", *(f"ws/{n}" for n in names), check=False,
        timeout=timeout + 30)
    assert result.returncode == 0, result.stdout + result.stderr


# --- 1. CRDs ---------------------------------------------------------------------------------

def test_crds_apply_explain_and_server_side_validation(plane: kube.ControlPlane,
                                                       namespace: str) -> None:
    again = plane.kubectl("apply", "-f", str(ROOT / "crds"))
    assert "workspaces.pluginctl.dev" in again.stdout

    explain = plane.kubectl("explain", "workspace.spec.plugins").stdout
    assert "Where the plugin comes from" in explain and "-required-" in explain
    assert "opts out" in plane.kubectl("explain", "workspace.spec.excludePlugins").stdout
    assert "Ready (every desired plugin" in plane.kubectl(
        "explain", "workspace.status.conditions").stdout
    assert "pluginCount" in plane.kubectl("explain", "wst.status").stdout

    def rejected(document: dict[str, object]) -> str:
        document["apiVersion"] = "pluginctl.dev/v1alpha1"
        result = plane.kubectl("apply", "-n", namespace, "-f", "-",
                               input=yaml.safe_dump(document), check=False)
        assert result.returncode != 0, result.stdout
        return result.stderr

    assert "source must look like scheme://path[#ref]" in rejected(
        workspace("bad-source", None, plugins=[{"name": "a", "source": "not a source"}]))
    assert "Duplicate value" in rejected(workspace("dup", None, plugins=[
        {"name": "a", "source": "local://x/a"}, {"name": "a", "source": "local://y/a"}]))
    assert "spec.workspaceId" in rejected(workspace("bad-id", None, workspaceId="no spaces!"))
    assert "spec.plugins[0].name" in rejected(workspace("no-name", None, plugins=[
        {"source": "local://x/a"}]))
    assert "Too many" in rejected(template("huge", *[(f"p{i}", f"local://p/{i}")
                                                       for i in range(65)]))

    apply(plane, namespace, workspace("fixed", None, workspaceId="id-1"))
    assert "workspaceId is immutable" in rejected(
        {**workspace("fixed", None, workspaceId="id-2"),
         "metadata": {"name": "fixed", "namespace": namespace}})

    header = get(plane, namespace, "ws").splitlines()[0].split()
    assert header == ["NAME", "TEMPLATE", "PHASE", "PLUGINS", "READY", "AGE"]
    apply(plane, namespace, template("base", SEO))
    assert get(plane, namespace, "wst").splitlines()[0].split() == [
        "NAME", "PLUGINS", "WORKSPACES", "REVISION", "ROLLOUT", "READY", "AGE"]
    categories = plane.kubectl("get", "pluginctl", "-n", namespace).stdout
    assert "workspace.pluginctl.dev/fixed" in categories


def test_manifests_pass_server_side_dry_run(plane: kube.ControlPlane) -> None:
    # A dry run creates nothing, so the namespace the manifests create must exist already
    # for the server to admit the objects inside it.
    plane.kubectl("apply", "-f", str(ROOT / "manifests" / "base" / "namespace.yaml"))
    result = plane.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "manifests"))
    for created in ("deployment.apps/pluginctl", "service/pluginctl-registry",
                    "serviceaccount/pluginctl", "clusterrole.rbac.authorization.k8s.io/pluginctl",
                    "role.rbac.authorization.k8s.io/pluginctl-leader-election",
                    "secret/pluginctl-database"):
        assert f"{created} created (server dry run)" in result.stdout, result.stdout


# --- 2. a register-only runtime reaches Ready ------------------------------------------------

async def test_register_only_workspace_becomes_ready(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime],
) -> None:
    apply(plane, namespace, template("base", SEO, NOTES), workspace("alpha"))
    # Every status the object goes through, as a watch sees it.
    watching = subprocess.Popen(
        ["kubectl", "get", "ws", "alpha", "-n", namespace, "--watch",
         "-o", 'jsonpath={.status.pluginsReady}{"\\n"}'],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=plane.env())
    operator = operators()
    runtime = await runtime_for(plane, namespace, "alpha", operator.registry, runtimes,
                                report=False,  # registers, never heartbeats
                                faults=Faults(install_delay=0.5))

    await wait_ready(plane, namespace, "alpha")
    watching.terminate()
    seen, _ = watching.communicate(timeout=30)
    # Both plugins installed in one pass, half a second apart: one status write for the two,
    # never one showing the first alone.
    assert "2/2" in seen.split() and "1/2" not in seen.split(), seen

    assert set(runtime.plugins) == {"seo-all", "notes"}
    with urllib.request.urlopen(operator.registry + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    assert 'pluginctl_plugin_actions_total{action="install",result="ok"' in metrics
    assert 'pluginctl_registry_requests_total{code="200",endpoint="/registry/register"}' \
        in metrics
    row = get(plane, namespace, "ws", "alpha").splitlines()[1].split()
    assert row[:5] == ["alpha", "base", "Online", "2/2", "True"]
    row = get(plane, namespace, "wst", "base").splitlines()[1].split()
    assert row[:3] == ["base", "2", "1/1"]
    # Events go out behind the status writes (once those have rested): wait for them.
    described = await wait_for(lambda: (text := plane.kubectl(
        "describe", "ws", "alpha", "-n", namespace).stdout) and "Restarted" in text and text,
        "the Events", 30, blocking=True, every=0.25)
    assert "Installed" in described and "installed seo-all from" in described
    status = json.loads(get(plane, namespace, "ws", "alpha", "-o", "json"))["status"]
    assert status["observedGeneration"] == 1
    assert status["tokenSecretName"] == "alpha-pluginctl-token"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InSync" and ready["observedGeneration"] == 1

    # Deleting the Workspace revokes its token and deletes its Secret.
    plane.kubectl("delete", "ws", "alpha", "-n", namespace)
    await wait_for(lambda: token_of(plane, namespace, "alpha") is None, "the token Secret to go",
                   30, blocking=True, every=0.25)

    async def refused() -> bool:
        try:
            await runtime.heartbeat()
        except aiohttp.ClientResponseError as error:
            return error.status == 401
        return False

    await wait_for(refused, "the deleted workspace's token to stop working", 30, every=0.25)

    # SIGTERM: the operator's own tasks end as soon as kopf begins to stop (kopf would wait
    # 5 s for them, then cancel them); it hands back the Lease and exits 0.
    assert lease_holder(plane, namespace) == operator.identity
    operator.process.terminate()
    assert operator.process.wait(4.5) == 0, operator.log_tail()
    assert lease_holder(plane, namespace) == "", "the Lease was not handed back"


# --- 3. a steady state makes no writes -------------------------------------------------------

async def test_steady_state_makes_no_writes(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime],
) -> None:
    apply(plane, namespace, template("base", SEO, NOTES), workspace("one"), workspace("two"))
    operator = operators()
    one = await runtime_for(plane, namespace, "one", operator.registry, runtimes)
    two = await runtime_for(plane, namespace, "two", operator.registry, runtimes)
    one.start_heartbeats()
    two.start_heartbeats()
    await wait_ready(plane, namespace, "one", "two")

    def versions() -> str:
        return get(plane, namespace, "ws,wst,secrets,events", "-o",
                   "jsonpath={range .items[*]}{.kind}/{.metadata.name}="
                   "{.metadata.resourceVersion} {end}")

    settled = operator.passes() + 3
    await wait_for(lambda: operator.passes() >= settled, "the fleet to settle", 30,
                   blocking=True, every=0.25)
    before = versions()
    calls_before = len(one.calls) + len(two.calls)
    heartbeats_before = one.heartbeats + two.heartbeats
    passes_before = operator.passes()
    await wait_for(lambda: operator.passes() >= passes_before + 5, "five more passes", 30,
                   blocking=True, every=0.25)

    assert versions() == before  # no status patch, Event, Secret or anything else written
    assert one.heartbeats + two.heartbeats >= heartbeats_before + 10  # heartbeats flowed
    assert len(one.calls) + len(two.calls) == calls_before  # and nothing was called


# --- 4. suspend, requestedAt, template edits, Stalled ----------------------------------------

async def test_suspend_requested_at_template_edit_and_stalled(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime],
) -> None:
    apply(plane, namespace, template("base", SEO, NOTES), workspace("w1"))
    operator = operators()
    runtime = await runtime_for(plane, namespace, "w1", operator.registry, runtimes)
    runtime.start_heartbeats()
    await wait_ready(plane, namespace, "w1")

    # Suspend: no calls at all, even when the template changes under it.
    plane.kubectl("patch", "ws", "w1", "-n", namespace, "--type=merge",
                  "-p", '{"spec":{"suspend":true}}')
    await wait_for(lambda: "Suspended" in get(plane, namespace, "ws", "w1"), "Suspended", 30,
                   blocking=True, every=0.25)
    calls = len(runtime.calls)
    apply(plane, namespace, template("base", SEO))  # `notes` no longer declared
    passes = operator.passes()
    await wait_for(lambda: operator.passes() >= passes + 3, "three passes", 30,
                   blocking=True, every=0.25)
    assert len(runtime.calls) == calls and "notes" in runtime.plugins

    # Resume: the controller-installed `notes` is removed.
    plane.kubectl("patch", "ws", "w1", "-n", namespace, "--type=merge",
                  "-p", '{"spec":{"suspend":false}}')
    await wait_for(lambda: "notes" not in runtime.plugins, "notes removed", 30,
                   blocking=True, every=0.25)
    await wait_ready(plane, namespace, "w1")

    # Upgrade by editing the template.
    apply(plane, namespace, template("base", ("seo-all", SEO[1].replace("#v1", "#v2"))))
    await wait_for(lambda: runtime.plugins["seo-all"].source.endswith("#v2"), "upgrade", 30,
                   blocking=True, every=0.25)
    described = await wait_for(lambda: (text := plane.kubectl(
        "describe", "ws", "w1", "-n", namespace).stdout) and "Removed" in text and text,
        "the Removed Event", 30, blocking=True, every=0.25)
    assert "seo-all -> " not in described
    installs = await wait_for(lambda: (text := get(
        plane, namespace, "events", "--field-selector", "involvedObject.name=w1,reason=Installed",
        "-o", "jsonpath={.items[*].message}")) and "#v2 (source" in text and text,
        "the upgrade's Installed Event", 30, blocking=True, every=0.25)
    assert "#v2 (source" in installs and "[trigger: template-change]" in installs

    # requestedAt is echoed once handled.
    plane.kubectl("annotate", "ws", "w1", "-n", namespace, "--overwrite",
                  "reconcile.pluginctl.dev/requestedAt=2026-11-28T10:00:00Z")
    wait = await asyncio.to_thread(
        plane.kubectl, "wait", "-n", namespace, "ws/w1", "--timeout=30s",
        "--for=jsonpath={.status.lastHandledReconcileAt}=2026-11-28T10:00:00Z", check=False)
    assert wait.returncode == 0, wait.stderr

    # A second claim on the same workspace id, and a missing template: Stalled, no calls.
    apply(plane, namespace, workspace("w1-copy", workspaceId="w1"),
          workspace("orphan", template_name="nope"))
    for name, reason in (("w1-copy", "DuplicateWorkspaceId"), ("orphan", "TemplateNotFound")):
        wait = await asyncio.to_thread(
            plane.kubectl, "wait", "-n", namespace, f"ws/{name}", "--timeout=30s",
            "--for=condition=Stalled", check=False)
        assert wait.returncode == 0, wait.stderr
        stalled = get(plane, namespace, "ws", name, "-o",
                      'jsonpath={.status.conditions[?(@.type=="Stalled")].reason}')
        assert stalled == reason
    assert "Invalid" in get(plane, namespace, "ws", "orphan")
    assert "True" in get(plane, namespace, "ws", "w1")  # the claimant is untouched


async def test_the_guard_holds_a_template_change_and_kubectl_shows_why(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime],
) -> None:
    """With --max-workspaces 1, a template change that touches both workspaces holds: no
    runtime gets the new plugin, and each Workspace is Stalled with reason GuardHolding."""
    apply(plane, namespace, template("base", SEO), workspace("g1"), workspace("g2"))
    operator = operators(extra=("--max-workspaces", "1"))
    started = []
    for name in ("g1", "g2"):  # one at a time: each register's pass touches one workspace
        runtime = await runtime_for(plane, namespace, name, operator.registry, runtimes)
        runtime.faults.restart_required = False
        runtime.start_heartbeats()
        await wait_ready(plane, namespace, name)
        started.append(runtime)

    apply(plane, namespace, template("base", SEO, NOTES))  # both workspaces at once
    for name in ("g1", "g2"):
        wait = await asyncio.to_thread(
            plane.kubectl, "wait", "-n", namespace, f"ws/{name}", "--timeout=60s",
            "--for=jsonpath={.status.conditions[?(@.type==\"Stalled\")].reason}=GuardHolding",
            check=False, timeout=90)
        assert wait.returncode == 0, wait.stderr
    message = get(plane, namespace, "ws", "g1", "-o",
                  'jsonpath={.status.conditions[?(@.type=="Ready")].message}')
    assert "it would go over --max-workspaces 1" in message
    assert all("notes" not in runtime.plugins for runtime in started)


async def test_a_failure_makes_one_event_not_one_per_retry(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime],
) -> None:
    apply(plane, namespace, template("base", SEO, NOTES), workspace("w"))
    operator = operators()
    runtime = await runtime_for(plane, namespace, "w", operator.registry, runtimes,
                                faults=Faults(failing_plugins={"notes"}))
    runtime.start_heartbeats()
    def failed_events() -> list[str]:
        return get(plane, namespace, "events", "--field-selector",
                   "involvedObject.name=w,reason=InstallFailed", "-o", "name").split()

    await wait_for(failed_events, "the InstallFailed Event", 60, blocking=True, every=0.25)
    tries = runtime.count("PUT", "/plugins/notes")
    await wait_for(lambda: runtime.count("PUT", "/plugins/notes") >= tries + 1,
                   "a retry of the failing install after the Event", 60)
    await asyncio.sleep(1)  # more than EVENTS_SETTLE: a second Event would be out by now
    assert len(failed_events()) == 1
    status = json.loads(get(plane, namespace, "ws", "w", "-o", "json"))["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "Failed"
    notes = next(p for p in status["plugins"] if p["name"] == "notes")
    assert notes["state"] == "Failed" and "broken plugin" in notes["message"]


# --- 5. two operators: one acts, the other takes over ----------------------------------------

async def test_two_operators_one_acts_and_the_other_takes_over(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime],
) -> None:
    def holder() -> str:
        return lease_holder(plane, namespace)

    apply(plane, namespace, template("base", SEO), workspace("w"))
    first = operators("op-a")
    await wait_for(lambda: holder() == "op-a", "op-a to lead", 60, blocking=True, every=0.25)
    second = operators("op-b")
    await wait_for(lambda: _healthy(second.registry), "op-b to serve", 60,
                   blocking=True, every=0.25)
    # The registry is stateless: the runtime talks to the standby's.
    runtime = await runtime_for(plane, namespace, "w", second.registry, runtimes)
    runtime.start_heartbeats()
    await wait_ready(plane, namespace, "w")
    agents = {call.user_agent for call in runtime.calls}
    assert agents == {user_agent("op-a")}, agents
    # The standby runs no passes: no coverage age growing with its uptime, no fleet gauges.
    assert _families(second.metrics()) & {"pluginctl_oldest_reconcile_age_seconds",
                                          "pluginctl_drifted_workspaces"} == set()

    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    killed_at = time.monotonic()
    await wait_for(lambda: holder() == "op-b", "op-b to take over", 60, blocking=True, every=0.25)
    took_over = time.monotonic() - killed_at
    assert took_over < 15 + 2 * 2 + 5, took_over  # lease duration + two retries + slack

    plane.kubectl("patch", "ws", "w", "-n", namespace, "--type=merge", "-p",
                  json.dumps({"spec": {"plugins": [{"name": NOTES[0], "source": NOTES[1]}]}}))
    await wait_for(lambda: "notes" in runtime.plugins, "op-b to converge a change", 60,
                   blocking=True, every=0.25)
    assert {c.user_agent for c in runtime.calls if c.path == "/plugins/notes"} == \
        {user_agent("op-b")}
    assert {"pluginctl_oldest_reconcile_age_seconds", "pluginctl_drifted_workspaces"} <= \
        _families(second.metrics())


def _families(text: str) -> set[str]:
    """The metric families a /metrics page has samples of."""
    return {family.name for family in text_string_to_metric_families(text) if family.samples}


async def test_per_workspace_runtime_secret_in_the_token_secret(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime], tmp_path: Path,
) -> None:
    """With --runtime-secret-per-workspace the token Secret also carries the secret the
    controller will show this workspace's runtime; a runtime that checks it converges."""
    secret_file = tmp_path / "runtime-secret"
    secret_file.write_text("controller-secret-e2e")
    apply(plane, namespace, template("base", SEO), workspace("sec"))
    operator = operators("op-a", extra=("--runtime-secret-file", str(secret_file),
                                        "--runtime-secret-per-workspace"))

    def shown() -> str | None:
        result = plane.kubectl("get", "secret", "sec-pluginctl-token", "-n", namespace, "-o",
                               "jsonpath={.data.controller-secret}", check=False)
        return base64.b64decode(result.stdout).decode() if result.stdout else None

    controller_secret = await wait_for(shown, "the controller secret in the Secret", 60,
                                       blocking=True, every=0.25)
    assert controller_secret == runtime_secret_for("controller-secret-e2e", "sec")
    token = await wait_for(lambda: token_of(plane, namespace, "sec"), "the token", 60,
                           blocking=True, every=0.25)
    runtime = ReferenceRuntime("sec", registry_url=operator.registry, token=str(token),
                               controller_secret=str(controller_secret))
    await runtime.start()
    runtimes.append(runtime)
    await runtime.register()
    await wait_ready(plane, namespace, "sec")
    assert "seo-all" in runtime.plugins


# --- 5b. faults between the operator and the API server ------------------------------------

@pytest.fixture
async def proxy(plane: kube.ControlPlane) -> AsyncIterator[kube.KubeProxy]:
    started = await kube.KubeProxy(plane).start()
    try:
        yield started
    finally:
        await started.stop()


async def test_lost_watch_events_are_repaired_by_the_resync(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime], proxy: kube.KubeProxy,
) -> None:
    """30 % of the watch events the operator should see are lost on the way (every one of
    w0's is): each workspace still becomes Ready, the lost ones by the next resync."""
    apply(plane, namespace, template("base", SEO))
    operator = operators("op-a", kubeconfig=proxy.kubeconfig("lossy"),
                         extra=("--resync", "3"))
    # The leader's first pass writes the template's status: it leads, and it watches.
    await wait_for(lambda: get(plane, namespace, "wst", "base", "-o",
                               "jsonpath={.status.observedGeneration}") == "1",
                   "op-a to lead and mirror the template", 60, blocking=True, every=0.25)
    proxy.loss = 0.3
    proxy.always_drop = {"w0"}
    names = [f"w{i}" for i in range(6)]
    for name in names:
        apply(plane, namespace, workspace(name))
    fleet = [await runtime_for(plane, namespace, name, operator.registry, runtimes)
             for name in names]
    for runtime in fleet:
        runtime.start_heartbeats()
    await wait_ready(plane, namespace, *names)
    assert any(event.startswith("ADDED workspaces/w0") for event in proxy.dropped)


async def test_api_server_unreachable_pauses_the_loop_not_the_registry(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime], proxy: kube.KubeProxy,
) -> None:
    """The API server stops answering. The registry keeps accepting heartbeats; the leader
    cannot renew its Lease, steps down within the renew deadline and pauses its passes (it
    cannot know whether another replica leads); once the API server answers again it
    leads again and converges what changed meanwhile."""
    apply(plane, namespace, template("base", SEO), workspace("w"))
    operator = operators("op-a", kubeconfig=proxy.kubeconfig("cut"))
    runtime = await runtime_for(plane, namespace, "w", operator.registry, runtimes)
    runtime.start_heartbeats()
    await wait_ready(plane, namespace, "w")

    proxy.reachable.clear()
    # A leader runs a pass a second (--interval 1): passes standing still for four seconds
    # is the step down, as /metrics shows it.
    paused = Quiet(4.0)
    await wait_for(lambda: paused(operator.passes()), "a step down (passes paused)", 60,
                   blocking=True, every=0.25)
    runtime.plugins.clear()  # the box lost its plugins while nobody may act
    installs = runtime.count("PUT")
    beats = runtime.heartbeats
    await wait_for(lambda: runtime.heartbeats >= beats + 10, "heartbeats accepted", 30,
                   blocking=True, every=0.25)
    assert runtime.count("PUT") == installs, "a paused loop acted"
    assert operator.passes() == paused.value, "a paused loop ran a pass"

    proxy.reachable.set()
    await wait_for(lambda: "seo-all" in runtime.plugins, "convergence once back", 90,
                   blocking=True, every=0.25)
    # Leading again: the pass that installed it is counted once it ends (after its calls).
    await wait_for(lambda: operator.passes() > paused.value, "passes counted again", 30,
                   blocking=True, every=0.25)


# --- 6. RBAC: enough and no more -------------------------------------------------------------

def _can_i(plane: kube.ControlPlane, user: str, namespace: str) -> set[tuple[str, str]]:
    """(resource, verb) pairs from `kubectl auth can-i --list`; non-resource URLs left out."""
    out = plane.kubectl("auth", "can-i", "--list", f"--as={user}", "-n", namespace).stdout
    rules: set[tuple[str, str]] = set()
    for line in out.splitlines()[1:]:
        resource = line.split()[0] if line.split() else "/"
        if resource.startswith("/") or "[" not in line:
            continue
        verbs = line[line.rindex("["):].strip().strip("[]")
        rules.update((resource, verb) for verb in verbs.split())
    return rules


async def test_rbac_in_manifests_is_enough_and_no_more(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime], tmp_path: Path,
) -> None:
    plane.kubectl("apply", "-k", str(ROOT / "manifests"))
    token = plane.kubectl("create", "token", "pluginctl", "-n", "pluginctl-system",
                          "--duration=1h").stdout.strip()
    kubeconfig = plane.kubeconfig_for_token(token, "pluginctl-sa")
    assert plane.kubectl("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}",
                         kubeconfig=kubeconfig).stdout == \
        "system:serviceaccount:pluginctl-system:pluginctl"

    apply(plane, namespace, template("base", SEO, NOTES), workspace("w"))
    # The Lease lives where the manifests' Role allows it: the controller's own namespace.
    operator = operators("op-sa", kubeconfig=kubeconfig, lease_namespace="pluginctl-system")
    runtime = await runtime_for(plane, namespace, "w", operator.registry, runtimes)
    runtime.start_heartbeats()
    await wait_ready(plane, namespace, "w")
    # Every write the operator makes went through under the manifests' RBAC: the Lease,
    # Workspace and template status, Events, the token Secret (and its deletion below).
    await wait_for(lambda: lease_holder(plane, "pluginctl-system") == "op-sa", "the lease",
                   30, blocking=True, every=0.25)
    await wait_for(lambda: get(plane, namespace, "wst", "base").splitlines()[1].split()[:3]
                   == ["base", "2", "1/1"], "the template's status", 30, blocking=True,
                   every=0.25)
    await wait_for(lambda: get(plane, namespace, "events", "--field-selector",
                               "involvedObject.name=w,reason=Installed", "-o", "name"),
                   "the Installed Event", 30, blocking=True, every=0.25)
    # A rollout command by annotation is read, answered (nothing to resume) and removed.
    plane.kubectl("annotate", "-n", namespace, "wst/base", "reconcile.pluginctl.dev/rollout=resume")
    await wait_for(lambda: "reconcile.pluginctl.dev/rollout" not in get(
        plane, namespace, "wst", "base", "-o", "jsonpath={.metadata.annotations}"),
        "the annotation removed", 30, blocking=True, every=0.25)
    await wait_for(lambda: get(plane, namespace, "events", "--field-selector",
                               "involvedObject.name=base,reason=RolloutCommandRefused", "-o",
                               "name"), "the refusal Event", 30, blocking=True, every=0.25)
    assert token_of(plane, namespace, "w") is not None
    plane.kubectl("delete", "ws", "w", "-n", namespace)
    await wait_for(lambda: token_of(plane, namespace, "w") is None, "the token Secret to go",
                   30, blocking=True, every=0.25)

    sa = "system:serviceaccount:pluginctl-system:pluginctl"
    baseline = "system:serviceaccount:default:default"  # what any account may do
    granted = _can_i(plane, sa, namespace) - _can_i(plane, baseline, namespace)
    assert granted == {
        ("workspaces.pluginctl.dev", "list"), ("workspaces.pluginctl.dev", "watch"),
        ("workspacetemplates.pluginctl.dev", "list"),
        ("workspacetemplates.pluginctl.dev", "watch"),
        ("workspaces.pluginctl.dev/status", "patch"),
        ("workspacetemplates.pluginctl.dev/status", "patch"),
        ("workspacetemplates.pluginctl.dev", "patch"),
        ("events", "create"),
        ("secrets", "list"), ("secrets", "watch"), ("secrets", "create"),
        ("secrets", "patch"), ("secrets", "delete"),
        ("customresourcedefinitions.apiextensions.k8s.io", "list"),
        ("customresourcedefinitions.apiextensions.k8s.io", "watch"),
    }, granted
    in_own_namespace = _can_i(plane, sa, "pluginctl-system") - _can_i(plane, baseline,
                                                                      "pluginctl-system")
    assert in_own_namespace - granted == {
        ("leases.coordination.k8s.io", "create"), ("leases.coordination.k8s.io", "get"),
        ("leases.coordination.k8s.io", "update")}


# --- the status writer keeps off the event loop --------------------------------------------

@pytest.mark.filterwarnings("ignore::urllib3.exceptions.InsecureRequestWarning")
async def test_the_status_writer_runs_no_store_or_api_call_on_the_event_loop(
    plane: kube.ControlPlane, namespace: str, sqlite_url: str,
) -> None:
    """The registry and the passes share the event loop: every SQL statement and every API
    request of a mirror runs on another thread, and the mirror still writes what a user
    reads (status with its condition reasons, the token Secret)."""
    from sqlalchemy import event

    from controller.domain.models import Policy
    from controller.kube.client import KubeClient
    from controller.kube.status_writer import StatusWriter
    from controller.kube.view import ClusterView
    from controller.store import make_engine, make_sessions, upgrade

    apply(plane, namespace, template("base", SEO), workspace("w"),
          workspace("w-copy", workspaceId="w"), workspace("orphan", template_name="nope"))
    loop_thread = threading.get_ident()
    calls: list[tuple[str, bool]] = []  # (what, whether it ran on the loop's thread)

    def statement(*_: object) -> None:
        calls.append(("sql", threading.get_ident() == loop_thread))

    engine = make_engine(sqlite_url)
    upgrade(engine)
    event.listen(engine, "before_cursor_execute", statement)
    client = KubeClient(str(plane.kubeconfig))
    send = client.api.rest_client.request

    def request(*args: object, **kwargs: object) -> object:
        calls.append(("api", threading.get_ident() == loop_thread))
        return send(*args, **kwargs)

    client.api.rest_client.request = request
    try:
        listed = await client.call(ClusterView.listed, client)
        mine = {kind: [o for o in listed.of(kind) if o["metadata"].get("namespace") ==
                       namespace] for kind in ("workspaces", "templates", "secrets")}
        ours = ClusterView(mine["workspaces"], mine["templates"], mine["secrets"])
        writer = StatusWriter(client, make_sessions(engine), Policy(), "e2e-writer")
        await writer.apply(ours, ours.desired(), None)
    finally:
        engine.dispose()

    assert {what for what, _ in calls} == {"sql", "api"}, calls
    assert [what for what, on_loop in calls if on_loop] == []
    assert writer.writes >= 5  # three statuses, a template status, a token Secret

    def stalled(name: str) -> str:
        return get(plane, namespace, "ws", name, "-o",
                   'jsonpath={.status.conditions[?(@.type=="Stalled")].reason}')

    assert stalled("w-copy") == "DuplicateWorkspaceId"
    assert stalled("orphan") == "TemplateNotFound"
    assert "Unregistered" in get(plane, namespace, "ws", "w")
    assert token_of(plane, namespace, "w") is not None


async def test_a_mirror_leaves_a_workspace_a_pass_in_flight_holds_to_that_pass(
    plane: kube.ControlPlane, namespace: str, sqlite_url: str,
) -> None:
    """A full pass's mirror does not write the status of a Workspace another pass is still
    acting on (that pass's own mirror writes it when it ends): a storm of registers paid
    two status writes a Workspace. Once nothing holds it, the next mirror writes it."""
    from controller.domain.models import Policy
    from controller.kube.client import KubeClient
    from controller.kube.status_writer import StatusWriter
    from controller.kube.view import ClusterView
    from controller.store import make_engine, make_sessions, upgrade

    apply(plane, namespace, template("base", SEO), workspace("w"))
    engine = make_engine(sqlite_url)
    upgrade(engine)
    client = KubeClient(str(plane.kubeconfig))
    held: set[str] = set()

    async def mirror(writer: StatusWriter) -> None:
        listed = await client.call(ClusterView.listed, client)
        mine = {kind: [o for o in listed.of(kind) if o["metadata"].get("namespace") ==
                       namespace] for kind in ("workspaces", "templates", "secrets")}
        ours = ClusterView(mine["workspaces"], mine["templates"], mine["secrets"])
        await writer.apply(ours, ours.desired(), None)

    def plugins_ready() -> str:
        return get(plane, namespace, "ws", "w", "-o", "jsonpath={.status.pluginsReady}")

    try:
        writer = StatusWriter(client, make_sessions(engine), Policy(), "e2e-writer",
                              in_flight=held.__contains__)
        await mirror(writer)
        assert plugins_ready() == "0/1"
        apply(plane, namespace, template("base", SEO, NOTES))
        held.add("w")
        await mirror(writer)
        assert plugins_ready() == "0/1"  # left to the pass that holds it
        held.clear()
        await mirror(writer)
        assert plugins_ready() == "0/2"
    finally:
        engine.dispose()


async def test_a_watch_that_lags_behind_a_write_never_causes_it_twice(
    plane: kube.ControlPlane, namespace: str, sqlite_url: str,
) -> None:
    """A mirror that still sees the version its last write went over (at 10,000 Workspaces
    the watch brings status writes back seconds late) trusts what it wrote: no second
    write. Once the watch shows the write, the writer keeps the watch's copy of it, not a
    second one. A change made by someone else is a new version, judged as the view shows
    it."""
    from controller.domain.models import Policy
    from controller.kube.client import KubeClient
    from controller.kube.status_writer import StatusWriter
    from controller.kube.view import ClusterView
    from controller.store import make_engine, make_sessions, upgrade

    apply(plane, namespace, template("base", SEO), workspace("w"))
    engine = make_engine(sqlite_url)
    upgrade(engine)
    client = KubeClient(str(plane.kubeconfig))

    async def listed() -> ClusterView:
        view = await client.call(ClusterView.listed, client)
        mine = {kind: [o for o in view.of(kind) if o["metadata"].get("namespace") ==
                       namespace] for kind in ("workspaces", "templates", "secrets")}
        return ClusterView(mine["workspaces"], mine["templates"], mine["secrets"])

    def plugins_ready() -> str:
        return get(plane, namespace, "ws", "w", "-o", "jsonpath={.status.pluginsReady}")

    try:
        writer = StatusWriter(client, make_sessions(engine), Policy(), "e2e-writer")
        stale = await listed()
        await writer.apply(stale, stale.desired(), None)
        assert plugins_ready() == "0/1"
        first = writer.writes
        await writer.apply(stale, stale.desired(), None)  # the watch has not caught up
        assert writer.writes == first
        caught_up = await listed()  # now it has: what it shows is kept, not a second copy
        await writer.apply(caught_up, caught_up.desired(), None)
        shown = caught_up.workspaces[0]
        assert writer.writes == first
        assert writer.written[shown["metadata"]["uid"]] is shown["status"]
        plane.kubectl("patch", "workspace", "w", "-n", namespace, "--subresource=status",
                      "--type=merge", "-p", '{"status":{"pluginsReady":"7/7"}}')
        assert plugins_ready() == "7/7"
        fresh = await listed()
        await writer.apply(fresh, fresh.desired(), None)
        assert writer.writes == first + 1 and plugins_ready() == "0/1"
    finally:
        engine.dispose()


def test_listing_reads_pages_and_drops_managed_fields(
    plane: kube.ControlPlane, namespace: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A LIST comes in pages (one snapshot), and what it keeps has no managedFields: a
    resync of 10,000 Workspaces must not hold them all, twice, at once."""
    from controller.kube import client as client_module
    from controller.kube.client import KubeClient

    apply(plane, namespace, template("base", SEO), *(workspace(f"w{i}") for i in range(5)))
    monkeypatch.setattr(client_module, "LIST_PAGE", 2)
    client = KubeClient(str(plane.kubeconfig))
    send = client.api.rest_client.request
    lists: list[str] = []

    def request(method: str, url: str, *args: object, **kwargs: object) -> object:
        if method == "GET" and "/workspaces" in url:
            lists.append(url)
        return send(method, url, *args, **kwargs)

    client.api.rest_client.request = request
    listing = client.list_objects("workspaces")
    mine = sorted(o["metadata"]["name"] for o in listing.items
                  if o["metadata"]["namespace"] == namespace)
    assert mine == [f"w{i}" for i in range(5)]
    assert all("managedFields" not in o["metadata"] for o in listing.items)
    assert len(lists) >= 3 and all("limit=2" in url for url in lists), lists
    assert listing.version is not None and int(listing.version) > 0


# --- reconcile --once against the cluster ----------------------------------------------------

async def test_reconcile_once_against_the_cluster(
    plane: kube.ControlPlane, namespace: str, runtimes: list[ReferenceRuntime],
    tmp_path: Path, operators: Callable[..., Operator],
) -> None:
    db = f"sqlite:///{tmp_path / 'once.db'}"
    apply(plane, namespace, template("base", SEO, NOTES), workspace("w"))
    env = plane.env()

    async def pluginctl(*args: str) -> tuple[int, str, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", *args, "--kubernetes", "--db", db, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), 120)
        return process.returncode or 0, out.decode(), err.decode()

    async def once(*args: str) -> tuple[int, str]:
        code, out, err = await pluginctl("reconcile", "--once", *args)
        return code, out + err

    code, output = await once()  # nothing online yet; writes the token Secret and status
    assert code == 0, output
    assert "Unregistered" in get(plane, namespace, "ws", "w")

    # A registry to register with: the standalone process on the same database.
    registry_port = free_port()
    registry = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "run", "--manifests", str(tmp_path), "--db", db,
        "--listen", f"127.0.0.1:{registry_port}", "--interval", "3600", env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await wait_for(lambda: _healthy(f"http://127.0.0.1:{registry_port}"),
                       "the registry to serve", 30, blocking=True, every=0.25)
        runtime = await runtime_for(plane, namespace, "w", f"http://127.0.0.1:{registry_port}",
                                    runtimes)
        runtime.faults.restart_required = False
        code, output = await once("--dry-run")
        assert code == 2 and "would install notes" in output, output
        assert runtime.plugins == {}
        code, output = await once()
        assert code == 0, output
        assert set(runtime.plugins) == {"seo-all", "notes"}
        await wait_ready(plane, namespace, "w", timeout=30)
        code, output, err = await pluginctl("status", "-o", "json")
        assert code == 0, output + err
        assert [(w["workspace_id"], w["phase"], w["in_sync"], w["desired"])
                for w in json.loads(output)["workspaces"]] == [("w", "Online", True, 2)]
        code, output, err = await pluginctl("explain", "w", "-o", "json")
        assert code == 0, output + err
        explained = json.loads(output)
        assert explained["in_sync"] is True and explained["object"] == f"{namespace}/w"
        assert [(p["name"], p["declared_by"], p["owner"]) for p in explained["plugins"]] == [
            ("notes", f"WorkspaceTemplate {namespace}/base spec.plugins[1]", "pluginctl"),
            ("seo-all", f"WorkspaceTemplate {namespace}/base spec.plugins[0]", "pluginctl")]
    finally:
        registry.terminate()
        await registry.wait()

    code, output = await once("--context", "no-such-context")
    assert code == 1 and "error: cannot load Kubernetes configuration" in output, output


# --- the native-sidecar example (manifests/examples/sidecar/) --------------------------------

SIDECAR_EXAMPLE = ROOT / "manifests" / "examples" / "sidecar" / "workspace-pod.yaml"


def _flags(args: list[str]) -> dict[str, list[str]]:
    """`--flag=value` and `--flag value` arguments, by flag."""
    flags: dict[str, list[str]] = {}
    for index, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag, equals, value = arg.partition("=")
        if not equals and index + 1 < len(args) and not args[index + 1].startswith("--"):
            value = args[index + 1]
        flags.setdefault(flag, []).append(value)
    return flags


def test_sidecar_example_is_admitted_as_a_restricted_native_sidecar(
    plane: kube.ControlPlane, namespace: str,
) -> None:
    """The example workspace Pod passes the API server's own validation (a server-side dry
    run) in a namespace that enforces the `restricted` Pod Security Standard, and, as the
    server returns it: the agent is a native sidecar sharing the plugins volume with the
    workspace container at /configs/plugins, non-root with a read-only root filesystem, its
    token comes from the operator's token Secret and never from its command line, and it
    reaches the registry Service of manifests/base."""
    from controller.domain.tokens import PREFIX
    from controller.engine import manifests
    from controller.kube import conditions as mirror

    restricted = ("pod-security.kubernetes.io/enforce=restricted",
                  "pod-security.kubernetes.io/warn=restricted")
    plane.kubectl("label", "namespace", namespace, *restricted)
    # The Pod's ServiceAccount must exist even for a dry run; a real cluster's
    # controller-manager makes `default` in every namespace, this bare API server does not.
    # The token Secret need not exist: only the kubelet resolves secretKeyRef.
    plane.kubectl("create", "serviceaccount", "default", "-n", namespace)

    result = plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-o", "json",
                           "-f", str(SIDECAR_EXAMPLE))
    assert "Warning" not in result.stderr, result.stderr  # PodSecurity warns on stderr
    # The namespace really enforces `restricted`: the same Pod without seccomp is refused.
    document = yaml.safe_load(SIDECAR_EXAMPLE.read_text())
    del document["spec"]["securityContext"]["seccompProfile"]
    refused = plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-f", "-",
                            input=yaml.safe_dump(document), check=False)
    assert refused.returncode != 0 and "violates PodSecurity" in refused.stderr, refused

    pod = json.loads(result.stdout)
    assert pod["kind"] == "Pod" and pod["metadata"]["namespace"] == namespace
    spec = pod["spec"]
    pod_security = spec.get("securityContext") or {}
    volumes = {volume["name"]: volume for volume in spec["volumes"]}

    agents = [c for c in spec.get("initContainers", [])  # `pluginctl agent`, or `agent`
              if "agent" in [*c.get("command", []), *c.get("args", [])][:2]]
    assert len(agents) == 1, spec.get("initContainers")
    agent = agents[0]
    assert agent.get("restartPolicy") == "Always", "the agent must be a native sidecar"
    args = [*agent.get("command", []), *agent.get("args", [])]
    flags = _flags(args)

    # The plugins volume: written by the agent, read by the workspace at /configs/plugins.
    assert flags.get("--plugins-dir") == ["/configs/plugins"], args
    agent_mounts = {m["mountPath"]: m for m in agent.get("volumeMounts", [])}
    plugins = agent_mounts["/configs/plugins"]
    assert not plugins.get("readOnly") and "emptyDir" in volumes[plugins["name"]]
    assert spec["containers"], "no workspace container"
    for container in spec["containers"]:
        mounts = [m for m in container.get("volumeMounts", []) if m["name"] == plugins["name"]]
        assert [m["mountPath"] for m in mounts] == ["/configs/plugins"], container["name"]
    # A writable cache beside the read-only root filesystem.
    cache = flags.get("--cache-dir", [""])[0]
    assert cache in agent_mounts and not agent_mounts[cache].get("readOnly"), args
    assert "emptyDir" in volumes[agent_mounts[cache]["name"]]

    security = agent.get("securityContext") or {}
    assert security.get("readOnlyRootFilesystem") is True
    assert security.get("allowPrivilegeEscalation") is False
    assert security.get("capabilities", {}).get("drop") == ["ALL"]
    assert security.get("runAsNonRoot", pod_security.get("runAsNonRoot")) is True
    assert security.get("runAsUser", pod_security.get("runAsUser", 0)) != 0
    for container in spec["containers"]:
        assert (container.get("securityContext") or {}).get(
            "runAsNonRoot", pod_security.get("runAsNonRoot")) is True, container["name"]

    # Only the controller may call the agent: its secret, or a policy admitting it alone.
    if "--controller-secret-file" not in flags:
        assert "--allow-any-caller" in args, args
        policy_file = SIDECAR_EXAMPLE.parent / "networkpolicy.yaml"
        applied = plane.kubectl("apply", "--dry-run=server", "-n", namespace, "-o", "json",
                                "-f", str(policy_file))
        policy = json.loads(applied.stdout)["spec"]
        assert all(pod["metadata"]["labels"].get(key) == value
                   for key, value in policy["podSelector"]["matchLabels"].items())
        [rule] = policy["ingress"]
        assert [p["port"] for p in rule["ports"]] == [9090]
        deployment = yaml.safe_load((ROOT / "manifests" / "base" / "deployment.yaml")
                                    .read_text())
        controller_labels = deployment["spec"]["template"]["metadata"]["labels"]
        [source] = rule["from"]
        assert all(controller_labels.get(k) == v
                   for k, v in source["podSelector"]["matchLabels"].items())

    # The token: from the Workspace's token Secret, never on the command line.
    env = {variable["name"]: variable for variable in agent.get("env", [])}
    assert "value" not in env["PLUGINCTL_TOKEN"], "a literal token in the Pod"
    workspace_id = env["PLUGINCTL_WORKSPACE_ID"]["value"]
    desired = manifests.load(ROOT / "manifests" / "examples")
    assert workspace_id in desired.workspaces, "not a Workspace of manifests/examples"
    assert env["PLUGINCTL_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": mirror.token_secret_name(workspace_id), "key": mirror.TOKEN_KEY}
    assert not any(flag in flags for flag in ("--token", "--token-file")), args
    assert not any(PREFIX in arg or "token" in arg.lower() for arg in args), args
    for container in (*spec.get("initContainers", []), *spec["containers"]):
        for arg in (*container.get("command", []), *container.get("args", [])):
            assert PREFIX not in arg, f"a token in {container['name']}'s command line"

    # Reachable by the controller at the Pod IP, on the port it listens on.
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    port = flags["--listen"][0].rpartition(":")[2]
    assert flags["--advertise-url"] == [f"http://$(POD_IP):{port}"], args
    assert {"containerPort": int(port), "name": "agent", "protocol": "TCP"} in agent["ports"]
    # And it reaches the registry through the Service of manifests/base.
    service = yaml.safe_load((ROOT / "manifests" / "base" / "service.yaml").read_text())
    host = f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"
    assert flags["--registry"][0].split("/")[2].split(":")[0] in (host, f"{host}.cluster.local")


# --- quiet logs ------------------------------------------------------------------------------

def _log_of(operator: Operator) -> tuple[list[str], list[str], list[str]]:
    """(kopf's per-object records, TLS warnings of ours, urllib3's warning lines)."""
    records, other = operator.log_records()
    return ([str(r["message"]) for r in records if r["logger"] == "kopf.objects"],
            [str(r["message"]) for r in records if r["logger"] == "pluginctl.kube"
             and r["level"] == "warning" and "TLS verification" in str(r["message"])],
            [line for line in other if "InsecureRequestWarning" in line])


async def _logged_run(plane: kube.ControlPlane, namespace: str, operator: Operator,
                      names: tuple[str, ...]) -> tuple[list[str], list[str], list[str]]:
    """Run the operator until it has passed twice over the Workspaces and made their token
    Secrets, stop it, read its log."""
    await wait_for(lambda: operator.passes() >= 2, "two passes", 60, blocking=True,
                   every=0.25)
    await wait_for(lambda: all(token_of(plane, namespace, n) for n in names),
                   "the token Secrets", 60, blocking=True, every=0.25)
    operator.stop()
    return _log_of(operator)


async def test_operator_logs_one_line_per_event_and_everything_at_debug(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
) -> None:
    """The test kubeconfig skips TLS verification: at info, the operator says so once and
    neither kopf's per-object lines nor urllib3's per-request warnings appear; at debug
    both come back."""
    names = ("q1", "q2", "q3")
    apply(plane, namespace, template("base", SEO), *(workspace(n) for n in names))
    logs = {}
    for level in ("info", "debug"):
        logs[level] = await _logged_run(plane, namespace, operators(
            identity=f"op-{level}", log_level=level), names)
    kopf_lines, tls_warnings, urllib3_lines = logs["info"]
    assert kopf_lines == [], kopf_lines
    assert len(tls_warnings) == 1, tls_warnings
    assert urllib3_lines == []
    kopf_lines, tls_warnings, urllib3_lines = logs["debug"]
    assert any("succeeded" in line for line in kopf_lines), kopf_lines[:5]
    assert len(tls_warnings) == 1
    assert urllib3_lines != []


# --- pluginctl bench --kubernetes ------------------------------------------------------------

async def test_bench_kubernetes_section_runs_tiny(plane: kube.ControlPlane,
                                                 tmp_path: Path) -> None:
    """The bench's Kubernetes section on the suite's control plane with five Workspaces:
    every figure is there and sane; steady passes write nothing, nothing is installed twice."""
    from controller.sim import kube_bench

    said: list[str] = []
    result = await kube_bench.run(kube_bench.Sizes(workspaces=5, interval=1.0), tmp_path,
                                  said.append, plane=plane)
    assert result["workspaces"] == 5
    assert result["steady_pass_writes"] == 0, said
    assert set(result["phases"]) == {"objects_to_secrets", "registers_to_ready",
                                     "steady_passes", "template_change_to_ready"}
    assert result["phases"]["steady_passes"]["api_writes"] == {}
    assert result["phases"]["steady_passes"]["workspace_status_changes"] == {}
    assert all(phase["seconds"] > 0 for phase in result["phases"].values())
    assert result["phases"]["registers_to_ready"]["fleet_heartbeats"]["without_answer"] == 0
    heartbeats = result["phases"]["steady_passes"]["fleet_heartbeats"]
    assert heartbeats["not_sent"] == heartbeats["without_answer"] == 0, heartbeats
    assert {k for k in heartbeats if not k.startswith("waited ")} - {
        "not_sent", "without_answer"} <= {"answered 200"}, heartbeats
    assert sum(n for k, n in heartbeats.items() if k.startswith("waited ")) \
        == heartbeats.get("answered 200", 0), heartbeats
    assert result["installed_more_than_once"] == 0
    assert result["installs_seen_by_runtimes"] == 5 * 4  # three plugins, then one more
    assert result["baseline"]["standalone"]["installs_seen_by_runtimes"] == 5 * 3
    assert result["baseline"]["standalone"]["installed_more_than_once"] == 0
    for name in ("created_to_secrets_seconds", "registers_to_installed_seconds",
                 "registers_to_ready_seconds", "template_change_to_ready_seconds"):
        assert 0 <= result[name] < 120, (name, result[name])
    assert result["registers_to_ready_seconds"] >= result["registers_to_installed_seconds"] \
        - 0.5  # (the two clocks are sampled apart)
    assert 20 < result["operator_peak_rss_mb"] < 1000
    assert result["ready_ratio_to_standalone_installed"] > 0
