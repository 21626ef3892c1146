"""The status writer, last stage of the operator's pass: mirrors what a pass did into
Workspace/WorkspaceTemplate status (only where it changed), Events and token Secrets. What
they say comes from `kube.conditions` (pure); this module does the I/O, and every call that
blocks (the store, the synchronous Kubernetes client) runs on a thread, never on the event
loop the registry and the passes share."""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.domain import status, tokens
from controller.domain.desired import Desired
from controller.domain.models import API_GROUP, API_VERSION, DesiredWorkspace, Policy, utcnow
from controller.domain.reasons import InvalidReason
from controller.domain.rollout import RolloutError
from controller.engine import rollouts
from controller.engine.report import PassReport
from controller.kube import conditions as mirror
from controller.kube.client import TEMPLATES, WORKSPACES, KubeClient, KubeError
from controller.kube.view import ClusterView, Key, key_of, workspace_id_of
from controller.store import DatabaseError, Session, Sessions, in_thread, queries

log = logging.getLogger("pluginctl.operator")

ISSUER = "operator"


def desired_by_object(objects: Iterable[Mapping[str, Any]], desired: Desired
                      ) -> dict[Key, DesiredWorkspace]:
    """Each Workspace object's desired state; objects the schema let through but the core
    refused (so they are in neither list) get an Invalid entry with the reason."""
    rejected = {w.object_ref: w for w in desired.rejected}
    errors = {e.ref: e for e in desired.errors}
    result: dict[Key, DesiredWorkspace] = {}
    for obj in objects:
        namespace, name = key_of(obj)
        ref = f"{namespace}/{name}"
        found = desired.workspaces.get(workspace_id_of(obj))
        if found is None or found.object_ref != ref:
            found = rejected.get(ref)
        if found is None:
            error = errors.get(f"Workspace {namespace}/{name}")
            spec = obj.get("spec") or {}
            found = DesiredWorkspace(
                workspace_id=str(spec.get("workspaceId") or name), object_ref=f"{namespace}/{name}",
                template=None, plugins={}, error=error.message if error else "invalid spec",
                reason=error.reason if error else InvalidReason.BAD_SPEC)
        result[(namespace, name)] = found
    return result


#: Status patches, Events and Secret writes in flight at once: below the client's threads
#: (`client.KUBE_THREADS`), so that a lease renewal always finds one free.
WRITES_IN_FLIGHT = 16


#: Seconds without a status patch before queued Events go out.
EVENTS_SETTLE = 0.5
#: Workspaces a mirror judges between two turns it gives the event loop.
YIELD_EVERY = 500


async def _bounded(calls: Iterable[Awaitable[None]], limit: int = WRITES_IN_FLIGHT) -> None:
    """Await `calls` (a lazy iterable: each call starts only when a worker takes it), at most
    `limit` at a time."""
    queue = iter(calls)

    async def worker() -> None:
        for call in queue:
            await call

    await asyncio.gather(*(worker() for _ in range(limit)))


@dataclass(frozen=True, slots=True)
class StatusWrite:
    """One object's status as this mirror wants it."""

    plural: str
    obj: Mapping[str, Any]
    current: Mapping[str, Any]
    new: dict[str, Any]


@dataclass(frozen=True, slots=True)
class SecretWrite:
    """A token Secret to write: with a fresh token when the one it holds is not live."""

    key: Key  # the Workspace's
    secret_key: Key
    workspace_id: str
    token: str | None  # None: issue one
    controller_secret: str | None


def _quiet() -> asyncio.Event:
    quiet = asyncio.Event()
    quiet.set()
    return quiet


PendingEvent = tuple[Mapping[str, Any], mirror.Event, datetime]


