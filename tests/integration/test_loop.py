"""The level-triggered pass against real databases, a real registry and real runtimes on
loopback: the boot paths that edge-triggered installs lost, ownership, backoff, exclusions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta

import pytest
from freezegun import freeze_time

from controller.agent.simulated import Faults
from controller.domain.models import RUNTIME_KEY, ActionKind, Phase, Plugin, Policy, utcnow
from controller.domain.status import PluginState
from controller.domain.status import build as build_status
from controller.domain.tokens import runtime_secret_for
from controller.engine.loop import run_forever
from controller.engine.queue import MAX_HINTED, Request, Trigger, WorkQueue
from controller.engine.report import PassReport
from controller.runtime.driver import RuntimeDriver
from controller.store import Sessions, make_engine, make_sessions, queries, transaction
from tests.support.helpers import (
    NOTES,
    SEO,
    TEMPLATE,
    Registry,
    RuntimeFactory,
    desired_from,
    fleet,
    has,
    one_pass,
    workspace_yaml,
)


async def test_register_only_boot_installs_on_next_pass(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """The original bug: register set `online` before any heartbeat, so an install triggered
    by the provisioning -> online edge never fired. Here the runtime registers (without even a
    report) and never heartbeats; the next pass must still install."""
    runtime = await runtime_factory("ws-1", report=False)
    await runtime.register()

    report = await one_pass(fleet("ws-1"), sessions, policy)

    assert has(runtime, SEO, NOTES)
    assert report.in_sync
    assert runtime.count("GET", "/plugins") == 1  # no report: the pass asked the runtime


async def test_controller_down_while_workspace_came_online(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """Register and heartbeats all happened while no controller ran; the first pass after
    start converges, with nothing depending on having seen the transition."""
    runtime = await runtime_factory("ws-1")
    await runtime.register()
    for _ in range(3):
        await runtime.heartbeat()
    assert runtime.plugins == {}

    report = await one_pass(fleet("ws-1"), sessions, policy)

    assert has(runtime, SEO, NOTES)
    assert report.in_sync
    assert runtime.count("GET") == 0  # the heartbeat's report was enough


async def test_box_recreated_reports_empty_and_is_reinstalled(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    runtime = await runtime_factory("ws-1", faults=Faults(restart_required=False))
    await runtime.register()
    await one_pass(fleet("ws-1"), sessions, policy)
    assert has(runtime, SEO, NOTES)
    second = await one_pass(fleet("ws-1"), sessions, policy)
    assert second.in_sync and not any(r.outcomes for r in second.results)
    calls = len(runtime.calls)

    runtime.plugins.clear()  # the box was re-created: the store's memory is now untrue
    await runtime.heartbeat()
    await one_pass(fleet("ws-1"), sessions, policy)

    assert has(runtime, SEO, NOTES)
    assert runtime.count("PUT") == 4 and len(runtime.calls) == calls + 2


async def test_ownership_user_plugins_removal_and_upgrade(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    user = Plugin("scratchpad", "local://user/scratchpad")
    runtime = await runtime_factory("ws-1", plugins=[user])
    await runtime.register()
    await one_pass(fleet("ws-1"), sessions, policy)
    assert has(runtime, SEO, NOTES, user)

    # The template drops `notes` and moves seo-all to v2: notes (ours) goes, seo-all upgrades,
    # the user's scratchpad stays.
    new_template = TEMPLATE.replace("local://plugins/notes", "local://plugins/other").replace(
        "seo-all#v1", "seo-all#v2")
    desired = desired_from(new_template, workspace_yaml("ws-1"))
    await runtime.heartbeat()
    report = await one_pass(desired, sessions, policy)

    assert "notes" not in runtime.plugins
    assert runtime.plugins["seo-all"].source.endswith("#v2")
    assert has(runtime, user, Plugin("other", "local://plugins/other"))
    assert report.in_sync
    assert runtime.count("DELETE", "/plugins/scratchpad") == 0

    # Even with nothing declared at all, the user's plugin is never touched.
    empty = desired_from(TEMPLATE.split("spec:")[0] + "spec: {plugins: []}\n",
                         workspace_yaml("ws-1"))
    await runtime.heartbeat()
    await one_pass(empty, sessions, policy)
    assert set(runtime.plugins) == {"scratchpad"}


async def test_user_installed_plugin_with_a_declared_name_is_not_removed_when_undeclared(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """A plugin that happens to carry a name the template once declared, but that the
    controller never installed, is not ours to remove."""
    runtime = await runtime_factory("ws-1", plugins=[SEO, NOTES])
    await runtime.register()
    report = await one_pass(fleet("ws-1"), sessions, policy)
    assert report.in_sync and runtime.count("PUT") == 0

    nothing = desired_from(workspace_yaml("ws-1", templateRef=None))
    await one_pass(nothing, sessions, policy)
    assert has(runtime, SEO, NOTES)
    assert runtime.count("DELETE") == 0


async def test_failing_runtime_backs_off_and_others_converge(
    sessions: Sessions, runtime_factory: RuntimeFactory
) -> None:
    """Over one simulated hour of passes every 10 s, a runtime whose installs always fail is
    called a bounded number of times, shows its error in status, and never holds up the
    healthy workspace."""
    policy = Policy(call_timeout=2.0, offline_after=timedelta(days=1))
    broken = await runtime_factory("broken", faults=Faults(failing_plugins={"seo-all"}))
    healthy = await runtime_factory("healthy")
    desired = fleet("broken", "healthy")
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        await broken.register()
        await healthy.register()
        for _ in range(360):
            await one_pass(desired, sessions, policy)
            clock.tick(10)
        now = utcnow()

    assert has(healthy, SEO, NOTES)
    assert has(broken, NOTES) and "seo-all" not in broken.plugins
    attempts = broken.count("PUT", "/plugins/seo-all")
    # 5 s doubling to a 10 min cap, jitter up to -20%: about 12 attempts in an hour.
    assert 8 <= attempts <= 16, attempts
    assert healthy.count("PUT") == 2

    with transaction(sessions) as session:
        observed = queries.load_observed(session, now=utcnow())
    state = build_status(desired.workspaces["broken"], observed["broken"], now, policy)
    seo = next(p for p in state.plugins if p.name == "seo-all")
    assert seo.state is PluginState.FAILED
    assert "HTTP 500" in seo.message and "broken plugin" in seo.message
    assert seo.attempts == attempts
    assert seo.next_retry_at is not None and seo.next_retry_at > now
    assert not state.in_sync


async def test_backoff_resets_after_success(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    faults = Faults(failing_plugins={"seo-all"})
    runtime = await runtime_factory("ws-1", faults=faults)
    with freeze_time("2026-01-01", real_asyncio=True) as clock:
        await runtime.register()
        first = await one_pass(fleet("ws-1"), sessions, policy)
        assert not first.in_sync and first.failed == 1
        waiting = await one_pass(fleet("ws-1"), sessions, policy)  # same instant: backing off
        assert waiting.waiting == 1 and runtime.count("PUT", "/plugins/seo-all") == 1
        faults.failing_plugins.clear()
        clock.tick(6)
        healed = await one_pass(fleet("ws-1"), sessions, policy)
    assert healed.in_sync
    with transaction(sessions) as session:
        assert queries.load_observed(session, now=utcnow())["ws-1"].attempts == {}


async def test_paused_stale_and_suspended_workspaces_get_no_calls(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    paused = await runtime_factory("paused")
    stale = await runtime_factory("stale")
    suspended = await runtime_factory("suspended")
    live = await runtime_factory("live", report=False)
    desired = desired_from(TEMPLATE, workspace_yaml("paused"), workspace_yaml("stale"),
                           workspace_yaml("suspended", suspend=True), workspace_yaml("live"))
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        await stale.register()
        clock.tick(policy.offline_after.total_seconds() + 1)
        for runtime in (paused, suspended, live):
            await runtime.register()
        with transaction(sessions) as session:
            queries.set_dormant(session, "paused", True)
        # A later register and heartbeat never undo a pause.
        await paused.register()
        await paused.heartbeat()
        report = await one_pass(desired, sessions, policy)

    for runtime in (paused, stale, suspended):
        assert runtime.calls == [], runtime.workspace_id
    assert has(live, SEO, NOTES)
    assert report.skipped == {Phase.SUSPENDED: 1}  # paused and stale are not even read
    assert [r.workspace_id for r in report.results] == ["live"]


async def test_resume_brings_a_paused_workspace_back(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    runtime = await runtime_factory("ws-1")
    with transaction(sessions) as session:
        queries.set_dormant(session, "ws-1", True)
    await runtime.register()
    await one_pass(fleet("ws-1"), sessions, policy)
    assert runtime.calls == []
    with transaction(sessions) as session:
        queries.set_dormant(session, "ws-1", False)
    await one_pass(fleet("ws-1"), sessions, policy)
    assert has(runtime, SEO, NOTES)


async def test_restart_once_per_pass_and_budget_holds(
    sessions: Sessions, runtime_factory: RuntimeFactory
) -> None:
    """A runtime that loses its plugins on every restart would loop forever; the restart
    budget stops it after 3 restarts in an hour and reports the hold."""
    policy = Policy(call_timeout=2.0, offline_after=timedelta(days=1))
    runtime = await runtime_factory("ws-1", faults=Faults(lose_plugins_on_restart=True))
    with freeze_time("2026-01-01", real_asyncio=True) as clock:
        await runtime.register()
        for _ in range(30):
            report = await one_pass(fleet("ws-1"), sessions, policy)
            assert report.count(ActionKind.RESTART) <= 1
            await runtime.restarted()  # the box is back (and registered) before we go on
            await runtime.heartbeat()  # what the restarted box reports
            clock.tick(60)
        assert runtime.restarts == 3
        final = await one_pass(fleet("ws-1"), sessions, policy)
        assert not final.in_sync and final.held == 1
        clock.tick(3600)
        await one_pass(fleet("ws-1"), sessions, policy)
    assert runtime.restarts == 4  # the budget refills with time


async def test_invalid_workspace_does_not_stop_the_others(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    good = await runtime_factory("good")
    bad = await runtime_factory("bad")
    desired = desired_from(TEMPLATE, workspace_yaml("good"), workspace_yaml(
        "bad", plugins=[{"source": "local://a/x"}, {"source": "local://b/x"}]))
    await good.register()
    await bad.register()
    report = await one_pass(desired, sessions, policy)
    assert has(good, SEO, NOTES)
    assert bad.calls == []
    assert [d.workspace_id for d in report.invalid] == ["bad"]
    assert "declared twice" in (report.invalid[0].error or "")
    assert not report.in_sync


async def test_unreachable_runtime_reports_error_and_backs_off(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory, registry: Registry
) -> None:
    runtime = await runtime_factory("gone", report=False)
    await runtime.register()
    await runtime.stop()  # registered, then vanished: connection refused
    healthy = await runtime_factory("healthy")
    await healthy.register()

    report = await one_pass(fleet("gone", "healthy"), sessions, policy)

    assert has(healthy, SEO, NOTES)
    failed = next(r for r in report.results if r.workspace_id == "gone")
    assert failed.failures and "GET /plugins" in failed.failures[0].message
    with transaction(sessions) as session:
        attempt = queries.load_observed(session, now=utcnow())["gone"].attempts[RUNTIME_KEY]
    assert attempt.failures == 1 and attempt.next_retry_at > attempt.last_attempt_at


async def test_pass_reads_state_in_constant_queries(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """However many workspaces: a constant number of statements for the first pass (which
    plans everyone and remembers who is in sync), and a single light query afterwards."""
    from controller.store import count_statements

    # The pass on an engine of its own: the registry's flushes, which share `sessions`
    # with the runtimes' registers, are not the pass's statements.
    url = sessions.kw["bind"].url.render_as_string(hide_password=False)
    own = make_sessions(make_engine(url))

    async def queries_for(count: int, prefix: str) -> tuple[int, int]:
        ids = [f"{prefix}-{i}" for i in range(count)]
        for workspace_id in ids:
            runtime = await runtime_factory(workspace_id, plugins=[SEO, NOTES])
            await runtime.register()
        desired = fleet(*ids)
        counts = []
        for _ in range(2):
            with count_statements(own) as statements:
                report = await one_pass(desired, own, policy,
                                        request=Request(only=frozenset(ids)))
            assert report.in_sync and report.online == count
            counts.append(len(statements))
        return counts[0], counts[1]

    try:
        small, large = await queries_for(3, "small"), await queries_for(30, "large")
    finally:
        own.kw["bind"].dispose()
    assert small == large
    assert large[1] == 1  # steady state: recognised from digests alone


async def test_a_changed_report_or_desired_state_is_planned_again(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    runtime = await runtime_factory("ws-1", faults=Faults(restart_required=False))
    await runtime.register()
    await one_pass(fleet("ws-1"), sessions, policy)  # installs
    await one_pass(fleet("ws-1"), sessions, policy)  # finds it in sync, remembers
    steady = await one_pass(fleet("ws-1"), sessions, policy)
    assert steady.synced == 1 and steady.results == () and steady.in_sync

    runtime.plugins.pop("notes")  # the runtime lost one: its next report differs
    await runtime.heartbeat()
    await one_pass(fleet("ws-1"), sessions, policy)
    assert "notes" in runtime.plugins

    await one_pass(fleet("ws-1"), sessions, policy)  # in sync again, remembered again
    changed = desired_from(TEMPLATE.replace("seo-all#v1", "seo-all#v2"), workspace_yaml("ws-1"))
    await one_pass(changed, sessions, policy)
    assert runtime.plugins["seo-all"].source.endswith("#v2")


async def test_dry_run_changes_nothing(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    runtime = await runtime_factory("ws-1")
    await runtime.register()
    report = await one_pass(fleet("ws-1"), sessions, policy, dry_run=True)
    assert not report.in_sync
    assert runtime.calls == [] and runtime.plugins == {}
    planned = report.results[0].planned
    assert planned == ("install notes (missing)", "install seo-all (missing)")
    with transaction(sessions) as session:
        assert queries.load_observed(session, now=utcnow())["ws-1"].owned == {}


async def test_digest_pin_mismatch_is_drift(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    pinned = Plugin("seo-all", SEO.source, "sha256:abc")
    runtime = await runtime_factory("ws-1", plugins=[replace(pinned, digest="sha256:other")])
    await runtime.register()
    desired = desired_from(TEMPLATE, workspace_yaml(
        "ws-1", plugins=[{"source": SEO.source, "digest": "sha256:abc"}]))
    report = await one_pass(desired, sessions, policy)
    assert report.in_sync
    assert runtime.plugins["seo-all"].digest == "sha256:abc"


@pytest.mark.parametrize("restart_required", [True, False])
async def test_restart_only_when_a_call_asked(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory,
    restart_required: bool,
) -> None:
    runtime = await runtime_factory("ws-1", faults=Faults(restart_required=restart_required))
    await runtime.register()
    await one_pass(fleet("ws-1"), sessions, policy)
    assert runtime.count("POST", "/restart") == (1 if restart_required else 0)


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def test_a_slow_runtime_never_delays_the_others_in_the_loop(
    sessions: Sessions, registry: Registry, runtime_factory: RuntimeFactory
) -> None:
    """The periodic loop keeps serving every other workspace (here: a fresh register, via
    the registry's hint) while an earlier pass still waits on a runtime whose installs take
    seconds each."""
    policy = Policy(call_timeout=5.0)
    slow = await runtime_factory("slow", faults=Faults(install_delay=2.0, restart_required=False))
    fast = await runtime_factory("fast")
    stop = asyncio.Event()
    reports: list[PassReport] = []
    async with RuntimeDriver(timeout=policy.call_timeout) as driver:
        loop_task = asyncio.create_task(run_forever(
            lambda: fleet("slow", "fast"), sessions, driver, policy, interval=0.2, stop=stop,
            queue=registry.hints, on_pass=lambda report, _trigger: reports.append(report)))
        try:
            await slow.register()
            await wait_until(lambda: slow.count("PUT") >= 1, 5, "the slow install to start")
            await fast.register()
            await wait_until(lambda: has(fast, SEO, NOTES), 3, "the fast workspace to converge")
            assert len(slow.plugins) < 2, "the fast one should not have waited for the slow one"
            await wait_until(lambda: any(r.busy for r in reports), 3,
                             "a periodic pass that skips the busy workspace")
            assert len(slow.plugins) < 2
            await wait_until(lambda: has(slow, SEO, NOTES), 10, "the slow workspace to converge")
        finally:
            stop.set()
            await loop_task
    # Never two passes on one workspace at a time: each plugin was installed exactly once.
    assert slow.count("PUT") == 2


async def test_a_storm_of_hints_becomes_one_full_pass(sessions: Sessions, policy: Policy) -> None:
    hints = WorkQueue()
    seen: list[tuple[str, PassReport]] = []
    stop = asyncio.Event()
    async with RuntimeDriver(timeout=policy.call_timeout) as driver:
        task = asyncio.create_task(run_forever(
            lambda: fleet(), sessions, driver, policy, interval=3600, stop=stop, queue=hints,
            on_pass=lambda report, trigger: seen.append((trigger, report))))
        await wait_until(lambda: len(seen) == 1, 10, "the first full pass")
        hints("one")
        await wait_until(lambda: len(seen) == 2, 10, "a hint pass")
        for i in range(MAX_HINTED + 1):
            hints(f"ws-{i}")
        await wait_until(lambda: len(seen) == 3, 10, "the storm pass")
        stop.set()
        await task
    assert [(trigger, report.scope) for trigger, report in seen] == [
        ("periodic", None), ("hint", frozenset({"one"})), ("hint-storm", None)]


async def test_runtimes_can_refuse_callers_without_the_controller_secret(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """A runtime started with the controller's secret refuses every call without it (401,
    visible as the failure), and converges once the controller sends it."""
    runtime = await runtime_factory("ws-1", controller_secret="s3cret-for-runtimes")
    await runtime.register()
    refused = await one_pass(fleet("ws-1"), sessions, policy)
    assert not has(runtime, SEO, NOTES) and not refused.in_sync
    assert any("401" in o.message for r in refused.results for o in r.failures)

    with freeze_time(utcnow() + timedelta(minutes=30)):  # past the backoff
        await runtime.register()  # durable at once ("still alive" alone is batched)
        wrong = await one_pass(fleet("ws-1"), sessions, replace(policy, runtime_secret="guess"))
        assert wrong.online == 1
        assert not has(runtime, SEO, NOTES) and not wrong.in_sync
    with freeze_time(utcnow() + timedelta(hours=2)):
        await runtime.register()
        accepted = await one_pass(fleet("ws-1"), sessions,
                                  replace(policy, runtime_secret="s3cret-for-runtimes"))
        assert has(runtime, SEO, NOTES) and accepted.in_sync


async def test_per_workspace_runtime_secrets(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """With --runtime-secret-per-workspace each runtime holds only its own derived secret:
    both converge, and a secret shown to one workspace is worth nothing to another."""
    shared = "controller-only-secret"
    policy = replace(policy, runtime_secret=shared, runtime_secret_per_workspace=True)
    one = await runtime_factory("ws-1", controller_secret=runtime_secret_for(shared, "ws-1"))
    two = await runtime_factory("ws-2", controller_secret=runtime_secret_for(shared, "ws-2"))
    # ws-3's runtime was given ws-1's secret: the controller's calls to it do not carry that.
    three = await runtime_factory("ws-3", controller_secret=runtime_secret_for(shared, "ws-1"))
    for runtime in (one, two, three):
        await runtime.register()
    report = await one_pass(fleet("ws-1", "ws-2", "ws-3"), sessions, policy)
    assert has(one, SEO, NOTES) and has(two, SEO, NOTES)
    assert not has(three, SEO, NOTES)
    failed = next(r for r in report.results if r.workspace_id == "ws-3")
    assert any("401" in o.message for o in failed.failures)
    assert runtime_secret_for(shared, "ws-1") != runtime_secret_for(shared, "ws-2")
    assert shared not in runtime_secret_for(shared, "ws-1")


async def test_log_lines_say_what_started_each_action(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pluginctl.reconciler")
    faults = Faults(failing_plugins={"seo-all"})
    runtime = await runtime_factory("ws-1", faults=faults)
    with freeze_time("2026-01-01", real_asyncio=True) as clock:
        await runtime.register()
        await one_pass(fleet("ws-1"), sessions, policy)
        await runtime.restarted()  # registered again with its report: no race with the pass
        faults.failing_plugins.clear()
        clock.tick(6)
        caplog.clear()
        await one_pass(fleet("ws-1"), sessions, policy)
        await runtime.restarted()
    triggers = {(r.action, r.plugin): r.trigger for r in caplog.records  # type: ignore[attr-defined]
                if getattr(r, "action", None)}
    assert triggers == {("install", "seo-all"): "retry", ("restart", None): "manual"}


async def test_each_workspace_says_what_brought_it_into_the_pass(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """A periodic pass attributes a workspace's actions to what changed: its desired state
    (template-change) or nothing it can name (periodic); a hint keeps its reason (registry,
    manual); an action that failed before is a retry."""
    extra = [{"source": "local://plugins/extra"}]
    one = await runtime_factory("ws-1")
    two = await runtime_factory("ws-2")
    for runtime in (one, two):
        await runtime.register()
    periodic = Request(trigger=Trigger.PERIODIC)
    first = await one_pass(fleet("ws-1", "ws-2"), sessions, policy, request=replace(
        periodic, hinted={"ws-1": Trigger.REGISTRY}))
    assert {r.workspace_id: r.trigger for r in first.results} == {
        "ws-1": "registry", "ws-2": "periodic"}
    for _ in range(4):  # restarts the installs asked for; then found in sync and remembered
        for runtime in (one, two):
            await runtime.restarted()
        if (await one_pass(fleet("ws-1", "ws-2"), sessions, policy,
                           request=periodic)).synced == 2:
            break
    else:
        raise AssertionError("the fleet was never recognised in sync")

    # ws-1's declared plugins change; ws-2's box loses its plugins (desired state unchanged).
    changed = desired_from(TEMPLATE, workspace_yaml("ws-1", plugins=extra),
                           workspace_yaml("ws-2"))
    two.plugins.clear()
    await two.register()
    second = await one_pass(changed, sessions, policy, request=periodic)
    triggers = {r.workspace_id: {r.trigger_of(o.action) for o in r.outcomes}
                for r in second.results}
    assert triggers == {"ws-1": {"template-change"}, "ws-2": {"periodic"}}

    two.plugins.clear()
    await two.register()
    manual = await one_pass(changed, sessions, policy, request=replace(
        periodic, hinted={"ws-2": Trigger.MANUAL}))
    assert {r.workspace_id: r.trigger for r in manual.results}["ws-2"] == "manual"


def test_a_hinted_workspace_keeps_its_weightiest_reason() -> None:
    hints = WorkQueue()
    hints("a", Trigger.MANUAL)
    hints("a")  # a heartbeat after the request does not hide the request
    hints("b")
    hints("b", Trigger.TEMPLATE_CHANGE)
    assert hints.take() == {"a": Trigger.MANUAL, "b": Trigger.TEMPLATE_CHANGE}
    assert hints.take() == {}


async def test_blast_radius_guard_holds_a_mass_removal_until_forced(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """The template loses one of its two plugins on ten workspaces: ten removals out of
    twenty plugins (50 % > 25 %). The pass holds (no runtime call at all) and says why; a
    forced pass removes them; a smaller change (under the floor of ten) never holds."""
    names = [f"ws-{i}" for i in range(10)]
    runtimes = [await runtime_factory(name) for name in names]
    for runtime in runtimes:
        await runtime.register()
    await one_pass(fleet(*names), sessions, policy)
    assert all(has(r, SEO, NOTES) for r in runtimes)
    for runtime in runtimes:
        await runtime.heartbeat()
    calls = sum(len(r.calls) for r in runtimes)

    only_seo = TEMPLATE.replace("    - source: local://plugins/notes\n", "")
    shrunk = desired_from(only_seo, *(workspace_yaml(n) for n in names))
    held = await one_pass(shrunk, sessions, policy)
    assert str(held.guard) == ("would remove 10 of 20 plugins (50%), more than "
                               "--max-removal-share 0.25")
    assert held.guarded == 10 and held.online == 10 and not held.in_sync
    assert "held this pass" in held.summary()
    assert sum(len(r.calls) for r in runtimes) == calls  # nothing was done
    assert all("notes" in r.plugins for r in runtimes)

    dry = await one_pass(shrunk, sessions, policy, dry_run=True)
    assert dry.guard is not None and "would hold" in dry.summary()

    # A looser limit lets the same pass through; so does forcing it.
    assert (await one_pass(shrunk, sessions, replace(policy, max_removal_share=0.5),
                           dry_run=True)).guard is None
    forced = await one_pass(shrunk, sessions, policy, force=True)
    assert forced.guard is None and forced.count(ActionKind.REMOVE) == 10
    assert not any("notes" in r.plugins for r in runtimes)


async def test_blast_radius_guard_limits_the_workspaces_one_pass_acts_on(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    names = ["ws-1", "ws-2", "ws-3"]
    runtimes = [await runtime_factory(name) for name in names]
    for runtime in runtimes:
        await runtime.register()
    held = await one_pass(fleet(*names), sessions, replace(policy, max_workspaces=2))
    assert str(held.guard) == "would act on 3 workspaces, more than --max-workspaces 2"
    assert all(r.calls == [] for r in runtimes)
    done = await one_pass(fleet(*names), sessions, replace(policy, max_workspaces=3))
    assert done.guard is None and all(has(r, SEO, NOTES) for r in runtimes)


async def test_restarts_outside_the_budget_window_are_deleted(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """The restarts table holds one budget window's worth per workspace, not every restart
    ever made: recording a restart deletes that workspace's restarts the window has left."""
    from sqlalchemy import func, select

    from controller.store.tables import RestartRow

    runtime = await runtime_factory("ws-1")
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        await runtime.register()
        for hour in range(4):  # one plugin more every two hours: an install, a restart
            plugins = [{"source": f"local://plugins/extra-{i}"} for i in range(hour)]
            await one_pass(fleet("ws-1", plugins=plugins), sessions, policy)
            await runtime.restarted()
            clock.tick(2 * 3600)
            await runtime.register()  # seen again (stored at once, unlike a heartbeat)
    with transaction(sessions) as session:
        kept = session.execute(select(func.count()).select_from(RestartRow)).scalar_one()
    assert runtime.restarts == 4 and kept == 1


