"""What every `pluginctl` command shares: the command group, exit codes, the options for
the database, desired state, policy and output, logging, and formatting helpers."""

from __future__ import annotations

import importlib
import json
import logging
import sys
import warnings
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import click

from controller.domain.desired import Desired
from controller.domain.models import InvalidSpec, Policy, Unavailable, check_workspace_id, utcnow
from controller.domain.networks import RuntimeNetworks
from controller.domain.planner import GUARD_MIN_REMOVALS
from controller.domain.version import version_line
from controller.engine import manifests as manifests_mod

if TYPE_CHECKING:  # SQLAlchemy loads with the first command that opens the store, so that
    # `kubectl pluginctl`, which never does, starts without it.
    from controller.store import Sessions

EXIT_OK, EXIT_ERROR, EXIT_DRIFT = 0, 1, 2


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
        click.option("--backoff-base", type=click.FloatRange(min=0.1), default=5.0,
                     show_default=True, metavar="SECONDS",
                     help="Wait before the first retry of a failed action; it doubles with "
                          "each failure in a row, up to 10 minutes."),
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
                *, restart_budget: int, runtime_networks: str = "",
                workspace_timeout: float | None = None,
                runtime_secret_file: Path | None = None, allow_unpinned: bool = False,
                runtime_secret_per_workspace: bool = False, max_removal_share: float = 0.25,
                max_workspaces: int = 0, dry_run: bool = False,
                backoff_base: float = 5.0) -> Policy:
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
                  runtime_secret=read_secret(runtime_secret_file, "--runtime-secret-file"),
                  max_removal_share=max_removal_share, max_workspaces=max_workspaces,
                  dry_run=dry_run, backoff_base=timedelta(seconds=backoff_base))


def read_secret(path: Path | None, option: str) -> str | None:
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
    from controller.store import database_url, ensure_schema, make_engine, make_sessions

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
    debug = logging.getLogger().isEnabledFor(logging.DEBUG)
    # kopf says a line per object and handler run ("Handler 'workspace_event' succeeded.")
    # and narrates its start, and urllib3 warns on every request to an API server whose TLS
    # is not verified (the operator says that once, at start): all of it only at debug.
    logging.getLogger("kopf").setLevel(logging.NOTSET if debug else logging.WARNING)
    if not debug:
        warnings.filterwarnings("ignore", message="Unverified HTTPS request")


def _print_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(version_line())
        ctx.exit()


#: Which module of `controller.cli` adds each command: `pluginctl status` loads the store and
#: the status code, not the registry server or the Kubernetes client it does not use.
COMMAND_MODULES = {
    "agent": "tools", "apply": "loop", "bench": "tools", "db": "admin", "demo": "tools",
    "digest": "tools", "explain": "inspection", "plan": "loop", "reconcile": "loop",
    "rollout": "rollout", "run": "loop", "soak": "tools", "status": "inspection",
    "token": "admin", "workspace": "admin",
}


class LazyGroup(click.Group):
    """A command group whose commands are imported when asked for (`COMMAND_MODULES`)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(COMMAND_MODULES))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMAND_MODULES:
            importlib.import_module(f"controller.cli.{COMMAND_MODULES[cmd_name]}")
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="Print the version (and Python's) and exit.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              default="info", show_default=True)
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, envvar="PLUGINCTL_LOG_FORMAT",
              help="json: one object per line, with workspace, plugin, action, trigger and "
                   "result as fields of their own.")
def cli(log_level: str, log_format: str) -> None:
    """Keeps the plugins of every online agent workspace exactly as declared."""
    setup_logging(log_level, log_format=log_format)


# --- where desired state comes from, where to listen --------------------------------------

def parse_listen(value: str) -> tuple[str, int]:
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


def check_one_source(manifests: Path | None, use_kubernetes: bool) -> None:
    if (manifests is None) == (not use_kubernetes):
        raise click.UsageError("give exactly one source of desired state: --manifests DIR "
                               "or --kubernetes")


def kube_client(kubeconfig: str | None, context: str | None) -> Any:
    from controller.kube.client import KubeClient

    return KubeClient(kubeconfig, context)


def desired_state(manifests: Path | None, use_kubernetes: bool, kubeconfig: str | None,
                  kube_context: str | None) -> Desired:
    """Desired state from the one source given: a manifest directory or the cluster."""
    check_one_source(manifests, use_kubernetes)
    if manifests is not None:
        return load_manifests(manifests)
    from controller.kube.client import KubeError
    from controller.kube.view import ClusterView

    kube = kube_client(kubeconfig, kube_context)
    try:
        return ClusterView.listed(kube).desired()
    except KubeError as error:
        raise Failure(f"cannot list Workspaces and WorkspaceTemplates: {error}") from error


# --- arguments --------------------------------------------------------------------------------

def workspace_id_arg(value: str) -> str:
    try:
        return check_workspace_id(value)
    except InvalidSpec as error:
        raise click.BadParameter(str(error)) from error


# --- formatting --------------------------------------------------------------------------------

def iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def when(value: datetime) -> str:
    seconds = (value - utcnow()).total_seconds()
    if seconds <= 0:
        return "now"
    return f"in {seconds:.0f}s" if seconds < 120 else f"in {seconds / 60:.0f}m"


def clip(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: every way of not being able to run ends in one line and exit 1 (click's
    usage errors included, so that exit 2 always means "out of sync")."""
    run_group(cli, argv, prog_name="pluginctl")


def run_group(group: click.Group, argv: Sequence[str] | None, *, prog_name: str) -> None:
    """Run a command group with pluginctl's exit codes (`main`; `kubectl pluginctl`)."""
    try:
        group.main(args=list(argv) if argv is not None else None, prog_name=prog_name,
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
