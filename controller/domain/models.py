"""Domain values that flow through every stage: plugins, desired and observed workspaces,
actions the planner decides on, and the outcomes the executor brings back."""

from __future__ import annotations

import enum
import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from controller.domain.networks import RuntimeNetworks
from controller.domain.reasons import InvalidReason

API_GROUP = "pluginctl.dev"
API_VERSION = "v1alpha1"

# The patterns below are shared with pydantic and the OpenAPI document; Python code checks
# them with fullmatch(), since a Python `$` also matches before a final newline.

#: Plugin names travel in URL paths (`PUT /plugins/{name}`) and in Kubernetes list-map keys.
PLUGIN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
#: Workspace ids are chosen by the platform (often a UUID or an object name).
WORKSPACE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$"
#: Characters no source may hold: the C0 and C1 controls, DEL, space, every other Unicode
#: space and the BOM U+FEFF. Spelled out rather than `\s`, which means one set to Python's
#: `re`, another to ECMA-262 (JSON Schema, the OpenAPI document) and a third to RE2 (the CRDs'
#: CEL rules); `\xHH` escapes and, above U+00FF, the characters themselves (RE2 has no
#: `\uHHHH`) read alike in all of them.
_UNSAFE = r"\x00-\x20\x7f-\xa0" + "\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000\ufeff"
#: `scheme://path[#ref]`, e.g. `gitea://org/repo/agent-skills/seo-all#v1` or `local://seo`.
SOURCE_PATTERN = rf"^[a-z][a-z0-9+.-]{{0,31}}://[^{_UNSAFE}#]+(#[^{_UNSAFE}#]+)?$"
MAX_SOURCE_LENGTH = 2048
MAX_DIGEST_LENGTH = 256

_PLUGIN_NAME = re.compile(PLUGIN_NAME_PATTERN)
_WORKSPACE_ID = re.compile(WORKSPACE_ID_PATTERN)
_SOURCE = re.compile(SOURCE_PATTERN)

#: Attempt key for calls that concern the whole runtime (observe, restart), never a plugin name
#: because `@` is not allowed in plugin names.
RUNTIME_KEY = "@runtime"


def utcnow() -> datetime:
    """The one clock of the controller (frozen by freezegun in tests)."""
    return datetime.now(UTC)


class Unavailable(RuntimeError):
    """Something pluginctl depends on cannot be used (database, cluster, manifest directory);
    the message is one line meant for the operator."""


class InvalidSpec(ValueError):
    """A plugin, source or workspace id that cannot be used; the message says why."""


