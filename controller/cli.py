"""The `pluginctl` command line: the standalone controller (`run`), one-shot passes
(`reconcile --once`), inspection (`status`), tokens, pausing, migrations, the reference
runtime (`agent`) and a demo. Exit codes: 0 in sync / done, 2 out of sync, 1 could not run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn, TextIO

import click

from controller import manifests as manifests_mod
from controller import service, status, tokens
from controller.desired import Desired
from controller.driver import RuntimeDriver
from controller.explain import Claim, Explanation, age, explain
from controller.http import Limits
from controller.metrics import Metrics
from controller.models import (
    InvalidSpec,
    Plugin,
    Policy,
    Unavailable,
    check_workspace_id,
    derive_plugin_name,
    utcnow,
)
from controller.networks import RuntimeNetworks
from controller.planner import GUARD_MIN_REMOVALS
from controller.reconciler import DEFAULT_REPLICA, PassReport, WorkspaceResult, reconcile_once
from controller.registry import issue_token
from controller.render import table
from controller.store import (
    Sessions,
    current_revision,
    database_url,
    ensure_schema,
    head_revision,
    make_engine,
    make_sessions,
    queries,
    transaction,
    upgrade,
)

EXIT_OK, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2
log = logging.getLogger("pluginctl")


class Failure(Exception):
    """Could not run: printed as one line, exit 1."""


# --- shared options --------------------------------------------------------------------------

def db_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--db", "db", metavar="URL", default=None,
        help="Database URL (env PLUGINCTL_DB; default sqlite:///pluginctl.db). "
             "PostgreSQL: postgresql+psycopg://user:pass@host/db",
    )(function)


def output_option(function: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table",
                        show_default=True, help="Output format.")(function)


allow_unpinned_option = click.option(
    "--allow-unpinned", is_flag=True, envvar="PLUGINCTL_ALLOW_UNPINNED",
    help="Install remote sources (git, gitea, github, https, ...) that carry no pinned ref "
         "(#tag or #sha; a branch such as #main is not a pin). Default: such a plugin is "
         "refused, with the reason in its status; local:// sources need no ref.")


def policy_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--offline-after", type=click.FloatRange(min=1), default=90.0,
                     show_default=True, help="Seconds without a heartbeat before a workspace "
                                             "counts as offline."),
        click.option("--concurrency", type=click.IntRange(min=1), default=16, show_default=True,
                     help="Workspaces reconciled at the same time."),
        click.option("--call-timeout", type=click.FloatRange(min=0.1), default=10.0,
                     show_default=True, help="Seconds allowed for one call to a runtime."),
        click.option("--restart-budget", type=click.IntRange(min=0), default=3,
                     show_default=True, help="Restarts allowed per workspace per hour."),
        click.option("--runtime-networks", default="", metavar="CIDR,...",
                     envvar="PLUGINCTL_RUNTIME_NETWORKS",
                     help="Only call runtimes at addresses in these networks (and refuse "
                          "registers naming others). Link-local addresses (169.254.0.0/16, "
                          "fe80::/10: cloud metadata) are refused always. Default: any other."),
        click.option("--runtime-secret-file", type=click.Path(dir_okay=False, path_type=Path),
                     default=None, envvar="PLUGINCTL_RUNTIME_SECRET_FILE",
                     help="A file holding the secret sent to runtimes as `Authorization: "
                          "Bearer …` on every call, so a runtime can refuse callers that are "
                          "not its controller."),
        click.option("--runtime-secret-per-workspace", is_flag=True,
                     envvar="PLUGINCTL_RUNTIME_SECRET_PER_WORKSPACE",
                     help="Send each runtime its own secret, derived from the one in "
                          "--runtime-secret-file and its workspace id (`pluginctl token "
                          "runtime-secret` prints it; on Kubernetes it is in the workspace's "
                          "token Secret), so a runtime that leaks its secret cannot pass for "
                          "the controller with any other runtime."),
        click.option("--workspace-timeout", type=click.FloatRange(min=1), default=None,
                     help="Seconds one workspace may take within a pass (default: 60, or 6 "
                          "call timeouts if longer). A replica's claim on a workspace lasts "
                          "twice this plus 10 s: that long a dead replica's workspaces wait."),
        allow_unpinned_option,
        click.option("--max-removal-share", type=click.FloatRange(min=0, max=1), default=0.25,
                     show_default=True,
                     help="Blast-radius guard: a pass that would remove more than this share "
                          "of the plugins on the workspaces it covers (and at least "
                          f"{GUARD_MIN_REMOVALS}) holds and reports instead of acting."),
        click.option("--max-workspaces", type=click.IntRange(min=0), default=0,
                     show_default=True,
                     help="Blast-radius guard: a pass that would act on more workspaces than "
                          "this holds and reports instead of acting (0: no limit)."),
    ]):
        function = option(function)
    return function


def make_policy(offline_after: float, concurrency: int, call_timeout: float,
                restart_budget: int, runtime_networks: str = "",
                workspace_timeout: float | None = None,
                runtime_secret_file: Path | None = None, allow_unpinned: bool = False,
                runtime_secret_per_workspace: bool = False, max_removal_share: float = 0.25,
                max_workspaces: int = 0, dry_run: bool = False) -> Policy:
    if workspace_timeout is not None and workspace_timeout < call_timeout:
        raise click.BadParameter("must be at least --call-timeout",
                                 param_hint="--workspace-timeout")
    if runtime_secret_per_workspace and runtime_secret_file is None:
        raise click.BadParameter("needs --runtime-secret-file",
                                 param_hint="--runtime-secret-per-workspace")
    try:
        networks = RuntimeNetworks.parse(runtime_networks)
    except ValueError as error:
        raise click.BadParameter(str(error), param_hint="--runtime-networks") from error
    return Policy(offline_after=timedelta(seconds=offline_after), concurrency=concurrency,
                  call_timeout=call_timeout, restart_budget=restart_budget,
                  workspace_timeout=workspace_timeout or max(60.0, call_timeout * 6),
                  runtime_networks=networks, allow_unpinned=allow_unpinned,
                  runtime_secret_per_workspace=runtime_secret_per_workspace,
                  runtime_secret=_secret(runtime_secret_file, "--runtime-secret-file"),
                  max_removal_share=max_removal_share, max_workspaces=max_workspaces,
                  dry_run=dry_run)


def _secret(path: Path | None, option: str) -> str | None:
    if path is None:
        return None
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as error:
        raise click.BadParameter(f"cannot read {path}: {error.strerror}",
                                 param_hint=option) from error
    if not secret:
        raise click.BadParameter(f"{path} is empty", param_hint=option)
    return secret


def open_store(db: str | None) -> Sessions:
    engine = make_engine(database_url(db))
    ensure_schema(engine)
    return make_sessions(engine)


def load_manifests(directory: Path) -> Desired:
    return manifests_mod.load(directory)


def manifests_option(required: bool) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "--manifests", type=click.Path(path_type=Path), required=required, metavar="DIR",
        envvar="PLUGINCTL_MANIFESTS",
        help="Directory of WorkspaceTemplate/Workspace YAML files (desired state), "
             "re-read on every pass.")


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the structured fields a record carries (workspace,
    plugin, action, trigger, result) as fields of their own."""

    FIELDS = ("workspace", "plugin", "action", "trigger", "result")

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(), "logger": record.name,
            "message": record.getMessage()}
        for name in self.FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(level: str, stream: TextIO = sys.stderr, log_format: str = "text") -> None:
    logging.basicConfig(level=level.upper(), stream=stream,
                        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    if log_format == "json":
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonLogFormatter())
    for noisy in ("aiohttp.access", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, envvar="PLUGINCTL_LOG_FORMAT",
              help="json: one object per line, with workspace, plugin, action, trigger and "
                   "result as fields of their own.")
