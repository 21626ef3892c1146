"""The Grafana dashboard and the alert rules in manifests/monitoring only use metrics that
pluginctl exports, and parse as what they claim to be."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from controller.engine.metrics import Metrics

MONITORING = Path(__file__).resolve().parents[2] / "manifests" / "monitoring"
METRIC = re.compile(r"\bpluginctl_[a-z_]+")


def exported() -> set[str]:
    """Every series name the metrics can have (a labelled histogram shows none until used)."""
    names = set()
    for family in Metrics().registry.collect():
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
