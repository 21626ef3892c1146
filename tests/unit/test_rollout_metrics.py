"""Which pass reports feed the rollout gauges (engine/metrics.py), and who exports them: full,
acting passes only; one series per template the last one reported; only the replica that
reports the fleet. And `pluginctl_build_info`, which every replica exports. Pure: reports are
built by hand (tests/integration/test_rollout_metrics.py scrapes real passes)."""

from __future__ import annotations

import platform
from datetime import UTC, datetime

from prometheus_client.parser import text_string_to_metric_families

from controller.domain.desired import ObjectError
from controller.domain.rollout import Revision, Rollout, RolloutPhase, Summary
from controller.domain.version import version
from controller.engine.metrics import Metrics
from controller.engine.queue import Trigger
from controller.engine.report import PassReport

NOW = datetime(2026, 1, 1, tzinfo=UTC)
STABLE, TARGET = Revision("a" * 64, ()), Revision("b" * 64, ())


def summary(template: str, phase: RolloutPhase, *, wave: int = 0, updated: int = 0,
            healthy: int = 0) -> Summary:
    target = None if phase is RolloutPhase.COMPLETE else TARGET
    return Summary(template, Rollout(template, STABLE, target, phase, wave), (5, 25, 100),
                   20, updated, healthy, (), None)


def report(*rollouts: Summary, dry_run: bool = False, scope: frozenset[str] | None = None,
           errors: tuple[ObjectError, ...] = ()) -> PassReport:
    return PassReport(started_at=NOW, finished_at=NOW, dry_run=dry_run, results=(),
                      scope=scope, rollouts=rollouts, manifest_errors=errors)


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(metrics.render().decode())
            for s in family.samples}


def rollouts(metrics: Metrics) -> dict[str, dict[str, float]]:
    """template -> {wave, waves, halted, workspaces, updated, healthy}"""
    found: dict[str, dict[str, float]] = {}
    for (name, labels), value in samples(metrics).items():
        if name.startswith("pluginctl_rollout_"):
            short = name.removeprefix("pluginctl_rollout_").removesuffix("_workspaces")
            found.setdefault(dict(labels)["template"], {})[short] = value
    return found


def test_each_template_has_its_wave_halt_and_counts() -> None:
    metrics = Metrics()
    metrics.observe_pass(report(
        summary("default/research", RolloutPhase.HALTED, wave=0, updated=1, healthy=1),
        summary("default/coding", RolloutPhase.PROGRESSING, wave=1, updated=5, healthy=4),
        summary("default/quiet", RolloutPhase.COMPLETE, wave=2),
        summary("default/undone", RolloutPhase.ABORTED, wave=1)), Trigger.PERIODIC)
    assert rollouts(metrics) == {
        # halted: the wave let through stays; healthy is judged while progressing only
        "default/research": {"wave": 1, "waves": 3, "halted": 1, "workspaces": 20,
                             "updated": 1, "healthy": 0},
        "default/coding": {"wave": 2, "waves": 3, "halted": 0, "workspaces": 20,
                           "updated": 5, "healthy": 4},
        # nothing in flight: wave 0 (whatever wave the stored rollout last reached)
        "default/quiet": {"wave": 0, "waves": 3, "halted": 0, "workspaces": 20,
                          "updated": 0, "healthy": 0},
        "default/undone": {"wave": 0, "waves": 3, "halted": 0, "workspaces": 20,
                           "updated": 0, "healthy": 0},
    }


def test_only_full_acting_passes_change_them_and_a_gone_template_goes() -> None:
    metrics = Metrics()
    halted = summary("default/research", RolloutPhase.HALTED, updated=1)
    metrics.observe_pass(report(halted, summary("default/gone", RolloutPhase.COMPLETE)),
                         Trigger.PERIODIC)
    assert set(rollouts(metrics)) == {"default/research", "default/gone"}

    metrics.observe_pass(report(), Trigger.MANUAL)  # not one of the loop's full passes
    metrics.observe_pass(report(scope=frozenset({"ws-1"})), Trigger.PERIODIC)
    assert set(rollouts(metrics)) == {"default/research", "default/gone"}

    # Some object could not be read: it may be either template, so both stay.
    unreadable = (ObjectError("fleet.yaml", "", "a document is not a mapping"),)
    metrics.observe_pass(report(errors=unreadable), Trigger.PERIODIC)
    assert set(rollouts(metrics)) == {"default/research", "default/gone"}

    metrics.observe_pass(report(halted), Trigger.HINT_STORM)
    assert set(rollouts(metrics)) == {"default/research"}

    metrics.observe_pass(report(halted, dry_run=True), Trigger.PERIODIC)  # moves nothing on
    assert rollouts(metrics) == {}


def test_only_the_reporting_replica_exports_them_and_none_once_its_loop_stops() -> None:
    metrics = Metrics()
    metrics.loop_running(True)
    metrics.observe_pass(report(summary("default/research", RolloutPhase.HALTED)),
                         Trigger.PERIODIC)
    assert rollouts(metrics)["default/research"]["halted"] == 1
    metrics.reporter = False  # another replica holds the reporter role
    assert rollouts(metrics) == {}
    metrics.reporter = True
    metrics.loop_running(False)  # the leadership lost: what its passes saw is stale
    assert rollouts(metrics) == {}


def test_every_replica_exports_its_build_info() -> None:
    metrics = Metrics()
    metrics.reporter = False
    assert samples(metrics)[("pluginctl_build_info", (
        ("python", platform.python_version()), ("version", version())))] == 1
    assert version() and version() != "0+unknown"  # the installed package's own
    described = {family.name for family in metrics.described()}
    assert {"pluginctl_build_info", "pluginctl_rollout_halted", "pluginctl_rollout_wave",
            "pluginctl_rollout_updated_workspaces",
            "pluginctl_rollout_healthy_workspaces"} <= described
