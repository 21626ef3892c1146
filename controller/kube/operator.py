"""The Kubernetes face. kopf watches Workspaces, WorkspaceTemplates and pluginctl's token
Secrets into in-memory indexes (watching writes nothing); the replica holding the Lease runs
the same pass as standalone mode on that desired state, then hands the result to the status
writer (`kube.status_writer`): Workspace/WorkspaceTemplate status, Events and token Secrets.
Nothing here blocks the event loop: API calls run on the client's threads."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

import kopf

from controller.domain.desired import Desired
from controller.domain.models import API_GROUP, API_VERSION, Policy
from controller.engine.loop import FailureCallback, PassCallback, RunningCallback, run_forever
from controller.engine.queue import Trigger, WorkQueue
from controller.engine.report import PassReport
from controller.kube import conditions as mirror
from controller.kube.client import TEMPLATES, WORKSPACES, KubeClient, KubeError
from controller.kube.leader import LeaderElector, LeaseConfig
from controller.kube.status_writer import StatusWriter
from controller.kube.view import KINDS, ClusterView, Key, key_of, workspace_id_of
from controller.runtime.driver import RuntimeDriver
from controller.store import DatabaseError, Sessions

log = logging.getLogger("pluginctl.operator")

DEFAULT_RESYNC = 300.0  # seconds between full LISTs that repair lost watch events
CHECK_EVERY = 5.0  # seconds between passes that compare every object's spec to the build


def _plain(value: Any) -> Any:
    """A deep copy made of dicts and lists, from kopf's read-only body views. Keys and
    strings are interned: each watch event is parsed on its own, so 10,000 Workspaces would
    otherwise hold 10,000 copies of every key and of every value they share (phase, states,
    reasons, sources, the namespace...)."""
    if isinstance(value, Mapping):
        return {sys.intern(str(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if type(value) is str:
        return sys.intern(value)
    return value


def _indexed(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain copy of a watched object without its managedFields (the server's record of
    who wrote which field: about half of a Workspace with status, and read by nobody here;
    10,000 of them are tens of megabytes)."""
    obj = {sys.intern(str(k)): _plain(v) for k, v in body.items() if k != "metadata"}
    obj["metadata"] = {sys.intern(str(k)): _plain(v)
                       for k, v in (body.get("metadata") or {}).items() if k != "managedFields"}
    return obj


def _version(value: Mapping[str, Any] | str | None) -> int | None:
    """A resourceVersion as a number (etcd's revisions are), or None if it is not one."""
    if isinstance(value, Mapping):
        value = (value.get("metadata") or {}).get("resourceVersion")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def merge_listed(watched: list[dict[str, Any]], listed: list[dict[str, Any]],
                 list_version: str | None, deleted: Mapping[Key, int], *,
                 slimmed_away: Collection[Key] = frozenset()) -> list[dict[str, Any]]:
    """The objects of one kind, from the watch's index corrected by the last periodic LIST,
    so that a lost watch event is repaired by the next resync. Per object the newer of the
    two wins (by resourceVersion); an object only the list has is kept unless the watch saw
    it deleted since; an object only the watch has is kept if it is newer than the list
    (created since), else it was deleted and the DELETE event was lost. Where versions are
    not numbers, the watch wins. `slimmed_away`: objects the list held that `slimmed` left
    out, as the watch held them at least as new (so the watch's copy wins)."""
    since = _version(list_version)
    mine = {key_of(obj): obj for obj in watched}
    merged: dict[Key, dict[str, Any]] = {}
    for obj in listed:
        key = key_of(obj)
        seen, version = mine.get(key), _version(obj)
        if seen is not None:
            seen_version = _version(seen)
            newer = seen_version is None or version is None or seen_version >= version
            merged[key] = seen if newer else obj
        elif version is None or deleted.get(key, -1) < version:
            merged[key] = obj
    for key, obj in mine.items():
        if key not in merged and (since is None or key in slimmed_away
                                  or (_version(obj) or since + 1) > since):
            merged[key] = obj
    return list(merged.values())


