"""Schemathesis (from PyPI) fuzzes a running registry from its own OpenAPI document: positive
and negative data (its examples, coverage and fuzzing phases), with the workspace's own token,
with the tokens schemathesis makes up, with none and with another workspace's, on SQLite and
PostgreSQL. Every check schemathesis has must pass, and a rejected call must leave every table
as it was (issue 15)."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from datetime import datetime

import pytest
import requests
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.parameters import ParameterLocation

from controller.domain.models import WORKSPACE_ID_PATTERN, Policy, utcnow
from controller.engine.queue import WorkQueue
from controller.engine.service import serve
from controller.registry import openapi
from controller.registry.app import issue_token
from controller.store import Sessions, transaction
from tests.support.helpers import seen_of, snapshot

#: Reproducible: a fixed seed, no example database (nothing is written into the repository),
#: and a bounded number of generated cases per operation and mode.
CONFIG = {
    "seed": 15,
    "suppress-health-check": ["all"],
    "generation": {"mode": "all", "max-examples": 25, "deterministic": True,
                   "database": "none"},
}
OTHER = "someone-else"  # owns the token of the "other" calls (not a workspace the cases name)
REGISTRY_CALLS = {"POST /registry/register", "POST /registry/heartbeat"}
_ID = re.compile(WORKSPACE_ID_PATTERN)

schema = schemathesis.openapi.from_path(openapi.PATH, config=schemathesis.Config.from_dict(CONFIG))
load_all_checks()
EVERY_CHECK = CHECKS.get_all()


@schema.hook
def map_case(_context: schemathesis.HookContext, case: schemathesis.Case) -> schemathesis.Case:
    """The one rule of the document JSON Schema cannot state (its description does): a report
    names each plugin once. Positive cases keep the first plugin of each name."""
    body = case.body
    if (case.meta is not None and case.meta.generation.mode is GenerationMode.POSITIVE
            and isinstance(body, dict) and isinstance(body.get("plugins"), list)):
        seen: set[str] = set()
        body["plugins"] = [plugin for plugin in body["plugins"]
                           if not (plugin["name"] in seen or seen.add(plugin["name"]))]
    return case


class ServedRegistry:
    """The registry as `pluginctl run` serves it (engine.service.serve: the same app, site and
    connection limits) on loopback, on an event loop in a thread of its own, so that the
    synchronous schemathesis calls come over real HTTP. The control loop is left out: only
    the registry is under test, and the loop writes on its own schedule."""

    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions
        self.url = ""
        self.tokens: dict[str, str] = {}  # workspace -> its token
        self.answers: Counter[int] = Counter()
        self.alive: tuple[str, datetime] | None = None  # a heartbeat to be flushed
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="registry", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as error:  # raised again by start() or stop()
            self._error = error
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()

        def started(port: int) -> None:
            self.url = f"http://127.0.0.1:{port}"
            self._ready.set()

        async def no_loop(_queue: WorkQueue, stop: asyncio.Event) -> None:
            await stop.wait()

        await serve(None, self.sessions, Policy(), host="127.0.0.1", port=0, interval=3600,
                    started=started, stop=self._stop, loop_factory=no_loop)

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise AssertionError(f"the registry did not start: {self._error!r}")

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the registry did not stop"
        if self._error is not None:
            raise self._error

    def token(self, workspace_id: str) -> str:
        if workspace_id not in self.tokens:
            self.tokens[workspace_id] = issue_token(self.sessions, workspace_id)
        return self.tokens[workspace_id]

    def settle(self) -> None:
        """Wait (with a deadline) until the last accepted heartbeat's still-alive time, which
        the registry writes in batches, is in the store: the one write that may follow an
        answer, so that it is not taken for a write of the next call."""
        if self.alive is None:
            return
        workspace_id, sent = self.alive
        deadline = time.monotonic() + 10
        while True:
            with transaction(self.sessions) as session:
                seen = seen_of(session, workspace_id).last_seen_at
            if seen is not None and seen >= sent:
                break
            assert time.monotonic() < deadline, f"{workspace_id}'s heartbeat was never written"
            time.sleep(0.02)
        self.alive = None


@pytest.fixture
def served(sessions: Sessions, request: pytest.FixtureRequest) -> Iterator[ServedRegistry]:
    registry = ServedRegistry(sessions)
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()
    operation = request.node.name.split("[")[1].rstrip("]")
    credentials = request.node.callspec.params["credentials"]
    # Not a vacuous run: with its own token, schema-valid calls are recorded; without, none.
    if operation in REGISTRY_CALLS:
        accepted = registry.answers[200]
        assert accepted > 0 if credentials == "own" else accepted == 0, registry.answers


def headers_for(case: schemathesis.Case, served: ServedRegistry, credentials: str
                ) -> dict[str, str] | None:
    """The Authorization header of one call (None: the one schemathesis generated, if any)."""
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        return None  # the header is what this case gets wrong: replacing it would make it valid
    if credentials == "none":
        if case.headers:
            case.headers = {k: v for k, v in case.headers.items() if k.lower() != "authorization"}
        return None
    if credentials == "other":
        return {"Authorization": f"Bearer {served.token(OTHER)}"}
    if credentials == "own":
        body = case.body if isinstance(case.body, dict) else {}
        named = body.get("workspace_id")
        workspace_id = named if isinstance(named, str) and _ID.fullmatch(named) else "ws-1"
        if (case.operation.label == "POST /registry/heartbeat"
                and zlib.crc32(workspace_id.encode()) % 2):
            # Half of the workspaces registered first: their heartbeats are recorded, the
            # others' are refused (409).
            token = served.token(workspace_id)
            answer = requests.post(f"{served.url}/registry/register", timeout=10, json={
                "workspace_id": workspace_id, "url": "http://127.0.0.1:9"},
                headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == 200, answer.text
        return {"Authorization": f"Bearer {served.token(workspace_id)}"}
    return None  # "generated": made up by schemathesis, or absent in a negative case


@pytest.mark.parametrize("credentials", ["own", "generated", "none", "other"])
@schema.parametrize()
def test_the_registry_passes_every_schemathesis_check(
    case: schemathesis.Case, served: ServedRegistry, credentials: str
) -> None:
    headers = headers_for(case, served, credentials)
    served.settle()
    before = snapshot(served.sessions)
    sent = utcnow()
    response = case.call_and_validate(base_url=served.url, headers=headers, checks=EVERY_CHECK)
    served.answers[response.status_code] += 1
    if response.status_code >= 400:
        assert snapshot(served.sessions) == before, f"{response.status_code} but written"
    elif case.operation.label == "POST /registry/heartbeat":
        served.alive = (case.body["workspace_id"], sent)
