"""The simulated fleet paces heartbeats as boxes do and says when they did not get through:
only a box the registry accepted heartbeats;
against a registry that never answers, each box has one heartbeat waiting and sends no other
meanwhile; every heartbeat due meanwhile is counted as not sent rather than dropped silently
(the Kubernetes bench reads this beside the writes of its steady passes)."""

from __future__ import annotations

import asyncio
import collections
import time

from aiohttp import web
from aiohttp.test_utils import TestServer

from controller.sim import fleet as fleet_mod


async def test_a_box_sends_no_heartbeat_while_its_last_is_unanswered() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def never_answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # keep the connection open, answer nothing

    server = await asyncio.start_server(never_answers, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    fleet = fleet_mod.Fleet()
    ids = [f"ws-{i}" for i in range(50)]
    registry = fleet.connect(f"http://127.0.0.1:{port}", {w: f"token-{w}" for w in ids})
    registry.registered.update(ids)  # as if accepted: this registry never answers a register
    try:
        registry.start_heartbeats(rate=2_000)  # each box due every 0.025 s
        deadline = time.monotonic() + 20
        while registry.tally.not_sent < 500 and time.monotonic() < deadline:
            assert registry.heartbeats_in_flight <= len(ids)
            await asyncio.sleep(0.05)
        assert registry.heartbeats_in_flight == len(ids)  # one waiting per box, no more
        assert len(accepted) == len(ids)  # (each on a connection of its own)
        assert registry.tally.not_sent >= 500
        assert registry.tally.to_json()["not_sent"] == registry.tally.not_sent
        assert sum(registry.tally.heartbeats.values()) == 0  # none was answered
    finally:
        await registry.close()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_only_boxes_the_registry_accepted_heartbeat() -> None:
    heard: collections.Counter[str] = collections.Counter()

    async def register(request: web.Request) -> web.Response:
        return web.json_response({}, status=200)

    async def heartbeat(request: web.Request) -> web.Response:
        heard[(await request.json())["workspace_id"]] += 1
        return web.json_response({}, status=200)

    app = web.Application()
    app.router.add_post("/registry/register", register)
    app.router.add_post("/registry/heartbeat", heartbeat)
    async with TestServer(app, host="127.0.0.1") as server:
        fleet = fleet_mod.Fleet()
        ids = [f"ws-{i}" for i in range(10)]
        registry = fleet.connect(str(server.make_url("")).rstrip("/"),
                                 {w: f"token-{w}" for w in ids})
        try:
            registry.start_heartbeats(rate=400)  # before any register, as the bench starts them
            assert await registry.register_all(ids[:5])
            deadline = time.monotonic() + 20
            while min(heard[w] for w in ids[:5]) < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert min(heard[w] for w in ids[:5]) >= 3  # every accepted box heartbeats
            assert set(heard) == set(ids[:5])  # and no other (each came due 40 times a second)
            assert registry.registered == set(ids[:5])
            # every answer is counted by how long its box waited, from when it was due
            assert sum(registry.tally.waited.values()) == sum(registry.tally.heartbeats.values())
            assert set(registry.tally.waited) <= {"0.1", "1", "5", "20", "longer"}
        finally:
            await registry.close()
