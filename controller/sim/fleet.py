"""The one simulated fleet: many runtimes behind one port (`/w/{id}/plugins...`, one
`MemoryBox` of `controller.agent.simulated` per workspace), as the runtime driver sees
them, and as the registry sees them (each registers and heartbeats with its report and
seq). A share of the fleet can be told to misbehave; the fleet records who called each
workspace and whether two calls to one workspace ever overlapped.

The bench, the soak and the integration tests use it: in process (`serve_fleet`), or as a
process of its own (`python -m controller.sim.fleet`, steered through `/fleet/...`;
`FleetProcess` is the parent's handle)."""

from __future__ import annotations

import argparse
import asyncio
import enum
import functools
import json
import random
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from controller.agent.runtime import BoxError
from controller.agent.simulated import Faults, MemoryBox
from controller.domain.version import caller_of
from controller.registry.serving import free_port, start_site
from controller.sim import processes

INSTALL_SECONDS = 0.15  # the tests' default: slow enough that overlapping calls are seen
HANG_SECONDS = 30.0  # a hanging runtime answers nothing for this long (or until stopped)
REGISTER_ATTEMPTS = 10
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Misbehaviour(enum.StrEnum):
    NONE = "none"
    UNAVAILABLE = "unavailable"  # 503 to every call
    HANG = "hang"  # nothing for HANG_SECONDS: past any caller's timeout
    GARBAGE = "garbage"  # 200 with a body that is not JSON


@dataclass(frozen=True)
class Trouble:
    """Which share of the fleet misbehaves, and how; the same workspaces for a given share
    (chosen by a hash of the id), so that a fault hits a stable set."""

    mode: Misbehaviour = Misbehaviour.NONE
    share: float = 0.0

    def hits(self, workspace_id: str) -> bool:
        return (self.mode is not Misbehaviour.NONE
                and zlib.crc32(workspace_id.encode()) % 1000 < self.share * 1000)


WAIT_BOUNDS = (0.1, 1.0, 5.0, 20.0)  # seconds: how long heartbeats waited for an answer


@dataclass
class RegistryTally:
    """What the registry answered the fleet's heartbeats and registers."""

    heartbeats: Counter[int] = field(default_factory=Counter)  # status -> count
    without_answer: int = 0  # connection refused, timeout
    lost_on_purpose: int = 0
    not_sent: int = 0  # due while the box's previous heartbeat was still unanswered
    register_retries: int = 0
    #: Answered heartbeats by how long the box waited, from when it was due (the fleet's
    #: wait for one of its REGISTRY_CONNECTIONS included): upper bound in s -> count
    waited: Counter[str] = field(default_factory=Counter)

    def to_json(self) -> dict[str, Any]:
        return {"heartbeats": {str(k): v for k, v in sorted(self.heartbeats.items())},
                "without_answer": self.without_answer,
                "lost_on_purpose": self.lost_on_purpose,
                "not_sent": self.not_sent,
                "register_retries": self.register_retries,
                "waited": dict(self.waited)}

    def answered_after(self, seconds: float) -> None:
        self.waited[next((f"{bound:g}" for bound in WAIT_BOUNDS if seconds <= bound),
                         "longer")] += 1


