"""One pass, the reconciler's unit of work: for every online workspace (or those a request
names), desired vs observed -> actions. It triages from two digests, loads and plans the
rest, weighs the plans against the blast-radius guard, and hands those with actions to
`act`. The standalone loop, the one-shot CLI and the operator all run this same pass."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial

from controller.domain import planner
from controller.domain.desired import Desired
from controller.domain.models import (
    ActionKind,
    DesiredWorkspace,
    Observed,
    Phase,
    Policy,
    WorkspacePlan,
    desired_changed,
    sync_digest,
    utcnow,
)
from controller.engine import rollouts
from controller.engine.act import Acting, chunks
from controller.engine.context import DEFAULT_REPLICA, Acted, PassContext, Progress, Tally
from controller.engine.queue import Request, Reservation, Trigger, WorkQueue
from controller.engine.report import PassReport, WorkspaceResult
from controller.runtime.driver import RuntimeDriver
from controller.store import DatabaseError, Sessions, in_thread, queries

log = logging.getLogger("pluginctl.reconciler")

CHUNK = 2000  # workspaces loaded and planned at a time: bounds memory, lets the loop breathe

Digests = Mapping[str, tuple[str | None, str | None]]  # workspace -> (report, sync marker)
EVERYTHING = Request()  # a person's pass over every online workspace (`reconcile --once`)


async def reconcile_once(
    desired: Desired,
    sessions: Sessions,
    driver: RuntimeDriver,
    policy: Policy,
    *,
    request: Request = EVERYTHING,
    dry_run: bool = False,
    force: bool = False,
    replica: str = DEFAULT_REPLICA,
    rand: Callable[[], float] = random.random,
    progress: Progress | None = None,
    queue: WorkQueue | None = None,
    planned: asyncio.Event | None = None,
    early: Callable[[PassReport], None] | None = None,
) -> PassReport:
    """One level-triggered pass: for every online workspace, desired vs observed -> actions.
    Nothing here asks how a workspace got online.

    1. One light query lists the online workspaces with two digests; those found in sync
       before, whose desired state and report have not changed since, are done.
    2. The rest are loaded and planned CHUNK at a time; those with nothing to do are done.
    3. Those with actions are claimed for this `replica` a batch at a time (so that several
       replicas sharing the database never act on one workspace at once), re-read, planned
       again and acted on (act.Acting).

    `request` says which workspaces the pass is about and why (the trigger each action is
    attributed to). Passes may overlap (the loop never waits for a slow runtime before
    starting the next pass): those sharing a `queue` skip each other's workspaces and share
    its concurrency limit. `planned` is set once reading and planning are over. Before
    acting, the blast-radius guard weighs what the pass would do; if it is too much (or
    `request.hold` stands) the pass acts on nothing and says why, unless `force`.

    `early`, if given, hears about the workspaces acted on as they finish, in early reports
    (`PassReport.early`), long before the slowest runtime lets the pass end; the pass's own
    report then names them (`streamed`)."""
    queue = queue or WorkQueue()
    now = utcnow()
    streamed: set[str] = set()  # the workspaces `early` has heard about
    # Each workspace of a template rolling out asks for the revision its wave allows; a
    # full pass that acts also moves the rollouts on (rollouts.gate).
    gated = await rollouts.gate(desired, sessions, policy, now=now,
                                advance=not dry_run and request.only is None)
    desired, held = gated.desired, gated.held(desired)
    digests = await in_thread(sessions, partial(
        queries.online_digests, now=now, offline_after=policy.offline_after,
        only=request.only))
    # No await from here to the reservation: what triage finds free is still free then.
    triage = _triage(desired, digests, request=request, queue=queue)
    ctx = PassContext(
        desired=desired, sessions=sessions, driver=driver, policy=policy, now=now,
        limit=queue.limit(policy.concurrency), rand=rand, replica=replica, dry_run=dry_run,
        trigger=request.trigger, triggers=triage.triggers,
        tally=Tally(progress, total=len(triage.todo) + triage.synced, done=triage.synced),
        acted=None if early is None else streaming(early, streamed, started_at=now,
                                                   held_back=held))
    if triage.synced:
        ctx.tally.advance(0)
    guarded = 0
    with queue.reserve(triage.todo) as reservation:
        plans = await _plan_all(ctx, triage.todo, digests=digests, reservation=reservation)
        results, active = plans.results, plans.active
        guard = _guard(ctx, plans.weight, declared=triage.declared, hold=request.hold,
                       force=force)
        if guard is not None:
            guarded, active = len(active), []
        if planned is not None:
            planned.set()  # what is left is acting: waiting on runtimes
        if active:
            acting = Acting(ctx, reservation)
            results += await acting.run(active)
            triage.busy += acting.elsewhere
    results.sort(key=lambda result: result.workspace_id)
    return PassReport(
        started_at=now, finished_at=utcnow(), dry_run=dry_run, results=tuple(results),
        invalid=tuple(triage.invalid), skipped=triage.skipped, busy=triage.busy,
        synced=triage.synced, guard=guard, guarded=guarded, manifest_errors=desired.errors,
        scope=request.only, rollouts=rollouts.summaries(gated, now=now), held_back=held,
        streamed=frozenset(streamed))


def streaming(early: Callable[[PassReport], None], streamed: set[str], *,
              started_at: datetime, held_back: Mapping[str, DesiredWorkspace]) -> Acted:
    """What a pass tells `early` as workspaces finish; `streamed` collects their ids."""

    def acted(results: tuple[WorkspaceResult, ...]) -> None:
        streamed.update(r.workspace_id for r in results)
        early(PassReport.early(results, started_at=started_at, held_back=held_back))

    return acted


# --- triage: from two digests, before anything is loaded ----------------------------------------

@dataclass
class Triage:
    """Where each online workspace stands before anything is loaded."""

    todo: list[str] = field(default_factory=list)  # to load and plan
    triggers: dict[str, Trigger] = field(default_factory=dict)  # what brought each one in
    invalid: list[DesiredWorkspace] = field(default_factory=list)
    skipped: dict[Phase, int] = field(default_factory=dict)  # suspended or unmanaged
    busy: int = 0  # held by another pass of this process (then: or by another replica)
    synced: int = 0  # in sync before, and nothing changed since
    declared: int = 0  # plugins declared for the managed ones, for the guard


def _triage(desired: Desired, digests: Digests, *, request: Request, queue: WorkQueue
            ) -> Triage:
    triage = Triage()
    wanted_of = desired.workspaces.get
    for workspace_id, (report_digest, marker) in digests.items():
        wanted = wanted_of(workspace_id)
        # The common case first, and cheaply: found in sync before, nothing changed since.
        if (marker is not None and wanted is not None and report_digest is not None
                and wanted.error is None and not wanted.suspended
                and marker == sync_digest(wanted.digest, report_digest)
                and workspace_id not in queue):
            triage.synced += 1
            triage.declared += len(wanted.plugins)
        elif wanted is None:
            triage.skipped[Phase.UNMANAGED] = triage.skipped.get(Phase.UNMANAGED, 0) + 1
        elif wanted.error is not None:
            triage.invalid.append(wanted)
        elif wanted.suspended:
            triage.skipped[Phase.SUSPENDED] = triage.skipped.get(Phase.SUSPENDED, 0) + 1
        elif workspace_id in queue:
            triage.busy += 1
        else:
            triage.todo.append(workspace_id)
            triage.declared += len(wanted.plugins)
            triage.triggers[workspace_id] = _trigger(request, workspace_id, marker=marker,
                                                          wanted=wanted)
    triage.todo.sort()
    triage.invalid.sort(key=lambda w: w.workspace_id)
    return triage


def _trigger(request: Request, workspace_id: str, *, marker: str | None,
             wanted: DesiredWorkspace) -> Trigger:
    """Why a workspace is in this pass: the reason it was hinted for; else a person's request;
    else a change of its desired state since it was last in sync; else the pass's trigger."""
    hint = request.hinted.get(workspace_id)
    if hint is not None:
        return hint
    if request.trigger is not Trigger.MANUAL and marker is not None \
            and desired_changed(marker, wanted.digest):
        return Trigger.TEMPLATE_CHANGE
    return request.trigger


