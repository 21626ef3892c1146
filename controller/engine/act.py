"""Acting, the second half of a pass: claim workspaces for this replica and read them again
in the same transaction, plan each once more, have the executor (runtime.executor) perform
the plan through the runtime driver, and record what came of it (giving the claim back).
The loop's passes and `pluginctl apply` both act through these steps."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from functools import partial
from typing import Any

from controller.domain import outcomes, planner
from controller.domain.models import (
    ActionKind,
    DesiredWorkspace,
    Observed,
    Outcome,
    Policy,
    WorkspacePlan,
    utcnow,
)
from controller.domain.outcomes import Changes
from controller.engine.context import PassContext
from controller.engine.queue import Reservation, Trigger
from controller.engine.report import WorkspaceResult
from controller.runtime import executor
from controller.store import DatabaseError, Session, Sessions, in_thread, queries

log = logging.getLogger("pluginctl.reconciler")

CLAIM_MARGIN = 5.0  # seconds before its claim runs out that a replica stops acting


def claim_seconds(policy: Policy) -> float:
    """How long a claim holds: a claimed workspace waits at most one round of the others
    (workspace_timeout), then gets workspace_timeout itself."""
    return 2 * policy.workspace_timeout + 2 * CLAIM_MARGIN


def chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


# --- claims -----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Claimed:
    """What the claim step found: the workspaces now held for this replica, and their
    observed state read in the same transaction (so no other replica acted in between)."""

    ids: frozenset[str]
    observed: Mapping[str, Observed]


def _claim_and_load(session: Session, *, ctx: PassContext, workspace_ids: Sequence[str],
                    until: datetime, read_all: bool) -> Claimed:
    claimed = set() if ctx.dry_run else queries.claim(
        session, workspace_ids, ctx.replica, now=utcnow(), until=until)
    observed = queries.load_observed(
        session, now=ctx.now, offline_after=ctx.policy.offline_after,
        restart_window=ctx.policy.restart_window,
        only=list(workspace_ids) if read_all else sorted(claimed))
    return Claimed(frozenset(claimed), observed)


async def claim(ctx: PassContext, workspace_ids: Sequence[str], *, until: datetime,
                read_all: bool = False) -> Claimed:
    """Claim these workspaces for this replica until `until` and read the claimed ones
    again; with `read_all`, read all of them (apply says why it cannot act on the others).
    A dry run claims nothing."""
    return await in_thread(ctx.sessions, partial(
        _claim_and_load, ctx=ctx, workspace_ids=workspace_ids, until=until, read_all=read_all))


async def release(ctx: PassContext, workspace_ids: Collection[str]) -> None:
    """Give these claims back, on a worker thread. Shielded: a pass being cancelled (a
    shutdown, a lost lease) still gives back what it held, even if cancelled once more while
    it waits, instead of leaving other replicas to wait for the claims to run out."""
    if not workspace_ids:
        return
    releasing = asyncio.ensure_future(in_thread(ctx.sessions, partial(
        queries.release, workspace_ids=sorted(workspace_ids), replica=ctx.replica)))
    releasing.add_done_callback(_settled)
    await asyncio.shield(releasing)


def _settled(task: asyncio.Future[None]) -> None:
    # Cut off while it ran, nobody awaits its outcome: a failure only means the claims run
    # out on their own, so mark it retrieved rather than warn at garbage collection.
    if not task.cancelled():
        task.exception()


# --- recording --------------------------------------------------------------------------------

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
        queries.apply_many(session, [(changes, now) for changes, now, _ in group],
                           release_for=self.replica)

    async def _drain(self) -> None:
        try:
            while self._queue:
                group, self._queue = self._queue, []
                failures = await self._write_group(group)
                for (_, _, done), failure in zip(group, failures, strict=True):
                    if done.done():
                        continue
                    if failure is None:
                        done.set_result(None)
                    else:
                        done.set_exception(failure)
        finally:
            self._draining = None

    async def _write_group(self, group: list[tuple[Changes, datetime, Any]]
                           ) -> list[DatabaseError | None]:
        try:
            await in_thread(self.sessions, partial(self._write, group=group))
            return [None] * len(group)
        except DatabaseError as error:
            failures: list[DatabaseError | None] = [error] * len(group)
        if len(group) > 1:
            for index, item in enumerate(group):
                try:
                    await in_thread(self.sessions, partial(self._write, group=[item]))
                    failures[index] = None
                except DatabaseError as single:
                    failures[index] = single
        return failures


# --- one workspace ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Performed:
    """What the runtime calls of one workspace's pass came to, before it is recorded."""

    plans: tuple[WorkspacePlan, ...]
    outcomes: tuple[Outcome, ...]
    error: str | None = None  # the calls could not all be made


