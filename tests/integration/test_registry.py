"""The registry API over real HTTP on loopback: it records facts, and refuses bad input with
the right code while writing nothing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from controller.domain.models import Plugin, utcnow
from controller.store import count_statements, queries, transaction
from tests.support.helpers import Registry, seen_of, snapshot, wait_for

PLUGINS = [{"name": "seo-all", "source": "gitea://org/repo/agent-skills/seo-all#v1"}]




@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def post(http: aiohttp.ClientSession, registry: Registry, path: str, body: Any,
               token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    async with http.post(registry.url + path, data=data, headers=headers) as response:
        return response.status, await response.json(content_type=None)


async def test_register_and_heartbeat_record_facts(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    token = registry.token("ws-1")
    status, body = await post(http, registry, "/registry/register",
                              {"workspace_id": "ws-1", "url": "http://10.0.0.7:8080"}, token)
    assert (status, body) == (200, {"status": "online"})
    assert set(registry.hints.take()) == {"ws-1"}
    with transaction(registry.sessions) as session:
        seen = queries.load_observed(session, now=utcnow())["ws-1"]
    assert seen.url == "http://10.0.0.7:8080" and seen.report is None
    assert seen.last_seen_at is not None

    status, body = await post(http, registry, "/registry/heartbeat",
                              {"workspace_id": "ws-1", "plugins": PLUGINS}, token)
    assert (status, body) == (200, {"status": "ok"})
    with transaction(registry.sessions) as session:
        seen = queries.load_observed(session, now=utcnow())["ws-1"]
    assert seen.report is not None and list(seen.report) == ["seo-all"]

    # Without `plugins` nothing is known from the call: the last report stays.
    status, _ = await post(http, registry, "/registry/heartbeat", {"workspace_id": "ws-1"}, token)
    assert status == 200
    with transaction(registry.sessions) as session:
        assert list(seen_of(session, "ws-1").report or {}) == ["seo-all"]

    # `[]` is a report: it replaces the last one.
    status, _ = await post(http, registry, "/registry/heartbeat",
                           {"workspace_id": "ws-1", "plugins": []}, token)
    assert status == 200
    with transaction(registry.sessions) as session:
        assert seen_of(session, "ws-1").report == {}

    # A new register without a report drops the old one: a restarted box may have lost it.
    await post(http, registry, "/registry/heartbeat", {"workspace_id": "ws-1", "plugins": PLUGINS},
               token)
    await post(http, registry, "/registry/register",
               {"workspace_id": "ws-1", "url": "http://10.0.0.7:8080"}, token)
    with transaction(registry.sessions) as session:
        assert seen_of(session, "ws-1").report is None


async def test_healthz(registry: Registry, http: aiohttp.ClientSession) -> None:
    async with http.get(registry.url + "/healthz") as response:
        assert response.status == 200


REGISTER = {"workspace_id": "ws-1", "url": "http://127.0.0.1:9000"}

BAD_REQUESTS = [
    # (name, path, body, token kind, expected status, words in the error)
    ("no token", "/registry/register", REGISTER, None, 401, "missing bearer token"),
    ("unknown token", "/registry/register", REGISTER, "bogus", 401, "unknown or revoked"),
    ("another workspace's token", "/registry/register", REGISTER, "other", 403,
     "does not belong"),
    ("malformed JSON", "/registry/register", '{"workspace_id": ', "own", 400, "malformed JSON"),
    ("not an object", "/registry/register", "[1, 2]", "own", 400, "JSON object"),
    ("wrong type", "/registry/register", {**REGISTER, "workspace_id": 7}, "own", 422,
     "workspace_id"),
    ("missing url", "/registry/register", {"workspace_id": "ws-1"}, "own", 422,
     "url: Field required"),
    ("empty status typo", "/registry/register", {**REGISTER, "status": ""}, "own", 422,
     "status: unknown field"),
    ("unknown heartbeat field", "/registry/heartbeat", {"workspace_id": "ws-1", "status": ""},
     "own", 422, "status: unknown field"),
    ("ftp url", "/registry/register", {**REGISTER, "url": "ftp://host/x"}, "own", 422,
     "http:// or https://"),
    ("url with credentials", "/registry/register",
     {**REGISTER, "url": "http://user:pw@host:1/"}, "own", 422, "credentials"),
    ("plugins not a list", "/registry/heartbeat", {"workspace_id": "ws-1", "plugins": "x"},
     "own", 422, "plugins"),
    ("plugin without source", "/registry/heartbeat",
     {"workspace_id": "ws-1", "plugins": [{"name": "a"}]}, "own", 422,
     "plugins[0].source: Field required"),
    ("plugin with a bad source", "/registry/heartbeat",
     {"workspace_id": "ws-1", "plugins": [{"name": "a", "source": "no scheme"}]}, "own", 422,
     "plugins[0].source"),
    ("plugin reported twice", "/registry/heartbeat",
     {"workspace_id": "ws-1", "plugins": PLUGINS * 2}, "own", 422, "reported twice"),
    ("cloud metadata url", "/registry/register",
     {**REGISTER, "url": "http://169.254.169.254/latest/"}, "own", 422, "link-local"),
    ("link-local v6 url", "/registry/register", {**REGISTER, "url": "http://[fe80::1]:8080/"},
     "own", 422, "link-local"),
    ("v4-mapped metadata url", "/registry/register",
     {**REGISTER, "url": "http://[::ffff:169.254.169.254]/"}, "own", 422, "link-local"),
    ("empty workspace id", "/registry/heartbeat", {"workspace_id": ""}, "own", 422,
     "workspace_id"),
    ("oversized body", "/registry/heartbeat",
     {"workspace_id": "ws-1", "pad": "x" * 300_000}, "own", 413, "larger than"),
]


@pytest.mark.parametrize(("path", "body", "token_kind", "code", "words"),
                         [case[1:] for case in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS])
async def test_bad_input_is_refused_and_changes_nothing(
    registry: Registry, http: aiohttp.ClientSession, path: str, body: Any,
    token_kind: str | None, code: int, words: str,
) -> None:
    own = registry.token("ws-1")
    other = registry.token("ws-2")
    # ws-1 is registered and has a report, so a bad heartbeat would have something to spoil.
    await post(http, registry, "/registry/register", {**REGISTER, "plugins": PLUGINS}, own)
    before = snapshot(registry.sessions)
    registry.hints.take()
    token = {"own": own, "other": other, "bogus": "plc_not-a-token", None: None}[token_kind]

    status, answer = await post(http, registry, path, body, token)

    assert status == code, answer
    assert isinstance(answer, dict) and words in answer["error"], answer
    assert snapshot(registry.sessions) == before
    assert set(registry.hints.take()) == set()


async def test_heartbeat_before_register_is_a_conflict(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    token = registry.token("ws-1")
    before = snapshot(registry.sessions)
    status, answer = await post(http, registry, "/registry/heartbeat",
                                {"workspace_id": "ws-1", "plugins": []}, token)
    assert status == 409 and "register first" in answer["error"]
    assert snapshot(registry.sessions) == before


async def test_tokens_are_stored_as_hashes(registry: Registry) -> None:
    token = registry.token("ws-1")
    stored = snapshot(registry.sessions)["tokens"]
    assert len(stored) == 1
    assert token not in repr(stored)


async def test_only_a_changed_report_hints_the_loop(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    token = registry.token("ws-1")
    await post(http, registry, "/registry/register", {**REGISTER, "plugins": PLUGINS}, token)
    assert set(registry.hints.take()) == {"ws-1"}  # a register always hints
    for _ in range(3):
        status, _ = await post(http, registry, "/registry/heartbeat",
                               {"workspace_id": "ws-1", "plugins": PLUGINS}, token)
        assert status == 200
    assert set(registry.hints.take()) == set()  # the same report again and again: no hint
    await post(http, registry, "/registry/heartbeat", {"workspace_id": "ws-1", "plugins": []},
               token)
    assert set(registry.hints.take()) == {"ws-1"}  # the box lost its plugins: look now


async def test_still_alive_is_batched_and_flushed_within_a_second(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    token = registry.token("ws-1")
    await post(http, registry, "/registry/register", {**REGISTER, "plugins": PLUGINS}, token)
    with transaction(registry.sessions) as session:
        registered_seen = queries.load_observed(session, now=utcnow())["ws-1"].last_seen_at
    assert registered_seen is not None
    status, _ = await post(http, registry, "/registry/heartbeat", {"workspace_id": "ws-1"}, token)
    assert status == 200

    async def flushed() -> bool:
        with transaction(registry.sessions) as session:
            seen = queries.load_observed(session, now=utcnow())["ws-1"].last_seen_at
        return seen is not None and seen > registered_seen

    deadline = asyncio.get_running_loop().time() + 3
    while not await flushed():
        assert asyncio.get_running_loop().time() < deadline, "still-alive never recorded"
        await asyncio.sleep(0.05)


async def test_a_changed_report_is_durable_when_the_call_returns(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    token = registry.token("ws-1")
    await post(http, registry, "/registry/register", {**REGISTER, "plugins": []}, token)
    await post(http, registry, "/registry/heartbeat", {"workspace_id": "ws-1", "plugins": []},
               token)
    await post(http, registry, "/registry/heartbeat",
               {"workspace_id": "ws-1", "plugins": PLUGINS}, token)
    with transaction(registry.sessions) as session:  # no waiting: it is already there
        assert list(seen_of(session, "ws-1").report or {}) == ["seo-all"]


async def test_a_revoked_token_stops_working_within_a_flush(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    token = registry.token("ws-1")
    status, _ = await post(http, registry, "/registry/register", REGISTER, token)
    assert status == 200  # the token is now in the registry's memory
    with transaction(registry.sessions) as session:
        hashes = [h for h, owner in queries.all_active_tokens(session).items() if owner == "ws-1"]
        assert queries.revoke_tokens(session, hashes, utcnow()) == 1

    async def refused() -> bool:
        status, _ = await post(http, registry, "/registry/heartbeat", {"workspace_id": "ws-1"},
                               token)
        return status == 401

    await wait_for(refused, "a revoked token to be refused", 3.0)


async def test_a_repeated_report_is_compared_with_the_store_not_with_the_last_call(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    """The runtime says what it said before, but the store holds something else by now (the
    loop recorded an install the runtime does not show, or another replica wrote): the
    runtime's word is stored before the call returns, and the loop is hinted."""
    token = registry.token("ws-1")
    await post(http, registry, "/registry/register", {**REGISTER, "plugins": PLUGINS}, token)
    await post(http, registry, "/registry/heartbeat", {"workspace_id": "ws-1", "plugins": PLUGINS},
               token)
    registry.hints.take()
    with transaction(registry.sessions) as session:
        queries.record_changed_report(session, "ws-1", [Plugin("other", "local://other")],
                                      now=utcnow())
    status, _ = await post(http, registry, "/registry/heartbeat",
                           {"workspace_id": "ws-1", "plugins": PLUGINS}, token)
    assert status == 200
    with transaction(registry.sessions) as session:  # no waiting: it is already there
        assert list(seen_of(session, "ws-1").report or {}) == ["seo-all"]
    assert set(registry.hints.take()) == {"ws-1"}


