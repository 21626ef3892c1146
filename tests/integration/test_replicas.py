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

from controller.agent.simulated import Faults, ReferenceRuntime
from controller.registry.serving import free_port
from controller.registry.tokens import issue_token
from controller.sim.fleet import Fleet, serve_fleet
from controller.store import make_engine, make_sessions, upgrade
from controller.store.roles import ExclusiveRole
from tests.support.helpers import (
    NOTES,
    SEO,
    TEMPLATE,
    RunProcess,
    Samples,
    fleet_dir,
    fresh_postgres_database,
    has,
    has_series,
    metric,
    scrape,
    wait_for,
    workspace_yaml,
)

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


async def test_two_replicas_export_the_fleet_gauges_once(postgres_url: str,
                                                         tmp_path: Path) -> None:
    """Both replicas scraped, as a Prometheus over the deployment would: the fleet gauges
    summed over them equal the truth (each replica's full pass sees the whole fleet, so
    only one, the reporter, exports them), and when the reporter dies the other takes over."""
    url, drop = fresh_postgres_database(postgres_url)
    engine = make_engine(url)
    manifests = fleet_dir(tmp_path, ["ws-1", "ws-2"])
    replicas = [RunProcess(manifests, url, "--identity", name) for name in ("r1", "r2")]
    runtimes: list[ReferenceRuntime] = []
    try:
        upgrade(engine)
        sessions = make_sessions(engine)
        for replica in replicas:
            await replica.start()
        runtimes += [
            ReferenceRuntime("ws-1", registry_url=replicas[0].url, heartbeat_interval=0.2,
                             token=issue_token(sessions, "ws-1")),
            ReferenceRuntime("ws-2", registry_url=replicas[1].url, heartbeat_interval=0.2,
                             token=issue_token(sessions, "ws-2"),
                             faults=Faults(failing_plugins={"notes"}))]
        for runtime in runtimes:
            await runtime.start()
            await runtime.register()
            runtime.start_heartbeats()
        await wait_for(lambda: has(runtimes[0], SEO, NOTES) and has(runtimes[1], SEO),
                       "installs", 60)

        async def full_passes() -> list[float]:
            return [metric(await scrape(r.url), "pluginctl_reconcile_total", trigger="periodic")
                    for r in replicas]

        # Two more full passes on each replica: both have seen the fleet as it now stands.
        seen = await full_passes()

        async def both_passed_twice() -> bool:
            return all(now >= then + 2 for now, then in zip(await full_passes(), seen,
                                                            strict=True))

        await wait_for(both_passed_twice, "two full passes on each replica", 30)

        async def summed() -> tuple[list[Samples], dict[str, float]]:
            pages = [await scrape(r.url) for r in replicas]
            return pages, {
                "online": sum(metric(p, "pluginctl_workspaces", phase="Online") for p in pages),
                "drifted": sum(metric(p, "pluginctl_drifted_workspaces") for p in pages),
                "stalled": sum(metric(p, "pluginctl_stalled_workspaces") for p in pages),
                "reporters": sum(metric(p, "pluginctl_fleet_reporter") for p in pages)}

        truth = {"online": 2, "drifted": 1, "stalled": 1, "reporters": 1}  # ws-2 backs off
        pages, totals = await summed()
        assert totals == truth
        reporter = next(i for i, page in enumerate(pages)
                        if metric(page, "pluginctl_fleet_reporter") == 1)
        other = replicas[1 - reporter]
        assert not has_series(pages[1 - reporter], "pluginctl_drifted_workspaces")
        # Both run passes, so both have a coverage age; the fleet's is the smaller.
        assert all(has_series(page, "pluginctl_oldest_reconcile_age_seconds")
                   for page in pages)

        await replicas[reporter].kill()  # its advisory lock goes with its connection

        async def taken_over() -> bool:
            page = await scrape(other.url)
            return metric(page, "pluginctl_fleet_reporter") == 1 and \
                metric(page, "pluginctl_drifted_workspaces") == 1 and \
                metric(page, "pluginctl_workspaces", phase="Online") == 2

        await wait_for(taken_over, "the other replica reporting the fleet", 15)
    finally:
        for runtime in runtimes:
            await runtime.stop()
        for replica in replicas:
            await replica.stop()
        engine.dispose()
        drop()


def test_the_reporter_role_is_held_by_one_process_at_a_time(db_url: str) -> None:
    """The role behind the fleet gauges, on SQLite (an flock beside the file) and
    PostgreSQL (an advisory lock): taken by one holder, refused to the other, free again
    once released. (Two roles in one process stand for two replicas: each holds its own
    lock file handle or connection.)"""
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        first, second = (ExclusiveRole(make_sessions(engine), "fleet-metrics")
                         for _ in range(2))
        assert first.hold() and first.hold()  # held, and still held
        assert not second.hold()
        first.release()
        assert second.hold()
        assert not first.hold()
        second.release()
    finally:
        engine.dispose()