def slimmed(watched: list[dict[str, Any]], listed: list[dict[str, Any]]
            ) -> tuple[list[dict[str, Any]], frozenset[Key]]:
    """What `merge_listed` will ever take from a LIST, given the watch's index when the LIST
    came: the objects the watch lacks or holds at an older version (and any whose version is
    not a number, which no API server sends). The rest can never win
    (the watch's copies only get newer, and one it drops was seen deleted since), so they
    need not be kept beside the index: a second copy of every object, hundreds of
    megabytes at 10,000 Workspaces. Returns those kept, and the keys of those left out (for
    `merge_listed`: the list did show them)."""
    mine = {key_of(obj): _version(obj) for obj in watched}
    kept, away = [], set()
    for obj in listed:
        key = key_of(obj)
        seen_version, version = mine.get(key), _version(obj)
        if key not in mine or version is None or (seen_version is not None
                                                  and seen_version < version):
            kept.append(obj)
        else:
            away.add(key)
    return kept, frozenset(away)


# --- kopf: watching into memory ------------------------------------------------------------


class NoDiffBase(kopf.DiffBaseStorage):
    """kopf builds, on every event, a deep copy of the object to diff it against the state
    its on.create/on.update handlers last handled. This operator has none (watch and index
    handlers only), so nothing reads that diff: skipping it saves a deep copy of every
    object on every event, status writes included (a third of kopf's work here)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


SpecKey = tuple[Any, ...]


def _spec_key(obj: Mapping[str, Any]) -> SpecKey:
    """What desired state reads of an object changes only with this: which object it is
    (uid) and its spec (generation)."""
    metadata = obj.get("metadata") or {}
    return metadata.get("uid"), metadata.get("generation")


@dataclasses.dataclass(frozen=True)
class Built:
    """Desired state as last built, and the objects it was built from."""

    workspaces: dict[Key, SpecKey]
    templates: tuple[SpecKey, ...]
    #: Kept only while a pass may still plan on this build instead of building again (the
    #: mirror needs the objects it was built from): a status write replaces an object in
    #: the index, and a view kept after that holds a stale copy of every object.
    view: ClusterView | None
    desired: Desired


class Watch:
    """kopf's live indexes of the three kinds, and the signals they raise."""

    def __init__(self, hints: WorkQueue) -> None:
        self.hints = hints
        self.ready = asyncio.Event()
        self.indexes: dict[str, Mapping[Any, Any]] = {}
        self.listed: ClusterView | None = None  # the last periodic LIST (resync), slimmed
        self.slimmed_away: dict[str, frozenset[Key]] = {}  # what `slimmed` left out of it
        self.repairing: set[str] = set()  # the kinds whose view that LIST changes
        self.deleted: dict[str, dict[Key, int]] = {kind: {} for kind in KINDS}
        self.planned: tuple[ClusterView, Desired] | None = None  # the newest pass's
        self._built: Built | None = None  # the last desired state built, and from what
        self._next_build = 0.0  # (monotonic) building sooner waits, unless a template changed
        #: What the watch's events showed of each object's spec, and whether one came, went
        #: or changed since desired state was last checked: a pass then need not compare
        #: 10,000 objects (20 ms, and passes come every 50 ms while heartbeats report).
        self.specs: dict[str, dict[Key, SpecKey]] = {"workspaces": {}, "templates": {}}
        self.changed = False
        self._check_at = 0.0  # (monotonic) when the next pass compares every object

    def _values(self, name: str) -> list[dict[str, Any]]:
        index = self.indexes.get(name) or {}
        return [value for store in index.values() for value in store]

    def _view_of_index(self) -> ClusterView:
        return ClusterView(self._values("workspace_index"), self._values("template_index"),
                           self._values("secret_index"))

    def view(self) -> ClusterView:
        watched = self._view_of_index()
        listed = self.listed
        if listed is None or not self.repairing:
            return watched
        workspaces, templates, secrets = (
            merge_listed(watched.of(kind), listed.of(kind), listed.versions.get(kind),
                         self.deleted[kind], slimmed_away=self.slimmed_away.get(kind, ()))
            if kind in self.repairing else watched.of(kind) for kind in KINDS)
        return ClusterView(workspaces, templates, secrets)

    def desired(self) -> Desired:
        """Desired state now, remembered with the view it came from (`planned`) for the
        pass's mirror. Built again only when an object came, went or changed its spec (its
        generation): a status write, which every mirror makes, changes none of that, and
        building it for 10,000 Workspaces takes most of a second. While Workspaces keep
        coming (10,000 created at once each hint a pass), it is built at most half of the
        time: a pass in between plans on the last build, and the Workspaces that build did
        not see are hinted again, for a pass after the next build. A template change is
        built at once."""
        view = self.view()
        built = self._built
        checked = time.monotonic()
        if built is not None and not self.changed and checked < self._check_at:
            # The watch saw no object come, go or change its spec since the last check.
            if built.view is not None:  # planned on by no pass again
                self._built = dataclasses.replace(built, view=None)
            self.planned = (view, built.desired)
            return built.desired
        # Compared object by object every CHECK_EVERY seconds all the same: desired state
        # never rests on the watch's events alone.
        self.changed, self._check_at = False, checked + CHECK_EVERY
        workspaces = {key_of(obj): _spec_key(obj) for obj in view.workspaces}
        templates = tuple(_spec_key(obj) for obj in view.templates)
        if built is not None and built.workspaces == workspaces \
                and built.templates == templates:
            if built.view is not None:  # planned on by no pass again
                self._built = dataclasses.replace(built, view=None)
            self.planned = (view, built.desired)
            return built.desired
        if built is not None and built.view is not None and built.templates == templates \
                and time.monotonic() < self._next_build:
            for obj in view.workspaces:
                if built.workspaces.get(key_of(obj)) != workspaces[key_of(obj)]:
                    self.hints(workspace_id_of(obj), Trigger.TEMPLATE_CHANGE)
            self.changed = True  # still: the next pass looks again
            self.planned = (built.view, built.desired)
            return built.desired
        started = time.monotonic()
        self._built = Built(workspaces, templates, view, view.desired())
        self._next_build = 2 * time.monotonic() - started
        self.planned = (view, self._built.desired)
        return self._built.desired

    def resynced(self, listed: ClusterView) -> None:
        """A fresh LIST: only what it may add to the watch's view is kept (`slimmed`), and
        deletions it already shows need no remembering."""
        watched = self._view_of_index()
        slim = {kind: slimmed(watched.of(kind), listed.of(kind)) for kind in KINDS}
        workspaces, templates, secrets = (slim[kind][0] for kind in KINDS)
        self.listed = ClusterView(workspaces, templates, secrets, versions=listed.versions)
        self.slimmed_away = {kind: slim[kind][1] for kind in KINDS}
        for kind in KINDS:
            since = _version(listed.versions.get(kind))
            if since is not None:
                self.deleted[kind] = {k: v for k, v in self.deleted[kind].items() if v > since}
        # The kinds whose view the LIST repairs: it adds or replaces an object, or shows
        # one the watch holds as deleted. Until the next LIST no other object can need it
        # (the watch's later objects are newer than the LIST), so every other kind's view
        # is the watch's own, without a merge of every object every pass.
        self.changed = True
        self.repairing = {kind for kind in KINDS if self.listed.of(kind) or len(merge_listed(
            watched.of(kind), [], listed.versions.get(kind), {},
            slimmed_away=self.slimmed_away[kind])) != len(watched.of(kind))}

    def _event(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        """Note a deletion's version (for the resync's merge) and whether an object of a
        kind desired state reads came, went or changed its spec."""
        key = key_of(body)
        specs = self.specs.get(kind)
        if event_type == "DELETED":
            version = _version(body)
            if version is not None:
                self.deleted[kind][key] = version
            if specs is not None:
                specs.pop(key, None)
                self.changed = True
        elif specs is not None and specs.get(key) != (spec := _spec_key(body)):
            specs[key] = spec
            self.changed = True

    def workspace_changed(self, body: Mapping[str, Any], event_type: str | None) -> None:
        """A Workspace event: hint it if a person asked for a pass or its spec changed."""
        self.ready.set()
        self._event("workspaces", event_type, body)
        meta, current = body.get("metadata") or {}, body.get("status") or {}
        requested = (meta.get("annotations") or {}).get(mirror.REQUESTED_AT)
        workspace_id = workspace_id_of(body)
        if requested is not None and requested != current.get("lastHandledReconcileAt"):
            self.hints(workspace_id, Trigger.MANUAL)
        elif current.get("observedGeneration") != meta.get("generation"):
            self.hints(workspace_id, Trigger.TEMPLATE_CHANGE)

    def template_changed(self, body: Mapping[str, Any], event_type: str | None) -> None:
        """A WorkspaceTemplate event: a changed spec hints every Workspace built from it."""
        self.ready.set()
        self._event("templates", event_type, body)
        meta, current = body.get("metadata") or {}, body.get("status") or {}
        if current.get("observedGeneration") == meta.get("generation"):
            return
        namespace, name = meta.get("namespace"), meta.get("name")
        for obj in self._values("workspace_index"):
            spec = obj.get("spec") or {}
            if obj["metadata"].get("namespace") == namespace and \
                    (spec.get("templateRef") or {}).get("name") == name:
                self.hints(workspace_id_of(obj), Trigger.TEMPLATE_CHANGE)

    def registry(self, kube: KubeClient, *, on_cleanup: Callable[[], None]
                 ) -> kopf.OperatorRegistry:
        """kopf's handlers. `on_cleanup` runs when kopf begins to stop (a signal, or its
        stop flag): kopf then waits 5 s for every task started after it to end before it
        cancels them, so ours must start ending at once."""
        registry = kopf.OperatorRegistry()
        connection = kube.connection()

        @kopf.on.cleanup(id="cleanup", registry=registry)
        async def cleanup(**_: Any) -> None:
            on_cleanup()

        @kopf.on.login(id="login", registry=registry)
        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(
                server=connection.server, token=connection.token, scheme="Bearer"
                if connection.token else None, ca_path=connection.ca_path,
                insecure=connection.insecure, certificate_path=connection.certificate_path,
                private_key_path=connection.private_key_path,
                default_namespace=connection.namespace)

        @kopf.on.startup(id="startup", registry=registry)
        def startup(settings: kopf.OperatorSettings, **kwargs: Any) -> None:
            settings.posting.enabled = False  # our Events are written by the mirror
            settings.persistence.diffbase_storage = NoDiffBase()
            settings.watching.server_timeout = 300
            for name in ("workspace_index", "template_index", "secret_index"):
                self.indexes[name] = kwargs[name]

        # The index handlers are async although they never await: kopf runs a sync handler
        # on a worker thread, a hop (and a task or two) per event that cost the event loop
        # more than the copy itself.
        @kopf.index(API_GROUP, API_VERSION, WORKSPACES, id="workspace_index",
                    registry=registry)
        async def workspace_index(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
            obj = _indexed(body)
            return {key_of(obj): obj}

        @kopf.index(API_GROUP, API_VERSION, TEMPLATES, id="template_index",
                    registry=registry)
        async def template_index(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
            obj = _indexed(body)
            return {key_of(obj): obj}

        @kopf.index("v1", "secrets", labels={mirror.MANAGED_BY_LABEL: mirror.MANAGED_BY},
                    id="secret_index", registry=registry)
        async def secret_index(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
            obj = _indexed(body)
            return {key_of(obj): {"metadata": obj.get("metadata", {}), "data": obj.get("data")}}

        @kopf.on.event(API_GROUP, API_VERSION, WORKSPACES, id="workspace_event",
                       registry=registry)
        async def workspace_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            # kopf runs this only once every index is filled: desired state is complete.
            # Async on purpose, as the other event handlers: kopf runs a sync handler on a
            # worker thread, and the ready event and the work queue belong to the loop.
            self.workspace_changed(body, type)

        @kopf.on.event(API_GROUP, API_VERSION, TEMPLATES, id="template_event",
                       registry=registry)
        async def template_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            self.template_changed(body, type)

        @kopf.on.event("v1", "secrets", labels={mirror.MANAGED_BY_LABEL: mirror.MANAGED_BY},
                       id="secret_event", registry=registry)
        async def secret_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            self._event("secrets", type, body)

        return registry


async def run_operator(
    kube: KubeClient,
    sessions: Sessions,
    policy: Policy,
    *,
    interval: float,
    hints: WorkQueue,
    stop: asyncio.Event,
    lease: LeaseConfig | None,
    identity: str,
    on_pass: PassCallback | None = None,
    resync: float = DEFAULT_RESYNC,
    on_failure: FailureCallback | None = None,
    on_running: RunningCallback | None = None,
) -> None:
    """Watch, elect, and while leading run passes and mirror them. The registry API runs
    beside this on every replica (it is stateless)."""
    watch = Watch(hints)
    kopf_stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    kopf_task = asyncio.create_task(kopf.operator(
        registry=watch.registry(kube, on_cleanup=stop.set), clusterwide=True, standalone=True,
        stop_flag=kopf_stop))
    # kopf takes over SIGINT/SIGTERM in the main thread: when it stops, so does everything.
    # kopf also cancels, when it stops, every task started after it: nothing here may rely
    # on a helper task to carry a stop signal, hence callbacks and plain events.
    kopf_task.add_done_callback(lambda _task: stop.set())
    elector = LeaderElector(kube, lease, identity) if lease is not None else None
    elector_task = asyncio.create_task(elector.run(stop)) if elector else None
    sink = StatusWriter(kube, sessions, policy, identity,
                        in_flight=hints.__contains__)

    def after_pass(report: PassReport, trigger: Trigger) -> None:
        if on_pass is not None:
            on_pass(report, trigger)

    try:
        await _until_indexed(kube, watch, stop)
        while not stop.is_set():
            if elector is not None:
                await _wait_first(elector.is_leader, stop)
                if stop.is_set():
                    break
            stops = (stop, elector.lost) if elector is not None else (stop,)
            await _lead(watch, sink, sessions, policy=policy, interval=interval, stop=stops,
                        on_pass=after_pass, resync=resync,
                        on_failure=on_failure, on_running=on_running)
    finally:
        if elector_task is not None:
            await elector_task
        if not kopf_stop.done():
            kopf_stop.set_result(None)
        await asyncio.gather(kopf_task, return_exceptions=True)


async def _resync_forever(kube: KubeClient, watch: Watch, every: float) -> None:
    """LIST everything every `every` seconds: kopf's watch resumes from where it was after
    a disconnect and never lists again, so an event lost on the way is otherwise lost until
    that object changes again. With this, for at most `every` seconds."""
    while True:
        await asyncio.sleep(every)
        try:
            watch.resynced(await kube.call(ClusterView.listed, kube))
        except KubeError as error:
            log.warning("resync failed, the last one stays: %s", error)


class Sink(Protocol):
    """Where a pass is mirrored to: the status writer."""

    async def apply(self, view: ClusterView, desired: Desired,
                    report: PassReport | None) -> None: ...


class Mirrors:
    """Mirrors passes one at a time, in the order they ended: two mirrors never write the
    same object at once, and the newer one writes last. Passes that end while a mirror is
    writing are merged into the next one (their Events all kept, their scopes joined,
    statuses built once from the newest view and store), so a burst of hint passes costs
    one status write per object, not one per pass."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.pending: list[PassReport] = []
        # Only the newest view and desired state are kept: a view of 10,000 objects per
        # pass waiting would be gigabytes in a storm.
        self.newest: tuple[ClusterView, Desired] | None = None
        self.wake = asyncio.Event()
        self.closing = False

    def add(self, view: ClusterView, desired: Desired, report: PassReport) -> None:
        self.pending.append(report)
        self.newest = (view, desired)
        self.wake.set()

    def close(self) -> None:
        """Write what is pending, then end `run`."""
        self.closing = True
        self.wake.set()

    async def run(self) -> None:
        while self.pending or not self.closing:
            if not self.pending:
                await self.wake.wait()
                self.wake.clear()
                continue
            batch, self.pending = self.pending, []
            newest, self.newest = self.newest, None  # not kept once mirrored
            if newest is not None:
                await _mirror_safely(self.sink, *newest, merged(batch))


def merged(reports: list[PassReport]) -> PassReport:
    """Several passes' reports as one mirror sees them: every result once (for its Events;
    a pass's own report leaves out those its early reports carried), the union of their
    scopes (None if any was a full pass), the newest guard."""
    if len(reports) == 1:
        return reports[0]
    scopes = [r.scope for r in reports]
    scope = None if any(s is None for s in scopes) else frozenset().union(
        *(s for s in scopes if s is not None))
    # The rollouts as the newest full pass judged them (a pass about a few judges no wave).
    judged = next((r.rollouts for r in reversed(reports) if r.scope is None),
                  reports[-1].rollouts)
    return dataclasses.replace(reports[-1], scope=scope, rollouts=judged, results=tuple(
        result for report in reports for result in report.unsaid), streamed=frozenset())


async def _lead(watch: Watch, sink: StatusWriter, sessions: Sessions, *, policy: Policy,
                interval: float, stop: tuple[asyncio.Event, ...],
                on_pass: PassCallback, resync: float,
                on_failure: FailureCallback | None = None,
                on_running: RunningCallback | None = None) -> None:
    log.info("leading: running passes every %gs", interval)
    resyncing = asyncio.create_task(_resync_forever(sink.kube, watch, resync))
    mirrors = Mirrors(sink)
    mirroring = asyncio.create_task(mirrors.run())

    def mirror(report: PassReport) -> None:
        """Passes' reports, and their early ones: a pass's workspaces are mirrored as they
        finish, not when its slowest runtime lets it end."""
        if watch.planned is not None and not policy.dry_run:  # a dry run writes nothing
            mirrors.add(*watch.planned, report)

    def mirrored(report: PassReport, trigger: Trigger) -> None:
        on_pass(report, trigger)
        mirror(report)

    async with RuntimeDriver.for_policy(policy, sink.identity) as driver:
        try:
            await run_forever(watch.desired, sessions, driver, policy, interval=interval, stop=stop,
                              queue=watch.hints, on_pass=mirrored, on_early=mirror,
                              replica=sink.identity,
                              on_failure=on_failure, on_running=on_running)
        finally:
            resyncing.cancel()
            await asyncio.gather(resyncing, return_exceptions=True)
            mirrors.close()
            await asyncio.gather(mirroring, return_exceptions=True)
            await _flushed(sink, grace=policy.call_timeout)
    log.info("stopped leading: passes paused")


async def _flushed(sink: StatusWriter, *, grace: float) -> None:
    """The Events still queued, given `grace` seconds; then they are dropped (the next
    leader's passes say what happened in status)."""
    try:
        await asyncio.wait_for(sink.flush(), grace)
    except TimeoutError:
        log.warning("stopped leading with %d Event(s) unwritten", len(sink.events))
        if sink.sending is not None:
            sink.sending.cancel()
            await asyncio.gather(sink.sending, return_exceptions=True)


async def _mirror_safely(sink: Sink, view: ClusterView, desired: Desired,
                         report: PassReport) -> None:
    try:
        await sink.apply(view, desired, report)
    except (KubeError, DatabaseError) as error:
        log.warning("status mirror failed, retried next pass: %s", error)


async def _until_indexed(kube: KubeClient, watch: Watch, stop: asyncio.Event) -> None:
    """Desired state is complete once kopf has filled every index (it then delivers the
    first event), or at once when the cluster holds no pluginctl object at all."""
    try:
        view = await kube.call(ClusterView.listed, kube)
        if not view.workspaces and not view.templates:
            watch.ready.set()
    except KubeError as error:
        log.warning("initial listing failed, waiting for the watch: %s", error)
    await _wait_first(watch.ready, stop)


async def _wait_first(event: asyncio.Event, stop: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
