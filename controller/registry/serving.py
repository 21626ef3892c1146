"""Small helpers for the aiohttp servers pluginctl runs (the registry, the reference runtime),
and the connection limits that let the registry outlast slow or idle clients: a request head
must arrive within `head_seconds` of its first byte (else 408 and the connection is closed),
an idle connection is closed after `keepalive_seconds`, connections beyond
`max_connections` are closed as soon as they are accepted, and a handler still running
`handler_seconds` after it began is cancelled (`Deadlines`). The clocks cost a heartbeat
nothing but a note of the time: one timer per connection and one for all requests.

Only aiohttp's public API is used: the runner's `server` is its documented low-level
`web.Server`, "a protocol factory compatible with create_server()", whose protocols the
guard wraps; the guarded site is a `web.BaseSite` that keeps its own listening server; the
keep-alive limit is AppRunner's `keepalive_timeout`."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web


@dataclass(frozen=True, slots=True)
class Limits:
    """Time and size limits of a server (documented in the README with these defaults)."""

    head_seconds: float = 10.0  # first byte of a request -> its last header line
    body_seconds: float = 10.0  # headers -> the whole body (registry: 408 after)
    handler_seconds: float = 30.0  # a whole request, body included (registry: 503 after)
    keepalive_seconds: float = 20.0  # an idle connection is closed after this
    max_connections: int = 10_000  # open connections beyond this are closed at once


LIMITS: web.AppKey[Limits] = web.AppKey("limits", Limits)
GUARD: web.AppKey[ConnectionGuard] = web.AppKey("guard", object)  # type: ignore[arg-type]

_TOO_SLOW_BODY = b'{"error": "request head not received in time"}'
_TOO_SLOW = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
             b"Content-Type: application/json\r\nContent-Length: "
             + str(len(_TOO_SLOW_BODY)).encode() + b"\r\n\r\n" + _TOO_SLOW_BODY)


class _Guarded(asyncio.Protocol):
    """Wraps one connection's aiohttp protocol: starts the head clock when bytes arrive
    between requests, and stops it when a request reaches the application.

    The clock is lazy: a request only notes when its head began (no timer is set or
    cancelled per request, which cost more than the rest of the guard); one timer per
    connection looks when the oldest head could be due and sets itself again for a head that
    began later, or stops while none is awaited."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None
        self.head_since: float | None = None  # loop time the awaited head began; None: none
        self.in_request = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream server (create_server) hands its protocols stream transports.
        self.transport = cast(asyncio.Transport, transport)
        if len(self.guard.open) >= self.guard.limits.max_connections:
            self.guard.refused += 1
            self.transport.abort()
            return
        self.guard.open[transport] = self
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.in_request and self.head_since is None:
            self.head_since = self.loop.time()
            if self.timer is None:
                self.timer = self.loop.call_at(self.head_since + self.guard.limits.head_seconds,
                                               self._head_due)
        self.inner.data_received(data)

    def _head_due(self) -> None:
        self.timer = None
        if self.transport is None or self.in_request or self.head_since is None:
            return  # no head awaited: data_received sets the timer for the next one
        due = self.head_since + self.guard.limits.head_seconds
        if self.loop.time() < due:  # a later head than the one this timer was set for
            self.timer = self.loop.call_at(due, self._head_due)
            return
        self.guard.timed_out += 1
        self.transport.write(_TOO_SLOW)
        self.transport.close()

    def request_started(self) -> None:
        self.in_request = True
        self.head_since = None

    def request_finished(self) -> None:
        self.in_request = False

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.transport is not None and self.guard.open.pop(self.transport, None) is self:
            self.inner.connection_lost(exc)


class ConnectionGuard:
    """The protocol factory of a guarded site, and what it has counted."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.open: dict[asyncio.BaseTransport, _Guarded] = {}
        self.refused = 0  # connections closed on arrival (over max_connections)
        self.timed_out = 0  # connections closed for a slow request head

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(self, inner())

    def of(self, request: web.BaseRequest) -> _Guarded | None:
        transport = request.transport
        return self.open.get(transport) if transport is not None else None


class Deadlines:
    """The handler time limit of every request under way, with one timer for all of them
    (a timer set and cancelled per request cost more than the rest of a heartbeat's
    bookkeeping): a request still under way `seconds` after it began has its task
    cancelled, and `expired()` tells the caller that the cancellation was the deadline's."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._since: dict[asyncio.Task[Any], float] = {}  # under way, oldest first
        self._expired: set[asyncio.Task[Any]] = set()
        self._timer: asyncio.TimerHandle | None = None

    def begin(self, task: asyncio.Task[Any]) -> None:
        loop = task.get_loop()
        now = loop.time()
        self._since[task] = now
        if self._timer is None:
            self._timer = loop.call_at(now + self.seconds, self._due, loop)

    def end(self, task: asyncio.Task[Any]) -> None:
        self._since.pop(task, None)
        self._expired.discard(task)  # a handler that swallowed the cancellation

    def expired(self, task: asyncio.Task[Any]) -> bool:
        """Whether the deadline cancelled this task (once: the answer is taken)."""
        if task in self._expired:
            self._expired.discard(task)
            return True
        return False

    def _due(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        late = []
        for task, since in self._since.items():  # oldest first: stop at the first in time
            if since + self.seconds > now:
                break
            late.append(task)
        for task in late:
            del self._since[task]
            self._expired.add(task)
            task.cancel("deadline")
        for since in self._since.values():  # the oldest left
            self._timer = loop.call_at(since + self.seconds, self._due, loop)
            break


class _GuardedSite(web.BaseSite):
    """Listens on a bound socket and gives every connection to the guard, which passes it on
    to the runner's server. The runner stops it (`stop`) before closing the connections."""

    def __init__(self, runner: web.AppRunner, sock: socket.socket, guard: ConnectionGuard):
        super().__init__(runner, backlog=1024)
        self.app_runner = runner
        self.sock = sock
        self.guard = guard
        self.listening: asyncio.Server | None = None
        host, port = sock.getsockname()[:2]  # now: the socket is closed with the site
        self.address = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    @property
    def name(self) -> str:
        return self.address

    async def start(self) -> None:
        await super().start()
        server = self.app_runner.server
        if server is None:
            raise RuntimeError("call runner.setup() before starting a site")
        self.listening = await asyncio.get_running_loop().create_server(
            self.guard.factory(server), sock=self.sock, backlog=1024)

    async def stop(self) -> None:
        if self.listening is not None:
            self.listening.close()
            self.listening = None
        await super().stop()


def runner_for(app: web.Application) -> web.AppRunner:
    """An AppRunner with the app's keep-alive limit (if it declares limits)."""
    limits = app.get(LIMITS)
    if limits is None:
        return web.AppRunner(app, access_log=None)
    return web.AppRunner(app, access_log=None, keepalive_timeout=limits.keepalive_seconds)


def free_port() -> int:
    """A loopback port nobody listens on right now (for child processes told where to listen)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_site(runner: web.AppRunner, host: str, port: int) -> int:
    """Listen on host:port (port 0: any free port) and return the port actually bound. An app
    with a connection guard (the registry) gets its limits enforced on every connection."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    guard = runner.app.get(GUARD)
    site = (web.SockSite(runner, listener) if guard is None
            else _GuardedSite(runner, listener, guard))
    await site.start()
    return int(listener.getsockname()[1])