def check_plugin_name(name: str) -> str:
    if not _PLUGIN_NAME.fullmatch(name):
        raise InvalidSpec(
            f"invalid plugin name {name!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_workspace_id(workspace_id: str) -> str:
    if not _WORKSPACE_ID.fullmatch(workspace_id):
        raise InvalidSpec(
            f"invalid workspace id {workspace_id!r}: use 1-253 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return workspace_id


def check_source(source: str) -> str:
    if len(source) > MAX_SOURCE_LENGTH or not _SOURCE.fullmatch(source):
        raise InvalidSpec(
            f"invalid plugin source {source!r}: expected scheme://path[#ref], "
            "e.g. gitea://org/repo/skills/seo#v1"
        )
    return source


#: Sources of this scheme are files the runtime already has: nothing to pin.
LOCAL_SCHEME = "local"
#: Refs that move: naming one is not pinning a version.
MOVING_REFS = frozenset({"head", "main", "master", "trunk", "develop", "latest", "stable"})


def pin_problem(source: str) -> str | None:
    """Why a source is not pinned to one version, or None: a remote source needs a `#tag` or
    `#sha` that is not a moving branch name; `local://` sources need none."""
    scheme, _, rest = source.partition("://")
    if scheme == LOCAL_SCHEME:
        return None
    ref = rest.partition("#")[2]
    if not ref:
        return (f"source {source} is not pinned: add #<tag> or #<commit sha>, or run the "
                "controller with --allow-unpinned")
    if ref.lower() in MOVING_REFS:
        return (f"source {source} names the moving ref {ref!r}, not a pin: use a tag or a "
                "commit sha, or run the controller with --allow-unpinned")
    return None


def derive_plugin_name(source: str) -> str:
    """The last path segment of a source without its `#ref`:
    `gitea://org/repo/agent-skills/seo-all#v1` -> `seo-all`."""
    path = check_source(source).split("://", 1)[1].split("#", 1)[0]
    segments = [segment for segment in path.split("/") if segment]
    if not segments:
        raise InvalidSpec(f"cannot derive a plugin name from source {source!r}")
    return check_plugin_name(segments[-1])


@dataclass(frozen=True, slots=True)
class Plugin:
    """One plugin as declared or as reported by a runtime."""

    name: str
    source: str
    digest: str | None = None
    # Reported by a runtime: what is on disk is not what was installed (edited by hand,
    # marker missing); never in sync, so the loop installs it again.
    modified: bool = False

    def satisfies(self, wanted: Plugin) -> bool:
        """True when this (installed) plugin is what `wanted` asks for: same source, the
        same digest if `wanted` pins one, and not modified since it was installed."""
        if self.source != wanted.source or self.modified:
            return False
        return wanted.digest is None or self.digest == wanted.digest

    def to_json(self) -> dict[str, str | bool]:
        data: dict[str, str | bool] = {"name": self.name, "source": self.source}
        if self.digest is not None:
            data["digest"] = self.digest
        if self.modified:
            data["modified"] = True
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> Plugin:
        digest = data.get("digest")
        return cls(
            name=str(data["name"]),
            source=str(data["source"]),
            digest=None if digest is None else str(digest),
            modified=data.get("modified") is True,
        )


def plugins_by_name(plugins: tuple[Plugin, ...] | list[Plugin]) -> dict[str, Plugin]:
    return {plugin.name: plugin for plugin in plugins}


def plugins_digest(plugins: Iterable[Plugin]) -> str:
    """A stable digest of a set of plugins (order does not matter)."""
    canonical = "\n".join(sorted(f"{p.name}\0{p.source}\0{p.digest or ''}"
                                  + ("\0modified" if p.modified else "") for p in plugins))
    return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def report_digest(plugins: Iterable[Plugin], error: str | None = None) -> str:
    """The digest of a runtime's report: its plugins, and the trouble it reported if any."""
    if error is None:
        return plugins_digest(plugins)
    return plugins_digest([*plugins, Plugin("@error", error)])


def sync_digest(desired_digest: str, report_digest: str) -> str:
    """The marker of "found in sync with this desired state and this report": both digests
    side by side (64 characters). Not hashed: every pass compares it for every workspace."""
    return desired_digest + report_digest


def desired_changed(marker: str, desired_digest: str) -> bool:
    """Whether the desired state changed since the workspace was found in sync (`marker`)."""
    return not marker.startswith(desired_digest)


@dataclass(frozen=True, slots=True)
class Declaration:
    """Where a desired plugin comes from, for explanations: a template entry or the workspace."""

    kind: str  # "WorkspaceTemplate" or "Workspace"
    name: str
    index: int


@dataclass(frozen=True)
class DesiredWorkspace:
    """What one workspace should have, merged from its template and its own spec."""

    workspace_id: str
    object_ref: str  # "namespace/name" of the Workspace object, for messages
    template: str | None
    plugins: Mapping[str, Plugin]
    suspended: bool = False
    error: str | None = None  # desired state is unusable; the workspace gets no calls
    declared_by: Mapping[str, Declaration] = field(default_factory=dict)
    generation: int | None = None
    reason: InvalidReason | None = None  # why `error`: set exactly when `error` is
    excluded: frozenset[str] = frozenset()  # template plugins the workspace leaves out

    @property
    def template_key(self) -> str | None:
        """"namespace/name" of its template, or None."""
        if self.template is None:
            return None
        return f"{self.object_ref.split('/', 1)[0]}/{self.template}"

    def __post_init__(self) -> None:
        if (self.error is None) != (self.reason is None):
            raise ValueError("a DesiredWorkspace carries an error and its reason together")

    @functools.cached_property
    def digest(self) -> str:
        return plugins_digest(self.plugins.values())


@dataclass(frozen=True, slots=True)
class Attempt:
    """Failure history of one (workspace, key) pair; the key is a plugin name or RUNTIME_KEY."""

    failures: int
    last_error: str
    last_attempt_at: datetime
    next_retry_at: datetime


@dataclass(frozen=True)
class Observed:
    """Everything the store knows about one registered workspace."""

    workspace_id: str
    url: str | None
    registered_at: datetime | None
    last_seen_at: datetime | None
    dormant: bool
    report: Mapping[str, Plugin] | None  # None: nothing known since the last register
    report_at: datetime | None
    owned: Mapping[str, Plugin]  # plugins this controller installed because they were declared
    attempts: Mapping[str, Attempt]
    restarts: tuple[datetime, ...]  # restarts within the budget window, oldest first
    restart_pending: bool  # a call asked for a restart that has not happened yet
    runtime_error: str | None = None  # the runtime's own trouble, sent with its report

    def is_online(self, now: datetime, offline_after: timedelta) -> bool:
        return (
            self.url is not None
            and not self.dormant
            and self.last_seen_at is not None
            and now - self.last_seen_at <= offline_after
        )


@dataclass(frozen=True, slots=True)
class Policy:
    """Knobs of the control loop, with the documented defaults."""

    offline_after: timedelta = timedelta(seconds=90)
    backoff_base: timedelta = timedelta(seconds=5)
    backoff_cap: timedelta = timedelta(minutes=10)
    backoff_jitter: float = 0.2  # a delay is shortened by up to this share, at random
    restart_budget: int = 3
    restart_window: timedelta = timedelta(hours=1)
    call_timeout: float = 10.0
    workspace_timeout: float = 60.0
    concurrency: int = 16
    runtime_networks: RuntimeNetworks = field(default_factory=RuntimeNetworks)
    # Sent to runtimes as `Authorization: Bearer …`, so they can refuse other callers.
    runtime_secret: str | None = field(default=None, repr=False)
    # Send each runtime a secret derived from runtime_secret and its workspace id instead.
    runtime_secret_per_workspace: bool = False
    allow_unpinned: bool = False  # install remote sources without a pinned ref
    # Blast-radius guard: a pass that would remove more than this share of the plugins on
    # the workspaces it covers (and at least GUARD_MIN_REMOVALS), or act on more than
    # max_workspaces workspaces (0: no limit), holds instead of acting unless forced.
    max_removal_share: float = 0.25
    max_workspaces: int = 0
    dry_run: bool = False  # the loop plans and reports only: no runtime calls, no writes
    # The loop forgets a workspace that desired state no longer declares and that has not
    # reported for this long (and failure records this old); None: never.
    forget_after: timedelta | None = timedelta(days=30)

    def refusal(self, plugin: Plugin) -> str | None:
        """Why the controller will not install this plugin at all, or None."""
        return None if self.allow_unpinned else pin_problem(plugin.source)


# --- actions: what the planner decides, what the executor performs -------------------------


class ActionKind(enum.StrEnum):
    OBSERVE = "observe"  # GET /plugins: nothing is known about what is installed
    INSTALL = "install"  # PUT /plugins/{name}
    REMOVE = "remove"  # DELETE /plugins/{name}
    DISOWN = "disown"  # store only: an owned plugin is gone and no longer declared
    RESTART = "restart"  # POST /restart for a restart a previous call asked for


@dataclass(frozen=True, slots=True)
class Action:
    kind: ActionKind
    reason: str
    plugin: Plugin | None = None  # INSTALL: what to install; REMOVE/DISOWN: what is removed

    @property
    def key(self) -> str:
        """The backoff key this action counts against."""
        return self.plugin.name if self.plugin is not None else RUNTIME_KEY

    def describe(self) -> str:
        target = f" {self.plugin.name}" if self.plugin is not None else ""
        return f"{self.kind.value}{target} ({self.reason})"


class WaitKind(enum.StrEnum):
    BACKOFF = "backoff"  # a failed action waits for its next retry
    RESTART_BUDGET = "restart-budget"  # a restart is needed but the budget is spent
    REFUSED = "refused"  # an install the policy forbids (an unpinned source): until changed


@dataclass(frozen=True, slots=True)
class Wait:
    """Something the plan would do but holds back, and until when."""

    kind: WaitKind
    key: str
    until: datetime | None  # None: until the desired state or the policy changes
    reason: str


@dataclass(frozen=True)
class WorkspacePlan:
    workspace_id: str
    actions: tuple[Action, ...]
    waits: tuple[Wait, ...]
    may_restart: bool  # the restart budget allows one restart now
    restart_pending: bool

    @property
    def in_sync(self) -> bool:
        return not self.actions and not self.waits and not self.restart_pending


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one action (or of the restart the executor decided on)."""

    action: Action
    ok: bool
    message: str = ""
    restart_required: bool = False
    report: tuple[Plugin, ...] | None = None  # OBSERVE: what the runtime said it has
    digest: str | None = None  # INSTALL: the digest of what the runtime installed
    # The runtime's seq for this answer (it counts its reports and changes): a report it
    # sent with a lower one was built before this action and must not undo it.
    seq: int | None = None


class Phase(enum.StrEnum):
    """Where a workspace stands for the loop; only ONLINE workspaces receive calls."""

    ONLINE = "Online"
    OFFLINE = "Offline"  # registered, but not seen within --offline-after
    DORMANT = "Dormant"  # paused by an operator (`pluginctl workspace pause`)
    SUSPENDED = "Suspended"  # spec.suspend in its desired state
    UNREGISTERED = "Unregistered"  # declared, its runtime never registered
    INVALID = "Invalid"  # its desired state cannot be used (see the error)
    UNMANAGED = "Unmanaged"  # registered, but no Workspace declares it
