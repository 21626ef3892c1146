"""Fuzzing the registry over real HTTP (Hypothesis): whatever arrives — arbitrary JSON, bodies
shaped like the API's with wrong values, raw bytes — the answer is never a 5xx, and a
refused request writes nothing."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controller.registry import app as registry
from controller.registry.app import make_app
from controller.registry.serving import start_site
from controller.registry.tokens import issue_token
from controller.store import Sessions, make_engine, make_sessions, upgrade
from tests.support.helpers import snapshot


class LiveRegistry:
    def __init__(self, url: str, sessions: Sessions, token: str) -> None:
        self.url, self.sessions, self.token = url, sessions, token


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveRegistry]:
    """The registry on its own event loop in a thread, so that Hypothesis can drive it from
    a plain test function."""
    database: Path = tmp_path_factory.mktemp("fuzz") / "pluginctl.db"
    engine = make_engine(f"sqlite:///{database}")
    upgrade(engine)
    sessions = make_sessions(engine)
    token = issue_token(sessions, "ws-1")
    issue_token(sessions, "ws-2")
    # "Still alive" is batched and written up to a second later; here it is never written
    # in the background, so that a snapshot taken around a refused request sees only what
    # that request did.
    patch = pytest.MonkeyPatch()
    patch.setattr(registry, "FLUSH_SECONDS", 3600.0)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(make_app(sessions))

    async def start() -> int:
        await runner.setup()
        return await start_site(runner, "127.0.0.1", 0)

    port = asyncio.run_coroutine_threadsafe(start(), loop).result(30)
    try:
        yield LiveRegistry(f"http://127.0.0.1:{port}", sessions, token)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        engine.dispose()
        patch.undo()


def send(live: LiveRegistry, path: str, data: bytes, token: str | None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(live.url + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        text = error.read()
        try:
            return error.code, json.loads(text or b"null")
        except ValueError:
            return error.code, text  # not JSON: reported as it came


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                 max_size=4),
    max_leaves=12)
anything = st.one_of(json_values, st.just(""), st.text(max_size=300))
plugin = st.fixed_dictionaries(
    {"name": st.one_of(st.sampled_from(["seo-all", "notes", "web", "", "a" * 70, "../x"]),
                       anything),
     "source": st.one_of(st.sampled_from(["local://x", "gitea://o/r#v1", "nope", ""]), anything)},
    optional={"digest": anything, "extra": anything})
shaped = st.fixed_dictionaries(
    {"workspace_id": st.one_of(st.sampled_from(["ws-1", "ws-2", "ws-9", "", "w" * 300]),
                               anything)},
    optional={
        "url": st.one_of(st.sampled_from([
            "http://127.0.0.1:9/", "ftp://x/", "http://u:p@h/", "http://169.254.169.254/",
            "http://[fe80::1]/", "http://h:99999/", "", "h" * 3000]), anything),
        "plugins": st.one_of(st.lists(plugin, max_size=4), anything),
        "seq": st.one_of(st.integers(), anything),
        "status": anything,
    })


valid_plugin = st.fixed_dictionaries(
    {"name": st.from_regex(r"[a-z][a-z0-9-]{0,20}", fullmatch=True),
     "source": st.sampled_from(["local://plugins/x", "gitea://org/repo/x#v1",
                                "https://example.com/p.tgz#sha256-1"])},
    optional={"digest": st.text(min_size=1, max_size=20)})
well_formed = st.fixed_dictionaries(
    {"workspace_id": st.just("ws-1"),
     "plugins": st.lists(valid_plugin, max_size=5, unique_by=lambda p: p["name"])},
    optional={"seq": st.integers(min_value=0, max_value=2**63 - 1),
              "url": st.sampled_from(["http://127.0.0.1:9/", "https://ws-1.example:8443/"])})


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(["/registry/register", "/registry/heartbeat"]),
       body=st.one_of(well_formed, shaped, anything),
       raw=st.one_of(st.none(), st.none(), st.binary(max_size=64)),
       token=st.sampled_from(["own", "own", "none", "bogus"]))
def test_no_5xx_and_no_write_on_refusal(live: LiveRegistry, path: str, body: Any,
                                        raw: bytes | None, token: str) -> None:
    data = raw if raw is not None else json.dumps(body).encode()
    chosen = {"own": live.token, "none": None, "bogus": "plc_bogus"}[token]
    before = snapshot(live.sessions)
    status, answer = send(live, path, data, chosen)
    assert status < 500, (status, answer)
    assert status in (200, 400, 401, 403, 409, 413, 422), (status, answer)
    if status != 200:
        assert isinstance(answer, dict) and answer.get("error"), answer
        assert snapshot(live.sessions) == before
