"""The rollout's pure rules (domain/rollout): spec validation, deterministic waves, wave
health and bake, the halt, and a person's commands."""

from __future__ import annotations

import dataclasses
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from controller.domain import rollout
from controller.domain.models import InvalidSpec, Plugin
from controller.domain.rollout import Health, Revision, RolloutPhase, RolloutSpec
from tests.support.helpers import desired_from, workspace_yaml

T0 = datetime(2026, 1, 1, tzinfo=UTC)
V1 = Revision.of([Plugin("notes", "local://plugins/notes")])
V2 = Revision.of([*V1.plugins, Plugin("calendar", "local://plugins/calendar")])
SPEC = RolloutSpec((10, 50, 100), timedelta(seconds=300), 1)


@pytest.mark.parametrize(("steps", "message"), [
    ((5, 25), "must end at 100"),
    ((50, 25, 100), "strictly increasing"),
    ((0, 100), "between 1 and 100"),
    ((), "must end at 100"),
])
def test_bad_steps_are_refused_with_the_reason(steps: tuple[int, ...], message: str) -> None:
    with pytest.raises(InvalidSpec, match=message):
        RolloutSpec(steps, timedelta(0), 0)


def test_a_template_with_bad_steps_is_invalid_for_every_workspace_using_it() -> None:
    desired = desired_from("""
apiVersion: pluginctl.dev/v1alpha1
kind: WorkspaceTemplate
metadata: {name: base}
spec:
  rollout: {steps: [50, 25]}
  plugins: [{source: local://plugins/notes}]
""", workspace_yaml("ws-1"))
    assert "rollout.steps must end at 100" in (desired.workspaces["ws-1"].error or "")


def test_waves_are_a_stable_hash_order_cut_by_percent() -> None:
    ids = [f"ws-{i}" for i in range(200)]
    order = rollout.wave_order("default/base", V2.digest, ids)
    assert order == rollout.wave_order("default/base", V2.digest, list(reversed(ids)))
    assert order != rollout.wave_order("default/base", V1.digest, ids)  # per revision
    assert [rollout.wave_size(200, SPEC.steps, w) for w in range(3)] == [20, 100, 200]
    assert rollout.wave_size(3, SPEC.steps, 0) == 1  # never an empty first wave
    started = rollout.observe(rollout.observe(None, template="default/base", current=V1,
                                              spec=SPEC, now=T0),
                              template="default/base", current=V2, spec=SPEC, now=T0)
    assert rollout.on_target(started, SPEC, ids) == frozenset(order[:20])
    # A workspace added during the rollout takes the place its hash gives it; those let
    # through before (stored) stay, whoever joins or leaves.
    first = rollout.on_target(started, SPEC, ids)
    late = [f"late-{i}" for i in range(200)]
    early = [w for w in late if rollout.wave_order("default/base", V2.digest, [*ids, w]
                                                   ).index(w) < 20]
    assert early, "some late workspace sorts into the first wave"
    grown = rollout.on_target(started, SPEC, [*ids, *late], kept=first)
    assert grown >= first and set(early) & grown
    # A fleet that shrinks cuts its waves smaller: by hash order alone, five of the first
    # wave would go back to the stable revision; those let through stay.
    others = [w for w in ids if w not in first]
    fewer = [w for w in ids if w not in others[:50]]
    assert len(first - rollout.on_target(started, SPEC, fewer)) == 5
    assert rollout.on_target(started, SPEC, fewer, kept=first) == first
    assert rollout.on_target(started, SPEC, ids[1:], kept=first) >= first - {ids[0]}
    halted = dataclasses.replace(started, phase=RolloutPhase.HALTED)
    assert rollout.on_target(halted, SPEC, [*ids, *late], kept=first) == first


def test_first_sight_is_stable_and_a_new_revision_starts_a_rollout() -> None:
    first = rollout.observe(None, template="t", current=V1, spec=SPEC, now=T0)
    assert first.phase is RolloutPhase.COMPLETE and first.target is None
    unmanaged = rollout.observe(first, template="t", current=V2, spec=None, now=T0)
    assert unmanaged.stable == V2 and unmanaged.target is None  # no spec.rollout: at once
    started = rollout.observe(first, template="t", current=V2, spec=SPEC, now=T0)
    assert started.phase is RolloutPhase.PROGRESSING and started.target == V2
    assert started.stable == V1 and started.wave == 0
    back = rollout.observe(started, template="t", current=V1, spec=SPEC, now=T0)
    assert back.phase is RolloutPhase.COMPLETE and back.target is None  # reverted edit


