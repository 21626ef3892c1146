"""`kubectl pluginctl` (the kubectl plugin the package installs) run by real kubectl against the
real API server with a running operator, and the one-shot CronJob example
(manifests/examples/reconcile-cronjob/): admitted by the server, least privilege, and enough."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from controller.agent.simulated import ReferenceRuntime
from tests.e2e.test_kubernetes import (
    NOTES,
    ROOT,
    SEO,
    Operator,
    _can_i,
    apply,
    get,
    namespace,
    operators,
    runtime_for,
    template,
    token_of,
    workspace,
)
from tests.support import kube

pytestmark = pytest.mark.kubernetes
__all__ = ["namespace", "operators"]  # fixtures shared with test_kubernetes

BIN = Path(sys.executable).parent
CRONJOB = ROOT / "manifests" / "examples" / "reconcile-cronjob" / "cronjob.yaml"
WILD = ("wild", "gitea://org/repo/agent-skills/wild")  # no pinned ref: refused


def plugin_env(kubeconfig: Path) -> dict[str, str]:
    """kubectl finds `kubectl-pluginctl` on PATH: the package's script, in the venv's bin."""
    assert (BIN / "kubectl-pluginctl").exists(), \
        "kubectl-pluginctl is not installed beside this Python: pip install -e ."
    return {**os.environ, "KUBECONFIG": str(kubeconfig),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


async def kubectl_pluginctl(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    """Run on the event loop's side (the reference runtimes answer the operator meanwhile)."""
    process = await asyncio.create_subprocess_exec(
        "kubectl", "pluginctl", *args, env=env, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode if process.returncode is not None else -1, out.decode(), \
        err.decode()


async def wait_jsonpath(plane: kube.ControlPlane, namespace: str, name: str, expression: str,
                        timeout: int = 90) -> None:
    result = await asyncio.to_thread(
        plane.kubectl, "wait", "-n", namespace, f"ws/{name}", f"--timeout={timeout}s",
        f"--for={expression}", check=False, timeout=timeout + 30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_kubectl_pluginctl_explain_status_plan_and_reconcile(
    plane: kube.ControlPlane, namespace: str, operators: Callable[..., Operator],
    runtimes: list[ReferenceRuntime], tmp_path: Path,
) -> None:
    """alpha converges (Ready); beta asks for an unpinned plugin the operator refuses
    (Stalled, Refused). The plugin reads both from the cluster alone, in the namespace of the
    kubeconfig's context."""
    apply(plane, namespace, template("base", SEO, NOTES), workspace("alpha"),
          workspace("beta", plugins=[{"name": WILD[0], "source": WILD[1]}]))
    operator = operators()
    for name in ("alpha", "beta"):
        runtime = await runtime_for(plane, namespace, name, operator.registry, runtimes)
        runtime.start_heartbeats()
    await wait_jsonpath(plane, namespace, "alpha", "condition=Ready")
    await wait_jsonpath(plane, namespace, "beta",
                        'jsonpath={.status.conditions[?(@.type=="Stalled")].reason}=Refused')
    env = plugin_env(kube.kubeconfig_in_namespace(plane, namespace, tmp_path / "kubeconfig"))

    # explain: the conditions, where each plugin comes from, the Events; exit 0 when Ready.
    code, out, err = await kubectl_pluginctl(env, "explain", "alpha")
    assert code == 0, out + err
    lines = out.splitlines()
    assert lines[0] == f"Workspace:      {namespace}/alpha (id alpha, template base)"
    assert "Phase:          Online" in lines
    assert "Ready:          True (InSync): 2/2 plugins installed" in out
    assert "Status:         of the current spec" in lines
    assert "Token Secret:   alpha-pluginctl-token" in lines
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("seo-all",
                                                                                "notes"))}
    assert rows["seo-all"][1:4] == ["WorkspaceTemplate", f"{namespace}/base", "spec.plugins[0]"]
    assert rows["notes"][1:5] == ["WorkspaceTemplate", f"{namespace}/base", "spec.plugins[1]",
                                  NOTES[1]]
    assert all(row[5] == "Installed" for row in rows.values()), out
    events = lines[lines.index("Events:") + 1:lines.index("Next pass:")]
    assert any(line.split()[:2] == ["Normal", "Installed"] for line in events), out
    assert lines[lines.index("Next pass:") + 1] == "  nothing to do"

    code, out, err = await kubectl_pluginctl(env, "explain", "beta", "-o", "json")
    assert code == 2, out + err
    beta = json.loads(out)
    assert beta["ready"] is False and beta["conditions"]["Stalled"]["reason"] == "Refused"
    assert {p["name"]: (p["state"], p["declared_by"]) for p in beta["plugins"]} == {
        "seo-all": ("Installed", f"WorkspaceTemplate {namespace}/base spec.plugins[0]"),
        "notes": ("Installed", f"WorkspaceTemplate {namespace}/base spec.plugins[1]"),
        "wild": ("Refused", f"Workspace {namespace}/beta spec.plugins[0]")}
    assert beta["next_pass"] and beta["next_pass"][0].startswith("refused wild: ")

    # status: one row per Workspace of the context's namespace.
    code, out, err = await kubectl_pluginctl(env, "status")
    assert code == 0, out + err
    table = [line.split()[:5] for line in out.splitlines()]
    assert table == [["WORKSPACE", "PHASE", "PLUGINS", "READY", "REASON"],
                     ["alpha", "Online", "2/2", "yes", "InSync"],
                     ["beta", "Online", "2/3", "no", "Refused"]], out
    code, out, err = await kubectl_pluginctl(env, "status", "-o", "json")
    assert code == 0, out + err
    assert [(w["name"], w["phase"], w["ready"]) for w in json.loads(out)["workspaces"]] == [
        ("alpha", "Online", True), ("beta", "Online", False)]

    # plan: only beta has something to do or wait for; exit 2.
    code, out, err = await kubectl_pluginctl(env, "plan")
    assert code == 2, out + err
    planned = [line for line in out.splitlines()[1:] if line.strip()]
    assert planned[0].split()[:3] == ["beta", "refused", "wild:"], out
    assert not any(row.startswith("alpha") for row in planned), out

    # reconcile --wait: the annotation is echoed; exit 0 when Ready, 2 when not.
    code, out, err = await kubectl_pluginctl(env, "reconcile", "alpha", "--wait")
    assert code == 0, out + err
    assert "handled after" in out and "Ready True (InSync)" in out, out
    annotated = get(plane, namespace, "ws", "alpha", "-o",
                    "jsonpath={.metadata.annotations.reconcile\\.pluginctl\\.dev/requestedAt}")
    assert annotated and annotated in out
    assert get(plane, namespace, "ws", "alpha", "-o",
               "jsonpath={.status.lastHandledReconcileAt}") == annotated
    code, out, err = await kubectl_pluginctl(env, "reconcile", "beta", "--wait")
    assert code == 2, out + err
    assert "not Ready" in out and "Refused" in out, out

    # -n before or after the command, over a kubeconfig whose namespace is `default`.
    admin = plugin_env(plane.kubeconfig)
    for args in (("-n", namespace, "explain", "alpha"), ("explain", "alpha", "-n", namespace)):
        code, out, err = await kubectl_pluginctl(admin, *args)
        assert code == 0 and out.startswith(f"Workspace:      {namespace}/alpha"), out + err

    # Clear errors: no such Workspace, no kubeconfig.
    code, out, err = await kubectl_pluginctl(env, "explain", "nope")
    assert (code, err.strip()) == (1, f"error: no Workspace nope in namespace {namespace}")
    code, out, err = await kubectl_pluginctl(env, "reconcile", "nope")
    assert (code, err.strip()) == (1, f"error: no Workspace nope in namespace {namespace}")
    code, out, err = await kubectl_pluginctl(plugin_env(tmp_path / "absent"), "status")
    assert code == 1 and err.startswith("error: no kubeconfig context to use"), out + err

    # With no operator running nothing echoes the request: exit 1 when the time runs out.
    operator.stop()
    code, out, err = await kubectl_pluginctl(env, "reconcile", "alpha", "--wait",
                                             "--timeout", "2s")
    assert code == 1 and "did not handle the request within 2s" in err, out + err


