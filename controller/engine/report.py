"""What a pass returns, at the end of the flow: a WorkspaceResult per workspace it planned
or acted on, and the PassReport over all of them that the CLI prints, the loop logs, the
metrics count and the operator mirrors into status."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

from controller.domain import planner
from controller.domain.desired import ObjectError
from controller.domain.models import (
    Action,
    ActionKind,
    DesiredWorkspace,
    Observed,
    Outcome,
    Phase,
    Wait,
    WaitKind,
    WorkspacePlan,
    utcnow,
)
from controller.domain.rollout import Summary
from controller.engine.queue import Trigger

log = logging.getLogger("pluginctl.reconciler")


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkspaceResult:
    workspace_id: str
    plans: tuple[WorkspacePlan, ...]
    outcomes: tuple[Outcome, ...] = ()
    restart_pending: bool = False
    error: str | None = None  # the pass could not finish this workspace
    prior_failures: frozenset[str] = frozenset()  # attempt keys already failing before
    trigger: Trigger = Trigger.MANUAL  # what brought this workspace into the pass

    @classmethod
    def unacted(cls, seen: Observed, plan: WorkspacePlan, *, trigger: Trigger,
                error: str | None = None) -> WorkspaceResult:
        """A workspace planned but not acted on: nothing to do, a dry run, or (with
        `error`) it could not be."""
        return cls(workspace_id=seen.workspace_id, plans=(plan,),
                   restart_pending=seen.restart_pending, error=error,
                   prior_failures=frozenset(seen.attempts), trigger=trigger)

    def trigger_of(self, action: Action) -> Trigger:
        """What started this action: a retry if it was failing before, else the workspace's."""
        return Trigger.RETRY if action.key in self.prior_failures else self.trigger

    @property
    def waits(self) -> tuple[Wait, ...]:
        return self.plans[-1].waits if self.plans else ()

    @property
    def failures(self) -> tuple[Outcome, ...]:
        return tuple(o for o in self.outcomes if not o.ok)

    @property
    def planned(self) -> tuple[str, ...]:
        return tuple(a.describe() for p in self.plans for a in p.actions)

    @property
    def in_sync(self) -> bool:
        return (self.error is None and not self.failures and not self.waits
                and not self.restart_pending)


