"""The pure parts of `kubectl pluginctl`: what the next pass has to do, read from a Workspace's
status and the spec as it is now, and kubectl-style durations."""

from __future__ import annotations

from typing import Any

import click
import pytest
from freezegun import freeze_time

from controller.cli.kubectl import desired_of, duration, pending, workspace_view

NS = "team"


def template(*plugins: tuple[str, str], generation: int = 1) -> dict[str, Any]:
    return {"apiVersion": "pluginctl.dev/v1alpha1", "kind": "WorkspaceTemplate",
            "metadata": {"name": "base", "namespace": NS, "generation": generation},
            "spec": {"plugins": [{"name": n, "source": s} for n, s in plugins]}}


def workspace(phase: str | None, *plugins: dict[str, Any], generation: int = 1,
              observed: int = 1, ready: tuple[str, str, str] = ("False", "Progressing", ""),
              ) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "pluginctl.dev/v1alpha1", "kind": "Workspace",
        "metadata": {"name": "w", "namespace": NS, "generation": generation},
        "spec": {"templateRef": {"name": "base"}}}
    if phase is not None:
        obj["status"] = {"phase": phase, "observedGeneration": observed,
                         "plugins": list(plugins), "conditions": [
                             {"type": "Ready", "status": ready[0], "reason": ready[1],
                              "message": ready[2]},
                             {"type": "Stalled", "status": "True" if phase == "Invalid"
                              else "False", "reason": ready[1], "message": ready[2]}]}
    return obj


def plugin(name: str, source: str, state: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "source": source, "state": state, "message": "", **extra}


A, B = ("a", "local://p/a"), ("b", "gitea://org/repo/b#v1")


def lines_for(tmpl: dict[str, Any], ws: dict[str, Any]) -> list[str]:
    view = workspace_view(ws)
    return pending(view, desired_of([tmpl, ws])(view))


@freeze_time("2026-12-01T10:00:00Z")
def test_pending_reads_each_plugin_state_and_the_spec_changed_since() -> None:
    assert lines_for(template(A, B), workspace(
        "Online", plugin(*A, "Installed"), plugin(*B, "Installed"),
        ready=("True", "InSync", "2/2"))) == []
    assert lines_for(template(A, B), workspace(
        "Online", plugin(*A, "Pending"),
        plugin(*B, "Failed", message="HTTP 500", attempts=3,
               nextRetryAt="2026-12-01T10:00:30Z"),
        plugin("old", "local://p/old", "Removing"))) == [
        "install a from local://p/a",
        "retry b in 30s (failed 3x): HTTP 500",
        "remove old: installed by pluginctl, no longer declared"]
    # The template changed after the status was written: a new source, a new plugin, one gone.
    assert lines_for(template(("a", "local://p/a2"), ("c", "local://p/c"), generation=2),
                     workspace("Online", plugin(*A, "Installed"), plugin(*B, "Installed"),
                               ready=("True", "InSync", "2/2"))) == [
        "install a from local://p/a2 (was local://p/a)",
        "remove b if pluginctl installed it: no longer declared",
        "install c from local://p/c (declared since the last pass)"]
    assert lines_for(template(A), workspace(
        "Online", plugin(*A, "Installed"), generation=3, observed=2,
        ready=("False", "RestartPending", "1/1"))) == [
        "plan the new spec: generation 3, the status is of generation 2",
        "restart the runtime (an install asked for it)"]


def test_pending_leaves_workspaces_the_loop_makes_no_calls_to() -> None:
    for phase in ("Suspended", "Dormant", "Unregistered", "Offline"):
        assert lines_for(template(A), workspace(phase, plugin(*A, "Pending"))) == []
    gone = template(A)
    gone["metadata"]["name"] = "other"
    (line,) = lines_for(gone, workspace("Online", plugin(*A, "Installed")))
    assert line.startswith("nothing: the spec is invalid now (template team/base not found)") and \
        line.endswith("the next pass marks it Invalid and makes no calls"), line
    assert lines_for(template(A), workspace(None)) == [
        "nothing known yet: the operator has written no status (is it running?)"]
    assert lines_for(template(A), workspace(
        "Invalid", ready=("False", "TemplateNotFound", "no template base"))) == [
        "nothing: invalid desired state: True (TemplateNotFound): no template base"]


@pytest.mark.parametrize(("text", "seconds"), [
    ("60", 60), ("60s", 60), ("2m", 120), ("1m30s", 90), ("1h", 3600), ("0.5s", 0.5)])
def test_duration(text: str, seconds: float) -> None:
    assert duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "soon", "5d", "-1s", "1s2m"])
def test_duration_refuses(text: str) -> None:
    with pytest.raises(click.BadParameter):
        duration(text)
