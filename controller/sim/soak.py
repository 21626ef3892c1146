"""`pluginctl soak`: the whole controller (`pluginctl run`, a process of its own) under a
steady heartbeat load for a bounded time, with faults injected on a schedule, then checked:
every workspace still registered, every online workspace converged (including a template
change made halfway), the controller's own metrics agreeing (no drift, every workspace
online, the faults felt as failed actions, every heartbeat counted), no 5xx for bad input,
and the controller's RSS grown less than 10 % from the end of the warm-up to the end.

The fleet (`controller.sim.fleet`, a process of its own) is the runtimes and their
registers and heartbeats, and is told to misbehave; the bad clients run here."""

from __future__ import annotations

import asyncio
import enum
import json
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from controller.domain.models import Policy, utcnow
from controller.registry.serving import free_port
from controller.registry.tokens import issue_tokens
from controller.sim.fleet import FleetProcess, Misbehaviour, Trouble
from controller.sim.memory import proc_status_kb
from controller.sim.scrape import Scrape, scrape
from controller.store import Sessions, make_engine, make_sessions, queries, transaction, upgrade

Say = Callable[[str], None]
TEMPLATE_PLUGINS = [f"gitea://org/skills/plugin-{i}#v1" for i in range(3)]
ADDED_PLUGIN = "local://plugins/added-halfway"
FIRST_CONVERGENCE_SECONDS = 300
SETTLE_SECONDS = 900
TROUBLED_SHARE = 0.2  # of the fleet, during a runtime fault
HEARTBEAT_LOSS = 0.3  # during heartbeats-lost
SLOW_CLIENTS = 100
REQUESTS = "pluginctl_registry_requests_total"
ACTIONS = "pluginctl_plugin_actions_total"


class Fault(enum.StrEnum):
    RUNTIME_5XX = "runtime-5xx"
    RUNTIME_HANG = "runtime-hang"
    RUNTIME_GARBAGE = "runtime-garbage"
    BOXES_RECREATED = "boxes-recreated"
    HEARTBEATS_LOST = "heartbeats-lost"
    BAD_INPUT = "bad-input"
    SLOW_CLIENTS = "slow-clients"


FAULTS = tuple(Fault)
TROUBLE = {Fault.RUNTIME_5XX: Misbehaviour.UNAVAILABLE, Fault.RUNTIME_HANG: Misbehaviour.HANG,
           Fault.RUNTIME_GARBAGE: Misbehaviour.GARBAGE}


@dataclass(frozen=True)
class Profile:
    workspaces: int
    rate: float  # heartbeats per second, all workspaces together
    seconds: float
    cycle: float  # seconds per fault on the schedule


@dataclass
class Tally:
    """What the soak itself did and saw (the fleet keeps the heartbeats' tally)."""

    bad_inputs: Counter[int] = field(default_factory=Counter)  # status -> count
    slow_clients: int = 0
    faults: list[str] = field(default_factory=list)
    template_changed: bool = False
    rss_kb: list[tuple[float, int]] = field(default_factory=list)


@dataclass(frozen=True)
class Timings:
    first_convergence: float
    settle: float
    rss_after_warmup_kb: int
    rss_end_kb: int


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


def _issue_tokens(sessions: Sessions, ids: list[str], path: Path) -> dict[str, str]:
    secrets = dict(zip(ids, issue_tokens(sessions, ids, issuer="soak"), strict=True))
    path.write_text(json.dumps(secrets))
    return secrets


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
        secrets = _issue_tokens(sessions, ids, work / "tokens.json")
        registry_port = free_port()
        registry = f"http://127.0.0.1:{registry_port}"
        fleet = FleetProcess(install_delay=0.01, registry_url=registry,
                             tokens_file=work / "tokens.json")
        controller = subprocess.Popen(
            [sys.executable, "-m", "controller", "--log-level", "warning", "run",
             "--manifests", str(manifests), "--db", db, "--listen",
             f"127.0.0.1:{registry_port}", "--interval", "5", "--call-timeout", "2",
             "--offline-after", "60", "--concurrency", "32"],
            stdout=subprocess.DEVNULL, stderr=(work / "controller.log").open("wb"))
        try:
            soak = Soak(profile, say, ids=ids, secrets=secrets, manifests=manifests,
                        fleet=fleet, registry=registry, controller=controller)
            figures = await soak.run(sessions)
            if not figures["passed"]:
                log = (work / "controller.log").read_text(errors="replace").splitlines()
                figures["controller_log_tail"] = log[-20:]
            return figures
        finally:
            controller.terminate()
            try:
                controller.wait(30)
            except subprocess.TimeoutExpired:
                controller.kill()
            await fleet.stop()
            engine.dispose()


