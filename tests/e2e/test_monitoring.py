"""The Grafana dashboard and the alert rules in manifests/monitoring only use metrics that
pluginctl exports, and parse as what they claim to be (the rules by Prometheus's own
`promtool`; tests/e2e/test_prometheus.py evaluates them in a running Prometheus)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import yaml

from controller.engine.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[2] / "manifests" / "monitoring"
METRIC = re.compile(r"\bpluginctl_[a-z_]+")


def exported() -> set[str]:
    """Every series name the metrics can have (a labelled histogram shows none until used,
    the fleet gauges none on a replica that does not report them)."""
    names = set()
    for family in Metrics().described():
        suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}.get(
            family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def test_dashboard_panels_query_exported_metrics() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(expressions) >= 10
    used = {name for expr in expressions for name in METRIC.findall(expr)}
    assert used and used <= exported(), used - exported()
    assert "pluginctl_oldest_reconcile_age_seconds" in used


def test_alert_rules_use_exported_metrics() -> None:
    rules = yaml.safe_load((MONITORING / "alert-rules.yaml").read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"PluginctlFleetNotConverged", "PluginctlCoverageStale",
            "PluginctlWorkspaceStalled"} <= names
    used = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    assert used <= exported(), used - exported()
    assert all(rule.get("for") and rule["labels"]["severity"] for rule in rules)


def test_promtool_accepts_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian's `prometheus` package; .ci/run " \
        "installs it)"
    checked = subprocess.run([promtool, "check", "rules", str(MONITORING / "alert-rules.yaml")],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_does_not_add_up_fleet_gauges_over_replicas() -> None:
    """Each fleet gauge counts the whole fleet; with several replicas, summing them over
    replicas would count it twice at a hand-over."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    fleet = ("pluginctl_workspaces", "pluginctl_drifted_workspaces",
             "pluginctl_stalled_workspaces", "pluginctl_guard_holding",
             "pluginctl_oldest_reconcile_age_seconds")
    for expr in (t["expr"] for p in dashboard["panels"] for t in p["targets"]):
        if any(name in expr for name in fleet):
            assert not expr.startswith("sum"), expr
