"""Prometheus metrics of one pluginctl process (prometheus-client), served at `/metrics` on
the registry's listen address. Fed by the loop's pass reports and the registry's requests;
nothing here is read back by the controller.

Per-process series (passes, actions, requests, build info) are this replica's own: sum them.
The fleet gauges (workspaces by phase, drifted, stalled, guard holding, and each template's
rollout) describe the whole fleet as a full pass saw it, and every replica's full pass sees
the whole fleet: so only one replica at a time exports them, the reporter (service.serve ties
it to a role in the store), and a replica that runs no passes (an operator's standby)
exports neither them nor the coverage gauge."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from controller.domain.models import Phase
from controller.domain.rollout import RolloutPhase, Summary
from controller.domain.version import python_version, version
from controller.engine.queue import Trigger

if TYPE_CHECKING:
    from controller.engine.report import PassReport

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

FULL_PASS_TRIGGERS = (Trigger.PERIODIC, Trigger.HINT_STORM)  # passes over every workspace
PHASES = (Phase.ONLINE, Phase.INVALID, Phase.SUSPENDED, Phase.UNMANAGED)

WORKSPACES_HELP = ("Workspaces the last full pass saw, by phase: Online, Invalid, Suspended, "
                   "Unmanaged (offline and dormant ones are not read by a pass). Exported by "
                   "one replica at a time.")
DRIFTED_HELP = ("Online workspaces not as declared after the last full pass (failing, backing "
                "off, refused, awaiting or held from a restart, held by the blast-radius "
                "guard, or invalid). Exported by one replica at a time.")
STALLED_HELP = ("Online workspaces not as declared after the last full pass that made no "
                "progress in it (nothing succeeded: backing off, failing again, refused, held "
                "by the guard or the restart budget, or invalid). Exported by one replica at "
                "a time.")
GUARD_HELP = ("1 while the blast-radius guard holds passes (they would remove too many "
              "plugins or act on too many workspaces; nothing is done until the change is "
              "fixed or a forced pass runs), else 0. Exported by one replica at a time.")
COVERAGE_HELP = ("Age of the least recently reconciled online workspace: every full pass "
                 "looks at every online workspace, so this is the time since this replica's "
                 "last finished full pass began (since its loop started, before the first "
                 "one). Absent on a replica that runs no passes (an operator's standby).")
REPORTER_HELP = ("1 on the one replica that exports the fleet gauges (workspaces, drifted, "
                 "stalled, guard holding, rollouts), else 0.")
BUILD_HELP = ("Always 1; its labels say which build this replica runs: the package version "
              "and the Python version.")

_ROLLOUT = ("One series per template (namespace/name) with spec.rollout or a rollout in "
            "flight, as the last full pass left it; gone with the template. Exported by one "
            "replica at a time.")
ROLLOUT_WAVE_HELP = ("Waves of the template's rollout let through to its new revision: 1 is "
                     "the first wave, up to the number of steps; 0 when no rollout is in "
                     "flight (complete, or aborted: every workspace on the stable revision). "
                     + _ROLLOUT)
ROLLOUT_WAVES_HELP = "Waves of the template's spec.rollout (its steps). " + _ROLLOUT
ROLLOUT_HALTED_HELP = ("1 while the template's rollout is halted (too many unhealthy "
                       "workspaces in the waves let through; no further wave until `pluginctl "
                       "rollout resume` or `abort`), else 0. " + _ROLLOUT)
ROLLOUT_WORKSPACES_HELP = "Valid workspaces of the template (all its waves). " + _ROLLOUT
ROLLOUT_UPDATED_HELP = ("Workspaces of the template on its rollout's new revision (the waves "
                        "let through); 0 when no rollout is in flight. " + _ROLLOUT)
ROLLOUT_HEALTHY_HELP = ("Of the updated workspaces, those the last full pass found in sync "
                        "and healthy (judged while the rollout progresses only: 0 when it is "
                        "halted, complete or aborted). " + _ROLLOUT)


@dataclass(frozen=True)
class FleetSeen:
    """What the last full pass saw of the whole fleet."""

    phases: dict[Phase, int]
    drifted: int
    stalled: int
    rollouts: tuple[Summary, ...] = ()  # by template; none from a dry run


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.reconciles = Counter(
            "pluginctl_reconcile", "Passes, by result: in_sync (every online workspace as "
            "declared afterwards), out_of_sync, or error (the pass could not run).",
            ["result", "trigger"], registry=self.registry)
        self.reconcile_time = Histogram(
            "pluginctl_reconcile_time_seconds", "Duration of one pass.",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry)
        self.actions = Counter(
            "pluginctl_plugin_actions", "Runtime actions performed, by action, result and "
            "trigger: what started it (periodic, registry, manual, template-change, hint-storm) "
            "or retry (the action failed before).",
            ["action", "result", "trigger"], registry=self.registry)
        self.requests = Counter(
            "pluginctl_registry_requests", "Registry API requests by endpoint and status code.",
            ["endpoint", "code"], registry=self.registry)
        self.request_seconds = Histogram(
            "pluginctl_registry_request_seconds", "Registry API request duration.",
            ["endpoint"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
            registry=self.registry)
        self._request_children: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.build_info = Gauge("pluginctl_build_info", BUILD_HELP, ["version", "python"],
                                registry=self.registry)
        self.build_info.labels(version(), python_version()).set(1)
        # A process alone on its store reports; serve() makes it hold the role for that.
        self.reporter = True
        self.fleet: FleetSeen | None = None  # from the last full pass, while the loop runs
        self.guard_holding = False
        self.running_since: float | None = None  # monotonic; None: this replica runs no loop
        self.last_full_pass: float | None = None  # monotonic start of the last full pass
        self.fleet_changed: Callable[[], None] | None = None  # called when `fleet` comes or goes
        self.registry.register(_FleetCollector(self))

    def loop_running(self, running: bool) -> None:
        """The loop started (standalone, or the operator became the leader) or stopped (it
        lost the leadership, or the process stops): a replica that runs no passes has no
        coverage, and its last view of the fleet is stale."""
        self.running_since = time.monotonic() if running else None
        self.last_full_pass = None
        self.fleet = None
        self.guard_holding = False
        if self.fleet_changed is not None:
            self.fleet_changed()

    @property
    def running(self) -> bool:
        return self.running_since is not None

    def oldest_reconcile_age(self) -> float | None:
        """The coverage gauge's value; None while this replica runs no loop."""
        if self.running_since is None:
            return None
        return time.monotonic() - (self.last_full_pass or self.running_since)

    @property
    def reporting(self) -> bool:
        """Whether the fleet gauges are exported now."""
        return self.reporter and self.fleet is not None

    def observe_pass(self, report: PassReport, trigger: Trigger) -> None:
        seconds = (report.finished_at - report.started_at).total_seconds()
        self.reconcile_time.observe(seconds)
        self.reconciles.labels("in_sync" if report.in_sync else "out_of_sync", trigger.value).inc()
        for result in report.results:
            for outcome in result.outcomes:
                self.actions.labels(outcome.action.kind.value, "ok" if outcome.ok else
                                    "failed", result.trigger_of(outcome.action).value).inc()
        if trigger in FULL_PASS_TRIGGERS and report.scope is None:
            self.last_full_pass = time.monotonic() - seconds
            # Only what a pass sees: offline and dormant workspaces are not even read.
            phases = dict.fromkeys(PHASES, 0)
            phases[Phase.ONLINE] = report.online
            phases[Phase.INVALID] = len(report.invalid)
            for phase, count in report.skipped.items():
                phases[phase] = phases.get(phase, 0) + count
            first = self.fleet is None
            self.fleet = FleetSeen(phases=phases, drifted=report.drifted,
                                   stalled=report.stalled,
                                   rollouts=self._rollouts_after(report))
            if first and self.fleet_changed is not None:
                self.fleet_changed()

        if report.guard is not None:
            self.guard_holding = True
        elif report.scope is None:
            self.guard_holding = False

    def _rollouts_after(self, report: PassReport) -> tuple[Summary, ...]:
        """The templates' rollouts after a full pass: those it reports (a dry run moves none
        on: none). A template it does not report is gone, and so are its series; unless some
        object could not be read, which may be that template: then its last one stays."""
        if report.dry_run:
            return ()
        seen = {summary.template: summary for summary in report.rollouts}
        if report.manifest_errors and self.fleet is not None:
            for summary in self.fleet.rollouts:
                seen.setdefault(summary.template, summary)
        return tuple(seen[template] for template in sorted(seen))

    def observe_failed_pass(self, trigger: Trigger) -> None:
        self.reconciles.labels("error", trigger.value).inc()

    def observe_request(self, endpoint: str, code: int, seconds: float) -> None:
        # The labelled children are looked up once per (endpoint, code), not per request:
        # `.labels()` takes a lock and builds a key on every call of the heartbeat's hot path.
        children = self._request_children.get((endpoint, code))
        if children is None:
            children = self._request_children[(endpoint, code)] = (
                self.requests.labels(endpoint, str(code)), self.request_seconds.labels(endpoint))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def described(self) -> list[Metric]:
        """Every family this can export, with no samples (some are absent at times)."""
        return [*self.reconciles.describe(), *self.reconcile_time.describe(),
                *self.actions.describe(), *self.requests.describe(),
                *self.request_seconds.describe(), *self.build_info.describe(), *_families(),
                *_rollout_families()]


