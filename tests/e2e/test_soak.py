"""The soak at a small size, as a user runs it: `pluginctl soak` drives the controller (a
process of its own) with the simulated fleet's heartbeats and one round of every fault, and
fails unless everything converged, nothing was lost, the controller's own metrics agree and
its memory stayed flat. (The machinery, not the endurance: the README keeps the figures of
the full profile.) And the soak's checks do fail on a run that went wrong."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from controller.sim.soak import FAULTS, Fault, Profile, Tally, checks
from tests.support.helpers import pluginctl

WORKSPACES = 30
BAD_INPUTS = 13  # soak._bad_requests
DECLARED = 4  # the template's 3 plugins and the one added halfway


async def test_soak_small_profile_passes_with_consistent_figures() -> None:
    # 13 s of 2 s faults: one round of the seven, each exactly once.
    code, out, err = await pluginctl(
        "soak", "--workspaces", str(WORKSPACES), "--rate", "60", "--seconds", "13",
        "--cycle", "2", "--json", timeout=300)
    assert out, err[-3000:]
    figures = json.loads(out)
    assert code == 0, (figures, err[-3000:])
    assert figures["passed"] and all(figures["checks"].values())
    # What was simulated, read back from the soak's three witnesses: the fleet, the store
    # and the controller's /metrics.
    assert figures["faults"] == [fault.value for fault in FAULTS]
    assert figures["template_changed"] and figures["declared_plugins"] == DECLARED
    assert (figures["converged"] == figures["registered"] == figures["recorded_in_sync"]
            == figures["online_workspaces"] == WORKSPACES)
    assert figures["registrations_lost"] == 0 and figures["drifted_workspaces"] == 0
    assert figures["failed_actions"] > 0  # the runtime faults really hit the controller
    assert figures["heartbeats_lost_on_purpose"] > 0  # and heartbeats really went missing
    # Every box got every declared plugin, some twice (re-created boxes), and each install
    # the controller counted as done is one the fleet saw.
    assert figures["installs_seen_by_runtimes"] >= figures["installs_ok"] > (
        WORKSPACES * DECLARED)
    answered = figures["heartbeat_answers"]["200"]
    assert 0 < answered <= figures["heartbeats_counted_by_registry"]["200"]
    assert figures["bad_inputs"] == BAD_INPUTS
    assert set(figures["bad_input_answers"]) <= {"400", "401", "403", "413", "422"}
    assert figures["slow_clients"] == 100
    assert figures["rss_growth"] < 0.10


def good_run() -> tuple[dict[str, Any], Tally]:
    """The figures and tally of a small soak that went well."""
    tally = Tally(bad_inputs=Counter({400: 1, 401: 2, 403: 1, 413: 1, 422: 8}),
                  slow_clients=100, faults=list(FAULTS), template_changed=True)
    figures = {"workspaces": WORKSPACES, "converged": WORKSPACES,
               "recorded_in_sync": WORKSPACES, "registered": WORKSPACES,
               "online_workspaces": WORKSPACES, "drifted_workspaces": 0, "failed_actions": 9,
               "installs_seen_by_runtimes": 130, "installs_ok": 129, "declared_plugins": 4,
               "heartbeat_answers": {"200": 800}, "heartbeats_counted_by_registry": {"200": 800},
               "rss_growth": 0.02}
    return figures, tally


PROFILE = Profile(WORKSPACES, 60.0, 13.0, 2.0)


def test_the_checks_pass_a_good_run() -> None:
    figures, tally = good_run()
    assert all(checks(figures, tally, PROFILE, running=True).values())


@pytest.mark.parametrize(("change", "failed"), [
    ({"converged": WORKSPACES - 1}, "every workspace converged"),
    ({"registered": WORKSPACES - 1}, "no registration lost"),
    ({"drifted_workspaces": 1}, "the controller reports all online, none drifted"),
    ({"failed_actions": 0}, "runtime faults were felt (failed actions)"),
    ({"installs_ok": 131}, "every install the controller counted reached a box"),
    ({"installs_ok": 100, "installs_seen_by_runtimes": 100},
     "every install the controller counted reached a box"),
    ({"heartbeats_counted_by_registry": {"200": 799}},
     "the registry counted every heartbeat it answered 200"),
    ({"heartbeat_answers": {"409": 800}},
     "the registry counted every heartbeat it answered 200"),
    ({"rss_growth": 0.2}, "RSS grew less than 10%"),
])
def test_the_checks_fail_a_bad_run(change: dict[str, Any], failed: str) -> None:
    figures, tally = good_run()
    figures.update(change)
    result = checks(figures, tally, PROFILE, running=True)
    assert [name for name, ok in result.items() if not ok] == [failed]


def test_the_checks_fail_a_run_that_skipped_faults_or_let_bad_input_through() -> None:
    figures, tally = good_run()
    tally.faults = [fault for fault in FAULTS if fault is not Fault.RUNTIME_HANG]
    assert not checks(figures, tally, PROFILE, running=True)["every fault came round"]
    figures, tally = good_run()
    tally.bad_inputs[422] -= 1
    tally.bad_inputs[200] += 1  # as many answers, one of them a 200
    assert not checks(figures, tally, PROFILE, running=True)["every bad input refused with a 4xx"]
    figures, tally = good_run()
    assert not checks(figures, tally, PROFILE, running=False)["controller still running"]
