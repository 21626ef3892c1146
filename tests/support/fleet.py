"""Many reference-like runtimes behind one port (`/w/{id}/...`), for tests that run the
controller as real processes: records every install, who made it, and whether two calls to
one workspace were ever in flight at the same time."""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

from controller.registry.serving import start_site

INSTALL_SECONDS = 0.15  # slow enough that overlapping calls would be seen


@dataclass
class Fleet:
    """Many runtimes behind one port (/w/{id}/...), recording who calls each workspace and
    whether two calls to one workspace were ever in flight at the same time."""

    installed: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    in_flight: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    overlaps: list[tuple[str, str, str]] = field(default_factory=list)
    installs_by: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    puts: Counter[tuple[str, str]] = field(default_factory=Counter)  # (workspace, plugin)
    url: str = ""

    async def _enter(self, request: web.Request) -> tuple[str, str]:
        workspace_id = request.match_info["id"]
        caller = request.headers.get("User-Agent", "?").removeprefix("pluginctl/")
        for other in self.in_flight[workspace_id]:
            self.overlaps.append((workspace_id, other, caller))
        self.in_flight[workspace_id].append(caller)
        return workspace_id, caller

    async def list_plugins(self, request: web.Request) -> web.Response:
        workspace_id, caller = await self._enter(request)
        try:
            return web.json_response({"plugins": [
                {"name": name, "source": f"local://plugins/{name}"}
                for name in sorted(self.installed[workspace_id])]})
        finally:
            self.in_flight[workspace_id].remove(caller)

    async def install(self, request: web.Request) -> web.Response:
        workspace_id, caller = await self._enter(request)
        try:
            await request.read()
            await asyncio.sleep(INSTALL_SECONDS)
            self.installed[workspace_id].add(request.match_info["name"])
            self.puts[workspace_id, request.match_info["name"]] += 1
            self.installs_by[caller] += 1
            return web.json_response({"restart_required": False})
        finally:
            self.in_flight[workspace_id].remove(caller)

    def in_flight_by(self, caller: str) -> bool:
        return any(caller in callers for callers in self.in_flight.values())


@asynccontextmanager
async def serve_fleet() -> AsyncIterator[Fleet]:
    state = Fleet()
    app = web.Application()
    app.router.add_get("/w/{id}/plugins", state.list_plugins)
    app.router.add_put("/w/{id}/plugins/{name}", state.install)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    state.url = f"http://127.0.0.1:{await start_site(runner, '127.0.0.1', 0)}"
    try:
        yield state
    finally:
        await runner.cleanup()
