"""The reconciler: one pass over every online workspace (read state, plan, execute, record),
and the periodic loop that runs passes. The standalone process, the one-shot CLI and the
operator all run this same pass; only where desired state comes from differs."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import logging
import os
import random
import socket
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from controller.domain import outcomes, planner
from controller.domain.desired import Desired, DesiredStateError, ObjectError
from controller.domain.models import (
    Action,
    ActionKind,
    DesiredWorkspace,
    Observed,
    Outcome,
    Phase,
    Policy,
    Wait,
    WorkspacePlan,
    desired_changed,
    sync_digest,
    utcnow,
)
from controller.domain.outcomes import Changes
from controller.runtime import executor
from controller.runtime.driver import RuntimeDriver
from controller.store import DatabaseError, Session, Sessions, in_thread, queries, transaction

log = logging.getLogger("pluginctl.reconciler")

Progress = Callable[[int, int], None]


class Trigger(enum.StrEnum):
    """What started a pass, or an action within one (in logs, metrics and Events)."""

    PERIODIC = "periodic"  # the full pass every interval
    HINT = "hint"  # a pass over hinted workspaces only
    HINT_STORM = "hint-storm"  # too many hints at once: a full pass instead
    MANUAL = "manual"  # a person asked: `reconcile --once`, `apply`, a requestedAt annotation
    REGISTRY = "registry"  # a register, or a heartbeat whose report changed
    TEMPLATE_CHANGE = "template-change"  # the desired state changed (template or Workspace)
    RETRY = "retry"  # the action failed before: its backoff came due


#: A hinted workspace keeps the weightiest reason it was hinted for.
_HINT_RANK = {Trigger.REGISTRY: 0, Trigger.TEMPLATE_CHANGE: 1, Trigger.MANUAL: 2}


@dataclass(frozen=True, slots=True)
class WorkspaceResult:
    workspace_id: str
    plans: tuple[WorkspacePlan, ...]
    outcomes: tuple[Outcome, ...]
    restart_pending: bool
    error: str | None = None  # the pass could not finish this workspace
    prior_failures: frozenset[str] = frozenset()  # attempt keys already failing before
    trigger: str = Trigger.MANUAL  # what brought this workspace into the pass

    def trigger_of(self, action: Action) -> str:
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


@dataclass(frozen=True)
class PassReport:
    started_at: datetime
    finished_at: datetime
    dry_run: bool
    results: tuple[WorkspaceResult, ...]
    invalid: tuple[DesiredWorkspace, ...]  # online workspaces whose desired state is unusable
    skipped: dict[Phase, int] = field(default_factory=dict)  # online but suspended/unmanaged
    busy: int = 0  # still being handled by an earlier pass (a slow runtime): left to it
    scope: frozenset[str] | None = None  # the workspaces this pass was about; None: all
    synced: int = 0  # recognised in sync from their digests alone: not even planned
    guard: planner.Held | None = None  # the blast-radius guard held this pass: why
    guarded: int = 0  # workspaces with actions the guard held (not in results)

    @property
    def online(self) -> int:
        return len(self.results) + self.synced + self.busy + self.guarded
    manifest_errors: tuple[ObjectError, ...] = ()

    def count(self, kind: ActionKind, ok: bool = True) -> int:
        if self.dry_run:
            return sum(1 for r in self.results for p in r.plans for a in p.actions
                       if a.kind is kind) if ok else 0
        return sum(1 for r in self.results for o in r.outcomes
                   if o.action.kind is kind and o.ok is ok)

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


CHUNK = 2000  # workspaces loaded and planned at a time: bounds memory, lets the loop breathe
CLAIM_MARGIN = 5.0  # seconds before its claim runs out that a replica stops acting
DEFAULT_REPLICA = f"{socket.gethostname()}-{os.getpid()}"


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def claim_seconds(policy: Policy) -> float:
    """How long a claim holds: a claimed workspace waits at most one round of the others
    (workspace_timeout), then gets workspace_timeout itself."""
    return 2 * policy.workspace_timeout + 2 * CLAIM_MARGIN


async def reconcile_once(
    desired: Desired,
    sessions: Sessions,
    driver: RuntimeDriver,
    policy: Policy,
    *,
    only: Collection[str] | None = None,
    dry_run: bool = False,
    progress: Progress | None = None,
    rand: Callable[[], float] = random.random,
    busy: set[str] | None = None,
    limit: asyncio.Semaphore | None = None,
    replica: str = DEFAULT_REPLICA,
    planned: asyncio.Event | None = None,
    hinted: Mapping[str, str] | None = None,
    force: bool = False,
    hold: planner.Held | None = None,
) -> PassReport:
    """One level-triggered pass: for every online workspace, desired vs observed -> actions.
    Nothing here asks how a workspace got online.

    1. One light query lists the online workspaces with two digests; those found in sync
       before, whose desired state and report have not changed since, are done.
    2. The rest are loaded and planned CHUNK at a time; those with nothing to do are done.
    3. Those with actions are claimed for this `replica` a batch at a time (so that several
       replicas sharing the database never act on one workspace at once), re-read, planned
       again and acted on, at most `limit` at once.

    Passes may overlap (the loop never waits for a slow runtime before starting the next
    pass): `busy` holds the workspaces some pass of this process is handling, which others
    then skip. `planned` is set once reading and planning are over. `hinted` says why
    workspaces were hinted (a Trigger); with the pass's TRIGGER it attributes actions.

    Before acting, the blast-radius guard (planner.blast_radius) weighs what the pass would
    do; if it is too much the pass holds (acts on nothing and says why) unless `force`.
    `hold` is a guard an earlier full pass tripped: a small pass with actions holds too
    while it stands, so that a held mass change does not trickle out one hint at a time."""
    busy = set() if busy is None else busy
    now = utcnow()
    limit = limit or asyncio.Semaphore(max(1, policy.concurrency))
    digests = await in_thread(sessions, partial(
        queries.online_digests, now=now, offline_after=policy.offline_after, only=only))

    todo: list[str] = []
    triggers: dict[str, str] = {}
    pass_trigger = TRIGGER.get()
    hinted = hinted or {}
    invalid: list[DesiredWorkspace] = []
    skipped: dict[Phase, int] = {}
    busy_count = synced = declared = 0
    wanted_of = desired.workspaces.get
    for workspace_id, (report_digest, marker) in digests.items():
        wanted = wanted_of(workspace_id)
        # The common case first, and cheaply: found in sync before, nothing changed since.
        if (marker is not None and wanted is not None and report_digest is not None
                and wanted.error is None and not wanted.suspended
                and marker == sync_digest(wanted.digest, report_digest)
                and workspace_id not in busy):
            synced += 1
            declared += len(wanted.plugins)
        elif wanted is None:
            skipped[Phase.UNMANAGED] = skipped.get(Phase.UNMANAGED, 0) + 1
        elif wanted.error is not None:
            invalid.append(wanted)
        elif wanted.suspended:
            skipped[Phase.SUSPENDED] = skipped.get(Phase.SUSPENDED, 0) + 1
        elif workspace_id in busy:
            busy_count += 1
        else:
            todo.append(workspace_id)
            declared += len(wanted.plugins)
            triggers[workspace_id] = _trigger(pass_trigger, hinted.get(workspace_id),
                                              marker, wanted)
    todo.sort()
    invalid.sort(key=lambda w: w.workspace_id)
    done = synced

    def advance(count: int = 1) -> None:
        nonlocal done
        done += count
        if progress is not None:
            progress(done, len(todo) + synced)

    if synced:
        advance(0)
    results: list[WorkspaceResult] = []
    active: list[str] = []
    guard: planner.Held | None = None
    guarded = 0
    # Reserved for this pass until planned (and, with actions, until acted on): a pass that
    # starts meanwhile leaves them alone instead of planning them a second time.
    reserved = set(todo)
    busy |= reserved
    try:
        results, active, weight = await _plan_all(todo, desired, sessions, policy, now,
                                                  digests, dry_run, busy, reserved, advance,
                                                  triggers)
        guard = planner.blast_radius(weight.removals, declared, weight.workspaces, policy)
        if guard is None and hold is not None and weight.workspaces:
            guard = hold
        if guard is not None:
            if force:
                log.warning("blast-radius guard: the pass %s; forced, acting anyway", guard)
                guard = None
            elif not dry_run:
                log.error("blast-radius guard: the pass %s; holding: nothing is done until "
                          "the change is fixed or forced (pluginctl reconcile --once --force)",
                          guard)
                guarded, active = len(active), []
        if planned is not None:
            planned.set()  # what is left is acting: waiting on runtimes
        if active:
            acted, elsewhere = await _act(active, desired, sessions, driver, policy, now, rand,
                                          busy, reserved, limit, replica, advance, triggers)
            results += acted
            busy_count += elsewhere
    finally:
        busy.difference_update(reserved)
    results.sort(key=lambda result: result.workspace_id)
    return PassReport(
        started_at=now,
        finished_at=utcnow(),
        dry_run=dry_run,
        results=tuple(results),
        invalid=tuple(invalid),
        skipped=skipped,
        busy=busy_count,
        synced=synced,
        guard=guard,
        guarded=guarded,
        manifest_errors=desired.errors,
        scope=None if only is None else frozenset(only),
    )


def _trigger(pass_trigger: str, hint: str | None, marker: str | None,
             wanted: DesiredWorkspace) -> str:
    """Why a workspace is in this pass: the reason it was hinted for; else a person's request;
    else a change of its desired state since it was last in sync; else the pass's trigger."""
    if hint is not None:
        return hint
    if pass_trigger != Trigger.MANUAL and marker is not None \
            and desired_changed(marker, wanted.digest):
        return Trigger.TEMPLATE_CHANGE
    return pass_trigger


