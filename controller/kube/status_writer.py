"""The status writer, last stage of the operator's pass: mirrors what a pass did into
Workspace/WorkspaceTemplate status (only where it changed), Events and token Secrets. What
they say comes from `kube.conditions` (pure); this module does the I/O, and every call that
blocks (the store, the synchronous Kubernetes client) runs on a thread, never on the event
loop the registry and the passes share."""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.domain import status, tokens
from controller.domain.desired import Desired
from controller.domain.models import API_GROUP, API_VERSION, DesiredWorkspace, Policy, utcnow
from controller.domain.reasons import InvalidReason
from controller.engine.report import PassReport
from controller.kube import conditions as mirror
from controller.kube.client import TEMPLATES, WORKSPACES, KubeClient, KubeError
from controller.kube.view import ClusterView, Key, key_of
from controller.registry.app import issue_token
from controller.store import DatabaseError, Sessions, in_thread, queries

log = logging.getLogger("pluginctl.operator")

ISSUER = "operator"


def desired_by_object(view: ClusterView, desired: Desired) -> dict[Key, DesiredWorkspace]:
    """Each Workspace object's desired state; objects the schema let through but the core
    refused (so they are in neither list) get an Invalid entry with the reason."""
    by_ref = {w.object_ref: w for w in [*desired.workspaces.values(), *desired.rejected]}
    errors = {e.ref: e for e in desired.errors}
    result: dict[Key, DesiredWorkspace] = {}
    for obj in view.workspaces:
        namespace, name = key_of(obj)
        found = by_ref.get(f"{namespace}/{name}")
        if found is None:
            error = errors.get(f"Workspace {namespace}/{name}")
            spec = obj.get("spec") or {}
            found = DesiredWorkspace(
                workspace_id=str(spec.get("workspaceId") or name), object_ref=f"{namespace}/{name}",
                template=None, plugins={}, error=error.message if error else "invalid spec",
                reason=error.reason if error else InvalidReason.BAD_SPEC)
        result[(namespace, name)] = found
    return result


