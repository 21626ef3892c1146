"""The benches' own tools: what a Workspace status write changed (the Kubernetes bench's
account of writes at steady state), and the scratch directory kept when a bench fails."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from controller.cli.tools import scratch_directory
from controller.sim.kube_bench import ReadyWatch, status_changes, status_said


def _status(phase: str, ready: str, states: list[str], message: str = "") -> dict[str, object]:
    return {"phase": phase, "pluginsReady": ready,
            "conditions": [{"type": "Ready", "status": "True" if phase == "Ready" else "False",
                            "reason": phase, "message": message}],
            "plugins": [{"name": f"p{i}", "state": s, "message": message}
                        for i, s in enumerate(states)]}


def _workspace(name: str, status: dict[str, object]) -> dict[str, object]:
    return {"metadata": {"name": name}, "status": status}


def test_status_said_is_flat_and_counts_plugin_states() -> None:
    said = status_said(_status("Ready", "3/3", ["installed", "installed", "pending"]))
    assert said == {"phase": "Ready", "pluginsReady": "3/3",
                    "condition Ready": "True (Ready)", "plugins": "installedx2 pendingx1"}
    assert status_said({}) == {"phase": "None", "pluginsReady": "None", "plugins": ""}


def test_status_changes_names_each_field_that_changed() -> None:
    before = status_said(_status("Ready", "3/3", ["installed"] * 3))
    after = status_said(_status("Offline", "3/3", ["installed"] * 3))
    assert status_changes(before, after) == [
        "condition Ready: True (Ready) -> False (Offline)", "phase: Ready -> Offline"]
    assert status_changes(before, before) == []


def test_ready_watch_counts_changes_only_while_recording() -> None:
    watch = ReadyWatch(api=None, count=2)  # type: ignore[arg-type]  # no I/O in _update
    ready = _status("Ready", "3/3", ["installed"] * 3)
    watch._update(_workspace("a", ready))
    watch._update(_workspace("b", ready))
    watch._update(_workspace("a", _status("Offline", "3/3", ["installed"] * 3)))  # not yet
    watch.record()
    watch._update(_workspace("a", ready))
    watch._update(_workspace("b", _status("Ready", "3/3", ["installed"] * 3, message="x")))
    watch._update(_workspace("c", ready))  # first seen: nothing to compare with
    assert watch.recorded() == {
        "condition Ready: False (Offline) -> True (Ready)": 1, "phase: Offline -> Ready": 1,
        "none of these (a message, a time or attempts)": 1}
    watch._update(_workspace("a", _status("Offline", "3/3", ["installed"] * 3)))
    assert watch.recorded() == {}  # recording stopped


def test_scratch_directory_is_removed_after_success(capsys: pytest.CaptureFixture[str]
                                                    ) -> None:
    with scratch_directory("pluginctl-test-") as scratch:
        (scratch / "operator.log").write_text("fine")
    assert not scratch.exists()
    assert capsys.readouterr().err == ""


def test_scratch_directory_is_kept_and_named_after_failure(
        capsys: pytest.CaptureFixture[str]) -> None:
    kept: Path | None = None
    with pytest.raises(click.ClickException), scratch_directory("pluginctl-test-") as scratch:
        kept = scratch
        (scratch / "operator.log").write_text("what went wrong")
        raise click.ClickException("gave up")
    assert kept is not None
    try:
        assert (kept / "operator.log").read_text() == "what went wrong"
        assert f"its databases and logs are kept in {kept}" in capsys.readouterr().err
    finally:
        import shutil
        shutil.rmtree(kept)
