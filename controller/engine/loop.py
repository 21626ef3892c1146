"""The periodic loop, the top of the engine: a full pass every interval, a small pass for
hinted workspaces in between (both from the work queue), each pass in a task of its own so
that a slow runtime never delays the next one; beside them, about once an hour, a prune
that keeps the store's tables bounded. The standalone process and the operator (while it
leads) run it; only where desired state comes from differs."""

from __future__ import annotations

import asyncio
import functools
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from controller.domain import planner
from controller.domain.desired import Desired, DesiredStateError, ObjectError
from controller.domain.models import Policy, utcnow
from controller.engine.context import DEFAULT_REPLICA
from controller.engine.passes import reconcile_once
from controller.engine.queue import Request, Trigger, WorkQueue
from controller.engine.report import PassReport
from controller.runtime.driver import RuntimeDriver
from controller.store import DatabaseError, Sessions, in_thread, queries

log = logging.getLogger("pluginctl.reconciler")

DesiredSource = Callable[[], Desired]
HINT_GATHER = 0.05  # seconds a hint waits for others before its pass starts
PassCallback = Callable[[PassReport, Trigger], None]  # (report, what started the pass)
FailureCallback = Callable[[Trigger], None]  # (what started a pass that could not run)
RunningCallback = Callable[[bool], None]  # the loop started (True) or stopped (False)
EarlyCallback = Callable[[PassReport], None]  # a pass's early report (PassReport.early)
PRUNE_EVERY = 3600.0  # seconds between prunes of the store (store/queries/prune.py)


async def run_forever(
    source: DesiredSource,
    sessions: Sessions,
    driver: RuntimeDriver,
    policy: Policy,
    *,
    interval: float,
    stop: asyncio.Event | tuple[asyncio.Event, ...],
    queue: WorkQueue | None = None,
    on_pass: PassCallback | None = None,
    on_failure: FailureCallback | None = None,
    on_running: RunningCallback | None = None,
    on_early: EarlyCallback | None = None,
    replica: str = DEFAULT_REPLICA,
    jitter: float = 0.1,
    rand: Callable[[], float] = random.random,
) -> None:
    """Full passes every `interval` seconds (plus or minus `jitter` of it, so that replicas
    and restarts never line up), and small passes for the workspaces hinted to `queue` in
    between. A pass is started on time even if an earlier one still waits on a slow runtime:
    that runtime's workspace is busy and skipped, every other workspace is served. It
    returns once any of the `stop` events is set. `on_running` hears when it starts and when
    its passes have ended (the metrics: a replica that runs no passes reports none);
    `on_early` hears each pass's early reports, as its workspaces finish."""
    stops = stop if isinstance(stop, tuple) else (stop,)
    clock = asyncio.get_running_loop().time
    passes = Passes(source=source, sessions=sessions, driver=driver, policy=policy,
                    queue=queue or WorkQueue(), replica=replica, rand=rand,
                    on_pass=on_pass, on_failure=on_failure, on_early=on_early)
    pruning = Pruning(sessions=sessions, policy=policy)
    next_full = clock()
    if on_running is not None:
        on_running(True)
    try:
        while not any(s.is_set() for s in stops):
            await wait_any((passes.queue.hinted, *stops), max(0.0, next_full - clock()))
            if any(s.is_set() for s in stops):
                break
            if clock() >= next_full:
                next_full = clock() + interval * (1 + jitter * (2 * rand() - 1))
                if not passes.full_planned.is_set():
                    # The last full pass is still reading and planning (a cold start over a
                    # big fleet): another would only compete with it. Its acting may overlap.
                    log.debug("full pass skipped: the last one is still planning")
                    continue
                passes.start_full()
            else:
                # Hints come in bursts (a fleet reconnecting, a deploy): gather them briefly,
                # so that one pass serves the burst instead of one pass per hint.
                await wait_any(stops, HINT_GATHER)
                passes.start(passes.queue.next_request(full=False))
            pruning.start_if_due(passes.desired, clock())
            await asyncio.sleep(0)  # let the pass claim its workspaces before the next one
    finally:
        await passes.wind_down(grace=policy.call_timeout)
        await pruning.wind_down(grace=policy.call_timeout)
        if on_running is not None:
            on_running(False)


def _planned() -> asyncio.Event:
    planned = asyncio.Event()
    planned.set()
    return planned


