"""Progressive rollouts of template changes: revisions, deterministic waves, wave health and
the halt. Pure: the engine loads the stored state and the workspaces' health, asks these
functions what follows, and stores the answer.

A template's plugin list is a *revision* (its digest). Without `spec.rollout` a new revision
goes to every workspace at once, as always. With it, a new revision becomes the rollout's
*target* while the last fully rolled-out revision stays *stable*: the workspaces of the
first wave (the first `steps[0]` percent in an order hashed from template, revision and
workspace id) move to the target; when every one of them is in sync and none failed, went
offline or registered again for `bake`, the next wave follows. More than `max_failed`
unhealthy workspaces halt the rollout: the rest stay on the stable revision."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from controller.domain.models import (
    Declaration,
    DesiredWorkspace,
    InvalidSpec,
    Plugin,
    plugins_digest,
)


class RolloutPhase(StrEnum):
    COMPLETE = "Complete"  # every workspace is on the stable revision; nothing in flight
    PROGRESSING = "Progressing"  # waves move to the target revision one after another
    HALTED = "Halted"  # too many unhealthy workspaces: no further wave until resumed
    ABORTED = "Aborted"  # a person gave up on the target: every workspace on stable


class RolloutError(InvalidSpec):
    """A rollout command that does not apply to the rollout's state (resume a complete one)."""


@dataclass(frozen=True, slots=True)
class RolloutSpec:
    """`spec.rollout` of a WorkspaceTemplate."""

    steps: tuple[int, ...]  # cumulative percent of the template's workspaces per wave
    bake: timedelta  # each wave stays healthy this long before the next
    max_failed: int  # more unhealthy workspaces than this halt the rollout

    def __post_init__(self) -> None:
        if not self.steps or self.steps[-1] != 100:
            raise InvalidSpec("rollout.steps must end at 100")
        if any(not 1 <= step <= 100 for step in self.steps):
            raise InvalidSpec("rollout.steps must each be between 1 and 100")
        if any(a >= b for a, b in zip(self.steps, self.steps[1:], strict=False)):
            raise InvalidSpec("rollout.steps must be strictly increasing")
        if self.bake < timedelta(0):
            raise InvalidSpec("rollout.bakeSeconds must be 0 or more")
        if self.max_failed < 0:
            raise InvalidSpec("rollout.maxFailedWorkspaces must be 0 or more")


@dataclass(frozen=True, slots=True)
class Revision:
    """One plugin list of a template, named by its digest."""

    digest: str
    plugins: tuple[Plugin, ...]

    @classmethod
    def of(cls, plugins: Iterable[Plugin]) -> Revision:
        ordered = tuple(sorted(plugins, key=lambda p: p.name))
        return cls(plugins_digest(ordered), ordered)

    @property
    def short(self) -> str:
        return self.digest[:8]


@dataclass(frozen=True, slots=True)
class Rollout:
    """The stored state of one template's rollout ("namespace/name")."""

    template: str
    stable: Revision
    target: Revision | None = None  # None: nothing in flight
    phase: RolloutPhase = RolloutPhase.COMPLETE
    wave: int = 0  # index in steps of the widest wave let through
    started_at: datetime | None = None  # the target's rollout began
    counted_since: datetime | None = None  # failures and registers count from here (resume)
    healthy_since: datetime | None = None  # the current wave has been healthy since
    message: str = ""
    version: int = 0  # bumped on every stored change: replicas compare-and-set on it

    @property
    def in_flight(self) -> bool:
        return self.target is not None and self.phase is not RolloutPhase.COMPLETE


@dataclass(frozen=True, slots=True)
class Health:
    """One workspace of the waves let through, as the rollout judges it."""

    in_sync: bool  # has exactly what its revision asks for
    problem: str | None = None  # failed, went offline, registered again: unhealthy


