"""The reference workspace runtime (`pluginctl agent`): serves the runtime API, registers,
heartbeats with its report, and can misbehave on purpose (lose its plugins on restart, slow
or failing installs, register without ever heartbeating) for tests and demos."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from controller.http import start_site
from controller.models import Plugin, check_plugin_name, check_source

log = logging.getLogger("pluginctl.agent")


@dataclass
class Faults:
    """Ways the reference runtime can misbehave; all off by default. Mutable on purpose:
    a test can break or heal a running runtime."""

    lose_plugins_on_restart: bool = False
    install_delay: float = 0.0  # seconds each PUT takes
    failing_plugins: set[str] = field(default_factory=set)  # PUT answers 500 for these
    unavailable: bool = False  # every runtime API call answers 503
    hang: bool = False  # every call gets its headers and part of a body, then nothing more
    garbage: bool = False  # every call answers 200 with a body that is not JSON
    restart_required: bool = True  # a PUT that changes something asks for a restart


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    path: str
    user_agent: str = ""


class ReferenceRuntime:
    """A runtime that keeps its plugins in memory, on a real HTTP port."""

    def __init__(
        self,
        workspace_id: str,
        *,
        registry_url: str | None = None,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        faults: Faults | None = None,
        plugins: list[Plugin] | None = None,
        report: bool = True,
        heartbeat_interval: float = 10.0,
        controller_secret: str | None = None,
    ) -> None:
        self.workspace_id = workspace_id
        self.registry_url = registry_url.rstrip("/") if registry_url else None
        self.token = token
        self.faults = faults or Faults()
        self.plugins: dict[str, Plugin] = {p.name: p for p in plugins or []}
        self.report = report  # send the plugin list with register and heartbeat
        self.heartbeat_interval = heartbeat_interval
        self.controller_secret = controller_secret  # if set, calls without it get 401
        self.calls: list[Call] = []  # calls made to this runtime
        self.restarts = 0
        self.heartbeats = 0  # heartbeats the registry accepted
        self._host, self._port = host, port
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._restarting: set[asyncio.Task[None]] = set()
        self.url = ""

    # --- the runtime API -------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/plugins", self._list)
        app.router.add_put("/plugins/{name}", self._install)
        app.router.add_delete("/plugins/{name}", self._remove)
        app.router.add_post("/restart", self._restart)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.calls.append(Call(request.method, request.path,
                               request.headers.get("User-Agent", "")))
        if self.controller_secret is not None and not hmac.compare_digest(
                request.headers.get("Authorization", "").encode(),
                f"Bearer {self.controller_secret}".encode()):
            return web.json_response({"error": "not from this runtime's controller"},
                                     status=401)
        if self.faults.unavailable:
            return web.json_response({"error": "runtime unavailable"}, status=503)
        if self.faults.garbage:
            return web.Response(body=b"\x00\xff<html>not json", content_type="text/html")
        if self.faults.hang:
            hanging = web.StreamResponse(headers={"Content-Type": "application/json",
                                                  "Content-Length": "1000"})
            await hanging.prepare(request)
            await hanging.write(b'{"plugins": [')
            await asyncio.Event().wait()  # until the caller gives up and hangs up
        response: web.StreamResponse = await handler(request)
        return response

    async def _list(self, _request: web.Request) -> web.Response:
        return web.json_response({"plugins": self.report_json()})

    async def _install(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            body = await request.json()
            source = check_source(body["source"])
            digest = body.get("digest")
            check_plugin_name(name)
        except (ValueError, KeyError, TypeError) as error:
            return web.json_response({"error": f"bad install request: {error}"}, status=400)
        if self.faults.install_delay:
            await asyncio.sleep(self.faults.install_delay)
        if name in self.faults.failing_plugins:
            return web.json_response({"error": f"install of {name} failed: broken plugin"},
                                     status=500)
        plugin = Plugin(name, source, digest or _digest_of(source))
        previous = self.plugins.get(name)
        changed = previous is None or previous.source != source or (
            digest is not None and previous.digest != digest)
        self.plugins[name] = plugin
        return web.json_response({"restart_required": changed and self.faults.restart_required})

    async def _remove(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.plugins.pop(name, None) is None:
            return web.json_response({"error": f"plugin {name} not installed"}, status=404)
        return web.Response(status=204)

    async def _restart(self, _request: web.Request) -> web.Response:
        self.restarts += 1
        task = asyncio.create_task(self._come_back())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self._restarting.add(task)
        task.add_done_callback(self._restarting.discard)
        return web.json_response({"status": "restarting"}, status=202)

    async def restarted(self) -> None:
        """Wait until every restart in progress is over (the box came back and registered):
        for tests that must not race the restart."""
        while self._restarting:
            await asyncio.gather(*self._restarting, return_exceptions=True)

    async def _come_back(self) -> None:
        """What a restarted box does: maybe forget its plugins, then register again."""
        await asyncio.sleep(0.05)
        if self.faults.lose_plugins_on_restart:
            self.plugins.clear()
        if self.registry_url and self._client is not None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await self.register()

    def report_json(self) -> list[dict[str, str]]:
        return [p.to_json() for p in sorted(self.plugins.values(), key=lambda p: p.name)]

    # --- talking to the registry ---------------------------------------------------------

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._client is None or not self.registry_url:
            raise RuntimeError("no registry configured; start() with registry_url and token")
        async with self._client.post(
            self.registry_url + path, json=body,
            headers={"Authorization": f"Bearer {self.token}"},
        ) as response:
            data: dict[str, Any] = await response.json(content_type=None)
            if response.status != 200:
                raise aiohttp.ClientResponseError(
                    response.request_info, (), status=response.status,
                    message=str(data.get("error", data)))
            return data

    async def register(self) -> dict[str, Any]:
        body: dict[str, Any] = {"workspace_id": self.workspace_id, "url": self.url}
        if self.report:
            body["plugins"] = self.report_json()
        return await self._post("/registry/register", body)

    async def heartbeat(self) -> dict[str, Any]:
        body: dict[str, Any] = {"workspace_id": self.workspace_id}
        if self.report:
            body["plugins"] = self.report_json()
        answer = await self._post("/registry/heartbeat", body)
        self.heartbeats += 1
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
            except (aiohttp.ClientError, TimeoutError) as error:
                log.warning("%s: heartbeat failed: %s", self.workspace_id, error)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> ReferenceRuntime:
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        port = await start_site(self._runner, self._host, self._port)
        self.url = f"http://{self._host}:{port}"
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

    async def __aenter__(self) -> ReferenceRuntime:
        return await self.start()

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    def count(self, method: str, path_prefix: str = "") -> int:
        return sum(1 for c in self.calls if c.method == method and c.path.startswith(path_prefix))


def _digest_of(source: str) -> str:
    return "sha256:" + hashlib.sha256(source.encode()).hexdigest()[:16]
