"""The Kubernetes face. kopf watches Workspaces, WorkspaceTemplates and pluginctl's token
Secrets into in-memory indexes (watching writes nothing); the replica holding the Lease runs
the same pass as standalone mode on that desired state, then mirrors the result into
Workspace/WorkspaceTemplate status (only where it changed), Events and token Secrets."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import kopf

from controller.domain import desired as desired_mod
from controller.domain import status, tokens
from controller.domain.desired import Desired
from controller.domain.models import API_GROUP, API_VERSION, DesiredWorkspace, Policy, utcnow
from controller.engine.reconciler import (
    FailureCallback,
    Hints,
    PassReport,
    Trigger,
    reconcile_once,
    run_forever,
)
from controller.kube import conditions as mirror
from controller.kube.client import TEMPLATES, WORKSPACES, KubeClient, KubeError
from controller.kube.leader import LeaderElector, LeaseConfig
from controller.registry.app import issue_token
from controller.runtime.driver import RuntimeDriver
from controller.store import DatabaseError, Sessions, queries, transaction

log = logging.getLogger("pluginctl.operator")

SECRET_SELECTOR = f"{mirror.MANAGED_BY_LABEL}={mirror.MANAGED_BY}"
ISSUER = "operator"
DEFAULT_RESYNC = 300.0  # seconds between full LISTs that repair lost watch events
Key = tuple[str, str]  # (namespace, name)


def _plain(value: Any) -> Any:
    """A deep copy made of dicts and lists, from kopf's read-only body views."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _key(obj: Mapping[str, Any]) -> Key:
    metadata = obj.get("metadata", {})
    return metadata.get("namespace") or "default", metadata.get("name", "")


KINDS = ("workspaces", "templates", "secrets")


@dataclass
class ClusterView:
    """The pluginctl objects and token Secrets of the cluster, as plain dicts."""

    workspaces: list[dict[str, Any]]
    templates: list[dict[str, Any]]
    secrets: list[dict[str, Any]]
    versions: dict[str, str | None] = field(default_factory=dict)  # kind -> list version

    @classmethod
    def listed(cls, kube: KubeClient) -> ClusterView:
        listings = (kube.list_objects(WORKSPACES), kube.list_objects(TEMPLATES),
                    kube.list_secrets(SECRET_SELECTOR))
        workspaces, templates, secrets = listings
        return cls(workspaces.items, templates.items, secrets.items,
                   versions={kind: listing.version
                             for kind, listing in zip(KINDS, listings, strict=True)})

    def of(self, kind: str) -> list[dict[str, Any]]:
        return {"workspaces": self.workspaces, "templates": self.templates,
                "secrets": self.secrets}[kind]

    def desired(self) -> Desired:
        return desired_mod.build(("cluster", obj) for obj in [*self.templates, *self.workspaces])


def _version(value: Mapping[str, Any] | str | None) -> int | None:
    """A resourceVersion as a number (etcd's revisions are), or None if it is not one."""
    if isinstance(value, Mapping):
        value = (value.get("metadata") or {}).get("resourceVersion")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def merge_listed(watched: list[dict[str, Any]], listed: list[dict[str, Any]],
                 list_version: str | None, deleted: Mapping[Key, int]) -> list[dict[str, Any]]:
    """The objects of one kind, from the watch's index corrected by the last periodic LIST,
    so that a lost watch event is repaired by the next resync. Per object the newer of the
    two wins (by resourceVersion); an object only the list has is kept unless the watch saw
    it deleted since; an object only the watch has is kept if it is newer than the list
    (created since), else it was deleted and the DELETE event was lost. Where versions are
    not numbers, the watch wins."""
    since = _version(list_version)
    mine = {_key(obj): obj for obj in watched}
    merged: dict[Key, dict[str, Any]] = {}
    for obj in listed:
        key = _key(obj)
        seen, version = mine.get(key), _version(obj)
        if seen is not None:
            seen_version = _version(seen)
            newer = seen_version is None or version is None or seen_version >= version
            merged[key] = seen if newer else obj
        elif version is None or deleted.get(key, -1) < version:
            merged[key] = obj
    for key, obj in mine.items():
        if key not in merged and (since is None or (_version(obj) or since + 1) > since):
            merged[key] = obj
    return list(merged.values())


