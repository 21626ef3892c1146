"""Prometheus metrics of one pluginctl process (prometheus-client), served at `/metrics` on
the registry's listen address. Fed by the loop's pass reports and the registry's requests;
nothing here is read back by the controller."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from controller.domain.models import Phase
from controller.engine.queue import Trigger

if TYPE_CHECKING:
    from controller.engine.report import PassReport

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

FULL_PASS_TRIGGERS = (Trigger.PERIODIC, Trigger.HINT_STORM)  # passes over every workspace


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
        self.workspaces = Gauge(
            "pluginctl_workspaces", "Workspaces a full pass saw, by phase: Online, Invalid, "
            "Suspended, Unmanaged (offline and dormant ones are not read by a pass).",
            ["phase"],
            registry=self.registry)
        self.drifted = Gauge(
            "pluginctl_drifted_workspaces", "Online workspaces not as declared after the last "
            "full pass (failing, backing off, refused, awaiting or held from a restart, held "
            "by the blast-radius guard, or invalid).",
            registry=self.registry)
        self.stalled = Gauge(
            "pluginctl_stalled_workspaces", "Online workspaces not as declared after the last "
            "full pass that made no progress in it (nothing succeeded: backing off, failing "
            "again, refused, held by the guard or the restart budget, or invalid).",
            registry=self.registry)
        self.guard_holding = Gauge(
            "pluginctl_guard_holding", "1 while the blast-radius guard holds passes (they "
            "would remove too many plugins or act on too many workspaces; nothing is done "
            "until the change is fixed or a forced pass runs), else 0.", registry=self.registry)
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
        self.started = time.monotonic()
        self.last_full_pass: float | None = None  # monotonic start of the last full pass
        Gauge("pluginctl_oldest_reconcile_age_seconds",
              "Age of the least recently reconciled online workspace: every full pass looks "
              "at every online workspace, so this is the time since the last full pass that "
              "finished began (since the process started, before the first one).",
              registry=self.registry).set_function(self.oldest_reconcile_age)

    def oldest_reconcile_age(self) -> float:
        return time.monotonic() - (self.last_full_pass or self.started)

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
            counts = dict.fromkeys((Phase.SUSPENDED, Phase.UNMANAGED), 0)
            counts[Phase.ONLINE] = report.online
            counts[Phase.INVALID] = len(report.invalid)
            for phase, count in report.skipped.items():
                counts[phase] = counts.get(phase, 0) + count
            for phase, count in counts.items():
                self.workspaces.labels(phase.value).set(count)
            self.drifted.set(report.drifted)
            self.stalled.set(report.stalled)

        if report.guard is not None:
            self.guard_holding.set(1)
        elif report.scope is None:
            self.guard_holding.set(0)

    def observe_failed_pass(self, trigger: Trigger) -> None:
        self.reconciles.labels("error", trigger.value).inc()

    def observe_request(self, endpoint: str, code: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(code)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
