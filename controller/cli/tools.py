"""Commands around the controller: the reference runtime (`agent`), `bench`, `soak` and
the `demo`."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from controller.cli.base import (
    EXIT_DRIFT,
    EXIT_ERROR,
    EXIT_OK,
    Failure,
    cli,
    manifests_option,
    parse_listen,
    read_secret,
    workspace_id_arg,
)
from controller.domain.models import InvalidSpec, Plugin, derive_plugin_name
from controller.domain.render import table

if TYPE_CHECKING:
    from controller.agent.runtime import AgentServer as AgentServerType

log = logging.getLogger("pluginctl")


# --- the agent --------------------------------------------------------------------------------

def _source_roots(values: Sequence[str]) -> dict[str, str]:
    from controller.agent.sources import DEFAULT_ROOTS

    roots = dict(DEFAULT_ROOTS)
    for value in values:
        scheme, sep, url = value.partition("=")
        if not sep or not scheme or not scheme.isalnum():
            raise click.BadParameter(f"expected SCHEME=URL, got {value!r}",
                                     param_hint="--source-root")
        if scheme == "local":
            raise click.BadParameter("local:// sources come from --local-root",
                                     param_hint="--source-root")
        if url:
            roots[scheme] = url
        else:  # SCHEME= switches a scheme off (e.g. github= on a box that must not use it)
            roots.pop(scheme, None)
    return roots


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _private_file(path: Path, option: str) -> str:
    """A secret file's text; refused if other users may read or write it."""
    import stat

    try:
        mode = path.stat().st_mode
    except OSError as error:
        raise click.BadParameter(f"cannot read {path}: {error.strerror}",
                                 param_hint=option) from error
    if mode & 0o077:
        raise click.BadParameter(
            f"{path} can be read or written by other users (mode "
            f"{stat.S_IMODE(mode):04o}); chmod 600 it", param_hint=option)
    return read_secret(path, option) or ""


def _source_credentials(path: Path | None, roots: dict[str, str]) -> dict[str, str]:
    if path is None:
        return {}
    option = "--source-credentials-file"
    headers = {}
    for number, line in enumerate(_private_file(path, option).splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        scheme, _, header = line.partition("=")
        scheme, header = scheme.strip(), header.strip()
        name, colon, value = header.partition(":")
        if not colon or not name.strip() or not value.strip() or not name.strip().isascii():
            raise click.BadParameter(f"{path} line {number}: expected SCHEME=Header-Name: value",
                                     param_hint=option)
        if not roots.get(scheme, "").startswith(("https://", "http://")):
            raise click.BadParameter(f"{path} line {number}: {scheme!r} has no http(s) "
                                     "--source-root", param_hint=option)
        headers[scheme] = header
    return headers


def read_token(token_file: Path | None) -> str:
    """The registry token from --token-file (which only its owner may read) or the
    environment; never from the command line, where `ps` shows it."""
    if token_file is None:
        token = os.environ.get("PLUGINCTL_TOKEN", "").strip()
        if not token:
            raise click.UsageError("give the registry token with --token-file FILE or the "
                                   "environment variable PLUGINCTL_TOKEN")
        return token
    return _private_file(token_file, "--token-file")


@cli.command()
@click.option("--workspace-id", required=True, envvar="PLUGINCTL_WORKSPACE_ID",
              help="The workspace this box is (env PLUGINCTL_WORKSPACE_ID).")
@click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              envvar="PLUGINCTL_TOKEN_FILE",
              help="File holding the registry token; must not be readable by other users. "
                   "Or set PLUGINCTL_TOKEN. Never on the command line.")
@click.option("--registry", default="http://127.0.0.1:8080", show_default=True, metavar="URL",
              envvar="PLUGINCTL_REGISTRY")
@click.option("--listen", default="127.0.0.1:0", show_default=True, metavar="HOST:PORT",
              help="Address of this agent's runtime API (port 0: any free port).")
@click.option("--advertise-url", default=None, metavar="URL", envvar="PLUGINCTL_ADVERTISE_URL",
              help="The URL the controller calls this agent at (default: http://HOST:PORT "
                   "of --listen), e.g. http://$(POD_IP):9090 in a pod.")
@click.option("--heartbeat-interval", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True)
@click.option("--plugins-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="PLUGINCTL_PLUGINS_DIR",
              help="Install plugins here for real (DIR/<name>/ + .complete, as the platform's "
                   "runtimes read them). Without it: a simulated runtime, in memory.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="PLUGINCTL_CACHE_DIR",
              help="Fetched repositories and trees (default: $XDG_CACHE_HOME/pluginctl/agent, "
                   "or ~/.cache/pluginctl/agent).")
