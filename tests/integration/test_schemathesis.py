"""Schemathesis (from PyPI) fuzzes a running registry from its own OpenAPI document: positive
and negative data (its examples, coverage and fuzzing phases), each case sent with the
workspace's own token, with another workspace's, with the token schemathesis makes up and with
none, on SQLite and PostgreSQL. Every check schemathesis has must pass, and a rejected call must
leave every table as it was (issue 15).

Cost: the schema is loaded by a fixture (schemathesis.pytest.from_fixture), so its cases are
built when the test runs, on the one worker that runs it, not while every xdist worker collects
(the coverage phase draws a 500-plugin report: seconds each time). Each case is drawn once and
sent under every kind of credentials, and a table dump is taken again only after a write."""

from __future__ import annotations

import asyncio
import re
import threading
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

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
from controller.registry.tokens import issue_token
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
#: PostgreSQL gets the same examples and coverage cases (the boundaries: longest strings,
#: largest numbers, most plugins), and a smaller share of the random ones.
POSTGRESQL_CONFIG = {**CONFIG, "generation": {**CONFIG["generation"], "max-examples": 10}}
#: "none" comes last: it is the one that sends a copy of the case without its Authorization.
CREDENTIALS = ("own", "other", "generated", "none")
OTHER = "someone-else"  # owns the token of the "other" calls (not a workspace the cases name)
REGISTRY_CALLS = {"POST /registry/register", "POST /registry/heartbeat"}
_ID = re.compile(WORKSPACE_ID_PATTERN)

load_all_checks()
EVERY_CHECK = CHECKS.get_all()
schema = schemathesis.pytest.from_fixture("registry_schema")


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


@pytest.fixture
def registry_schema(db_url: str, request: pytest.FixtureRequest) -> Any:
    """The registry's own document, read when the test runs (see the module docstring); the
    database parameter comes through here, so each database is a test of its own."""
    if not hasattr(request.node, "_nodeid"):
        # schemathesis' lazy loader (4.32) renames the item through `_nodeid`, which pytest
        # 9.2 no longer has (it reads `nodeid` from elsewhere): give it one to write to.
        request.node._nodeid = request.node.nodeid
    config = CONFIG if db_url.startswith("sqlite") else POSTGRESQL_CONFIG
    loaded = schemathesis.openapi.from_path(openapi.PATH,
                                            config=schemathesis.Config.from_dict(config))
    loaded.hook(map_case)
    return loaded


class ServedRegistry:
    """The registry as `pluginctl run` serves it (engine.service.serve: the same app, site and
    connection limits) on loopback, on an event loop in a thread of its own, so that the
    synchronous schemathesis calls come over real HTTP. The control loop is left out: only
    the registry is under test, and the loop writes on its own schedule."""

    def __init__(self, sessions: Sessions, *, every_refusal: bool) -> None:
        self.sessions = sessions
        self.every_refusal = every_refusal  # also unknown and missing tokens (see calls())
        self.url = ""
        self.tokens: dict[str, str] = {}  # workspace -> its token
        self.answers: defaultdict[tuple[str, str], Counter[int]] = defaultdict(Counter)
        self.alive: tuple[str, datetime] | None = None  # a heartbeat to be flushed
        self._tables: dict[str, list[tuple[Any, ...]]] | None = None  # None: dump again
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
            self.written()
        return self.tokens[workspace_id]

    def tables(self) -> dict[str, list[tuple[Any, ...]]]:
        """Every row of every table: dumped again only after something may have written."""
        if self._tables is None:
            self._tables = snapshot(self.sessions)
        return self._tables

    def written(self) -> None:
        self._tables = None

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
        self.written()


@pytest.fixture
def served(sessions: Sessions, db_url: str) -> Iterator[ServedRegistry]:
    # On PostgreSQL, an unknown or a missing token is refused before the store is asked
    # anything but who owns a digest, the same query SQLite answers in its run.
    registry = ServedRegistry(sessions, every_refusal=db_url.startswith("sqlite"))
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()
    # Not a vacuous run: with its own token, schema-valid calls are recorded; with any other
    # credentials, none.
    for label in REGISTRY_CALLS & {label for label, _ in registry.answers}:
        for credentials in CREDENTIALS if registry.every_refusal else CREDENTIALS[:2]:
            answers = registry.answers[label, credentials]
            assert answers[200] > 0 if credentials == "own" else answers[200] == 0, (
                label, credentials, answers)


