"""`pluginctl soak`: the whole controller (`pluginctl run`, a process of its own) under a
steady heartbeat load for a bounded time, with faults injected on a schedule, then checked:
every workspace still registered, every online workspace converged (including a template
change made halfway), no 5xx for bad input, and the controller's RSS grown less than 10 %
from the end of the warm-up to the end.

The runtimes are simulated in another process (one port, `/w/{id}/...`) that can be told
to misbehave; the load generator and the bad clients run here."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from controller.domain.models import Policy, utcnow
from controller.domain.tokens import digest, generate
from controller.registry.serving import free_port
from controller.sim.bench import proc_status_kb
from controller.store import make_engine, make_sessions, queries, transaction, upgrade

Say = Callable[[str], None]
TEMPLATE_PLUGINS = [f"gitea://org/skills/plugin-{i}#v1" for i in range(3)]
ADDED_PLUGIN = "local://plugins/added-halfway"
FAULTS = ("runtime-5xx", "runtime-hang", "runtime-garbage", "boxes-recreated",
          "heartbeats-lost", "bad-input", "slow-clients")


# --- the misbehaving runtimes (a process of their own) --------------------------------------

class ChaosRuntimes:
    """Many runtimes behind one port; a share of them can be told to answer 503, hang past
    the caller's timeout, answer garbage, or forget everything (a box recreated)."""

    def __init__(self) -> None:
        self.installed: dict[str, dict[str, str]] = {}
        self.mode = "none"
        self.share = 0.0

    def _faulty(self, workspace_id: str) -> bool:
        return self.mode != "none" and zlib.crc32(workspace_id.encode()) % 1000 < self.share * 1000

    async def _misbehave(self, workspace_id: str) -> web.Response | None:
        if not self._faulty(workspace_id):
            return None
        if self.mode == "runtime-5xx":
            return web.json_response({"error": "unavailable"}, status=503)
        if self.mode == "runtime-hang":
            await asyncio.sleep(30)
        return web.Response(body=b"\xff<garbage", content_type="text/html")

    async def _list(self, request: web.Request) -> web.Response:
        workspace_id = request.match_info["id"]
        fault = await self._misbehave(workspace_id)
        if fault is not None:
            return fault
        plugins = self.installed.get(workspace_id, {})
        return web.json_response({"plugins": [{"name": n, "source": s}
                                              for n, s in sorted(plugins.items())]})

    async def _install(self, request: web.Request) -> web.Response:
        workspace_id = request.match_info["id"]
        fault = await self._misbehave(workspace_id)
        if fault is not None:
            return fault
        body = await request.json()
        await asyncio.sleep(0.01)
        self.installed.setdefault(workspace_id, {})[request.match_info["name"]] = body["source"]
        return web.json_response({"restart_required": False})

    async def _control(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.mode, self.share = body.get("mode", "none"), float(body.get("share", 0))
        for workspace_id in body.get("wipe", []):
            self.installed.pop(workspace_id, None)
        return web.json_response({"ok": True})

    async def _state(self, _request: web.Request) -> web.Response:
        return web.json_response(self.installed)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/w/{id}/plugins", self._list)
        app.router.add_put("/w/{id}/plugins/{name}", self._install)
        app.router.add_post("/control", self._control)
        app.router.add_get("/state", self._state)
        return app


RUNTIMES_SERVER = """
import sys
from aiohttp import web
from controller.sim.soak import ChaosRuntimes
web.run_app(ChaosRuntimes().app(), host="127.0.0.1", port=int(sys.argv[1]), print=None,
            access_log=None)
"""


# --- the soak --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Profile:
    workspaces: int
    rate: float  # heartbeats per second, all workspaces together
    seconds: float
    cycle: float  # seconds per fault on the schedule


@dataclass
class Tally:
    heartbeats: Counter[int] = field(default_factory=Counter)  # status -> count
    heartbeat_errors: int = 0  # no answer at all (connection refused, timeout)
    lost_on_purpose: int = 0
    bad_inputs: Counter[int] = field(default_factory=Counter)  # status -> count
    slow_clients: int = 0
    register_retries: int = 0
    faults: list[str] = field(default_factory=list)
    rss_kb: list[tuple[float, int]] = field(default_factory=list)


def _manifests(directory: Path, ids: list[str], extra: bool) -> None:
    plugins = [{"source": source} for source in TEMPLATE_PLUGINS]
    if extra:
        plugins.append({"source": ADDED_PLUGIN})
    documents = [{"apiVersion": "pluginctl.dev/v1alpha1", "kind": "WorkspaceTemplate",
                  "metadata": {"name": "soak"}, "spec": {"plugins": plugins}}]
    documents += [{"apiVersion": "pluginctl.dev/v1alpha1", "kind": "Workspace",
                   "metadata": {"name": workspace_id},
                   "spec": {"templateRef": {"name": "soak"}}} for workspace_id in ids]
    staging = directory / "fleet.yaml.new"
    staging.write_text(yaml.safe_dump_all(documents))
    staging.replace(directory / "fleet.yaml")  # never a half-written file for the loop


def _bad_requests(token: str, other_token: str) -> list[tuple[str, dict[str, str], bytes]]:
    """(path, headers, body) of requests the registry must refuse with a 4xx."""
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    return [
        ("/registry/heartbeat", auth, b"{not json"),
        ("/registry/heartbeat", auth, b'{"workspace_id": 7}'),
        ("/registry/heartbeat", auth, b'{"workspace_id": "soak-0", "status": ""}'),
        ("/registry/heartbeat", auth, b'{"workspace_id": "soak-0", "bogus": 1}'),
        ("/registry/heartbeat", auth, b'{"workspace_id": ""}'),
        ("/registry/heartbeat", auth, b'{"workspace_id": "soak-0", "seq": -1}'),
        ("/registry/register", auth,
         b'{"workspace_id": "soak-0", "url": "http://169.254.169.254/"}'),
        ("/registry/register", auth, b'{"workspace_id": "soak-0", "url": "ftp://x/"}'),
        ("/registry/heartbeat", auth, b'{"workspace_id": "soak-0", "plugins": "x"}'),
        ("/registry/heartbeat", auth, b"[" * 300_000),  # over the body limit
        ("/registry/heartbeat", {"Authorization": "Bearer nope"}, b'{"workspace_id": "soak-0"}'),
        ("/registry/heartbeat", {}, b'{"workspace_id": "soak-0"}'),
        ("/registry/heartbeat", {"Authorization": f"Bearer {other_token}"},
         b'{"workspace_id": "soak-0"}'),  # another workspace's token: 403
    ]


async def run_soak(profile: Profile, say: Say, database: str | None = None) -> dict[str, Any]:
    """Run the soak; returns the figures and `passed`."""
    ids = [f"soak-{i}" for i in range(profile.workspaces)]
    with tempfile.TemporaryDirectory(prefix="pluginctl-soak-") as scratch:
        work = Path(scratch)
        manifests = work / "manifests"
        manifests.mkdir()
        _manifests(manifests, ids, extra=False)
        db = database or f"sqlite:///{work / 'soak.db'}"
        engine = make_engine(db)
        upgrade(engine)
        sessions = make_sessions(engine)
        secrets = {workspace_id: generate() for workspace_id in ids}
        with transaction(sessions) as session:
            for workspace_id, secret in secrets.items():
                queries.add_token(session, workspace_id, digest(secret),
                                  utcnow(), "soak")
        runtimes_port, registry_port = free_port(), free_port()
        runtimes = subprocess.Popen([sys.executable, "-c", RUNTIMES_SERVER,
                                     str(runtimes_port)], stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
        controller = subprocess.Popen(
            [sys.executable, "-m", "controller", "--log-level", "warning", "run",
             "--manifests", str(manifests), "--db", db, "--listen",
             f"127.0.0.1:{registry_port}", "--interval", "5", "--call-timeout", "2",
             "--offline-after", "60", "--concurrency", "32"],
            stdout=subprocess.DEVNULL, stderr=(work / "controller.log").open("wb"))
        try:
            figures = await _drive(profile, say, ids, secrets, manifests, sessions,
                                   f"http://127.0.0.1:{runtimes_port}", runtimes,
                                   f"http://127.0.0.1:{registry_port}", controller)
            if not figures["passed"]:
                log = (work / "controller.log").read_text(errors="replace").splitlines()
                figures["controller_log_tail"] = log[-20:]
            return figures
        finally:
            for process in (controller, runtimes):
                process.terminate()
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
            engine.dispose()


async def _up(client: aiohttp.ClientSession, url: str, process: subprocess.Popen[bytes]
              ) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}")
        try:
            async with client.get(url) as answer:
                if answer.status < 500:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


async def _drive(profile: Profile, say: Say, ids: list[str], secrets: dict[str, str],
                 manifests: Path, sessions: Any, runtimes: str,
                 runtimes_process: subprocess.Popen[bytes], registry: str,
                 controller: subprocess.Popen[bytes]) -> dict[str, Any]:
    tally = Tally()
    rand = random.Random(5)
    connector = aiohttp.TCPConnector(limit=64)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        await _up(client, f"{runtimes}/state", runtimes_process)
        await _up(client, f"{registry}/healthz", controller)

        async def post(path: str, workspace_id: str, body: dict[str, Any]) -> int:
            async with client.post(registry + path, json=body, headers={
                    "Authorization": f"Bearer {secrets[workspace_id]}"}) as answer:
                await answer.read()
                return answer.status

        async def register(workspace_id: str) -> int:
            """As a runtime does: try again (after a pause) until the registry answers."""
            for attempt in range(10):
                try:
                    code = await post("/registry/register", workspace_id, {
                        "workspace_id": workspace_id, "url": f"{runtimes}/w/{workspace_id}"})
                    if code < 500:
                        return code
                except (aiohttp.ClientError, TimeoutError):
                    pass
                tally.register_retries += 1
                await asyncio.sleep(min(10.0, 0.5 * 2 ** attempt))
            return 0

        say(f"registering {len(ids)} workspaces")
        for start in range(0, len(ids), 200):
            codes = await asyncio.gather(*(register(w) for w in ids[start:start + 200]))
            if any(code != 200 for code in codes):
                raise RuntimeError(f"register failed: {Counter(codes)}")

        async def state() -> dict[str, dict[str, str]]:
            async with client.get(f"{runtimes}/state") as answer:
                data: dict[str, dict[str, str]] = await answer.json()
                return data

        async def converged(expected: set[str]) -> int:
            installed = await state()
            return sum(1 for w in ids if set(installed.get(w, {}).values()) >= expected)

        lossy = [False]
        stop = asyncio.Event()

        async def heartbeats() -> None:
            per_tick, tick = profile.rate / 20, 0.05
            carry, index = 0.0, 0
            next_at = time.monotonic()
            pending: set[asyncio.Task[None]] = set()

            async def one(workspace_id: str) -> None:
                try:
                    code = await post("/registry/heartbeat", workspace_id,
                                      {"workspace_id": workspace_id})
                    tally.heartbeats[code] += 1
                    if code == 409:  # the registry lost us: register again, as asked
                        await register(workspace_id)
                except (aiohttp.ClientError, TimeoutError):
                    tally.heartbeat_errors += 1

            while not stop.is_set():
                carry += per_tick
                batch, carry = int(carry), carry - int(carry)
                for _ in range(batch):
                    workspace_id = ids[index % len(ids)]
                    index += 1
                    if lossy[0] and rand.random() < 0.3:
                        tally.lost_on_purpose += 1
                        continue
                    if len(pending) < 512:  # a controller that falls behind is not buried
                        task = asyncio.create_task(one(workspace_id))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                next_at += tick
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            await asyncio.gather(*pending, return_exceptions=True)

        async def sample_rss() -> None:
            started = time.monotonic()
            while not stop.is_set():
                rss = proc_status_kb("VmRSS", controller.pid)
                tally.rss_kb.append((time.monotonic() - started, rss))
                await asyncio.sleep(2)

        async def control(**body: Any) -> None:
            async with client.post(f"{runtimes}/control", json=body) as answer:
                await answer.read()

        async def bad_inputs() -> None:
            for path, headers, body in _bad_requests(secrets[ids[0]], secrets[ids[1]]):
                async with client.post(registry + path, data=body,
                                       headers=headers) as answer:
                    await answer.read()
                    tally.bad_inputs[answer.status] += 1

        async def slow_clients(seconds: float) -> None:
            async def one() -> None:
                try:
                    _, writer = await asyncio.open_connection(*_host_port(registry))
                    writer.write(b"POST /registry/heartbeat HTTP/1.1\r\nHost: x\r\n")
                    await asyncio.sleep(seconds)
                    writer.close()
                except OSError:
                    pass
            tally.slow_clients += 100
            await asyncio.gather(*(one() for _ in range(100)))

        load = asyncio.create_task(heartbeats())
        sampler = asyncio.create_task(sample_rss())
        expected = set(TEMPLATE_PLUGINS)
        started = time.monotonic()
        try:
            while await converged(expected) < len(ids):
                if time.monotonic() - started > 300:
                    raise RuntimeError("no first convergence within 5 minutes")
                await asyncio.sleep(0.5)
            warm = time.monotonic() - started
            say(f"first convergence in {warm:.1f}s; faults begin")
            baseline = proc_status_kb("VmRSS", controller.pid)
            soak_started = time.monotonic()
            step = 0
            while time.monotonic() - soak_started < profile.seconds:
                fault = FAULTS[step % len(FAULTS)]
                step += 1
                tally.faults.append(fault)
                elapsed = time.monotonic() - soak_started
                if step == len(FAULTS) // 2 + 1 and expected == set(TEMPLATE_PLUGINS):
                    _manifests(manifests, ids, extra=True)  # a template change halfway
                    expected = {*TEMPLATE_PLUGINS, ADDED_PLUGIN}
                    say(f"[{elapsed:5.0f}s] template changed: one plugin added everywhere")
                say(f"[{elapsed:5.0f}s] fault: {fault}")
                if fault.startswith("runtime-"):
                    await control(mode=fault, share=0.2)
                elif fault == "boxes-recreated":
                    wiped = rand.sample(ids, max(1, len(ids) // 20))
                    await control(wipe=wiped)
                    await asyncio.gather(*(register(w) for w in wiped))
                elif fault == "heartbeats-lost":
                    lossy[0] = True
                elif fault == "bad-input":
                    await bad_inputs()
                elif fault == "slow-clients":
                    await slow_clients(min(profile.cycle, 15.0))
                await asyncio.sleep(max(0.0, profile.cycle - (time.monotonic() - soak_started
                                                              - elapsed)))
                await control(mode="none")
                lossy[0] = False
            say("faults end; waiting for convergence")
            settle_started = time.monotonic()
            while (done := await converged(expected)) < len(ids):
                if time.monotonic() - settle_started > 900:
                    break  # reported below as not converged
                await asyncio.sleep(1)
            settle = time.monotonic() - settle_started
            final = proc_status_kb("VmRSS", controller.pid)
        finally:
            stop.set()
            await asyncio.gather(load, sampler, return_exceptions=True)

    with transaction(sessions) as session:
        observed = queries.load_observed(session)
    registered = sum(1 for w in ids if w in observed and observed[w].url is not None)
    policy = Policy()
    owned_ok = sum(1 for w in ids if w in observed and observed[w].is_online(
        utcnow(), policy.offline_after) and {p.source for p in observed[w].owned.values()}
        >= expected)
    heartbeat_total = sum(tally.heartbeats.values())
    sent_seconds = profile.seconds + warm + settle
    growth = (final - baseline) / baseline if baseline else 0.0
    bad_5xx = sum(n for code, n in tally.bad_inputs.items() if code >= 500)
    figures = {
        "workspaces": len(ids),
        "soak_seconds": round(profile.seconds),
        "target_heartbeats_per_second": profile.rate,
        "heartbeats_per_second": round(heartbeat_total / sent_seconds, 1),
        "heartbeat_answers": dict(sorted(tally.heartbeats.items())),
        "heartbeats_without_answer": tally.heartbeat_errors,
        "heartbeats_lost_on_purpose": tally.lost_on_purpose,
        "register_retries": tally.register_retries,
        "faults": tally.faults,
        "bad_inputs": sum(tally.bad_inputs.values()),
        "bad_input_answers": dict(sorted(tally.bad_inputs.items())),
        "slow_clients": tally.slow_clients,
        "first_convergence_seconds": round(warm, 1),
        "settle_seconds": round(settle, 1),
        "converged": done,
        "registered": registered,
        "recorded_in_sync": owned_ok,
        "registrations_lost": len(ids) - registered,
        "rss_after_warmup_mb": round(baseline / 1024, 1),
        "rss_end_mb": round(final / 1024, 1),
        "rss_peak_mb": round(max(kb for _, kb in tally.rss_kb) / 1024, 1),
        "rss_growth": round(growth, 3),
        # Once a minute from the start of the load (the trend tells growth from a leak).
        "rss_mb_each_minute": _each_minute(tally.rss_kb),
    }
    checks = {
        "every workspace converged": done == len(ids),
        "every online workspace recorded in sync": owned_ok == len(ids),
        "no registration lost": registered == len(ids),
        "no 5xx for bad input": bad_5xx == 0 and sum(tally.bad_inputs.values()) > 0,
        "RSS grew less than 10%": growth < 0.10,
        "controller still running": controller.poll() is None,
    }
    figures["checks"] = checks
    figures["passed"] = all(checks.values())
    return figures


def _each_minute(samples: list[tuple[float, int]]) -> list[float]:
    """The first sample (MB) of every minute since the load began."""
    picked: dict[int, float] = {}
    for at, kb in samples:
        picked.setdefault(int(at // 60), round(kb / 1024, 1))
    return [picked[minute] for minute in sorted(picked)]


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def report_lines(figures: dict[str, Any]) -> list[str]:
    lines = [f"{key}: {json.dumps(value)}" for key, value in figures.items()
             if key not in ("checks", "passed", "controller_log_tail")]
    lines += figures.get("controller_log_tail", [])
    lines += [f"{'ok  ' if ok else 'FAIL'} {name}" for name, ok in figures["checks"].items()]
    lines.append("PASSED" if figures["passed"] else "FAILED")
    return lines