@dataclass
class StatusWriter:
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
        by_object = desired_by_object(view, desired)
        # Objects that lost their workspace id to another are in `desired.rejected`, never
        # among the claimants.
        claimants = {w.workspace_id: w.object_ref for w in desired.workspaces.values()}
        if scope is None:
            secret_names = await self._tokens(view, by_object, claimants, now=now)
        else:  # a hint's pass: the Secrets are as the last full pass left them
            secret_names = {key: mirror.token_secret_name(key[1])
                            for key, w in by_object.items()
                            if claimants.get(w.workspace_id) == w.object_ref}
        # `now` bounds the restarts read to the budget's window, as a pass reads them.
        observed = await in_thread(self.sessions, functools.partial(
            queries.load_observed, now=now, only=scope,
            restart_window=self.policy.restart_window))

        ready: dict[Key, bool] = {}
        previous_status: dict[str, Mapping[str, Any]] = {}
        for obj in view.workspaces:
            key = key_of(obj)
            wanted = by_object[key]
            uid = obj["metadata"].get("uid", "")
            if scope is not None and wanted.workspace_id not in scope:
                ready[key] = mirror.is_ready(self.written.get(uid, obj.get("status") or {}))
                continue
            is_claimant = claimants.get(wanted.workspace_id) == wanted.object_ref
            state = status.build(wanted, observed.get(wanted.workspace_id) if is_claimant
                                 else None, now, self.policy)
            current = obj.get("status") or {}
            previous_status[wanted.workspace_id if is_claimant else uid] = current
            base = dict(obj, status=self.written.get(uid, current))
            new = mirror.workspace_status(state, base, now, token_secret=secret_names.get(key),
                                          guard=report.guard if report is not None else None)
            ready[key] = mirror.is_ready(new)
            await self._patch(WORKSPACES, obj, current=current, new=new)

        if report is not None:
            await self._events(view, claimants, report, previous_status=previous_status,
                               now=now)
        if scope is None:  # forget what was written for objects that are gone
            live = {obj["metadata"].get("uid", "") for obj in [*view.workspaces,
                                                               *view.templates]}
            for uid in set(self.written) - live:
                del self.written[uid]
        await self._templates(view, by_object, ready)

    async def _templates(self, view: ClusterView, by_object: Mapping[Key, DesiredWorkspace],
                         ready: Mapping[Key, bool]) -> None:
        for template in view.templates:
            namespace, name = key_of(template)
            users = [k for k in ready if k[0] == namespace
                     and by_object[k].template == name]
            plugins = len((template.get("spec") or {}).get("plugins") or [])
            new = mirror.template_status(template, plugins, sum(ready[k] for k in users),
                                         len(users))
            await self._patch(TEMPLATES, template, current=template.get("status") or {},
                              new=new)

    async def _patch(self, plural: str, obj: Mapping[str, Any], *,
                     current: Mapping[str, Any], new: dict[str, Any]) -> None:
        uid = obj["metadata"].get("uid", "")
        if self.written.get(uid) == new and current == new:
            return
        patch = mirror.status_patch(current, new)
        if patch is None:
            self.written[uid] = new
            return
        namespace, name = key_of(obj)
        try:
            await self.kube.call(self.kube.patch_status, plural, namespace, name, patch)
        except KubeError as error:
            if error.status != 404:  # deleted meanwhile: nothing to report on
                log.warning("%s", error)
            return
        self.writes += 1
        self.written[uid] = new

    async def _events(self, view: ClusterView, claimants: Mapping[str, str],
                      report: PassReport, *,
                      previous_status: Mapping[str, Mapping[str, Any]],
                      now: datetime) -> None:
        objects = {f"{k[0]}/{k[1]}": obj for obj in view.workspaces for k in [key_of(obj)]}
        for result in report.results:
            ref = claimants.get(result.workspace_id)
            obj = objects.get(ref or "")
            if obj is None:
                continue
            before = previous_status.get(result.workspace_id) or {}
            held_before = any(c.get("reason") == mirror.ConditionReason.RESTART_HELD
                              for c in before.get("conditions") or [])
            held_now = result.restart_pending and not (result.plans and
                                                       result.plans[-1].may_restart)
            for event in mirror.events_for(result.outcomes, result.prior_failures, held_now,
                                           held_before=held_before, trigger_of=result.trigger_of):
                try:
                    await self.kube.call(self.kube.create_event, obj, event.type,
                                         event.reason, message=event.message, now=now,
                                         instance=self.identity)
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
                      claimants: Mapping[str, str], *, now: datetime) -> dict[Key, str]:
        """Every claimed Workspace has a Secret with a live registry token; tokens and
        Secrets of Workspaces that are gone are revoked and deleted."""
        active = await in_thread(self.sessions, functools.partial(queries.active_tokens,
                                                                  issuer=ISSUER))
        existing: dict[Key, str | None] = {}
        shown: dict[Key, str | None] = {}  # the controller secret each Secret holds
        for secret in view.secrets:
            data = secret.get("data") or {}
            existing[key_of(secret)], shown[key_of(secret)] = (
                base64.b64decode(data[k]).decode() if data.get(k) else None
                for k in (mirror.TOKEN_KEY, mirror.CONTROLLER_SECRET_KEY))
        names: dict[Key, str] = {}
        objects = {key_of(obj): obj for obj in view.workspaces}
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
                    token = await asyncio.to_thread(issue_token, self.sessions,
                                                    wanted.workspace_id, issuer=ISSUER)
                await self.kube.call(self.kube.apply_secret, namespace,
                                     _secret_body(objects[key], secret_key[1],
                                                  wanted.workspace_id, token=token,
                                                  controller_secret=controller_secret))
            except (KubeError, DatabaseError) as error:
                log.warning("token secret for %s/%s: %s", namespace, name, error)
                continue
            self.writes += 1
            self.secrets[secret_key] = token
        await self._revoke_stale(view, objects, active=active, claimants=claimants, now=now)
        return names

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
        for secret in view.secrets:
            namespace, name = key_of(secret)
            owner = (secret.get("metadata", {}).get("labels") or {}).get(mirror.WORKSPACE_LABEL)
            if owner and (namespace, owner) not in objects:
                try:
                    await self.kube.call(self.kube.delete_secret, namespace, name)
                    self.writes += 1
                except KubeError as error:
                    log.warning("%s", error)
                self.secrets.pop((namespace, name), None)


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
