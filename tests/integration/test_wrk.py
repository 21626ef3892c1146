"""The bench's wrk driver (controller.sim.wrk) against a real server on loopback: every
request carries one of the prepared tokens with its own body, the rotation covers them all,
and the figures parsed from wrk's output agree with what the server saw."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from aiohttp import web

from controller.registry.serving import runner_for, start_site
from controller.sim import wrk

PAIRS = [wrk.Pair(f"plc_test_ws-{i}", json.dumps({"workspace_id": f"ws-{i}"}).encode())
         for i in range(5)]


@pytest.fixture(autouse=True)
def wrk_installed() -> None:
    if wrk.available() is None:
        pytest.fail("wrk is not on PATH: install Debian's `wrk` (bash .ci/run does)",
                    pytrace=False)


async def test_wrk_sends_each_token_with_its_body_in_turn_and_its_figures_parse() -> None:
    seen: Counter[str] = Counter()
    mismatched: list[tuple[str, bytes]] = []
    expected = {f"Bearer {pair.token}": pair.body for pair in PAIRS}

    async def heartbeat(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        body = await request.read()
        if expected.get(authorization) != body or \
                request.headers.get("Content-Type") != "application/json":
            mismatched.append((authorization, body))
            return web.json_response({"error": "mismatch"}, status=400)
        seen[authorization] += 1
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/registry/heartbeat", heartbeat)
    runner = runner_for(app)
    await runner.setup()
    try:
        port = await start_site(runner, "127.0.0.1", 0)
        figures = await wrk.measure(f"http://127.0.0.1:{port}/registry/heartbeat", PAIRS,
                                    wrk.Load(seconds=1, connections=4))
    finally:
        await runner.cleanup()

    assert not mismatched, mismatched[:3]
    assert set(seen) == set(expected)  # the rotation went round every workspace
    answered = sum(seen.values())
    assert figures["errors"] == figures["non_2xx"] == 0
    # wrk counts what it received before its time was up; a request in flight then was
    # answered by the server but not counted (at most one per connection).
    assert figures["requests"] <= answered <= figures["requests"] + 4
    assert figures["seconds"] >= 1.0
    assert figures["requests_per_second"] == pytest.approx(
        figures["requests"] / figures["seconds"], rel=0.01)
    assert 0 < figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]


async def test_a_refused_request_is_counted_as_an_error() -> None:
    async def refuse(_request: web.Request) -> web.Response:
        return web.json_response({"error": "no"}, status=401)

    app = web.Application()
    app.router.add_post("/registry/heartbeat", refuse)
    runner = runner_for(app)
    await runner.setup()
    try:
        port = await start_site(runner, "127.0.0.1", 0)
        figures = await wrk.measure(f"http://127.0.0.1:{port}/registry/heartbeat", PAIRS[:1],
                                    wrk.Load(seconds=1, connections=2))
    finally:
        await runner.cleanup()
    assert figures["requests"] > 0
    assert figures["errors"] == figures["non_2xx"] == figures["requests"]

