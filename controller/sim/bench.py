"""`pluginctl bench`: measures the engine against naive baselines run in the same command,
so that every figure is also a ratio (these machines are shared and noisy):

- noop_pass: a pass over N converged online workspaces x 5 plugins, vs the naive
  per-workspace loop (two queries per workspace, as edge-triggered platforms do it);
- heartbeat: sustained authenticated heartbeats per second, p50 and p99, against the
  registry running as its own process (and how many its /metrics counted), vs a bare JSON
  endpoint of the same HTTP stack (`controller.sim.bare`); the load comes from wrk
  (`controller.sim.wrk`) when it is on PATH, else from this module's Python client, and the
  result says which;
- converge: K workspaces of the simulated fleet (`controller.sim.fleet`, a process of its
  own) registering at once, each missing 3 plugins, with 20 ms installs, vs issuing the same
  installs directly with the same concurrency;
- memory: peak RSS of a process (`controller.sim.memory`) holding N workspaces' state
  through a pass, vs the same process before it loaded anything;
- agent_install: the agent installing 3 plugins (40 files each) from a local git repository
  into a plugins directory with a cold cache, a warm cache (a wiped box) and when already
  installed, vs the naive way (a shallow clone of the tag, then copying the three
  directories)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from controller.domain import tokens
from controller.domain.desired import Desired
from controller.domain.models import Plugin, Policy, utcnow
from controller.engine.loop import run_forever
from controller.engine.passes import reconcile_once
from controller.engine.queue import WorkQueue
from controller.registry.app import make_app
from controller.registry.serving import free_port, runner_for, start_site
from controller.runtime.driver import RuntimeDriver
from controller.sim import wrk
from controller.sim.fleet import FleetProcess
from controller.sim.memory import PLUGINS, desired_fleet
from controller.sim.scrape import scrape
from controller.store import (
    Sessions,
    count_statements,
    make_engine,
    make_sessions,
    queries,
    transaction,
    upgrade,
)

Say = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    name: str  # "sqlite" or "postgresql"
    url_for: Callable[[str], str]  # a fresh database URL for a label


def _seed(sessions: Sessions, ids: list[str], url: str, plugins: list[Plugin]) -> None:
    now = utcnow()
    batch = 20_000
    for start in range(0, len(ids), batch):
        with transaction(sessions) as session:
            queries.seed_fleet(session, [(i, url, plugins, tokens.digest(f"plc_bench_{i}"))
                                         for i in ids[start:start + batch]], now)


def _ratio(value: float, baseline: float) -> float | None:
    """value / baseline, or None when the baseline was not measured (zero, or not finite)."""
    if not baseline or not math.isfinite(baseline) or not math.isfinite(value):
        return None
    return round(value / baseline, 2)


# --- no-op pass --------------------------------------------------------------------------------

async def noop_pass(target: Target, sizes: list[int], naive_max: int, say: Say
                    ) -> list[dict[str, Any]]:
    results = []
    for n in sizes:
        engine = make_engine(target.url_for(f"noop{n}"))
        upgrade(engine)
        sessions = make_sessions(engine)
        ids = [f"ws-{i:07d}" for i in range(n)]
        say(f"noop_pass/{target.name}: seeding {n} converged workspaces")
        _seed(sessions, ids, "http://127.0.0.1:9/", PLUGINS)
        desired = desired_fleet(ids, PLUGINS)
        policy = Policy()
        timings = []
        calls = 0
        pass_queries = 0
        async with RuntimeDriver(timeout=1.0) as driver:
            for _ in range(3):
                with count_statements(sessions) as statements:
                    started = time.perf_counter()
                    report = await reconcile_once(desired, sessions, driver, policy)
                    timings.append(time.perf_counter() - started)
                pass_queries = len(statements)
                calls += sum(len(r.outcomes) for r in report.results)
                if not report.in_sync or report.online != n:
                    raise RuntimeError("the seeded fleet should be online and in sync")
        entry: dict[str, Any] = {
            "database": target.name, "workspaces": n, "pass_seconds": round(min(timings), 4),
            "first_pass_seconds": round(timings[0], 4),
            "queries_per_pass": pass_queries, "runtime_calls": calls,
            "api_server_writes": None,
        }
        if n <= naive_max:
            started = time.perf_counter()
            naive_queries = 0
            with count_statements(sessions) as statements:
                with transaction(sessions) as session:
                    for workspace_id in ids:
                        report_, owned = queries.naive_read(session, workspace_id)
                        _ = report_ == desired.workspaces[workspace_id].plugins and owned
                naive_queries = len(statements)
            naive = time.perf_counter() - started
            entry["baseline"] = {"naive_seconds": round(naive, 4),
                                 "naive_queries": naive_queries}
            entry["speedup_vs_naive"] = _ratio(entry["baseline"]["naive_seconds"],
                                               entry["pass_seconds"])
        say(f"noop_pass/{target.name}: {n} workspaces in {min(timings):.3f}s, "
            f"{pass_queries} queries" + (f", {entry['speedup_vs_naive']}x the naive loop"
                                            if "speedup_vs_naive" in entry else ""))
        results.append(entry)
        engine.dispose()
    return results


# --- heartbeat ingest --------------------------------------------------------------------------

async def _wait_http(url: str, deadline: float, process: subprocess.Popen[bytes]) -> None:
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{url}: the server exited with {process.returncode}")
            try:
                async with client.post(url, json={}) as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


@dataclass(frozen=True)
class Bodies:
    """The heartbeat bodies and tokens of the load, prepared before it starts."""

    ids: list[str]
    body_for: dict[str, bytes]

    @classmethod
    def of(cls, ids: list[str]) -> Bodies:
        return cls(ids, {i: json.dumps({"workspace_id": i, "plugins": [
            p.to_json() for p in PLUGINS]}).encode() for i in ids})


async def _worker(client: aiohttp.ClientSession, url: str, bodies: Bodies, *, offset: int,
                  step: int, stop_at: float) -> tuple[list[float], int]:
    """One connection's share of the load: (latencies, answers other than 200)."""
    latencies: list[float] = []
    errors = 0
    k = offset
    while time.monotonic() < stop_at:
        workspace_id = bodies.ids[k % len(bodies.ids)]
        k += step
        started = time.perf_counter()
        async with client.post(url, data=bodies.body_for[workspace_id], headers={
                "Authorization": f"Bearer plc_bench_{workspace_id}",
                "Content-Type": "application/json"}) as response:
            await response.read()
            if response.status != 200:
                errors += 1
        latencies.append(time.perf_counter() - started)
    return latencies, errors