def _desired_by_object(view: ClusterView, desired: Desired) -> dict[Key, DesiredWorkspace]:
    """Each Workspace object's desired state; objects the schema let through but the core
    refused (so they are in neither list) get an Invalid entry with the reason."""
    by_ref = {w.object_ref: w for w in [*desired.workspaces.values(), *desired.rejected]}
    errors = {e.ref: e.message for e in desired.errors}
    result: dict[Key, DesiredWorkspace] = {}
    for obj in view.workspaces:
        namespace, name = _key(obj)
        found = by_ref.get(f"{namespace}/{name}")
        if found is None:
            message = errors.get(f"Workspace {namespace}/{name}", "invalid spec")
            spec = obj.get("spec") or {}
            found = DesiredWorkspace(
                workspace_id=str(spec.get("workspaceId") or name), object_ref=f"{namespace}/{name}",
                template=None, plugins={}, error=message)
        result[(namespace, name)] = found
    return result


@dataclass
class Mirror:
    """Writes status, Events and token Secrets; remembers what it wrote so that a watch
    cache that lags behind never causes a second write."""

    kube: KubeClient
    sessions: Sessions
    policy: Policy
    identity: str
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> status
    secrets: dict[Key, str] = field(default_factory=dict)  # secret key -> token we wrote
    writes: int = 0  # API writes made, for tests and metrics

    async def apply(self, view: ClusterView, desired: Desired,
                    report: PassReport | None) -> None:
        """Mirror a pass. After a full pass: every Workspace, token Secret and template.
        After a pass about a few workspaces (a hint): just those."""
        now = utcnow()
        scope = report.scope if report is not None else None
        by_object = _desired_by_object(view, desired)
        claimants = {w.workspace_id: w.object_ref for w in desired.workspaces.values()
                     if w.error is None or not w.error.startswith("DuplicateWorkspaceId")}
        secret_names = await self._tokens(view, by_object, claimants, now) if scope is None \
            else {key: mirror.token_secret_name(key[1]) for key, w in by_object.items()
                  if claimants.get(w.workspace_id) == w.object_ref}
        with transaction(self.sessions) as session:
            observed = queries.load_observed(session, now=now, only=scope,
                                             restart_window=self.policy.restart_window)

        ready: dict[Key, bool] = {}
        previous_status: dict[str, Mapping[str, Any]] = {}
        for obj in view.workspaces:
            key = _key(obj)
            wanted = by_object[key]
            if scope is not None and wanted.workspace_id not in scope:
                uid = obj["metadata"].get("uid", "")
                ready[key] = mirror.is_ready(self.written.get(uid, obj.get("status") or {}))
                continue
            is_claimant = claimants.get(wanted.workspace_id) == wanted.object_ref
            state = status.build(wanted, observed.get(wanted.workspace_id) if is_claimant
                                 else None, now, self.policy)
            uid = obj["metadata"].get("uid", "")
            current = obj.get("status") or {}
            previous_status[wanted.workspace_id if is_claimant else uid] = current
            base = dict(obj, status=self.written.get(uid, current))
            new = mirror.workspace_status(state, base, now, secret_names.get(key),
                                          report.guard if report is not None else None)
            ready[key] = mirror.is_ready(new)
            await self._patch(WORKSPACES, obj, current, new)

        if report is not None:
            await self._events(view, by_object, claimants, report, previous_status, now)

        if scope is None:  # forget what was written for objects that are gone
            live = {obj["metadata"].get("uid", "") for obj in [*view.workspaces,
                                                               *view.templates]}
            for uid in set(self.written) - live:
                del self.written[uid]
        for template in view.templates:
            namespace, name = _key(template)
            users = [k for k in ready if k[0] == namespace
                     and by_object[k].template == name]
            plugins = len((template.get("spec") or {}).get("plugins") or [])
            new = mirror.template_status(template, plugins, sum(ready[k] for k in users),
                                         len(users))
            await self._patch(TEMPLATES, template, template.get("status") or {}, new)

    async def _patch(self, plural: str, obj: Mapping[str, Any], current: Mapping[str, Any],
                     new: dict[str, Any]) -> None:
        uid = obj["metadata"].get("uid", "")
        if self.written.get(uid) == new and current == new:
            return
        patch = mirror.status_patch(current, new)
        if patch is None:
            self.written[uid] = new
            return
        namespace, name = _key(obj)
        try:
            await self.kube.call(self.kube.patch_status, plural, namespace, name, patch)
        except KubeError as error:
            if error.status != 404:  # deleted meanwhile: nothing to report on
                log.warning("%s", error)
            return
        self.writes += 1
        self.written[uid] = new

    async def _events(self, view: ClusterView, by_object: Mapping[Key, DesiredWorkspace],
                      claimants: Mapping[str, str], report: PassReport,
                      previous_status: Mapping[str, Mapping[str, Any]], now: datetime) -> None:
        objects = {f"{k[0]}/{k[1]}": obj for obj in view.workspaces for k in [_key(obj)]}
        for result in report.results:
            ref = claimants.get(result.workspace_id)
            obj = objects.get(ref or "")
            if obj is None:
                continue
            before = previous_status.get(result.workspace_id) or {}
            held_before = any(c.get("reason") == "RestartHeld"
                              for c in before.get("conditions") or [])
            held_now = result.restart_pending and not (result.plans and
                                                       result.plans[-1].may_restart)
            for event in mirror.events_for(result.outcomes, result.prior_failures, held_now,
                                           held_before, trigger_of=result.trigger_of):
                try:
                    await self.kube.call(self.kube.create_event, obj, event.type,
                                            event.reason, event.message, now, self.identity)
                    self.writes += 1
                except KubeError as error:
                    log.warning("%s", error)

    def _controller_secret(self, workspace_id: str) -> str | None:
        """What the workspace's Secret shows its runtime to check the controller's calls:
        the per-workspace secret, when the controller sends one."""
        if self.policy.runtime_secret is None or not self.policy.runtime_secret_per_workspace:
            return None
        return tokens.runtime_secret_for(self.policy.runtime_secret, workspace_id)

    async def _tokens(self, view: ClusterView, by_object: Mapping[Key, DesiredWorkspace],
                      claimants: Mapping[str, str], now: datetime) -> dict[Key, str]:
        """Every claimed Workspace has a Secret with a live registry token; tokens and
        Secrets of Workspaces that are gone are revoked and deleted."""
        with transaction(self.sessions) as session:
            active = queries.active_tokens(session, ISSUER)
        existing: dict[Key, str | None] = {}
        shown: dict[Key, str | None] = {}  # the controller secret each Secret holds
        for secret in view.secrets:
            data = secret.get("data") or {}
            existing[_key(secret)], shown[_key(secret)] = (
                base64.b64decode(data[k]).decode() if data.get(k) else None
                for k in (mirror.TOKEN_KEY, mirror.CONTROLLER_SECRET_KEY))
        names: dict[Key, str] = {}
        objects = {_key(obj): obj for obj in view.workspaces}
        for key, wanted in by_object.items():
            if claimants.get(wanted.workspace_id) != wanted.object_ref:
                continue
            namespace, name = key
            secret_key = (namespace, mirror.token_secret_name(name))
            names[key] = secret_key[1]
            token = self.secrets.get(secret_key) or existing.get(secret_key)
            valid = token is not None and \
                active.get(tokens.digest(token)) == wanted.workspace_id
            controller_secret = self._controller_secret(wanted.workspace_id)
            if valid and shown.get(secret_key) == controller_secret:
                continue
            try:
                if not valid or token is None:
                    token = issue_token(self.sessions, wanted.workspace_id, issuer=ISSUER)
                await self.kube.call(self.kube.apply_secret, namespace,
                                     _secret_body(objects[key], secret_key[1],
                                                  wanted.workspace_id, token,
                                                  controller_secret))
            except (KubeError, DatabaseError) as error:
                log.warning("token secret for %s/%s: %s", namespace, name, error)
                continue
            self.writes += 1
            self.secrets[secret_key] = token
        stale = [h for h, workspace_id in active.items() if workspace_id not in claimants]
        if stale:
            with transaction(self.sessions) as session:
                revoked = queries.revoke_tokens(session, stale, now)
            log.info("revoked %d token(s) of deleted workspaces", revoked)
        for secret in view.secrets:
            namespace, name = _key(secret)
            owner = (secret.get("metadata", {}).get("labels") or {}).get(mirror.WORKSPACE_LABEL)
            if owner and (namespace, owner) not in objects:
                try:
                    await self.kube.call(self.kube.delete_secret, namespace, name)
                    self.writes += 1
                except KubeError as error:
                    log.warning("%s", error)
                self.secrets.pop((namespace, name), None)
        return names