async def _plan_all(
    todo: list[str],
    desired: Desired,
    sessions: Sessions,
    policy: Policy,
    now: datetime,
    digests: dict[str, tuple[str | None, str | None]],
    dry_run: bool,
    busy: set[str],
    reserved: set[str],
    advance: Callable[[int], None],
    triggers: Mapping[str, str],
) -> tuple[list[WorkspaceResult], list[str], Weight]:
    """Load and plan CHUNK workspaces at a time; returns the results of those with nothing
    to do (all of them in a dry run), the ids of those with actions, and the weight of those
    actions for the blast-radius guard."""
    results: list[WorkspaceResult] = []
    active: list[str] = []
    weight = Weight()
    active_set: set[str] = set()
    for chunk in _chunks(todo, CHUNK):
        observed = await in_thread(sessions, partial(
            queries.load_observed, now=now, offline_after=policy.offline_after,
            restart_window=policy.restart_window, only=chunk))
        markers: dict[str, str] = {}
        planned_quiet = 0
        for workspace_id in chunk:
            seen = observed.get(workspace_id)
            if seen is None:  # went offline in between
                planned_quiet += 1
                continue
            wanted = desired.workspaces[workspace_id]
            plan = planner.plan(wanted, seen, now, policy)
            weight.add(plan)
            if plan.actions and not dry_run:
                active.append(workspace_id)
                active_set.add(workspace_id)
                continue
            planned_quiet += 1
            results.append(_quiet(seen, plan, triggers[workspace_id]))
            report_digest, marker = digests[workspace_id]
            if plan.in_sync and not seen.attempts and report_digest is not None:
                new_marker = sync_digest(wanted.digest, report_digest)
                if new_marker != marker:
                    markers[workspace_id] = new_marker
        if markers and not dry_run:
            try:
                await in_thread(sessions, partial(queries.mark_synced, markers=markers))
            except DatabaseError as error:  # only an optimisation: the next pass plans again
                log.warning("could not remember %d in-sync workspaces: %s", len(markers), error)
        quiet = [w for w in chunk if w not in active_set]
        busy.difference_update(quiet)
        reserved.difference_update(quiet)
        advance(planned_quiet)
    return results, active, weight