async def _load(url: str, bodies: Bodies, seconds: float, connections: int) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=connections)
    stop_at = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=connector) as client:
        started = time.monotonic()
        shares = await asyncio.gather(*(_worker(client, url, bodies, offset=i,
                                                step=connections, stop_at=stop_at)
                                        for i in range(connections)))
        elapsed = time.monotonic() - started
    latencies = sorted(latency for share, _ in shares for latency in share)
    return {
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
        "requests": len(latencies), "errors": sum(errors for _, errors in shares),
    }


async def _heartbeats_counted(base_url: str) -> int:
    """Heartbeats the registry answered 200, as its own /metrics counted them."""
    async with aiohttp.ClientSession() as client:
        page = await scrape(client, base_url)
    return int(page.total("pluginctl_registry_requests_total",
                          endpoint="/registry/heartbeat", code="200"))


def _cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) a process has used so far, from /proc (None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _drive_measured(url: str, bodies: Bodies, seconds: float, connections: int, *,
                          generator: str, pid: int) -> dict[str, Any]:
    """_drive, plus the server's CPU time per answered request (ms): the figure that moves
    least on a shared machine, and what bounds the rate once the server's core is full."""
    before = _cpu_seconds(pid)
    result = await _drive(url, bodies, seconds, connections, generator=generator)
    after = _cpu_seconds(pid)
    result["server_cpu_ms_per_request"] = (
        round((after - before) * 1000 / result["requests"], 3)
        if before is not None and after is not None and result["requests"] else None)
    return result


def _load_generator() -> str:
    """What drives the heartbeat load: wrk when it is on PATH (a C client that leaves the
    cores to the server), else the Python client of this module."""
    return "wrk" if wrk.available() else "python"


LOAD_GENERATORS = {
    "wrk": "wrk (C load generator, 2 threads, on the same 2 cores)",
    "python": "python asyncio client (one process, on the same 2 cores; wrk not on PATH)",
}


async def _drive(url: str, bodies: Bodies, seconds: float, connections: int, *,
                 generator: str) -> dict[str, Any]:
    if generator == "wrk":
        pairs = [wrk.Pair(f"plc_bench_{i}", bodies.body_for[i]) for i in bodies.ids]
        return await wrk.measure(url, pairs, wrk.Load(seconds, connections))
    return await _load(url, bodies, seconds, connections)


def _start_servers(url: str, empty: str) -> tuple[int, int, list[subprocess.Popen[bytes]]]:
    """The registry (`pluginctl run`, its own process) and the bare endpoint."""
    port, bare_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "controller", "--log-level", "warning", "run",
         "--manifests", empty, "--db", url, "--listen", f"127.0.0.1:{port}",
         "--interval", "3600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    bare = subprocess.Popen([sys.executable, "-m", "controller.sim.bare", str(bare_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return port, bare_port, [server, bare]


async def heartbeat(target: Target, workspaces: int, seconds: float, *, connections: int,
                    say: Say) -> dict[str, Any]:
    url = target.url_for("heartbeat")
    engine = make_engine(url)
    upgrade(engine)
    ids = [f"ws-{i:07d}" for i in range(workspaces)]
    say(f"heartbeat/{target.name}: seeding {workspaces} registered workspaces")
    _seed(make_sessions(engine), ids, "http://127.0.0.1:9/", PLUGINS)
    engine.dispose()
    bodies = Bodies.of(ids)
    generator = _load_generator()
    with tempfile.TemporaryDirectory() as empty:
        port, bare_port, processes = _start_servers(url, empty)
        try:
            deadline = time.monotonic() + 60
            await _wait_http(f"http://127.0.0.1:{port}/registry/heartbeat", deadline,
                             processes[0])
            await _wait_http(f"http://127.0.0.1:{bare_port}/registry/heartbeat", deadline,
                             processes[1])
            # Unmeasured: the token cache is loaded while serving starts, cold.
            await _drive(f"http://127.0.0.1:{port}/registry/heartbeat", bodies, 1.0,
                         connections, generator=generator)
            before = await _heartbeats_counted(f"http://127.0.0.1:{port}")
            say(f"heartbeat/{target.name}: {seconds:g}s of load, {connections} connections, "
                f"by {generator}")
            measured = await _drive_measured(f"http://127.0.0.1:{port}/registry/heartbeat",
                                             bodies, seconds, connections, generator=generator,
                                             pid=processes[0].pid)
            counted = await _heartbeats_counted(f"http://127.0.0.1:{port}") - before
            baseline = await _drive_measured(
                f"http://127.0.0.1:{bare_port}/registry/heartbeat", bodies, seconds,
                connections, generator=generator, pid=processes[1].pid)
        finally:
            for process in processes:
                process.terminate()
                process.wait(30)
    result = {"database": target.name, "workspaces": workspaces, "connections": connections,
              **measured, "registry_counted_ok": counted,
              "baseline": {"bare_endpoint": baseline},
              "ratio_to_bare": _ratio(measured["requests_per_second"],
                                      baseline["requests_per_second"]),
              "load_generator": LOAD_GENERATORS[generator]}
    say(f"heartbeat/{target.name}: {measured['requests_per_second']}/s "
        f"(p50 {measured['p50_ms']} ms, p99 {measured['p99_ms']} ms), bare endpoint "
        f"{baseline['requests_per_second']}/s (p50 {baseline['p50_ms']} ms, "
        f"p99 {baseline['p99_ms']} ms), by {generator}; server CPU per request "
        f"{measured['server_cpu_ms_per_request']} ms (bare "
        f"{baseline['server_cpu_ms_per_request']} ms)")
    return result


# --- convergence --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Registered:
    """When the storm was over (seconds from its start), and when each workspace's register
    was sent (wall clock of the fleet's process, as its done times are)."""

    storm_seconds: float
    at: dict[str, float]


async def _storm_then_singles(fleet: FleetProcess, ids: list[str], singles: list[str],
                              say: Say) -> Registered:
    """Every id registers at once, until all converged; then the singles one at a time into
    the quiet, converged fleet: the latency a single workspace sees from its register to
    its last plugin."""
    started = time.time()
    registered_at = await fleet.register(ids)
    say(f"  all registered after {time.time() - started:.2f}s")
    deadline = started + 600
    while await fleet.done_count() < len(ids) and time.time() < deadline:
        await asyncio.sleep(0.02)
    storm = time.time() - started
    say(f"  {len(singles)} more register one at a time")
    for workspace_id in singles:
        registered_at.update(await fleet.register([workspace_id]))
        while await fleet.done_at(workspace_id) is None and time.time() < deadline:
            await asyncio.sleep(0.005)
    return Registered(storm, registered_at)


async def _install_all(client: aiohttp.ClientSession, fleet: FleetProcess, workspace_id: str,
                       *, plugins: list[Plugin], limit: asyncio.Semaphore) -> None:
    async with limit:
        for plugin in plugins:
            async with client.put(f"{fleet.runtime_url(workspace_id)}/plugins/{plugin.name}",
                                  json={"source": plugin.source}) as response:
                response.raise_for_status()


async def _direct_installs(ids: list[str], plugins: list[Plugin], latency: float,
                           concurrency: int) -> dict[str, Any]:
    """The baseline: the same installs issued straight to a fresh fleet, with the same
    concurrency, no controller."""
    direct = FleetProcess(install_delay=latency, expected=len(plugins))
    try:
        await direct.started()
        limit = asyncio.Semaphore(concurrency)
        started = time.time()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as client:
            await asyncio.gather(*(_install_all(client, direct, i, plugins=plugins, limit=limit)
                                   for i in ids))
        seconds = time.time() - started
        state = await direct.get("/fleet/state")
        done = await direct.done_count()
    finally:
        await direct.stop()
    return {"direct_installs_seconds": round(seconds, 3), "direct_installs": state["puts"],
            "direct_converged": done}


def _tokens_file(sessions: Sessions, ids: list[str], path: Path) -> Path:
    secrets = {workspace_id: f"plc_bench_{workspace_id}" for workspace_id in ids}
    with transaction(sessions) as session:
        for workspace_id, secret in secrets.items():
            queries.add_token(session, workspace_id, tokens.digest(secret), now=utcnow(),
                              issuer="bench")
    path.write_text(json.dumps(secrets))
    return path


async def _converge_run(sessions: Sessions, fleet: FleetProcess, desired: Desired, *,
                        ids: list[str], singles: list[str], policy: Policy, queue: WorkQueue,
                        say: Say) -> Registered:
    """The loop runs while the fleet registers; returns once every workspace converged."""
    stop = asyncio.Event()
    async with RuntimeDriver(timeout=10) as driver:
        loop_task = asyncio.create_task(run_forever(
            lambda: desired, sessions, driver, policy, interval=30, stop=stop, queue=queue))
        try:
            await asyncio.sleep(0.2)  # the loop's first (empty) pass
            return await _storm_then_singles(fleet, ids, singles, say)
        finally:
            stop.set()
            await loop_task


def _percentile(values: list[float], share: float) -> float | None:
    return round(values[max(0, int(len(values) * share) - 1)], 3) if values else None


async def converge(target: Target, workspaces: int, latency: float, scratch: Path, *,
                   singles_count: int, say: Say) -> dict[str, Any]:
    plugins = PLUGINS[:3]
    engine = make_engine(target.url_for("converge"))
    upgrade(engine)
    sessions = make_sessions(engine)
    ids = [f"ws-{i:07d}" for i in range(workspaces)]
    singles = [f"ws-single-{i:03d}" for i in range(singles_count)]
    tokens_file = _tokens_file(sessions, ids + singles, scratch / f"tokens-{target.name}.json")
    policy = Policy(concurrency=64)
    queue = WorkQueue()
    runner = runner_for(make_app(sessions, hint=queue))
    await runner.setup()
    port = await start_site(runner, "127.0.0.1", 0)
    fleet = FleetProcess(install_delay=latency, expected=len(plugins),
                         registry_url=f"http://127.0.0.1:{port}", tokens_file=tokens_file)
    try:
        await fleet.started()
        say(f"converge/{target.name}: {workspaces} workspaces register at once")
        registered = await _converge_run(sessions, fleet, desired_fleet(ids + singles, plugins),
                                         ids=ids, singles=singles, policy=policy, queue=queue,
                                         say=say)
        done_at = await fleet.all_done()
        state = await fleet.get("/fleet/state")
    finally:
        await runner.cleanup()
        await fleet.stop()
        engine.dispose()
    per_workspace = sorted(done_at[i] - registered.at[i] for i in ids if i in done_at)
    single = sorted(done_at[i] - registered.at[i] for i in singles if i in done_at)
    baseline = await _direct_installs(ids, plugins, latency, policy.concurrency)
    total = round(registered.storm_seconds, 3)
    result = {
        "database": target.name, "workspaces": workspaces, "install_latency_ms": latency * 1000,
        "converged": len(per_workspace), "seconds_to_all_converged": total,
        "installs_per_second": round(workspaces * len(plugins) / total, 1),
        "per_workspace_p50_s": round(statistics.median(per_workspace), 3)
        if per_workspace else None,
        "per_workspace_p99_s": _percentile(per_workspace, 0.99),
        "single_registers": len(singles), "singles_converged": len(single),
        "single_register_p50_s": round(statistics.median(single), 3) if single else None,
        "single_register_max_s": round(single[-1], 3) if single else None,
        "installs_seen_by_runtimes": state["puts"],
        "overlapping_calls": state["overlaps"],
        "baseline": baseline,
        "ratio_to_direct": _ratio(total, baseline["direct_installs_seconds"]),
    }
    say(f"converge/{target.name}: {len(per_workspace)}/{workspaces} converged in {total:.2f}s "
        f"(direct installs: {baseline['direct_installs_seconds']:.2f}s)")
    return result


# --- memory -------------------------------------------------------------------------------------

async def memory(target: Target, workspaces: int, say: Say) -> dict[str, Any]:
    url = target.url_for("memory")
    engine = make_engine(url)
    upgrade(engine)
    say(f"memory/{target.name}: seeding {workspaces} workspaces")
    _seed(make_sessions(engine), [f"ws-{i:07d}" for i in range(workspaces)],
          "http://127.0.0.1:9/", PLUGINS)
    engine.dispose()
    out = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "controller.sim.memory", url, str(workspaces)],
        check=True, capture_output=True, text=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    result = {"database": target.name, "workspaces": workspaces, **child,
              "ratio_to_baseline": _ratio(child["peak_rss_mb"], child["baseline_rss_mb"])}
    say(f"memory/{target.name}: peak RSS {child['peak_rss_mb']} MB with {workspaces} "
        f"workspaces (empty process: {child['baseline_rss_mb']} MB)")
    return result