class Fleet:
    """The runtimes, their boxes and what happened to them."""

    def __init__(self, *, install_delay: float = INSTALL_SECONDS, expected: int | None = None
                 ) -> None:
        self.faults = Faults(install_delay=install_delay, restart_required=False)
        self.expected = expected  # a workspace holding this many plugins is done
        self.boxes: dict[str, MemoryBox] = {}
        self.seqs: Counter[str] = Counter()
        self.trouble = Trouble()
        self.in_flight: dict[str, list[str]] = defaultdict(list)  # workspace -> callers
        self.overlaps: list[tuple[str, str, str]] = []  # (workspace, in flight, newcomer)
        self.installs_by: dict[str, int] = defaultdict(int)  # caller -> installs
        self.puts: Counter[tuple[str, str]] = Counter()  # (workspace, plugin) -> PUTs
        self.done_at: dict[str, float] = {}  # wall clock: compared across processes
        self.registry: RegistryClient | None = None
        self.url = ""
        self._stopping = asyncio.Event()

    def connect(self, registry_url: str, tokens: dict[str, str]) -> RegistryClient:
        """Register and heartbeat with this registry, as these workspaces (id -> token);
        from inside the event loop."""
        self.registry = RegistryClient(self, registry_url, tokens)
        return self.registry

    def box(self, workspace_id: str) -> MemoryBox:
        if workspace_id not in self.boxes:
            self.boxes[workspace_id] = MemoryBox(None, self.faults)
        return self.boxes[workspace_id]

    def runtime_url(self, workspace_id: str) -> str:
        return f"{self.url}/w/{workspace_id}"

    @property
    def installed(self) -> defaultdict[str, set[str]]:
        """Plugin names on each box (an empty set for a box never seen)."""
        return defaultdict(set, {w: set(box.plugins) for w, box in self.boxes.items()})

    def sources(self) -> dict[str, dict[str, str]]:
        return {w: {p.name: p.source for p in box.plugins.values()}
                for w, box in self.boxes.items()}

    def in_flight_by(self, caller: str) -> bool:
        return any(caller in callers for callers in self.in_flight.values())

    def wipe(self, workspace_ids: list[str]) -> None:
        """Boxes re-created: they come back empty (and register again, see `recreate`)."""
        for workspace_id in workspace_ids:
            self.box(workspace_id).plugins.clear()
            self.done_at.pop(workspace_id, None)

    def next_seq(self, workspace_id: str) -> int:
        self.seqs[workspace_id] += 1
        return self.seqs[workspace_id]

    def report(self, workspace_id: str) -> list[dict[str, str | bool]]:
        return [p.to_json() for p in sorted(self.box(workspace_id).plugins.values(),
                                            key=lambda p: p.name)]

    # --- the runtime API ----------------------------------------------------------------

    @web.middleware
    async def _misbehave(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        workspace_id = request.match_info.get("id")
        if workspace_id is None or not self.trouble.hits(workspace_id):
            return await handler(request)
        if self.trouble.mode is Misbehaviour.UNAVAILABLE:
            return web.json_response({"error": "runtime unavailable"}, status=503)
        if self.trouble.mode is Misbehaviour.HANG:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), HANG_SECONDS)
        return web.Response(body=b"\x00\xff<html>not json", content_type="text/html")

    @web.middleware
    async def _track(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        workspace_id = request.match_info.get("id")
        if workspace_id is None:
            return await handler(request)
        caller = caller_of(request.headers.get("User-Agent", "")) or "?"
        for other in self.in_flight[workspace_id]:
            self.overlaps.append((workspace_id, other, caller))
        self.in_flight[workspace_id].append(caller)
        try:
            return await handler(request)
        finally:
            self.in_flight[workspace_id].remove(caller)

    async def _list(self, request: web.Request) -> web.Response:
        workspace_id = request.match_info["id"]
        return web.json_response({"plugins": self.report(workspace_id),
                                  "seq": self.next_seq(workspace_id)})

    async def _install(self, request: web.Request) -> web.Response:
        workspace_id, name = request.match_info["id"], request.match_info["name"]
        try:
            body = await request.json()
            source, digest = str(body["source"]), body.get("digest")
        except (ValueError, KeyError, TypeError) as error:
            return web.json_response({"error": f"bad install request: {error}"}, status=400)
        box = self.box(workspace_id)
        try:
            installed = await box.install(await box.prepare(name, source, digest))
        except BoxError as error:
            return web.json_response({"error": str(error), "reason": error.reason},
                                     status=error.status)
        self.puts[workspace_id, name] += 1
        caller = caller_of(request.headers.get("User-Agent", "")) or "?"
        self.installs_by[caller] += 1
        if (self.expected is not None and len(box.plugins) >= self.expected
                and workspace_id not in self.done_at):
            self.done_at[workspace_id] = time.time()
        return web.json_response({
            "restart_required": installed.changed and self.faults.restart_required,
            "seq": self.next_seq(workspace_id), "digest": installed.digest})

    async def _remove(self, request: web.Request) -> web.Response:
        workspace_id = request.match_info["id"]
        removed = await self.box(workspace_id).remove(request.match_info["name"])
        answer = {"restart_required": False, "seq": self.next_seq(workspace_id)}
        return web.json_response(answer if removed else {"error": "not installed", **answer},
                                 status=200 if removed else 404)

    async def _restart(self, request: web.Request) -> web.Response:
        await self.box(request.match_info["id"]).restart()
        return web.json_response({"status": "restarting"}, status=202)

    def app(self, *, control: bool = False) -> web.Application:
        """The runtime API for every workspace; with `control`, the `/fleet/...` face a
        parent process steers it with."""
        app = web.Application(middlewares=[self._misbehave, self._track])
        app.router.add_get("/w/{id}/plugins", self._list)
        app.router.add_put("/w/{id}/plugins/{name}", self._install)
        app.router.add_delete("/w/{id}/plugins/{name}", self._remove)
        app.router.add_post("/w/{id}/restart", self._restart)
        if control:
            Control(self).add_routes(app)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _shutdown(self, _app: web.Application) -> None:
        self._stopping.set()  # ends hanging answers
        if self.registry is not None:
            await self.registry.close()


REGISTRY_CONNECTIONS = 256  # the fleet's connections to the registry, shared by all boxes


def _forget(pending: dict[str, asyncio.Task[None]], workspace_id: str,
            _task: asyncio.Task[None]) -> None:
    pending.pop(workspace_id, None)


class RegistryClient:
    """The fleet's registry side: registers (retrying as a runtime does) and a steady
    heartbeat load over the whole fleet, each with the box's report and the next seq."""

    def __init__(self, fleet: Fleet, registry_url: str, tokens: dict[str, str]) -> None:
        self.fleet = fleet
        self.registry_url = registry_url.rstrip("/")
        self.tokens = tokens
        self.tally = RegistryTally()
        self.loss = 0.0  # share of heartbeats dropped on purpose
        self._rand = random.Random(5)
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=REGISTRY_CONNECTIONS),
            timeout=aiohttp.ClientTimeout(total=10))
        # Calls wait for a connection here, not inside aiohttp, whose timeout would count it.
        self._connections = asyncio.Semaphore(REGISTRY_CONNECTIONS)
        self._load: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Task[None]] = {}  # workspace -> its heartbeat
        self.registered: set[str] = set()  # boxes the registry accepted: only they heartbeat

    @property
    def heartbeats_in_flight(self) -> int:
        return len(self._pending)

    async def _post(self, path: str, workspace_id: str, body: dict[str, Any]) -> int:
        async with self._connections:
            return await self._send(path, workspace_id, body)

    async def _send(self, path: str, workspace_id: str, body: dict[str, Any]) -> int:
        body = {"workspace_id": workspace_id, "plugins": self.fleet.report(workspace_id),
                "seq": self.fleet.next_seq(workspace_id), **body}
        async with self._client.post(self.registry_url + path, json=body, headers={
                "Authorization": f"Bearer {self.tokens[workspace_id]}"}) as answer:
            await answer.read()
            return answer.status

    async def register(self, workspace_id: str) -> int:
        """Until the registry answers (not a 5xx), pausing longer after each failure; 0 if
        it never did."""
        for attempt in range(REGISTER_ATTEMPTS):
            try:
                code = await self._post("/registry/register", workspace_id,
                                        {"url": self.fleet.runtime_url(workspace_id)})
                if 200 <= code < 300:
                    self.registered.add(workspace_id)  # heartbeats from now on
                if code < 500:
                    return code
            except (aiohttp.ClientError, TimeoutError):
                pass
            self.tally.register_retries += 1
            await asyncio.sleep(min(10.0, 0.5 * 2 ** attempt))
        return 0

    async def register_all(self, workspace_ids: list[str]) -> dict[str, float]:
        """Register every workspace at once, as a fleet coming up does: no batch waits for
        another, the client's connection limit is the only pacing. Returns when each register
        went out (wall clock); raises unless the registry accepted every one."""
        sent: dict[str, float] = {}
        codes = Counter(await asyncio.gather(*(self._timed_register(w, sent)
                                               for w in workspace_ids)))
        if set(codes) - {200}:
            raise RuntimeError(f"register failed: {dict(codes)}")
        return sent

    async def _timed_register(self, workspace_id: str, sent: dict[str, float]) -> int:
        sent[workspace_id] = time.time()
        return await self.register(workspace_id)

    async def heartbeat(self, workspace_id: str) -> None:
        due = time.monotonic()
        try:
            code = await self._post("/registry/heartbeat", workspace_id, {})
        except (aiohttp.ClientError, TimeoutError):
            self.tally.without_answer += 1
            return
        self.tally.heartbeats[code] += 1
        self.tally.answered_after(time.monotonic() - due)
        if code == 409:  # the registry lost us: register again, as the answer asks
            await self.register(workspace_id)

    def start_heartbeats(self, rate: float) -> None:
        """`rate` heartbeats per second over the whole fleet, round-robin, until stopped."""
        self.stop_heartbeats()
        if rate > 0:
            self._load = asyncio.create_task(self._heartbeats(rate))

    def stop_heartbeats(self) -> None:
        if self._load is not None:
            self._load.cancel()
            self._load = None

    async def _heartbeats(self, rate: float) -> None:
        """As boxes do: each box the registry accepted (and none before) sends its next
        heartbeat when it is due, unless its previous one is still waiting for an answer
        (counted as `not_sent`: a registry that falls behind is not buried under more, and a
        box is never silenced by the others' backlog)."""
        tick = 0.05
        carry, index = 0.0, 0
        next_at = time.monotonic()
        pending = self._pending
        ids = sorted(self.tokens)
        try:
            while True:
                carry += rate * tick
                batch, carry = int(carry), carry - int(carry)
                for _ in range(batch):
                    workspace_id = ids[index % len(ids)]
                    index += 1
                    if workspace_id not in self.registered:
                        continue
                    if self.loss and self._rand.random() < self.loss:
                        self.tally.lost_on_purpose += 1
                    elif workspace_id in pending:
                        self.tally.not_sent += 1
                    else:
                        task = asyncio.create_task(self.heartbeat(workspace_id))
                        pending[workspace_id] = task
                        task.add_done_callback(
                            functools.partial(_forget, pending, workspace_id))
                next_at += tick
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        finally:
            for task in list(pending.values()):
                task.cancel()

    async def recreate(self, workspace_ids: list[str]) -> None:
        """Boxes re-created: empty, and registering again as a new box does."""
        self.fleet.wipe(workspace_ids)
        await asyncio.gather(*(self.register(w) for w in workspace_ids))

    async def close(self) -> None:
        self.stop_heartbeats()
        await self._client.close()


