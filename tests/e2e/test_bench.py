"""`pluginctl bench` runs end to end at tiny sizes, on SQLite and PostgreSQL, and reports
every figure beside a baseline that was really measured, with figures that agree with each
other and with what was simulated. (The machinery, not the speed: the README keeps the
full-size figures.)"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from controller.sim import bench, wrk

CONVERGE = 10
SINGLES = 5
NOOP_SIZES = (50, 200)
MEMORY = 200


def assert_ratio(reported: float, value: float, baseline: float) -> None:
    """A reported ratio is value / baseline, up to the rounding of the printed figures; the
    baseline must have been measured (a positive, finite time or rate)."""
    assert math.isfinite(baseline) and baseline > 0, baseline
    assert math.isfinite(value) and value > 0, value
    assert math.isclose(reported, value / baseline, rel_tol=0.005, abs_tol=0.006), \
        (reported, value, baseline)


def check_noop(noop: list[dict[str, Any]]) -> None:
    assert {(e["database"], e["workspaces"]) for e in noop} == {
        (database, n) for database in ("sqlite", "postgresql") for n in NOOP_SIZES}
    for entry in noop:
        assert entry["queries_per_pass"] == 1  # steady state: one light query, whatever N
        assert entry["runtime_calls"] == 0
        assert entry["baseline"]["naive_queries"] == 2 * entry["workspaces"]
        assert_ratio(entry["speedup_vs_naive"], entry["baseline"]["naive_seconds"],
                     entry["pass_seconds"])
        assert entry["first_pass_seconds"] >= entry["pass_seconds"]  # the best of three


def check_heartbeat(heartbeat: list[dict[str, Any]], *, by_wrk: bool) -> None:
    for entry in heartbeat:
        assert entry["load_generator"].startswith("wrk" if by_wrk else "python")
        assert entry["errors"] == 0 and entry["requests"] > 0
        # Every heartbeat the load generator saw answered, the registry counted (/metrics);
        # wrk leaves the requests in flight when its time is up uncounted (one a connection
        # at most), which the registry may still have answered: so does the unmeasured
        # warm-up run before it, whose last requests may be counted after the count was read.
        slack = 2 * entry["connections"] if by_wrk else 0
        assert entry["requests"] <= entry["registry_counted_ok"] <= entry["requests"] + slack
        assert entry["p50_ms"] <= entry["p99_ms"]
        bare = entry["baseline"]["bare_endpoint"]
        assert bare["errors"] == 0 and bare["requests"] > 0
        assert bare["p50_ms"] <= bare["p99_ms"]
        assert_ratio(entry["ratio_to_bare"], entry["requests_per_second"],
                     bare["requests_per_second"])
        # Each server's CPU time per answered request (/proc), the registry's and the bare
        # endpoint's: what bounds the rate once a server's core is full.
        for measured in (entry, bare):
            cpu = measured["server_cpu_ms_per_request"]
            assert (cpu is None) if not sys.platform.startswith("linux") else cpu >= 0


def check_converge(converge: list[dict[str, Any]]) -> None:
    assert {e["database"] for e in converge} == {"sqlite", "postgresql"}
    for entry in converge:
        assert entry["converged"] == entry["workspaces"] == CONVERGE
        assert entry["singles_converged"] == entry["single_registers"] == SINGLES
        # Each of the 3 plugins installed once on every workspace, never twice, never two
        # calls to one workspace at once.
        assert entry["installs_seen_by_runtimes"] == 3 * (CONVERGE + SINGLES)
        assert entry["overlapping_calls"] == 0
        assert (entry["per_workspace_p50_s"] <= entry["per_workspace_p99_s"]
                <= entry["seconds_to_all_converged"])
        assert entry["single_register_p50_s"] <= entry["single_register_max_s"]
        baseline = entry["baseline"]
        assert baseline["direct_installs"] == 3 * CONVERGE
        assert baseline["direct_converged"] == CONVERGE
        # Three installs one after the other on each workspace, each taking the simulated
        # latency: neither way can be faster than that.
        floor = 3 * entry["install_latency_ms"] / 1000
        assert entry["seconds_to_all_converged"] >= floor
        assert baseline["direct_installs_seconds"] >= floor
        assert_ratio(entry["ratio_to_direct"], entry["seconds_to_all_converged"],
                     baseline["direct_installs_seconds"])


def check_memory(memory: list[dict[str, Any]]) -> None:
    assert {e["database"] for e in memory} == {"sqlite", "postgresql"}
    for entry in memory:
        assert entry["online"] == entry["steady_pass_synced"] == MEMORY
        assert entry["peak_rss_mb"] >= entry["baseline_rss_mb"] > 0
        assert_ratio(entry["ratio_to_baseline"], entry["peak_rss_mb"],
                     entry["baseline_rss_mb"])


def check_agent(agent: dict[str, Any]) -> None:
    assert agent["plugins"] == 3 and agent["files_per_plugin"] == 40
    naive = agent["baseline"]["naive_clone_and_copy_seconds"]
    assert_ratio(agent["cold_ratio_to_naive"], agent["cold_cache_seconds"], naive)
    assert_ratio(agent["warm_ratio_to_naive"], agent["warm_cache_seconds"], naive)
    assert agent["already_installed_seconds"] > 0


def test_bench_reports_consistent_figures_against_measured_baselines(postgres_url: str
                                                                     ) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller", "bench", "--json",
         "--noop-sizes", ",".join(map(str, NOOP_SIZES)), "--naive-max", "200",
         "--heartbeat-workspaces", "100", "--heartbeat-seconds", "0.5", "--connections", "4",
         "--converge-workspaces", str(CONVERGE), "--memory-workspaces", str(MEMORY),
         "--single-registers", str(SINGLES),
         "--postgres", postgres_url],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    check_noop(report["noop_pass"])
    assert {e["database"] for e in report["heartbeat"]} == {"sqlite", "postgresql"}
    # .ci/run installs wrk; without it the Python client drives the load (tested below).
    check_heartbeat(report["heartbeat"], by_wrk=shutil.which("wrk") is not None)
    check_converge(report["converge"])
    check_memory(report["memory"])
    check_agent(report["agent_install"])


async def test_without_wrk_the_heartbeat_load_comes_from_the_python_client(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wrk, "available", lambda: None)
    target = bench.Target("sqlite", lambda label: f"sqlite:///{tmp_path / (label + '.db')}")
    entry = await bench.heartbeat(target, 50, 0.5, connections=4, say=lambda _line: None)
    assert entry["load_generator"].startswith("python")
    check_heartbeat([entry], by_wrk=False)
