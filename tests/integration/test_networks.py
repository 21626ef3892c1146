"""Where the controller may call runtimes: link-local (cloud metadata) never; with
--runtime-networks only inside the allow-list — checked at register (IP literals) and at
every call (names, after resolving them), over real HTTP on loopback."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from controller.domain.networks import RuntimeNetworks
from controller.registry.app import make_app
from controller.registry.serving import start_site
from controller.registry.tokens import issue_token
from controller.runtime.driver import RuntimeCallError, RuntimeDriver
from controller.store import Sessions, transaction
from tests.support.helpers import seen_of

LOOPBACK_ONLY_ELSEWHERE = RuntimeNetworks.parse("10.0.0.0/8, fd00::/8")


def test_parse_and_refusals() -> None:
    assert RuntimeNetworks.parse("").allowed == ()
    assert RuntimeNetworks().refusal("127.0.0.1") is None  # no allow-list: local runs work
    assert RuntimeNetworks().refusal("10.1.2.3") is None
    for address in ("169.254.169.254", "fe80::1", "::ffff:169.254.169.254", "[fe80::1%eth0]"):
        assert "link-local" in (RuntimeNetworks().refusal(address) or ""), address
        assert "link-local" in (LOOPBACK_ONLY_ELSEWHERE.refusal(address) or ""), address
    assert LOOPBACK_ONLY_ELSEWHERE.refusal("10.200.0.1") is None
    assert LOOPBACK_ONLY_ELSEWHERE.refusal("fd00::5") is None
    assert "outside" in (LOOPBACK_ONLY_ELSEWHERE.refusal("127.0.0.1") or "")
    assert RuntimeNetworks().host_refusal("runtime.example") is None  # names: at call time
    with pytest.raises(ValueError, match=r"'10\.0\.0\.0/33' is not a network"):
        RuntimeNetworks.parse("10.0.0.0/8,10.0.0.0/33")


@pytest.fixture
async def runtime_port() -> AsyncIterator[int]:
    async def plugins(_request: web.Request) -> web.Response:
        return web.json_response({"plugins": []})

    app = web.Application()
    app.router.add_get("/plugins", plugins)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        yield await start_site(runner, "127.0.0.1", 0)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
async def test_the_driver_refuses_addresses_outside_the_allow_list(
    runtime_port: int, host: str
) -> None:
    url = f"http://{host}:{runtime_port}"
    async with RuntimeDriver(timeout=2) as driver:
        assert (await driver.list_plugins(url))[0] == []  # default: loopback is fine
    async with RuntimeDriver(timeout=2, networks=LOOPBACK_ONLY_ELSEWHERE) as driver:
        with pytest.raises(RuntimeCallError, match="outside the allowed runtime networks"):
            await driver.list_plugins(url)
    async with RuntimeDriver(timeout=2, networks=RuntimeNetworks.parse("127.0.0.0/8")) as driver:
        assert (await driver.list_plugins(url))[0] == []


async def test_the_registry_refuses_a_register_outside_the_allow_list(
    sessions: Sessions,
) -> None:
    server = TestServer(make_app(sessions, networks=LOOPBACK_ONLY_ELSEWHERE), host="127.0.0.1")
    await server.start_server()
    token = issue_token(sessions, "ws-1")
    try:
        async with aiohttp.ClientSession() as client:
            async def register(url: str) -> tuple[int, str]:
                async with client.post(server.make_url("/registry/register"), data=json.dumps(
                        {"workspace_id": "ws-1", "url": url}),
                        headers={"Authorization": f"Bearer {token}"}) as answer:
                    return answer.status, await answer.text()

            status, text = await register("http://127.0.0.1:9000/")
            assert status == 422 and "outside the allowed runtime networks" in text
            with transaction(sessions) as session:
                assert seen_of(session, "ws-1").url is None  # nothing written
            status, _ = await register("http://10.4.0.7:9000/")
            assert status == 200
            status, _ = await register("http://runtime.ws-1.svc:9000/")  # names: at call time
            assert status == 200
    finally:
        await server.close()