# --- the whole run --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    noop: list[int]
    naive_max: int
    heartbeat_workspaces: int
    heartbeat_seconds: float
    connections: int
    converge_workspaces: int
    memory_workspaces: int
    single_registers: int = 20  # registered one at a time after the storm


AGENT_PLUGINS = ("web-search", "seo-all", "notebook")


def _git(*args: str, cwd: Path | None = None) -> None:
    """git without the user's or the system's config (a gpgsign=true there would break the
    measurement)."""
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@pluginctl.invalid",
                    "-c", "init.defaultBranch=main", *args], cwd=cwd, check=True,
                   capture_output=True, env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1",
                                             "GIT_CONFIG_GLOBAL": os.devnull})


async def agent_install(scratch: Path, say: Say) -> dict[str, Any]:
    import shutil

    from controller.agent.disk import PluginsDir
    from controller.agent.sources import SourceConfig, Sources

    base = scratch / "agent"
    work, root = base / "work", base / "git"
    work.mkdir(parents=True)
    for name in AGENT_PLUGINS:
        for i in range(40):
            path = work / name / f"part{i % 4}" / f"file{i}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{name} {i}\n" * 100)
    _git("init", "-q", str(work))
    _git("add", "-A", cwd=work)
    _git("commit", "-q", "-m", "v1", cwd=work)
    _git("tag", "v1", cwd=work)
    _git("clone", "-q", "--bare", str(work), str(root / "agents" / "skills.git"))
    url = (root / "agents" / "skills.git").as_uri()

    def naive(target: Path) -> None:
        clone = target / "clone"
        _git("clone", "-q", "--depth", "1", "--branch", "v1", url, str(clone))
        for name in AGENT_PLUGINS:
            shutil.copytree(clone / name, target / "plugins" / name)

    started = time.perf_counter()
    await asyncio.to_thread(naive, base / "naive")
    naive_seconds = time.perf_counter() - started

    sources = Sources(SourceConfig(cache_dir=base / "cache", roots={"gitea": root.as_uri()}))
    plugins = PluginsDir(base / "plugins")
    plugins.prepare()

    async def install_all() -> float:
        began = time.perf_counter()
        for name in AGENT_PLUGINS:
            source = f"gitea://agents/skills/{name}#v1"
            await asyncio.to_thread(plugins.install, name, source, await sources.fetch(source))
        return time.perf_counter() - began

    cold = await install_all()
    for name in AGENT_PLUGINS:  # a wiped box: the cache stays
        shutil.rmtree(base / "plugins" / name)
    plugins.prepare()
    warm = await install_all()
    noop = await install_all()
    say(f"agent_install: 3 plugins cold {cold:.3f}s, warm {warm:.3f}s, already there "
        f"{noop:.3f}s; naive clone+copy {naive_seconds:.3f}s")
    return {"plugins": len(AGENT_PLUGINS), "files_per_plugin": 40,
            "cold_cache_seconds": round(cold, 4), "warm_cache_seconds": round(warm, 4),
            "already_installed_seconds": round(noop, 4),
            "baseline": {"naive_clone_and_copy_seconds": round(naive_seconds, 4)},
            "cold_ratio_to_naive": _ratio(cold, naive_seconds),
            "warm_ratio_to_naive": _ratio(warm, naive_seconds)}