async def test_concurrent_heartbeats_share_a_check_and_each_gets_its_answer(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    tokens = {f"ws-{i}": registry.token(f"ws-{i}") for i in range(40)}
    for workspace_id in list(tokens)[:30]:  # the last ten never register
        status, _ = await post(http, registry, "/registry/register",
                               {**REGISTER, "workspace_id": workspace_id}, tokens[workspace_id])
        assert status == 200
    registry.hints.take()
    with count_statements(registry.sessions) as statements:
        answers = await asyncio.gather(*(
            post(http, registry, "/registry/heartbeat",
                 {"workspace_id": workspace_id, "plugins": PLUGINS}, token)
            for workspace_id, token in tokens.items()))
    assert [status for status, _ in answers] == [200] * 30 + [409] * 10
    assert set(registry.hints.take()) == set(list(tokens)[:30])  # each report is new to the store
    with transaction(registry.sessions) as session:
        observed = queries.load_observed(session, now=utcnow())
    assert all(list(observed[w].report or {}) == ["seo-all"] for w in list(tokens)[:30])
    checks = [s for s in statements if s.lstrip().upper().startswith("SELECT")
              and "report_digest" in s]
    assert len(checks) < 40, f"{len(checks)} checks for 40 concurrent heartbeats"


async def test_a_heartbeat_with_a_lower_seq_never_overwrites_a_newer_report(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    """Replayed and out-of-order heartbeats: a report sent with `seq` is stored only if its
    seq is above the stored report's; a register starts the count again."""
    token = registry.token("ws-1")
    other = [{"name": "other", "source": "local://other"}]

    async def beat(plugins: list[dict[str, str]], seq: int) -> None:
        status, _ = await post(http, registry, "/registry/heartbeat",
                               {"workspace_id": "ws-1", "plugins": plugins, "seq": seq}, token)
        assert status == 200

    def stored() -> list[str]:
        with transaction(registry.sessions) as session:
            return list(seen_of(session, "ws-1").report or {})

    await post(http, registry, "/registry/register", {**REGISTER, "seq": 1}, token)
    await beat(PLUGINS, 5)
    assert stored() == ["seo-all"]
    await beat(other, 3)  # late, or replayed by someone holding the token
    assert stored() == ["seo-all"]
    await beat(other, 5)  # not above either
    assert stored() == ["seo-all"]
    await beat(other, 6)
    assert stored() == ["other"]
    # Concurrent heartbeats in one burst: the highest seq wins, whatever the order.
    await asyncio.gather(*(beat(plugins, seq) for plugins, seq in
                           [(PLUGINS, 9), ([], 8), (other, 7)]))
    assert stored() == ["seo-all"]
    # A restarted runtime registers and counts from zero again.
    await post(http, registry, "/registry/register", {**REGISTER, "seq": 0}, token)
    await beat(other, 1)
    assert stored() == ["other"]
    status, answer = await post(http, registry, "/registry/heartbeat",
                                {"workspace_id": "ws-1", "seq": -1}, token)
    assert status == 422 and "seq" in answer["error"]


async def test_the_openapi_document_matches_the_models_and_the_running_server(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    """The committed document is what the request models generate (regenerate with
    `python -c "from controller.registry import openapi; print(openapi.text(), end='')"
    > controller/registry/registry-openapi.json`), the server serves it, every route the server
    has is in it and every operation in it is served."""
    from controller.registry import openapi
    from controller.registry.app import make_app

    assert openapi.PATH.read_text() == openapi.text(), "registry-openapi.json is stale"
    async with http.get(registry.url + "/openapi.json") as answer:
        assert answer.status == 200
        served = await answer.json()
    assert served == openapi.document()
    documented = {(method.upper(), path) for path, operations in served["paths"].items()
                  for method in operations}
    routes = {(route.method, route.resource.canonical)
              for route in make_app(registry.sessions).router.routes()
              if route.method != "HEAD" and route.resource is not None}
    assert routes == documented
    for method, path in documented:
        async with http.request(method, registry.url + path) as answer:
            assert answer.status not in (404, 405), (method, path)


async def test_a_reported_error_and_modified_plugin_are_stored_with_the_report(
    registry: Registry, http: aiohttp.ClientSession
) -> None:
    token = registry.token("ws-1")
    await post(http, registry, "/registry/register",
               {"workspace_id": "ws-1", "url": "http://10.0.0.7:8080", "plugins": []}, token)
    before = snapshot(registry.sessions)
    status, body = await post(http, registry, "/registry/heartbeat",
                              {"workspace_id": "ws-1", "error": "restart failed"}, token)
    assert status == 422 and "error: Value error, is part of a report" in body["error"]
    assert snapshot(registry.sessions) == before  # refused: nothing written

    edited = [{**PLUGINS[0], "modified": True}]
    status, _ = await post(http, registry, "/registry/heartbeat",
                           {"workspace_id": "ws-1", "plugins": edited,
                            "error": "restart command exited with 1"}, token)
    assert status == 200
    with transaction(registry.sessions) as session:
        seen = queries.load_observed(session, now=utcnow())["ws-1"]
    assert seen.runtime_error == "restart command exited with 1"
    assert seen.report is not None and seen.report["seo-all"].modified

    # The same plugins without the error: a changed report, the error is gone.
    status, _ = await post(http, registry, "/registry/heartbeat",
                           {"workspace_id": "ws-1", "plugins": edited}, token)
    assert status == 200
    with transaction(registry.sessions) as session:
        assert queries.load_observed(session, now=utcnow())["ws-1"].runtime_error is None