@dataclass
class Weight:
    """How much a pass would do, for the blast-radius guard."""

    removals: int = 0  # plugins it would remove
    workspaces: int = 0  # workspaces it would act on (runtime calls or restarts)

    def add(self, plan: WorkspacePlan) -> None:
        calls = [a for a in plan.actions if a.kind is not ActionKind.DISOWN]
        self.removals += sum(1 for a in calls if a.kind is ActionKind.REMOVE)
        self.workspaces += bool(calls)


class Recorder:
    """Records what workspaces' passes did (and gives back their claims), grouping the
    records that are ready together into one transaction: a burst of finishing workspaces
    costs one commit, not one each. If a group fails, its records are retried one by one,
    so that one bad record never fails the others."""

    def __init__(self, sessions: Sessions, replica: str) -> None:
        self.sessions = sessions
        self.replica = replica
        self._queue: list[tuple[Changes, datetime, asyncio.Future[None]]] = []
        self._draining: asyncio.Task[None] | None = None

    async def record(self, changes: Changes, now: datetime) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((changes, now, done))
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain())
        await done

    def _write(self, session: Session, group: list[tuple[Changes, datetime, Any]]) -> None:
        queries.apply_many(session, [(changes, now) for changes, now, _ in group])
        queries.release(session, [changes.workspace_id for changes, _, _ in group],
                        self.replica)

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue, []
                try:
                    await in_thread(self.sessions, partial(self._write, group=group))
                    failures: list[DatabaseError | None] = [None] * len(group)
                except DatabaseError as error:
                    failures = [error] * len(group)
                    if len(group) > 1:
                        for index, item in enumerate(group):
                            try:
                                await in_thread(self.sessions, partial(self._write, group=[item]))
                                failures[index] = None
                            except DatabaseError as single:
                                failures[index] = single
                for (_, _, done), failure in zip(group, failures, strict=True):
                    if done.done():
                        continue
                    if failure is None:
                        done.set_result(None)
                    else:
                        done.set_exception(failure)
        finally:
            self._draining = None