@dataclass(kw_only=True)
class Passes:
    """The loop's passes in flight, and what it remembers from one pass to the next."""

    source: DesiredSource
    sessions: Sessions
    driver: RuntimeDriver
    policy: Policy
    queue: WorkQueue
    replica: str
    rand: Callable[[], float]
    on_pass: PassCallback | None
    on_failure: FailureCallback | None
    on_early: EarlyCallback | None = None
    running: set[asyncio.Task[None]] = field(default_factory=set)
    full_planned: asyncio.Event = field(default_factory=_planned)  # the last full pass's
    last_errors: tuple[ObjectError, ...] = ()  # logged already: not again every pass
    desired: Desired | None = None  # what the last full pass read, for the prune
    holding: planner.Held | None = None  # what held the last full pass, if anything

    def start_full(self) -> None:
        self.full_planned = asyncio.Event()
        self.start(self.queue.next_request(full=True), planned=self.full_planned)

    def start(self, request: Request, *, planned: asyncio.Event | None = None) -> None:
        task = asyncio.create_task(self._run(request, planned))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def _run(self, request: Request, planned: asyncio.Event | None) -> None:
        try:
            report = await self._pass(request, planned)
        finally:
            if planned is not None:
                planned.set()
        if report is None:
            if self.on_failure is not None:
                self.on_failure(request.trigger)
            return
        if request.only is None:
            self.holding = report.guard
        if self.on_pass is not None:
            self.on_pass(report, request.trigger)

    async def _pass(self, request: Request, planned: asyncio.Event | None
                    ) -> PassReport | None:
        """One pass of the loop; None if it could not run (it says why in the log)."""
        try:
            desired = self.source()
        except (DesiredStateError, OSError) as error:
            log.error("cannot read desired state, skipping this pass: %s", error)
            return None
        if desired.errors != self.last_errors:
            for object_error in desired.errors:
                log.error("desired state: %s", object_error)
            self.last_errors = desired.errors
        if request.only is not None:
            request = replace(request, hold=self.holding)
        else:
            self.desired = desired
        try:
            return await reconcile_once(
                desired, self.sessions, self.driver, self.policy, request=request,
                dry_run=self.policy.dry_run, replica=self.replica, rand=self.rand,
                queue=self.queue, planned=planned, early=self.on_early)
        except DatabaseError as error:
            log.error("pass failed, will retry: %s", error)
            return None

    async def wind_down(self, *, grace: float) -> None:
        """Give passes in flight `grace` seconds to finish, then cut them off; whatever they
        did not record is re-observed by the next start."""
        if not self.running:
            return
        _, pending = await asyncio.wait(self.running, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


def declared_ids(desired: Desired) -> frozenset[str] | None:
    """Every workspace id desired state names (those whose objects lost a claim to the id
    too), or None when some of it could not be read: an unreadable object may name any."""
    if desired.errors:
        return None
    return frozenset(desired.workspaces) | {w.workspace_id for w in desired.rejected}


def declared_templates(desired: Desired) -> frozenset[str] | None:
    """Every template ("namespace/name") desired state holds, invalid ones too, or None when
    some of it could not be read: an unreadable object may be any template."""
    if desired.errors:
        return None
    return frozenset(desired.templates)


@dataclass(kw_only=True)
class Pruning:
    """The store's prune (queries.prune), a small step beside the passes: the first once a
    full pass has read desired state, then at most every `every` seconds, never two at once,
    never in a dry run. A failed one waits for its next turn like any other."""

    sessions: Sessions
    policy: Policy
    every: float = PRUNE_EVERY
    next_at: float = 0.0  # on the loop's clock
    task: asyncio.Task[None] | None = None

    def start_if_due(self, desired: Desired | None, now: float) -> None:
        if (self.policy.dry_run or desired is None or now < self.next_at
                or (self.task is not None and not self.task.done())):
            return
        self.next_at = now + self.every
        self.task = asyncio.create_task(self._prune(declared_ids(desired),
                                                    declared_templates(desired)))

    async def _prune(self, declared: frozenset[str] | None,
                     templates: frozenset[str] | None) -> None:
        try:
            pruned = await in_thread(self.sessions, functools.partial(
                queries.prune, now=utcnow(), declared=declared, templates=templates,
                forget_after=self.policy.forget_after,
                restart_window=self.policy.restart_window))
        except DatabaseError as error:
            log.warning("could not prune the store, trying again in %gs: %s", self.every, error)
            return
        log.log(logging.INFO if pruned.total else logging.DEBUG, "pruned the store: %s", pruned)

    async def wind_down(self, *, grace: float) -> None:
        if self.task is None or self.task.done():
            return
        _, pending = await asyncio.wait({self.task}, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def wait_any(events: tuple[asyncio.Event, ...], timeout: float) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
