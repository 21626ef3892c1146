"""The Grafana dashboard and the alert rules in manifests/monitoring only use metrics that
pluginctl exports, and parse as what they claim to be (the rules by Prometheus's own
`promtool`, which also unit-tests the halted-rollout alert on series of its own;
tests/e2e/test_prometheus.py evaluates them in a running Prometheus)."""

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
            "PluginctlWorkspaceStalled", "PluginctlRolloutHalted"} <= names
    used = {name for rule in rules for name in METRIC.findall(rule["expr"])}
    assert used <= exported(), used - exported()
    assert all(rule.get("for") and rule["labels"]["severity"] for rule in rules)


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is not installed (Debian's `prometheus` package; .ci/run installs it)"
    return path


def test_promtool_accepts_the_alert_rules() -> None:
    checked = subprocess.run([promtool(), "check", "rules", str(MONITORING / "alert-rules.yaml")],
                             capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_dashboard_does_not_add_up_fleet_gauges_over_replicas() -> None:
    """Each fleet gauge counts the whole fleet; with several replicas, summing them over
    replicas would count it twice at a hand-over."""
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    fleet = ("pluginctl_workspaces", "pluginctl_drifted_workspaces",
             "pluginctl_stalled_workspaces", "pluginctl_guard_holding",
             "pluginctl_oldest_reconcile_age_seconds", "pluginctl_rollout_")
    for expr in (t["expr"] for p in dashboard["panels"] for t in p["targets"]):
        if any(name in expr for name in fleet):
            assert not expr.startswith("sum"), expr


def test_the_dashboard_shows_each_templates_rollout() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    expressions = {t["expr"] for p in dashboard["panels"] for t in p["targets"]}
    for name in ("pluginctl_rollout_wave", "pluginctl_rollout_halted",
                 "pluginctl_rollout_updated_workspaces", "pluginctl_rollout_healthy_workspaces"):
        assert f"max by (template) ({name})" in expressions, name


def test_the_halted_rollout_alert_names_the_template_and_what_to_do(tmp_path: Path) -> None:
    """`promtool test rules` on the shipped rules: a rollout halted for its `for:` fires one
    alert per template (two replicas exporting it at a hand-over make no second one), a
    template that is not halted none, and a resume clears it."""
    rules = yaml.safe_load((MONITORING / "alert-rules.yaml").read_text())["groups"][0]["rules"]
    rule = next(r for r in rules if r.get("alert") == "PluginctlRolloutHalted")
    assert rule["labels"]["severity"] in ("warning", "critical")
    template = "default/research"
    annotations = {key: text.replace("{{ $labels.template }}", template)
                   for key, text in rule["annotations"].items()}
    assert template in annotations["summary"]
    for command in ("status", "resume", "abort"):
        assert f"`pluginctl rollout {command} {template}`" in annotations["description"]

    def halted(instance: str, name: str, values: str) -> dict[str, str]:
        return {"series": f'pluginctl_rollout_halted{{job="pluginctl",instance="{instance}",'
                          f'template="{name}"}}', "values": values}

    fired = [{"exp_labels": {"severity": rule["labels"]["severity"], "template": template},
              "exp_annotations": annotations}]
    (tmp_path / "rules.yaml").write_text((MONITORING / "alert-rules.yaml").read_text())
    (tmp_path / "test.yaml").write_text(yaml.safe_dump({
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            # halted from minute 2 to 7, resumed at 8; replica b reports it too at 5 and 6,
            # then no more (Prometheus marks a series that leaves a scrape stale)
            "input_series": [halted("a", template, "0 0 1 1 1 1 1 1 0 0"),
                             halted("b", template, "_ _ _ _ _ 1 1 stale _ _"),
                             halted("a", "default/coding", "0 0 0 0 0 0 0 0 0 0")],
            "alert_rule_test": [
                {"eval_time": "1m", "alertname": "PluginctlRolloutHalted", "exp_alerts": []},
                {"eval_time": "2m", "alertname": "PluginctlRolloutHalted", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "PluginctlRolloutHalted", "exp_alerts": fired},
                {"eval_time": "6m", "alertname": "PluginctlRolloutHalted", "exp_alerts": fired},
                {"eval_time": "9m", "alertname": "PluginctlRolloutHalted", "exp_alerts": []},
            ],
        }],
    }))
    tested = subprocess.run([promtool(), "test", "rules", "test.yaml"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=30)
    assert tested.returncode == 0, tested.stdout + tested.stderr