def _quiet(seen: Observed, plan: WorkspacePlan, trigger: str) -> WorkspaceResult:
    return WorkspaceResult(seen.workspace_id, (plan,), (), seen.restart_pending,
                           prior_failures=frozenset(seen.attempts), trigger=trigger)


async def _act(
    ids: list[str],
    desired: Desired,
    sessions: Sessions,
    driver: RuntimeDriver,
    policy: Policy,
    now: datetime,
    rand: Callable[[], float],
    busy: set[str],
    reserved: set[str],
    limit: asyncio.Semaphore,
    replica: str,
    advance: Callable[[int], None],
    triggers: Mapping[str, str],
) -> tuple[list[WorkspaceResult], int]:
    """Claim, re-read, re-plan and act on workspaces a batch at a time, never claiming more
    than one batch ahead of the work. Returns the results, and how many workspaces another
    replica held."""
    batch_size = max(1, policy.concurrency)
    hold = timedelta(seconds=claim_seconds(policy))
    results: list[WorkspaceResult] = []
    elsewhere = 0
    running: set[asyncio.Task[WorkspaceResult]] = set()
    pending = set(ids)  # claimed by this pass and not finished: released if cut off
    busy |= pending
    recorder = Recorder(sessions, replica)

    def finished(tasks: Collection[asyncio.Task[WorkspaceResult]]) -> None:
        for task in tasks:
            result = task.result()
            results.append(result)
            pending.discard(result.workspace_id)
            busy.discard(result.workspace_id)
            reserved.discard(result.workspace_id)
            advance(1)

    async def one(wanted: DesiredWorkspace, seen: Observed, plan: WorkspacePlan,
                  until: datetime) -> WorkspaceResult:
        async with limit:
            left = (until - utcnow()).total_seconds() - CLAIM_MARGIN
            if left < policy.call_timeout:  # its turn came too late: the next pass has it
                await in_thread(sessions, partial(
                    queries.release, workspace_ids=[seen.workspace_id], replica=replica))
                return WorkspaceResult(seen.workspace_id, (plan,), (), seen.restart_pending,
                                       "not acted on: its claim ran out while it waited",
                                       frozenset(seen.attempts), triggers[seen.workspace_id])
            return await execute_workspace(wanted, seen, plan, driver, policy, now, rand,
                                            recorder, min(policy.workspace_timeout, left),
                                            triggers[seen.workspace_id])

    try:
        for batch in _chunks(ids, batch_size):
            while len(running) >= batch_size:
                complete, running = await asyncio.wait(
                    running, return_when=asyncio.FIRST_COMPLETED)
                finished(complete)
            until = utcnow() + hold

            def claim_and_load(session: Session, batch: list[str] = batch, until: datetime = until
                               ) -> tuple[set[str], dict[str, Observed]]:
                claimed = queries.claim(session, batch, replica, utcnow(), until)
                return claimed, queries.load_observed(
                    session, now=now, offline_after=policy.offline_after,
                    restart_window=policy.restart_window, only=sorted(claimed))

            claimed, observed = await in_thread(sessions, claim_and_load)
            nothing_to_do = []
            for workspace_id in batch:
                seen = observed.get(workspace_id)
                plan = None if seen is None else planner.plan(
                    desired.workspaces[workspace_id], seen, now, policy)
                if seen is None or plan is None or not plan.actions:
                    if workspace_id not in claimed:
                        elsewhere += 1
                    elif seen is not None and plan is not None:
                        # another replica was quicker
                        results.append(_quiet(seen, plan, triggers[workspace_id]))
                    nothing_to_do.append(workspace_id)
                    pending.discard(workspace_id)
                    busy.discard(workspace_id)
                    reserved.discard(workspace_id)
                    advance(1)
                    continue
                running.add(asyncio.create_task(
                    one(desired.workspaces[workspace_id], seen, plan, until)))
            claimed_idle = [w for w in nothing_to_do if w in claimed]
            if claimed_idle:
                await in_thread(sessions, partial(
                    queries.release, workspace_ids=claimed_idle, replica=replica))
        while running:
            complete, running = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            finished(complete)
    finally:
        busy.difference_update(pending)
        reserved.difference_update(pending)
        for task in running:
            task.cancel()
        if pending:  # cut off (shutdown, or the store failed): give back what is left
            with contextlib.suppress(DatabaseError), transaction(sessions) as session:
                queries.release(session, pending, replica)
    return results, elsewhere


