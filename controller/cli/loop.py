"""The commands that run passes: `run` (registry and periodic loop, standalone or as the
operator), `reconcile --once`, `plan` and `apply`."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import click

from controller.cli.base import (
    EXIT_DRIFT,
    EXIT_OK,
    Failure,
    check_one_source,
    cli,
    db_option,
    desired_state,
    iso,
    kube_client,
    kubernetes_options,
    load_manifests,
    make_policy,
    manifests_option,
    open_store,
    output_option,
    parse_listen,
    policy_options,
    when,
)
from controller.domain.models import Plugin
from controller.domain.render import table
from controller.engine import manifests as manifests_mod
from controller.engine import service
from controller.engine.context import DEFAULT_REPLICA
from controller.engine.metrics import Metrics
from controller.engine.passes import reconcile_once
from controller.engine.queue import WorkQueue
from controller.engine.report import PassReport, WorkspaceResult
from controller.registry.serving import Limits
from controller.runtime.driver import RuntimeDriver

# --- run -------------------------------------------------------------------------------------

@cli.command()
@manifests_option(required=False)
@kubernetes_options
@db_option
@click.option("--listen", default="127.0.0.1:8080", show_default=True, metavar="HOST:PORT",
              help="Address of the registry API (and /healthz).")
@click.option("--interval", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds between full passes (with +/-10% jitter).")
@click.option("--lease-namespace", envvar="POD_NAMESPACE", default=None,
              help="Namespace of the leader-election Lease (env POD_NAMESPACE; default: the "
                   "kubeconfig's namespace, else 'default').")
@click.option("--leader-election/--no-leader-election", default=True, show_default=True,
              help="With --kubernetes: only the replica holding the Lease runs passes.")
@click.option("--identity", default=None, envvar="PLUGINCTL_IDENTITY",
              help="This replica's name: the holder of the Lease, and of the claims on the "
                   "workspaces it acts on. Unique per replica (default: host-pid).")
@click.option("--resync", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="With --kubernetes: seconds between full LISTs of the cluster's objects, "
                   "which repair watch events lost on the way.")
@click.option("--max-connections", type=click.IntRange(min=1), default=Limits().max_connections,
              show_default=True, help="Registry connections open at once; more are closed "
                                      "on arrival (slow or idle ones are closed on time).")
@click.option("--dry-run", is_flag=True,
              help="Passes plan and log what they would do (`would install …`) but call no "
                   "runtime and record nothing; the operator writes nothing to the cluster. "
                   "The registry still records registers and heartbeats.")
@click.option("--forget-after", type=click.FloatRange(min=0), default=30.0, show_default=True,
              metavar="DAYS",
              help="Days after which the store forgets a workspace that desired state no "
                   "longer declares and whose runtime has not reported since: its record, "
                   "the plugins pluginctl installed there, its failures and restarts. Paused "
                   "workspaces, workspaces holding a token and every declared workspace, "
                   "however long offline, are kept; failure records this old are dropped "
                   "everywhere. 0: never. (Revoked tokens are deleted a day after their "
                   "revocation, restarts once the restart budget no longer counts them.) "
                   "Checked about once an hour.")
@policy_options
def run(*, manifests: Path | None, use_kubernetes: bool, kubeconfig: str | None,
        kube_context: str | None, db: str | None, listen: str, interval: float,
        lease_namespace: str | None, leader_election: bool, identity: str | None,
        resync: float, max_connections: int, dry_run: bool, forget_after: float,
        **policy_args: Any) -> None:
    """Serve the registry API and run the periodic reconcile loop: standalone over a manifest
    directory, or as the Kubernetes operator (--kubernetes)."""
    check_one_source(manifests, use_kubernetes)
    host, port = parse_listen(listen)
    policy = dataclasses.replace(
        make_policy(**policy_args, dry_run=dry_run),
        forget_after=timedelta(days=forget_after) if forget_after else None)
    limits = Limits(max_connections=max_connections)
    metrics = Metrics()
    if manifests is not None:
        directory = manifests
        load_manifests(directory)  # fail fast on a missing directory
        sessions = open_store(db)
        serving = service.serve(manifests_mod.Source(directory), sessions, policy,
                                host=host, port=port, interval=interval,
                                replica=identity or DEFAULT_REPLICA, limits=limits,
                                metrics=metrics)
    else:
        from controller.kube import operator
        from controller.kube.leader import LeaseConfig, default_identity

        kube = kube_client(kubeconfig, kube_context)
        sessions = open_store(db)
        lease = LeaseConfig(lease_namespace or kube.default_namespace or "default") \
            if leader_election else None
        me = identity or default_identity()

        after_pass, on_failure = service.observed(metrics)

        def operator_loop(queue: WorkQueue, stop: asyncio.Event) -> Any:
            return operator.run_operator(kube, sessions, policy, interval=interval,
                                         hints=queue, stop=stop, lease=lease, identity=me,
                                         on_pass=after_pass, resync=resync,
                                         on_failure=on_failure,
                                         on_running=metrics.loop_running)

        serving = service.serve(None, sessions, policy, host=host, port=port,
                                interval=interval, loop_factory=operator_loop, limits=limits,
                                metrics=metrics)
    try:
        asyncio.run(serving)
    except OSError as error:
        raise Failure(f"cannot listen on {listen}: {error.strerror or error}") from error


# --- reconcile -------------------------------------------------------------------------------

@cli.command()
@click.option("--once", is_flag=True, help="Run one pass and exit (required).")
@manifests_option(required=False)
@kubernetes_options
@db_option
@click.option("--dry-run", is_flag=True, help="Plan only: no runtime calls, no writes.")
@click.option("--force", is_flag=True,
              help="Act even if the blast-radius guard would hold the pass.")
@output_option
@policy_options
def reconcile(*, once: bool, manifests: Path | None, use_kubernetes: bool,
              kubeconfig: str | None, kube_context: str | None, db: str | None,
              dry_run: bool, force: bool, output: str, **policy_args: Any) -> None:
    """One pass over every online workspace, then exit.

    Exit 0: every online workspace is in sync afterwards. Exit 2: out of sync (dry run: drift
    found; otherwise some actions failed, are backing off or are held). Exit 1: could not run.
    With --kubernetes the pass also updates Workspace status, Events and token Secrets.
    """
    if not once:
        raise click.UsageError("reconcile runs exactly one pass: add --once "
                               "(use `pluginctl run` for the periodic loop)")
    check_one_source(manifests, use_kubernetes)
    policy = make_policy(**policy_args)
    errors: list[str] = []
    if manifests is not None:
        desired = load_manifests(manifests)
        errors = [str(e) for e in desired.errors]
        for error in errors:
            click.echo(f"error: {error}", err=True)
    kube = kube_client(kubeconfig, kube_context) if use_kubernetes else None
    sessions = open_store(db)

    async def one_pass() -> PassReport:
        with progress_bar() as progress:
            async with RuntimeDriver.for_policy(policy) as driver:
                if kube is not None:
                    from controller.kube.once import reconcile_cluster_once

                    return await reconcile_cluster_once(kube, sessions, policy, driver,
                                                        dry_run=dry_run, progress=progress,
                                                        force=force)
                return await reconcile_once(desired, sessions, driver, policy, dry_run=dry_run,
                                            progress=progress, force=force)

    report = asyncio.run(one_pass())
    if output == "json":
        click.echo(json.dumps(report_json(report), indent=2))
    else:
        print_report(report)
    if kube is not None:
        errors = [str(e) for e in report.manifest_errors]
        for error in errors:
            click.echo(f"error: {error}", err=True)
    if errors:
        raise Failure(f"{len(errors)} desired-state error(s); the other workspaces were "
                      "reconciled")
    sys.exit(EXIT_OK if report.in_sync else EXIT_DRIFT)


@contextlib.contextmanager
def progress_bar() -> Iterator[Callable[[int, int], None] | None]:
    """A progress bar on stderr when it is a terminal and the pass is long enough to want one."""
    if not sys.stderr.isatty():
        yield None
        return
    bars: list[Any] = []

    def update(done: int, total: int) -> None:
        if not bars:
            if total < 20:
                return
            bar = click.progressbar(length=total, label="reconciling", file=sys.stderr,
                                    show_pos=True, show_eta=True)
            bar.__enter__()
            bars.append(bar)
        bars[0].update(done - bars[0].pos)  # calls may come in batches

    try:
        yield update
    finally:
        for bar in bars:
            bar.__exit__(None, None, None)


def _result_lines(result: WorkspaceResult, *, dry_run: bool) -> list[str]:
    lines = []
    if dry_run:
        lines += [f"would {action}" for action in result.planned]
    else:
        for outcome in result.outcomes:
            verdict = "ok" if outcome.ok else f"FAILED: {outcome.message}"
            lines.append(f"{outcome.action.describe()}: {verdict}")
    lines += [f"waiting until {when(w.until)}: {w.reason}" if w.until else
              f"refused {w.key}: {w.reason}" for w in result.waits]
    if result.restart_pending and not dry_run:
        lines.append("restart pending")
    if result.error:
        lines.append(f"error: {result.error}")
    return lines or ["in sync"]


def print_report(report: PassReport) -> None:
    rows = []
    for result in report.results:
        for index, line in enumerate(_result_lines(result, dry_run=report.dry_run)):
            rows.append([result.workspace_id if index == 0 else "", line])
    for invalid in report.invalid:
        rows.append([invalid.workspace_id, f"invalid desired state: {invalid.error}"])
    if rows:
        click.echo(table(["WORKSPACE", "ACTIONS"], rows))
    click.echo(report.summary())


def report_json(report: PassReport) -> dict[str, Any]:
    from controller.domain.models import ActionKind

    def result(r: WorkspaceResult) -> dict[str, Any]:
        return {
            "workspace_id": r.workspace_id,
            "in_sync": (all(p.in_sync for p in r.plans) if report.dry_run else r.in_sync),
            "planned": [_action_json(a) for p in r.plans for a in p.actions],
            "outcomes": [
                {**_action_json(o.action), "ok": o.ok, "message": o.message,
                 "restart_required": o.restart_required}
                for o in r.outcomes
            ],
            "waits": [{"kind": w.kind.value, "key": w.key, "until": iso(w.until),
                       "reason": w.reason} for w in r.waits],
            "restart_pending": r.restart_pending,
            "error": r.error,
        }

    return {
        "dry_run": report.dry_run,
        "in_sync": report.in_sync,
        "started_at": iso(report.started_at),
        "finished_at": iso(report.finished_at),
        "summary": {
            "online": report.online,
            "recognised_in_sync": report.synced,
            "installed": report.count(ActionKind.INSTALL),
            "removed": report.count(ActionKind.REMOVE),
            "restarted": report.count(ActionKind.RESTART),
            "failed": report.failed,
            "waiting": report.waiting,
            "held": sum(1 for r in report.results if r.restart_pending),
            "guard": None if report.guard is None else str(report.guard),
            "held_by_guard": report.guarded,
            "invalid": len(report.invalid),
            "skipped": {phase.value: n for phase, n in report.skipped.items()},
        },
        "workspaces": [result(r) for r in report.results],
        "invalid": [{"workspace_id": d.workspace_id, "object": d.object_ref, "error": d.error}
                    for d in report.invalid],
        "manifest_errors": [str(e) for e in report.manifest_errors],
    }


def _action_json(action: Any) -> dict[str, Any]:
    plugin: Plugin | None = action.plugin
    return {"action": action.kind.value, "plugin": plugin.name if plugin else None,
            "source": plugin.source if plugin else None, "reason": action.reason}


# --- plan and apply --------------------------------------------------------------------------

@cli.command("plan")
@manifests_option(required=False)
@kubernetes_options
@db_option
@output_option
@policy_options
def plan_command(*, manifests: Path | None, use_kubernetes: bool, kubeconfig: str | None,
                 kube_context: str | None, db: str | None, output: str,
                 **policy_args: Any) -> None:
    """The actions a pass would take now, for `pluginctl apply` to perform later:
    `pluginctl plan -o json > plan.json`. Nothing is called or written.

    Each workspace's actions carry a fingerprint of the state they were planned against;
    apply refuses if any has changed. Exit 0: nothing to do. Exit 2: actions planned (or
    waits, or invalid workspaces). Exit 1: could not run."""
    from controller.engine.plans import make_plan, plan_json

    policy = make_policy(**policy_args)
    desired = desired_state(manifests, use_kubernetes, kubeconfig, kube_context)
    for error in desired.errors:
        click.echo(f"error: {error}", err=True)
    sessions = open_store(db)
    plan = asyncio.run(make_plan(desired, sessions, policy))
    if output == "json":
        click.echo(json.dumps(plan_json(plan), indent=2))
    else:
        rows = []
        for planned in plan.workspaces:
            lines = [a.describe() for a in planned.actions] + [
                f"waiting: {w.reason}" for w in planned.waits]
            rows += [[planned.workspace_id if i == 0 else "", line]
                     for i, line in enumerate(lines)]
        rows += [[d.workspace_id, f"invalid desired state: {d.error}"] for d in plan.invalid]
        if rows:
            click.echo(table(["WORKSPACE", "PLANNED"], rows))
        acting = sum(1 for w in plan.workspaces if w.actions)
        click.echo(f"{plan.online} online, {plan.actions} action(s) on {acting} workspace(s)"
                   + (f"; the blast-radius guard would hold it: it {plan.guard} "
                      "(apply --force to act anyway)" if plan.guard else ""))
        if plan.actions:
            click.echo("save it with `pluginctl plan -o json > plan.json`, then "
                       "`pluginctl apply plan.json`")
    sys.exit(EXIT_DRIFT if plan.workspaces or plan.invalid else EXIT_OK)


@cli.command("apply")
@click.argument("plan_file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@manifests_option(required=False)
@kubernetes_options
@db_option
@click.option("--dry-run", is_flag=True,
              help="Check the plan against the current state and show what would be done; "
                   "no runtime calls, no writes.")
@click.option("--force", is_flag=True,
              help="Apply a plan the blast-radius guard held.")
@output_option
@policy_options
def apply_command(*, plan_file: Path, manifests: Path | None, use_kubernetes: bool,
                  kubeconfig: str | None, kube_context: str | None, db: str | None,
                  dry_run: bool, force: bool, output: str, **policy_args: Any) -> None:
    """Perform exactly the actions of a plan written by `pluginctl plan -o json` (PLAN_FILE,
    or - for stdin), with the same source of desired state.

    Refuses, and does nothing, when the state any workspace was planned against has changed
    (desired state, its runtime's report, or another pass acted on it), when a replica is
    acting on one of them, or when the blast-radius guard held the plan (unless --force). A
    restart an install asks for is left pending for the next pass (only planned restarts
    happen). Exit 0: every action succeeded. Exit 2: some failed. Exit 1: refused or could
    not run."""
    from controller.engine.plans import PlanError, apply_plan, read_plan

    policy = make_policy(**policy_args)
    try:
        text = sys.stdin.read() if str(plan_file) == "-" else plan_file.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise Failure(f"cannot read {plan_file}: {error}") from error
    desired = desired_state(manifests, use_kubernetes, kubeconfig, kube_context)
    sessions = open_store(db)

    async def apply() -> PassReport:
        plan = read_plan(text, str(plan_file))
        async with RuntimeDriver.for_policy(policy) as driver:
            return await apply_plan(desired, sessions, driver, policy, plan=plan,
                                    dry_run=dry_run, force=force)

    try:
        report = asyncio.run(apply())
    except PlanError as error:
        raise Failure(str(error)) from error
    if output == "json":
        click.echo(json.dumps(report_json(report), indent=2))
    else:
        print_report(report)
    sys.exit(EXIT_DRIFT if report.failed else EXIT_OK)