def observe(rollout: Rollout | None, *, template: str, current: Revision,
            spec: RolloutSpec | None, now: datetime) -> Rollout:
    """The rollout once the template's current revision is known: a first sighting is
    stable at once; a template without `spec.rollout` is stable at its current revision; a
    new revision starts a rollout from the first wave (a revision in flight is replaced;
    the stable one stays); a template back at its stable revision ends the rollout."""
    if rollout is None:
        return Rollout(template=template, stable=current)
    if spec is None or current == rollout.stable:
        if rollout.stable == current and rollout.target is None:
            return rollout
        return replace(rollout, stable=current, target=None, phase=RolloutPhase.COMPLETE,
                       wave=0, healthy_since=None, message="")
    if rollout.target == current:
        return rollout
    return replace(rollout, target=current, phase=RolloutPhase.PROGRESSING, wave=0,
                   started_at=now, counted_since=now, healthy_since=None, message="")


def wave_order(template: str, revision: str, workspace_ids: Iterable[str]) -> list[str]:
    """The workspaces in rollout order: a hash of (template, revision, id), so every replica,
    every restart and `plan` agree, and each revision picks its own first wave."""
    def place(workspace_id: str) -> bytes:
        key = f"{template}\0{revision}\0{workspace_id}".encode()
        return hashlib.blake2b(key, digest_size=8).digest()
    return sorted(workspace_ids, key=place)


def wave_size(total: int, steps: Sequence[int], wave: int) -> int:
    """How many of `total` workspaces waves 0..`wave` hold together (at least one)."""
    return min(total, max(1, math.ceil(total * steps[wave] / 100))) if total else 0


def on_target(rollout: Rollout, spec: RolloutSpec | None, workspace_ids: Collection[str],
              kept: Collection[str] = frozenset()) -> frozenset[str]:
    """The workspaces meant to be on the target revision now (the rest: on stable). `kept`:
    those already let through to it (stored): they stay, whoever joins or leaves the
    template, so a fleet that changes size never moves a workspace back and forth. While
    progressing, the waves let through so far are the first of the hash order (a workspace
    that registers meanwhile takes the place its hash gives it); a halted rollout lets
    nobody new through."""
    if rollout.target is None or rollout.phase in (RolloutPhase.COMPLETE,
                                                   RolloutPhase.ABORTED) or spec is None:
        return frozenset()
    present = frozenset(kept).intersection(workspace_ids)
    if rollout.phase is RolloutPhase.HALTED:
        return present
    wave = min(rollout.wave, len(spec.steps) - 1)
    order = wave_order(rollout.template, rollout.target.digest, workspace_ids)
    return present.union(order[:wave_size(len(order), spec.steps, wave)])


def evaluate(rollout: Rollout, spec: RolloutSpec, health: Mapping[str, Health], *,
             total: int, now: datetime) -> Rollout:
    """A progressing rollout after looking at the workspaces let through (`health`, one
    entry each for those online or gone offline since the rollout began): halt when more
    than `max_failed` are unhealthy; start the next wave (or complete) once all are in sync
    and healthy for `bake`; else wait."""
    if rollout.phase is not RolloutPhase.PROGRESSING or rollout.target is None:
        return rollout
    failed = sorted((w, h.problem) for w, h in health.items() if h.problem is not None)
    if len(failed) > spec.max_failed:
        named = "; ".join(f"{w}: {problem}" for w, problem in failed[:5])
        more = f"; and {len(failed) - 5} more" if len(failed) > 5 else ""
        return replace(rollout, phase=RolloutPhase.HALTED, healthy_since=None,
                       message=f"wave {rollout.wave + 1} of {len(spec.steps)}: "
                               f"{len(failed)} workspace{'s' if len(failed) != 1 else ''} "
                               f"failed (more than {spec.max_failed} allowed): {named}{more}")
    if failed or not all(h.in_sync for h in health.values()):
        return replace(rollout, healthy_since=None) if rollout.healthy_since else rollout
    healthy_since = rollout.healthy_since or now
    if now - healthy_since < spec.bake:
        return rollout if rollout.healthy_since else replace(rollout, healthy_since=now)
    if rollout.wave + 1 < len(spec.steps):
        return replace(rollout, wave=rollout.wave + 1, healthy_since=None)
    return replace(rollout, stable=rollout.target, target=None, phase=RolloutPhase.COMPLETE,
                   healthy_since=None,
                   message=f"revision {rollout.target.short} rolled out to all {total} "
                           f"workspace{'s' if total != 1 else ''}")