class Soak:
    """One soak run against a running controller and fleet: warm-up, the fault schedule,
    the settling, then the figures and checks."""

    def __init__(self, profile: Profile, say: Say, *, ids: list[str], secrets: dict[str, str],
                 manifests: Path, fleet: FleetProcess, registry: str,
                 controller: subprocess.Popen[bytes]) -> None:
        self.profile = profile
        self.say = say
        self.ids = ids
        self.secrets = secrets
        self.manifests = manifests
        self.fleet = fleet
        self.registry = registry
        self.controller = controller
        self.expected = set(TEMPLATE_PLUGINS)
        self.tally = Tally()
        self.rand = random.Random(5)
        self.client = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                            timeout=aiohttp.ClientTimeout(total=10))

    async def run(self, sessions: Sessions) -> dict[str, Any]:
        try:
            await self.fleet.started()
            await self._up(f"{self.registry}/healthz")
            self.say(f"registering {len(self.ids)} workspaces")
            await self.fleet.register(self.ids)
            await self.fleet.post("/fleet/heartbeats", {"rate": self.profile.rate})
            stop = asyncio.Event()
            sampler = asyncio.create_task(self._sample_rss(stop))
            try:
                timings = await self._phases()
            finally:
                stop.set()
                await sampler
            await self.fleet.post("/fleet/heartbeats", {"rate": 0})
            state = await self.fleet.get("/fleet/state")
            page = await scrape(self.client, self.registry)
        finally:
            await self.client.close()
        return self._figures(timings, state, page, sessions)

    async def _up(self, url: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.controller.poll() is not None:
                raise RuntimeError(f"the controller exited with {self.controller.returncode}")
            try:
                async with self.client.get(url) as answer:
                    if answer.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise RuntimeError(f"{url} did not come up")

    async def _phases(self) -> Timings:
        started = time.monotonic()
        while await self._converged() < len(self.ids):
            if time.monotonic() - started > FIRST_CONVERGENCE_SECONDS:
                raise RuntimeError("no first convergence within 5 minutes")
            await asyncio.sleep(0.5)
        warm = time.monotonic() - started
        self.say(f"first convergence in {warm:.1f}s; faults begin")
        baseline = proc_status_kb("VmRSS", self.controller.pid)
        await self._schedule()
        self.say("faults end; waiting for convergence")
        settle = await self._settle()
        return Timings(warm, settle, baseline, proc_status_kb("VmRSS", self.controller.pid))

    async def _converged(self) -> int:
        installed: dict[str, dict[str, str]] = (await self.fleet.get("/fleet/state"))["installed"]
        return sum(1 for w in self.ids if set(installed.get(w, {}).values()) >= self.expected)

    async def _schedule(self) -> None:
        """Every fault in turn for `cycle` seconds each, until `seconds` are over; the
        template gains a plugin halfway through the first round."""
        started = time.monotonic()
        step = 0
        while time.monotonic() - started < self.profile.seconds:
            fault = FAULTS[step % len(FAULTS)]
            step += 1
            began = time.monotonic()
            if step == len(FAULTS) // 2 + 1 and not self.tally.template_changed:
                _manifests(self.manifests, self.ids, extra=True)
                self.expected = {*TEMPLATE_PLUGINS, ADDED_PLUGIN}
                self.tally.template_changed = True
                self.say(f"[{began - started:5.0f}s] template changed: one plugin added")
            self.say(f"[{began - started:5.0f}s] fault: {fault}")
            self.tally.faults.append(fault)
            await self._inject(fault)
            await asyncio.sleep(max(0.0, self.profile.cycle - (time.monotonic() - began)))
            await self.fleet.post("/fleet/trouble", {"mode": Misbehaviour.NONE})
            await self.fleet.post("/fleet/heartbeats", {"loss": 0.0})

    async def _inject(self, fault: Fault) -> None:
        if fault in TROUBLE:
            trouble = Trouble(TROUBLE[fault], TROUBLED_SHARE)
            await self.fleet.post("/fleet/trouble", {"mode": trouble.mode,
                                                     "share": trouble.share})
            # A converged fleet needs no runtime calls: some troubled boxes are re-created
            # too, so that the controller must call runtimes that misbehave.
            troubled = [w for w in self.ids if trouble.hits(w)]
            wiped = self.rand.sample(troubled, min(len(troubled), self._few()))
            await self.fleet.post("/fleet/recreate", {"ids": wiped})
        elif fault is Fault.BOXES_RECREATED:
            wiped = self.rand.sample(self.ids, self._few())
            await self.fleet.post("/fleet/recreate", {"ids": wiped})
        elif fault is Fault.HEARTBEATS_LOST:
            await self.fleet.post("/fleet/heartbeats", {"loss": HEARTBEAT_LOSS})
        elif fault is Fault.BAD_INPUT:
            await self._bad_inputs()
        elif fault is Fault.SLOW_CLIENTS:
            await self._slow_clients(min(self.profile.cycle, 15.0))

    def _few(self) -> int:
        return max(1, len(self.ids) // 20)

    async def _bad_inputs(self) -> None:
        for path, headers, body in _bad_requests(self.secrets[self.ids[0]],
                                                 self.secrets[self.ids[1]]):
            async with self.client.post(self.registry + path, data=body,
                                        headers=headers) as answer:
                await answer.read()
                self.tally.bad_inputs[answer.status] += 1

    async def _slow_client(self, seconds: float) -> None:
        """Sends half a request's headers, then nothing, for `seconds`."""
        host, port = self.registry.removeprefix("http://").rsplit(":", 1)
        try:
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /registry/heartbeat HTTP/1.1\r\nHost: x\r\n")
            await asyncio.sleep(seconds)
            writer.close()
        except OSError:
            pass

    async def _slow_clients(self, seconds: float) -> None:
        self.tally.slow_clients += SLOW_CLIENTS
        await asyncio.gather(*(self._slow_client(seconds) for _ in range(SLOW_CLIENTS)))

    async def _in_sync_by_metrics(self) -> bool:
        """The controller's own word: its last full pass saw every workspace online and
        none drifted."""
        page = await scrape(self.client, self.registry)
        return (page.total("pluginctl_drifted_workspaces") == 0
                and page.total("pluginctl_workspaces", phase="Online") == len(self.ids))

    async def _settle(self) -> float:
        """Until the fleet holds what is declared and the controller says so too (or the
        settle time is over: reported as not converged)."""
        started = time.monotonic()
        while time.monotonic() - started < SETTLE_SECONDS:
            if (await self._converged() == len(self.ids)
                    and await self._in_sync_by_metrics()):
                break
            await asyncio.sleep(1)
        return time.monotonic() - started

    async def _sample_rss(self, stop: asyncio.Event) -> None:
        started = time.monotonic()
        while not stop.is_set():
            rss = proc_status_kb("VmRSS", self.controller.pid)
            self.tally.rss_kb.append((time.monotonic() - started, rss))
            try:
                await asyncio.wait_for(stop.wait(), 2)
            except TimeoutError:
                continue

    def _recorded(self, sessions: Sessions) -> tuple[int, int]:
        """(registered, recorded online with every declared plugin owned) in the store."""
        with transaction(sessions) as session:
            observed = queries.load_observed(session, now=utcnow())
        now, offline_after = utcnow(), Policy().offline_after
        registered = sum(1 for w in self.ids if w in observed and observed[w].url is not None)
        in_sync = sum(1 for w in self.ids if w in observed
                      and observed[w].is_online(now, offline_after)
                      and {p.source for p in observed[w].owned.values()} >= self.expected)
        return registered, in_sync

    def _figures(self, timings: Timings, state: dict[str, Any], page: Scrape,
                 sessions: Sessions) -> dict[str, Any]:
        fleet_tally = state["registry"]
        answered = {int(code): n for code, n in fleet_tally["heartbeats"].items()}
        counted = page.by(REQUESTS, "code", endpoint="/registry/heartbeat")
        registered, in_sync = self._recorded(sessions)
        sent_seconds = self.profile.seconds + timings.first_convergence + timings.settle
        baseline, final = timings.rss_after_warmup_kb, timings.rss_end_kb
        figures = {
            "workspaces": len(self.ids),
            "soak_seconds": round(self.profile.seconds),
            "target_heartbeats_per_second": self.profile.rate,
            "heartbeats_per_second": round(sum(answered.values()) / sent_seconds, 1),
            "heartbeat_answers": dict(sorted(fleet_tally["heartbeats"].items())),
            "heartbeats_counted_by_registry": {k: int(v) for k, v in sorted(counted.items())},
            "heartbeats_without_answer": fleet_tally["without_answer"],
            "heartbeats_lost_on_purpose": fleet_tally["lost_on_purpose"],
            "heartbeats_not_sent": fleet_tally["not_sent"],  # the registry was behind
            "register_retries": fleet_tally["register_retries"],
            "faults": self.tally.faults,
            "template_changed": self.tally.template_changed,
            "bad_inputs": sum(self.tally.bad_inputs.values()),
            "bad_input_answers": dict(sorted(self.tally.bad_inputs.items())),
            "slow_clients": self.tally.slow_clients,
            "first_convergence_seconds": round(timings.first_convergence, 1),
            "settle_seconds": round(timings.settle, 1),
            "converged": sum(1 for w in self.ids if set(state["installed"].get(w, {}).values())
                             >= self.expected),
            "registered": registered,
            "recorded_in_sync": in_sync,
            "registrations_lost": len(self.ids) - registered,
            "declared_plugins": len(self.expected),
            "installs_seen_by_runtimes": state["puts"],
            "installs_ok": int(page.total(ACTIONS, action="install", result="ok")),
            "failed_actions": int(page.total(ACTIONS, result="failed")),
            "drifted_workspaces": int(page.total("pluginctl_drifted_workspaces")),
            "online_workspaces": int(page.total("pluginctl_workspaces", phase="Online")),
            "rss_after_warmup_mb": round(baseline / 1024, 1),
            "rss_end_mb": round(final / 1024, 1),
            "rss_peak_mb": round(max(kb for _, kb in self.tally.rss_kb) / 1024, 1),
            "rss_growth": round((final - baseline) / baseline, 3) if baseline else 0.0,
            # Once a minute from the start of the load (the trend tells growth from a leak).
            "rss_mb_each_minute": _each_minute(self.tally.rss_kb),
        }
        figures["checks"] = checks(figures, self.tally, self.profile,
                                   running=self.controller.poll() is None)
        figures["passed"] = all(figures["checks"].values())
        return figures



def checks(figures: dict[str, Any], tally: Tally, profile: Profile, *, running: bool
           ) -> dict[str, bool]:
    """What the soak requires of its figures (all true: passed)."""
    n = figures["workspaces"]
    bad = tally.bad_inputs
    faults = tally.faults
    answered, counted = figures["heartbeat_answers"], figures["heartbeats_counted_by_registry"]
    # A soak long enough for a round of faults must have had them all, in order.
    steps = min(len(FAULTS), int(profile.seconds // profile.cycle))
    return {
        "every workspace converged": figures["converged"] == n,
        "every online workspace recorded in sync": figures["recorded_in_sync"] == n,
        "no registration lost": figures["registered"] == n,
        "the controller reports all online, none drifted":
            figures["online_workspaces"] == n and figures["drifted_workspaces"] == 0,
        "every fault came round": len(faults) >= steps
            and faults == [FAULTS[i % len(FAULTS)] for i in range(len(faults))],
        "the template changed halfway": tally.template_changed == (len(faults)
                                                                   > len(FAULTS) // 2),
        "runtime faults were felt (failed actions)":
            not set(faults) & set(TROUBLE) or figures["failed_actions"] > 0,
        "every install the controller counted reached a box":
            figures["installs_seen_by_runtimes"] >= figures["installs_ok"]
            >= n * figures["declared_plugins"],
        "the registry counted every heartbeat it answered 200":
            0 < answered.get("200", 0) <= counted.get("200", 0),
        "every bad input refused with a 4xx":
            sum(bad.values()) == len(_bad_requests("", "")) * faults.count(Fault.BAD_INPUT)
            and all(400 <= code < 500 for code in bad),
        "RSS grew less than 10%": figures["rss_growth"] < 0.10,
        "controller still running": running,
    }


def _each_minute(samples: list[tuple[float, int]]) -> list[float]:
    """The first sample (MB) of every minute since the load began."""
    picked: dict[int, float] = {}
    for at, kb in samples:
        picked.setdefault(int(at // 60), round(kb / 1024, 1))
    return [picked[minute] for minute in sorted(picked)]


def report_lines(figures: dict[str, Any]) -> list[str]:
    lines = [f"{key}: {json.dumps(value)}" for key, value in figures.items()
             if key not in ("checks", "passed", "controller_log_tail")]
    lines += figures.get("controller_log_tail", [])
    lines += [f"{'ok  ' if ok else 'FAIL'} {name}" for name, ok in figures["checks"].items()]
    lines.append("PASSED" if figures["passed"] else "FAILED")
    return lines
