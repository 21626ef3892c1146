"""A transaction PostgreSQL aborts to break a deadlock is run again (`run_transaction`, under
every `in_thread`): two writers that lock the same workspaces in different orders, as a
heartbeat flush and a pass's claim may, both get their work done."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from controller.domain.models import Plugin, utcnow
from controller.store import (
    DatabaseError,
    Session,
    Sessions,
    make_engine,
    make_sessions,
    queries,
    run_transaction,
    transaction,
    upgrade,
)
from tests.support.helpers import fresh_postgres_database

pytestmark = pytest.mark.postgres


@pytest.fixture
def pg_sessions(postgres_url: str) -> Iterator[Sessions]:
    url, drop = fresh_postgres_database(postgres_url)
    engine = make_engine(url)
    upgrade(engine)
    try:
        yield make_sessions(engine)
    finally:
        engine.dispose()
        drop()


def _register(sessions: Sessions, *ids: str) -> None:
    with transaction(sessions) as session:
        queries.record_registers(session, [(i, "http://127.0.0.1:9", [Plugin("a", "git://x/a")],
                                            None, None) for i in ids], utcnow())


def _touching(first: str, second: str, *, meet: threading.Barrier, attempts: list[str]
              ) -> Callable[[Session], None]:
    """Work that marks `first` alive, waits (on its first run) until the other writer holds
    `second`, then marks `second`: two of them in opposite orders deadlock."""

    def work(session: Session) -> None:
        attempts.append(first)
        at = utcnow() + timedelta(seconds=len(attempts))
        queries.touch(session, {first: at})
        if attempts.count(first) == 1:
            meet.wait(timeout=30)
        queries.touch(session, {second: at})

    return work


def test_a_deadlocked_transaction_is_run_again(pg_sessions: Sessions) -> None:
    _register(pg_sessions, "ws-a", "ws-b")
    meet, attempts = threading.Barrier(2), []
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(run_transaction, pg_sessions,
                            _touching(a, b, meet=meet, attempts=attempts))
                for a, b in (("ws-a", "ws-b"), ("ws-b", "ws-a"))]
        for future in done:
            future.result(timeout=60)  # neither raised
    # The server aborted one of the two (after its deadlock_timeout); it ran again.
    assert len(attempts) == 3, attempts


def test_a_deadlock_is_not_tried_forever(pg_sessions: Sessions,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With one attempt allowed, the deadlock reaches the caller as a DatabaseError."""
    monkeypatch.setattr("controller.store.database.ATTEMPTS", 1)
    _register(pg_sessions, "ws-a", "ws-b")
    meet, attempts = threading.Barrier(2), []
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(run_transaction, pg_sessions,
                            _touching(a, b, meet=meet, attempts=attempts))
                for a, b in (("ws-a", "ws-b"), ("ws-b", "ws-a"))]
        errors = [future.exception(timeout=60) for future in done]
    failed = [e for e in errors if e is not None]
    assert len(failed) == 1 and isinstance(failed[0], DatabaseError)
    assert "deadlock detected" in str(failed[0])
    assert len(attempts) == 2


def test_other_errors_are_not_tried_again(pg_sessions: Sessions) -> None:
    runs = []

    def work(session: Session) -> None:
        runs.append(1)
        queries.touch(session, {"ws-x": utcnow()})
        raise DatabaseError("not a deadlock")

    with pytest.raises(DatabaseError, match="not a deadlock"):
        run_transaction(pg_sessions, work)
    assert runs == [1]