@dataclass
class StatusWriter:
    """Writes status, Events and token Secrets; remembers what it wrote so that a watch
    cache that lags behind never causes a second write. Writes to different objects go out
    together (WRITES_IN_FLIGHT at a time); one mirror writes an object once, and mirrors run
    one after another (`Mirrors`), so two writes to one object never race. Events go out
    behind the status, as client-go's event recorder sends them: queued, written once no
    status patch has gone out for EVENTS_SETTLE seconds (a rollout's next Ready never queues
    behind the last one's Events, whose writes cost the API server as much); `flush` waits
    for them."""

    kube: KubeClient
    sessions: Sessions
    policy: Policy
    identity: str
    written: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> status
    #: uid -> (template name, Ready) of each Workspace as the last mirror of it judged
    users: dict[str, tuple[str | None, bool]] = field(default_factory=dict)
    #: uid -> the resourceVersion our last status write went over: while the watch still
    #: shows that version, it has not brought the write back, and what we wrote stands
    over: dict[str, str] = field(default_factory=dict)
    secrets: dict[Key, str] = field(default_factory=dict)  # secret key -> token we wrote
    writes: int = 0  # API writes made, for tests and metrics
    #: Whether a pass in flight holds a workspace (the work queue's `in`): its status is
    #: left to that pass's mirror, which comes when the pass ends. A full pass's mirror
    #: would otherwise write a half-done install's status just before that pass writes the
    #: finished one: a storm of registers paid two status writes a Workspace.
    in_flight: Callable[[str], bool] = lambda _workspace_id: False
    events: collections.deque[PendingEvent] = field(default_factory=collections.deque)
    quiet: asyncio.Event = field(default_factory=_quiet)  # set while no status patch waits
    patched_at: float = float("-inf")  # (event loop time) when the last status patches ended
    sending: asyncio.Task[None] | None = None  # writes the queued Events
    #: Templates (uid, resourceVersion) whose rollout command was applied: never twice.
    commanded: set[tuple[str, str]] = field(default_factory=set)

    async def flush(self) -> None:
        """Wait until every queued Event is written."""
        while self.sending is not None and not self.sending.done():
            await asyncio.wait({self.sending})  # never cancels it, nor raises its error

    async def apply(self, view: ClusterView, desired: Desired,
                    report: PassReport | None) -> None:
        """Mirror a pass. After a full pass: every Workspace, token Secret and template.
        After a pass about a few workspaces (a hint): just those, and the Secrets of those
        that have none yet (a new Workspace gets its token without waiting for a full pass)."""
        now = utcnow()
        scope = report.scope if report is not None else None
        # After a pass about a few workspaces, only their objects: at 10,000 Workspaces a
        # mirror of everything takes the event loop for a second, and a pass hands its
        # workspaces over as they finish, a few at a time.
        objects = view.workspaces if scope is None else view.claiming(scope)
        by_object = desired_by_object(objects, desired)
        if report is not None and report.held_back:  # a rollout holds them back
            by_object = {key: report.held_back.get(wanted.workspace_id, wanted)
                         for key, wanted in by_object.items()}
        secret_names = await self._tokens(view, by_object, desired, now=now, scope=scope)
        # `now` bounds the restarts read to the budget's window, as a pass reads them.
        observed = await in_thread(self.sessions, functools.partial(
            queries.load_observed, now=now, only=scope,
            restart_window=self.policy.restart_window))
        previous_status: dict[str, Mapping[str, Any]] = {}
        writes: list[StatusWrite] = []
        for count, obj in enumerate(objects, 1):
            if count % YIELD_EVERY == 0:  # a full mirror of 10,000 takes most of a second:
                await asyncio.sleep(0)  # the registry and the passes' runtime calls go on
            key = key_of(obj)
            wanted = by_object[key]
            uid = obj["metadata"].get("uid", "")
            if self.in_flight(wanted.workspace_id) and uid in self.written:
                continue
            is_claimant = _claims(desired, wanted)
            state = status.build(wanted, observed.get(wanted.workspace_id) if is_claimant
                                 else None, now, self.policy)
            current = self._current(obj)
            self._share(uid, current)
            previous_status[wanted.workspace_id if is_claimant else uid] = current
            base = dict(obj, status=self.written.get(uid, current))
            new = mirror.workspace_status(state, base, now, token_secret=secret_names.get(key),
                                          guard=report.guard if report is not None else None)
            self.users[uid] = (wanted.template, mirror.is_ready(new))
            if not (self.written.get(uid) == new and current == new):
                writes.append(StatusWrite(WORKSPACES, obj, current, new))
        await self._patch_all(writes)
        if report is not None:
            await self._events(view, desired, report, previous_status=previous_status,
                               now=now)
        if scope is None:  # forget what was written for objects that are gone
            live = {obj["metadata"].get("uid", "") for obj in [*view.workspaces,
                                                               *view.templates]}
            for uid in set(self.written) - live:
                del self.written[uid]
                self.over.pop(uid, None)
            for uid in set(self.users) - live:
                del self.users[uid]
            self.commanded = {seen for seen in self.commanded if seen[0] in live}
        await self._templates(view, desired, report=report, now=now)
        await self._rollout_commands(view, now=now)

    def _ready(self, view: ClusterView, desired: Desired) -> dict[Key, list[bool]]:
        """Per template: whether each of its Workspaces is Ready, as last judged (or, for one
        not judged yet, as its status says)."""
        tally: collections.Counter[tuple[str, str, bool]] = collections.Counter()
        unjudged: dict[Key, Mapping[str, Any]] = {}
        judged_of = self.users.get
        for (uid, namespace), obj in zip(view.uids, view.workspaces, strict=True):
            judged = judged_of(uid)
            if judged is None:
                unjudged[key_of(obj)] = obj
            elif judged[0] is not None:
                tally[namespace, judged[0], judged[1]] += 1
        for key, wanted in desired_by_object(unjudged.values(), desired).items():
            if wanted.template is not None:
                tally[key[0], wanted.template, mirror.is_ready(unjudged[key].get("status"))] += 1
        users: dict[Key, list[bool]] = {}
        for (namespace, template, is_ready), count in tally.items():
            users.setdefault((namespace, template), []).extend([is_ready] * count)
        return users

    async def _templates(self, view: ClusterView, desired: Desired, *,
                         report: PassReport | None, now: datetime) -> None:
        """Each template's status: its workspaces' readiness and, after a full pass (the
        one that judges the waves), its rollout; a mirror of a few workspaces keeps what
        the last full one said of it. A rollout's steps become Events on the template."""
        users = self._ready(view, desired)
        full = report is not None and report.scope is None
        rollouts = {s.template: s for s in report.rollouts} if report is not None else {}
        errors = {e.ref: e.message for e in desired.errors}
        writes, events = [], []
        for template in view.templates:
            namespace, name = key = key_of(template)
            mine = users.get(key, [])
            plugins = len((template.get("spec") or {}).get("plugins") or [])
            current = self._current(template)
            base = self.written.get(template["metadata"].get("uid", ""), current)
            parsed = desired.templates.get(f"{namespace}/{name}")
            new = mirror.template_status(
                dict(template, status=base), plugins, sum(mine), len(mine),
                rollout=rollouts.get(f"{namespace}/{name}"), now=now,
                error=parsed.error if parsed is not None
                else errors.get(f"WorkspaceTemplate {namespace}/{name}"))
            if not full:
                new = {k: v for k, v in new.items() if k not in mirror.ROLLOUT_FIELDS} | {
                    k: base[k] for k in mirror.ROLLOUT_FIELDS if k in base}
            else:
                events += [(template, event, now) for event in mirror.rollout_events(base, new)]
            writes.append(StatusWrite(TEMPLATES, template, current, new))
        await self._patch_all(writes)
        self._queue(events)

    async def _rollout_commands(self, view: ClusterView, *, now: datetime) -> None:
        """Apply the `reconcile.pluginctl.dev/rollout` annotation (resume, abort, promote) of
        each template that carries one, say so in an Event, then remove it (only if it
        still says the same: a newer command is applied by the next mirror). The next full
        pass acts on it. A command that does not apply is refused with a Warning Event."""
        for template in view.templates:
            annotations = template["metadata"].get("annotations") or {}
            action = annotations.get(mirror.ROLLOUT_COMMAND)
            seen = (template["metadata"].get("uid", ""),
                    template["metadata"].get("resourceVersion", ""))
            if action is None or seen in self.commanded:
                continue  # none, or applied already: the watch has not shown its removal yet
            namespace, name = key_of(template)
            event = await self._rollout_command(f"{namespace}/{name}", action, now=now)
            if event is None:
                continue  # the store could not be reached: tried again by the next mirror
            self._queue([(template, event, now)])
            self.commanded.add(seen)
            try:
                await self.kube.call(self.kube.remove_annotation, TEMPLATES, namespace, name,
                                     mirror.ROLLOUT_COMMAND, action)
                self.writes += 1
            except KubeError as error:
                if error.status not in (404, 422):  # gone, or a newer command is there
                    log.warning("%s", error)

    async def _rollout_command(self, template: str, action: str, *, now: datetime
                               ) -> mirror.Event | None:
        if action not in rollouts.COMMANDS:
            message = (f"{mirror.ROLLOUT_COMMAND}={action!r} is not a command: use one of "
                       f"{', '.join(rollouts.COMMANDS)}")
            log.warning("template %s: %s", template, message)
            return mirror.Event("Warning", "RolloutCommandRefused", message)
        try:
            done = await rollouts.command(self.sessions, template, action, now=now)
        except RolloutError as error:
            log.warning("rollout %s refused: %s", action, error)
            return mirror.Event("Warning", "RolloutCommandRefused", f"{action}: {error}")
        except DatabaseError as error:
            log.warning("rollout %s of template %s: %s", action, template, error)
            return None
        log.info("template %s: rollout %s (annotation): %s", template, action, done.message)
        return mirror.Event("Normal", "RolloutCommand", f"{action}: {done.message}")

    async def _patch_all(self, writes: list[StatusWrite]) -> None:
        """Status patches first: queued Events wait meanwhile."""
        if not writes:
            return
        self.quiet.clear()
        try:
            await _bounded(self._patch(write) for write in writes)
        finally:
            self.quiet.set()
            self.patched_at = asyncio.get_running_loop().time()

    async def _patch(self, write: StatusWrite) -> None:
        uid = write.obj["metadata"].get("uid", "")
        if self.written.get(uid) == write.new and write.current == write.new:
            return
        patch = mirror.status_patch(write.current, write.new)
        if patch is None:
            self.written[uid] = write.new
            return
        namespace, name = key_of(write.obj)
        try:
            await self.kube.call(self.kube.patch_status, write.plural, namespace, name, patch)
        except KubeError as error:
            if error.status != 404:  # deleted meanwhile: nothing to report on
                log.warning("%s", error)
            return
        self.writes += 1
        self.written[uid] = write.new
        version = write.obj["metadata"].get("resourceVersion")
        if version:
            self.over[uid] = version

    def _share(self, uid: str, current: Mapping[str, Any]) -> None:
        """Once the watch has brought our last write back, keep the watch's copy of that
        status instead of a second one of our own: 10,000 statuses are tens of megabytes.
        (Neither is ever changed in place.)"""
        mine = self.written.get(uid)
        if mine is not None and mine is not current and isinstance(current, dict) \
                and mine == current:
            self.written[uid] = current

    def _current(self, obj: Mapping[str, Any]) -> Mapping[str, Any]:
        """An object's status as the API server holds it: the view's, unless the view still
        shows the version our last write to it went over (the watch has not brought that
        write back yet): then what we wrote. A lagging watch (10,000 status writes echo
        back slowly) thus never causes the same write twice; any other change to the
        object, a person's edit included, is judged as the view shows it."""
        metadata = obj["metadata"]
        uid = metadata.get("uid", "")
        if uid in self.over and self.over[uid] == metadata.get("resourceVersion"):
            return self.written.get(uid) or {}
        return obj.get("status") or {}

    async def _events(self, view: ClusterView, desired: Desired, report: PassReport, *,
                      previous_status: Mapping[str, Mapping[str, Any]],
                      now: datetime) -> None:
        # Per object: a mirror may carry several passes' results for one workspace.
        events: dict[str, tuple[Mapping[str, Any], list[mirror.Event]]] = {}
        for result in report.unsaid:  # an early report said the others already
            claimant = desired.workspaces.get(result.workspace_id)
            ref = claimant.object_ref if claimant is not None else None
            obj = view.by_ref.get(ref or "")
            if obj is None:
                continue
            before = previous_status.get(result.workspace_id) or {}
            held_before = any(c.get("reason") == mirror.ConditionReason.RESTART_HELD
                              for c in before.get("conditions") or [])
            held_now = result.restart_pending and not (result.plans and
                                                       result.plans[-1].may_restart)
            said = mirror.events_for(result.outcomes, result.prior_failures, held_now,
                                     held_before=held_before, trigger_of=result.trigger_of)
            if said:
                events.setdefault(ref or "", (obj, []))[1].extend(said)
        self._queue([(obj, event, now) for obj, said in events.values()
                     for event in mirror.combined(said)])

    def _queue(self, events: Iterable[PendingEvent]) -> None:
        """Queue Events, to go out behind the status writes."""
        self.events.extend(events)
        if self.events and (self.sending is None or self.sending.done()):
            self.sending = asyncio.create_task(self._send_events())

    async def _settled(self) -> None:
        """Return once no status patch has gone out for EVENTS_SETTLE seconds: the mirrors
        of a pass that reports its workspaces as they finish come one after another."""
        loop = asyncio.get_running_loop()
        while True:
            await self.quiet.wait()
            left = self.patched_at + EVENTS_SETTLE - loop.time()
            if left <= 0 and self.quiet.is_set():
                return
            await asyncio.sleep(max(left, 0.0))

    async def _send_events(self) -> None:
        """Write queued Events, WRITES_IN_FLIGHT at a time, while status writes rest."""

        async def worker() -> None:
            while self.events:
                await self._settled()
                if not self.events:
                    return
                obj, event, now = self.events.popleft()
                await self._event(obj, event, now=now)

        while self.events:  # Events queued as the last workers ended are not left behind
            await asyncio.gather(*(worker() for _ in range(WRITES_IN_FLIGHT)))

    async def _event(self, obj: Mapping[str, Any], event: mirror.Event, *,
                     now: datetime) -> None:
        try:
            await self.kube.call(self.kube.create_event, dict(obj), event.type, event.reason,
                                 message=event.message, now=now, instance=self.identity)
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
                      desired: Desired, *, now: datetime,
                      scope: frozenset[str] | None) -> dict[Key, str]:
        """Every claimed Workspace has a Secret with a live registry token; tokens and
        Secrets of Workspaces that are gone are revoked and deleted. After a hint's pass
        (`scope`), only the Secrets missing altogether: a full pass checks the rest."""
        names = {key: mirror.token_secret_name(key[1]) for key, w in by_object.items()
                 if _claims(desired, w)}
        if scope is not None:
            missing = [SecretWrite(key, (key[0], name), by_object[key].workspace_id, None,
                                   self._controller_secret(by_object[key].workspace_id))
                       for key, name in names.items()
                       if by_object[key].workspace_id in scope
                       and (key[0], name) not in view.secret_keys
                       and (key[0], name) not in self.secrets]
            await self._write_secrets(view, missing, now=now)
            return names
        claimants = {w.workspace_id: w.object_ref for w in desired.workspaces.values()}
        existing: dict[Key, str | None] = {}
        shown: dict[Key, str | None] = {}  # the controller secret each Secret holds
        for secret in view.secrets:
            data = secret.get("data") or {}
            existing[key_of(secret)], shown[key_of(secret)] = (
                base64.b64decode(data[k]).decode() if data.get(k) else None
                for k in (mirror.TOKEN_KEY, mirror.CONTROLLER_SECRET_KEY))
        active = await in_thread(self.sessions, functools.partial(queries.active_tokens,
                                                                  issuer=ISSUER))
        wanted = []
        for key, name in names.items():
            secret_key, workspace_id = (key[0], name), by_object[key].workspace_id
            token = self.secrets.get(secret_key) or existing.get(secret_key)
            live = token is not None and active.get(tokens.digest(token)) == workspace_id
            controller_secret = self._controller_secret(workspace_id)
            if not live or shown.get(secret_key) != controller_secret:
                wanted.append(SecretWrite(key, secret_key, workspace_id,
                                          token if live else None, controller_secret))
        await self._write_secrets(view, wanted, now=now)
        objects = {key_of(obj): obj for obj in view.workspaces}
        await self._revoke_stale(view, objects, active=active, claimants=claimants, now=now)
        return names

    async def _write_secrets(self, view: ClusterView, wanted: list[SecretWrite], *,
                             now: datetime) -> None:
        """Issue the tokens needed in one transaction, then write the Secrets."""
        if not wanted:
            return
        fresh = {w.workspace_id: tokens.generate() for w in wanted if w.token is None}
        try:
            await in_thread(self.sessions, functools.partial(_store_tokens, issued=fresh,
                                                             now=now))
        except DatabaseError as error:
            log.warning("token secrets: cannot issue %d token(s): %s", len(fresh), error)
            return
        objects = {key_of(obj): obj for obj in view.workspaces}
        await _bounded(self._write_secret(objects[w.key], w, w.token or fresh[w.workspace_id])
                       for w in wanted)

    async def _write_secret(self, obj: Mapping[str, Any], write: SecretWrite,
                            token: str) -> None:
        namespace, name = write.secret_key
        try:
            await self.kube.call(self.kube.apply_secret, namespace, _secret_body(
                obj, name, write.workspace_id, token=token,
                controller_secret=write.controller_secret))
        except KubeError as error:
            log.warning("token secret for %s/%s: %s", write.key[0], write.key[1], error)
            return
        self.writes += 1
        self.secrets[write.secret_key] = token

    async def _revoke_stale(self, view: ClusterView, objects: Mapping[Key, Any], *,
                            active: Mapping[str, str], claimants: Mapping[str, str],
                            now: datetime) -> None:
        """Revoke the tokens of workspace ids nobody claims, delete the Secrets of
        Workspaces that are gone."""
        stale = [h for h, workspace_id in active.items() if workspace_id not in claimants]
        if stale:
            revoked = await in_thread(self.sessions, functools.partial(
                queries.revoke_tokens, token_hashes=stale, now=now))
            log.info("revoked %d token(s) of deleted workspaces", revoked)
        gone = [key_of(secret) for secret in view.secrets
                if (owner := (secret.get("metadata", {}).get("labels") or {}).get(
                    mirror.WORKSPACE_LABEL)) and (key_of(secret)[0], owner) not in objects]
        await _bounded(self._delete_secret(key) for key in gone)

    async def _delete_secret(self, key: Key) -> None:
        try:
            await self.kube.call(self.kube.delete_secret, *key)
            self.writes += 1
        except KubeError as error:
            log.warning("%s", error)
        self.secrets.pop(key, None)


def _claims(desired: Desired, wanted: DesiredWorkspace) -> bool:
    """Whether this object holds its workspace id (one that lost it to another object is
    in `desired.rejected`)."""
    claimant = desired.workspaces.get(wanted.workspace_id)
    return claimant is not None and claimant.object_ref == wanted.object_ref


def _store_tokens(session: Session, *, issued: Mapping[str, str], now: datetime) -> None:
    """One transaction for every token a mirror issues (a cold start issues thousands)."""
    for workspace_id, secret in issued.items():
        queries.add_token(session, workspace_id, tokens.digest(secret), now=now,
                          issuer=ISSUER)


def _secret_body(obj: Mapping[str, Any], name: str, workspace_id: str, *,
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
