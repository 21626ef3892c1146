"""A transaction PostgreSQL aborts to break a deadlock is run again (`run_transaction`, under
every `in_thread`): two writers that lock the same workspaces in different orders, as a
heartbeat flush and a pass's claim may, both get their work done."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest

from controller.domain.models import Plugin, utcnow
from controller.store import (
    DatabaseError,
    Session,
    Sessions,
    queries,
    run_transaction,
    transaction,
)

# PostgreSQL only (SQLite has one writer and never deadlocks): the shared `sessions` fixture,
# on that database alone.
pytestmark = [pytest.mark.postgres,
              pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)]


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


def _two_writers_in_opposite_orders(sessions: Sessions) -> tuple[list[BaseException | None],
                                                                 list[str]]:
    """Run the two deadlocking writers at once: what each raised, and every run of either."""
    _register(sessions, "ws-a", "ws-b")
    meet, attempts = threading.Barrier(2), []
    with ThreadPoolExecutor(2) as pool:
        done = [pool.submit(run_transaction, sessions,
                            _touching(a, b, meet=meet, attempts=attempts))
                for a, b in (("ws-a", "ws-b"), ("ws-b", "ws-a"))]
        errors = [future.exception(timeout=60) for future in done]
    return errors, attempts


def test_a_deadlocked_transaction_is_run_again(sessions: Sessions) -> None:
    errors, attempts = _two_writers_in_opposite_orders(sessions)
    assert errors == [None, None]
    # The server aborted one of the two (after its deadlock_timeout); it ran again.
    assert len(attempts) == 3, attempts


def test_a_deadlock_is_not_tried_forever(sessions: Sessions,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With one attempt allowed, the deadlock reaches the caller as a DatabaseError."""
    monkeypatch.setattr("controller.store.database.ATTEMPTS", 1)
    errors, attempts = _two_writers_in_opposite_orders(sessions)
    failed = [e for e in errors if e is not None]
    assert len(failed) == 1 and isinstance(failed[0], DatabaseError)
    assert "deadlock detected" in str(failed[0])
    assert len(attempts) == 2


def test_other_errors_are_not_tried_again(sessions: Sessions) -> None:
    runs = []

    def work(session: Session) -> None:
        runs.append(1)
        queries.touch(session, {"ws-x": utcnow()})
        raise DatabaseError("not a deadlock")

    with pytest.raises(DatabaseError, match="not a deadlock"):
        run_transaction(sessions, work)
    assert runs == [1]