async def test_a_pass_cut_off_gives_back_its_claims(
    sessions: Sessions, policy: Policy, runtime_factory: RuntimeFactory
) -> None:
    """A pass cancelled while it waits on a runtime (a shutdown, a lost lease) gives back its
    claims before it ends, off the event loop, even when cancelled again meanwhile: another
    replica need not wait for them to run out."""
    patient = replace(policy, call_timeout=30.0, workspace_timeout=60.0)
    runtime = await runtime_factory("ws-1", faults=Faults(install_delay=3.0))
    await runtime.register()

    def claim() -> tuple[str, object] | None:
        with transaction(sessions) as session:
            return queries.claim_of(session, "ws-1")

    passing = asyncio.create_task(one_pass(fleet("ws-1"), sessions, patient))
    await wait_until(lambda: runtime.count("PUT") >= 1, 10, "the install to start")
    assert claim() is not None
    passing.cancel()
    await asyncio.sleep(0)  # the pass is now giving its claims back ...
    passing.cancel()  # ... and is cancelled once more
    with pytest.raises(asyncio.CancelledError):
        await passing
    await wait_until(lambda: claim() is None, 5, "the claim to be given back")
    assert runtime.count("PUT") == 1


async def test_a_pass_reports_each_workspace_as_it_finishes(
    sessions: Sessions, registry: Registry, runtime_factory: RuntimeFactory
) -> None:
    """`early` hears about each workspace as the pass finishes acting on it, while a slow
    runtime still holds the pass (the operator mirrors those into status at once); the
    pass's own report names them, so that what they said is said once."""
    policy = Policy(call_timeout=5.0)
    slow = await runtime_factory("slow", faults=Faults(install_delay=1.0, restart_required=False))
    fast = await runtime_factory("fast", faults=Faults(restart_required=False))
    await slow.register()
    await fast.register()
    early: list[PassReport] = []
    passing = asyncio.create_task(one_pass(fleet("slow", "fast"), sessions, policy,
                                           early=early.append))
    await wait_until(lambda: bool(early), 5, "an early report")
    assert not passing.done() and len(slow.plugins) < 2, "it came before the pass ended"
    assert early[0].scope == frozenset({"fast"}) and has(fast, SEO, NOTES)
    report = await passing
    assert [sorted(r.scope or ()) for r in early] == [["fast"], ["slow"]]
    for told in early:
        assert [r.workspace_id for r in told.results] == sorted(told.scope or ())
        assert told.results[0].outcomes and all(o.ok for o in told.results[0].outcomes)
    assert report.streamed == frozenset({"fast", "slow"}) and report.unsaid == ()
    assert {r.workspace_id for r in report.results} == {"fast", "slow"}


async def test_a_dry_run_or_a_pass_with_nothing_to_do_reports_nothing_early(
    sessions: Sessions, registry: Registry, runtime_factory: RuntimeFactory
) -> None:
    policy = Policy(call_timeout=5.0)
    runtime = await runtime_factory("fast", faults=Faults(restart_required=False))
    await runtime.register()
    early: list[PassReport] = []
    dry = await one_pass(fleet("fast"), sessions, policy, dry_run=True, early=early.append)
    assert early == [] and dry.streamed == frozenset() and len(dry.unsaid) == 1
    await one_pass(fleet("fast"), sessions, policy, early=early.append)
    assert len(early) == 1
    quiet = await one_pass(fleet("fast"), sessions, policy, early=early.append)
    assert len(early) == 1 and quiet.streamed == frozenset()