async def test_kubectl_pluginctl_says_when_the_crds_are_missing(
    plane: kube.ControlPlane, tmp_path: Path,
) -> None:
    """Removes the CRDs for a moment (the Kubernetes tests run one at a time), and puts them
    back whatever happens."""
    env = plugin_env(plane.kubeconfig)
    await asyncio.to_thread(plane.kubectl, "delete", "-f", str(ROOT / "crds"), timeout=120)
    try:
        for args in (("status",), ("explain", "alpha"), ("reconcile", "alpha", "--wait")):
            code, out, err = await kubectl_pluginctl(env, *args)
            assert code == 1 and err.startswith(
                "error: the pluginctl CRDs (Workspace, WorkspaceTemplate) are not installed"), \
                out + err
    finally:
        await asyncio.to_thread(kube.install_crds, plane)


# --- the CronJob example -----------------------------------------------------------------------

def test_reconcile_cronjob_example_is_admitted_and_least_privilege(
    plane: kube.ControlPlane, namespace: str, tmp_path: Path,
) -> None:
    documents = list(yaml.safe_load_all(CRONJOB.read_text()))
    by_kind = {d["kind"]: d for d in documents}
    assert set(by_kind) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "CronJob"}
    cronjob = by_kind["CronJob"]["spec"]
    assert cronjob["concurrencyPolicy"] == "Forbid"
    pod = cronjob["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:3] == ["reconcile", "--once", "--kubernetes"]
    assert {"name": "PLUGINCTL_DB", "valueFrom": {"secretKeyRef": {
        "name": "pluginctl-database", "key": "url"}}} in container["env"]
    assert pod["serviceAccountName"] == "pluginctl-reconcile"
    deployment = yaml.safe_load((ROOT / "manifests" / "base" / "deployment.yaml").read_text())
    controller = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"] == controller["securityContext"]
    assert container["securityContext"] == controller["containers"][0]["securityContext"]

    # The API server admits every object (the namespace must exist for a dry run).
    plane.kubectl("apply", "-f", str(ROOT / "manifests" / "base" / "namespace.yaml"))
    result = plane.kubectl("apply", "--dry-run=server", "-f", str(CRONJOB))
    for created in ("serviceaccount/pluginctl-reconcile",
                    "clusterrole.rbac.authorization.k8s.io/pluginctl-reconcile",
                    "clusterrolebinding.rbac.authorization.k8s.io/pluginctl-reconcile",
                    "cronjob.batch/pluginctl-reconcile"):
        assert f"{created} created (server dry run)" in result.stdout, result.stdout

    plane.kubectl("apply", "-f", str(CRONJOB))
    try:
        sa = "system:serviceaccount:pluginctl-system:pluginctl-reconcile"
        baseline = "system:serviceaccount:default:default"  # what any account may do
        granted = _can_i(plane, sa, namespace) - _can_i(plane, baseline, namespace)
        assert granted == {
            ("workspaces.pluginctl.dev", "list"), ("workspacetemplates.pluginctl.dev", "list"),
            ("workspaces.pluginctl.dev/status", "patch"),
            ("workspacetemplates.pluginctl.dev/status", "patch"),
            ("events", "create"),
            ("secrets", "list"), ("secrets", "create"), ("secrets", "patch"),
            ("secrets", "delete"),
        }, granted
        assert _can_i(plane, sa, "pluginctl-system") - _can_i(plane, baseline,
                                                              "pluginctl-system") == granted

        def can(*args: str) -> str:
            return plane.kubectl("auth", "can-i", f"--as={sa}", *args, check=False).stdout.strip()

        assert can("patch", "workspaces.pluginctl.dev", "--subresource=status",
                   "-n", namespace) == "yes"
        assert can("get", "secrets", "-n", namespace) == "no"  # list by label, never read one
        assert can("create", "leases.coordination.k8s.io", "-n", "pluginctl-system") == "no"

        # And enough: one-shot passes under the ServiceAccount write status and the token
        # Secret, and delete the Secret of a Workspace that is gone.
        token = plane.kubectl("create", "token", "pluginctl-reconcile", "-n",
                              "pluginctl-system", "--duration=1h").stdout.strip()
        kubeconfig = plane.kubeconfig_for_token(token, "pluginctl-reconcile")
        apply(plane, namespace, template("base", SEO), workspace("w"))
        db = f"sqlite:///{tmp_path / 'once.db'}"

        def once() -> None:
            result = subprocess.run(
                [sys.executable, "-m", "controller", "reconcile", "--once", "--kubernetes",
                 "--db", db], env=plane.env(kubeconfig), capture_output=True, text=True,
                timeout=120, check=False)
            assert result.returncode == 0, result.stdout + result.stderr

        once()
        assert "Unregistered" in get(plane, namespace, "ws", "w")
        assert token_of(plane, namespace, "w") is not None
        plane.kubectl("delete", "ws", "w", "-n", namespace)
        once()
        assert token_of(plane, namespace, "w") is None
    finally:
        plane.kubectl("delete", "-f", str(CRONJOB), "--wait=false", check=False)
