"""Several controller replicas on one PostgreSQL database, as real processes on loopback:
they share the work, never act on one workspace at the same time, and take over the share
of a replica that dies (SIGKILL) in the middle of its work."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy import create_engine

from controller.http import start_site
from controller.registry import issue_token
from controller.store import make_engine, make_sessions, upgrade

from .conftest import TEMPLATE, _fresh_postgres_database, workspace_yaml
from .pg import free_port

WORKSPACES = 45
INSTALL_SECONDS = 0.15  # slow enough that overlapping calls would be seen


@dataclass
class Fleet:
    """Many runtimes behind one port (/w/{id}/...), recording who calls each workspace and
    whether two calls to one workspace were ever in flight at the same time."""

    installed: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    in_flight: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    overlaps: list[tuple[str, str, str]] = field(default_factory=list)
    installs_by: dict[str, int] = field(default_factory=lambda: defaultdict(int))
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
            self.installs_by[caller] += 1
            return web.json_response({"restart_required": False})
        finally:
            self.in_flight[workspace_id].remove(caller)

    def in_flight_by(self, caller: str) -> bool:
        return any(caller in callers for callers in self.in_flight.values())


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
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


async def eventually(condition: Callable[[], Awaitable[bool] | bool], seconds: float,
                     what: str) -> None:
    deadline = time.monotonic() + seconds
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        assert time.monotonic() < deadline, f"timed out after {seconds}s waiting for {what}"
        await asyncio.sleep(0.05)


async def test_three_replicas_share_the_fleet_and_take_over_a_dead_ones_share(
    postgres_url: str, tmp_path: Path, fleet: Fleet
) -> None:
    url, drop = _fresh_postgres_database(postgres_url)
    engine = make_engine(url)
    try:
        upgrade(engine)
        sessions = make_sessions(engine)
        ids = [f"ws-{i:02d}" for i in range(WORKSPACES)]
        tokens = {workspace_id: issue_token(sessions, workspace_id) for workspace_id in ids}
        manifests = tmp_path / "manifests"
        manifests.mkdir()
        (manifests / "fleet.yaml").write_text(TEMPLATE + "---\n" + "---\n".join(
            workspace_yaml(workspace_id) for workspace_id in ids))
        want = {"seo-all", "notes"}

        ports = {f"r{i}": free_port() for i in (1, 2, 3)}
        replicas = {
            name: await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controller", "run", "--manifests", str(manifests),
                "--db", url, "--listen", f"127.0.0.1:{port}", "--identity", name,
                "--interval", "1", "--call-timeout", "2", "--workspace-timeout", "3",
                "--concurrency", "4",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
                env={**os.environ})
            for name, port in ports.items()}
        try:
            async with aiohttp.ClientSession() as client:
                async def healthy(port: int) -> bool:
                    try:
                        async with client.get(f"http://127.0.0.1:{port}/healthz") as answer:
                            return answer.status == 200
                    except aiohttp.ClientError:
                        return False

                for name, port in ports.items():
                    await eventually(lambda port=port: healthy(port), 60, f"{name} up")

                async def register(workspace_id: str, replica: str) -> None:
                    async with client.post(
                            f"http://127.0.0.1:{ports[replica]}/registry/register",
                            json={"workspace_id": workspace_id, "plugins": [],
                                  "url": f"{fleet.url}/w/{workspace_id}"},
                            headers={"Authorization": f"Bearer {tokens[workspace_id]}"},
                    ) as answer:
                        assert answer.status == 200, await answer.text()

                # The first two thirds register round-robin with the three registries.
                first = ids[:30]
                await asyncio.gather(*(register(workspace_id, f"r{i % 3 + 1}")
                                       for i, workspace_id in enumerate(first)))
                # r3 dies the moment it is in the middle of an install.
                await eventually(lambda: fleet.in_flight_by("r3"), 30, "r3 acting")
                victims = {w for w, callers in fleet.in_flight.items() if "r3" in callers}
                replicas["r3"].send_signal(signal.SIGKILL)
                await replicas["r3"].wait()
                # The rest register with the two replicas left.
                await asyncio.gather(*(register(workspace_id, f"r{i % 2 + 1}")
                                       for i, workspace_id in enumerate(ids[30:])))

                def converged() -> bool:
                    return all(fleet.installed[w] >= want for w in ids)

                # A dead replica's claims run out after 2 x workspace timeout + 10 s.
                await eventually(converged, 60, "every workspace converged")
        finally:
            for process in replicas.values():
                if process.returncode is None:
                    process.terminate()
            for process in replicas.values():
                await asyncio.wait_for(process.wait(), 30)

        assert fleet.overlaps == [], f"calls to one workspace overlapped: {fleet.overlaps[:5]}"
        assert victims and all(fleet.installed[w] >= want for w in victims)
        assert set(fleet.installs_by) == {"r1", "r2", "r3"}, dict(fleet.installs_by)
        assert replicas["r1"].returncode == 0 and replicas["r2"].returncode == 0
        # Nothing is left claimed once the survivors stopped cleanly.
        with create_engine(url).connect() as connection:
            from sqlalchemy import text

            left = connection.execute(text(
                "SELECT count(*) FROM workspaces WHERE claimed_by IN ('r1', 'r2')")).scalar()
        assert left == 0
    finally:
        engine.dispose()
        drop()