@click.option("--source-root", "source_roots", multiple=True, metavar="SCHEME=URL",
              help="Where SCHEME://OWNER/REPO sources live: ROOT/OWNER/REPO.git (https://, "
                   "http://, git:// or file://). Repeatable; github=https://github.com is "
                   "built in.")
@click.option("--local-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The plugin library local://NAME[/SUB] sources are copied from.")
@click.option("--fetch-timeout", type=click.FloatRange(min=1), default=120.0,
              show_default=True, help="Seconds one plugin's fetch may take.")
@click.option("--max-plugin-bytes", type=click.IntRange(min=1), default=100 * 1024 * 1024,
              show_default=True, help="Largest plugin (sum of file sizes).")
@click.option("--max-plugin-files", type=click.IntRange(min=1), default=10_000,
              show_default=True, help="Most files and directories in one plugin.")
@click.option("--max-fetch-bytes", type=click.IntRange(min=1), default=1024 * 1024 * 1024,
              show_default=True, help="Most one git fetch may bring (the commit's whole "
                                      "tree, not only the plugin).")
@click.option("--source-credentials-file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, envvar="PLUGINCTL_SOURCE_CREDENTIALS_FILE",
              help="Lines SCHEME=HEADER (e.g. `gitea=Authorization: Bearer …`): an HTTP header "
                   "git sends to that scheme's root, for private repositories. Must not be "
                   "readable by other users.")
@click.option("--restart-command", default=None, metavar="COMMAND",
              help="Run on POST /restart (split like a shell would, run without one, with "
                   "PLUGINCTL_WORKSPACE_ID set). Without it a restart is a logged no-op.")
@click.option("--restart-timeout", type=click.FloatRange(min=1), default=60.0,
              show_default=True)
@click.option("--controller-secret-file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, envvar="PLUGINCTL_CONTROLLER_SECRET_FILE",
              help="Refuse runtime calls (401) that do not carry this secret (the "
                   "controller's --runtime-secret-file).")
@click.option("--allow-any-caller", is_flag=True,
              help="Serve the runtime API on a non-loopback address without "
                   "--controller-secret-file (only where a NetworkPolicy or firewall admits "
                   "the controller alone).")
@click.option("--register-only", is_flag=True,
              help="Register, then never heartbeat (the boot path that broke edge "
                   "triggers; for trying the loop out).")
@click.option("--no-report", is_flag=True,
              help="Simulation: do not send the plugin list with calls.")
@click.option("--lose-plugins-on-restart", is_flag=True,
              help="Simulation: forget every plugin on POST /restart, like a re-created box.")
@click.option("--install-delay", type=click.FloatRange(min=0), default=0.0,
              help="Simulation: seconds each install takes.")
@click.option("--fail-plugin", multiple=True, metavar="NAME",
              help="Simulation: installs of NAME fail.")
@click.option("--plugin", "preinstalled", multiple=True, metavar="SOURCE",
              help="Simulation: a plugin installed by the user before the controller came.")
