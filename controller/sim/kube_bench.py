"""`pluginctl bench --kubernetes`: the operator at scale on a real kube-apiserver (the tests'
control plane, `controller.sim.control_plane`). The operator runs as its own process
(`pluginctl run --kubernetes`, so that its peak RSS is its own) over N Workspaces built from
one template; the simulated fleet (`controller.sim.fleet`, a process too) registers them all
at once. Measured: objects created -> every token Secret present; registers -> every plugin
installed and every Workspace Ready; a template change (one plugin more) -> every Workspace
Ready again; API writes during steady passes (from the API server's own request counter);
plugins installed more than once; the operator's peak RSS. Baseline, in the same run: the
same registers and installs in standalone mode (`pluginctl run --manifests`), as a ratio."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from controller.domain import tokens
from controller.domain.models import API_GROUP, API_VERSION, Plugin, utcnow
from controller.registry.serving import free_port
from controller.sim import control_plane, processes
from controller.sim.fleet import FleetProcess
from controller.sim.memory import PLUGINS, proc_status_kb
from controller.sim.scrape import Scrape, scrape
from controller.store import make_engine, make_sessions, queries, transaction, upgrade

NAMESPACE = "pluginctl-bench"  # and a suffix: a deleted namespace lingers (no controller
# manager on this control plane finalises it)
TEMPLATE = "bench"
INSTALL_SECONDS = 0.02  # as the converge section's simulated installs
CONCURRENCY = 64  # runtime calls in flight, both modes
INTERVAL = 10.0  # seconds between full passes, both modes
CREATORS = 32  # objects created at once
WRITES = ("POST", "PUT", "PATCH", "DELETE", "APPLY")
OURS = ("workspaces", "workspacetemplates", "secrets", "events")
HEARTBEAT_EVERY = 20.0  # seconds between one runtime's heartbeats (well inside offline-after)
DEFAULT_WORKSPACES = 1000  # about a minute on two cores, standalone baseline included
Say = Callable[[str], None]


@dataclass(frozen=True)
class Sizes:
    workspaces: int = DEFAULT_WORKSPACES
    plugins: int = 3  # the template's, before the change adds one
    interval: float = INTERVAL

    @property
    def deadline(self) -> float:
        """How long any one phase may take before the bench gives up on it."""
        return max(120.0, self.workspaces * 0.1)


def _workspace_ids(count: int) -> list[str]:
    return [f"ws-{i:06d}" for i in range(count)]


def _template(plugins: list[Plugin], namespace: str) -> dict[str, Any]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "WorkspaceTemplate",
            "metadata": {"name": TEMPLATE, "namespace": namespace},
            "spec": {"plugins": [{"name": p.name, "source": p.source} for p in plugins]}}


def _workspace(name: str, namespace: str) -> dict[str, Any]:
    return {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "Workspace",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"workspaceId": name, "templateRef": {"name": TEMPLATE}}}


class ApiServer:
    """The API server over HTTP as the admin: object creation, LISTs and its `/metrics`."""

    def __init__(self, plane: control_plane.ControlPlane, namespace: str) -> None:
        self.url = plane.url
        self.namespace = namespace
        self.client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=False, limit=CREATORS),
            headers={"Authorization": f"Bearer {control_plane.ADMIN_TOKEN}"},
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None))

    def path(self, plural: str, name: str = "") -> str:
        group = "/api/v1" if plural == "secrets" else f"/apis/{API_GROUP}/{API_VERSION}"
        return f"{group}/namespaces/{self.namespace}/{plural}" + (f"/{name}" if name else "")

    async def create(self, plural: str, body: dict[str, Any]) -> None:
        async with self.client.post(self.url + self.path(plural), json=body) as answer:
            if answer.status not in (200, 201):
                raise RuntimeError(f"create {plural}: HTTP {answer.status}: "
                                   f"{(await answer.text())[:300]}")

    async def create_all(self, plural: str, bodies: list[dict[str, Any]]) -> None:
        limit = asyncio.Semaphore(CREATORS)

        async def one(body: dict[str, Any]) -> None:
            async with limit:
                await self.create(plural, body)

        await asyncio.gather(*(one(b) for b in bodies))

    async def patch(self, plural: str, name: str, body: dict[str, Any]) -> None:
        async with self.client.patch(self.url + self.path(plural, name), json=body, headers={
                "Content-Type": "application/merge-patch+json"}) as answer:
            if answer.status != 200:
                raise RuntimeError(f"patch {plural}/{name}: HTTP {answer.status}")

    async def get(self, path: str, **params: str) -> Any:
        async with self.client.get(self.url + path, params=params) as answer:
            answer.raise_for_status()
            return await answer.json()

    async def secrets(self) -> list[dict[str, Any]]:
        listed = await self.get(self.path("secrets"),
                                labelSelector="app.kubernetes.io/managed-by=pluginctl")
        return list(listed.get("items") or [])

    async def writes(self) -> int:
        """Writes the API server served to pluginctl's kinds (Workspaces, templates, token
        Secrets, Events) since it started: its own `apiserver_request_total`."""
        return sum((await self.writes_by_resource()).values())

    async def writes_by_resource(self) -> dict[str, int]:
        """The same, per resource (a status patch counts under `workspaces`)."""
        page = await scrape(self.client, self.url)
        return {resource: int(sum(page.total("apiserver_request_total", verb=verb,
                                             resource=resource) for verb in WRITES))
                for resource in OURS}

    async def close(self) -> None:
        await self.client.close()


def status_said(status: dict[str, Any]) -> dict[str, str]:
    """What a Workspace status says, flat: phase, pluginsReady, each condition's status and
    reason, how many plugins are in each state (the fields that change when something
    happens; a write that changes none of them changed a message, a time or an attempt)."""
    said = {"phase": str(status.get("phase")), "pluginsReady": str(status.get("pluginsReady"))}
    for condition in status.get("conditions") or []:
        said[f"condition {condition.get('type')}"] = \
            f"{condition.get('status')} ({condition.get('reason')})"
    states = collections.Counter(str(p.get("state")) for p in status.get("plugins") or [])
    said["plugins"] = " ".join(f"{state}x{n}" for state, n in sorted(states.items()))
    return said


def status_changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Each field of `status_said` that differs, as "field: before -> after"."""
    return [f"{key}: {before.get(key)} -> {after.get(key)}"
            for key in sorted(before.keys() | after.keys()) if before.get(key) != after.get(key)]