async def execute_workspace(
    wanted: DesiredWorkspace | None,
    seen: Observed,
    plan: WorkspacePlan,
    driver: RuntimeDriver,
    policy: Policy,
    now: datetime,
    rand: Callable[[], float],
    recorder: Recorder,
    deadline: float,
    trigger: str,
) -> WorkspaceResult:
    """Perform one workspace's plan within `deadline` seconds, record what came of it and
    log each outcome. With `wanted`, a plan that had to observe first is planned again
    from the fresh report and that is performed too; without, exactly `plan` (`apply`)."""
    prior = frozenset(seen.attempts)
    url = seen.url or ""
    plans = [plan]
    done: list[Outcome] = []
    error: str | None = None
    try:
        async with asyncio.timeout(deadline):
            await executor.execute(driver, url, plan, done)
            observed_now = [o for o in done if o.action.kind is ActionKind.OBSERVE and o.ok]
            if observed_now and wanted is not None:
                # Now that we know what the runtime has, plan again with that knowledge.
                report = {p.name: p for p in observed_now[-1].report or ()}
                plan = planner.plan(wanted, replace(seen, report=report), now, policy)
                plans.append(plan)
                await executor.execute(driver, url, plan, done)
    except TimeoutError:
        error = f"workspace pass exceeded {deadline:g}s; the rest waits"
    except Exception as exc:  # a bug must not stop the other workspaces' turns
        log.exception("unexpected error while acting on %s", seen.workspace_id)
        error = f"unexpected error: {type(exc).__name__}: {exc}"

    changes = outcomes.changes_from(seen, done, now, policy, rand)
    try:
        await recorder.record(changes, now)
    except DatabaseError as exc:
        # The calls happened but are not recorded: the next pass sees the runtime's report
        # and repeats at most an idempotent install.
        log.error("could not record outcomes of %s: %s", seen.workspace_id, exc)
        error = f"could not record outcomes: {exc}"
    pending = seen.restart_pending if changes.restart_pending is None else changes.restart_pending
    result = WorkspaceResult(seen.workspace_id, tuple(plans), tuple(done), pending, error,
                             prior_failures=prior, trigger=trigger)
    for outcome in done:
        _log_outcome(seen.workspace_id, outcome, result.trigger_of(outcome.action))
    return result


