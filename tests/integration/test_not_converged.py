"""The fleet gauges after a real pass (engine/passes -> report -> metrics): a workspace the
blast-radius guard held, one backing off and one refused all count as drifted and stalled,
as `pluginctl status` shows them out of sync (issue 15, finding 1)."""

from __future__ import annotations

from controller.agent.simulated import Faults
from controller.domain.models import Policy
from controller.engine.metrics import Metrics
from controller.engine.queue import Request, Trigger
from controller.store import Sessions
from tests.support.helpers import (
    TEMPLATE,
    Registry,
    RuntimeFactory,
    desired_from,
    fleet,
    one_pass,
    workspace_yaml,
)

#: The template after a change: one more plugin on every workspace that uses it.
CHANGED = TEMPLATE.rstrip() + "\n    - source: local://plugins/calendar\n"
UNPINNED = {"plugins": [{"source": "gitea://org/repo/agent-skills/drafts"}]}


def gauges(metrics: Metrics) -> tuple[float | None, float | None]:
    registry = metrics.registry
    return (registry.get_sample_value("pluginctl_drifted_workspaces"),
            registry.get_sample_value("pluginctl_stalled_workspaces"))


async def test_a_guard_hold_on_a_template_change_counts_as_drifted_and_stalled(
    registry: Registry, runtime_factory: RuntimeFactory, sessions: Sessions, policy: Policy,
) -> None:
    for name in ("ws-1", "ws-2"):
        await (await runtime_factory(name)).register()
    first = await one_pass(fleet("ws-1", "ws-2"), sessions, policy)
    assert first.in_sync, first.summary()
    metrics = Metrics()
    metrics.observe_pass(first, Trigger.PERIODIC)
    assert gauges(metrics) == (0, 0)

    changed = desired_from(CHANGED, workspace_yaml("ws-1"), workspace_yaml("ws-2"))
    guarded = Policy(call_timeout=2.0, workspace_timeout=10.0, max_workspaces=1)
    held = await one_pass(changed, sessions, guarded, request=Request(trigger=Trigger.PERIODIC))
    assert held.guard is not None and held.guarded == 2 and not held.in_sync
    metrics.observe_pass(held, Trigger.PERIODIC)
    assert metrics.registry.get_sample_value("pluginctl_guard_holding") == 1
    assert gauges(metrics) == (2, 2)  # held: nothing done, nothing will be until fixed
    assert metrics.registry.get_sample_value("pluginctl_workspaces",
                                             {"phase": "Online"}) == 2


async def test_backing_off_and_refused_workspaces_count_as_drifted(
    registry: Registry, runtime_factory: RuntimeFactory, sessions: Sessions, policy: Policy,
) -> None:
    """ws-1 fails its install (then backs off), ws-2 declares an unpinned plugin (refused),
    ws-3 converges."""
    await (await runtime_factory("ws-1", faults=Faults(failing_plugins={"notes"}))).register()
    await (await runtime_factory("ws-2")).register()
    await (await runtime_factory("ws-3")).register()
    desired = desired_from(TEMPLATE, workspace_yaml("ws-1"),
                           workspace_yaml("ws-2", **UNPINNED), workspace_yaml("ws-3"))
    metrics = Metrics()
    metrics.observe_pass(await one_pass(desired, sessions, policy), Trigger.PERIODIC)
    # ws-1 and ws-2 installed something in this first pass: drifted, not stalled.
    assert gauges(metrics) == (2, 0)
    # The second pass restarts ws-1 and ws-2 for their installs (progress); the third finds
    # ws-1 backing off and ws-2 refused: no progress.
    for _ in range(2):
        again = await one_pass(desired, sessions, policy,
                               request=Request(trigger=Trigger.PERIODIC))
        metrics.observe_pass(again, Trigger.PERIODIC)
    assert not any(o.ok for r in again.results for o in r.outcomes), again.summary()
    assert gauges(metrics) == (2, 2)
