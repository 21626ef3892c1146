"""The agent's two faces: it serves the runtime API to the controller (GET/PUT/DELETE
/plugins, POST /restart) over a `Box` — the box's real plugins directory, or a simulated one
— and it registers and heartbeats with the registry, carrying what the box reports.

Every register, heartbeat and change of the box takes the next `seq` (it starts from the
clock, so it also grows across agent restarts); PUT and DELETE answer theirs, so that the
controller can tell a report built before its install from one built after."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from controller.domain.models import InvalidSpec, Plugin, check_plugin_name, check_source
from controller.registry.serving import start_site

log = logging.getLogger("pluginctl.agent")

MAX_ERROR_LENGTH = 1000


class BoxError(Exception):
    """A change the box refuses or cannot make; `status` is the HTTP answer, `reason` a
    stable word for machines, the message prose for people."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Installed:
    changed: bool  # False: it was already there, exactly so
    digest: str | None


@dataclass(frozen=True, slots=True)
class Prepared:
    """A plugin fetched and checked, ready to be put in place; `payload` is the box's own."""

    name: str
    source: str
    digest: str | None
    payload: object = None


class Box(Protocol):
    """Where plugins live on one workspace box. `prepare` may take long (a fetch) and
    changes nothing on the box; `install` makes the change and is quick."""

    async def inventory(self) -> list[Plugin]: ...

    async def prepare(self, name: str, source: str, digest: str | None) -> Prepared: ...

    async def install(self, prepared: Prepared) -> Installed: ...

    async def remove(self, name: str) -> bool: ...  # False: it was not there

    def restart_pending(self) -> bool: ...  # changed since its last restart

    async def restart(self) -> str | None: ...  # the failure, if it failed


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    user_agent: str = ""


@dataclass
class Counters:
    """What happened to this agent, for tests and logs."""

    calls: list[Call] = field(default_factory=list)
    restarts: int = 0
    heartbeats: int = 0  # heartbeats the registry accepted


