"""The registry's time and connection limits over real sockets on loopback: a flood of
slow or idle clients is cut off on time and never stops the others from being served."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web

from controller.domain.models import Plugin
from controller.registry.app import INGEST, make_app
from controller.registry.serving import GUARD, Limits, runner_for, start_site
from controller.registry.tokens import issue_token
from controller.store import Sessions
from tests.support.helpers import wait_for

LIMITS = Limits(head_seconds=1.0, body_seconds=1.0, handler_seconds=2.0,
                keepalive_seconds=2.0, max_connections=150)


@dataclass
class Live:
    app: web.Application
    port: int
    token: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
async def live(sessions: Sessions) -> AsyncIterator[Live]:
    app = make_app(sessions, limits=LIMITS)
    runner = runner_for(app)
    await runner.setup()
    port = await start_site(runner, "127.0.0.1", 0)
    token = issue_token(sessions, "ws-1")
    live = Live(app, port, token)
    async with aiohttp.ClientSession() as client, client.post(
            f"{live.url}/registry/register", headers=auth(token),
            json={"workspace_id": "ws-1", "url": "http://127.0.0.1:9"}) as response:
        assert response.status == 200
    try:
        yield live
    finally:
        await runner.cleanup()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def heartbeat(client: aiohttp.ClientSession, live: Live) -> int:
    async with client.post(f"{live.url}/registry/heartbeat", headers=auth(live.token),
                           json={"workspace_id": "ws-1"}) as response:
        return response.status


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    data = b""
    try:
        while chunk := await reader.read(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def test_a_slow_head_flood_is_cut_off_and_never_stops_heartbeats(live: Live) -> None:
    head = b"POST /registry/heartbeat HTTP/1.1\r\nHost: x\r\n"
    slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = [
        await asyncio.open_connection("127.0.0.1", live.port) for _ in range(100)]
    stop = asyncio.Event()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        for byte in head + b"X-Slow: " + b"a" * 10_000:
            if stop.is_set() or writer.is_closing():
                return
            writer.write(bytes([byte]))
            try:
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(0.1)

    trickles = [asyncio.create_task(trickle(writer)) for _, writer in slow]
    answers = [asyncio.create_task(read_until_closed(reader)) for reader, _ in slow]
    try:
        # While the flood holds 100 connections open, every heartbeat is answered.
        async with aiohttp.ClientSession() as client:
            statuses = [await heartbeat(client, live) for _ in range(30)]
            statuses += await asyncio.gather(*(heartbeat(client, live) for _ in range(30)))
        assert statuses == [200] * 60
        # Each slow client is answered 408 and closed once its head takes too long.
        replies = await asyncio.wait_for(asyncio.gather(*answers), 15)
        assert all(reply.startswith(b"HTTP/1.1 408 ") for reply in replies)
        assert live.app[GUARD].timed_out >= 100
    finally:
        stop.set()
        await asyncio.gather(*trickles, return_exceptions=True)
        for _, writer in slow:
            writer.close()


async def test_connections_beyond_the_limit_are_closed_and_slots_come_back(live: Live) -> None:
    guard = live.app[GUARD]
    idle = [await asyncio.open_connection("127.0.0.1", live.port)
            for _ in range(LIMITS.max_connections)]
    await wait_for(lambda: len(guard.open) == LIMITS.max_connections, "all accepted")
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await asyncio.wait_for(read_until_closed(reader), 10) == b""  # closed unanswered
    assert guard.refused >= 1
    writer.close()
    # Idle connections are closed after keepalive_seconds; then the registry serves again.
    await wait_for(lambda: not guard.open, "idle connections closed", timeout=15)
    for idle_reader, _ in idle:
        assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    async with aiohttp.ClientSession() as client:
        assert await heartbeat(client, live) == 200
    for _, idle_writer in idle:
        idle_writer.close()


async def test_a_slow_body_gets_408_and_a_stuck_store_503(live: Live) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    writer.write(b"POST /registry/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                 + live.token.encode() + b"\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 100\r\n\r\n{\"workspace_id\"")
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(4096), 10)
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1]) == {
        "error": "body not received within 1s"}
    writer.close()

    async def stuck(*_args: object) -> bool:
        await asyncio.Event().wait()
        return True

    live.app[INGEST].heartbeat = stuck  # type: ignore[method-assign,assignment]
    async with aiohttp.ClientSession() as client, client.post(
            f"{live.url}/registry/heartbeat", headers=auth(live.token),
            json={"workspace_id": "ws-1"}) as response:
        assert response.status == 503
        assert "not answered within 2s" in (await response.json())["error"]


async def test_the_guarded_site_is_started_and_stopped_by_the_runner(sessions: Sessions) -> None:
    """The guard sits on aiohttp's public API only: the runner's `server` is a factory of
    plain asyncio protocols (the guard forwards their callbacks, not a BufferedProtocol's),
    and the guarded site is a BaseSite the runner knows, so that cleanup() stops listening."""
    app = make_app(sessions, limits=LIMITS)
    runner = runner_for(app)
    await runner.setup()
    assert runner.server is not None
    protocol = runner.server()
    assert isinstance(protocol, asyncio.Protocol)
    assert not isinstance(protocol, asyncio.BufferedProtocol)
    port = await start_site(runner, "127.0.0.1", 0)
    try:
        assert [site.name for site in runner.sites] == [f"http://127.0.0.1:{port}"]
        async with aiohttp.ClientSession() as client:
            async with client.get(f"http://127.0.0.1:{port}/healthz") as response:
                assert response.status == 200
            assert len(app[GUARD].open) == 1  # the client's keep-alive connection, guarded
    finally:
        await runner.cleanup()
    assert not runner.sites and not app[GUARD].open
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_a_slow_head_after_served_requests_on_the_same_connection_is_cut_off(
        live: Live) -> None:
    """The head clock is per connection and lazy (no timer per request): a keep-alive
    connection whose requests were served quickly still gets its 408 when a later head
    trickles in, and a request served in between is never cut off."""
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    request = (b"POST /registry/heartbeat HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
               + live.token.encode() + b"\r\nContent-Type: application/json\r\n"
               b"Content-Length: 23\r\n\r\n{\"workspace_id\":\"ws-1\"}")
    for _ in range(3):
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        await reader.readexactly(length)
    writer.write(b"POST /registry/heartbeat HTTP/1.1\r\nHost: x\r\n")  # and nothing more
    await writer.drain()
    reply = await asyncio.wait_for(read_until_closed(reader), 10)
    assert reply.startswith(b"HTTP/1.1 408 ")
    writer.close()


async def test_the_handler_deadline_cancels_only_the_late_request(live: Live) -> None:
    """One timer holds every request to handler_seconds: the stuck one is answered 503,
    the ones served meanwhile 200, and a request after it is served again."""
    ingest = live.app[INGEST]
    served = ingest.heartbeat
    stuck_ids = {"ws-1"}
    token_two = issue_token(ingest.sessions, "ws-2")
    async with aiohttp.ClientSession() as client, client.post(
            f"{live.url}/registry/register", headers=auth(token_two),
            json={"workspace_id": "ws-2", "url": "http://127.0.0.1:9"}) as response:
        assert response.status == 200

    def maybe_stuck(workspace_id: str, report: list[Plugin] | None, seq: int | None = None,
                    error: str | None = None) -> asyncio.Future[bool]:
        if workspace_id in stuck_ids:
            return asyncio.get_running_loop().create_future()  # never answered
        return served(workspace_id, report, seq, error)

    ingest.heartbeat = maybe_stuck  # type: ignore[method-assign]

    async def beat(client: aiohttp.ClientSession, token: str, workspace_id: str) -> int:
        async with client.post(f"{live.url}/registry/heartbeat", headers=auth(token),
                               json={"workspace_id": workspace_id}) as response:
            return response.status

    async with aiohttp.ClientSession() as client:
        late = asyncio.create_task(beat(client, live.token, "ws-1"))
        others = [await beat(client, token_two, "ws-2") for _ in range(5)]
        assert await late == 503
        assert others == [200] * 5
    stuck_ids.clear()
    # On a connection of its own: the others' connection has been idle for about
    # keepalive_seconds (= handler_seconds here) by now, and the server may be closing it
    # just as a pooled client would reuse it (a reset that says nothing about the deadline).
    async with aiohttp.ClientSession() as client:
        assert await beat(client, live.token, "ws-1") == 200