# --- planning: CHUNK workspaces at a time -------------------------------------------------------

@dataclass
class Weight:
    """How much a pass would do, for the blast-radius guard."""

    removals: int = 0  # plugins it would remove
    workspaces: int = 0  # workspaces it would act on (runtime calls or restarts)

    def add(self, plan: WorkspacePlan) -> None:
        calls = [a for a in plan.actions if a.kind is not ActionKind.DISOWN]
        self.removals += sum(1 for a in calls if a.kind is ActionKind.REMOVE)
        self.workspaces += bool(calls)


@dataclass
class Planned:
    """What planning found: results of those with nothing to do (all of them in a dry run),
    the ids of those with actions, and the weight of those actions."""

    results: list[WorkspaceResult] = field(default_factory=list)
    active: list[str] = field(default_factory=list)
    weight: Weight = field(default_factory=Weight)


async def _plan_all(ctx: PassContext, todo: Sequence[str], *, digests: Digests,
                    reservation: Reservation) -> Planned:
    """Load and plan CHUNK workspaces at a time; each with nothing to do leaves the
    reservation at once, and if found in sync is remembered so (its sync marker)."""
    planned = Planned()
    for chunk in chunks(todo, CHUNK):
        observed = await in_thread(ctx.sessions, partial(
            queries.load_observed, now=ctx.now, offline_after=ctx.policy.offline_after,
            restart_window=ctx.policy.restart_window, only=chunk))
        active_before = len(planned.active)
        markers = _plan_chunk(ctx, chunk, observed, digests=digests, into=planned)
        if markers and not ctx.dry_run:
            try:
                await in_thread(ctx.sessions, partial(queries.mark_synced, markers=markers))
            except DatabaseError as error:  # only an optimisation: the next pass plans again
                log.warning("could not remember %d in-sync workspaces: %s", len(markers), error)
        acting = set(planned.active[active_before:])
        quiet = [w for w in chunk if w not in acting]
        reservation.release(quiet)
        ctx.tally.advance(len(quiet))
    return planned