async def perform_workspace(ctx: PassContext, seen: Observed, plan: WorkspacePlan, *,
                            wanted: DesiredWorkspace | None, deadline: float) -> Performed:
    """Perform one workspace's plan within `deadline` seconds. With `wanted`, a plan that had
    to observe first is planned again from the fresh report and that is performed too;
    without, exactly `plan` (`apply`). Only runtime calls: recording is `record_workspace`."""
    url = seen.url or ""
    plans = [plan]
    done: list[Outcome] = []
    error: str | None = None
    try:
        async with asyncio.timeout(deadline):
            await executor.execute(ctx.driver, url, plan, outcomes=done)
            observed_now = [o for o in done if o.action.kind is ActionKind.OBSERVE and o.ok]
            if observed_now and wanted is not None:
                # Now that we know what the runtime has, plan again with that knowledge.
                report = {p.name: p for p in observed_now[-1].report or ()}
                plan = planner.plan(wanted, replace(seen, report=report), ctx.now, ctx.policy)
                plans.append(plan)
                await executor.execute(ctx.driver, url, plan, outcomes=done)
    except TimeoutError:
        error = f"workspace pass exceeded {deadline:g}s; the rest waits"
    except Exception as exc:  # a bug must not stop the other workspaces' turns
        log.exception("unexpected error while acting on %s", seen.workspace_id)
        error = f"unexpected error: {type(exc).__name__}: {exc}"
    return Performed(tuple(plans), tuple(done), error)


async def record_workspace(ctx: PassContext, seen: Observed, performed: Performed, *,
                           recorder: Recorder) -> WorkspaceResult:
    """Record what came of one workspace's calls (giving its claim back) and log each
    outcome."""
    error = performed.error
    changes = outcomes.changes_from(seen, list(performed.outcomes), ctx.now, policy=ctx.policy,
                                    rand=ctx.rand)
    try:
        await recorder.record(changes, ctx.now)
    except DatabaseError as exc:
        # The calls happened but are not recorded: the next pass sees the runtime's report
        # and repeats at most an idempotent install.
        log.error("could not record outcomes of %s: %s", seen.workspace_id, exc)
        error = f"could not record outcomes: {exc}"
    pending = seen.restart_pending if changes.restart_pending is None else changes.restart_pending
    result = WorkspaceResult(
        workspace_id=seen.workspace_id, plans=performed.plans, outcomes=performed.outcomes,
        restart_pending=pending, error=error, prior_failures=frozenset(seen.attempts),
        trigger=ctx.trigger_of(seen.workspace_id))
    for outcome in performed.outcomes:
        _log_outcome(seen.workspace_id, outcome, result.trigger_of(outcome.action))
    return result


async def execute_workspace(
    ctx: PassContext,
    seen: Observed,
    plan: WorkspacePlan,
    *,
    wanted: DesiredWorkspace | None,
    recorder: Recorder,
    deadline: float,
) -> WorkspaceResult:
    """perform_workspace, then record_workspace."""
    performed = await perform_workspace(ctx, seen, plan, wanted=wanted, deadline=deadline)
    return await record_workspace(ctx, seen, performed, recorder=recorder)


def _log_outcome(workspace_id: str, outcome: Outcome, trigger: Trigger) -> None:
    action = outcome.action
    extra = {"workspace": workspace_id, "action": action.kind.value,
             "plugin": action.plugin.name if action.plugin else None,
             "trigger": trigger.value, "result": "ok" if outcome.ok else "failed"}
    if outcome.ok:
        log.info("%s: %s ok [%s]", workspace_id, action.describe(), trigger, extra=extra)
    else:
        log.warning("%s: %s failed [%s]: %s", workspace_id, action.describe(), trigger,
                    outcome.message, extra=extra)


