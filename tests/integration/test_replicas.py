"""Several controller replicas on one PostgreSQL database, as real processes on loopback:
they share the work, never act on one workspace at the same time, and take over the share
of a replica that dies (SIGKILL) in the middle of its work."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from sqlalchemy import create_engine

from controller.registry.app import issue_token
from controller.registry.serving import free_port
from controller.sim.fleet import Fleet, serve_fleet
from controller.store import make_engine, make_sessions, upgrade
from tests.support.helpers import TEMPLATE, fresh_postgres_database, wait_for, workspace_yaml

WORKSPACES = 45


@pytest.fixture
async def fleet() -> AsyncIterator[Fleet]:
    async with serve_fleet() as state:
        yield state


async def test_three_replicas_share_the_fleet_and_take_over_a_dead_ones_share(
    postgres_url: str, tmp_path: Path, fleet: Fleet
) -> None:
    url, drop = fresh_postgres_database(postgres_url)
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
                    await wait_for(lambda port=port: healthy(port), f"{name} up", 60)

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
                await wait_for(lambda: fleet.in_flight_by("r3"), "r3 acting", 30)
                victims = {w for w, callers in fleet.in_flight.items() if "r3" in callers}
                replicas["r3"].send_signal(signal.SIGKILL)
                await replicas["r3"].wait()
                # The rest register with the two replicas left.
                await asyncio.gather(*(register(workspace_id, f"r{i % 2 + 1}")
                                       for i, workspace_id in enumerate(ids[30:])))

                def converged() -> bool:
                    return all(fleet.installed[w] >= want for w in ids)

                # A dead replica's claims run out after 2 x workspace timeout + 10 s.
                await wait_for(converged, "every workspace converged", 60)
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
