"""A declared plugin the policy refuses (an unpinned source) is logged at warning once per
(workspace, plugin, reason) change, not every pass (issue 15, finding 6): real passes on a
real store, their reports fed to what the loop calls after each pass (service.observed)."""

from __future__ import annotations

import logging

import pytest

from controller.domain.desired import Desired
from controller.domain.models import Policy
from controller.engine import service
from controller.engine.metrics import Metrics
from controller.engine.queue import Request, Trigger
from controller.store import Sessions
from tests.support.helpers import (
    TEMPLATE,
    Registry,
    RuntimeFactory,
    desired_from,
    one_pass,
    workspace_yaml,
)

UNPINNED = "gitea://org/repo/agent-skills/drafts"


def declaring(**sources: str) -> Desired:
    return desired_from(TEMPLATE, *(workspace_yaml(name, plugins=[{"source": source}])
                                    for name, source in sources.items()))


def refusals(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(workspace, plugin) of each refusal logged since the last call."""
    found = [(r.workspace, r.plugin) for r in caplog.records  # type: ignore[attr-defined]
             if getattr(r, "result", None) == "refused" and r.levelno == logging.WARNING]
    caplog.clear()
    return found


async def test_a_refused_plugin_is_logged_once_per_change(
    registry: Registry, runtime_factory: RuntimeFactory, sessions: Sessions, policy: Policy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name in ("ws-1", "ws-2"):
        await (await runtime_factory(name)).register()
    after_pass, _ = service.observed(Metrics(), on_pass=lambda _report, _trigger: None)
    periodic = Request(trigger=Trigger.PERIODIC)
    caplog.set_level(logging.INFO)

    async def run(desired: Desired) -> list[tuple[str, str]]:
        report = await one_pass(desired, sessions, policy, request=periodic)
        after_pass(report, Trigger.PERIODIC)
        return refusals(caplog)

    assert await run(declaring(**{"ws-1": UNPINNED, "ws-2": UNPINNED})) == [
        ("ws-1", "drafts"), ("ws-2", "drafts")]
    assert await run(declaring(**{"ws-1": UNPINNED, "ws-2": UNPINNED})) == []  # no news
    assert await run(declaring(**{"ws-1": UNPINNED, "ws-2": UNPINNED})) == []
    # ws-1 now names a moving ref: refused for another reason.
    assert await run(declaring(**{"ws-1": UNPINNED + "#main", "ws-2": UNPINNED})) == [
        ("ws-1", "drafts")]
    # ws-1 pinned: nothing refused there; unpinned again later: logged again.
    assert await run(declaring(**{"ws-1": UNPINNED + "#v2", "ws-2": UNPINNED})) == []
    assert await run(declaring(**{"ws-1": UNPINNED, "ws-2": UNPINNED})) == [("ws-1", "drafts")]
    assert await run(declaring(**{"ws-1": UNPINNED, "ws-2": UNPINNED})) == []