def own_token(case: schemathesis.Case, served: ServedRegistry) -> str:
    """The token of the workspace the body names (ws-1 when it names none that could exist)."""
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
        served.written()
    return served.token(workspace_id)


def calls(case: schemathesis.Case, served: ServedRegistry
          ) -> Iterator[tuple[str, schemathesis.Case, dict[str, str] | None]]:
    """The case under each kind of credentials it can tell anything about: (credentials, the
    case to send, the Authorization header to send it with; None: the one schemathesis
    generated, if any)."""
    if case.meta is not None and case.meta.is_negative_at(ParameterLocation.HEADER):
        # The header is what this case gets wrong: replacing it would make it valid, so every
        # kind of credentials sends the same call.
        yield "generated", case, None
        return
    yield "own", case, {"Authorization": f"Bearer {own_token(case, served)}"}
    if case.meta is not None and case.meta.generation.mode is not GenerationMode.POSITIVE:
        # Wrong in its body or method: refused alike with any known token (the body is read
        # before the token's owner is compared), and with an unknown or missing token before
        # the body is read at all, which the positive cases, the ones that would be written,
        # show.
        return
    yield "other", case, {"Authorization": f"Bearer {served.token(OTHER)}"}
    if served.every_refusal:
        yield "generated", case, None  # made up by schemathesis (absent in some cases)
        if "authorization" in {name.lower() for name in case.headers}:
            # A copy (the case itself is kept as drawn: its metadata follows its headers).
            yield "none", case.derive(headers={k: v for k, v in case.headers.items()
                                               if k.lower() != "authorization"}), None
    body = case.body
    if isinstance(body, dict) and body.get("error") is not None and "plugins" in body:
        # The if/then of the document, which schemathesis does not break on its own: the
        # same report's error without its plugins (a copy, negative in its body; last, as
        # the copy shares the case's metadata).
        without = case.derive()
        without.body = {key: value for key, value in body.items() if key != "plugins"}
        yield "own", without, {"Authorization": f"Bearer {own_token(case, served)}"}


def check(case: schemathesis.Case, served: ServedRegistry) -> None:
    """Send the case under every kind of credentials: every check passes, a refusal writes
    nothing."""
    label = case.operation.label
    for credentials, call, headers in calls(case, served):
        served.settle()
        before = served.tables()
        sent = utcnow()
        try:
            response = call.call_and_validate(base_url=served.url, headers=headers,
                                              checks=EVERY_CHECK)
        except BaseException as error:
            error.add_note(f"credentials: {credentials}")
            raise
        served.answers[label, credentials][response.status_code] += 1
        if response.status_code >= 400:
            assert snapshot(served.sessions) == before, (
                f"{credentials}: {response.status_code} but written")
            continue
        served.written()
        if label == "POST /registry/heartbeat":
            served.alive = (case.body["workspace_id"], sent)


# One test per operation (the two that write take most of the time: on two xdist workers they
# run side by side), each database a test of its own. Whichever database comes second on a
# worker finds the operation's coverage cases drawn already (schemathesis keeps them per process).


@schema.include(method="POST", path="/registry/register").parametrize()
def test_register_passes_every_schemathesis_check(
    case: schemathesis.Case, served: ServedRegistry
) -> None:
    check(case, served)


@schema.include(method="POST", path="/registry/heartbeat").parametrize()
def test_heartbeat_passes_every_schemathesis_check(
    case: schemathesis.Case, served: ServedRegistry
) -> None:
    check(case, served)


@schema.include(method="GET").parametrize()
def test_the_documents_pass_every_schemathesis_check(
    case: schemathesis.Case, served: ServedRegistry
) -> None:
    check(case, served)
