"""`pluginctl bench`: measures the engine against naive baselines run in the same command,
so that every figure is also a ratio (these machines are shared and noisy):

- noop_pass: a pass over N converged online workspaces x 5 plugins, vs the naive
  per-workspace loop (two queries per workspace, as edge-triggered platforms do it);
- heartbeat: sustained authenticated heartbeats per second against the registry running as
  its own process, vs a bare JSON endpoint of the same HTTP stack;
- converge: K workspaces registering at once, each missing 3 plugins, on simulated runtimes
  with 20 ms installs, vs issuing the same installs directly with the same concurrency;
- memory: peak RSS of a process holding N workspaces' state through a pass, vs the same
  process before it loaded anything;
- agent_install: the agent installing 3 plugins (40 files each) from a local git repository
  into a plugins directory with a cold cache, a warm cache (a wiped box) and when already
  installed, vs the naive way (a shallow clone of the tag, then copying the three
  directories)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from controller.domain import tokens
from controller.domain.desired import Desired
from controller.domain.models import DesiredWorkspace, Plugin, Policy, utcnow
from controller.engine.reconciler import Hints, PassReport, reconcile_once, run_forever
from controller.engine.service import serve
from controller.registry.app import make_app
from controller.registry.serving import free_port, runner_for, start_site
from controller.runtime.driver import RuntimeDriver
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
PLUGINS = [Plugin(f"plugin-{i}", f"gitea://org/skills/plugin-{i}#v1") for i in range(5)]


@dataclass(frozen=True)
class Target:
    name: str  # "sqlite" or "postgresql"
    url_for: Callable[[str], str]  # a fresh database URL for a label


def _desired(ids: list[str], plugins: list[Plugin]) -> Desired:
    by_name = {p.name: p for p in plugins}
    return Desired({i: DesiredWorkspace(i, f"default/{i}", None, by_name) for i in ids}, (), ())


def _seed(sessions: Sessions, ids: list[str], url: str, plugins: list[Plugin]) -> None:
    now = utcnow()
    batch = 20_000
    for start in range(0, len(ids), batch):
        with transaction(sessions) as session:
            queries.seed_fleet(session, [(i, url, plugins, tokens.digest(f"plc_bench_{i}"))
                                         for i in ids[start:start + batch]], now)


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 2) if baseline else None


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
        desired = _desired(ids, PLUGINS)
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
            entry["speedup_vs_naive"] = _ratio(naive, min(timings))
        say(f"noop_pass/{target.name}: {n} workspaces in {min(timings):.3f}s, "
            f"{pass_queries} queries" + (f", {entry['speedup_vs_naive']}x the naive loop"
                                            if "speedup_vs_naive" in entry else ""))
        results.append(entry)
        engine.dispose()
    return results


# --- heartbeat ingest --------------------------------------------------------------------------

BARE_SERVER = """
import sys
from aiohttp import web
async def bare(request):
    await request.read()
    return web.json_response({"status": "ok"})
app = web.Application()
app.router.add_post("/registry/heartbeat", bare)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


async def _wait_http(url: str, deadline: float) -> None:
    async with aiohttp.ClientSession() as client:
        while time.monotonic() < deadline:
            try:
                async with client.post(url, json={}) as response:
                    await response.read()
                    return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def _load(url: str, ids: list[str], seconds: float, connections: int
                ) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    body_for = {i: json.dumps({"workspace_id": i,
                               "plugins": [p.to_json() for p in PLUGINS]}).encode()
                for i in ids}
    connector = aiohttp.TCPConnector(limit=connections)
    stop_at = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=connector) as client:
        async def worker(offset: int) -> None:
            nonlocal errors
            k = offset
            while time.monotonic() < stop_at:
                workspace_id = ids[k % len(ids)]
                k += connections
                started = time.perf_counter()
                async with client.post(url, data=body_for[workspace_id], headers={
                        "Authorization": f"Bearer plc_bench_{workspace_id}",
                        "Content-Type": "application/json"}) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append(time.perf_counter() - started)
        started = time.monotonic()
        await asyncio.gather(*(worker(i) for i in range(connections)))
        elapsed = time.monotonic() - started
    latencies.sort()
    return {
        "requests_per_second": round(len(latencies) / elapsed, 1),
        "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2) if latencies else None,
        "requests": len(latencies), "errors": errors,
    }