class Control:
    """`/fleet/...`: how a parent process steers a fleet running in a process of its own."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/fleet/state", self._state)
        app.router.add_get("/fleet/done", self._done)
        app.router.add_post("/fleet/trouble", self._trouble)
        app.router.add_post("/fleet/register", self._register)
        app.router.add_post("/fleet/recreate", self._recreate)
        app.router.add_post("/fleet/heartbeats", self._heartbeats)

    def _registry(self) -> RegistryClient:
        if self.fleet.registry is None:
            raise web.HTTPConflict(text="started without --registry")
        return self.fleet.registry

    async def _state(self, _request: web.Request) -> web.Response:
        registry = self.fleet.registry
        return web.json_response({
            "installed": self.fleet.sources(), "puts": sum(self.fleet.puts.values()),
            "overlaps": len(self.fleet.overlaps),
            "registry": None if registry is None else registry.tally.to_json()})

    async def _done(self, request: web.Request) -> web.Response:
        """How many are done; with ?id=X, when X was done (null: not yet); with ?all=1,
        every done time."""
        if "id" in request.query:
            return web.json_response({"at": self.fleet.done_at.get(request.query["id"])})
        if "all" in request.query:
            return web.json_response({"done": self.fleet.done_at})
        return web.json_response({"count": len(self.fleet.done_at)})

    async def _trouble(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.fleet.trouble = Trouble(Misbehaviour(body.get("mode", "none")),
                                     float(body.get("share", 0.0)))
        return web.json_response({"ok": True})

    async def _register(self, request: web.Request) -> web.Response:
        body = await request.json()
        sent = await self._registry().register_all(list(body["ids"]))
        return web.json_response({"registered_at": sent})

    async def _recreate(self, request: web.Request) -> web.Response:
        await self._registry().recreate(list((await request.json())["ids"]))
        return web.json_response({"ok": True})

    async def _heartbeats(self, request: web.Request) -> web.Response:
        body = await request.json()
        registry = self._registry()
        if "loss" in body:
            registry.loss = float(body["loss"])
        if "rate" in body:
            registry.start_heartbeats(float(body["rate"]))
        return web.json_response({"ok": True})


@asynccontextmanager
async def serve_fleet(*, install_delay: float = INSTALL_SECONDS, expected: int | None = None,
                      control: bool = False) -> AsyncIterator[Fleet]:
    """A fleet on a loopback port of this process, for as long as the block runs."""
    fleet = Fleet(install_delay=install_delay, expected=expected)
    runner = web.AppRunner(fleet.app(control=control), access_log=None)
    await runner.setup()
    fleet.url = f"http://127.0.0.1:{await start_site(runner, '127.0.0.1', 0)}"
    try:
        yield fleet
    finally:
        await runner.cleanup()


# --- a fleet in a process of its own ------------------------------------------------------------

class FleetProcess:
    """`python -m controller.sim.fleet` as a child process (runtimes are processes of their
    own, and they must not share the measured process's event loop), and its control face."""

    def __init__(self, *, install_delay: float, expected: int | None = None,
                 registry_url: str | None = None, tokens_file: Path | None = None) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "controller.sim.fleet", "--port", str(port),
                   "--install-delay", str(install_delay)]
        if expected is not None:
            command += ["--expected", str(expected)]
        if registry_url is not None and tokens_file is not None:
            command += ["--registry", registry_url, "--tokens", str(tokens_file)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        self.client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600))

    def runtime_url(self, workspace_id: str) -> str:
        return f"{self.url}/w/{workspace_id}"

    async def get(self, path: str) -> Any:
        async with self.client.get(self.url + path) as answer:
            answer.raise_for_status()
            return await answer.json()

    async def post(self, path: str, body: dict[str, Any]) -> Any:
        async with self.client.post(self.url + path, json=body) as answer:
            answer.raise_for_status()
            return await answer.json()

    async def started(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the fleet exited with {self.process.returncode}")
            try:
                await self.get("/fleet/done")
                return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        raise RuntimeError("the simulated fleet did not come up")

    async def done_count(self) -> int:
        return int((await self.get("/fleet/done"))["count"])

    async def done_at(self, workspace_id: str) -> float | None:
        at = (await self.get(f"/fleet/done?id={workspace_id}"))["at"]
        return None if at is None else float(at)

    async def all_done(self) -> dict[str, float]:
        return {k: float(v) for k, v in (await self.get("/fleet/done?all=1"))["done"].items()}

    async def register(self, workspace_ids: list[str]) -> dict[str, float]:
        answer = await self.post("/fleet/register", {"ids": workspace_ids})
        return {k: float(v) for k, v in answer["registered_at"].items()}

    async def stop(self) -> None:
        await self.client.close()
        processes.end(self.process)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m controller.sim.fleet",
                                     description="A simulated fleet of runtimes on one port.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--install-delay", type=float, default=INSTALL_SECONDS)
    parser.add_argument("--expected", type=int, default=None,
                        help="A workspace holding this many plugins counts as done.")
    parser.add_argument("--registry", default=None, help="The registry's base URL.")
    parser.add_argument("--tokens", type=Path, default=None,
                        help="A JSON file {workspace id: token}: the fleet's workspaces.")
    args = parser.parse_args(argv)
    fleet = Fleet(install_delay=args.install_delay, expected=args.expected)
    fleet.url = f"http://127.0.0.1:{args.port}"
    app = fleet.app(control=True)
    if args.registry is not None and args.tokens is not None:
        tokens: dict[str, str] = json.loads(args.tokens.read_text())

        async def connect(_app: web.Application) -> None:
            fleet.connect(args.registry, tokens)

        app.on_startup.append(connect)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
