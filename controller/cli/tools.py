"""Commands around the controller: the reference runtime (`agent`), `bench`, `soak` and
the `demo`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

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
from controller.models import InvalidSpec, Plugin, derive_plugin_name
from controller.render import table

log = logging.getLogger("pluginctl")


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

    host, port = parse_listen(listen)
    try:
        plugins = [Plugin(derive_plugin_name(s), s) for s in preinstalled]
    except InvalidSpec as error:
        raise click.BadParameter(str(error), param_hint="--plugin") from error
    runtime = ReferenceRuntime(
        workspace_id_arg(workspace_id), registry_url=registry, token=token, host=host, port=port,
        plugins=plugins, report=not no_report, heartbeat_interval=heartbeat_interval,
        controller_secret=read_secret(controller_secret_file, "--controller-secret-file"),
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