def agent(*, workspace_id: str, token_file: Path | None, registry: str, listen: str,
          advertise_url: str | None, heartbeat_interval: float, plugins_dir: Path | None,
          cache_dir: Path | None, source_roots: Sequence[str], local_root: Path | None,
          fetch_timeout: float, max_plugin_bytes: int, max_plugin_files: int,
          max_fetch_bytes: int, source_credentials_file: Path | None,
          restart_command: str | None, restart_timeout: float,
          controller_secret_file: Path | None, allow_any_caller: bool, register_only: bool,
          no_report: bool,
          lose_plugins_on_restart: bool, install_delay: float, fail_plugin: Sequence[str],
          preinstalled: Sequence[str]) -> None:
    """Run a workspace box's agent: registers and heartbeats for the workspace, serves the
    runtime API, and installs plugins into --plugins-dir (without it: a simulated runtime
    that keeps plugins in memory, for trying things out)."""
    import shlex

    from controller.agent.runtime import AgentServer

    host, port = parse_listen(listen)
    workspace_id = workspace_id_arg(workspace_id)
    token = read_token(token_file)
    os.environ.pop("PLUGINCTL_TOKEN", None)  # nothing the agent starts inherits it
    secret = read_secret(controller_secret_file, "--controller-secret-file")
    if plugins_dir is not None and secret is None and not allow_any_caller \
            and not _loopback(host):
        raise click.UsageError(
            f"--listen {listen} lets anyone who reaches it install and remove plugins: give "
            "--controller-secret-file (the controller's secret, so only it may call), or "
            "--allow-any-caller if something else (a NetworkPolicy) keeps others out")
    options: dict[str, Any] = dict(
        registry_url=registry, token=token, host=host, port=port,
        heartbeat_interval=heartbeat_interval, controller_secret=secret,
        advertise_url=advertise_url)
    server: AgentServer
    if plugins_dir is None:
        from controller.agent.simulated import Faults, ReferenceRuntime

        try:
            plugins = [Plugin(derive_plugin_name(s), s) for s in preinstalled]
        except InvalidSpec as error:
            raise click.BadParameter(str(error), param_hint="--plugin") from error
        log.warning("no --plugins-dir: a simulated runtime that keeps plugins in memory")
        server = ReferenceRuntime(
            workspace_id, plugins=plugins, report=not no_report,
            faults=Faults(lose_plugins_on_restart=lose_plugins_on_restart,
                          install_delay=install_delay, failing_plugins=set(fail_plugin)),
            **options)
    else:
        used = [flag for flag, value in [
            ("--no-report", no_report), ("--lose-plugins-on-restart", lose_plugins_on_restart),
            ("--install-delay", install_delay), ("--fail-plugin", fail_plugin),
            ("--plugin", preinstalled)] if value]
        if used:
            raise click.UsageError(f"{', '.join(used)}: only for the simulated runtime "
                                   "(without --plugins-dir)")
        try:
            argv = tuple(shlex.split(restart_command)) if restart_command else ()
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--restart-command") from error
        if restart_command is not None and not argv:
            raise click.BadParameter("empty command", param_hint="--restart-command")
        roots = _source_roots(source_roots)
        server = _real(workspace_id, options, plugins_dir=plugins_dir, cache_dir=cache_dir,
                       roots=roots, local_root=local_root, max_fetch_bytes=max_fetch_bytes,
                       headers=_source_credentials(source_credentials_file, roots),
                       fetch_timeout=fetch_timeout, max_bytes=max_plugin_bytes,
                       max_files=max_plugin_files,
                       restart=(argv, restart_timeout) if argv else None)
    asyncio.run(_serve_agent(server, registry, heartbeats=not register_only))


def _real(workspace_id: str, options: dict[str, Any], *, plugins_dir: Path,
          cache_dir: Path | None, roots: dict[str, str], local_root: Path | None,
          max_fetch_bytes: int, headers: dict[str, str],
          fetch_timeout: float, max_bytes: int, max_files: int,
          restart: tuple[tuple[str, ...], float] | None) -> AgentServerType:

    from controller.agent.box import DiskBox, RestartCommand
    from controller.agent.disk import DiskError, PluginsDir
    from controller.agent.runtime import AgentServer
    from controller.agent.sources import FetchError, SourceConfig, Sources, git_version
    from controller.agent.tree import Limits

    if cache_dir is None:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        cache_dir = Path(base) / "pluginctl" / "agent"
    limits = Limits(max_bytes=max_bytes, max_files=max_files)
    version = git_version()
    if version is None:
        log.warning("git is not on the PATH: only local:// sources can be installed")
    elif headers and version < (2, 31):
        raise Failure("--source-credentials-file needs git 2.31 or later (it reads "
                      "GIT_CONFIG_COUNT); this is git " + ".".join(map(str, version)))
    try:
        plugins = PluginsDir(plugins_dir, limits)
        plugins.lock()
        plugins.prepare()
        sources = Sources(SourceConfig(cache_dir=cache_dir, roots=roots, local_root=local_root,
                                       fetch_timeout=fetch_timeout, limits=limits,
                                       max_fetch_bytes=max_fetch_bytes, headers=headers))
        sources.lock()
    except (DiskError, FetchError) as error:
        raise Failure(str(error)) from error
    except OSError as error:
        raise Failure(f"cannot prepare {error.filename}: {error.strerror}") from error
    box = DiskBox(plugins, sources, workspace_id,
                  RestartCommand(*restart) if restart is not None else None)
    log.info("plugins directory %s, cache %s", plugins_dir, cache_dir)
    return AgentServer(workspace_id, box, **options)