async def heartbeat(target: Target, workspaces: int, seconds: float, connections: int,
                    say: Say) -> dict[str, Any]:
    url = target.url_for("heartbeat")
    engine = make_engine(url)
    upgrade(engine)
    ids = [f"ws-{i:07d}" for i in range(workspaces)]
    say(f"heartbeat/{target.name}: seeding {workspaces} registered workspaces")
    _seed(make_sessions(engine), ids, "http://127.0.0.1:9/", PLUGINS)
    engine.dispose()
    with tempfile.TemporaryDirectory() as empty:
        port, bare_port = free_port(), free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "controller", "--log-level", "warning", "run",
             "--manifests", empty, "--db", url, "--listen", f"127.0.0.1:{port}",
             "--interval", "3600"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            await _wait_http(f"http://127.0.0.1:{port}/registry/heartbeat", deadline)
            await _wait_http(f"http://127.0.0.1:{bare_port}/registry/heartbeat", deadline)
            say(f"heartbeat/{target.name}: {seconds:g}s of load, {connections} connections")
            measured = await _load(f"http://127.0.0.1:{port}/registry/heartbeat", ids,
                                   seconds, connections)
            baseline = await _load(f"http://127.0.0.1:{bare_port}/registry/heartbeat", ids,
                                   seconds, connections)
        finally:
            for process in (server, bare):
                process.terminate()
                process.wait(30)
    result = {"database": target.name, "workspaces": workspaces, **measured,
              "baseline": {"bare_endpoint": baseline},
              "ratio_to_bare": _ratio(measured["requests_per_second"],
                                      baseline["requests_per_second"]),
              "load_generator": "python asyncio client (one process, on the same 2 cores)"}
    say(f"heartbeat/{target.name}: {measured['requests_per_second']}/s "
        f"(p99 {measured['p99_ms']} ms), bare endpoint {baseline['requests_per_second']}/s")
    return result


# --- convergence --------------------------------------------------------------------------------

SINGLE_REGISTERS = 20  # registered one at a time after the storm