@dataclass(frozen=True, kw_only=True)
class PassReport:
    started_at: datetime
    finished_at: datetime
    dry_run: bool
    results: tuple[WorkspaceResult, ...]
    invalid: tuple[DesiredWorkspace, ...] = ()  # online, but desired state is unusable
    skipped: dict[Phase, int] = field(default_factory=dict)  # online but suspended/unmanaged
    busy: int = 0  # still being handled by an earlier pass (a slow runtime): left to it
    scope: frozenset[str] | None = None  # the workspaces this pass was about; None: all
    synced: int = 0  # recognised in sync from their digests alone: not even planned
    guard: planner.Held | None = None  # the blast-radius guard held this pass: why
    guarded: int = 0  # workspaces with actions the guard held (not in results)
    manifest_errors: tuple[ObjectError, ...] = ()
    # each template with spec.rollout or a rollout in flight, as this pass left it
    rollouts: tuple[Summary, ...] = ()
    # the workspaces a rollout holds to their template's stable revision: what they are
    # asked for instead of what the desired state given to the pass says
    held_back: Mapping[str, DesiredWorkspace] = field(default_factory=dict)
    # the workspaces whose results went out before the pass ended, in early reports
    # (`early`): what those said is not to be said twice
    streamed: frozenset[str] = frozenset()

    @classmethod
    def early(cls, results: tuple[WorkspaceResult, ...], *, started_at: datetime,
              held_back: Mapping[str, DesiredWorkspace]) -> PassReport:
        """A pass still acting, about the workspaces it has just finished acting on (its
        scope): for a mirror that need not wait for the slowest runtime of the pass."""
        return cls(started_at=started_at, finished_at=utcnow(), dry_run=False,
                   results=results, scope=frozenset(r.workspace_id for r in results),
                   held_back=held_back)

    @property
    def unsaid(self) -> tuple[WorkspaceResult, ...]:
        """The results no early report carried."""
        if not self.streamed:
            return self.results
        return tuple(r for r in self.results if r.workspace_id not in self.streamed)

    @property
    def online(self) -> int:
        return len(self.results) + self.synced + self.busy + self.guarded

    def count(self, kind: ActionKind, ok: bool = True) -> int:
        if self.dry_run:
            return sum(1 for r in self.results for p in r.plans for a in p.actions
                       if a.kind is kind) if ok else 0
        return sum(1 for r in self.results for o in r.outcomes
                   if o.action.kind is kind and o.ok is ok)

    @property
    def drifted(self) -> int:
        """Online, managed workspaces not as declared after this pass — what a user means by
        "not converged": failing, backing off, refused, awaiting a restart, held by the
        blast-radius guard (not in `results`), or invalid. In a dry run: needing anything."""
        return sum(1 for r in self.results if not self._converged(r)) + self.guarded \
            + len(self.invalid)

    @property
    def stalled(self) -> int:
        """The drifted workspaces this pass moved no step closer (nothing it did succeeded):
        held by the guard, backing off, refused, failing again, or invalid."""
        return sum(1 for r in self.results
                   if not self._converged(r) and not any(o.ok for o in r.outcomes)) \
            + self.guarded + len(self.invalid)

    def _converged(self, result: WorkspaceResult) -> bool:
        if self.dry_run:
            return result.in_sync and all(p.in_sync for p in result.plans)
        return result.in_sync

    @property
    def failed(self) -> int:
        return sum(len(r.failures) + (r.error is not None) for r in self.results)

    @property
    def waiting(self) -> int:
        return sum(len(r.waits) for r in self.results)

    @property
    def held(self) -> int:
        return sum(1 for r in self.results if r.restart_pending)

    def summary(self) -> str:
        verb = "would " if self.dry_run else ""
        parts = [
            f"{self.online} online",
            f"{verb}install {self.count(ActionKind.INSTALL)}",
            f"{verb}remove {self.count(ActionKind.REMOVE)}",
            f"{verb}restart {self.count(ActionKind.RESTART)}",
            f"observe {self.count(ActionKind.OBSERVE)}" if self.dry_run
            else f"failed {self.failed}",
            f"backing off {self.waiting}",
            f"held {self.held}",
            f"invalid {len(self.invalid)}",
        ]
        state = "in sync" if self.in_sync else ("drift found" if self.dry_run else "out of sync")
        if self.guard is not None:
            state += (f"; the blast-radius guard {'would hold' if self.dry_run else 'held'} "
                      f"this pass: it {self.guard} (`pluginctl plan` shows what it would do; "
                      "--force to act anyway)")
        return ", ".join(parts) + f" -> {state}"

    @property
    def in_sync(self) -> bool:
        """Every online, managed workspace is as declared (for a dry run: needs nothing)."""
        if self.invalid or self.guard is not None:
            return False
        if self.dry_run:
            return all(p.in_sync for r in self.results for p in r.plans)
        return all(r.in_sync for r in self.results)


class Refusals:
    """The refusals (a declared plugin the policy will not install: an unpinned source) a
    process has logged, so that each is logged once, at warning, when it appears or its
    reason changes — not every pass, as it stands until the declaration or policy changes.
    Fed every pass report, like the metrics."""

    def __init__(self) -> None:
        self._logged: dict[tuple[str, str], str] = {}  # (workspace, plugin) -> reason

    def observe(self, report: PassReport) -> None:
        if report.dry_run:
            return
        current = {(r.workspace_id, w.key): w.reason
                   for r in report.results for w in r.waits if w.kind is WaitKind.REFUSED}
        for (workspace_id, plugin), reason in sorted(current.items()):
            if self._logged.get((workspace_id, plugin)) != reason:
                log.warning("%s: install %s refused: %s", workspace_id, plugin, reason,
                            extra={"workspace": workspace_id, "plugin": plugin,
                                   "action": "install", "result": "refused"})
        # What this pass looked at and found no longer refused is forgotten (logged again if
        # it comes back); a full pass that acted looked at every workspace.
        looked = {r.workspace_id for r in report.results}
        everything = report.scope is None and report.guard is None
        self._logged = {key: reason for key, reason in self._logged.items()
                        if not everything and key[0] not in looked} | current
