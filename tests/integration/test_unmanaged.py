"""`explain` and `status` of an unmanaged workspace (it registered and converged, then desired
state stopped declaring it) say what the loop really does with it: nothing — no calls, its
plugins left where they are (issue 15, finding 4). Through the CLI on a real store."""

from __future__ import annotations

import json
from pathlib import Path

from controller.domain.models import Policy
from controller.store import Sessions
from tests.support.helpers import (
    TEMPLATE,
    Registry,
    RuntimeFactory,
    fleet,
    one_pass,
    pluginctl,
    workspace_yaml,
)


async def test_explain_and_status_of_a_workspace_no_longer_declared(
    db_url: str, registry: Registry, runtime_factory: RuntimeFactory, sessions: Sessions,
    policy: Policy, tmp_path: Path,
) -> None:
    runtime = await runtime_factory("ws-1")
    await runtime.register()
    await one_pass(fleet("ws-1"), sessions, policy)
    await runtime.restarted()  # installed, restarted, registered again and reported
    assert (await one_pass(fleet("ws-1"), sessions, policy)).in_sync
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "fleet.yaml").write_text(TEMPLATE + "---\n" + workspace_yaml("ws-2"))
    source = ["--manifests", str(manifests), "--db", db_url]

    # What the loop does: a pass over the fleet leaves ws-1 alone.
    calls = len(runtime.calls)
    code, out, err = await pluginctl("reconcile", "--once", *source)
    assert code == 0, err + out
    assert len(runtime.calls) == calls and runtime.plugins.keys() == {"seo-all", "notes"}

    code, out, err = await pluginctl("explain", "ws-1", *source, "-o", "json")
    found = json.loads(out)
    assert found["phase"] == "Unmanaged", err
    assert found["registered_at"] is not None and found["url"] is not None
    plugins = {p["name"]: p for p in found["plugins"]}
    assert set(plugins) == {"seo-all", "notes"}
    for plugin in plugins.values():
        assert plugin["state"] == "LeftAlone", plugin
        assert plugin["owner"] == "pluginctl" and plugin["declared_by"] is None
    assert found["next_pass"] == ["nothing: no Workspace declares it, so no calls are made"]

    code, text, err = await pluginctl("explain", "ws-1", *source)
    assert "Registered:     never" not in text and "Removing" not in text, text
    assert "leaves its plugins alone" in text

    code, out, err = await pluginctl("status", *source, "-o", "json")
    assert code == 0, err
    (ws1,) = [w for w in json.loads(out)["workspaces"] if w["workspace_id"] == "ws-1"]
    assert ws1["phase"] == "Unmanaged" and ws1["drift"] == [], ws1
    assert {p["state"] for p in ws1["plugins"]} <= {"LeftAlone"}, ws1