def bake_left(rollout: Rollout, spec: RolloutSpec | None, now: datetime) -> timedelta | None:
    """How long the current wave must stay healthy still (None: it is not healthy yet)."""
    if spec is None or rollout.healthy_since is None:
        return None
    return max(timedelta(0), rollout.healthy_since + spec.bake - now)


# --- a person's commands ----------------------------------------------------------------------

def resume(rollout: Rollout, now: datetime) -> Rollout:
    """Go on from a halt: what failed before now no longer counts."""
    if rollout.phase is not RolloutPhase.HALTED:
        raise RolloutError(f"template {rollout.template}: the rollout is "
                           f"{rollout.phase.lower()}, not halted; nothing to resume")
    return replace(rollout, phase=RolloutPhase.PROGRESSING, counted_since=now,
                   healthy_since=None, message=f"resumed at wave {rollout.wave + 1}")


def abort(rollout: Rollout) -> Rollout:
    """Give up on the target: every workspace goes back to the stable revision. A later new
    revision starts a rollout of its own."""
    if not rollout.in_flight or rollout.phase is RolloutPhase.ABORTED:
        raise RolloutError(f"template {rollout.template}: no rollout in progress or halted "
                           f"to abort (it is {rollout.phase.lower()})")
    assert rollout.target is not None
    return replace(rollout, phase=RolloutPhase.ABORTED, healthy_since=None,
                   message=f"revision {rollout.target.short} aborted; every workspace back "
                           f"on {rollout.stable.short}")


def promote(rollout: Rollout) -> Rollout:
    """Skip the remaining waves: the target becomes stable for every workspace."""
    if rollout.target is None or rollout.phase is RolloutPhase.COMPLETE:
        raise RolloutError(f"template {rollout.template}: no rollout to promote")
    return replace(rollout, stable=rollout.target, target=None, phase=RolloutPhase.COMPLETE,
                   healthy_since=None,
                   message=f"revision {rollout.target.short} promoted to every workspace")


def at_revision(wanted: DesiredWorkspace, revision: Revision) -> DesiredWorkspace:
    """`wanted` with its template's plugins taken from `revision` instead: the workspace's
    exclusions and its own plugins apply on top, as they do to the current template."""
    if wanted.template is None or wanted.error is not None:
        return wanted
    plugins: dict[str, Plugin] = {}
    declared_by: dict[str, Declaration] = {}
    for index, plugin in enumerate(revision.plugins):
        if plugin.name not in wanted.excluded:
            plugins[plugin.name] = plugin
            declared_by[plugin.name] = Declaration("WorkspaceTemplate", wanted.template, index)
    for name, plugin in wanted.plugins.items():
        declaration = wanted.declared_by.get(name)
        if declaration is not None and declaration.kind == "Workspace":
            plugins[name] = plugin
            declared_by[name] = declaration
    return replace(wanted, plugins=plugins, declared_by=declared_by)


@dataclass(frozen=True)
class Summary:
    """One template's rollout as a person reads it."""

    template: str
    rollout: Rollout
    steps: tuple[int, ...]  # () without spec.rollout
    total: int  # workspaces of the template
    updated: int  # on the target revision
    healthy: int  # of those: in sync and not failed
    failed: tuple[tuple[str, str], ...]  # (workspace, problem)
    bake_left: timedelta | None

    @property
    def done(self) -> bool:
        return self.rollout.phase is RolloutPhase.COMPLETE
