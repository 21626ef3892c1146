"""The rollouts table stays bounded (store/queries/prune.py, run by engine/loop.py): the rollout
of a template that desired state has not held for the retention (`forget_after`) is deleted;
a template present, one that came back meanwhile, or a desired state that could not be read
whole keeps it; a template that comes back after that starts afresh. On each database, with
time under freezegun."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from freezegun import freeze_time

from controller.domain.models import Policy, utcnow
from controller.domain.rollout import Revision, Rollout
from controller.engine.loop import declared_templates, run_forever
from controller.runtime.driver import RuntimeDriver
from controller.store import Sessions, queries, transaction
from tests.support.helpers import NOTES, SEO, desired_from, fleet, one_pass, wait_for

T0 = "2026-03-01 12:00:00"
MONTH = timedelta(days=30)
HOUR = timedelta(hours=1)
GONE, KEPT = "default/gone", "default/base"


def _store(sessions: Sessions, *templates: str) -> None:
    with transaction(sessions) as session:
        for template in templates:
            stored = queries.save_rollout(
                session, Rollout(template, Revision.of([SEO, NOTES])), now=utcnow())
            assert stored is not None


def _templates(sessions: Sessions) -> set[str]:
    with transaction(sessions) as session:
        return set(queries.load_rollouts(session))


def _prune(sessions: Sessions, templates: set[str] | None,
           forget_after: timedelta | None = MONTH) -> queries.Pruned:
    with transaction(sessions) as session:
        return queries.prune(session, now=utcnow(), declared=set(), templates=templates,
                             forget_after=forget_after, restart_window=HOUR)


def test_a_template_absent_for_the_retention_loses_its_rollout(sessions: Sessions) -> None:
    with freeze_time(T0) as clock:
        _store(sessions, GONE, KEPT)
        clock.tick(MONTH * 2)  # stored long ago: the absence counts, not the row's age
        assert _prune(sessions, {KEPT}).rollouts == 0  # the absence is noted from now
        clock.tick(MONTH - timedelta(seconds=1))
        assert _prune(sessions, {KEPT}).rollouts == 0
        assert _templates(sessions) == {GONE, KEPT}

        clock.tick(timedelta(seconds=2))
        pruned = _prune(sessions, {KEPT})

    assert pruned.rollouts == 1 and "1 rollout(s) of forgotten templates" in str(pruned)
    assert _templates(sessions) == {KEPT}


def test_a_template_that_came_back_meanwhile_keeps_its_rollout(sessions: Sessions) -> None:
    with freeze_time(T0) as clock:
        _store(sessions, GONE)
        _prune(sessions, set())  # gone
        clock.tick(MONTH / 2)
        _prune(sessions, {GONE})  # back: the absence so far no longer counts
        clock.tick(MONTH / 2)
        _prune(sessions, set())  # gone again, from here
        clock.tick(MONTH - timedelta(seconds=1))
        assert _prune(sessions, set()).rollouts == 0
        clock.tick(timedelta(seconds=2))
        assert _prune(sessions, set()).rollouts == 1


def test_no_rollout_is_forgotten_without_the_whole_desired_state_or_a_retention(
    sessions: Sessions,
) -> None:
    with freeze_time(T0) as clock:
        _store(sessions, GONE)
        for _ in range(3):
            assert _prune(sessions, None).rollouts == 0  # some object could not be read
            assert _prune(sessions, set(), forget_after=None).rollouts == 0  # never forget
            clock.tick(MONTH)
    assert _templates(sessions) == {GONE}
    # An unreadable object may be any template; an invalid template is still there.
    assert declared_templates(desired_from("[not, an, object]")) is None
    invalid = desired_from("""
apiVersion: pluginctl.dev/v1alpha1
kind: WorkspaceTemplate
metadata: {name: base}
spec:
  rollout: {steps: [50, 10], bakeSeconds: 0, maxFailedWorkspaces: 0}
  plugins: [{source: local://plugins/notes}]
""")
    assert invalid.templates[KEPT].error and declared_templates(invalid) == {KEPT}


async def test_the_loop_forgets_the_rollout_of_a_removed_template_and_it_starts_afresh(
    sessions: Sessions, policy: Policy,
) -> None:
    with freeze_time(T0, real_asyncio=True) as clock:
        _store(sessions, GONE)
        assert _prune(sessions, {KEPT}).rollouts == 0  # the loop's prune would note it too
        clock.tick(MONTH + HOUR)
        stop = asyncio.Event()
        async with RuntimeDriver.for_policy(policy) as driver:
            loop = asyncio.create_task(run_forever(
                lambda: fleet("ws-1"), sessions, driver, policy, interval=0.2, stop=stop))
            try:
                await wait_for(lambda: GONE not in _templates(sessions),
                               "the loop's first prune")
            finally:
                stop.set()
                await loop
        assert _templates(sessions) == {KEPT}  # its own template's, stored by its passes

        # The template comes back, with another plugin list: stable at once, as a new one.
        back = desired_from(f"""
apiVersion: pluginctl.dev/v1alpha1
kind: WorkspaceTemplate
metadata: {{name: gone}}
spec:
  rollout: {{steps: [10, 100], bakeSeconds: 60, maxFailedWorkspaces: 0}}
  plugins: [{{source: {NOTES.source}}}]
""")
        await one_pass(back, sessions, policy)
    with transaction(sessions) as session:
        again = queries.load_rollouts(session)[GONE]
    assert again.stable == Revision.of([NOTES]) and again.target is None
