"""`pluginctl demo`: the standalone controller plus one reference runtime per declared
workspace, each taking a path that broke edge-triggered installs or that the loop must ride
out — registers and never heartbeats, has a user-installed plugin, loses its plugins when
its box is re-created, has a broken plugin — shown live converging or backing off."""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import click

from controller import manifests, service, status
from controller.agent.simulated import Faults, ReferenceRuntime
from controller.desired import Desired
from controller.models import ActionKind, DesiredWorkspace, Plugin, Policy, utcnow
from controller.reconciler import PassReport, WorkspaceResult
from controller.registry import issue_token
from controller.render import table
from controller.store import (
    Sessions,
    ensure_schema,
    make_engine,
    make_sessions,
    queries,
    transaction,
)

Say = Callable[[str, str], None]
USER_PLUGIN = Plugin("scratchpad", "local://user/scratchpad")
BROKEN_FOR = 3  # failed installs of the broken plugin before its publisher fixes it


def _converged(runtime: ReferenceRuntime, wanted: DesiredWorkspace) -> bool:
    return all(
        (have := runtime.plugins.get(name)) is not None and have.satisfies(plugin)
        for name, plugin in wanted.plugins.items()
    )


async def run_demo(directory: Path, seconds: float, db: str | None) -> bool:
    # Every action is narrated on stdout; the loop's own warnings would say it twice.
    logging.getLogger("pluginctl.reconciler").setLevel(logging.ERROR)
    desired = manifests.load(directory)
    for error in desired.errors:
        click.echo(f"error: {error}", err=True)
    workspaces = [w for w in desired.workspaces.values() if w.error is None and not w.suspended]
    if not workspaces:
        click.echo(f"no usable Workspace objects in {directory}", err=True)
        return False

    with tempfile.TemporaryDirectory(prefix="pluginctl-demo-") as scratch:
        url = db or f"sqlite:///{Path(scratch) / 'pluginctl.db'}"
        engine = make_engine(url)
        ensure_schema(engine)
        sessions = make_sessions(engine)
        started_at = time.monotonic()

        def say(who: str, text: str) -> None:
            click.echo(f"[{time.monotonic() - started_at:5.1f}s] {who:<12} {text}")

        broken: dict[str, Faults] = {}  # workspace -> the faults of its runtime
        failures: dict[str, int] = {}

        def on_pass(report: PassReport, _trigger: str) -> None:
            for result in report.results:
                for outcome in result.outcomes:
                    if outcome.action.kind is ActionKind.DISOWN:
                        continue
                    verdict = "ok" if outcome.ok else f"failed: {outcome.message}"
                    say(result.workspace_id, f"{outcome.action.describe()} -> {verdict} "
                                             f"[{result.trigger_of(outcome.action)}]")
                    if not outcome.ok:
                        _backing_off(result, outcome.action.key)
            for workspace_id, faults in broken.items():
                if faults.failing_plugins and failures.get(workspace_id, 0) >= BROKEN_FOR:
                    faults.failing_plugins.clear()
                    say(workspace_id, "the broken plugin's publisher ships a fix; the next "
                                      "retry will install it")

        def _backing_off(result: WorkspaceResult, key: str) -> None:
            failures[result.workspace_id] = failures.get(result.workspace_id, 0) + 1
            with transaction(sessions) as session:
                seen = queries.load_observed(session, only=[result.workspace_id])
            attempt = seen[result.workspace_id].attempts.get(key) \
                if result.workspace_id in seen else None
            if attempt is not None:
                wait = (attempt.next_retry_at - utcnow()).total_seconds()
                say(result.workspace_id, f"backing off: {key} failed {attempt.failures}x, "
                                         f"next try in {max(0.0, wait):.1f}s")

        port_ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        # Short backoff and interval so that a few retries fit in a few seconds.
        policy = Policy(call_timeout=5.0, backoff_base=timedelta(seconds=1),
                        backoff_cap=timedelta(seconds=4))
        controller = asyncio.create_task(service.serve(
            lambda: manifests.load(directory), sessions, policy, "127.0.0.1", 0, interval=1.0,
            started=port_ready.set_result, stop=stop, on_pass=on_pass))
        port = await asyncio.wait_for(port_ready, 10)
        say("controller", f"registry on http://127.0.0.1:{port}, full pass every 1s, "
                          f"database {engine.url.render_as_string(hide_password=True)}")
        runtimes = await _start_runtimes(workspaces, sessions, port, say, broken)
        try:
            converged = await _watch(
                workspaces, runtimes, seconds, say,
                recorded=lambda: all(s.in_sync for s in _statuses(desired, sessions,
                                                                  policy).values()))
            _print_status(desired, sessions, policy)
            return converged
        finally:
            stop.set()
            await controller
            for runtime in runtimes:
                await runtime.stop()
            engine.dispose()


