"""The reconciler: one pass over every online workspace (read state, plan, execute, record),
and the periodic loop that runs passes. The standalone process, the one-shot CLI and the
operator all run this same pass; only where desired state comes from differs."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from datetime import datetime

from controller import executor, outcomes, planner
from controller.desired import Desired, DesiredStateError, ObjectError
from controller.driver import RuntimeDriver
from controller.models import (
    ActionKind,
    DesiredWorkspace,
    Observed,
    Outcome,
    Phase,
    Policy,
    Wait,
    WorkspacePlan,
    sync_digest,
    utcnow,
)
from controller.store import DatabaseError, Sessions, queries, transaction

log = logging.getLogger("pluginctl.reconciler")

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class WorkspaceResult:
    workspace_id: str
    plans: tuple[WorkspacePlan, ...]
    outcomes: tuple[Outcome, ...]
    restart_pending: bool
    error: str | None = None  # the pass could not finish this workspace
    prior_failures: frozenset[str] = frozenset()  # attempt keys already failing before

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

    @property
    def online(self) -> int:
        return len(self.results) + self.synced
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
        return ", ".join(parts) + f" -> {state}"

    @property
    def in_sync(self) -> bool:
        """Every online, managed workspace is as declared (for a dry run: needs nothing)."""
        if self.invalid:
            return False
        if self.dry_run:
            return all(p.in_sync for r in self.results for p in r.plans)
        return all(r.in_sync for r in self.results)


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
) -> PassReport:
    """One level-triggered pass: for every online workspace, desired vs observed -> actions.
    Nothing here asks how a workspace got online.

    Passes may overlap (the loop never waits for a slow runtime before starting the next
    pass): `busy` holds the workspaces some pass is handling, which others then skip, and
    `limit` bounds the concurrent work of all passes together."""
    busy = set() if busy is None else busy
    now = utcnow()
    with transaction(sessions) as session:
        # One light query recognises the workspaces found in sync before whose desired state
        # and report have not changed since; only the others are loaded and planned.
        digests = queries.online_digests(session, now=now, offline_after=policy.offline_after,
                                         only=only)
        synced = {workspace_id for workspace_id, (report_digest, marker) in digests.items()
                  if workspace_id not in busy and _recognised(
                      desired.workspaces.get(workspace_id), report_digest, marker)}
        rest = [workspace_id for workspace_id in digests if workspace_id not in synced]
        observed: dict[str, Observed] = {}
        if rest:
            listed = len(rest) <= MAX_LISTED
            observed = queries.load_observed(
                session, now=now, offline_after=policy.offline_after,
                restart_window=policy.restart_window, only=rest if listed else only,
            )
            if not listed:
                observed = {k: v for k, v in observed.items() if k not in synced}

    work: list[tuple[DesiredWorkspace, Observed]] = []
    invalid: list[DesiredWorkspace] = []
    skipped: dict[Phase, int] = {}
    busy_count = 0
    for workspace_id in sorted(observed):
        if workspace_id in busy:
            busy_count += 1
            continue
        wanted = desired.workspaces.get(workspace_id)
        phase = planner.phase_of(wanted, observed[workspace_id], now, policy)
        if wanted is not None and phase is Phase.ONLINE:
            work.append((wanted, observed[workspace_id]))
        elif wanted is not None and phase is Phase.INVALID:
            invalid.append(wanted)
        else:
            skipped[phase] = skipped.get(phase, 0) + 1

    done = 0
    limit = limit or asyncio.Semaphore(max(1, policy.concurrency))
    claimed = {wanted.workspace_id for wanted, _ in work}
    busy |= claimed

    async def one(wanted: DesiredWorkspace, seen: Observed,
                  plan: WorkspacePlan) -> WorkspaceResult:
        nonlocal done
        try:
            async with limit:
                result = await _execute_workspace(
                    wanted, seen, plan, sessions, driver, policy, now, rand
                )
        finally:
            busy.discard(wanted.workspace_id)
        done += 1
        if progress is not None:
            progress(done + len(synced), len(work) + len(synced))
        return result

    # Plan every workspace first; only those with something to do cost a task. In a steady
    # fleet that is none of them.
    quiet: list[WorkspaceResult] = []
    active = []
    markers: dict[str, str] = {}
    for wanted, seen in work:
        plan = planner.plan(wanted, seen, now, policy)
        if dry_run or not plan.actions:
            busy.discard(wanted.workspace_id)
            quiet.append(WorkspaceResult(seen.workspace_id, (plan,), (), seen.restart_pending,
                                         prior_failures=frozenset(seen.attempts)))
            done += 1
            report_digest, marker = digests.get(seen.workspace_id, (None, None))
            if plan.in_sync and not seen.attempts and report_digest is not None:
                new_marker = sync_digest(wanted.digest, report_digest)
                if new_marker != marker:
                    markers[seen.workspace_id] = new_marker
        else:
            active.append(one(wanted, seen, plan))
    if markers and not dry_run:
        try:
            with transaction(sessions) as session:
                queries.mark_synced(session, markers)
        except DatabaseError as error:  # only an optimisation: the next pass plans again
            log.warning("could not remember %d in-sync workspaces: %s", len(markers), error)
    if progress is not None and (quiet or synced):
        progress(done + len(synced), len(work) + len(synced))
    results = [*quiet, *await asyncio.gather(*active)]
    results.sort(key=lambda result: result.workspace_id)
    return PassReport(
        started_at=now,
        finished_at=utcnow(),
        dry_run=dry_run,
        results=tuple(results),
        invalid=tuple(invalid),
        skipped=skipped,
        busy=busy_count,
        synced=len(synced),
        manifest_errors=desired.errors,
        scope=None if only is None else frozenset(only),
    )


async def _execute_workspace(
    wanted: DesiredWorkspace,
    seen: Observed,
    plan: WorkspacePlan,
    sessions: Sessions,
    driver: RuntimeDriver,
    policy: Policy,
    now: datetime,
    rand: Callable[[], float],
) -> WorkspaceResult:
    prior = frozenset(seen.attempts)
    url = seen.url or ""
    plans = [plan]
    done: list[Outcome] = []
    error: str | None = None
    try:
        async with asyncio.timeout(policy.workspace_timeout):
            await executor.execute(driver, url, plan, done)
            observed_now = [o for o in done if o.action.kind is ActionKind.OBSERVE and o.ok]
            if observed_now:
                # Now that we know what the runtime has, plan again with that knowledge.
                report = {p.name: p for p in observed_now[-1].report or ()}
                plan = planner.plan(wanted, replace(seen, report=report), now, policy)
                plans.append(plan)
                await executor.execute(driver, url, plan, done)
    except TimeoutError:
        error = f"workspace pass exceeded {policy.workspace_timeout:g}s; the rest waits"

    changes = outcomes.changes_from(seen, done, now, policy, rand)
    try:
        with transaction(sessions) as session:
            queries.apply_changes(session, changes, now)
    except DatabaseError as exc:
        # The calls happened but are not recorded: the next pass sees the runtime's report
        # and repeats at most an idempotent install.
        log.error("could not record outcomes of %s: %s", seen.workspace_id, exc)
        error = f"could not record outcomes: {exc}"
    for outcome in done:
        _log_outcome(seen.workspace_id, outcome)
    pending = seen.restart_pending if changes.restart_pending is None else changes.restart_pending
    return WorkspaceResult(seen.workspace_id, tuple(plans), tuple(done), pending, error,
                           prior_failures=prior)


def _log_outcome(workspace_id: str, outcome: Outcome) -> None:
    action = outcome.action
    extra = {"workspace": workspace_id, "action": action.kind.value,
             "plugin": action.plugin.name if action.plugin else None}
    if outcome.ok:
        log.info("%s: %s ok", workspace_id, action.describe(), extra=extra)
    else:
        log.warning("%s: %s failed: %s", workspace_id, action.describe(), outcome.message,
                    extra=extra)


class Hints:
    """Workspaces the registry asked the loop to look at sooner. Correctness never depends
    on them: the periodic full pass covers every workspace anyway."""

    def __init__(self) -> None:
        self._ids: set[str] = set()
        self.event = asyncio.Event()

    def __call__(self, workspace_id: str) -> None:
        self._ids.add(workspace_id)
        self.event.set()

    def take(self) -> set[str]:
        ids, self._ids = self._ids, set()
        self.event.clear()
        return ids


MAX_LISTED = 1000  # more ids than this are not sent as an IN list; the pass filters instead


def _recognised(wanted: DesiredWorkspace | None, report_digest: str | None,
                marker: str | None) -> bool:
    """Found in sync by an earlier pass, and neither its desired state nor its report has
    changed since."""
    return (wanted is not None and wanted.error is None and not wanted.suspended
            and report_digest is not None and marker is not None
            and marker == sync_digest(wanted.digest, report_digest))


DesiredSource = Callable[[], Desired]
MAX_HINTED = 1000  # more hinted workspaces than this at once: run a full pass instead
PassCallback = Callable[[PassReport, str], None]


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

    async def one_pass(only: set[str] | None, trigger: str) -> None:
        try:
            desired = source()
        except (DesiredStateError, OSError) as error:
            log.error("cannot read desired state, skipping this pass: %s", error)
            return
        if desired.errors != last_errors[0]:
            for object_error in desired.errors:
                log.error("desired state: %s", object_error)
            last_errors[0] = desired.errors
        try:
            report = await reconcile_once(desired, sessions, driver, policy, only=only,
                                          rand=rand, busy=busy, limit=limit)
        except DatabaseError as error:
            log.error("pass failed, will retry: %s", error)
            return
        if on_pass is not None:
            on_pass(report, trigger)

    next_full = loop.time()
    try:
        while not any(s.is_set() for s in stops):
            await _wait_any((hints.event, *stops), max(0.0, next_full - loop.time()))
            if any(s.is_set() for s in stops):
                break
            if loop.time() >= next_full:
                hints.take()
                only: set[str] | None = None
                trigger = "periodic"
                next_full = loop.time() + interval * (1 + jitter * (2 * rand() - 1))
            else:
                only = hints.take()
                trigger = "hint"
                if len(only) > MAX_HINTED:  # a reconnect storm: one full pass is cheaper
                    only, trigger = None, "hint-storm"
            task = asyncio.create_task(one_pass(only, trigger))
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
