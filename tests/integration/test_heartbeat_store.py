"""The store's side of the heartbeat path: the registry's hot queries (the group check and
the batched "still alive" write) have one statement text whatever the number of workspaces
(compiled and prepared once, no Python work per id), and keep their guarantees."""

from __future__ import annotations

from datetime import timedelta
from functools import partial

from sqlalchemy import Connection

from controller.domain.models import Plugin, utcnow
from controller.store import PinnedReader, Sessions, count_statements, queries, transaction


def _register(sessions: Sessions, ids: list[str]) -> None:
    now = utcnow()
    with transaction(sessions) as session:
        queries.record_registers(session, [(i, "http://127.0.0.1:9", [Plugin("a", "git://x/a")],
                                            None, None) for i in ids], now)


def _stored(connection: Connection, *, ids: list[str]
            ) -> dict[str, tuple[str | None, int | None]]:
    return queries.stored_report_digests(connection, ids)


def test_the_group_check_is_one_statement_whatever_the_group(sessions: Sessions) -> None:
    ids = [f"ws-{i}" for i in range(40)]
    _register(sessions, ids)
    reader = PinnedReader(sessions)
    try:
        texts = []
        for size in (1, 7, 40):
            with count_statements(sessions) as statements:
                stored = reader.run(partial(_stored, ids=[*ids[:size], "ws-unregistered"]))
            assert set(stored) == set(ids[:size])
            texts += statements
        assert len(texts) == 3 and len(set(texts)) == 1
    finally:
        reader.close()


def test_still_alive_is_one_statement_per_time_and_keeps_its_guarantees(
        sessions: Sessions) -> None:
    ids = [f"ws-{i}" for i in range(30)]
    _register(sessions, ids)
    now = utcnow()
    ahead = now + timedelta(seconds=30)
    with transaction(sessions) as session:
        queries.touch(session, {"ws-0": ahead})  # seen later already: never moved back
    earlier, later = now + timedelta(seconds=1), now + timedelta(seconds=2)
    seen = {i: (earlier if n % 2 else later) for n, i in enumerate(ids)}
    seen["ws-unregistered"] = later
    with count_statements(sessions) as statements, transaction(sessions) as session:
        queries.touch(session, seen)
    assert len(statements) == 2 and len(set(statements)) == 1  # two times, one text
    with transaction(sessions) as session:
        observed = queries.load_observed(session, now=later)
    last_seen = {i: observed[i].last_seen_at if i in observed else None
                 for i in [*ids, "ws-unregistered"]}
    assert last_seen["ws-0"] == ahead
    assert all(last_seen[i] == seen[i] for i in ids[1:])
    assert last_seen["ws-unregistered"] is None