class AgentServer:
    """One workspace's agent on a real HTTP port."""

    def __init__(
        self,
        workspace_id: str,
        box: Box,
        *,
        registry_url: str | None = None,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        report: bool = True,
        heartbeat_interval: float = 10.0,
        controller_secret: str | None = None,
        advertise_url: str | None = None,
    ) -> None:
        self.workspace_id = workspace_id
        self.box = box
        self.registry_url = registry_url.rstrip("/") if registry_url else None
        self.token = token
        self.report = report  # send the plugin list with register and heartbeat
        self.heartbeat_interval = heartbeat_interval
        self.controller_secret = controller_secret  # if set, calls without it get 401
        self.counters = Counters()
        self.error: str | None = None  # the box's own trouble (a failed restart), reported
        self.seq = time.time_ns() // 1000
        self._lock = asyncio.Lock()  # one change of the box at a time; reports in between
        self._host, self._port = host, port
        self._advertise = advertise_url
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._restarting: set[asyncio.Task[None]] = set()
        self.url = ""

    # --- the runtime API -------------------------------------------------------------

    def middlewares(self) -> list[Any]:
        return [self._record, self._authorize]

    def _app(self) -> web.Application:
        app = web.Application(middlewares=self.middlewares())
        app.router.add_get("/plugins", self._list)
        app.router.add_put("/plugins/{name}", self._install)
        app.router.add_delete("/plugins/{name}", self._remove)
        app.router.add_post("/restart", self._restart)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.counters.calls.append(Call(request.method, request.path,
                                        request.headers.get("User-Agent", "")))
        response: web.StreamResponse = await handler(request)
        return response

    @web.middleware
    async def _authorize(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if self.controller_secret is not None and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(),
                f"Bearer {self.controller_secret}".encode()):
            return web.json_response({"error": "not from this runtime's controller"},
                                     status=401)
        response: web.StreamResponse = await handler(request)
        return response

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq

    async def _list(self, _request: web.Request) -> web.Response:
        async with self._lock:
            try:
                plugins = await self.box.inventory()
            except OSError as error:
                return web.json_response(
                    {"error": f"cannot read the plugins on the box: {error}"}, status=500)
            seq = self._next_seq()
        return web.json_response({"plugins": [p.to_json() for p in plugins], "seq": seq})

    async def _install(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise TypeError("body is not a JSON object")
            source = check_source(body["source"])
            digest = body.get("digest")
            if digest is not None and not isinstance(digest, str):
                raise TypeError("digest is not a string")
            check_plugin_name(name)
        except (ValueError, KeyError, TypeError, InvalidSpec) as error:
            return web.json_response({"error": f"bad install request: {error}"}, status=400)
        try:
            # The fetch runs outside the lock: a slow source never holds up heartbeats.
            prepared = await self.box.prepare(name, source, digest)
            async with self._lock:
                installed = await self.box.install(prepared)
                seq = self._next_seq()
        except BoxError as error:
            log.warning("%s: install of %s from %s refused: %s", self.workspace_id, name,
                        source, error)
            return web.json_response({"error": str(error), "reason": error.reason},
                                     status=error.status)
        if installed.changed:
            log.info("%s: installed %s from %s (%s)", self.workspace_id, name, source,
                     installed.digest)
        answer: dict[str, Any] = {"restart_required": self.restart_required(installed.changed),
                                  "seq": seq}
        if installed.digest is not None:
            answer["digest"] = installed.digest
        return web.json_response(answer)

    async def _remove(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            check_plugin_name(name)
        except InvalidSpec as error:
            return web.json_response({"error": str(error)}, status=400)
        async with self._lock:
            try:
                removed = await self.box.remove(name)
            except BoxError as error:
                return web.json_response({"error": str(error), "reason": error.reason},
                                         status=error.status)
            seq = self._next_seq()
        answer = {"restart_required": self.restart_required(removed), "seq": seq}
        if not removed:
            return web.json_response({"error": f"plugin {name} not installed", **answer},
                                     status=404)
        log.info("%s: removed %s", self.workspace_id, name)
        return web.json_response(answer)

    def restart_required(self, changed: bool) -> bool:
        """What to answer a PUT or DELETE: whether the workspace must restart to load the
        box as it is now. Also true when an earlier change was never followed by a
        restart (its answer was lost: the controller timed out, or the agent was killed),
        and for removals too (a running workspace keeps a removed plugin loaded)."""
        return changed or self.box.restart_pending()

    async def _restart(self, _request: web.Request) -> web.Response:
        self.counters.restarts += 1
        task = asyncio.create_task(self._restart_box())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)
        return web.json_response({"status": "restarting"}, status=202)

    async def _restart_box(self) -> None:
        failure = await self.box.restart()
        if failure is not None:
            log.error("%s: restart failed: %s", self.workspace_id, failure)
        self.error = None if failure is None else failure[:MAX_ERROR_LENGTH]
        await self.after_restart()

    async def after_restart(self) -> None:
        """Tell the registry at once what the box has now (the controller forgot the report
        when it asked for the restart)."""
        if self.registry_url and self._client is not None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self.heartbeat()

    async def restarted(self) -> None:
        """Wait until every restart in progress is over: for tests that must not race it."""
        while self._restarting:
            await asyncio.gather(*self._restarting, return_exceptions=True)

    # --- talking to the registry ---------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._client is None or not self.registry_url:
            raise RuntimeError("no registry configured; start() with registry_url and token")
        async with self._client.post(
            self.registry_url + path, json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as response:
            try:
                data: dict[str, Any] = await response.json(content_type=None)
            except ValueError as error:  # an HTML 502 from a proxy on the way, say
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status,
                    message="the answer is not JSON") from error
            if not isinstance(data, dict):
                data = {"error": data}
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status,
                    message=str(data.get("error", data)))
            return data

    async def _body(self, **fields: Any) -> dict[str, Any]:
        """A register or heartbeat body: the report read and the seq taken together, between
        two changes of the box."""
        body: dict[str, Any] = {"workspace_id": self.workspace_id, **fields}
        async with self._lock:
            if self.report:
                try:
                    body["plugins"] = [p.to_json() for p in await self.box.inventory()]
                except OSError as error:
                    # Still alive, but what is installed is unknown: no report this time
                    # (the registry keeps the last one).
                    log.error("%s: cannot read the plugins on the box: %s", self.workspace_id,
                              error)
                else:
                    if self.error is not None:
                        body["error"] = self.error
            body["seq"] = self._next_seq()
        return body

    async def register(self) -> dict[str, Any]:
        return await self._post("/registry/register", await self._body(url=self.url))

    async def heartbeat(self) -> dict[str, Any]:
        answer = await self._post("/registry/heartbeat", await self._body())
        self.counters.heartbeats += 1
        return answer

    def start_heartbeats(self) -> None:
        """Heartbeat every `heartbeat_interval` seconds until stop()."""
        task = asyncio.create_task(self.heartbeat_forever())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def heartbeat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                try:
                    await self.heartbeat()
                except aiohttp.ClientResponseError as error:
                    if error.status != 409:
                        raise
                    # The registry does not know us (its store was reset or restored):
                    # register again, as the 409 asks.
                    log.warning("%s: not registered; registering again", self.workspace_id)
                    await self.register()
            except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as error:
                # Whatever one heartbeat meets, the next one is sent: a sidecar whose
                # heartbeats stopped would look alive to Kubernetes and offline to pluginctl.
                log.warning("%s: heartbeat failed: %s", self.workspace_id, error)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> AgentServer:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        port = await start_site(self._runner, self._host, self._port)
        self.url = self._advertise or f"http://{self._host}:{port}"
        self._client = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._client is not None:
            await self._client.close()
            self._client = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def __aenter__(self) -> AgentServer:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def count(self, method: str, path_prefix: str = "") -> int:
        return sum(1 for c in self.counters.calls
                   if c.method == method and c.path.startswith(path_prefix))