def cli(log_level: str, log_format: str) -> None:
    """Keeps the plugins of every online agent workspace exactly as declared."""
    setup_logging(log_level, log_format=log_format)


# --- run -------------------------------------------------------------------------------------

def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise click.BadParameter(f"expected HOST:PORT, got {value!r}")
    return host or "0.0.0.0", int(port)


def kubernetes_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed([
        click.option("--kubernetes", "use_kubernetes", is_flag=True,
                     help="Desired state from the cluster's Workspace and WorkspaceTemplate "
                          "objects (kubeconfig or in-cluster config) instead of --manifests."),
        click.option("--kubeconfig", type=click.Path(dir_okay=False), default=None,
                     help="Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or the "
                          "in-cluster service account)."),
        click.option("--context", "kube_context", default=None, help="Kubeconfig context."),
    ]):
        function = option(function)
    return function


def _source_of_desired_state(manifests: Path | None, use_kubernetes: bool) -> None:
    if (manifests is None) == (not use_kubernetes):
        raise click.UsageError("give exactly one source of desired state: --manifests DIR "
                               "or --kubernetes")


def _kube(kubeconfig: str | None, context: str | None) -> Any:
    from controller.kubeapi import KubeClient

    return KubeClient(kubeconfig, context)


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
@policy_options
def run(manifests: Path | None, use_kubernetes: bool, kubeconfig: str | None,
        kube_context: str | None, db: str | None, listen: str, interval: float,
        lease_namespace: str | None, leader_election: bool, identity: str | None,
        resync: float, max_connections: int, dry_run: bool, **policy_args: Any) -> None:
    """Serve the registry API and run the periodic reconcile loop: standalone over a manifest
    directory, or as the Kubernetes operator (--kubernetes)."""
    _source_of_desired_state(manifests, use_kubernetes)
    host, port = _listen(listen)
    policy = make_policy(**policy_args, dry_run=dry_run)
    limits = Limits(max_connections=max_connections)
    metrics = Metrics()
    if manifests is not None:
        directory = manifests
        load_manifests(directory)  # fail fast on a missing directory
        sessions = open_store(db)
        serving = service.serve(manifests_mod.Source(directory), sessions, policy,
                                host, port, interval, replica=identity or DEFAULT_REPLICA,
                                limits=limits, metrics=metrics)
    else:
        from controller import operator
        from controller.leader import LeaseConfig

        kube = _kube(kubeconfig, kube_context)
        sessions = open_store(db)
        lease = LeaseConfig(lease_namespace or kube.default_namespace or "default") \
            if leader_election else None
        me = identity or operator.default_identity()

        after_pass, on_failure = service.observed(metrics)

        def operator_loop(hints: Any, stop: asyncio.Event) -> Any:
            return operator.run_operator(kube, sessions, policy, interval=interval,
                                         hints=hints, stop=stop, lease=lease, identity=me,
                                         on_pass=after_pass, resync=resync,
                                         on_failure=on_failure)

        serving = service.serve(None, sessions, policy, host, port, interval,
                                loop_factory=operator_loop, limits=limits, metrics=metrics)
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
def reconcile(once: bool, manifests: Path | None, use_kubernetes: bool,
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
    _source_of_desired_state(manifests, use_kubernetes)
    policy = make_policy(**policy_args)
    errors: list[str] = []
    if manifests is not None:
        desired = load_manifests(manifests)
        errors = [str(e) for e in desired.errors]
        for error in errors:
            click.echo(f"error: {error}", err=True)
    kube = _kube(kubeconfig, kube_context) if use_kubernetes else None
    sessions = open_store(db)

    async def one_pass() -> PassReport:
        with progress_bar() as progress:
            async with RuntimeDriver.for_policy(policy) as driver:
                if kube is not None:
                    from controller.operator import reconcile_cluster_once

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


def _result_lines(result: WorkspaceResult, dry_run: bool) -> list[str]:
    lines = []
    if dry_run:
        lines += [f"would {action}" for action in result.planned]
    else:
        for outcome in result.outcomes:
            verdict = "ok" if outcome.ok else f"FAILED: {outcome.message}"
            lines.append(f"{outcome.action.describe()}: {verdict}")
    lines += [f"waiting until {_when(w.until)}: {w.reason}" if w.until else
              f"refused {w.key}: {w.reason}" for w in result.waits]
    if result.restart_pending and not dry_run:
        lines.append("restart pending")
    if result.error:
        lines.append(f"error: {result.error}")
    return lines or ["in sync"]


def print_report(report: PassReport) -> None:
    rows = []
    for result in report.results:
        for index, line in enumerate(_result_lines(result, report.dry_run)):
            rows.append([result.workspace_id if index == 0 else "", line])
    for invalid in report.invalid:
        rows.append([invalid.workspace_id, f"invalid desired state: {invalid.error}"])
    if rows:
        click.echo(table(["WORKSPACE", "ACTIONS"], rows))
    click.echo(report.summary())


def report_json(report: PassReport) -> dict[str, Any]:
    from controller.models import ActionKind

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
            "waits": [{"kind": w.kind.value, "key": w.key, "until": _iso(w.until),
                       "reason": w.reason} for w in r.waits],
            "restart_pending": r.restart_pending,
            "error": r.error,
        }

    return {
        "dry_run": report.dry_run,
        "in_sync": report.in_sync,
        "started_at": _iso(report.started_at),
        "finished_at": _iso(report.finished_at),
        "summary": {
            "online": report.online,
            "recognised_in_sync": report.synced,
            "installed": report.count(ActionKind.INSTALL),
            "removed": report.count(ActionKind.REMOVE),
            "restarted": report.count(ActionKind.RESTART),
            "failed": report.failed,
            "waiting": report.waiting,
            "held": sum(1 for r in report.results if r.restart_pending),
            "guard": report.guard,
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
def plan_command(manifests: Path | None, use_kubernetes: bool, kubeconfig: str | None,
                 kube_context: str | None, db: str | None, output: str,
                 **policy_args: Any) -> None:
    """The actions a pass would take now, for `pluginctl apply` to perform later:
    `pluginctl plan -o json > plan.json`. Nothing is called or written.

    Each workspace's actions carry a fingerprint of the state they were planned against;
    apply refuses if any has changed. Exit 0: nothing to do. Exit 2: actions planned (or
    waits, or invalid workspaces). Exit 1: could not run."""
    from controller.plans import make_plan, plan_json

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
def apply_command(plan_file: Path, manifests: Path | None, use_kubernetes: bool,
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
    from controller.plans import PlanError, apply_plan, read_plan

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
            return await apply_plan(plan, desired, sessions, driver, policy, dry_run=dry_run,
                                    force=force)

    try:
        report = asyncio.run(apply())
    except PlanError as error:
        raise Failure(str(error)) from error
    if output == "json":
        click.echo(json.dumps(report_json(report), indent=2))
    else:
        print_report(report)
    sys.exit(EXIT_DRIFT if report.failed else EXIT_OK)


# --- status ----------------------------------------------------------------------------------

@cli.command("status")
@db_option
@manifests_option(required=False)
@output_option
@click.option("--offline-after", type=click.FloatRange(min=1), default=90.0, show_default=True)
@allow_unpinned_option
def status_command(db: str | None, manifests: Path | None, output: str,
                   offline_after: float, allow_unpinned: bool) -> None:
    """Per workspace: phase, desired vs installed, drift, last error, next retry.

    Without --manifests only what runtimes reported is known (no desired plugins)."""
    desired = load_manifests(manifests) if manifests else None
    sessions = open_store(db)
    policy = Policy(offline_after=timedelta(seconds=offline_after),
                    allow_unpinned=allow_unpinned)
    now = utcnow()
    with transaction(sessions) as session:
        observed = queries.load_observed(session, now=None, restart_window=policy.restart_window)
    wanted = dict(desired.workspaces) if desired else {}
    ids = sorted(set(observed) | set(wanted))
    statuses = [status.build(wanted.get(i), observed.get(i), now, policy,
                             desired_known=desired is not None) for i in ids]
    if desired is not None:
        statuses += [status.build(d, observed.get(d.workspace_id), now, policy)
                     for d in desired.rejected]
    if output == "json":
        click.echo(json.dumps({"workspaces": [status_json(s) for s in statuses],
                               "manifest_errors": [str(e) for e in desired.errors]
                               if desired else []}, indent=2))
        return
    rows = [[s.workspace_id, s.phase.value, f"{s.installed}/{s.desired}" if desired else "-",
             "yes" if s.in_sync else "no", ", ".join(s.drift) or "-",
             _clip(s.error or "-"), _when(s.next_retry_at) if s.next_retry_at else "-"]
            for s in statuses]
    click.echo(table(["WORKSPACE", "PHASE", "PLUGINS", "IN-SYNC", "DRIFT", "LAST ERROR",
                      "NEXT RETRY"], rows) if rows else "no workspaces")
    if desired:
        for error in desired.errors:
            click.echo(f"error: {error}", err=True)


def status_json(s: status.WorkspaceStatus) -> dict[str, Any]:
    return {
        "workspace_id": s.workspace_id,
        "object": s.object_ref,
        "template": s.template,
        "phase": s.phase.value,
        "desired": s.desired,
        "installed": s.installed,
        "in_sync": s.in_sync,
        "drift": list(s.drift),
        "plugins": [{"name": p.name, "source": p.source, "state": p.state.value,
                     "message": p.message, "attempts": p.attempts,
                     "next_retry_at": _iso(p.next_retry_at)} for p in s.plugins],
        "last_error": s.error,
        "next_retry_at": _iso(s.next_retry_at),
        "restart_pending": s.restart_pending,
        "restarts_left": s.restarts_left,
        "last_seen_at": _iso(s.last_seen_at),
        "report_at": _iso(s.report_at),
    }


# --- explain ---------------------------------------------------------------------------------

def desired_state(manifests: Path | None, use_kubernetes: bool, kubeconfig: str | None,
                  kube_context: str | None) -> Desired:
    """Desired state from the one source given: a manifest directory or the cluster."""
    _source_of_desired_state(manifests, use_kubernetes)
    if manifests is not None:
        return load_manifests(manifests)
    from controller.kubeapi import KubeError
    from controller.operator import ClusterView

    kube = _kube(kubeconfig, kube_context)
    try:
        return ClusterView.listed(kube).desired()
    except KubeError as error:
        raise Failure(f"cannot list Workspaces and WorkspaceTemplates: {error}") from error


@cli.command("explain")
@click.argument("workspace_id", callback=lambda _c, _p, value: _workspace_id(value))
@manifests_option(required=False)
@kubernetes_options
@db_option
@output_option
@click.option("--offline-after", type=click.FloatRange(min=1), default=90.0, show_default=True)
@click.option("--restart-budget", type=click.IntRange(min=0), default=3, show_default=True)
@allow_unpinned_option
def explain_command(workspace_id: str, manifests: Path | None, use_kubernetes: bool,
                    kubeconfig: str | None, kube_context: str | None, db: str | None,
                    output: str, offline_after: float, restart_budget: int,
                    allow_unpinned: bool) -> None:
    """Why WORKSPACE_ID is or is not in sync: which template or Workspace entry declares each
    plugin, what its runtime last reported and when, what pluginctl owns, the last error, the
    next retry, the restart budget left, and what the next pass would do.

    Exit 0: in sync. Exit 2: not in sync. Exit 1: no such workspace, or could not run."""
    desired = desired_state(manifests, use_kubernetes, kubeconfig, kube_context)
    sessions = open_store(db)
    policy = Policy(offline_after=timedelta(seconds=offline_after),
                    restart_budget=restart_budget, allow_unpinned=allow_unpinned)
    wanted = desired.workspaces.get(workspace_id) or next(
        (d for d in desired.rejected if d.workspace_id == workspace_id), None)
    with transaction(sessions) as session:
        seen = queries.load_observed(session, restart_window=policy.restart_window,
                                     only=[workspace_id]).get(workspace_id)
        held = queries.claim_of(session, workspace_id)
    if wanted is None and seen is None:
        raise Failure(f"no workspace {workspace_id}: no Workspace declares it and no runtime "
                      "has registered it")
    now = utcnow()
    found = explain(wanted, seen, now, policy, Claim(*held) if held is not None else None)
    if output == "json":
        click.echo(json.dumps(explanation_json(found), indent=2))
    else:
        click.echo(explanation_text(found, now))
    sys.exit(EXIT_OK if found.in_sync else EXIT_DRIFT)


def explanation_text(found: Explanation, now: datetime) -> str:
    def ago(value: datetime | None) -> str:
        return f"{age(value, now)} ago ({value:%Y-%m-%d %H:%M:%S} UTC)" if value else "never"

    origin = ", ".join(part for part in (
        found.object_ref and f"object {found.object_ref}",
        found.template and f"template {found.template}") if part)
    lines = [
        f"Workspace:      {found.workspace_id}" + (f" ({origin})" if origin else ""),
        f"Phase:          {found.phase.value}",
        f"In sync:        {'yes' if found.in_sync else 'no'}",
        f"Why:            {found.verdict}",
        f"Runtime:        {found.url or '-'}",
        f"Registered:     {ago(found.registered_at)}",
        f"Last heartbeat: {ago(found.last_seen_at)}",
        f"Last report:    {ago(found.report_at)}",
        "Acting replica: " + (f"{found.claim.replica} (claim runs out {_when(found.claim.until)})"
                              if found.claim else "none"),
        f"Restarts:       {found.restarts_used} of {found.restart_budget} used in the last "
        f"hour, {max(0, found.restart_budget - found.restarts_used)} left"
        + (f"; the oldest leaves the window {_when(found.restart_budget_frees_at)}"
           if found.restart_budget_frees_at else "")
        + ("; a restart is pending" if found.restart_pending else ""),
    ]
    if found.runtime_error:
        lines.append(f"Runtime error:  {found.runtime_error}" + (
            f" (next try {_when(found.runtime_next_retry_at)})"
            if found.runtime_next_retry_at else ""))
    lines.append("")
    if found.plugins:
        rows = [[p.name, p.declared_by or "not declared",
                 p.installed.source if p.installed else "-", p.owner, p.state,
                 p.message or "-", str(p.failures) if p.failures else "-",
                 _when(p.next_retry_at) if p.next_retry_at else "-"] for p in found.plugins]
        lines.append(table(["PLUGIN", "DECLARED BY", "INSTALLED", "OWNER", "STATE", "DETAIL",
                            "FAILURES", "NEXT RETRY"], rows))
    else:
        lines.append("No plugins declared or reported.")
    lines += ["", "Next pass:"] + [f"  {line}" for line in found.next_pass]
    return "\n".join(lines)


def explanation_json(found: Explanation) -> dict[str, Any]:
    return {
        "workspace_id": found.workspace_id, "object": found.object_ref,
        "template": found.template, "phase": found.phase.value, "in_sync": found.in_sync,
        "why": found.verdict, "url": found.url,
        "registered_at": _iso(found.registered_at), "last_seen_at": _iso(found.last_seen_at),
        "report_at": _iso(found.report_at),
        "plugins": [{"name": p.name, "declared_by": p.declared_by,
                     "wanted": p.wanted.to_json() if p.wanted else None,
                     "installed": p.installed.to_json() if p.installed else None,
                     "owner": p.owner, "state": p.state, "message": p.message,
                     "failures": p.failures, "next_retry_at": _iso(p.next_retry_at)}
                    for p in found.plugins],
        "runtime_error": found.runtime_error,
        "runtime_next_retry_at": _iso(found.runtime_next_retry_at),
        "restart_pending": found.restart_pending,
        "restarts_used": found.restarts_used, "restart_budget": found.restart_budget,
        "restarts_left": max(0, found.restart_budget - found.restarts_used),
        "restart_budget_frees_at": _iso(found.restart_budget_frees_at),
        "acting_replica": ({"replica": found.claim.replica, "until": _iso(found.claim.until)}
                           if found.claim else None),
        "next_pass": list(found.next_pass),
    }


# --- tokens, pause/resume, db ----------------------------------------------------------------

def _workspace_id(value: str) -> str:
    try:
        return check_workspace_id(value)
    except InvalidSpec as error:
        raise click.BadParameter(str(error)) from error


@cli.group()
def token() -> None:
    """Registry tokens (one or more per workspace)."""


@token.command("create")
@click.argument("workspace_id")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def token_create(workspace_id: str, db: str | None, dry_run: bool) -> None:
    """Create a token for WORKSPACE_ID and print it once; only its hash is stored."""
    workspace_id = _workspace_id(workspace_id)
    sessions = open_store(db)
    if dry_run:
        with transaction(sessions) as session:
            live = sum(1 for *_, revoked, _ in queries.tokens_of(session, workspace_id)
                       if revoked is None)
        click.echo(f"would create a token for workspace {workspace_id} (it has {live} live)")
        return
    secret = issue_token(sessions, workspace_id)
    click.echo(secret)
    if sys.stderr.isatty():
        click.echo("Store this token now: it is not shown again.", err=True)


@token.command("runtime-secret")
@click.argument("workspace_id")
@click.option("--runtime-secret-file", type=click.Path(dir_okay=False, path_type=Path),
              required=True, envvar="PLUGINCTL_RUNTIME_SECRET_FILE",
              help="The controller's secret (as given to `run --runtime-secret-file`).")
def token_runtime_secret(workspace_id: str, runtime_secret_file: Path) -> None:
    """Print the secret the controller sends WORKSPACE_ID's runtime with
    --runtime-secret-per-workspace (for `pluginctl agent --controller-secret-file`)."""
    try:
        check_workspace_id(workspace_id)
    except InvalidSpec as error:
        raise Failure(str(error)) from error
    secret = _secret(runtime_secret_file, "--runtime-secret-file")
    assert secret is not None
    click.echo(tokens.runtime_secret_for(secret, workspace_id))


@token.command("list")
@click.argument("workspace_id")
@db_option
@output_option
def token_list(workspace_id: str, db: str | None, output: str) -> None:
    """List WORKSPACE_ID's tokens by fingerprint (the start of the stored hash)."""
    with transaction(open_store(db)) as session:
        found = queries.tokens_of(session, _workspace_id(workspace_id))
    if output == "json":
        click.echo(json.dumps({"workspace_id": workspace_id, "tokens": [
            {"fingerprint": tokens.fingerprint(token_hash), "created": created.isoformat(),
             "revoked": None if revoked is None else revoked.isoformat(), "issuer": issuer}
            for token_hash, created, revoked, issuer in found]}, indent=2))
        return
    click.echo(table(["FINGERPRINT", "CREATED", "REVOKED", "ISSUER"], [
        [tokens.fingerprint(token_hash), created.isoformat(timespec="seconds"),
         "-" if revoked is None else revoked.isoformat(timespec="seconds"), issuer]
        for token_hash, created, revoked, issuer in found]))


@token.command("revoke")
@click.argument("workspace_id")
@click.option("--fingerprint", "fingerprints", multiple=True, metavar="FP",
              help="A fingerprint from `pluginctl token list` (repeatable).")
@click.option("--token-stdin", is_flag=True,
              help="Read the token itself from standard input (never from the command line, "
                   "where it would land in shell history and process lists).")
@click.option("--all", "revoke_all", is_flag=True, help="Every token of the workspace.")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def token_revoke(workspace_id: str, fingerprints: tuple[str, ...], token_stdin: bool,
                 revoke_all: bool, db: str | None, dry_run: bool) -> None:
    """Revoke tokens of WORKSPACE_ID. Every registry replica refuses them within a second.

    To rotate without downtime: `token create` a second token, give it to the runtime, then
    revoke the old one by its fingerprint."""
    workspace_id = _workspace_id(workspace_id)
    if sum((bool(fingerprints), token_stdin, revoke_all)) != 1:
        raise click.UsageError("say which tokens: --fingerprint FP, --token-stdin or --all")
    sessions = open_store(db)
    with transaction(sessions) as session:
        live = {h for h, _, revoked, _ in queries.tokens_of(session, workspace_id)
                if revoked is None}
        if revoke_all:
            chosen = live
        elif token_stdin:
            digest = tokens.digest(sys.stdin.read().strip())
            if digest not in live:
                raise Failure(f"that token is not a live token of workspace {workspace_id}")
            chosen = {digest}
        else:
            chosen = set()
            for wanted in fingerprints:
                matches = {h for h in live if h.startswith(wanted.lower())}
                if len(wanted) < 8 or len(matches) != 1:
                    raise Failure(f"fingerprint {wanted!r} names {len(matches)} live tokens of "
                                  f"workspace {workspace_id} (give at least 8 characters of "
                                  "one shown by `pluginctl token list`)")
                chosen |= matches
        if dry_run:
            shown = ", ".join(sorted(tokens.fingerprint(h) for h in chosen)) or "none"
            click.echo(f"would revoke {len(chosen)} token(s) of workspace {workspace_id}: "
                       f"{shown}")
            return
        revoked = queries.revoke_tokens(session, chosen, utcnow())
    click.echo(f"revoked {revoked} token(s) of workspace {workspace_id}")


@cli.group()
def workspace() -> None:
    """Pause or resume the loop for one workspace."""


@workspace.command("pause")
@click.argument("workspace_id")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def workspace_pause(workspace_id: str, db: str | None, dry_run: bool) -> None:
    """Make WORKSPACE_ID dormant: no calls until `resume`, whatever its runtime reports."""
    _set_dormant(workspace_id, db, True, dry_run)


@workspace.command("resume")
@click.argument("workspace_id")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def workspace_resume(workspace_id: str, db: str | None, dry_run: bool) -> None:
    """Undo `pause`: WORKSPACE_ID is reconciled again when online."""
    _set_dormant(workspace_id, db, False, dry_run)


def _set_dormant(workspace_id: str, db: str | None, dormant: bool, dry_run: bool) -> None:
    workspace_id = _workspace_id(workspace_id)
    verb = "paused (dormant)" if dormant else "resumed"
    with transaction(open_store(db)) as session:
        if dry_run:
            seen = queries.load_observed(session, only=[workspace_id]).get(workspace_id)
            now = "unknown to the store" if seen is None else \
                "dormant" if seen.dormant else "active"
            click.echo(f"workspace {workspace_id} would be {verb} (now {now})")
            return
        queries.set_dormant(session, workspace_id, dormant)
    click.echo(f"workspace {workspace_id} {verb}")


@cli.group("db")
def db_group() -> None:
    """Database schema."""


@db_group.command("upgrade")
@db_option
@click.option("--dry-run", is_flag=True, help="Say what would be done; change nothing.")
def db_upgrade(db: str | None, dry_run: bool) -> None:
    """Migrate the database to this version's schema (safe to run from several replicas)."""
    engine = make_engine(database_url(db))
    if dry_run:
        current, head = current_revision(engine), head_revision()
        click.echo(f"database already at revision {head}" if current == head else
                   f"would upgrade the database from {current or 'empty'} to revision {head}")
        return
    before, after = upgrade(engine)
    if before == after:
        click.echo(f"database already at revision {after}")
    else:
        click.echo(f"database upgraded from {before or 'empty'} to revision {after}")


# --- the reference runtime -------------------------------------------------------------------

@cli.command()
@click.option("--workspace-id", required=True)
@click.option("--token", envvar="PLUGINCTL_TOKEN", required=True,
              help="Registry token (env PLUGINCTL_TOKEN).")
@click.option("--registry", default="http://127.0.0.1:8080", show_default=True, metavar="URL")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Address of this runtime's API (port 0: any free port).")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True)
@click.option("--register-only", is_flag=True,
              help="Register, then never heartbeat (the boot path that broke edge triggers).")
@click.option("--no-report", is_flag=True, help="Do not send the plugin list with calls.")
@click.option("--lose-plugins-on-restart", is_flag=True,
              help="Forget every plugin on POST /restart, like a re-created box.")
@click.option("--install-delay", type=click.FloatRange(min=0), default=0.0,
              help="Seconds each install takes.")
@click.option("--fail-plugin", multiple=True, metavar="NAME", help="Installs of NAME fail.")
@click.option("--plugin", "preinstalled", multiple=True, metavar="SOURCE",
              help="A plugin installed by the user before the controller came.")
@click.option("--controller-secret-file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, envvar="PLUGINCTL_CONTROLLER_SECRET_FILE",
              help="Refuse runtime calls (401) that do not carry this secret (the "
                   "controller's --runtime-secret-file).")
def agent(workspace_id: str, token: str, registry: str, listen: str, heartbeat_interval: float,
          register_only: bool, no_report: bool, lose_plugins_on_restart: bool,
          install_delay: float, fail_plugin: Sequence[str], preinstalled: Sequence[str],
          controller_secret_file: Path | None) -> None:
    """Run the reference workspace runtime: serves the runtime API, registers, heartbeats."""
    from controller.agent import Faults, ReferenceRuntime

    host, port = _listen(listen)
    try:
        plugins = [Plugin(derive_plugin_name(s), s) for s in preinstalled]
    except InvalidSpec as error:
        raise click.BadParameter(str(error), param_hint="--plugin") from error
    runtime = ReferenceRuntime(
        _workspace_id(workspace_id), registry_url=registry, token=token, host=host, port=port,
        plugins=plugins, report=not no_report, heartbeat_interval=heartbeat_interval,
        controller_secret=_secret(controller_secret_file, "--controller-secret-file"),
        faults=Faults(lose_plugins_on_restart=lose_plugins_on_restart,
                      install_delay=install_delay, failing_plugins=set(fail_plugin)),
    )

    async def main() -> None:
        import aiohttp

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signum, stop.set)
        async with runtime:
            log.info("runtime %s serving on %s", workspace_id, runtime.url)
            try:
                await runtime.register()
            except (aiohttp.ClientError, OSError) as error:
                raise Failure(f"cannot register with {registry}: {error}") from error
            log.info("registered with %s", registry)
            beats = None if register_only else asyncio.create_task(runtime.heartbeat_forever())
            await stop.wait()
            if beats is not None:
                beats.cancel()

    asyncio.run(main())


# --- bench -------------------------------------------------------------------------------------

def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(part) for part in value.split(",") if part.strip()]
    except ValueError as error:
        raise click.BadParameter(f"expected numbers separated by commas, got {value!r}") from error
    if not sizes or min(sizes) < 1:
        raise click.BadParameter("sizes must be positive")
    return sizes


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout instead of a table.")
@click.option("--noop-sizes", default="1000,10000", show_default=True,
              help="Fleet sizes for the no-op pass (e.g. 1000,10000,100000).")
@click.option("--naive-max", type=click.IntRange(min=0), default=10000, show_default=True,
              help="Largest size the naive per-workspace baseline runs at.")
@click.option("--heartbeat-workspaces", type=click.IntRange(min=1), default=10000,
              show_default=True)
@click.option("--heartbeat-seconds", type=click.FloatRange(min=1), default=5.0,
              show_default=True)
@click.option("--connections", type=click.IntRange(min=1), default=32, show_default=True,
              help="Concurrent connections of the heartbeat load generator.")
@click.option("--converge-workspaces", type=click.IntRange(min=1), default=200,
              show_default=True)
@click.option("--memory-workspaces", type=click.IntRange(min=1), default=10000,
              show_default=True)
@click.option("--postgres", "postgres_url", default=None, metavar="URL",
              help="A PostgreSQL server to measure on too (fresh databases are created on "
                   "it; use a throwaway server).")
def bench(as_json: bool, noop_sizes: str, naive_max: int, heartbeat_workspaces: int,
          heartbeat_seconds: float, connections: int, converge_workspaces: int,
          memory_workspaces: int, postgres_url: str | None) -> None:
    """Measure pluginctl against naive baselines run in the same command."""
    import tempfile

    from controller import bench as bench_mod

    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger().setLevel(logging.WARNING)
    sizes = bench_mod.Sizes(_sizes(noop_sizes), naive_max, heartbeat_workspaces,
                            heartbeat_seconds, connections, converge_workspaces,
                            memory_workspaces)
    with tempfile.TemporaryDirectory(prefix="pluginctl-bench-") as scratch:
        result = asyncio.run(bench_mod.run(sizes, postgres_url, Path(scratch),
                                           lambda line: click.echo(line, err=True)))
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    rows = []
    for entry in result["noop_pass"]:
        rows.append([f"noop_pass/{entry['database']}", f"{entry['workspaces']} ws",
                     f"{entry['pass_seconds']} s, {entry['queries_per_pass']} queries",
                     f"{entry.get('speedup_vs_naive', '-')}x vs naive"])
    for entry in result["heartbeat"]:
        rows.append([f"heartbeat/{entry['database']}", f"{entry['workspaces']} ws",
                     f"{entry['requests_per_second']}/s p50 {entry['p50_ms']} ms "
                     f"p99 {entry['p99_ms']} ms", f"{entry['ratio_to_bare']} of bare"])
    for entry in result["converge"]:
        rows.append([f"converge/{entry['database']}", f"{entry['workspaces']} ws",
                     f"{entry['seconds_to_all_converged']} s, p50 "
                     f"{entry['per_workspace_p50_s']} s, p99 {entry['per_workspace_p99_s']} s",
                     f"{entry['ratio_to_direct']}x direct"])
    for entry in result["memory"]:
        rows.append([f"memory/{entry['database']}", f"{entry['workspaces']} ws",
                     f"peak {entry['peak_rss_mb']} MB",
                     f"{entry['ratio_to_baseline']}x empty"])
    click.echo(table(["MEASURE", "SIZE", "RESULT", "RATIO"], rows))


# --- demo ------------------------------------------------------------------------------------

SOAK_PROFILES = {"ci": (300, 150.0, 70.0, 10.0), "full": (5000, 1000.0, 600.0, 40.0)}


@cli.command()
@click.option("--profile", type=click.Choice(sorted(SOAK_PROFILES)), default="ci",
              show_default=True, help="ci: 300 workspaces, 150 heartbeats/s, 70 s of faults; "
                                      "full: 5,000 workspaces, 1,000/s, 10 minutes.")
@click.option("--workspaces", type=click.IntRange(min=2), default=None)
@click.option("--rate", type=click.FloatRange(min=1), default=None, help="Heartbeats/s.")
@click.option("--seconds", type=click.FloatRange(min=1), default=None,
              help="Seconds of faults (after the first convergence).")
@click.option("--postgres", metavar="URL", default=None,
              help="Soak on this PostgreSQL database (default: a temporary SQLite file).")
@click.option("--json", "as_json", is_flag=True)
def soak(profile: str, workspaces: int | None, rate: float | None, seconds: float | None,
         postgres: str | None, as_json: bool) -> None:
    """Run the controller under heartbeat load with faults on a schedule; exit 1 unless
    every workspace converged, none was lost, and RSS grew less than 10%."""
    from controller.soak import Profile, report_lines, run_soak

    count, default_rate, default_seconds, cycle = SOAK_PROFILES[profile]
    chosen = Profile(workspaces or count, rate or default_rate, seconds or default_seconds,
                     cycle)
    say = (lambda _line: None) if as_json else (lambda line: click.echo(line, err=True))
    figures = asyncio.run(run_soak(chosen, say, postgres))
    click.echo(json.dumps(figures, indent=2) if as_json else "\n".join(report_lines(figures)))
    if not figures["passed"]:
        raise SystemExit(EXIT_ERROR)


@cli.command()
@manifests_option(required=False)
@click.option("--seconds", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Give up (exit 2) if the fleet has not converged by then.")
@click.option("--db", default=None, metavar="URL",
              help="Database URL (default: a fresh SQLite file in a temporary directory).")
def demo(manifests: Path | None, seconds: float, db: str | None) -> None:
    """Start the registry, the loop and one reference runtime per example workspace, and
    show them converge: one registers and never heartbeats, one had a plugin installed by
    its user, one loses its plugins when restarted."""
    from controller.demo import run_demo

    if logging.getLogger().level > logging.DEBUG:  # the demo tells its own story on stdout
        logging.getLogger().setLevel(logging.WARNING)
    directory = manifests or Path("manifests/examples")
    converged = asyncio.run(run_demo(directory, seconds, db))
    sys.exit(EXIT_OK if converged else EXIT_DRIFT)


# --- formatting --------------------------------------------------------------------------------

def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _when(value: datetime) -> str:
    seconds = (value - utcnow()).total_seconds()
    if seconds <= 0:
        return "now"
    return f"in {seconds:.0f}s" if seconds < 120 else f"in {seconds / 60:.0f}m"


def _clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: every way of not being able to run ends in one line and exit 1 (click's
    usage errors included, so that exit 2 always means "out of sync")."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="pluginctl",
                 standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.UsageError as error:
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx else ""
        fail(f"{error.format_message()}{hint}")
    except click.ClickException as error:
        fail(error.format_message())
    except click.Abort:
        fail("aborted")
    except (Failure, Unavailable) as error:
        fail(str(error))