async def _serve_agent(server: AgentServerType, registry: str, *, heartbeats: bool) -> None:
    import aiohttp

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, stop.set)
    async with server:
        log.info("agent for %s serving the runtime API on %s", server.workspace_id, server.url)
        try:
            await server.register()
        except (aiohttp.ClientError, OSError) as error:
            raise Failure(f"cannot register with {registry}: {error}") from error
        log.info("registered with %s", registry)
        beats = asyncio.create_task(server.heartbeat_forever()) if heartbeats else None
        await stop.wait()
        if beats is not None:
            beats.cancel()


@cli.command()
@click.argument("directory", type=click.Path(exists=True, file_okay=False, path_type=Path))
def digest(directory: Path) -> None:
    """Print the canonical digest of a plugin tree (sha256:<64 hex>), as the agent reports
    it and as a declared `digest` pins it."""
    from controller.agent import tree

    try:
        click.echo(tree.digest(directory))
    except (OSError, tree.TreeError) as error:
        raise Failure(f"cannot digest {directory}: {error}") from error


# --- bench -------------------------------------------------------------------------------------

KUBE_BENCH_WORKSPACES = 1000  # controller.sim.kube_bench.DEFAULT_WORKSPACES: about a minute


@contextlib.contextmanager
def scratch_directory(prefix: str) -> Iterator[Path]:
    """A fresh directory for a bench's databases and process logs: removed when the bench
    succeeds, kept (and named on stderr) when it fails, so that the logs can be read."""
    import shutil
    import tempfile

    scratch = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield scratch
    except BaseException:
        click.echo(f"the bench failed; its databases and logs are kept in {scratch}", err=True)
        raise
    shutil.rmtree(scratch, ignore_errors=True)


def _bench_kubernetes(workspaces: int, *, as_json: bool) -> None:
    """`bench --kubernetes`: the operator on a real API server, vs standalone mode."""
    from controller.sim import control_plane, kube_bench

    say = functools.partial(click.echo, err=True)
    try:
        with scratch_directory("pluginctl-kube-bench-") as scratch:
            result = asyncio.run(kube_bench.run(kube_bench.Sizes(workspaces), scratch, say))
    except control_plane.KubeUnavailable as error:
        raise Failure(f"bench --kubernetes needs a control plane: {error}") from error
    if as_json:
        click.echo(json.dumps({"kubernetes": result}, indent=2))
        return
    standalone = result["baseline"]["standalone"]
    rows = [
        ["objects -> token Secrets", f"{result['created_to_secrets_seconds']} s",
         f"(creating {workspaces} took {result['create_seconds']} s)"],
        ["registers -> all installed", f"{result['registers_to_installed_seconds']} s",
         f"{result['installed_ratio_to_standalone']}x standalone "
         f"({standalone['registers_to_installed_seconds']} s)"],
        ["registers -> all Ready", f"{result['registers_to_ready_seconds']} s",
         f"{result['ready_ratio_to_standalone_installed']}x standalone installed"],
        ["template change -> all Ready", f"{result['template_change_to_ready_seconds']} s", ""],
        ["writes in steady passes", str(result["steady_pass_writes"]), "target 0"],
        ["installed more than once", str(result["installed_more_than_once"]),
         f"standalone: {standalone['installed_more_than_once']}"],
        ["operator peak RSS", f"{result['operator_peak_rss_mb']} MB",
         f"standalone: {standalone['peak_rss_mb']} MB"],
    ]
    click.echo(table(["kubernetes", f"{workspaces} Workspaces", "vs"], rows))

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
@click.option("--heartbeat-seconds", type=click.FloatRange(min=0.1), default=5.0,
              show_default=True)
@click.option("--connections", type=click.IntRange(min=1), default=32, show_default=True,
              help="Concurrent connections of the heartbeat load generator.")
@click.option("--converge-workspaces", type=click.IntRange(min=1), default=200,
              show_default=True)
@click.option("--memory-workspaces", type=click.IntRange(min=1), default=10000,
              show_default=True)
@click.option("--single-registers", type=click.IntRange(min=1), default=20, show_default=True,
              help="Workspaces registered one at a time into the converged fleet.")
@click.option("--postgres", "postgres_url", default=None, metavar="URL",
              help="A PostgreSQL server to measure on too (fresh databases are created on "
                   "it; use a throwaway server).")