async def _start_runtimes(workspaces: list[DesiredWorkspace], sessions: Sessions, port: int,
                          say: Say, broken: dict[str, Faults]) -> list[ReferenceRuntime]:
    runtimes = []
    for index, wanted in enumerate(sorted(workspaces, key=lambda w: w.workspace_id)):
        secret = issue_token(sessions, wanted.workspace_id)
        role = index % 4
        faults = Faults()
        if role == 3:
            faults.failing_plugins = {max(wanted.plugins)}
            broken[wanted.workspace_id] = faults
        runtime = ReferenceRuntime(
            wanted.workspace_id, registry_url=f"http://127.0.0.1:{port}", token=secret,
            plugins=[USER_PLUGIN] if role == 1 else [], report=role != 0,
            heartbeat_interval=1.0, faults=faults,
        )
        await runtime.start()
        await runtime.register()
        story = {
            0: "registered without a report and never heartbeats (the boot path edge "
               "triggers missed)",
            1: f"registered with a plugin its user installed ({USER_PLUGIN.name}); heartbeats",
            2: "registered empty; heartbeats; its box will be re-created later",
            3: f"registered empty; heartbeats; its runtime cannot install "
               f"{', '.join(sorted(faults.failing_plugins))} (a broken plugin)",
        }[role]
        say(wanted.workspace_id, story)
        if role != 0:
            runtime.start_heartbeats()
        runtimes.append(runtime)
    return runtimes


async def _watch(workspaces: list[DesiredWorkspace], runtimes: list[ReferenceRuntime],
                 seconds: float, say: Say, recorded: Callable[[], bool]) -> bool:
    """Converged means: every runtime has its plugins, and the store agrees."""
    wanted = {w.workspace_id: w for w in workspaces}
    deadline = time.monotonic() + seconds

    async def until_converged() -> bool:
        while time.monotonic() < deadline:
            if all(_converged(r, wanted[r.workspace_id]) for r in runtimes) and recorded():
                return True
            await asyncio.sleep(0.1)
        return False

    if not await until_converged():
        say("controller", f"not converged after {seconds:g}s")
        return False
    say("controller", f"all {len(runtimes)} workspaces converged")
    recreated = runtimes[2] if len(runtimes) > 2 else runtimes[-1]
    recreated.plugins.clear()
    await recreated.register()
    say(recreated.workspace_id,
        "box re-created: every plugin lost, registered again")
    if not await until_converged():
        say("controller", f"not converged again after {seconds:g}s")
        return False
    say("controller", "converged again")
    for runtime in runtimes:
        if USER_PLUGIN.name in runtime.plugins:
            say(runtime.workspace_id,
                f"user-installed {USER_PLUGIN.name} still there: never touched")
    return True


def _statuses(desired: Desired, sessions: Sessions, policy: Policy
              ) -> dict[str, status.WorkspaceStatus]:
    now = utcnow()
    with transaction(sessions) as session:
        observed = queries.load_observed(session)
    return {workspace_id: status.build(wanted, observed.get(workspace_id), now, policy)
            for workspace_id, wanted in sorted(desired.workspaces.items())}


def _print_status(desired: Desired, sessions: Sessions, policy: Policy) -> None:
    rows = []
    for workspace_id, state in _statuses(desired, sessions, policy).items():
        rows.append([workspace_id, state.phase.value, f"{state.installed}/{state.desired}",
                     "yes" if state.in_sync else "no", str(policy.restart_budget -
                                                            state.restarts_left)])
    click.echo("")
    click.echo(table(["WORKSPACE", "PHASE", "PLUGINS", "IN-SYNC", "RESTARTS"], rows))
