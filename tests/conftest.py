"""Shared fixtures: real SQLite files and a real PostgreSQL server, a real registry on
loopback, and reference runtimes on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import freezegun
import pytest
from aiohttp.test_utils import TestServer

from controller.agent.simulated import Faults, ReferenceRuntime
from controller.domain.models import Plugin, Policy
from controller.engine.queue import WorkQueue
from controller.registry.app import make_app
from controller.store import Sessions, make_engine, make_sessions, upgrade
from tests.support import pg
from tests.support.helpers import Registry, RuntimeFactory, fresh_postgres_database

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


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pluginctl.db'}"
        return
    url, drop = fresh_postgres_database(request.getfixturevalue("postgres_url"))
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


@pytest.fixture
async def registry(sessions: Sessions) -> AsyncIterator[Registry]:
    hints = WorkQueue()
    server = TestServer(make_app(sessions, hint=hints), host="127.0.0.1")
    await server.start_server()
    try:
        yield Registry(server, hints, sessions)
    finally:
        await server.close()




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


# --- levels, grouping, and mypy beside the suite ---------------------------------------------

MYPY: pytest.StashKey[subprocess.Popen[str]] = pytest.StashKey()
LEVELS = ("unit", "integration", "e2e")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its level (the folder it is in: `pytest -m unit` runs the pure
    ones). The suite runs on several xdist workers; the Kubernetes tests share one worker, so
    that one kube-apiserver and etcd serve them all. Without xdist, mypy starts now."""
    for item in items:
        level = next((part for part in item.path.parts if part in LEVELS), None)
        if level is not None:
            item.add_marker(level)
        if item.get_closest_marker("kubernetes") is not None:
            item.add_marker(pytest.mark.xdist_group("kubernetes"))
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        _start_mypy(config, items)


def start_mypy() -> subprocess.Popen[str]:
    mypy = Path(sys.executable).parent / "mypy"
    return subprocess.Popen([str(mypy) if mypy.exists() else "mypy"],
                            cwd=Path(__file__).parent.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _start_mypy(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`mypy --strict` takes most of a minute on its own: in a run on one process, when its
    test is selected, start it now on the other core and let the test collect the result
    (tests/unit/test_architecture.py). Under xdist the other workers are the parallelism."""
    if any(item.name == "test_mypy_strict_passes" for item in items):
        config.stash[MYPY] = start_mypy()