async def run(sizes: Sizes, postgres_url: str | None, scratch: Path, say: Say
              ) -> dict[str, Any]:
    targets = [Target("sqlite", lambda label: f"sqlite:///{scratch / (label + '.db')}")]
    if postgres_url:
        targets.append(Target("postgresql", _postgres_databases(postgres_url)))
    result: dict[str, Any] = {"noop_pass": [], "heartbeat": [], "converge": [], "memory": [],
                              "machine": {"cpus": os.cpu_count(),
                                          "python": sys.version.split()[0]}}
    for target in targets:
        result["noop_pass"] += await noop_pass(target, sizes.noop, sizes.naive_max, say)
        result["heartbeat"].append(await heartbeat(
            target, sizes.heartbeat_workspaces, sizes.heartbeat_seconds,
            connections=sizes.connections, say=say))
        result["converge"].append(await converge(
            target, sizes.converge_workspaces, 0.02, scratch,
            singles_count=sizes.single_registers, say=say))
        result["memory"].append(await memory(target, sizes.memory_workspaces, say))
    result["agent_install"] = await agent_install(scratch, say)
    if not postgres_url:
        result["postgresql"] = "not measured: pass --postgres URL (a server you own)"
    return result


def _postgres_databases(server_url: str) -> Callable[[str], str]:
    """A fresh database per measurement on the given server (created, never dropped here:
    name the server of a throwaway cluster)."""
    from controller.store.database import create_database

    stamp = f"{os.getpid()}_{int(time.time())}"

    def url_for(label: str) -> str:
        return create_database(server_url, f"pluginctl_bench_{label}_{stamp}")

    return url_for
