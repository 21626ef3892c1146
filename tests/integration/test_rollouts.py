"""Progressive rollouts through real passes (engine/rollouts -> passes -> runtimes on
loopback), on SQLite and PostgreSQL, with time under freezegun: a template change goes out in
waves; a broken release halts at the first wave and the rest get no call for it; resume,
abort and promote; a new revision during a rollout; replicas agree on the waves."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from freezegun import freeze_time

from controller.agent.simulated import Faults, ReferenceRuntime
from controller.domain.desired import Desired
from controller.domain.models import Policy, utcnow
from controller.domain.rollout import Revision, Rollout, RolloutError, RolloutPhase, wave_order
from controller.engine import rollouts
from controller.engine.report import PassReport
from controller.store import Sessions, make_engine, make_sessions, queries, transaction
from tests.support import helpers
from tests.support.helpers import NOTES, SEO, RuntimeFactory, desired_from, workspace_yaml
from tests.support.rollouts import IDS, KEY, fleet_of, restarts_over, start, template


async def one_pass(*args: object, **kwargs: object) -> PassReport:
    """A pass, then the restarts it asked for, over (they register again after)."""
    report = await helpers.one_pass(*args, **kwargs)  # type: ignore[arg-type]
    await restarts_over()
    return report

CALENDAR = "local://plugins/calendar"


def fleet_at(*extra: str, **rollout: object) -> Desired:
    return fleet_of(template(*extra, **rollout))  # type: ignore[arg-type]


def with_calendar(runtimes: dict[str, ReferenceRuntime]) -> set[str]:
    return {w for w, r in runtimes.items() if "calendar" in r.plugins}


def calendar_calls(runtime: ReferenceRuntime) -> int:
    return sum(1 for call in runtime.calls if "calendar" in str(call))


def stored(sessions: Sessions) -> Rollout:
    with transaction(sessions) as session:
        return queries.load_rollouts(session)[KEY]


def order(desired: Desired) -> list[str]:
    revision = Revision.of(desired.templates[KEY].plugins)
    return wave_order(KEY, revision.digest, IDS)


POLICY = Policy(call_timeout=2.0, workspace_timeout=10.0, offline_after=timedelta(days=1))


async def test_a_template_change_goes_out_wave_by_wave_after_each_bake(
    sessions: Sessions, runtime_factory: RuntimeFactory
) -> None:
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        runtimes = await start(runtime_factory)
        before = fleet_at()
        assert (await one_pass(before, sessions, POLICY)).in_sync  # first sight: stable
        assert stored(sessions).phase is RolloutPhase.COMPLETE

        after = fleet_at(CALENDAR)
        first = order(after)
        await one_pass(after, sessions, POLICY)  # wave 1: 10 % = one workspace
        assert with_calendar(runtimes) == {first[0]}
        report = await one_pass(after, sessions, POLICY)  # restarts it for the install
        assert report.in_sync, report.summary()  # the others are held: in sync with stable
        await one_pass(after, sessions, POLICY)  # finds the wave in sync: the bake starts
        assert stored(sessions).healthy_since is not None
        clock.tick(59)
        await one_pass(after, sessions, POLICY)
        assert with_calendar(runtimes) == {first[0]}  # bake not over yet
        clock.tick(2)
        await one_pass(after, sessions, POLICY)  # wave 2: 50 %
        assert with_calendar(runtimes) == set(first[:5])
        assert stored(sessions).wave == 1
        await one_pass(after, sessions, POLICY)
        await one_pass(after, sessions, POLICY)
        clock.tick(61)
        await one_pass(after, sessions, POLICY)  # wave 3: everyone
        assert with_calendar(runtimes) == set(IDS)
        await one_pass(after, sessions, POLICY)
        await one_pass(after, sessions, POLICY)
        clock.tick(61)
        await one_pass(after, sessions, POLICY)
    done = stored(sessions)
    assert done.phase is RolloutPhase.COMPLETE and done.target is None
    assert "calendar" in {p.name for p in done.stable.plugins}


async def test_a_broken_release_halts_at_the_first_wave_and_the_rest_get_no_call(
    sessions: Sessions, runtime_factory: RuntimeFactory
) -> None:
    faults = Faults(failing_plugins={"calendar"})  # shared: every runtime breaks on it
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        runtimes = await start(runtime_factory, faults)
        await one_pass(fleet_at(), sessions, POLICY)
        after = fleet_at(CALENDAR)
        first = order(after)[0]
        await one_pass(after, sessions, POLICY)  # the first wave's install fails
        await one_pass(after, sessions, POLICY)  # ... and the failure halts the rollout
        halted = stored(sessions)
        assert halted.phase is RolloutPhase.HALTED, halted
        assert first in halted.message and "install of calendar failed" in halted.message
        for _ in range(3):
            clock.tick(3600)  # backoff and bake long over: still halted
            await one_pass(after, sessions, POLICY)
        assert stored(sessions).phase is RolloutPhase.HALTED
        assert [w for w in IDS if calendar_calls(runtimes[w])] == [first]

        faults.failing_plugins.clear()  # the fix; then a person resumes
        clock.tick(60)
        await rollouts.command(sessions, KEY, "resume", now=utcnow())
        for _ in range(12):  # per wave: install, restart, found healthy, bake over
            clock.tick(700)  # past the backoff and each bake
            await one_pass(after, sessions, POLICY)
    assert stored(sessions).phase is RolloutPhase.COMPLETE
    assert with_calendar(runtimes) == set(IDS)


async def test_a_runtime_that_stops_heartbeating_halts_the_rollout(
    sessions: Sessions, runtime_factory: RuntimeFactory
) -> None:
    policy = Policy(call_timeout=2.0, workspace_timeout=10.0, offline_after=timedelta(seconds=90))
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        # No restart after the install: a restarted runtime registers again a moment later,
        # which could land after the clock moves on and count as a heartbeat.
        await start(runtime_factory, Faults(restart_required=False))
        await one_pass(fleet_at(), sessions, policy)
        after = fleet_at(CALENDAR, bake=300)
        first = order(after)[0]
        await one_pass(after, sessions, policy)
        await one_pass(after, sessions, policy)
        clock.tick(120)  # everyone heartbeats but the first wave's runtime
        with transaction(sessions) as session:
            queries.touch(session, {w: utcnow() for w in IDS if w != first})
        await one_pass(after, sessions, policy)
    halted = stored(sessions)
    assert halted.phase is RolloutPhase.HALTED and f"{first}: went offline" in halted.message


async def test_abort_puts_the_first_wave_back_on_the_stable_revision(
    sessions: Sessions, runtime_factory: RuntimeFactory
) -> None:
    """The new revision adds calendar and moves seo-all to v2: abort removes what was added
    and reinstalls seo-all at v1 on the wave that had moved."""
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True):
        runtimes = await start(runtime_factory)
        await one_pass(fleet_at(), sessions, POLICY)
        changed = desired_from(
            template(CALENDAR).replace("seo-all#v1", "seo-all#v2"),
            *(workspace_yaml(w) for w in IDS))
        first = order(changed)[0]
        await one_pass(changed, sessions, POLICY)
        assert runtimes[first].plugins["seo-all"].source.endswith("#v2")
        assert "calendar" in runtimes[first].plugins
        aborted = await rollouts.command(sessions, KEY, "abort", now=utcnow())
        assert aborted.phase is RolloutPhase.ABORTED
        report = await one_pass(changed, sessions, POLICY)
        assert report.in_sync or (await one_pass(changed, sessions, POLICY)).in_sync
        with pytest.raises(RolloutError, match="no rollout in progress"):
            await rollouts.command(sessions, KEY, "abort", now=utcnow())
    assert with_calendar(runtimes) == set()
    assert all(r.plugins["seo-all"].source.endswith("#v1") for r in runtimes.values())


async def test_promote_skips_the_remaining_waves(
    sessions: Sessions, runtime_factory: RuntimeFactory
) -> None:
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True):
        runtimes = await start(runtime_factory)
        await one_pass(fleet_at(), sessions, POLICY)
        after = fleet_at(CALENDAR, bake=3600)
        await one_pass(after, sessions, POLICY)
        assert len(with_calendar(runtimes)) == 1
        promoted = await rollouts.command(sessions, KEY, "promote", now=utcnow())
        assert promoted.phase is RolloutPhase.COMPLETE
        await one_pass(after, sessions, POLICY)
    assert with_calendar(runtimes) == set(IDS)


async def test_a_new_revision_during_a_rollout_starts_again_from_the_first_wave(
    sessions: Sessions, runtime_factory: RuntimeFactory
) -> None:
    drafts = "local://plugins/drafts"
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        runtimes = await start(runtime_factory)
        await one_pass(fleet_at(), sessions, POLICY)
        second = fleet_at(CALENDAR)
        for _ in range(3):
            await one_pass(second, sessions, POLICY)
        clock.tick(61)
        await one_pass(second, sessions, POLICY)  # wave 2 of revision 2: five workspaces
        assert len(with_calendar(runtimes)) == 5
        third = fleet_at(CALENDAR, drafts)
        await one_pass(third, sessions, POLICY)
        now_on = {w for w, r in runtimes.items() if "drafts" in r.plugins}
    assert now_on == {order(third)[0]}  # revision 3's own first wave
    # Revision 2 never completed: the others are back on the stable revision (no calendar).
    assert with_calendar(runtimes) == now_on
    state = stored(sessions)
    assert state.phase is RolloutPhase.PROGRESSING and state.wave == 0
    assert {p.name for p in state.stable.plugins} == {SEO.name, NOTES.name}


async def test_replicas_agree_on_the_waves(
    sessions: Sessions, db_url: str, runtime_factory: RuntimeFactory
) -> None:
    """Two replicas, each with its own connection pool to one database (as two processes
    have), run their passes at the same time through a rollout: whoever stores a step first
    wins (compare-and-set), the other takes it, and both hold the same workspaces back."""
    engine = make_engine(db_url)
    other = make_sessions(engine)
    try:
        with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
            runtimes = await start(runtime_factory, Faults(restart_required=False))
            await one_pass(fleet_at(), sessions, POLICY, replica="a")
            after = fleet_at(CALENDAR)
            first = order(after)
            sizes = []
            for step in range(6):
                if step in (3, 5):
                    clock.tick(61)  # the bake of the wave is over
                await asyncio.gather(one_pass(after, sessions, POLICY, replica="a"),
                                     one_pass(after, other, POLICY, replica="b"))
                looks = [await rollouts.gate(after, s, POLICY, now=utcnow(), advance=False)
                         for s in (sessions, other)]
                assert looks[0].moved == looks[1].moved, step
                moved = looks[0].moved.get(KEY, frozenset())
                assert moved == set(first[:len(moved)]), step  # a prefix of the one order
                assert with_calendar(runtimes) <= moved, step  # none beyond its wave
                sizes.append(len(moved))
            assert sizes == [1, 1, 1, 5, 5, 10], sizes  # wave by wave, after each bake
            assert with_calendar(runtimes) == set(IDS) and stored(sessions).wave == 2
    finally:
        engine.dispose()


async def test_those_let_through_stay_on_the_target_when_the_fleet_shrinks(
    sessions: Sessions, runtime_factory: RuntimeFactory
) -> None:
    """Waves are cut by percent: with two workspaces of ten gone, 50 % is four, not five. The
    five let through are stored, so none of them is moved back (and forth)."""
    with freeze_time("2026-01-01 00:00:00", real_asyncio=True) as clock:
        runtimes = await start(runtime_factory, Faults(restart_required=False))
        await one_pass(fleet_at(), sessions, POLICY)
        after = fleet_at(CALENDAR)
        first = order(after)
        for _ in range(3):
            await one_pass(after, sessions, POLICY)
        clock.tick(61)
        await one_pass(after, sessions, POLICY)  # wave 2: 50 %
        assert with_calendar(runtimes) == set(first[:5])
        with transaction(sessions) as session:
            revision, kept = queries.load_let_through(session)[KEY]
        assert kept == set(first[:5]) and revision == order_digest(after)

        fewer = desired_from(template(CALENDAR), *(workspace_yaml(w) for w in first[:-2]))
        for _ in range(3):
            await one_pass(fewer, sessions, POLICY)
        assert with_calendar(runtimes) == set(first[:5])
        assert not any(c.method == "DELETE" for r in runtimes.values() for c in r.calls)
        for _ in range(4):
            clock.tick(61)
            await one_pass(fewer, sessions, POLICY)
    assert stored(sessions).phase is RolloutPhase.COMPLETE
    assert with_calendar(runtimes) == set(first[:-2])
    with transaction(sessions) as session:
        assert queries.load_let_through(session) == {}  # the rollout ended: its rows went


def order_digest(desired: Desired) -> str:
    return Revision.of(desired.templates[KEY].plugins).digest
