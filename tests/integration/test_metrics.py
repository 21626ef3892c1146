"""Prometheus metrics, scraped from a running `pluginctl run` process as Prometheus would:
passes, actions by trigger, registry requests by endpoint and code, workspaces by phase,
drift, and the coverage metric (age of the least recently reconciled online workspace)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from controller.agent.simulated import Faults, ReferenceRuntime
from controller.domain.models import Plugin, Policy
from controller.engine import service
from controller.engine.loop import run_forever, wait_any
from controller.engine.manifests import Source
from controller.engine.metrics import Metrics
from controller.engine.queue import WorkQueue
from controller.registry.tokens import issue_token
from controller.runtime.driver import RuntimeDriver
from controller.store import make_engine, make_sessions, upgrade
from tests.support.helpers import (
    NOTES,
    SEO,
    RunProcess,
    Samples,
    fleet_dir,
    has,
    has_series,
    metric,
    scrape,
    wait_for,
)


def value(samples: Samples, name: str, **labels: str) -> float:
    return metric(samples, name, **labels)


async def test_metrics_of_a_running_controller(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'pluginctl.db'}"
    run = RunProcess(fleet_dir(tmp_path, ["ws-1", "ws-2"]), db)
    engine = make_engine(db)
    upgrade(engine)
    sessions = make_sessions(engine)
    runtimes = [ReferenceRuntime("ws-1", registry_url=run.url, heartbeat_interval=0.2,
                                 token=issue_token(sessions, "ws-1")),
                ReferenceRuntime("ws-2", registry_url=run.url, heartbeat_interval=0.2,
                                 token=issue_token(sessions, "ws-2"),
                                 faults=Faults(failing_plugins={"notes"}))]
    await run.start()
    try:
        for runtime in runtimes:
            await runtime.start()
            await runtime.register()
            runtime.start_heartbeats()
        await wait_for(lambda: has(runtimes[0], SEO, NOTES) and has(runtimes[1], SEO),
                       "installs")
        async with aiohttp.ClientSession() as client, client.post(
                f"{run.url}/registry/heartbeat", json={"workspace_id": "ws-1"},
                headers={"Authorization": "Bearer wrong"}) as answer:
            assert answer.status == 401

        async def after_a_full_pass() -> Samples | None:
            samples = await scrape(run.url)
            seen = value(samples, "pluginctl_workspaces", phase="Online") == 2 and \
                value(samples, "pluginctl_drifted_workspaces") == 1 and \
                value(samples, "pluginctl_stalled_workspaces") == 1  # ws-2, backing off
            return samples if seen else None

        samples = await wait_for(after_a_full_pass, "a full pass seen in the metrics")
    finally:
        for runtime in runtimes:
            await runtime.stop()
        await run.stop()
        engine.dispose()

    assert value(samples, "pluginctl_reconcile_total", result="out_of_sync") >= 1
    assert value(samples, "pluginctl_reconcile_time_seconds_count") >= 1
    assert value(samples, "pluginctl_plugin_actions_total", action="install", result="ok") >= 3
    assert value(samples, "pluginctl_plugin_actions_total", action="install",
                 result="failed") >= 1
    triggers = {dict(labels)["trigger"] for (name, labels) in samples
                if name == "pluginctl_plugin_actions_total"}
    # Registers hint the loop: their installs are the registry's (later ones may be retries).
    assert "registry" in triggers
    assert triggers <= {"periodic", "registry", "retry", "template-change"}
    assert value(samples, "pluginctl_registry_requests_total", endpoint="/registry/register",
                 code="200") >= 2
    assert value(samples, "pluginctl_registry_requests_total", endpoint="/registry/heartbeat",
                 code="200") >= 1
    assert value(samples, "pluginctl_registry_requests_total", endpoint="/registry/heartbeat",
                 code="401") == 1
    assert value(samples, "pluginctl_registry_request_seconds_count",
                 endpoint="/registry/heartbeat") >= 2
    age = value(samples, "pluginctl_oldest_reconcile_age_seconds")
    assert 0 <= age < 10  # full passes every second (+ the pass itself)


async def test_run_dry_run_and_the_guard_call_no_runtime(tmp_path: Path) -> None:
    """`run --dry-run` passes plan and report but call nobody. Then `run --max-workspaces 1`
    over the same two drifted workspaces holds every pass, small hinted ones included, and
    says so in pluginctl_guard_holding."""
    db = f"sqlite:///{tmp_path / 'pluginctl.db'}"
    engine = make_engine(db)
    upgrade(engine)
    sessions = make_sessions(engine)
    manifests = fleet_dir(tmp_path, ["ws-1", "ws-2"])
    dry = RunProcess(manifests, db, "--dry-run")
    guarded = RunProcess(manifests, db, "--max-workspaces", "1")
    guarded.port, guarded.url = dry.port, dry.url  # where the runtimes expect the registry
    runtimes = [ReferenceRuntime(name, registry_url=dry.url, heartbeat_interval=0.2,
                                 token=issue_token(sessions, name))
                for name in ("ws-1", "ws-2")]

    async def passes(run: RunProcess, full: int, hinted: int = 0) -> Samples:
        async def scraped() -> Samples | None:
            samples = await scrape(run.url)
            done = (value(samples, "pluginctl_reconcile_total", trigger="periodic") >= full
                    and value(samples, "pluginctl_reconcile_total", trigger="hint") >= hinted
                    # the fleet gauges: from the first full pass on, once it holds the role
                    and value(samples, "pluginctl_fleet_reporter") == 1)
            return samples if done else None
        return await wait_for(scraped, f"{full} full and {hinted} hinted passes"
                              )  # type: ignore[no-any-return]

    await dry.start()
    try:
        for runtime in runtimes:
            await runtime.start()
            await runtime.register()
            runtime.start_heartbeats()
        samples = await passes(dry, full=2)
        assert value(samples, "pluginctl_guard_holding") == 0
        assert value(samples, "pluginctl_plugin_actions_total") == 0
        assert all(r.calls == [] for r in runtimes)
        await dry.stop()

        await guarded.start()
        await passes(guarded, full=1)
        # A changed report hints a pass over ws-1 alone: one workspace, within the limit,
        # but the full pass's hold stands, so it holds too.
        runtimes[0].plugins["scratchpad"] = Plugin("scratchpad", "local://user/scratchpad")
        await runtimes[0].heartbeat()
        samples = await passes(guarded, full=2, hinted=1)
        assert value(samples, "pluginctl_guard_holding") == 1
        assert value(samples, "pluginctl_plugin_actions_total") == 0
        assert all(r.calls == [] for r in runtimes)
    finally:
        for runtime in runtimes:
            await runtime.stop()
        await dry.stop()
        await guarded.stop()


async def test_a_replica_that_runs_no_passes_exports_no_coverage_and_no_fleet_gauges(
    tmp_path: Path,
) -> None:
    """An operator's standby serves the registry but runs no passes (kube/operator.py runs
    the loop only while it holds the Lease): it must not export a coverage age growing with
    its uptime, nor fleet gauges. Here the registry and the metrics are the real ones
    (service.serve, scraped over HTTP) and the loop is the engine's, started and stopped the
    way the operator does on winning and losing the Lease."""
    db = f"sqlite:///{tmp_path / 'pluginctl.db'}"
    engine = make_engine(db)
    upgrade(engine)
    sessions = make_sessions(engine)
    policy = Policy(call_timeout=2.0, workspace_timeout=5.0)
    manifests = fleet_dir(tmp_path, ["ws-1"])
    metrics = Metrics()
    after_pass, on_failure = service.observed(metrics, on_pass=lambda _r, _t: None)
    leading, lost, stop = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def operator_like(queue: WorkQueue, stop: asyncio.Event) -> None:
        await wait_any((leading, stop), 60)  # the standby: waiting for the Lease
        async with RuntimeDriver.for_policy(policy) as driver:
            await run_forever(Source(manifests), sessions, driver, policy, interval=0.2,
                              stop=(stop, lost), queue=queue, on_pass=after_pass,
                              on_failure=on_failure, on_running=metrics.loop_running)
        await stop.wait()  # a standby again

    bound: list[int] = []
    serving = asyncio.create_task(service.serve(
        None, sessions, policy, host="127.0.0.1", port=0, interval=0.2,
        started=bound.append, stop=stop, loop_factory=operator_like, metrics=metrics))
    try:
        await wait_for(lambda: bound, "the registry listening")
        url = f"http://127.0.0.1:{bound[0]}"
        fleet_gauges = ("pluginctl_drifted_workspaces", "pluginctl_stalled_workspaces",
                        "pluginctl_workspaces", "pluginctl_guard_holding")

        async def standby() -> None:
            samples = await scrape(url)
            assert metric(samples, "pluginctl_registry_requests_total") >= 0
            assert not has_series(samples, "pluginctl_oldest_reconcile_age_seconds")
            assert not any(has_series(samples, name) for name in fleet_gauges)
            assert metric(samples, "pluginctl_fleet_reporter") == 0

        await standby()
        await asyncio.sleep(0.5)  # uptime that a coverage gauge would have counted
        await standby()

        leading.set()

        async def reporting() -> Samples | None:
            samples = await scrape(url)
            return samples if metric(samples, "pluginctl_fleet_reporter") == 1 else None

        samples = await wait_for(reporting, "the leader reporting the fleet", 10)
        assert 0 <= metric(samples, "pluginctl_oldest_reconcile_age_seconds") < 2
        assert all(has_series(samples, name) for name in fleet_gauges)

        lost.set()  # the leadership lost: passes end, and so does what they reported

        async def stood_down() -> bool:
            samples = await scrape(url)
            return not has_series(samples, "pluginctl_oldest_reconcile_age_seconds")

        await wait_for(stood_down, "the coverage gauge gone", 10)
        await standby()
    finally:
        stop.set()
        await asyncio.wait_for(serving, 30)
        engine.dispose()