#: What started the pass running in this task: periodic, hint, hint-storm, or manual
#: (`reconcile --once`, `apply`). Set by the loop for each pass it starts.
TRIGGER: contextvars.ContextVar[str] = contextvars.ContextVar("trigger", default=Trigger.MANUAL)


def _log_outcome(workspace_id: str, outcome: Outcome, trigger: str) -> None:
    action = outcome.action
    extra = {"workspace": workspace_id, "action": action.kind.value,
             "plugin": action.plugin.name if action.plugin else None, "trigger": trigger,
             "result": "ok" if outcome.ok else "failed"}
    if outcome.ok:
        log.info("%s: %s ok [%s]", workspace_id, action.describe(), trigger, extra=extra)
    else:
        log.warning("%s: %s failed [%s]: %s", workspace_id, action.describe(), trigger,
                    outcome.message, extra=extra)


class Hints:
    """Workspaces the registry asked the loop to look at sooner. Correctness never depends
    on them: the periodic full pass covers every workspace anyway."""

    def __init__(self) -> None:
        self._ids: dict[str, Trigger] = {}
        self.event = asyncio.Event()

    def __call__(self, workspace_id: str, reason: Trigger = Trigger.REGISTRY) -> None:
        known = self._ids.get(workspace_id)
        if known is None or _HINT_RANK[reason] > _HINT_RANK[known]:
            self._ids[workspace_id] = reason
        self.event.set()

    def take(self) -> dict[str, Trigger]:
        """The hinted workspaces, each with the reason it was hinted for."""
        ids, self._ids = self._ids, {}
        self.event.clear()
        return ids


DesiredSource = Callable[[], Desired]
MAX_HINTED = 1000  # more hinted workspaces than this at once: run a full pass instead
HINT_GATHER = 0.05  # seconds a hint waits for others before its pass starts
PassCallback = Callable[[PassReport, str], None]  # (report, trigger)
FailureCallback = Callable[[str], None]  # (trigger) of a pass that could not run


