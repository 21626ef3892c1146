"""`pluginctl rollout status|resume|abort|promote` and `explain` as a person runs them, on a
rollout that a broken release halted at its first wave (real processes, runtimes on
loopback)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from controller.agent.simulated import Faults
from tests.support.helpers import RuntimeFactory, pluginctl, workspace_yaml
from tests.support.rollouts import IDS, order_of, template

pytestmark = pytest.mark.usefixtures("registry")


async def test_a_halted_rollout_told_by_status_and_explain_then_steered(
    db_url: str, runtime_factory: RuntimeFactory, tmp_path: Path
) -> None:
    faults = Faults(failing_plugins={"calendar"})
    runtimes = {w: await runtime_factory(w, faults=faults) for w in IDS}
    for runtime in runtimes.values():
        await runtime.register()
        runtime.start_heartbeats()  # online however long the CLI takes on a busy machine
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "workspaces.yaml").write_text("---\n".join(workspace_yaml(w) for w in IDS))
    (manifests / "template.yaml").write_text(template(bake=3600))
    source = ["--manifests", str(manifests), "--db", db_url]

    code, out, err = await pluginctl("reconcile", "--once", *source)
    assert code == 0, out + err
    code, out, _ = await pluginctl("rollout", "status", "base", *source)
    assert code == 0 and "Complete: every workspace on revision" in out, out

    (manifests / "template.yaml").write_text(template("local://plugins/calendar", bake=3600))
    first, later = order_of(template("local://plugins/calendar"))[:2]
    for _ in range(2):  # the first wave's install fails; the next pass halts the rollout
        await pluginctl("reconcile", "--once", *source)

    code, out, _ = await pluginctl("rollout", "status", "base", *source)
    assert code == 2, out
    assert "State:      Halted, wave 1 of 3 (10%)" in out
    assert f"{first}: install of calendar failed" in out
    assert "1 updated, 0 healthy, 1 failed, 9 on the previous revision" in out
    assert "pluginctl rollout resume default/base" in out
    code, out, _ = await pluginctl("rollout", "status", "default/base", *source, "-o", "json")
    summary = json.loads(out)
    assert code == 2 and summary["phase"] == "Halted" and summary["updated"] == 1
    assert summary["failed"][0]["workspace_id"] == first

    code, out, _ = await pluginctl("explain", later, *source)
    assert code == 0, out  # in sync with the revision it is held to
    assert "waits for wave 2 of the rollout" in out and "halted:" in out
    assert all("calendar" not in r.plugins for r in runtimes.values())

    faults.failing_plugins.clear()
    code, out, err = await pluginctl("rollout", "resume", "base", "--db", db_url)
    assert code == 0 and "resumed at wave 1" in out, out + err
    code, out, err = await pluginctl("rollout", "resume", "base", "--db", db_url)
    assert code == 1 and "not halted; nothing to resume" in err, err
    code, out, err = await pluginctl("rollout", "promote", "base", "--db", db_url)
    assert code == 0 and "promoted to every workspace" in out, out + err
    code, out, err = await pluginctl("reconcile", "--once", *source)
    assert all("calendar" in r.plugins for r in runtimes.values()), out + err
    code, out, _ = await pluginctl("rollout", "status", "base", *source)
    assert code == 0, out


async def test_unknown_template_and_bad_names_are_clear_errors(
    db_url: str, tmp_path: Path
) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "template.yaml").write_text(template())
    code, _, err = await pluginctl("rollout", "status", "nosuch", "--manifests",
                                   str(manifests), "--db", db_url)
    assert code == 1 and "no template default/nosuch" in err and "default/base" in err, err
    code, _, err = await pluginctl("rollout", "abort", "a/b/c", "--db", db_url)
    assert code == 1 and "give NAME or NAMESPACE/NAME" in err, err
    code, _, err = await pluginctl("rollout", "abort", "base", "--db", db_url)
    assert code == 1 and "no rollout on record" in err, err
