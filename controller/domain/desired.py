"""Desired state: validates WorkspaceTemplate and Workspace objects (from YAML files or from
the API server) and merges them into one DesiredWorkspace per workspace id. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pydantic

from controller.domain.models import (
    API_GROUP,
    API_VERSION,
    Declaration,
    DesiredWorkspace,
    InvalidSpec,
    Plugin,
    Unavailable,
    check_plugin_name,
    check_source,
    check_workspace_id,
    derive_plugin_name,
)
from controller.domain.reasons import InvalidReason
from controller.domain.rollout import RolloutSpec

API_VERSION_STRING = f"{API_GROUP}/{API_VERSION}"
TEMPLATE_KIND = "WorkspaceTemplate"
WORKSPACE_KIND = "Workspace"
DEFAULT_NAMESPACE = "default"


class DesiredStateError(Unavailable):
    """The source of desired state cannot be read at all (as opposed to one bad object)."""


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True, frozen=True)


class PluginEntry(_Strict):
    name: str | None = None
    source: str
    digest: str | None = None


class TemplateRef(_Strict):
    name: str


class RolloutEntry(_Strict):
    steps: list[int]
    bakeSeconds: int = 300
    maxFailedWorkspaces: int = 0


class TemplateSpec(_Strict):
    plugins: list[PluginEntry] = []
    rollout: RolloutEntry | None = None


class WorkspaceSpec(_Strict):
    workspaceId: str | None = None
    templateRef: TemplateRef | None = None
    plugins: list[PluginEntry] = []
    excludePlugins: list[str] = []
    suspend: bool = False


@dataclass(frozen=True, slots=True)
class ObjectError:
    """An object (or a whole file) that could not be used, and why."""

    origin: str  # a file path, or "cluster"
    ref: str  # "Kind namespace/name", or "" when the file itself is broken
    message: str
    # The default is the manifest reader's only case: a file that cannot be read at all.
    reason: InvalidReason = InvalidReason.UNREADABLE

    def __str__(self) -> str:
        where = f"{self.origin}: {self.ref}" if self.ref else self.origin
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class TemplateObject:
    namespace: str
    name: str
    plugins: tuple[Plugin, ...]
    error: str | None  # e.g. two entries with one name: every workspace using it reports this
    rollout: RolloutSpec | None = None  # spec.rollout: new revisions go out in waves

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class WorkspaceObject:
    namespace: str
    name: str
    spec: WorkspaceSpec
    generation: int | None
    origin: str


@dataclass
class Catalog:
    """Everything read from one source of desired state."""

    templates: dict[tuple[str, str], TemplateObject] = field(default_factory=dict)
    workspaces: list[WorkspaceObject] = field(default_factory=list)
    errors: list[ObjectError] = field(default_factory=list)


@dataclass(frozen=True)
class Desired:
    """The merged desired state: one claimant per workspace id, the rest reported."""

    workspaces: Mapping[str, DesiredWorkspace]
    rejected: tuple[DesiredWorkspace, ...]  # objects that could not claim their workspace id
    errors: tuple[ObjectError, ...]  # files or objects that could not be read at all
    templates: Mapping[str, TemplateObject] = field(default_factory=dict)  # by "ns/name"


def _pydantic_message(error: pydantic.ValidationError, prefix: str) -> str:
    parts = []
    for item in error.errors():
        location = ".".join([prefix, *(str(p) for p in item["loc"])]).replace(".[", "[")
        parts.append(f"{location}: {item['msg']}")
    return "; ".join(parts)


def _entry_plugin(entry: PluginEntry) -> Plugin:
    source = check_source(entry.source)
    name = check_plugin_name(entry.name) if entry.name else derive_plugin_name(source)
    return Plugin(name=name, source=source, digest=entry.digest or None)


def _metadata(obj: Mapping[str, Any]) -> tuple[str, str, int | None]:
    metadata = obj.get("metadata")
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("name"), str):
        raise InvalidSpec("metadata.name is required")
    namespace = metadata.get("namespace") or DEFAULT_NAMESPACE
    if not isinstance(namespace, str):
        raise InvalidSpec("metadata.namespace must be a string")
    generation = metadata.get("generation")
    return namespace, metadata["name"], generation if isinstance(generation, int) else None


def add_object(catalog: Catalog, obj: object, origin: str) -> None:
    """Validate one object and add it to the catalog, or record why it cannot be used."""
    if not isinstance(obj, Mapping):
        catalog.errors.append(ObjectError(origin, "", "a document is not a mapping",
                                          InvalidReason.NOT_A_MAPPING))
        return
    kind = obj.get("kind")
    api_version = obj.get("apiVersion")
    if not (isinstance(api_version, str) and api_version.startswith(API_GROUP + "/")):
        return  # somebody else's object (a Secret, a kustomization): not ours to judge
    if api_version != API_VERSION_STRING or kind not in (TEMPLATE_KIND, WORKSPACE_KIND):
        catalog.errors.append(
            ObjectError(
                origin,
                f"{kind or '?'}",
                f"not a pluginctl object: expected apiVersion {API_VERSION_STRING} and kind "
                f"{TEMPLATE_KIND} or {WORKSPACE_KIND}, got {obj.get('apiVersion')!r}/{kind!r}",
                InvalidReason.FOREIGN_VERSION,
            )
        )
        return
    try:
        namespace, name, generation = _metadata(obj)
    except InvalidSpec as error:
        catalog.errors.append(ObjectError(origin, str(kind), str(error),
                                          InvalidReason.BAD_METADATA))
        return
    ref = f"{kind} {namespace}/{name}"
    spec = obj.get("spec") or {}
    try:
        if kind == TEMPLATE_KIND:
            _add_template(catalog, namespace, name, spec=TemplateSpec.model_validate(spec),
                          origin=origin, ref=ref)
        else:
            workspace_spec = WorkspaceSpec.model_validate(spec)
            catalog.workspaces.append(
                WorkspaceObject(namespace, name, workspace_spec, generation, origin)
            )
    except pydantic.ValidationError as error:
        catalog.errors.append(ObjectError(origin, ref, _pydantic_message(error, "spec"),
                                          InvalidReason.BAD_SPEC))


def _add_template(
    catalog: Catalog, namespace: str, name: str, *, spec: TemplateSpec, origin: str, ref: str
) -> None:
    key = (namespace, name)
    if key in catalog.templates:
        catalog.errors.append(ObjectError(origin, ref, "defined more than once; first one kept",
                                          InvalidReason.DEFINED_TWICE))
        return
    plugins: list[Plugin] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(spec.plugins):
        try:
            plugin = _entry_plugin(entry)
        except InvalidSpec as error:
            problems.append(f"spec.plugins[{index}]: {error}")
            continue
        if plugin.name in seen:
            problems.append(
                f"spec.plugins[{index}] and spec.plugins[{seen[plugin.name]}] both declare "
                f"plugin {plugin.name!r}"
            )
            continue
        seen[plugin.name] = index
        plugins.append(plugin)
    rollout = None
    if spec.rollout is not None:
        try:
            rollout = RolloutSpec(tuple(spec.rollout.steps),
                                  timedelta(seconds=spec.rollout.bakeSeconds),
                                  spec.rollout.maxFailedWorkspaces)
        except InvalidSpec as error:
            problems.append(f"spec.{error}")
    problem = None
    if problems:
        problem = f"template {namespace}/{name} is invalid: " + "; ".join(problems)
    catalog.templates[key] = TemplateObject(namespace, name, tuple(plugins), problem, rollout)


def merge_workspace(
    obj: WorkspaceObject, templates: Mapping[tuple[str, str], TemplateObject]
) -> DesiredWorkspace:
    """Desired set = template plugins minus excluded, plus the workspace's own (the workspace
    wins on a name clash). Problems make the workspace invalid, never the whole catalog."""
    spec = obj.spec
    object_ref = f"{obj.namespace}/{obj.name}"
    workspace_id = spec.workspaceId or obj.name
    template_name = spec.templateRef.name if spec.templateRef else None

    def invalid(reason: InvalidReason, message: str) -> DesiredWorkspace:
        return DesiredWorkspace(
            workspace_id=workspace_id,
            object_ref=object_ref,
            template=template_name,
            plugins={},
            suspended=spec.suspend,
            error=message,
            reason=reason,
            generation=obj.generation,
        )

    try:
        check_workspace_id(workspace_id)
    except InvalidSpec as error:
        return invalid(InvalidReason.BAD_WORKSPACE_ID, str(error))

    plugins: dict[str, Plugin] = {}
    declared_by: dict[str, Declaration] = {}
    if template_name is not None:
        template = templates.get((obj.namespace, template_name))
        if template is None:
            return invalid(InvalidReason.TEMPLATE_NOT_FOUND,
                           f"template {obj.namespace}/{template_name} not found")
        if template.error:
            return invalid(InvalidReason.TEMPLATE_INVALID, template.error)
        excluded = set(spec.excludePlugins)
        for index, plugin in enumerate(template.plugins):
            if plugin.name not in excluded:
                plugins[plugin.name] = plugin
                declared_by[plugin.name] = Declaration("WorkspaceTemplate", template_name, index)

    own: dict[str, Plugin] = {}
    for index, entry in enumerate(spec.plugins):
        try:
            plugin = _entry_plugin(entry)
        except InvalidSpec as error:
            return invalid(InvalidReason.BAD_PLUGIN, f"spec.plugins[{index}]: {error}")
        previous = own.get(plugin.name)
        if previous is not None and previous != plugin:
            return invalid(
                InvalidReason.CONFLICTING_PLUGIN,
                f"plugin {plugin.name!r} is declared twice with different sources: "
                f"{previous.source!r} and {plugin.source!r}"
            )
        own[plugin.name] = plugin
        plugins[plugin.name] = plugin
        declared_by[plugin.name] = Declaration("Workspace", obj.name, index)

    return DesiredWorkspace(
        workspace_id=workspace_id,
        object_ref=object_ref,
        template=template_name,
        plugins=plugins,
        suspended=spec.suspend,
        declared_by=declared_by,
        generation=obj.generation,
        excluded=frozenset(spec.excludePlugins),
    )


def resolve(catalog: Catalog) -> Desired:
    """Merge every workspace object; the first object (by namespace/name) claiming a workspace
    id keeps it, later claimants are rejected with a reason."""
    workspaces: dict[str, DesiredWorkspace] = {}
    rejected: list[DesiredWorkspace] = []
    for obj in sorted(catalog.workspaces, key=lambda o: (o.namespace, o.name)):
        desired = merge_workspace(obj, catalog.templates)
        claimant = workspaces.get(desired.workspace_id)
        if claimant is None:
            workspaces[desired.workspace_id] = desired
            continue
        rejected.append(
            DesiredWorkspace(
                workspace_id=desired.workspace_id,
                object_ref=desired.object_ref,
                template=desired.template,
                plugins={},
                suspended=desired.suspended,
                error=(
                    f"DuplicateWorkspaceId: workspace id {desired.workspace_id!r} is already "
                    f"claimed by {claimant.object_ref}"
                ),
                reason=InvalidReason.DUPLICATE_WORKSPACE_ID,
                generation=desired.generation,
            )
        )
    templates = {template.key: template for template in catalog.templates.values()}
    return Desired(workspaces, tuple(rejected), tuple(catalog.errors), templates)


def build(objects: Iterable[tuple[str, object]]) -> Desired:
    """Validate and merge (origin, object) pairs in one go."""
    catalog = Catalog()
    for origin, obj in objects:
        add_object(catalog, obj, origin)
    return resolve(catalog)