# --- a pass's workspaces with actions -----------------------------------------------------------

class Acting:
    """One pass's acting: claim, re-read, re-plan and act on workspaces a batch at a time,
    never claiming more than one batch ahead of the work, at most `ctx.limit` at once.
    Each workspace leaves the pass's reservation as soon as it is done."""

    def __init__(self, ctx: PassContext, reservation: Reservation) -> None:
        self.ctx = ctx
        self.reservation = reservation
        self.batch_size = max(1, ctx.policy.concurrency)
        self.hold = timedelta(seconds=claim_seconds(ctx.policy))
        self.recorder = Recorder(ctx.sessions, ctx.replica)
        self.results: list[WorkspaceResult] = []
        self.elsewhere = 0  # workspaces another replica held
        self.running: set[asyncio.Task[WorkspaceResult]] = set()
        self.pending: set[str] = set()  # claimed by this pass, not finished: released if cut off

    async def run(self, workspace_ids: Sequence[str]) -> list[WorkspaceResult]:
        self.pending = set(workspace_ids)
        try:
            for batch in chunks(workspace_ids, self.batch_size):
                await self._collect(until_below=self.batch_size)
                await self._start(batch)
            await self._collect(until_below=1)
        finally:
            await self._cut_off()
        return self.results

    async def _collect(self, *, until_below: int) -> None:
        while len(self.running) >= until_below:
            complete, self.running = await asyncio.wait(
                self.running, return_when=asyncio.FIRST_COMPLETED)
            results = tuple(task.result() for task in complete)
            for result in results:
                self._finish(result.workspace_id, result)
            if self.ctx.acted is not None:  # released first: no longer held by this pass
                self.ctx.acted(results)

    def _finish(self, workspace_id: str, result: WorkspaceResult | None) -> None:
        if result is not None:
            self.results.append(result)
        self.pending.discard(workspace_id)
        self.reservation.release([workspace_id])
        self.ctx.tally.advance(1)

    async def _start(self, batch: Sequence[str]) -> None:
        until = utcnow() + self.hold
        claimed = await claim(self.ctx, batch, until=until)
        idle: list[str] = []
        for workspace_id in batch:
            seen = claimed.observed.get(workspace_id)
            plan = None if seen is None else planner.plan(
                self.ctx.wanted(workspace_id), seen, self.ctx.now, self.ctx.policy)
            if seen is not None and plan is not None and plan.actions:
                self.running.add(asyncio.create_task(self._one(seen, plan, until=until)))
                continue
            result = None
            if workspace_id not in claimed.ids:
                self.elsewhere += 1
            else:
                idle.append(workspace_id)
                if seen is not None and plan is not None:  # another replica was quicker
                    result = WorkspaceResult.unacted(
                        seen, plan, trigger=self.ctx.trigger_of(workspace_id))
            self._finish(workspace_id, result)
        await release(self.ctx, idle)

    async def _one(self, seen: Observed, plan: WorkspacePlan, *, until: datetime
                   ) -> WorkspaceResult:
        async with self.ctx.limit:
            left = (until - utcnow()).total_seconds() - CLAIM_MARGIN
            if left < self.ctx.policy.call_timeout:  # its turn came too late: the next pass
                await release(self.ctx, [seen.workspace_id])
                return WorkspaceResult.unacted(
                    seen, plan, trigger=self.ctx.trigger_of(seen.workspace_id),
                    error="not acted on: its claim ran out while it waited")
            performed = await perform_workspace(
                self.ctx, seen, plan, wanted=self.ctx.wanted(seen.workspace_id),
                deadline=min(self.ctx.policy.workspace_timeout, left))
        # The slot bounds runtime calls, not bookkeeping: the next workspace's calls start
        # while this one is recorded (records finishing together share one transaction).
        return await record_workspace(self.ctx, seen, performed, recorder=self.recorder)

    async def _cut_off(self) -> None:
        """Cut off (a shutdown, or the store failed): give back what is left."""
        self.reservation.release(self.pending)
        for task in self.running:
            task.cancel()
        if self.pending:
            with contextlib.suppress(DatabaseError):  # else the claims run out on their own
                await release(self.ctx, self.pending)