def _secret_body(obj: Mapping[str, Any], name: str, workspace_id: str,
                 token: str, controller_secret: str | None = None) -> dict[str, Any]:
    data = {mirror.TOKEN_KEY: token}
    if controller_secret is not None:
        data[mirror.CONTROLLER_SECRET_KEY] = controller_secret
    metadata = obj["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": metadata.get("namespace"),
            "labels": {mirror.MANAGED_BY_LABEL: mirror.MANAGED_BY,
                       mirror.WORKSPACE_LABEL: metadata.get("name"),
                       mirror.WORKSPACE_ID_LABEL: workspace_id[:63]},
            "ownerReferences": [{"apiVersion": f"{API_GROUP}/{API_VERSION}",
                                 "kind": "Workspace", "name": metadata.get("name"),
                                 "uid": metadata.get("uid"), "controller": True}],
        },
        "stringData": data,
    }


# --- kopf: watching into memory ------------------------------------------------------------


class Watch:
    """kopf's live indexes of the three kinds, and the signals they raise."""

    def __init__(self, hints: Hints) -> None:
        self.hints = hints
        self.ready = asyncio.Event()
        self.indexes: dict[str, Mapping[Any, Any]] = {}
        self.listed: ClusterView | None = None  # the last periodic LIST (resync)
        self.deleted: dict[str, dict[Key, int]] = {kind: {} for kind in KINDS}

    def _values(self, name: str) -> list[dict[str, Any]]:
        index = self.indexes.get(name) or {}
        return [value for store in index.values() for value in store]

    def view(self) -> ClusterView:
        watched = ClusterView(self._values("workspace_index"),
                              self._values("template_index"), self._values("secret_index"))
        listed = self.listed
        if listed is None:
            return watched
        workspaces, templates, secrets = (
            merge_listed(watched.of(kind), listed.of(kind), listed.versions.get(kind),
                         self.deleted[kind]) for kind in KINDS)
        return ClusterView(workspaces, templates, secrets)

    def resynced(self, listed: ClusterView) -> None:
        """A fresh LIST: deletions it already shows need no remembering."""
        self.listed = listed
        for kind in KINDS:
            since = _version(listed.versions.get(kind))
            if since is not None:
                self.deleted[kind] = {k: v for k, v in self.deleted[kind].items() if v > since}

    def _event(self, kind: str, event_type: str | None, body: Mapping[str, Any]) -> None:
        if event_type == "DELETED":
            version = _version(body)
            if version is not None:
                self.deleted[kind][_key(body)] = version

    def registry(self, kube: KubeClient) -> kopf.OperatorRegistry:
        registry = kopf.OperatorRegistry()
        connection = kube.connection()

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
            settings.watching.server_timeout = 300
            for name in ("workspace_index", "template_index", "secret_index"):
                self.indexes[name] = kwargs[name]

        @kopf.index(API_GROUP, API_VERSION, WORKSPACES, id="workspace_index",
                    registry=registry)
        def workspace_index(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
            obj = _plain(body)
            return {_key(obj): obj}

        @kopf.index(API_GROUP, API_VERSION, TEMPLATES, id="template_index",
                    registry=registry)
        def template_index(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
            obj = _plain(body)
            return {_key(obj): obj}

        @kopf.index("v1", "secrets", labels={mirror.MANAGED_BY_LABEL: mirror.MANAGED_BY},
                    id="secret_index", registry=registry)
        def secret_index(body: kopf.Body, **_: Any) -> dict[Key, dict[str, Any]]:
            obj = _plain(body)
            return {_key(obj): {"metadata": obj.get("metadata", {}), "data": obj.get("data")}}

        @kopf.on.event(API_GROUP, API_VERSION, WORKSPACES, id="workspace_event",
                       registry=registry)
        def workspace_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            # kopf runs this only once every index is filled: desired state is complete.
            self.ready.set()
            self._event("workspaces", type, body)
            spec, meta, current = body.get("spec") or {}, body.get("metadata") or {}, \
                body.get("status") or {}
            requested = (meta.get("annotations") or {}).get(mirror.REQUESTED_AT)
            workspace_id = str(spec.get("workspaceId") or meta.get("name"))
            if requested is not None and requested != current.get("lastHandledReconcileAt"):
                self.hints(workspace_id, Trigger.MANUAL)
            elif current.get("observedGeneration") != meta.get("generation"):
                self.hints(workspace_id, Trigger.TEMPLATE_CHANGE)

        @kopf.on.event(API_GROUP, API_VERSION, TEMPLATES, id="template_event",
                       registry=registry)
        def template_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            self.ready.set()
            self._event("templates", type, body)
            meta, current = body.get("metadata") or {}, body.get("status") or {}
            if current.get("observedGeneration") != meta.get("generation"):
                namespace, name = meta.get("namespace"), meta.get("name")
                for obj in self._values("workspace_index"):
                    spec = obj.get("spec") or {}
                    if obj["metadata"].get("namespace") == namespace and \
                            (spec.get("templateRef") or {}).get("name") == name:
                        self.hints(str(spec.get("workspaceId") or obj["metadata"]["name"]),
                                   Trigger.TEMPLATE_CHANGE)

        @kopf.on.event("v1", "secrets", labels={mirror.MANAGED_BY_LABEL: mirror.MANAGED_BY},
                       id="secret_event", registry=registry)
        def secret_event(body: kopf.Body, type: str | None, **_: Any) -> None:
            self._event("secrets", type, body)

        return registry


def default_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


async def run_operator(
    kube: KubeClient,
    sessions: Sessions,
    policy: Policy,
    *,
    interval: float,
    hints: Hints,
    stop: asyncio.Event,
    lease: LeaseConfig | None,
    identity: str,
    on_pass: Callable[[PassReport, str], None] | None = None,
    resync: float = DEFAULT_RESYNC,
    on_failure: FailureCallback | None = None,
) -> None:
    """Watch, elect, and while leading run passes and mirror them. The registry API runs
    beside this on every replica (it is stateless)."""
    watch = Watch(hints)
    kopf_stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    kopf_task = asyncio.create_task(kopf.operator(
        registry=watch.registry(kube), clusterwide=True, standalone=True, stop_flag=kopf_stop))
    # kopf takes over SIGINT/SIGTERM in the main thread: when it stops, so does everything.
    # kopf also cancels, when it stops, every task started after it: nothing here may rely
    # on a helper task to carry a stop signal, hence callbacks and plain events.
    kopf_task.add_done_callback(lambda _task: stop.set())
    elector = LeaderElector(kube, lease, identity) if lease is not None else None
    elector_task = asyncio.create_task(elector.run(stop)) if elector else None
    sink = Mirror(kube, sessions, policy, identity)

    def after_pass(report: PassReport, trigger: str) -> None:
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
            await _lead(watch, sink, sessions, policy, interval, stops, after_pass, resync,
                        on_failure)
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


async def _lead(watch: Watch, sink: Mirror, sessions: Sessions, policy: Policy,
                interval: float, stop: tuple[asyncio.Event, ...],
                on_pass: Callable[[PassReport, str], None], resync: float,
                on_failure: FailureCallback | None = None) -> None:
    log.info("leading: running passes every %gs", interval)
    resyncing = asyncio.create_task(_resync_forever(sink.kube, watch, resync))
    latest: list[tuple[ClusterView, Desired]] = []  # what the newest pass planned against

    def source() -> Desired:
        view = watch.view()
        desired = view.desired()
        latest[:] = [(view, desired)]
        return desired

    def mirrored(report: PassReport, trigger: str) -> None:
        on_pass(report, trigger)
        if latest and not policy.dry_run:  # a dry run writes nothing to the cluster either
            view, desired = latest[0]
            task = asyncio.get_running_loop().create_task(
                _mirror_safely(sink, view, desired, report))
            pending.add(task)
            task.add_done_callback(pending.discard)

    pending: set[asyncio.Task[None]] = set()
    async with RuntimeDriver.for_policy(policy, f"pluginctl/{sink.identity}") as driver:
        try:
            await run_forever(source, sessions, driver, policy, interval=interval, stop=stop,
                              hints=watch.hints, on_pass=mirrored, replica=sink.identity,
                              on_failure=on_failure)
        finally:
            resyncing.cancel()
            await asyncio.gather(resyncing, return_exceptions=True)
    await asyncio.gather(*pending, return_exceptions=True)
    log.info("stopped leading: passes paused")


async def _mirror_safely(sink: Mirror, view: ClusterView, desired: Desired,
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


async def reconcile_cluster_once(kube: KubeClient, sessions: Sessions, policy: Policy,
                                 driver: RuntimeDriver, *, dry_run: bool,
                                 progress: Callable[[int, int], None] | None = None,
                                 force: bool = False) -> PassReport:
    """`pluginctl reconcile --once` against the cluster: list, pass, mirror (unless dry)."""
    view = await kube.call(ClusterView.listed, kube)
    desired = view.desired()
    report = await reconcile_once(desired, sessions, driver, policy, dry_run=dry_run,
                                  progress=progress, force=force)
    if not dry_run:
        await Mirror(kube, sessions, policy, default_identity()).apply(view, desired, report)
    return report