class _FleetCollector(Collector):
    """The gauges that may be absent: a Gauge of prometheus-client always shows a value."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> Iterator[Metric]:
        yield from _families()
        yield from _rollout_families()

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        workspaces, drifted, stalled, guard, coverage, reporter = _families()
        reporter.add_metric([], 1.0 if metrics.reporting else 0.0)
        yield reporter
        age = metrics.oldest_reconcile_age()
        if age is not None:
            coverage.add_metric([], age)
            yield coverage
        fleet = metrics.fleet
        if fleet is None or not metrics.reporting:
            return
        for phase, count in fleet.phases.items():
            workspaces.add_metric([phase.value], count)
        drifted.add_metric([], fleet.drifted)
        stalled.add_metric([], fleet.stalled)
        guard.add_metric([], 1.0 if metrics.guard_holding else 0.0)
        yield from (workspaces, drifted, stalled, guard)
        if fleet.rollouts:
            yield from _rollout_samples(fleet.rollouts)


def _rollout_samples(summaries: tuple[Summary, ...]) -> tuple[GaugeMetricFamily, ...]:
    families = _rollout_families()
    wave, waves, halted, total, updated, healthy = families
    for summary in summaries:
        current, labels = summary.rollout, [summary.template]
        let_through = current.target is not None and current.phase in (
            RolloutPhase.PROGRESSING, RolloutPhase.HALTED)
        wave.add_metric(labels, current.wave + 1 if let_through else 0)
        waves.add_metric(labels, len(summary.steps))
        halted.add_metric(labels, 1.0 if current.phase is RolloutPhase.HALTED else 0.0)
        total.add_metric(labels, summary.total)
        updated.add_metric(labels, summary.updated)
        # The pass judged the waves before it moved the rollout on: the pass that completes
        # or halts it judged workspaces it no longer counts as updated, or halted on them.
        healthy.add_metric(labels, summary.healthy
                           if current.phase is RolloutPhase.PROGRESSING else 0)
    return families


def _families() -> tuple[GaugeMetricFamily, ...]:
    return (GaugeMetricFamily("pluginctl_workspaces", WORKSPACES_HELP, labels=["phase"]),
            GaugeMetricFamily("pluginctl_drifted_workspaces", DRIFTED_HELP),
            GaugeMetricFamily("pluginctl_stalled_workspaces", STALLED_HELP),
            GaugeMetricFamily("pluginctl_guard_holding", GUARD_HELP),
            GaugeMetricFamily("pluginctl_oldest_reconcile_age_seconds", COVERAGE_HELP),
            GaugeMetricFamily("pluginctl_fleet_reporter", REPORTER_HELP))


def _rollout_families() -> tuple[GaugeMetricFamily, ...]:
    labels = ["template"]
    return (GaugeMetricFamily("pluginctl_rollout_wave", ROLLOUT_WAVE_HELP, labels=labels),
            GaugeMetricFamily("pluginctl_rollout_waves", ROLLOUT_WAVES_HELP, labels=labels),
            GaugeMetricFamily("pluginctl_rollout_halted", ROLLOUT_HALTED_HELP, labels=labels),
            GaugeMetricFamily("pluginctl_rollout_workspaces", ROLLOUT_WORKSPACES_HELP,
                              labels=labels),
            GaugeMetricFamily("pluginctl_rollout_updated_workspaces", ROLLOUT_UPDATED_HELP,
                              labels=labels),
            GaugeMetricFamily("pluginctl_rollout_healthy_workspaces", ROLLOUT_HEALTHY_HELP,
                              labels=labels))
