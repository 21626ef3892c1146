"""`pluginctl bench` runs end to end at tiny sizes, on SQLite and PostgreSQL, and reports
every figure beside the baseline it was measured against."""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_reports_all_sections_with_baselines(postgres_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "controller", "bench", "--json", "--noop-sizes", "50,200",
         "--naive-max", "200", "--heartbeat-workspaces", "100", "--heartbeat-seconds", "1",
         "--connections", "4", "--converge-workspaces", "10", "--memory-workspaces", "200",
         "--postgres", postgres_url],
        capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert set(report) >= {"noop_pass", "heartbeat", "converge", "memory"}

    noop = report["noop_pass"]
    assert {(e["database"], e["workspaces"]) for e in noop} == {
        ("sqlite", 50), ("sqlite", 200), ("postgresql", 50), ("postgresql", 200)}
    for entry in noop:
        assert entry["queries_per_pass"] == 1  # steady state: one light query, whatever N
        assert entry["runtime_calls"] == 0
        assert entry["baseline"]["naive_queries"] == 2 * entry["workspaces"]
        assert entry["speedup_vs_naive"] > 0
    for entry in report["heartbeat"]:
        assert entry["requests"] > 0 and entry["errors"] == 0
        assert entry["baseline"]["bare_endpoint"]["requests"] > 0
        assert entry["ratio_to_bare"] > 0
    for entry in report["converge"]:
        assert entry["converged"] == entry["workspaces"] == 10
        assert entry["ratio_to_direct"] > 0
    for entry in report["memory"]:
        assert entry["online"] == 200 and entry["peak_rss_mb"] >= entry["baseline_rss_mb"] > 0
    agent = report["agent_install"]
    assert agent["plugins"] == 3 and agent["baseline"]["naive_clone_and_copy_seconds"] > 0
    assert agent["cold_cache_seconds"] > 0 and agent["warm_cache_seconds"] > 0
