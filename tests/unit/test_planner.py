"""The planner is pure: desired x observed x ownership x backoff x now -> actions. Tested
exhaustively without any server."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.domain import backoff, outcomes, planner
from controller.domain.models import (
    RUNTIME_KEY,
    Action,
    ActionKind,
    Attempt,
    DesiredWorkspace,
    Observed,
    Outcome,
    Phase,
    Plugin,
    Policy,
    WaitKind,
)
from controller.domain.reasons import InvalidReason

NOW = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = Policy()


def desired(*plugins: Plugin, **kwargs: object) -> DesiredWorkspace:
    return DesiredWorkspace("ws", "default/ws", None, {p.name: p for p in plugins},
                            **kwargs)  # type: ignore[arg-type]


def observed(report: list[Plugin] | None = None, owned: list[Plugin] | None = None,
             **kwargs: object) -> Observed:
    base = Observed(
        workspace_id="ws", url="http://127.0.0.1:1", registered_at=NOW, last_seen_at=NOW,
        dormant=False, report=None if report is None else {p.name: p for p in report},
        report_at=NOW, owned={p.name: p for p in owned or []}, attempts={}, restarts=(),
        restart_pending=False,
    )
    return replace(base, **kwargs)  # type: ignore[arg-type]


A1 = Plugin("a", "local://a#1")
A2 = Plugin("a", "local://a#2")
B = Plugin("b", "git://x/b#v1")
USER = Plugin("u", "local://user/u")


def kinds(plan_: object) -> list[tuple[str, str | None]]:
    return [(a.kind.value, a.plugin.name if a.plugin else None)
            for a in plan_.actions]  # type: ignore[attr-defined]


def test_installs_missing_and_changed_and_leaves_the_rest() -> None:
    plan = planner.plan(desired(A2, B), observed([A1, USER]), NOW, POLICY)
    assert kinds(plan) == [("install", "a"), ("install", "b")]
    assert plan.actions[0].reason == "source local://a#1 -> local://a#2"


def test_unknown_report_observes_first() -> None:
    plan = planner.plan(desired(A1), observed(None), NOW, POLICY)
    assert kinds(plan) == [("observe", None)]


def test_removes_only_what_it_owns() -> None:
    plan = planner.plan(desired(), observed([A1, USER], owned=[A1]), NOW, POLICY)
    assert kinds(plan) == [("remove", "a")]


def test_owned_but_replaced_by_someone_else_is_disowned_not_removed() -> None:
    plan = planner.plan(desired(), observed([A2], owned=[A1]), NOW, POLICY)
    assert kinds(plan) == [("disown", "a")]


def test_owned_and_already_gone_is_disowned_without_a_call() -> None:
    plan = planner.plan(desired(), observed([], owned=[A1]), NOW, POLICY)
    assert kinds(plan) == [("disown", "a")]


def test_digest_pin() -> None:
    pinned = replace(A1, digest="sha256:1")
    assert planner.plan(desired(pinned), observed([replace(A1, digest="sha256:1")]), NOW,
                        POLICY).in_sync
    drift = planner.plan(desired(pinned), observed([replace(A1, digest="sha256:2")]), NOW, POLICY)
    assert kinds(drift) == [("install", "a")]
    # Without a pin, whatever digest the runtime has is fine.
    assert planner.plan(desired(A1), observed([replace(A1, digest="x")]), NOW, POLICY).in_sync


def test_unpinned_remote_source_is_refused_for_that_plugin_only() -> None:
    unpinned = Plugin("tool", "github://org/tool")
    branch = Plugin("lib", "gitea://org/lib#main")
    plan = planner.plan(desired(unpinned, branch, B, USER), observed([]), NOW, POLICY)
    assert kinds(plan) == [("install", "b"), ("install", "u")]  # pinned and local:// go ahead
    refused = {w.key: w for w in plan.waits}
    assert set(refused) == {"tool", "lib"} and not plan.in_sync
    assert all(w.kind is WaitKind.REFUSED and w.until is None for w in refused.values())
    assert "github://org/tool is not pinned" in refused["tool"].reason
    assert "--allow-unpinned" in refused["tool"].reason
    assert "moving ref 'main'" in refused["lib"].reason
    allowed = planner.plan(desired(unpinned, branch), observed([]), NOW,
                           replace(POLICY, allow_unpinned=True))
    assert kinds(allowed) == [("install", "lib"), ("install", "tool")] and not allowed.waits
    # Already there as declared (installed before, or by hand): nothing to refuse.
    assert planner.plan(desired(unpinned), observed([unpinned]), NOW, POLICY).in_sync


def test_backoff_waits_then_retries() -> None:
    attempt = Attempt(2, "HTTP 500", NOW, NOW + timedelta(seconds=10))
    seen = observed([], attempts={"a": attempt})
    waiting = planner.plan(desired(A1), seen, NOW, POLICY)
    assert waiting.actions == () and waiting.waits[0].kind is WaitKind.BACKOFF
    assert waiting.waits[0].until == attempt.next_retry_at
    assert not waiting.in_sync
    due = planner.plan(desired(A1), seen, NOW + timedelta(seconds=10), POLICY)
    assert kinds(due) == [("install", "a")]


def test_a_clock_that_jumped_back_does_not_wedge_backoff() -> None:
    # Recorded with a clock an hour ahead: the retry time is further away than any delay
    # could be, so it is treated as due.
    attempt = Attempt(1, "x", NOW + timedelta(hours=1), NOW + timedelta(hours=1, seconds=5))
    plan = planner.plan(desired(A1), observed([], attempts={"a": attempt}), NOW, POLICY)
    assert kinds(plan) == [("install", "a")]


def test_a_modified_tree_is_installed_again_even_without_a_pin() -> None:
    edited = replace(A1, digest="sha256:2", modified=True)
    assert kinds(planner.plan(desired(A1), observed([edited]), NOW, POLICY)) == [
        ("install", "a")]
    assert "modified on the box" in planner.plan(desired(A1), observed([edited]), NOW,
                                                 POLICY).actions[0].reason


def test_a_restart_budget_of_zero_holds_restarts_for_good() -> None:
    off = replace(POLICY, restart_budget=0)
    held = planner.plan(desired(), observed([], restart_pending=True), NOW, off)
    assert held.actions == () and held.waits[0].kind is WaitKind.RESTART_BUDGET
    assert held.waits[0].until is None


def test_restart_budget() -> None:
    recent = tuple(NOW - timedelta(minutes=m) for m in (50, 30, 10))
    held = planner.plan(desired(), observed([], restarts=recent, restart_pending=True), NOW,
                        POLICY)
    assert not held.may_restart and held.actions == ()
    assert held.waits[0].kind is WaitKind.RESTART_BUDGET
    assert held.waits[0].until == recent[0] + POLICY.restart_window
    later_now = NOW + timedelta(minutes=11)
    later = planner.plan(desired(), observed([], restarts=recent, restart_pending=True,
                                             last_seen_at=later_now), later_now, POLICY)
    assert kinds(later) == [("restart", None)]


def test_phases_in_order_of_precedence() -> None:
    online = observed([])
    assert planner.phase_of(None, online, NOW, POLICY) is Phase.UNMANAGED
    invalid = desired(error="bad", reason=InvalidReason.BAD_SPEC)
    assert planner.phase_of(invalid, online, NOW, POLICY) is Phase.INVALID
    assert planner.phase_of(desired(suspended=True), online, NOW, POLICY) is Phase.SUSPENDED
    assert planner.phase_of(desired(), None, NOW, POLICY) is Phase.UNREGISTERED
    assert planner.phase_of(desired(), observed(dormant=True), NOW, POLICY) is Phase.DORMANT
    stale = NOW + POLICY.offline_after + timedelta(seconds=1)
    assert planner.phase_of(desired(), online, stale, POLICY) is Phase.OFFLINE
    assert planner.phase_of(desired(), online, NOW, POLICY) is Phase.ONLINE
    # Only online workspaces get actions.
    assert planner.plan(desired(A1), online, stale, POLICY).actions == ()


def test_backoff_delay_doubles_to_the_cap_with_bounded_jitter() -> None:
    delays = [backoff.delay(n, POLICY, 0.0).total_seconds() for n in range(1, 10)]
    assert delays == [5, 10, 20, 40, 80, 160, 320, 600, 600]
    assert backoff.delay(3, POLICY, 0.999).total_seconds() >= 20 * 0.8


# --- property: a plan applied successfully leaves nothing to do --------------------------------

names = st.sampled_from(["a", "b", "c", "d"])
sources = st.sampled_from(["local://p#1", "local://p#2", "git://h/p#v3"])
digests = st.none() | st.sampled_from(["sha256:1", "sha256:2"])
plugin_sets = st.dictionaries(names, st.tuples(sources, digests), max_size=4).map(
    lambda d: [Plugin(n, s, g) for n, (s, g) in d.items()])


def simulate(seen: Observed, runtime: dict[str, Plugin], actions: tuple[Action, ...]
             ) -> tuple[Observed, dict[str, Plugin], list[Outcome]]:
    """A runtime that does what it is told, and the store facts that result."""
    results: list[Outcome] = []
    for action in actions:
        if action.kind is ActionKind.OBSERVE:
            results.append(Outcome(action, True, report=tuple(runtime.values())))
        elif action.kind is ActionKind.INSTALL and action.plugin:
            runtime[action.plugin.name] = action.plugin
            results.append(Outcome(action, True))
        elif action.kind is ActionKind.REMOVE and action.plugin:
            runtime.pop(action.plugin.name, None)
            results.append(Outcome(action, True))
        else:
            results.append(Outcome(action, True))
    changes = outcomes.changes_from(seen, results, NOW, policy=POLICY, rand=lambda: 0.5)
    report = dict(seen.report) if seen.report is not None else None
    if changes.report_replace is not None:
        report = {p.name: p for p in changes.report_replace}
    if report is not None:
        report.update({p.name: p for p in changes.report_put})
        for name in changes.report_drop:
            report.pop(name, None)
    owned = {n: p for n, p in seen.owned.items() if n not in changes.disown}
    owned.update({p.name: p for p in changes.own})
    attempts = {k: v for k, v in seen.attempts.items() if k not in changes.clear_attempts}
    return replace(seen, report=report, owned=owned, attempts=attempts), runtime, results


@settings(max_examples=400, deadline=None)
@given(wanted=plugin_sets, actual=plugin_sets, owned=plugin_sets, known=st.booleans())
def test_applying_a_plan_then_planning_again_yields_nothing(
    wanted: list[Plugin], actual: list[Plugin], owned: list[Plugin], known: bool
) -> None:
    runtime = {p.name: p for p in actual}
    seen = observed(list(actual) if known else None, owned=owned)
    target = desired(*wanted)
    first = planner.plan(target, seen, NOW, POLICY)

    # Never touches what it does not own and does not want.
    for action in first.actions:
        if action.kind is ActionKind.REMOVE and action.plugin:
            assert action.plugin.name in seen.owned
            assert action.plugin.name not in target.plugins

    for _ in range(2):  # the second round covers "observe, then act"
        plan = planner.plan(target, seen, NOW, POLICY)
        seen, runtime, _ = simulate(seen, runtime, plan.actions)

    final = planner.plan(target, seen, NOW, POLICY)
    assert final.actions == (), final.actions
    assert all(runtime[p.name].satisfies(p) for p in wanted)
    # User plugins (neither declared nor owned) survive untouched.
    for plugin in actual:
        if plugin.name not in target.plugins and plugin.name not in {p.name for p in owned}:
            assert runtime.get(plugin.name) == plugin


def test_failure_outcome_records_backoff_and_success_clears_it() -> None:
    action = Action(ActionKind.INSTALL, "missing", A1)
    seen = observed([])
    failed = outcomes.changes_from(seen, [Outcome(action, False, "HTTP 500")], NOW, policy=POLICY,
                                   rand=lambda: 0.0)
    assert failed.attempts["a"].failures == 1
    assert failed.attempts["a"].next_retry_at == NOW + timedelta(seconds=5)
    seen = replace(seen, attempts=dict(failed.attempts))
    again = outcomes.changes_from(seen, [Outcome(action, False, "HTTP 500")], NOW, policy=POLICY,
                                  rand=lambda: 0.0)
    assert again.attempts["a"].failures == 2
    ok = outcomes.changes_from(seen, [Outcome(action, True)], NOW, policy=POLICY, rand=lambda: 0.0)
    assert ok.clear_attempts == ("a",) and ok.own == (A1,)


def test_restart_outcome_forgets_the_report() -> None:
    restart = Action(ActionKind.RESTART, "asked")
    seen = observed([A1], restart_pending=True, attempts={
        RUNTIME_KEY: Attempt(1, "x", NOW, NOW)})
    changes = outcomes.changes_from(seen, [Outcome(restart, True)], NOW, policy=POLICY,
                                    rand=lambda: 0.0)
    assert changes.report_forget and changes.restart_pending is False
    assert changes.restarted_at == NOW and changes.clear_attempts == (RUNTIME_KEY,)


def test_blast_radius_floor_share_and_workspace_limit() -> None:
    from controller.domain.planner import GUARD_MIN_REMOVALS, blast_radius

    policy = Policy()  # 25 %, no workspace limit
    assert blast_radius(GUARD_MIN_REMOVALS - 1, 0, 9, policy) is None  # under the floor
    assert blast_radius(10, 30, 10, policy) is None  # 10 of 40: exactly 25 %, not more
    assert blast_radius(11, 30, 11, policy) is not None  # 11 of 41
    assert blast_radius(0, 0, 10**6, policy) is None
    assert blast_radius(0, 0, 3, Policy(max_workspaces=2)) is not None
    assert blast_radius(100, 0, 100, Policy(max_removal_share=1.0)) is None


def test_explain_verdicts_ownership_and_next_pass() -> None:
    from controller.domain.explain import Claim, explain
    from controller.domain.models import Declaration

    wanted = replace(desired(A2, B), declared_by={"a": Declaration("WorkspaceTemplate", "t", 0),
                                                  "b": Declaration("Workspace", "ws", 1)})
    seen = observed([A1, USER], owned=[A1], restarts=(NOW - timedelta(minutes=10),))
    found = explain(wanted, seen, NOW, policy=POLICY, claim=Claim("replica-1",
                                                                  NOW + timedelta(seconds=30)))
    assert not found.in_sync and found.verdict.startswith("out of sync: a pending")
    assert [(p.name, p.declared_by, p.owner, p.state) for p in found.plugins] == [
        ("a", "WorkspaceTemplate default/t spec.plugins[0]", "pluginctl", "Pending"),
        ("b", "Workspace default/ws spec.plugins[1]", "-", "Pending"),
        ("u", None, "not pluginctl", "LeftAlone")]
    assert found.next_pass == ("install a (source local://a#1 -> local://a#2)",
                               "install b (missing)")
    assert (found.restarts_used, found.restart_budget_frees_at) == (
        1, NOW + timedelta(minutes=50))
    assert found.claim == Claim("replica-1", NOW + timedelta(seconds=30))

    offline = explain(wanted, replace(seen, last_seen_at=NOW - timedelta(minutes=5)), NOW,
                      policy=POLICY, claim=Claim("gone", NOW - timedelta(seconds=1)))
    assert offline.verdict.startswith("offline: last heartbeat 5m ago (offline after 90s)")
    assert offline.next_pass == ("nothing: it is not an online, managed workspace",)
    assert offline.claim is None  # a claim that ran out is nobody's
    assert explain(None, seen, NOW,
                   policy=POLICY).verdict.startswith("no Workspace declares this id")
    synced = explain(desired(A1), observed([A1], owned=[A1]), NOW, policy=POLICY)
    assert synced.in_sync and synced.next_pass == ("nothing: it is in sync",)
