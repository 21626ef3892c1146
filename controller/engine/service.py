"""The standalone controller process: the registry API and the periodic loop in one event
loop, sharing one store; the registry hints the loop so a fresh register converges fast.
Beside them, the metrics' reporter role: which replica exports the fleet gauges."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from controller.domain.desired import Desired
from controller.domain.models import Policy
from controller.engine.context import DEFAULT_REPLICA
from controller.engine.loop import FailureCallback, PassCallback, run_forever, wait_any
from controller.engine.metrics import Metrics
from controller.engine.queue import Trigger, WorkQueue
from controller.engine.report import PassReport, Refusals
from controller.registry.app import make_app
from controller.registry.serving import Limits, runner_for, start_site
from controller.runtime.driver import RuntimeDriver
from controller.store import Sessions
from controller.store.roles import ExclusiveRole

log = logging.getLogger("pluginctl")


def log_pass(report: PassReport, trigger: Trigger) -> None:
    if report.dry_run:  # `run --dry-run`: say what each workspace's turn would have done
        for result in report.results:
            for line in result.planned:
                log.info("%s: would %s [%s]", result.workspace_id, line, result.trigger)
    acted = any(r.outcomes or (report.dry_run and r.planned) for r in report.results) \
        or report.failed or report.guard is not None
    log.log(logging.INFO if acted else logging.DEBUG, "pass (%s): %s", trigger, report.summary())


Loop = Callable[[WorkQueue, asyncio.Event], Awaitable[None]]


def observed(metrics: Metrics | None, on_pass: PassCallback | None = None
             ) -> tuple[PassCallback, FailureCallback | None]:
    """What the loop calls after each pass: the metrics, new refusals logged once, and
    `on_pass` (default: log it)."""
    then = on_pass or log_pass
    refusals = Refusals()

    def both(report: PassReport, trigger: Trigger) -> None:
        if metrics is not None:
            metrics.observe_pass(report, trigger)
        refusals.observe(report)
        then(report, trigger)

    return both, metrics.observe_failed_pass if metrics is not None else None


def standalone_loop(source: Callable[[], Desired], sessions: Sessions, policy: Policy, *,
                    interval: float, on_pass: PassCallback | None = None,
                    replica: str = DEFAULT_REPLICA, metrics: Metrics | None = None) -> Loop:
    """The periodic loop over desired state from `source` (a manifest directory)."""
    after_pass, on_failure = observed(metrics, on_pass)

    async def loop(queue: WorkQueue, stop: asyncio.Event) -> None:
        async with RuntimeDriver.for_policy(policy, replica) as driver:
            await run_forever(source, sessions, driver, policy, interval=interval, stop=stop,
                              queue=queue, on_pass=after_pass, replica=replica,
                              on_failure=on_failure,
                              on_running=metrics.loop_running if metrics else None)
    return loop


async def serve(
    source: Callable[[], Desired] | None,
    sessions: Sessions,
    policy: Policy,
    *,
    host: str,
    port: int,
    interval: float,
    started: Callable[[int], None] | None = None,
    stop: asyncio.Event | None = None,
    on_pass: PassCallback | None = None,
    loop_factory: Loop | None = None,
    replica: str = DEFAULT_REPLICA,
    limits: Limits | None = None,
    metrics: Metrics | None = None,
) -> None:
    """The registry API and a control loop (the standalone loop over `source`, or
    `loop_factory`, e.g. the operator's), until SIGINT/SIGTERM or `stop`. Raises OSError if
    it cannot listen."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, stop.set)
    queue = WorkQueue()
    runner = runner_for(make_app(sessions, hint=queue, networks=policy.runtime_networks,
                                 limits=limits, metrics=metrics))
    await runner.setup()
    try:
        bound = await start_site(runner, host, port)
        log.info("registry listening on http://%s:%d", host, bound)
        if started is not None:
            started(bound)
        if loop_factory is None:
            if source is None:
                raise ValueError("serve() needs a source of desired state or a loop")
            loop_factory = standalone_loop(source, sessions, policy, interval=interval,
                                           on_pass=on_pass, replica=replica, metrics=metrics)
        reporting = asyncio.create_task(report_fleet(
            metrics, ExclusiveRole(sessions, "fleet-metrics"), interval=interval,
            stop=stop)) if metrics is not None else None
        try:
            await _until_stopped(loop_factory(queue, stop), stop, close=runner.cleanup)
        finally:
            if reporting is not None:
                reporting.cancel()
                await asyncio.gather(reporting, return_exceptions=True)
    finally:
        if runner.server is not None:  # not closed yet
            await runner.cleanup()
        log.info("stopped")


FLEET_ROLE_CHECK = 5.0  # seconds at most between two looks at the reporter role


async def report_fleet(metrics: Metrics, role: ExclusiveRole, *, interval: float,
                       stop: asyncio.Event) -> None:
    """Keep `metrics.reporter` true on one replica at a time: the one holding `role`. A
    replica asks for the role once its loop runs and has finished a full pass, and gives it
    up when its loop stops (an operator that lost the leadership) or its last full pass is
    more than three intervals old (its passes are stuck: another replica's are fresher), so
    that the fleet gauges always come from a replica whose passes run. The role is freed by
    the database when a replica dies."""
    every = min(interval, FLEET_ROLE_CHECK)
    changed = asyncio.Event()
    metrics.fleet_changed = changed.set  # look at once when the loop starts or stops
    metrics.reporter = False
    try:
        while not stop.is_set():
            changed.clear()
            age = metrics.oldest_reconcile_age()
            wanted = metrics.fleet is not None and age is not None and age <= 3 * interval
            if wanted:
                metrics.reporter = await asyncio.to_thread(role.hold)
            else:
                metrics.reporter = False
                await asyncio.to_thread(role.release)
            await wait_any((stop, changed), every)
    finally:
        metrics.fleet_changed = None
        metrics.reporter = False
        await asyncio.to_thread(role.release)


async def _until_stopped(loop: Awaitable[None], stop: asyncio.Event, *,
                         close: Callable[[], Awaitable[None]]) -> None:
    """Run the loop until it ends or `stop` is set. Once stopping, the registry stops
    serving first (in-flight requests finish, idle keep-alive connections close), so that a
    loop that waits for every task to end, as kopf does, is not held up by open ones."""
    task = asyncio.ensure_future(loop)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            await close()
        await task
    finally:
        stopping.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