async def run_forever(
    source: DesiredSource,
    sessions: Sessions,
    driver: RuntimeDriver,
    policy: Policy,
    *,
    interval: float,
    stop: asyncio.Event | tuple[asyncio.Event, ...],
    hints: Hints | None = None,
    jitter: float = 0.1,
    on_pass: PassCallback | None = None,
    rand: Callable[[], float] = random.random,
    replica: str = DEFAULT_REPLICA,
    on_failure: FailureCallback | None = None,
) -> None:
    """Full passes every `interval` seconds (plus or minus `jitter` of it, so that replicas
    and restarts never line up), and small passes for hinted workspaces in between. A pass
    is started on time even if an earlier one still waits on a slow runtime: that runtime's
    workspace is busy and skipped, every other workspace is served. It returns once any
    of the `stop` events is set."""
    stops = stop if isinstance(stop, tuple) else (stop,)
    loop = asyncio.get_running_loop()
    hints = hints or Hints()
    busy: set[str] = set()
    limit = asyncio.Semaphore(max(1, policy.concurrency))
    running: set[asyncio.Task[None]] = set()
    last_errors: list[tuple[ObjectError, ...]] = [()]
    holding: list[planner.Held | None] = [None]  # what held the last full pass, if anything

    full_planned = asyncio.Event()  # the last full pass is done planning (acting is fine)
    full_planned.set()

    async def one_pass(only: set[str] | None, trigger: str, planned: asyncio.Event | None,
                       hinted: Mapping[str, str]) -> None:
        try:
            await _one_pass(only, trigger, planned, hinted)
        finally:
            if planned is not None:
                planned.set()

    async def _one_pass(only: set[str] | None, trigger: str,
                        planned: asyncio.Event | None, hinted: Mapping[str, str]) -> None:
        TRIGGER.set(trigger)  # this pass runs in a task of its own: its context only
        try:
            desired = source()
        except (DesiredStateError, OSError) as error:
            log.error("cannot read desired state, skipping this pass: %s", error)
            if on_failure is not None:
                on_failure(trigger)
            return
        if desired.errors != last_errors[0]:
            for object_error in desired.errors:
                log.error("desired state: %s", object_error)
            last_errors[0] = desired.errors
        try:
            report = await reconcile_once(desired, sessions, driver, policy, only=only,
                                          rand=rand, busy=busy, limit=limit, replica=replica,
                                          planned=planned, hinted=hinted,
                                          dry_run=policy.dry_run,
                                          hold=holding[0] if only is not None else None)
        except DatabaseError as error:
            log.error("pass failed, will retry: %s", error)
            if on_failure is not None:
                on_failure(trigger)
            return
        if only is None:
            holding[0] = report.guard
        if on_pass is not None:
            on_pass(report, trigger)

    next_full = loop.time()
    try:
        while not any(s.is_set() for s in stops):
            await _wait_any((hints.event, *stops), max(0.0, next_full - loop.time()))
            if any(s.is_set() for s in stops):
                break
            planned: asyncio.Event | None = None
            if loop.time() >= next_full:
                next_full = loop.time() + interval * (1 + jitter * (2 * rand() - 1))
                if not full_planned.is_set():
                    # The last full pass is still reading and planning (a cold start over a
                    # big fleet): another would only compete with it. Its acting may overlap.
                    log.debug("full pass skipped: the last one is still planning")
                    continue
                hinted = hints.take()
                only: set[str] | None = None
                trigger = Trigger.PERIODIC
                planned = full_planned = asyncio.Event()
            else:
                # Hints come in bursts (a fleet reconnecting, a deploy): gather them briefly,
                # so that one pass serves the burst instead of one pass per hint.
                await _wait_any(stops, HINT_GATHER)
                hinted = hints.take()
                only, trigger = set(hinted), Trigger.HINT
                if len(only) > MAX_HINTED:  # a reconnect storm: one full pass is cheaper
                    only, trigger = None, Trigger.HINT_STORM
            task = asyncio.create_task(one_pass(only, trigger, planned, hinted))
            running.add(task)
            task.add_done_callback(running.discard)
            await asyncio.sleep(0)  # let the pass claim its workspaces before the next one
    finally:
        if running:
            # Give passes in flight a call's time to finish, then cut them off; whatever
            # they did not record is re-observed by the next start.
            _, pending = await asyncio.wait(running, timeout=policy.call_timeout)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


async def _wait_any(events: tuple[asyncio.Event, ...], timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
