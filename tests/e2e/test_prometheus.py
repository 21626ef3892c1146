"""The alert rules in manifests/monitoring, loaded into a real Prometheus (Debian's
`prometheus` package, installed by .ci/run) that scrapes real `pluginctl run` processes with
agents: a failing plugin, a blast-radius guard hold and a stopped controller each make the
matching alerts go pending and firing, read from Prometheus's own HTTP API. `promtool check
metrics` lints a real scrape.

The rules are loaded as they are shipped except that every `for:` is shortened to 1 s (and
Prometheus scrapes and evaluates every second), so that the test takes seconds, not the
minutes the rules wait in production."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from controller.agent.simulated import Faults, ReferenceRuntime
from controller.registry.serving import free_port
from controller.registry.tokens import issue_token
from controller.store import make_engine, make_sessions, upgrade
from tests.support.helpers import RunProcess, fleet_dir, metric, scrape, wait_for

RULES = Path(__file__).resolve().parents[2] / "manifests" / "monitoring" / "alert-rules.yaml"
FIRING = ("pending", "firing")


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is not installed (Debian's `prometheus` package; .ci/run installs it)"
    return path


class Prometheus:
    """A Prometheus of the test's own: its own data directory and a free loopback port."""

    def __init__(self, directory: Path, targets: dict[str, str]) -> None:
        directory.mkdir()
        rules = yaml.safe_load(RULES.read_text())
        for group in rules["groups"]:
            for rule in group["rules"]:
                rule["for"] = "1s"  # shortened: see the module docstring
        (directory / "rules.yaml").write_text(yaml.safe_dump(rules))
        (directory / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "900ms"},
            "rule_files": [str(directory / "rules.yaml")],
            "scrape_configs": [{
                "job_name": "pluginctl",  # the job the rules expect
                "static_configs": [{"targets": [address], "labels": {"case": case}}
                                   for case, address in targets.items()]}]}))
        self.directory = directory
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = directory / "prometheus.log"

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.directory / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.directory / 'data'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                stdout=subprocess.DEVNULL, stderr=log)

        async def ready() -> bool:
            assert self.process is not None and self.process.poll() is None, \
                f"prometheus exited: {self.log.read_text(errors='replace')[-2000:]}"
            try:
                async with aiohttp.ClientSession() as client, \
                        client.get(f"{self.url}/-/ready") as answer:
                    return answer.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(ready, "prometheus ready", 30)

    async def alerts(self) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as client, \
                client.get(f"{self.url}/api/v1/alerts") as answer:
            assert answer.status == 200
            body = await answer.json()
        assert body["status"] == "success", body
        return list(body["data"]["alerts"])

    async def rules_loaded(self) -> set[str]:
        async with aiohttp.ClientSession() as client, \
                client.get(f"{self.url}/api/v1/rules") as answer:
            body = await answer.json()
        return {rule["name"] for group in body["data"]["groups"] for rule in group["rules"]
                if rule.get("health") != "err"}

    async def active(self, name: str, states: tuple[str, ...] = FIRING,
                     **labels: str) -> bool:
        return any(alert["labels"]["alertname"] == name and alert["state"] in states
                   and all(alert["labels"].get(k) == v for k, v in labels.items())
                   for alert in await self.alerts())

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(30)


async def test_alert_rules_fire_in_a_real_prometheus(
    tmp_path: Path, runtimes: list[ReferenceRuntime],
) -> None:
    # Two controllers, each with its own store: one whose ws-2 has a plugin that fails, one
    # whose guard allows one workspace per pass while both of its workspaces need work.
    cases: dict[str, RunProcess] = {}
    tokens: dict[str, dict[str, str]] = {}
    for case, extra in (("failing", ()), ("guarded", ("--max-workspaces", "1"))):
        (tmp_path / case).mkdir()
        db = f"sqlite:///{tmp_path / case / 'pluginctl.db'}"
        engine = make_engine(db)
        upgrade(engine)
        sessions = make_sessions(engine)
        tokens[case] = {name: issue_token(sessions, name) for name in ("ws-1", "ws-2")}
        engine.dispose()
        cases[case] = RunProcess(fleet_dir(tmp_path / case, ["ws-1", "ws-2"]), db, *extra)
    prometheus = Prometheus(tmp_path / "prometheus", {
        case: run.url.removeprefix("http://") for case, run in cases.items()})

    async def agents(case: str, **faults: Faults) -> None:
        for name in ("ws-1", "ws-2"):
            runtime = ReferenceRuntime(name, registry_url=cases[case].url,
                                       heartbeat_interval=0.2, token=tokens[case][name],
                                       faults=faults.get(name) or Faults())
            runtimes.append(runtime)
            await runtime.start()
            await runtime.register()
            runtime.start_heartbeats()

    try:
        await asyncio.gather(prometheus.start(), *(run.start() for run in cases.values()))
        loaded = await wait_for(prometheus.rules_loaded, "the rules loaded", 10)
        assert {"PluginctlDown", "PluginctlNotReconciling", "PluginctlFleetNotConverged",
                "PluginctlWorkspaceStalled", "PluginctlGuardHolding"} <= loaded

        # (a) a failing plugin: drifted, then stalled (backing off).
        await agents("failing", **{"ws-2": Faults(failing_plugins={"notes"})})
        await wait_for(lambda: prometheus.active("PluginctlFleetNotConverged", ("firing",)),
                       "PluginctlFleetNotConverged firing", 30)
        await wait_for(lambda: prometheus.active("PluginctlWorkspaceStalled", ("firing",)),
                       "PluginctlWorkspaceStalled firing", 30)
        # Both controllers run and are scraped; nothing holds.
        for quiet in ("PluginctlGuardHolding", "PluginctlDown", "PluginctlNotReconciling"):
            assert not await prometheus.active(quiet), quiet

        # (b) the guard: two workspaces need work where one per pass is allowed.
        await agents("guarded")
        await wait_for(lambda: prometheus.active("PluginctlGuardHolding", ("firing",)),
                       "PluginctlGuardHolding firing", 30)
        assert metric(await scrape(cases["guarded"].url), "pluginctl_guard_holding") == 1

        # A real scrape, every fleet gauge present, passes promtool's lint.
        page = await _metrics_text(cases["failing"].url)
        assert "pluginctl_drifted_workspaces 1.0" in page
        lint = subprocess.run([tool("promtool"), "check", "metrics"], input=page.encode(),
                              capture_output=True, timeout=30)
        assert lint.returncode == 0, (lint.stdout + lint.stderr).decode()

        # (c) the controllers stop: each target down, and no replica runs passes.
        await cases["failing"].kill()
        await cases["guarded"].stop()
        for case in cases:
            await wait_for(lambda case=case: prometheus.active(  # type: ignore[misc]
                "PluginctlDown", ("firing",), case=case), f"PluginctlDown firing ({case})", 30)
        await wait_for(lambda: prometheus.active("PluginctlNotReconciling", ("firing",)),
                       "PluginctlNotReconciling firing", 30)
    finally:
        for run in cases.values():
            await run.stop()
        prometheus.stop()


async def _metrics_text(url: str) -> str:
    async with aiohttp.ClientSession() as client, client.get(f"{url}/metrics") as answer:
        assert answer.status == 200
        return await answer.text()
