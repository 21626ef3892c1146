"""Shared fixtures: real SQLite files and a real PostgreSQL server, a real registry on
loopback, and reference runtimes on loopback."""

from __future__ import annotations

import asyncio
import inspect
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import freezegun
import pytest
import yaml
from aiohttp.test_utils import TestServer
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from controller import desired as desired_mod
from controller.agent.simulated import Faults, ReferenceRuntime
from controller.desired import Desired
from controller.models import Plugin, Policy
from controller.reconciler import Hints
from controller.registry import issue_token, make_app
from controller.store import Sessions, make_engine, make_sessions, upgrade

from . import pg

# freezegun looks at every attribute of every loaded module when it starts; the kubernetes
# client builds its (pydantic) models lazily on attribute access, which must not happen
# while datetime is replaced.
freezegun.configure(extend_ignore_list=["kubernetes"])


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server for the whole run: PLUGINCTL_TEST_PG_URL, or one we start."""
    explicit = os.environ.get("PLUGINCTL_TEST_PG_URL")
    if explicit:
        yield explicit
        return
    try:
        server = pg.start()
    except pg.PostgresUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield server.url
    finally:
        pg.destroy(server)


def _fresh_postgres_database(server_url: str) -> tuple[str, Callable[[], None]]:
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = make_url(server_url).set(database=name).render_as_string(hide_password=False)
    return url, drop


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pluginctl.db'}"
        return
    url, drop = _fresh_postgres_database(request.getfixturevalue("postgres_url"))
    try:
        yield url
    finally:
        drop()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'pluginctl.db'}"


@pytest.fixture
def sessions(db_url: str) -> Iterator[Sessions]:
    engine = make_engine(db_url)
    upgrade(engine)
    try:
        yield make_sessions(engine)
    finally:
        engine.dispose()


@pytest.fixture
def policy() -> Policy:
    return Policy(call_timeout=2.0, workspace_timeout=10.0)


class Registry:
    def __init__(self, server: TestServer, hints: Hints, sessions: Sessions) -> None:
        self.server = server
        self.hints = hints
        self.sessions = sessions

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def token(self, workspace_id: str) -> str:
        return issue_token(self.sessions, workspace_id)


@pytest.fixture
async def registry(sessions: Sessions) -> AsyncIterator[Registry]:
    hints = Hints()
    server = TestServer(make_app(sessions, hint=hints), host="127.0.0.1")
    await server.start_server()
    try:
        yield Registry(server, hints, sessions)
    finally:
        await server.close()


RuntimeFactory = Callable[..., Awaitable[ReferenceRuntime]]


@pytest.fixture
async def runtime_factory(registry: Registry) -> AsyncIterator[RuntimeFactory]:
    """Start reference runtimes on loopback with a token of their own; they register only
    when the test says so."""
    started: list[ReferenceRuntime] = []

    async def make(workspace_id: str, *, plugins: list[Plugin] | None = None,
                   faults: Faults | None = None, report: bool = True,
                   controller_secret: str | None = None) -> ReferenceRuntime:
        runtime = ReferenceRuntime(workspace_id, registry_url=registry.url,
                                   token=registry.token(workspace_id), plugins=plugins,
                                   faults=faults, report=report,
                                   controller_secret=controller_secret)
        await runtime.start()
        started.append(runtime)
        return runtime

    yield make
    for runtime in started:
        await runtime.stop()


TEMPLATE = """
apiVersion: pluginctl.dev/v1alpha1
kind: WorkspaceTemplate
metadata: {name: base}
spec:
  plugins:
    - source: gitea://org/repo/agent-skills/seo-all#v1
    - source: local://plugins/notes
"""


async def wait_for(condition: Callable[[], Any], what: str = "condition",
                   timeout: float = 30.0) -> Any:
    """Wait for `condition()` (a value or an awaitable) to be truthy, with a deadline."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def workspace_yaml(name: str, **spec: Any) -> str:
    body = {"templateRef": {"name": "base"}, **spec}
    return yaml.safe_dump({"apiVersion": "pluginctl.dev/v1alpha1", "kind": "Workspace",
                           "metadata": {"name": name}, "spec": body})


def desired_from(*documents: str) -> Desired:
    """Desired state from YAML text, as the manifest directory would give it."""
    objects = [("test.yaml", doc) for text_ in documents
               for doc in yaml.safe_load_all(text_) if doc is not None]
    return desired_mod.build(objects)


def fleet(*names: str, **spec: Any) -> Desired:
    return desired_from(TEMPLATE, *(workspace_yaml(n, **spec) for n in names))


SEO = Plugin("seo-all", "gitea://org/repo/agent-skills/seo-all#v1")
NOTES = Plugin("notes", "local://plugins/notes")


# --- mypy beside the suite ------------------------------------------------------------------

MYPY: pytest.StashKey[subprocess.Popen[str]] = pytest.StashKey()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`mypy --strict` takes most of a minute on its own: when its test is selected, start it
    now on the other core, and let the test collect the result (tests/test_architecture)."""
    if any(item.name == "test_mypy_strict_passes" for item in items):
        mypy = Path(sys.executable).parent / "mypy"
        config.stash[MYPY] = subprocess.Popen(
            [str(mypy) if mypy.exists() else "mypy"], cwd=Path(__file__).parent.parent,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
