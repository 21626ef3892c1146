"""The fault-injection suite. Each case breaks one real part — a runtime, the database, the
controller process, the registry, the delivery of edges, the clock — and asserts that the
fleet converges afterwards, with nothing lost and nothing done twice that should not be.
(The Kubernetes API server going away is in test_kubernetes; a replica killed among others
in test_replicas.)"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from freezegun import freeze_time

from controller.agent.simulated import Faults, ReferenceRuntime
from controller.domain import backoff, planner, tokens
from controller.domain.desired import Desired
from controller.domain.models import Attempt, Phase, Policy, utcnow
from controller.domain.outcomes import Changes
from controller.domain.status import PluginState
from controller.domain.status import build as build_status
from controller.engine import service
from controller.engine.loop import PassCallback
from controller.engine.queue import Trigger, WorkQueue
from controller.engine.report import PassReport
from controller.registry.app import Ingest
from controller.registry.serving import start_site
from controller.registry.tokens import issue_token
from controller.sim.fleet import serve_fleet
from controller.store import Sessions, make_engine, make_sessions, queries, transaction, upgrade
from tests.support import pg
from tests.support.helpers import (
    NOTES,
    SEO,
    RunProcess,
    RuntimeFactory,
    fleet,
    fleet_dir,
    has,
    one_pass,
    seen_of,
    wait_for,
)

LOSS = 0.3  # the share of edges the lossy harness drops


async def _timeout(runtime: ReferenceRuntime) -> None:
    runtime.faults.install_delay = 3.0  # the policy below allows 0.5 s per call


async def _server_error(runtime: ReferenceRuntime) -> None:
    runtime.faults.unavailable = True


async def _refused(runtime: ReferenceRuntime) -> None:
    await runtime.stop()  # registered, then gone: connection refused


async def _hang(runtime: ReferenceRuntime) -> None:
    runtime.faults.hang = True


async def _garbage(runtime: ReferenceRuntime) -> None:
    runtime.faults.garbage = True


async def _heal(runtime: ReferenceRuntime) -> None:
    runtime.faults.install_delay = 0.0
    runtime.faults.unavailable = runtime.faults.hang = runtime.faults.garbage = False
    if not runtime.running:
        await runtime.start()  # comes back (on a new port, as a rescheduled pod would)
        await runtime.register()


Fault = Callable[[ReferenceRuntime], Awaitable[None]]


@pytest.mark.parametrize(("fault", "message"), [
    (_timeout, "timed out after 0.5s"),
    (_server_error, "HTTP 503: runtime unavailable"),
    (_refused, "ClientConnectorError"),
    (_hang, "timed out after 0.5s"),
    (_garbage, "answer is not JSON"),
], ids=["timeout", "5xx", "refused", "hang-mid-response", "garbage"])
async def test_a_faulty_runtime_backs_off_alone_and_converges_once_healed(
    sessions: Sessions, runtime_factory: RuntimeFactory, fault: Fault, message: str
) -> None:
    """Ten simulated minutes of passes every 15 s against a broken runtime: it is tried a
    bounded number of times (backoff, not every pass), its error is in its status, the
    healthy workspace beside it converges undisturbed, and once healed it converges too."""
    policy = Policy(call_timeout=0.5, offline_after=timedelta(days=1))
    broken = await runtime_factory("broken")
    healthy = await runtime_factory("healthy")
    desired = fleet("broken", "healthy")
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        await broken.register()
        await healthy.register()
        await fault(broken)
        for _ in range(40):
            await one_pass(desired, sessions, policy)
            clock.tick(15)
        now = utcnow()
        with transaction(sessions) as session:
            observed = queries.load_observed(session, now=utcnow())["broken"]
        state = build_status(desired.workspaces["broken"], observed, now, policy)
        seo = next(p for p in state.plugins if p.name == "seo-all")
        assert seo.state is PluginState.FAILED and message in seo.message, seo
        # 5 s doubling to the cap, jitter up to -20 %: 7 to 9 tries in ten minutes, not 40.
        assert 5 <= seo.attempts <= 10, seo.attempts
        last_try = observed.attempts["seo-all"].last_attempt_at
        assert seo.next_retry_at is not None and seo.next_retry_at > last_try
        assert not state.in_sync
        assert has(healthy, SEO, NOTES) and healthy.count("PUT") == 2

        await _heal(broken)
        clock.tick(policy.backoff_cap.total_seconds())  # every retry is due by now
        healed = await one_pass(desired, sessions, policy)
    assert healed.in_sync, healed.summary()
    assert has(broken, SEO, NOTES)
    with transaction(sessions) as session:
        assert queries.load_observed(session, now=utcnow())["broken"].attempts == {}


@asynccontextmanager
async def controller(sessions: Sessions, desired: Desired, policy: Policy,
                     on_pass: PassCallback | None = None) -> AsyncIterator[str]:
    """`pluginctl run` in this process (registry + loop, a full pass every second)."""
    stop = asyncio.Event()
    ports: list[int] = []
    serving = asyncio.create_task(service.serve(lambda: desired, sessions, policy,
                                                host="127.0.0.1", port=0, interval=1.0,
                                                started=ports.append,
                                                stop=stop, on_pass=on_pass))
    await wait_for(lambda: ports or serving.done(), "the registry listening")
    try:
        yield f"http://127.0.0.1:{ports[0]}"
        assert not serving.done(), "the controller stopped on its own"
    finally:
        stop.set()
        await serving


@asynccontextmanager
async def runtimes(sessions: Sessions, registry_url: str, names: list[str],
                   faults: Faults | None = None) -> AsyncIterator[list[ReferenceRuntime]]:
    """Reference runtimes that register and then heartbeat every 0.2 s."""
    started = [ReferenceRuntime(name, registry_url=registry_url, faults=faults,
                                token=issue_token(sessions, name), heartbeat_interval=0.2)
               for name in names]
    try:
        for runtime in started:
            await runtime.start()
            await runtime.register()
            runtime.start_heartbeats()
        yield started
    finally:
        for runtime in started:
            await runtime.stop()


def owned_everywhere(sessions: Sessions, names: list[str]) -> bool:
    with transaction(sessions) as session:
        observed = queries.load_observed(session, now=utcnow())
    return all(name in observed and set(observed[name].owned) == {"seo-all", "notes"}
               and not observed[name].attempts for name in names)


@pytest.mark.postgres
async def test_postgres_stopped_mid_pass_and_started_again() -> None:
    """PostgreSQL dies while installs are under way: the registry answers 503, the pass's
    writes fail whole (one transaction each), the loop keeps running; once the server is
    back the fleet converges without help, each install done at most once more (idempotent)."""
    server = await asyncio.to_thread(pg.start, True)
    engine = make_engine(server.url)
    try:
        upgrade(engine)
        sessions = make_sessions(engine)
        names = [f"ws-{i}" for i in range(6)]
        policy = Policy(call_timeout=5.0)
        async with controller(sessions, fleet(*names), policy) as url, \
                runtimes(sessions, url, names, Faults(install_delay=1.0)) as fleet_:
            await wait_for(lambda: any(r.count("PUT") for r in fleet_), "installs under way")
            await asyncio.to_thread(server.stop)  # immediate: connections die mid-statement

            async def refused() -> bool:
                async with aiohttp.ClientSession() as client, client.post(
                        f"{url}/registry/heartbeat", json={"workspace_id": "ws-0"},
                        headers={"Authorization": f"Bearer {fleet_[0].token}"}) as answer:
                    return answer.status == 503
            await wait_for(refused, "the registry to answer 503 while the store is down")
            await asyncio.to_thread(server.start)

            await wait_for(lambda: all(has(r, SEO, NOTES) for r in fleet_)
                           and owned_everywhere(sessions, names), "convergence", timeout=60)
        for runtime in fleet_:
            for plugin in ("seo-all", "notes"):
                assert runtime.count("PUT", f"/plugins/{plugin}") <= 2, runtime.calls
        with transaction(sessions) as session:
            observed = queries.load_observed(session, now=utcnow())
        assert sorted(observed) == names
    finally:
        engine.dispose()
        await asyncio.to_thread(pg.destroy, server)


async def test_controller_killed_mid_pass_converges_on_restart(tmp_path: Path) -> None:
    """SIGKILL while installs are in flight, then a new process (a new identity, as after a
    pod restart): the dead process's claims run out, every workspace converges, no plugin is
    installed more than once beyond one idempotent repeat, and the new process stays up."""
    names = [f"ws-{i:02d}" for i in range(20)]
    db = f"sqlite:///{tmp_path / 'pluginctl.db'}"
    run = RunProcess(fleet_dir(tmp_path, names), db, "--call-timeout", "2",
                     "--workspace-timeout", "3", "--concurrency", "4")
    engine = make_engine(db)
    upgrade(engine)
    sessions = make_sessions(engine)
    tokens = {name: issue_token(sessions, name) for name in names}
    async with serve_fleet() as fleet_:
        await run.start()
        try:
            async with aiohttp.ClientSession() as client:
                for name in names:
                    async with client.post(
                            f"{run.url}/registry/register",
                            json={"workspace_id": name, "url": f"{fleet_.url}/w/{name}",
                                  "plugins": []},
                            headers={"Authorization": f"Bearer {tokens[name]}"}) as answer:
                        assert answer.status == 200
            await wait_for(lambda: any(fleet_.in_flight.values()), "installs in flight")
            await run.kill()
            await run.start()
            await wait_for(lambda: all(fleet_.installed[n] >= {"seo-all", "notes"}
                                       for n in names), "every workspace converged", 60)
            await wait_for(lambda: owned_everywhere(sessions, names), "outcomes recorded")
            assert run.process is not None and run.process.returncode is None
        finally:
            code = await run.stop()
    engine.dispose()
    assert code == 0
    assert fleet_.overlaps == []
    assert max(fleet_.puts.values()) <= 2, fleet_.puts
    assert len(fleet_.puts) == 2 * len(names)


async def test_registry_restarted_while_heartbeats_flow(tmp_path: Path) -> None:
    """The registry (with its loop) goes away and comes back while runtimes heartbeat every
    0.2 s: their heartbeats fail meanwhile and then succeed again without help, a change of
    desired state made after the restart reaches every online workspace, and a workspace
    that went offline gets no call at all."""
    names = [f"ws-{i}" for i in range(4)]
    db = f"sqlite:///{tmp_path / 'pluginctl.db'}"
    directory = fleet_dir(tmp_path, [*names, "gone"])
    run = RunProcess(directory, db, "--offline-after", "3", "--call-timeout", "2")
    engine = make_engine(db)
    upgrade(engine)
    sessions = make_sessions(engine)
    await run.start()
    try:
        async with runtimes(sessions, run.url, names) as live:
            gone = ReferenceRuntime("gone", registry_url=run.url,
                                    token=issue_token(sessions, "gone"))
            await gone.start()
            try:
                await gone.register()  # and never a heartbeat: offline 3 s after its last word
                await wait_for(lambda: all(has(r, SEO, NOTES) for r in [*live, gone]),
                               "first convergence")
                await wait_for(lambda: not online(sessions, "gone"), "gone offline", 10)
                calls_to_gone = len(gone.calls)

                await run.stop()
                before = [r.heartbeats for r in live]
                manifest = directory / "fleet.yaml"
                manifest.write_text(manifest.read_text().replace(
                    "  plugins:\n", "  plugins:\n    - source: local://plugins/extra\n", 1))
                await run.start()
                await wait_for(lambda: all(r.heartbeats > b for r, b in zip(live, before,
                                                                            strict=True)),
                               "heartbeats accepted again")
                await wait_for(lambda: all("extra" in r.plugins for r in live),
                               "the new plugin everywhere online", 30)
                assert len(gone.calls) == calls_to_gone and "extra" not in gone.plugins
            finally:
                await gone.stop()
    finally:
        code = await run.stop()
        engine.dispose()
    assert code == 0


def online(sessions: Sessions, workspace_id: str) -> bool:
    with transaction(sessions) as session:
        observed = queries.load_observed(session, now=utcnow(), only=[workspace_id])
    return observed[workspace_id].is_online(utcnow(), timedelta(seconds=3))


@dataclass
class PassCount:
    full: int = 0  # full passes the loop has finished


class Tracked(ReferenceRuntime):
    """Remembers how many full passes the loop had finished when its register first got
    through to the registry."""

    def __init__(self, *args: Any, passes: PassCount, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.passes = passes  # full passes finished so far, shared with the test
        self.registered_at: int | None = None

    async def register(self) -> dict[str, Any]:
        answer = await super().register()
        if self.registered_at is None:
            self.registered_at = self.passes.full
        return answer


@asynccontextmanager
async def lossy_proxy(target: str, rand: random.Random) -> AsyncIterator[str]:
    """A proxy in front of the registry that loses a share of the calls (the runtime sees an
    error; the registry never hears of it)."""
    lost: list[str] = []

    async def forward(request: web.Request) -> web.Response:
        if rand.random() < LOSS:
            lost.append(request.path)
            return web.json_response({"error": "lost by the harness"}, status=503)
        async with aiohttp.ClientSession() as client, client.post(
                target + request.path, data=await request.read(),
                headers={k: v for k, v in request.headers.items()
                         if k in ("Authorization", "Content-Type")}) as answer:
            return web.Response(body=await answer.read(), status=answer.status,
                                content_type="application/json")

    app = web.Application()
    app.router.add_post("/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        yield f"http://127.0.0.1:{await start_site(runner, '127.0.0.1', 0)}"
    finally:
        assert lost, "the harness lost nothing"
        await runner.cleanup()


async def test_lost_edges_still_converge_within_two_full_passes(
    sessions: Sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    """30 % of registers and heartbeats never reach the registry, and 30 % of the hints the
    registry gives the loop are lost: every workspace still converges by the end of the
    second full pass after its register got through (the documented bound)."""
    rand = random.Random(7)
    dropped: list[str] = []
    original = WorkQueue.__call__

    def lossy_hint(self: WorkQueue, workspace_id: str, *reason: Any) -> None:
        if rand.random() < LOSS:
            dropped.append(workspace_id)
        else:
            original(self, workspace_id, *reason)

    monkeypatch.setattr(WorkQueue, "__call__", lossy_hint)
    names = [f"ws-{i:02d}" for i in range(12)]
    full_passes = PassCount()
    converged_at: dict[str, int] = {}
    fleet_: list[Tracked] = []

    def on_pass(_report: PassReport, trigger: Trigger) -> None:
        full_passes.full += trigger == Trigger.PERIODIC
        for runtime in fleet_:
            if runtime.workspace_id not in converged_at and has(runtime, SEO, NOTES):
                converged_at[runtime.workspace_id] = full_passes.full

    policy = Policy(call_timeout=2.0)
    async with controller(sessions, fleet(*names), policy, on_pass) as url, \
            lossy_proxy(url, rand) as proxy:
        for index, name in enumerate(names):
            runtime = Tracked(name, registry_url=proxy, report=index % 2 == 0,
                              token=issue_token(sessions, name), heartbeat_interval=0.2,
                              passes=full_passes)
            await runtime.start()
            fleet_.append(runtime)
        try:
            for runtime in fleet_:
                runtime.start_heartbeats()  # heartbeats answered 409 re-register (also lossy)
                with contextlib.suppress(aiohttp.ClientResponseError):
                    await runtime.register()
            await wait_for(lambda: len(converged_at) == len(names), "convergence", 60)
            registered_at = {r.workspace_id: r.registered_at for r in fleet_
                             if r.registered_at is not None}
        finally:
            for runtime in fleet_:
                await runtime.stop()
    assert dropped, "no hint was lost"
    late = {n: (registered_at[n], converged_at[n]) for n in names
            if converged_at[n] > registered_at[n] + 2}
    assert not late, late


async def test_clock_jumps_wedge_nothing(sessions: Sessions) -> None:
    """The clock jumps a day forward and a day back (freezegun). Forward: the fleet looks
    offline until the next heartbeat, then online. Back: a heartbeat is believed again
    (last seen is not stuck a day ahead, so a runtime that then dies goes offline on time),
    a claim left by a dead replica does not hold for a day, a token revoked after the jump
    is still dropped by the registry, and backoff is due rather than waited out (see also
    test_planner's clock test)."""
    policy = Policy()
    token = "token-of-ws-1"
    ingest = Ingest(sessions, lambda _workspace_id: None)

    def phase() -> Phase:
        with transaction(sessions) as session:
            seen = queries.load_observed(session, now=utcnow(), only=["ws-1"])["ws-1"]
        return planner.phase_of(None, seen, utcnow(), policy, desired_known=False)

    def alive() -> None:
        with transaction(sessions) as session:
            queries.touch(session, {"ws-1": utcnow()})

    with freeze_time("2026-06-01 12:00:00") as clock:
        with transaction(sessions) as session:
            queries.add_token(session, "ws-1", tokens.digest(token), now=utcnow())
            queries.record_register(session, "ws-1", "http://127.0.0.1:9", report=[], now=utcnow())
        ingest.warm_up()
        ingest.flush({})
        assert phase() is Phase.ONLINE

        clock.tick(timedelta(days=1))
        assert phase() is Phase.OFFLINE
        alive()
        assert phase() is Phase.ONLINE
        with transaction(sessions) as session:
            assert queries.claim(session, ["ws-1"], "dead-replica", now=utcnow(),
                                 until=utcnow() + timedelta(seconds=130)) == {"ws-1"}
            queries.apply_many(session, [(Changes("ws-1", attempts={"seo-all": Attempt(
                1, "HTTP 500", utcnow(), utcnow() + timedelta(seconds=5))}), utcnow())])

        clock.tick(-timedelta(days=2))
        alive()
        assert phase() is Phase.ONLINE
        clock.tick(policy.offline_after + timedelta(seconds=1))
        assert phase() is Phase.OFFLINE  # not "online" for another day
        now = utcnow()
        with transaction(sessions) as session:
            assert queries.claim(session, ["ws-1"], "replica-b", now=now,
                                 until=now + timedelta(seconds=130)) == {"ws-1"}
            attempt = seen_of(session, "ws-1").attempts["seo-all"]
            queries.revoke_tokens(session, [tokens.digest(token)], now)
        assert backoff.is_due(attempt, now, policy)
        ingest.flush({})
        assert ingest.tokens.get(tokens.digest(token)) is None
