"""Rollout metrics through real passes (engine/rollouts -> passes -> runtimes on loopback), on
SQLite and PostgreSQL, with time under freezegun: each pass report feeds the metrics as the
loop's does (service.observed), and the page is scraped over real HTTP from the registry's
`/metrics`. A template's rollout shows its wave, the workspaces updated and healthy, and
halted; a template that leaves desired state takes its series with it; `promtool check
metrics` accepts the page, build info and all."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import AsyncIterator
from datetime import timedelta

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from freezegun import freeze_time

from controller.agent.simulated import Faults
from controller.domain.desired import Desired
from controller.domain.models import Policy
from controller.domain.version import python_version, version
from controller.engine import service
from controller.engine.metrics import Metrics
from controller.engine.queue import Trigger
from controller.registry.app import make_app
from controller.store import Sessions
from tests.support.helpers import (
    RuntimeFactory,
    Samples,
    desired_from,
    has_series,
    metric,
    one_pass,
    scrape,
    workspace_yaml,
)
from tests.support.rollouts import IDS, KEY, fleet_of, order_of, start, template

CALENDAR = "local://plugins/calendar"
POLICY = Policy(call_timeout=2.0, workspace_timeout=10.0, offline_after=timedelta(days=1))
ROLLOUT_SERIES = ("pluginctl_rollout_wave", "pluginctl_rollout_waves",
                  "pluginctl_rollout_halted", "pluginctl_rollout_workspaces",
                  "pluginctl_rollout_updated_workspaces", "pluginctl_rollout_healthy_workspaces")


class Scraped:
    """A process's metrics, fed every pass report the way the loop feeds them, and served at
    `/metrics` by a real registry app on loopback."""

    def __init__(self, sessions: Sessions, server: TestServer, metrics: Metrics) -> None:
        self.sessions = sessions
        self.server = server
        self.metrics = metrics
        self.after_pass, _ = service.observed(metrics)
        self.url = str(server.make_url("")).rstrip("/")

    async def full_pass(self, desired: Desired) -> Samples:
        report = await one_pass(desired, self.sessions, POLICY)
        self.after_pass(report, Trigger.PERIODIC)
        return await scrape(self.url)

    async def page(self) -> str:
        async with aiohttp.ClientSession() as client, \
                client.get(f"{self.url}/metrics") as answer:
            assert answer.status == 200
            return await answer.text()


@pytest.fixture
async def scraped(sessions: Sessions) -> AsyncIterator[Scraped]:
    metrics = Metrics()
    server = TestServer(make_app(sessions, metrics=metrics), host="127.0.0.1")
    await server.start_server()
    try:
        yield Scraped(sessions, server, metrics)
    finally:
        await server.close()


def rollout_of(samples: Samples, template_key: str = KEY) -> dict[str, float]:
    """Every rollout gauge of one template, by short name (`wave`, `halted`, `updated`, ...)."""
    found = {name.removeprefix("pluginctl_rollout_").removesuffix("_workspaces"):
             metric(samples, name, template=template_key) for name in ROLLOUT_SERIES
             if any(n == name and ("template", template_key) in labels
                    for n, labels in samples)}
    assert len(found) in (0, len(ROLLOUT_SERIES)), found
    return found


async def test_a_rollout_shows_its_wave_and_updated_and_healthy_workspaces(
    scraped: Scraped, runtime_factory: RuntimeFactory
) -> None:
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        await start(runtime_factory)
        samples = await scraped.full_pass(fleet_of(template()))  # first sight: stable
        assert rollout_of(samples) == {"wave": 0, "waves": 3, "halted": 0, "workspaces": 10,
                                       "updated": 0, "healthy": 0}

        after = fleet_of(template(CALENDAR))
        samples = await scraped.full_pass(after)  # wave 1 (10 %): installs on one
        assert rollout_of(samples) == {"wave": 1, "waves": 3, "halted": 0, "workspaces": 10,
                                       "updated": 1, "healthy": 0}
        await scraped.full_pass(after)  # restarts it for the install
        samples = await scraped.full_pass(after)  # judges it in sync: the bake starts
        assert (rollout_of(samples)["updated"], rollout_of(samples)["healthy"]) == (1, 1)

        clock.tick(61)
        samples = await scraped.full_pass(after)  # bake over: wave 2 (50 %) let through
        assert rollout_of(samples)["wave"] == 2 and rollout_of(samples)["updated"] == 5
        await scraped.full_pass(after)
        samples = await scraped.full_pass(after)
        assert rollout_of(samples)["healthy"] == 5

        for _ in range(4):  # wave 3, then its bake: complete
            clock.tick(61)
            samples = await scraped.full_pass(after)
    assert rollout_of(samples) == {"wave": 0, "waves": 3, "halted": 0, "workspaces": 10,
                                   "updated": 0, "healthy": 0}


async def test_a_halted_rollout_is_scraped_as_halted_and_a_removed_template_leaves_no_series(
    scraped: Scraped, runtime_factory: RuntimeFactory
) -> None:
    faults = Faults(failing_plugins={"calendar"})  # a broken release: every install fails
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True):
        await start(runtime_factory, faults)
        await scraped.full_pass(fleet_of(template()))
        after = fleet_of(template(CALENDAR))
        first = order_of(template(CALENDAR))[0]

        samples = await scraped.full_pass(after)  # the first wave's install fails
        assert rollout_of(samples) == {"wave": 1, "waves": 3, "halted": 0, "workspaces": 10,
                                       "updated": 1, "healthy": 0}
        samples = await scraped.full_pass(after)  # ... and its failure halts the rollout
        assert rollout_of(samples) == {"wave": 1, "waves": 3, "halted": 1, "workspaces": 10,
                                       "updated": 1, "healthy": 0}
        fleet = scraped.metrics.fleet
        assert fleet is not None and first in fleet.rollouts[0].rollout.message

        # The page as Prometheus reads it, rollout series and all, passes promtool's lint.
        page = await scraped.page()
        assert f'pluginctl_rollout_halted{{template="{KEY}"}} 1.0' in page
        assert metric(samples, "pluginctl_build_info", version=version(),
                      python=python_version()) == 1
        promtool = shutil.which("promtool")
        assert promtool, "promtool is not installed (Debian's `prometheus` package)"
        lint = subprocess.run([promtool, "check", "metrics"], input=page.encode(),
                              capture_output=True, timeout=30)
        assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()

        # An object that cannot be read may be the template: its series stay meanwhile.
        workspaces = [workspace_yaml(w) for w in IDS]
        unreadable = desired_from("[not, an, object]", *workspaces)
        assert unreadable.errors and KEY not in unreadable.templates
        samples = await scraped.full_pass(unreadable)
        assert rollout_of(samples)["halted"] == 1

        # The template is gone from a desired state read whole: so are its series.
        samples = await scraped.full_pass(desired_from(*workspaces))
    assert rollout_of(samples) == {}
    assert not any(has_series(samples, name) for name in ROLLOUT_SERIES)
    assert metric(samples, "pluginctl_fleet_reporter") == 1  # the fleet is still reported