@dataclass
class ReadyWatch:
    """Every Workspace's Ready and pluginsReady, from a LIST then a WATCH of the namespace;
    `wait_all` returns when every one is Ready with `want` plugins ("4/4")."""

    api: ApiServer
    count: int
    want: str = ""
    seen: dict[str, tuple[bool, str]] = field(default_factory=dict)
    good: set[str] = field(default_factory=set)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    last_at: float = 0.0  # when the newest change arrived (wall clock)
    broken: str | None = None  # the last error of the watch
    said: dict[str, dict[str, str]] = field(default_factory=dict)  # status_said, per name
    changes: collections.Counter[str] | None = None  # while recording: what changed, how often

    def _update(self, obj: dict[str, Any], deleted: bool = False) -> None:
        name = obj["metadata"]["name"]
        status = obj.get("status") or {}
        said = status_said(status)
        if self.changes is not None and name in self.said:
            self.changes.update(status_changes(self.said[name], said)
                                or ["none of these (a message, a time or attempts)"])
        self.said[name] = said
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        self.seen[name] = (ready and not deleted, str(status.get("pluginsReady")))
        if self.seen[name] == (True, self.want):
            self.good.add(name)
        else:
            self.good.discard(name)
        self.last_at = time.time()
        self.changed.set()

    def record(self) -> None:
        """From now on, count what each status change changed (`changes`)."""
        self.changes = collections.Counter()

    def recorded(self) -> dict[str, int]:
        """What was counted since `record`, most frequent first; recording stops."""
        changes, self.changes = self.changes or collections.Counter(), None
        return dict(changes.most_common())

    def target(self, want: str) -> None:
        self.want = want
        self.good = {n for n, state in self.seen.items() if state == (True, want)}

    async def run(self) -> None:
        """LIST then WATCH, again whenever the stream ends or breaks."""
        while True:
            try:
                await self._list_and_watch()
            except (aiohttp.ClientError, ValueError, KeyError) as error:
                self.broken = f"{type(error).__name__}: {error}"
                await asyncio.sleep(0.5)

    async def _list_and_watch(self) -> None:
        path = self.api.path("workspaces")
        listed = await self.api.get(path)
        for obj in listed.get("items") or []:
            self._update(obj)
        version = listed["metadata"]["resourceVersion"]
        async with self.api.client.get(self.api.url + path, params={
                "watch": "1", "resourceVersion": version, "timeoutSeconds": "3600"}) as stream:
            stream.raise_for_status()
            async for line in stream.content:
                event = json.loads(line)
                if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                    self._update(event["object"], event["type"] == "DELETED")

    def lagging(self) -> str:
        """Why `wait_all` gave up: a few Workspaces not there yet, as the watch saw them."""
        behind = [f"{name}: {self.seen[name]}" for name in sorted(self.seen)
                  if name not in self.good][:5]
        return (f"{len(self.good)}/{self.count} Ready with {self.want} plugins; "
                f"{len(self.seen)} seen; e.g. {behind}; watch error: {self.broken}")

    async def wait_all(self, deadline: float) -> float | None:
        """When the last Workspace became Ready with `want` plugins (None: not by then)."""
        while len(self.good) < self.count:
            self.changed.clear()
            remaining = deadline - time.time()
            if remaining <= 0:
                return None
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                return None
        return self.last_at


