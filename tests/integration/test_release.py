"""Which build is running, as the parts it talks to see it (issue 17): the User-Agent of real
calls to a reference runtime and `/healthz`'s answer over real HTTP carry the package version."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import version as installed_version
from pathlib import Path

import aiohttp
from aiohttp.test_utils import TestServer

from controller.domain.models import Policy
from controller.engine.passes import reconcile_once
from controller.registry.app import make_app
from controller.runtime.driver import RuntimeDriver
from controller.store import Sessions, make_engine, make_sessions, upgrade
from tests.support.helpers import NOTES, SEO, RuntimeFactory, fleet, has, one_pass

VERSION = installed_version("pluginctl")


async def test_runtime_calls_carry_the_version_and_the_calling_replica(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    runtime = await runtime_factory("ws-1", report=False)
    await runtime.register()

    await one_pass(fleet("ws-1"), sessions, policy)  # a one-shot pass names no replica
    assert has(runtime, SEO, NOTES)
    assert {call.user_agent for call in runtime.calls} == {f"pluginctl/{VERSION}"}

    runtime.calls.clear()
    runtime.plugins.clear()  # the box was re-created: the next pass installs again
    async with RuntimeDriver.for_policy(policy, "replica-a") as driver:
        await reconcile_once(fleet("ws-1"), sessions, driver, policy, replica="replica-a")
    assert has(runtime, SEO, NOTES)
    assert {(call.method, call.user_agent) for call in runtime.calls} >= {
        ("GET", f"pluginctl/{VERSION} (replica-a)"), ("PUT", f"pluginctl/{VERSION} (replica-a)")}
    assert {call.user_agent for call in runtime.calls} == {f"pluginctl/{VERSION} (replica-a)"}


@asynccontextmanager
async def serving(url: str) -> AsyncIterator[str]:
    """A registry on loopback over a fresh database; its base URL."""
    engine = make_engine(url)
    upgrade(engine)
    server = TestServer(make_app(make_sessions(engine)), host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url(""))
    finally:
        await server.close()
        engine.dispose()


async def test_healthz_says_which_version_serves(tmp_path: Path) -> None:
    async with (serving(f"sqlite:///{tmp_path / 'pluginctl.db'}") as base,
                aiohttp.ClientSession() as client, client.get(f"{base}/healthz") as answer):
        assert answer.status == 200
        assert answer.content_type == "application/json"
        assert await answer.json() == {"status": "ok", "version": VERSION}
