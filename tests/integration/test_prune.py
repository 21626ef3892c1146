"""The store stays bounded (store/queries/prune.py, run by engine/loop.py): revoked tokens go
a day after their revocation, restarts once the budget no longer counts them, failure
records and undeclared workspaces after `forget_after`; declared workspaces, however long
offline, keep what pluginctl installed there. On each database, with time under freezegun."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import timedelta

from freezegun import freeze_time
from sqlalchemy import func, select

from controller.domain import tokens
from controller.domain.models import Policy, utcnow
from controller.engine.loop import PRUNE_EVERY, Pruning, declared_ids, run_forever
from controller.registry.app import Ingest
from controller.runtime.driver import RuntimeDriver
from controller.store import Sessions, queries, transaction
from controller.store.tables import AttemptRow, OwnedPluginRow, RestartRow, WorkspaceRow
from tests.support.helpers import desired_from, fleet, wait_for

T0 = "2026-03-01 12:00:00"
MONTH = timedelta(days=30)
HOUR = timedelta(hours=1)


def _seen(sessions: Sessions, workspace_id: str, *, owned: bool = True) -> None:
    """A runtime registered now, pluginctl installed a plugin there, one failed and a restart
    happened: every row a workspace can have."""
    now = utcnow()
    with transaction(sessions) as session:
        queries.record_register(session, workspace_id, f"http://{workspace_id}.test",
                                report=[], now=now)
        session.flush()
        if owned:
            session.add(OwnedPluginRow(workspace_id=workspace_id, name="notes",
                                       source="local://plugins/notes", installed_at=now))
        session.add(AttemptRow(workspace_id=workspace_id, key="seo-all", failures=1,
                               last_error="boom", last_attempt_at=now,
                               next_retry_at=now + timedelta(seconds=5)))
        session.add(RestartRow(workspace_id=workspace_id, at=now))


def _token(sessions: Sessions, workspace_id: str, *, revoked: bool = False) -> str:
    digest = tokens.digest(tokens.generate())
    with transaction(sessions) as session:
        queries.add_token(session, workspace_id, digest, now=utcnow())
        if revoked:
            queries.revoke_tokens(session, [digest], utcnow())
    return digest


def _prune(sessions: Sessions, declared: set[str] | None,
           forget_after: timedelta | None = MONTH) -> queries.Pruned:
    with transaction(sessions) as session:
        return queries.prune(session, now=utcnow(), declared=declared,
                             forget_after=forget_after, restart_window=HOUR)


def _rows(sessions: Sessions) -> dict[str, dict[str, int]]:
    """Per table, rows per workspace."""
    with transaction(sessions) as session:
        return {table.__tablename__: dict(session.execute(  # type: ignore[arg-type]
            select(table.workspace_id, func.count()).group_by(table.workspace_id)).all())
            for table in (WorkspaceRow, OwnedPluginRow, AttemptRow, RestartRow)}


def test_revoked_tokens_go_a_day_after_revocation_live_ones_stay(sessions: Sessions) -> None:
    with freeze_time(T0) as clock:
        old = _token(sessions, "ws-1", revoked=True)
        live = _token(sessions, "ws-1")
        clock.tick(timedelta(hours=12))
        young = _token(sessions, "ws-2", revoked=True)
        clock.tick(timedelta(hours=12, seconds=-1))  # the old one: a second short of a day

        assert _prune(sessions, {"ws-1", "ws-2"}).tokens == 0

        clock.tick(timedelta(seconds=2))
        pruned = _prune(sessions, {"ws-1", "ws-2"})

        assert pruned.tokens == 1
        with transaction(sessions) as session:
            assert [h for h, *_ in queries.tokens_of(session, "ws-1")] == [live]
            assert [h for h, *_ in queries.tokens_of(session, "ws-2")] == [young]
            assert queries.token_workspace(session, live) == "ws-1"
            assert queries.token_workspace(session, old) is None  # refused, row or no row


def test_restarts_go_once_outside_the_budget_window(sessions: Sessions) -> None:
    with freeze_time(T0) as clock:
        _seen(sessions, "ws-1")
        clock.tick(timedelta(minutes=40))
        with transaction(sessions) as session:
            session.add(RestartRow(workspace_id="ws-1", at=utcnow()))
        clock.tick(timedelta(minutes=30))

        assert _prune(sessions, {"ws-1"}).restarts == 1

        assert _rows(sessions)["restarts"] == {"ws-1": 1}


def test_undeclared_workspaces_unseen_past_the_retention_are_forgotten_with_their_rows(
    sessions: Sessions,
) -> None:
    with freeze_time(T0) as clock:
        for workspace_id in ("gone", "declared-offline", "paused", "holds-token",
                             "recently-revoked", "seen-later", "acted-on"):
            _seen(sessions, workspace_id)
        with transaction(sessions) as session:
            queries.set_dormant(session, "paused", True)
        _token(sessions, "holds-token")
        clock.tick(MONTH - timedelta(hours=6))
        _token(sessions, "recently-revoked", revoked=True)  # kept a day for the registries
        clock.tick(timedelta(days=-20))
        with transaction(sessions) as session:
            queries.touch(session, {"seen-later": utcnow()})
        clock.tick(timedelta(days=20, hours=6, seconds=-1))  # a month, less a second
        with transaction(sessions) as session:  # a replica is calling its runtime right now
            queries.claim(session, ["acted-on"], "replica-1", now=utcnow(),
                          until=utcnow() + timedelta(minutes=2))

        assert _prune(sessions, {"declared-offline"}).workspaces == 0

        clock.tick(timedelta(seconds=2))
        pruned = _prune(sessions, {"declared-offline"})

        assert pruned.workspaces == 1
        rows = _rows(sessions)
        assert set(rows["workspaces"]) == {"declared-offline", "paused", "holds-token",
                                           "recently-revoked", "seen-later", "acted-on"}
        assert "gone" not in rows["owned_plugins"] | rows["attempts"] | rows["restarts"]
        # A declared workspace, however long offline, keeps what pluginctl installed there.
        assert rows["owned_plugins"]["declared-offline"] == 1
        # A month-old failure is forgotten everywhere; restarts that old too.
        assert rows["attempts"] == {} and rows["restarts"] == {}

        clock.tick(timedelta(days=1))  # the revoked token is gone, the claim ran out
        assert _prune(sessions, {"declared-offline"}).workspaces == 2
        assert set(_rows(sessions)["workspaces"]) == {"declared-offline", "paused",
                                                      "holds-token", "seen-later"}


def test_no_workspace_is_forgotten_without_the_whole_desired_state_or_a_retention(
    sessions: Sessions,
) -> None:
    with freeze_time(T0) as clock:
        _seen(sessions, "gone")
        clock.tick(MONTH * 3)

        unreadable = _prune(sessions, None)
        never = _prune(sessions, set(), forget_after=None)

        assert unreadable.workspaces == 0 and never.workspaces == never.attempts == 0
        assert _rows(sessions)["owned_plugins"] == {"gone": 1}


async def test_the_loop_prunes_at_start_and_then_at_most_every_hour(
    sessions: Sessions, policy: Policy
) -> None:
    with freeze_time(T0, real_asyncio=True) as clock:
        _seen(sessions, "ws-1")
        _seen(sessions, "gone")
        clock.tick(MONTH + HOUR)
        stop = asyncio.Event()
        async with RuntimeDriver.for_policy(policy) as driver:
            loop = asyncio.create_task(run_forever(
                lambda: fleet("ws-1"), sessions, driver, policy, interval=0.2, stop=stop))
            try:
                await wait_for(lambda: "gone" not in _rows(sessions)["workspaces"],
                               "the loop's first prune")
            finally:
                stop.set()
                await loop
    assert _rows(sessions)["owned_plugins"] == {"ws-1": 1}

    pruning = Pruning(sessions=sessions, policy=policy)
    desired = fleet("ws-1")
    pruning.start_if_due(None, 0.0)  # no full pass has read desired state yet
    assert pruning.task is None
    pruning.start_if_due(desired, 0.0)
    first = pruning.task
    assert first is not None
    await first
    pruning.start_if_due(desired, PRUNE_EVERY - 1)
    assert pruning.task is first
    pruning.start_if_due(desired, PRUNE_EVERY)
    assert pruning.task is not first and pruning.task is not None
    await pruning.task

    dry = Pruning(sessions=sessions, policy=replace(policy, dry_run=True))
    dry.start_if_due(desired, 0.0)
    assert dry.task is None
    broken = desired_from("[not, an, object]")
    assert broken.errors  # an unreadable object may name any workspace
    assert declared_ids(broken) is None
    assert declared_ids(desired) == frozenset({"ws-1"})


def test_a_registry_that_missed_the_revocations_reloads_its_tokens(sessions: Sessions) -> None:
    """A registry that could not read revocations for longer than revoked rows are kept (the
    database was away, the process was stopped) cannot learn of a revocation whose row is
    pruned already: it loads the live tokens afresh instead, so the revoked token stops
    working all the same."""
    revoked, kept = "plc_revoked-one", "plc_kept-one"
    ingest = Ingest(sessions, lambda _workspace_id: None)
    with freeze_time(T0) as clock:
        with transaction(sessions) as session:
            queries.add_token(session, "ws-1", tokens.digest(revoked), now=utcnow())
            queries.add_token(session, "ws-2", tokens.digest(kept), now=utcnow())
        ingest.warm_up()
        assert set(ingest.tokens) == {tokens.digest(revoked), tokens.digest(kept)}

        clock.tick(HOUR)  # revoked while this registry hears nothing of it...
        with transaction(sessions) as session:
            queries.revoke_tokens(session, [tokens.digest(revoked)], now=utcnow())
        clock.tick(timedelta(days=2))  # ...and pruned before it reads again
        with transaction(sessions) as session:
            assert queries.forget_revoked_tokens(session, utcnow()) == 1
        ingest.flush({})

    assert set(ingest.tokens) == {tokens.digest(kept)}