def _plan_chunk(ctx: PassContext, chunk: Sequence[str], observed: Mapping[str, Observed], *,
                digests: Digests, into: Planned) -> dict[str, str]:
    """Plan one chunk into `into`; returns the new sync markers of those found in sync."""
    markers: dict[str, str] = {}
    for workspace_id in chunk:
        seen = observed.get(workspace_id)
        if seen is None:  # went offline in between
            continue
        wanted = ctx.wanted(workspace_id)
        plan = planner.plan(wanted, seen, ctx.now, ctx.policy)
        into.weight.add(plan)
        if plan.actions and not ctx.dry_run:
            into.active.append(workspace_id)
            continue
        into.results.append(WorkspaceResult.unacted(
            seen, plan, trigger=ctx.trigger_of(workspace_id)))
        report_digest, marker = digests[workspace_id]
        if plan.in_sync and not seen.attempts and report_digest is not None:
            new_marker = sync_digest(wanted.digest, report_digest)
            if new_marker != marker:
                markers[workspace_id] = new_marker
    return markers


def _guard(ctx: PassContext, weight: Weight, *, declared: int, hold: planner.Held | None,
           force: bool) -> planner.Held | None:
    """The blast-radius guard's verdict on the pass (planner.blast_radius); a guard an earlier
    full pass tripped (`hold`) holds a pass with actions too. None: act."""
    guard = planner.blast_radius(weight.removals, declared, weight.workspaces, ctx.policy)
    if guard is None and hold is not None and weight.workspaces:
        guard = hold
    if guard is None:
        return None
    if force:
        log.warning("blast-radius guard: the pass %s; forced, acting anyway", guard)
        return None
    if not ctx.dry_run:
        log.error("blast-radius guard: the pass %s; holding: nothing is done until the change "
                  "is fixed or forced (pluginctl reconcile --once --force)", guard)
    return guard