@click.option("--kubernetes", "use_kubernetes", is_flag=True,
              help="Run only the Kubernetes section: the operator on a real kube-apiserver "
                   "and etcd started on loopback (from $PLUGINCTL_KUBE_BIN, or built by the "
                   "checkout's .ci/kube-binaries; needs kubectl on PATH and the "
                   "'cryptography' package), with --kube-workspaces Workspaces from one "
                   "template; baseline: standalone mode in the same run.")
@click.option("--kube-workspaces", type=click.IntRange(min=1),
              default=KUBE_BENCH_WORKSPACES, show_default=True,
              help="Workspaces of the Kubernetes section (the default takes about a minute).")
def bench(*, as_json: bool, noop_sizes: str, naive_max: int, heartbeat_workspaces: int,
          heartbeat_seconds: float, connections: int, converge_workspaces: int,
          memory_workspaces: int, single_registers: int, postgres_url: str | None,
          use_kubernetes: bool, kube_workspaces: int) -> None:
    """Measure pluginctl against naive baselines run in the same command."""
    from controller.sim import bench as bench_mod

    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger().setLevel(logging.WARNING)
    if use_kubernetes:
        _bench_kubernetes(kube_workspaces, as_json=as_json)
        return
    sizes = bench_mod.Sizes(_sizes(noop_sizes), naive_max, heartbeat_workspaces,
                            heartbeat_seconds, connections, converge_workspaces,
                            memory_workspaces, single_registers)
    with scratch_directory("pluginctl-bench-") as scratch:
        result = asyncio.run(bench_mod.run(sizes, postgres_url, scratch,
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
    agent_figures = result["agent_install"]
    rows.append(["agent_install", f"{agent_figures['plugins']} plugins",
                 f"cold {agent_figures['cold_cache_seconds']} s, warm "
                 f"{agent_figures['warm_cache_seconds']} s, no-op "
                 f"{agent_figures['already_installed_seconds']} s",
                 f"{agent_figures['cold_ratio_to_naive']}x / "
                 f"{agent_figures['warm_ratio_to_naive']}x naive"])
    click.echo(table(["MEASURE", "SIZE", "RESULT", "RATIO"], rows))


# --- soak and demo ---------------------------------------------------------------------------

SOAK_PROFILES = {"ci": (300, 150.0, 70.0, 10.0), "full": (5000, 1000.0, 600.0, 40.0)}


@cli.command()
@click.option("--profile", type=click.Choice(sorted(SOAK_PROFILES)), default="ci",
              show_default=True, help="ci: 300 workspaces, 150 heartbeats/s, 70 s of faults; "
                                      "full: 5,000 workspaces, 1,000/s, 10 minutes.")
@click.option("--workspaces", type=click.IntRange(min=2), default=None)
@click.option("--rate", type=click.FloatRange(min=1), default=None, help="Heartbeats/s.")
@click.option("--seconds", type=click.FloatRange(min=1), default=None,
              help="Seconds of faults (after the first convergence).")
@click.option("--cycle", type=click.FloatRange(min=0.5), default=None,
              help="Seconds each fault lasts (default: the profile's).")
@click.option("--postgres", metavar="URL", default=None,
              help="Soak on this PostgreSQL database (default: a temporary SQLite file).")
@click.option("--json", "as_json", is_flag=True)
def soak(*, profile: str, workspaces: int | None, rate: float | None, seconds: float | None,
         cycle: float | None, postgres: str | None, as_json: bool) -> None:
    """Run the controller under heartbeat load with faults on a schedule; exit 1 unless
    every workspace converged, none was lost, and RSS grew less than 10%."""
    from controller.sim.soak import Profile, report_lines, run_soak

    count, default_rate, default_seconds, default_cycle = SOAK_PROFILES[profile]
    chosen = Profile(workspaces or count, rate or default_rate, seconds or default_seconds,
                     cycle or default_cycle)
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
    """Publish the example plugins in real git repositories, start the registry, the loop
    and one real agent per example workspace (each on its own plugins directory in a
    temporary folder), and show them converge: one registers and never heartbeats, one has a
    plugin directory its user made, one has its box re-created, one waits for its publisher
    to push a tag; then the template moves web-search to v1.5.0."""
    from controller.sim.demo import run_demo

    if logging.getLogger().level > logging.DEBUG:  # the demo tells its own story on stdout
        logging.getLogger().setLevel(logging.WARNING)
    directory = manifests or Path("manifests/examples")
    converged = asyncio.run(run_demo(directory, seconds, db))
    sys.exit(EXIT_OK if converged else EXIT_DRIFT)