class SimulatedRuntimes:
    """Many runtimes behind one port, one URL prefix each (/w/{id}/...), with slow installs.
    Run in a process of its own (as runtimes are), it tells when each workspace had all
    the plugins it expects (wall-clock time, comparable across processes)."""

    def __init__(self, latency: float, expected: int) -> None:
        self.latency = latency
        self.expected = expected
        self.installed: dict[str, dict[str, str]] = {}
        self.done_at: dict[str, float] = {}

    async def _list(self, request: web.Request) -> web.Response:
        plugins = self.installed.get(request.match_info["id"], {})
        return web.json_response({"plugins": [{"name": n, "source": s}
                                              for n, s in plugins.items()]})

    async def _install(self, request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(self.latency)
        workspace = request.match_info["id"]
        plugins = self.installed.setdefault(workspace, {})
        plugins[request.match_info["name"]] = body["source"]
        if len(plugins) >= self.expected and workspace not in self.done_at:
            self.done_at[workspace] = time.time()
        return web.json_response({"restart_required": False})

    async def _done(self, request: web.Request) -> web.Response:
        """How many are done; with ?id=X, when X was done (null: not yet); with ?all=1,
        every done time."""
        if "id" in request.query:
            return web.json_response({"at": self.done_at.get(request.query["id"])})
        if "all" in request.query:
            return web.json_response({"done": self.done_at})
        return web.json_response({"count": len(self.done_at)})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/w/{id}/plugins", self._list)
        app.router.add_put("/w/{id}/plugins/{name}", self._install)
        app.router.add_get("/done", self._done)
        return app


RUNTIMES_SERVER = """
import sys
from aiohttp import web
from controller.sim.bench import SimulatedRuntimes
runtimes = SimulatedRuntimes(float(sys.argv[2]), int(sys.argv[3]))
web.run_app(runtimes.app(), host="127.0.0.1", port=int(sys.argv[1]), print=None,
            access_log=None)
"""


class RuntimesProcess:
    """SimulatedRuntimes in a child process, and how to ask it what is done."""

    def __init__(self, latency: float, expected: int) -> None:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.process = subprocess.Popen(
            [sys.executable, "-c", RUNTIMES_SERVER, str(port), str(latency), str(expected)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = aiohttp.ClientSession()

    async def _get(self, query: str) -> Any:
        async with self.client.get(f"{self.url}/done{query}") as response:
            return await response.json()

    async def started(self) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                await self._get("")
                return
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        raise RuntimeError("the simulated runtimes did not come up")

    async def count(self) -> int:
        return int((await self._get(""))["count"])

    async def done_at(self, workspace_id: str) -> float | None:
        at = (await self._get(f"?id={workspace_id}"))["at"]
        return None if at is None else float(at)

    async def all_done(self) -> dict[str, float]:
        return {k: float(v) for k, v in (await self._get("?all=1"))["done"].items()}

    async def stop(self) -> None:
        await self.client.close()
        self.process.terminate()
        self.process.wait(30)


async def converge(target: Target, workspaces: int, latency: float, say: Say
                   ) -> dict[str, Any]:
    plugins = PLUGINS[:3]
    engine = make_engine(target.url_for("converge"))
    upgrade(engine)
    sessions = make_sessions(engine)
    ids = [f"ws-{i:07d}" for i in range(workspaces)]
    singles = [f"ws-single-{i:03d}" for i in range(SINGLE_REGISTERS)]
    runtimes = RuntimesProcess(latency, len(plugins))
    await runtimes.started()
    with transaction(sessions) as session:
        for workspace_id in ids + singles:
            queries.add_token(session, workspace_id, tokens.digest(f"plc_bench_{workspace_id}"),
                              utcnow(), "bench")
    policy = Policy(concurrency=64)
    hints = Hints()
    runner = runner_for(make_app(sessions, hint=hints))
    await runner.setup()
    port = await start_site(runner, "127.0.0.1", 0)
    stop = asyncio.Event()
    desired = _desired(ids + singles, plugins)
    registered_at: dict[str, float] = {}  # wall clock: compared with the runtimes' process
    try:
        async with RuntimeDriver(timeout=10) as driver:
            loop_task = asyncio.create_task(run_forever(
                lambda: desired, sessions, driver, policy, interval=30, stop=stop, hints=hints))
            await asyncio.sleep(0.2)  # the loop's first (empty) pass
            say(f"converge/{target.name}: {workspaces} workspaces register at once")
            started = time.time()
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as c:
                async def register(workspace_id: str) -> None:
                    registered_at[workspace_id] = time.time()
                    async with c.post(f"http://127.0.0.1:{port}/registry/register", json={
                            "workspace_id": workspace_id, "plugins": [],
                            "url": f"{runtimes.url}/w/{workspace_id}"}, headers={
                            "Authorization": f"Bearer plc_bench_{workspace_id}"}) as response:
                        response.raise_for_status()
                await asyncio.gather(*(register(i) for i in ids))
                say(f"converge/{target.name}: all registered after "
                    f"{time.time() - started:.2f}s")
                deadline = started + 600
                while await runtimes.count() < workspaces and time.time() < deadline:
                    await asyncio.sleep(0.02)
                total = time.time() - started
                # Then one at a time into the quiet, converged fleet: the latency a single
                # workspace sees from its register to its last plugin.
                say(f"converge/{target.name}: {len(singles)} more register one at a time")
                for workspace_id in singles:
                    await register(workspace_id)
                    while (await runtimes.done_at(workspace_id) is None
                           and time.time() < deadline):
                        await asyncio.sleep(0.005)
            stop.set()
            await loop_task
        done_at = await runtimes.all_done()
    finally:
        await runner.cleanup()
        await runtimes.stop()
        engine.dispose()
    per_workspace = sorted(done_at[i] - registered_at[i] for i in ids if i in done_at)
    single = sorted(done_at[i] - registered_at[i] for i in singles if i in done_at)

    # Baseline: the same installs issued directly, with the same concurrency, no controller.
    direct = RuntimesProcess(latency, len(plugins))
    await direct.started()
    limit = asyncio.Semaphore(policy.concurrency)
    started = time.time()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as client:
        async def install_all(workspace_id: str) -> None:
            async with limit:
                for plugin in plugins:
                    async with client.put(f"{direct.url}/w/{workspace_id}/plugins/{plugin.name}",
                                          json={"source": plugin.source}) as response:
                        await response.read()
        await asyncio.gather(*(install_all(i) for i in ids))
    direct_total = time.time() - started
    await direct.stop()

    installs = workspaces * len(plugins)
    result = {
        "database": target.name, "workspaces": workspaces, "install_latency_ms": latency * 1000,
        "converged": len(per_workspace), "seconds_to_all_converged": round(total, 3),
        "installs_per_second": round(installs / total, 1),
        "per_workspace_p50_s": round(statistics.median(per_workspace), 3)
        if per_workspace else None,
        "per_workspace_p99_s": round(per_workspace[int(len(per_workspace) * 0.99) - 1], 3)
        if per_workspace else None,
        "single_register_p50_s": round(statistics.median(single), 3) if single else None,
        "single_register_max_s": round(single[-1], 3) if single else None,
        "baseline": {"direct_installs_seconds": round(direct_total, 3)},
        "ratio_to_direct": _ratio(total, direct_total),
    }
    say(f"converge/{target.name}: {len(per_workspace)}/{workspaces} converged in {total:.2f}s "
        f"(direct installs: {direct_total:.2f}s)")
    return result


# --- memory -------------------------------------------------------------------------------------

MEMORY_CHILD = """
import asyncio, json, resource, sys
from controller.sim import bench
print(json.dumps(asyncio.run(bench.memory_child(sys.argv[1], int(sys.argv[2])))))
"""


def proc_status_kb(field: str, pid: int | str = "self") -> int:
    """A kB figure of /proc/PID/status (VmRSS, VmHWM); for ourselves, ru_maxrss without it."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss if pid == "self" else 0


async def memory_child(url: str, workspaces: int) -> dict[str, Any]:
    """The whole controller (registry with its token cache, and the loop) over N workspaces,
    through its first (cold) pass and a second (steady) one."""
    # The peak survives exec (it would be the parent's); reset it, then measure.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
        clear.write("5")
    before = proc_status_kb("VmHWM")
    engine = make_engine(url)
    sessions = make_sessions(engine)
    ids = [f"ws-{i:07d}" for i in range(workspaces)]
    desired = _desired(ids, PLUGINS)
    passes: list[PassReport] = []
    stop = asyncio.Event()

    def first_and_steady() -> tuple[PassReport, PassReport] | None:
        first = min(passes, key=lambda p: p.started_at)
        if first.synced or first.busy:  # not the cold pass: that one is still running
            return None
        later = [p for p in passes if p.started_at > first.finished_at]
        return (first, later[0]) if later else None

    def on_pass(report: PassReport, _trigger: str) -> None:
        passes.append(report)
        if first_and_steady() is not None:
            stop.set()

    # Full passes are due every second but wait for the cold first pass to finish planning;
    # the one that starts after it finished is the steady no-op pass.
    # (No heartbeats here: the fleet is kept online by a long offline-after.)
    policy = Policy(offline_after=timedelta(hours=1))
    await serve(lambda: desired, sessions, policy, "127.0.0.1", 0, interval=1.0,
                stop=stop, on_pass=on_pass)
    after = proc_status_kb("VmHWM")
    engine.dispose()
    found = first_and_steady()
    assert found is not None
    first, steady = found
    return {"baseline_rss_mb": round(before / 1024, 1), "peak_rss_mb": round(after / 1024, 1),
            "online": first.online,
            "first_pass_s": round((first.finished_at - first.started_at).total_seconds(), 2),
            "steady_pass_s": round((steady.finished_at - steady.started_at).total_seconds(), 2),
            "steady_pass_synced": steady.synced}


async def memory(target: Target, workspaces: int, say: Say) -> dict[str, Any]:
    url = target.url_for("memory")
    engine = make_engine(url)
    upgrade(engine)
    say(f"memory/{target.name}: seeding {workspaces} workspaces")
    _seed(make_sessions(engine), [f"ws-{i:07d}" for i in range(workspaces)],
          "http://127.0.0.1:9/", PLUGINS)
    engine.dispose()
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, url, str(workspaces)],
                         check=True, capture_output=True, text=True).stdout
    child = json.loads(out.strip().splitlines()[-1])
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
        result["heartbeat"].append(await heartbeat(target, sizes.heartbeat_workspaces,
                                                   sizes.heartbeat_seconds, sizes.connections,
                                                   say))
        result["converge"].append(await converge(target, sizes.converge_workspaces, 0.02, say))
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