def test_a_healthy_wave_waits_for_its_bake_then_the_next_starts() -> None:
    started = rollout.observe(rollout.observe(None, template="t", current=V1, spec=SPEC,
                                              now=T0), template="t", current=V2, spec=SPEC,
                              now=T0)
    healthy = {"a": Health(True), "b": Health(True)}
    baking = rollout.evaluate(started, SPEC, healthy, total=10, now=T0)
    assert baking.healthy_since == T0 and baking.wave == 0
    assert rollout.bake_left(baking, SPEC, T0 + timedelta(seconds=100)) == timedelta(
        seconds=200)
    not_yet = rollout.evaluate(baking, SPEC, healthy, total=10, now=T0 + timedelta(seconds=299))
    assert not_yet.wave == 0
    # Out of sync for a moment: the bake starts again.
    reset = rollout.evaluate(baking, SPEC, {"a": Health(False)}, total=10,
                             now=T0 + timedelta(seconds=200))
    assert reset.healthy_since is None
    next_wave = rollout.evaluate(baking, SPEC, healthy, total=10,
                                 now=T0 + timedelta(seconds=300))
    assert next_wave.wave == 1 and next_wave.healthy_since is None
    last_wave = rollout.evaluate(replace(next_wave, wave=2), SPEC, healthy, total=10, now=T0)
    last = rollout.evaluate(last_wave, SPEC, healthy, total=10, now=T0 + timedelta(seconds=300))
    assert last.phase is RolloutPhase.COMPLETE and last.stable == V2 and last.target is None


def test_more_unhealthy_workspaces_than_allowed_halt_naming_them() -> None:
    started = rollout.observe(rollout.observe(None, template="t", current=V1, spec=SPEC,
                                              now=T0), template="t", current=V2, spec=SPEC,
                              now=T0)
    one = {"a": Health(False, "went offline"), "b": Health(True)}
    assert rollout.evaluate(started, SPEC, one, total=10, now=T0).phase \
        is RolloutPhase.PROGRESSING  # one allowed: waits, does not halt, does not bake
    two = {**one, "b": Health(False, "install of calendar failed: boom")}
    halted = rollout.evaluate(started, SPEC, two, total=10, now=T0)
    assert halted.phase is RolloutPhase.HALTED
    assert "2 workspaces failed" in halted.message and "b: install of calendar" in halted.message
    assert rollout.evaluate(halted, SPEC, {}, total=10, now=T0) == halted  # stays halted


def test_commands_apply_only_where_they_make_sense() -> None:
    stable = rollout.observe(None, template="t", current=V1, spec=SPEC, now=T0)
    for command in (lambda r: rollout.resume(r, T0), rollout.abort, rollout.promote):
        with pytest.raises(rollout.RolloutError):
            command(stable)
    started = rollout.observe(stable, template="t", current=V2, spec=SPEC, now=T0)
    halted = rollout.evaluate(started, SPEC, {w: Health(False, "x") for w in "ab"}, total=2,
                              now=T0)
    resumed = rollout.resume(halted, T0 + timedelta(hours=1))
    assert resumed.phase is RolloutPhase.PROGRESSING
    assert resumed.counted_since == T0 + timedelta(hours=1)
    aborted = rollout.abort(halted)
    assert aborted.phase is RolloutPhase.ABORTED and rollout.on_target(aborted, SPEC, "ab") \
        == frozenset()
    # The aborted revision does not start again by itself; a newer one does.
    assert rollout.observe(aborted, template="t", current=V2, spec=SPEC, now=T0) == aborted
    promoted = rollout.promote(halted)
    assert promoted.phase is RolloutPhase.COMPLETE and promoted.stable == V2


def test_at_revision_keeps_the_workspaces_own_plugins_and_exclusions() -> None:
    desired = desired_from("""
apiVersion: pluginctl.dev/v1alpha1
kind: WorkspaceTemplate
metadata: {name: base}
spec:
  plugins:
    - source: local://plugins/notes
    - source: local://plugins/calendar
    - source: local://plugins/drafts
""", workspace_yaml("ws-1", excludePlugins=["drafts"],
                    plugins=[{"source": "local://mine/notes"}]))
    wanted = desired.workspaces["ws-1"]
    old = Revision.of([Plugin("notes", "local://plugins/notes"),
                       Plugin("drafts", "local://plugins/drafts"),
                       Plugin("seo", "local://plugins/seo")])
    held = rollout.at_revision(wanted, old)
    assert {n: p.source for n, p in held.plugins.items()} == {
        "notes": "local://mine/notes", "seo": "local://plugins/seo"}
    assert held.declared_by["notes"].kind == "Workspace"