class Controller:
    """A `pluginctl run` process (operator or standalone) and its registry/metrics port."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str], *,
                 interval: float) -> None:
        self.port = free_port()
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "controller", "--log-level", "info", "run", *args,
             "--listen", f"127.0.0.1:{self.port}", "--interval", str(interval),
             "--concurrency", str(CONCURRENCY)],
            env=env, stdout=subprocess.DEVNULL, stderr=log.open("wb"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def started(self, client: aiohttp.ClientSession, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"pluginctl run exited with {self.process.returncode}:\n"
                                   f"{self.log.read_text(errors='replace')[-3000:]}")
            try:
                async with client.get(self.url + "/healthz") as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError("pluginctl run did not come up")

    async def metrics(self, client: aiohttp.ClientSession) -> Scrape:
        return await scrape(client, self.url)

    def peak_rss_mb(self) -> float:
        return round(proc_status_kb("VmHWM", self.process.pid) / 1024, 1)

    def log_lines(self) -> int:
        with self.log.open("rb") as stream:
            return sum(1 for _ in stream)

    def stop(self) -> None:
        processes.end(self.process)


# --- the phases -----------------------------------------------------------------------------

async def _until(check: Callable[[], Any], what: str, deadline: float,
                 every: float = 0.2) -> float:
    """Polls the async `check` until it is true; when it was (wall clock)."""
    while time.time() < deadline:
        if await check():
            return time.time()
        await asyncio.sleep(every)
    raise RuntimeError(f"gave up waiting for {what}")


def _tokens_of(secrets: list[dict[str, Any]]) -> dict[str, str]:
    import base64

    found = {}
    for secret in secrets:
        labels = secret["metadata"].get("labels") or {}
        token = (secret.get("data") or {}).get("token")
        if token and labels.get("pluginctl.dev/workspace-id"):
            found[labels["pluginctl.dev/workspace-id"]] = base64.b64decode(token).decode()
    return found


@dataclass
class Phase:
    """Where a phase began: API writes per resource and CPU seconds per process so far,
    and when (monotonic)."""

    writes: dict[str, int]
    cpu: dict[str, float]
    at: float = field(default_factory=time.monotonic)


@dataclass
class Run:
    """One measured run of the operator; the figures as they are taken."""

    api: ApiServer
    operator: Controller
    watch: ReadyWatch
    sizes: Sizes
    scratch: Path
    say: Say
    cpu: Callable[[], dict[str, float]]  # CPU seconds so far, per process
    figures: dict[str, Any] = field(default_factory=dict)

    async def begin(self) -> Phase:
        self.watch.record()
        return Phase(await self.api.writes_by_resource(), self.cpu())

    async def end(self, name: str, began: Phase) -> dict[str, Any]:
        """Record what the phase `name` cost since `began` (its length, API writes per
        resource, CPU per process, what the Workspace status writes changed), under `phases`
        in the figures."""
        writes, cpu = await self.api.writes_by_resource(), self.cpu()
        phase = self.figures.setdefault("phases", {})[name] = {
            "seconds": round(time.monotonic() - began.at, 1),
            "api_writes": {k: v - began.writes.get(k, 0) for k, v in writes.items()
                           if v - began.writes.get(k, 0)},
            "cpu_seconds": {k: round(v - began.cpu.get(k, 0.0), 1) for k, v in cpu.items()},
            "workspace_status_changes": self.watch.recorded()}
        return phase

    async def objects_to_secrets(self, ids: list[str]) -> dict[str, str]:
        began = await self.begin()
        started = time.time()
        namespace = self.api.namespace
        await self.api.create("workspacetemplates",
                              _template(PLUGINS[:self.sizes.plugins], namespace))
        await self.api.create_all("workspaces", [_workspace(i, namespace) for i in ids])
        created = time.time()
        self.say(f"  {len(ids)} Workspaces created in {created - started:.1f}s")

        async def all_secrets() -> bool:
            return len(await self.api.secrets()) >= len(ids)

        present = await _until(all_secrets, "every token Secret", created + self.sizes.deadline,
                               every=0.5)
        self.figures.update(create_seconds=round(created - started, 2),
                            created_to_secrets_seconds=round(present - created, 2))
        self.say(f"  every token Secret {present - created:.1f}s after the last object")
        await self.end("objects_to_secrets", began)
        return _tokens_of(await self.api.secrets())

    async def registers_to_ready(self, fleet: FleetProcess, ids: list[str]) -> None:
        count = self.sizes.plugins
        self.watch.target(f"{count}/{count}")
        began = await self.begin()
        heartbeats = _heartbeat_tally(await fleet.get("/fleet/state"))
        # Each runtime heartbeats once registered, as real ones do (every HEARTBEAT_EVERY s):
        # a register storm longer than the offline threshold must not turn the early ones
        # Offline.
        await fleet.post("/fleet/heartbeats", {"rate": len(ids) / HEARTBEAT_EVERY})
        started = time.time()
        await fleet.register(ids)
        registered = time.time()

        async def installed() -> bool:
            return await fleet.done_count() >= len(ids)

        all_installed = await _until(installed, "every install", started + self.sizes.deadline)
        ready = await self.watch.wait_all(started + self.sizes.deadline)
        if ready is None:
            raise RuntimeError(f"registers: {self.watch.lagging()}")
        self.figures.update(registers_seconds=round(registered - started, 2),
                            registers_to_installed_seconds=round(all_installed - started, 2),
                            registers_to_ready_seconds=round(ready - started, 2))
        self.say(f"  registers: every plugin installed after {all_installed - started:.1f}s, "
                 f"every Workspace Ready after {ready - started:.1f}s")
        phase = await self.end("registers_to_ready", began)
        phase["fleet_heartbeats"] = _since(heartbeats,
                                           _heartbeat_tally(await fleet.get("/fleet/state")))
        self.say(f"    meanwhile the fleet's heartbeats: {phase['fleet_heartbeats']}")

    async def steady_writes(self, fleet: FleetProcess) -> None:
        """Heartbeats flow (since the registers), two full passes run: how many writes did
        they make, what did the Workspace status writes among them change, and did the
        fleet's heartbeats get through meanwhile (a Workspace not heard from for the offline
        threshold goes Offline, which is a change worth writing)?"""
        client = self.api.client
        last = await self.api.writes()
        while True:  # what the last passes left to write is written first
            await asyncio.sleep(2)
            now = await self.api.writes()
            if now == last:
                break
            last = now
        began = await self.begin()
        heartbeats = _heartbeat_tally(await fleet.get("/fleet/state"))
        answers = _heartbeat_seconds(await self.operator.metrics(client))
        passes = (await self.operator.metrics(client)).total("pluginctl_reconcile_total",
                                                              trigger="periodic")

        async def two_more() -> bool:
            page = await self.operator.metrics(client)
            return page.total("pluginctl_reconcile_total", trigger="periodic") >= passes + 2

        await _until(two_more, "two full passes", time.time() + 3 * self.sizes.interval
                     + self.sizes.deadline, every=0.5)
        await asyncio.sleep(1)  # the second pass's mirror
        steady = await self.end("steady_passes", began)  # which resources, if any were written
        changes = steady["workspace_status_changes"]
        steady["fleet_heartbeats"] = _since(heartbeats,
                                            _heartbeat_tally(await fleet.get("/fleet/state")))
        took = _heartbeat_seconds(await self.operator.metrics(client))
        answered = {k: int(v - answers.get(k, 0)) for k, v in took.items()}
        steady["registry_heartbeats"] = {  # as the operator's registry timed them
            "answered": answered.get("+Inf", 0),
            "slower_than_1s": answered.get("+Inf", 0) - answered.get("1", 0),
            "slower_than_5s": answered.get("+Inf", 0) - answered.get("5", 0)}
        writes = sum(self.figures["phases"]["steady_passes"]["api_writes"].values())
        self.figures["steady_pass_writes"] = writes
        self.say(f"  two steady full passes under heartbeats: {writes} API writes")
        for change, count in list(changes.items())[:5]:
            self.say(f"    {count} Workspace status writes changed {change}")
        self.say(f"    meanwhile the fleet's heartbeats: {steady['fleet_heartbeats']}; "
                 f"the registry's: {steady['registry_heartbeats']}")

    async def template_change(self) -> None:
        """One plugin more in the template, heartbeats still flowing."""
        count = self.sizes.plugins + 1
        self.watch.target(f"{count}/{count}")
        began = await self.begin()
        started = time.time()
        await self.api.patch("workspacetemplates", TEMPLATE,
                             {"spec": _template(PLUGINS[:count], "")["spec"]})
        ready = await self.watch.wait_all(started + self.sizes.deadline)
        if ready is None:
            raise RuntimeError(f"template change: {self.watch.lagging()}")
        self.figures["template_change_to_ready_seconds"] = round(ready - started, 2)
        self.say(f"  template change: every Workspace Ready after {ready - started:.1f}s")
        await self.end("template_change_to_ready", began)


def cpu_seconds(pid: int) -> float:
    """User and system CPU a live process has used so far (0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fleet_figures(state: dict[str, Any]) -> dict[str, int]:
    installed = sum(len(plugins) for plugins in state["installed"].values())
    return {"installs_seen_by_runtimes": int(state["puts"]),
            "installed_more_than_once": int(state["puts"]) - installed,
            "overlapping_calls": int(state["overlaps"]),
            "register_retries": int((state.get("registry") or {}).get("register_retries", 0))}


def _heartbeat_tally(state: dict[str, Any]) -> dict[str, int]:
    """The fleet's heartbeats so far: answered (by status code, and by how long the box
    waited), without an answer, and not sent because the box's last was still unanswered."""
    tally = state.get("registry") or {}
    return {**{f"answered {code}": int(n) for code, n in (tally.get("heartbeats") or {}).items()},
            **{f"waited {'<= ' + bound + ' s' if bound != 'longer' else 'longer'}": int(n)
               for bound, n in (tally.get("waited") or {}).items()},
            "without_answer": int(tally.get("without_answer", 0)),
            "not_sent": int(tally.get("not_sent", 0))}


def _since(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items()}


def _heartbeat_seconds(page: Scrape) -> dict[str, float]:
    """The registry's heartbeat request-duration histogram: cumulative count per upper
    bound ("1", "5", "+Inf")."""
    buckets = page.by("pluginctl_registry_request_seconds_bucket", "le",
                      endpoint="/registry/heartbeat")
    return {(bound if bound == "+Inf" else f"{float(bound):g}"): count
            for bound, count in buckets.items()}


def _database(scratch: Path, label: str) -> str:
    url = f"sqlite:///{scratch / (label + '.db')}"
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    return url


async def operator_run(plane: control_plane.ControlPlane, sizes: Sizes, scratch: Path,
                       say: Say, *, shared: bool) -> dict[str, Any]:
    """The operator over `sizes.workspaces` Workspaces, phase by phase; on a `shared`
    control plane, its objects are deleted after."""
    ids = _workspace_ids(sizes.workspaces)
    namespace = f"{NAMESPACE}-{uuid.uuid4().hex[:6]}"
    plane.kubectl("create", "namespace", namespace)
    operator = Controller(["--kubernetes", "--db", _database(scratch, "operator"),
                           "--lease-namespace", namespace, "--identity", "bench"],
                          scratch / "operator.log", plane.env(), interval=sizes.interval)
    api = ApiServer(plane, namespace)
    fleet: FleetProcess | None = None

    def cpu() -> dict[str, float]:
        """CPU seconds so far: the operator, the API server and etcd, the fleet, and this
        process (the objects' creator and the Ready watch)."""
        return {"operator": cpu_seconds(operator.process.pid),
                "apiserver_and_etcd": sum(cpu_seconds(p.pid) for p in plane.processes),
                "fleet": cpu_seconds(fleet.process.pid) if fleet is not None else 0.0,
                "bench": cpu_seconds(os.getpid())}

    watch = ReadyWatch(api, len(ids))
    run = Run(api, operator, watch, sizes, scratch, say, cpu)
    watching = asyncio.create_task(watch.run())
    try:
        await operator.started(api.client)
        say(f"kubernetes: {len(ids)} Workspaces from one template of {sizes.plugins} plugins")
        tokens_file = scratch / "operator-tokens.json"
        tokens_file.write_text(json.dumps(await run.objects_to_secrets(ids)))
        fleet = FleetProcess(install_delay=INSTALL_SECONDS, expected=sizes.plugins,
                             registry_url=operator.url, tokens_file=tokens_file)
        await fleet.started()
        await run.registers_to_ready(fleet, ids)
        await run.steady_writes(fleet)
        await run.template_change()
        run.figures.update(_fleet_figures(await fleet.get("/fleet/state")))
        run.figures.update(operator_peak_rss_mb=operator.peak_rss_mb(),
                           operator_log_lines=operator.log_lines(), cpu_seconds={
                               "operator": round(cpu_seconds(operator.process.pid), 1),
                               "apiserver_and_etcd": round(sum(
                                   cpu_seconds(p.pid) for p in plane.processes), 1),
                               "fleet": round(cpu_seconds(fleet.process.pid), 1)})
        say(f"  operator peak RSS {run.figures['operator_peak_rss_mb']} MB, "
            f"{run.figures['installed_more_than_once']} plugins installed more than once")
    except BaseException:
        say(f"  the operator's log ends:\n{operator.log.read_text(errors='replace')[-2000:]}")
        raise
    finally:
        watching.cancel()
        await asyncio.gather(watching, return_exceptions=True)
        if fleet is not None:
            await fleet.stop()
        operator.stop()
        await api.close()
        if shared:  # other operators on this control plane (the tests') watch everything
            plane.kubectl("delete", "workspaces,workspacetemplates,secrets", "--all", "-n",
                          namespace, "--wait=false", check=False, timeout=300)
    return run.figures


def _manifests(directory: Path, ids: list[str], plugins: list[Plugin]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    documents = [_template(plugins, "default"), *(_workspace(i, "default") for i in ids)]
    (directory / "fleet.yaml").write_text(yaml.safe_dump_all(documents))
    return directory


def _seed_tokens(url: str, ids: list[str], path: Path) -> Path:
    """Tokens straight into the store (one transaction), as `pluginctl token create` would
    leave them."""
    secrets = {workspace_id: f"plc_kbench_{workspace_id}" for workspace_id in ids}
    engine = make_engine(url)
    try:
        with transaction(make_sessions(engine)) as session:
            for workspace_id, secret in secrets.items():
                queries.add_token(session, workspace_id, tokens.digest(secret), now=utcnow(),
                                  issuer="bench")
    finally:
        engine.dispose()
    path.write_text(json.dumps(secrets))
    return path


async def standalone_run(sizes: Sizes, scratch: Path, say: Say) -> dict[str, Any]:
    """The baseline: the same registers and installs, desired state from YAML."""
    ids = _workspace_ids(sizes.workspaces)
    url = _database(scratch, "standalone")
    tokens_file = _seed_tokens(url, ids, scratch / "standalone-tokens.json")
    directory = _manifests(scratch / "manifests", ids, PLUGINS[:sizes.plugins])
    controller = Controller(["--manifests", str(directory), "--db", url],
                            scratch / "standalone.log", dict(os.environ),
                            interval=sizes.interval)
    fleet = FleetProcess(install_delay=INSTALL_SECONDS, expected=sizes.plugins,
                         registry_url=controller.url, tokens_file=tokens_file)
    try:
        async with aiohttp.ClientSession() as client:
            await controller.started(client)
        await fleet.started()
        say(f"standalone: {len(ids)} workspaces register at once")
        started = time.time()
        await fleet.register(ids)

        async def installed() -> bool:
            return await fleet.done_count() >= len(ids)

        done = await _until(installed, "every install", started + sizes.deadline)
        figures = {"registers_to_installed_seconds": round(done - started, 2),
                   **_fleet_figures(await fleet.get("/fleet/state")),
                   "peak_rss_mb": controller.peak_rss_mb()}
    finally:
        await fleet.stop()
        controller.stop()
    say(f"  every plugin installed after {figures['registers_to_installed_seconds']}s")
    return figures


def _ratio(value: float, baseline: float) -> float | None:
    return round(value / baseline, 2) if baseline > 0 else None


async def run(sizes: Sizes, scratch: Path, say: Say,
              plane: control_plane.ControlPlane | None = None) -> dict[str, Any]:
    """The whole section; on a control plane of its own unless one is given (with the
    CRDs installed)."""
    own = plane is None
    if plane is None:
        say("kubernetes: starting etcd and kube-apiserver")
        plane = await asyncio.to_thread(control_plane.start)
    try:
        if own:
            await asyncio.to_thread(control_plane.install_crds, plane)
        operator = await operator_run(plane, sizes, scratch, say, shared=not own)
    finally:
        if own:
            await asyncio.to_thread(plane.stop)
    standalone = await standalone_run(sizes, scratch, say)
    return {"workspaces": sizes.workspaces, "plugins": sizes.plugins,
            "install_latency_ms": INSTALL_SECONDS * 1000, "concurrency": CONCURRENCY,
            "interval_seconds": sizes.interval, **operator,
            "baseline": {"standalone": standalone},
            "ready_ratio_to_standalone_installed": _ratio(
                operator["registers_to_ready_seconds"],
                standalone["registers_to_installed_seconds"]),
            "installed_ratio_to_standalone": _ratio(
                operator["registers_to_installed_seconds"],
                standalone["registers_to_installed_seconds"])}
