"""The soak in its CI profile, as a user runs it: `pluginctl soak` drives the controller (a
process of its own) with heartbeats and a schedule of faults, and fails unless everything
converged, nothing was lost, and the controller's memory stayed flat."""

from __future__ import annotations

import json

from tests.support.helpers import pluginctl


async def test_soak_ci_profile_passes() -> None:
    code, out, err = await pluginctl("soak", "--profile", "ci", "--json", timeout=900)
    figures = json.loads(out)
    assert code == 0, (figures, err[-3000:])
    assert figures["passed"] and all(figures["checks"].values())
    assert figures["registrations_lost"] == 0 and figures["converged"] == figures["workspaces"]
    assert figures["heartbeat_answers"].get("200", 0) > 0
    assert set(figures["bad_input_answers"]) <= {"400", "401", "403", "413", "422"}
    assert len(figures["faults"]) >= 7  # every kind of fault came round at least once
