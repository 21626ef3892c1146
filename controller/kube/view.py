"""What the operator sees of the cluster: the pluginctl objects and token Secrets as plain
dicts, from kopf's watch indexes or a LIST. The pass plans against a view; the status
writer mirrors the pass's result into the same view."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from controller.domain import desired as desired_mod
from controller.domain.desired import Desired
from controller.kube import conditions
from controller.kube.client import TEMPLATES, WORKSPACES, KubeClient

SECRET_SELECTOR = f"{conditions.MANAGED_BY_LABEL}={conditions.MANAGED_BY}"
KINDS = ("workspaces", "templates", "secrets")
Key = tuple[str, str]  # (namespace, name)


def key_of(obj: Mapping[str, Any]) -> Key:
    metadata = obj.get("metadata", {})
    return metadata.get("namespace") or "default", metadata.get("name", "")


def workspace_id_of(obj: Mapping[str, Any]) -> str:
    """The workspace id a Workspace object names: spec.workspaceId, else its name."""
    return str((obj.get("spec") or {}).get("workspaceId") or obj["metadata"]["name"])


@dataclass
class ClusterView:
    """The pluginctl objects and token Secrets of the cluster, as plain dicts."""

    workspaces: list[dict[str, Any]]
    templates: list[dict[str, Any]]
    secrets: list[dict[str, Any]]
    versions: dict[str, str | None] = field(default_factory=dict)  # kind -> list version

    @classmethod
    def listed(cls, kube: KubeClient) -> ClusterView:
        """Three LISTs: blocking, so async callers run it with `kube.call`."""
        listings = (kube.list_objects(WORKSPACES), kube.list_objects(TEMPLATES),
                    kube.list_secrets(SECRET_SELECTOR))
        workspaces, templates, secrets = listings
        return cls(workspaces.items, templates.items, secrets.items,
                   versions={kind: listing.version
                             for kind, listing in zip(KINDS, listings, strict=True)})

    @cached_property
    def _by_workspace_id(self) -> dict[str, list[dict[str, Any]]]:
        index: dict[str, list[dict[str, Any]]] = {}
        for obj in self.workspaces:
            index.setdefault(workspace_id_of(obj), []).append(obj)
        return index

    def claiming(self, workspace_ids: Collection[str]) -> list[dict[str, Any]]:
        """The Workspace objects that name these workspace ids (a view answers many
        mirrors of a few workspaces each: the index is built once)."""
        index = self._by_workspace_id
        return [obj for workspace_id in workspace_ids for obj in index.get(workspace_id, ())]

    @cached_property
    def by_ref(self) -> dict[str, dict[str, Any]]:
        """Workspace objects by "namespace/name"."""
        return {"/".join(key_of(obj)): obj for obj in self.workspaces}

    @cached_property
    def uids(self) -> list[tuple[str, str]]:
        """(uid, namespace) of each Workspace object, in order."""
        return [(obj["metadata"].get("uid", ""), obj["metadata"].get("namespace") or "default")
                for obj in self.workspaces]

    @cached_property
    def secret_keys(self) -> frozenset[Key]:
        return frozenset(key_of(secret) for secret in self.secrets)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return {"workspaces": self.workspaces, "templates": self.templates,
                "secrets": self.secrets}[kind]

    def desired(self) -> Desired:
        return desired_mod.build(("cluster", obj) for obj in [*self.templates, *self.workspaces])
