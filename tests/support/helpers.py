"""Helpers shared by the tests of every level: desired state from YAML, waiting on a
condition with a deadline, the CLI as a process, database snapshots. Fixtures are in
tests/conftest.py."""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp.test_utils import TestServer
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from controller.agent.simulated import ReferenceRuntime
from controller.domain import desired as desired_mod
from controller.domain.desired import Desired
from controller.domain.models import Plugin, Policy, utcnow
from controller.engine.passes import reconcile_once
from controller.engine.queue import WorkQueue
from controller.engine.report import PassReport
from controller.registry.serving import free_port
from controller.registry.tokens import issue_token
from controller.runtime.driver import RuntimeDriver
from controller.store import Sessions, transaction
from controller.store.tables import Base

RuntimeFactory = Callable[..., Awaitable[ReferenceRuntime]]  # the runtime_factory fixture


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
                   timeout: float = 30.0, *, blocking: bool = False,
                   every: float = 0.05) -> Any:
    """Wait for `condition()` (a value or an awaitable) to be truthy, with a deadline, and
    return it. `blocking`: the condition blocks (kubectl, a urllib call): run it in a thread."""
    deadline = time.monotonic() + timeout
    while True:
        result = await asyncio.to_thread(condition) if blocking else condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


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


class Registry:
    def __init__(self, server: TestServer, hints: WorkQueue, sessions: Sessions) -> None:
        self.server = server
        self.hints = hints
        self.sessions = sessions

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    def token(self, workspace_id: str) -> str:
        return issue_token(self.sessions, workspace_id)


def fresh_postgres_database(server_url: str) -> tuple[str, Callable[[], None]]:
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


def snapshot(sessions: Sessions) -> dict[str, list[tuple[Any, ...]]]:
    with transaction(sessions) as session:
        return {table.name: sorted(tuple(row) for row in session.execute(select(table)))
                for table in Base.metadata.sorted_tables}


async def one_pass(desired: Desired, sessions: Sessions, policy: Policy, **kwargs: object
                   ) -> PassReport:
    async with RuntimeDriver.for_policy(policy) as driver:
        return await reconcile_once(desired, sessions, driver, policy, **kwargs)  # type: ignore[arg-type]


def has(runtime: ReferenceRuntime, *plugins: Plugin) -> bool:
    return all(
        (got := runtime.plugins.get(p.name)) is not None and got.source == p.source
        for p in plugins
    )


async def pluginctl(*args: str, env: dict[str, str] | None = None,
                    timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


class RunProcess:
    """`pluginctl run` as a real process on a fixed port, so it can be killed and started
    again where the runtimes expect it."""

    def __init__(self, manifests: Path, db: str, *extra: str) -> None:
        self.args = ["run", "--manifests", str(manifests), "--db", db, "--interval", "1",
                     *extra]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: asyncio.subprocess.Process | None = None
        self.log = manifests.parent / f"run-{self.port}.log"  # for failure messages only

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controller", *self.args, "--listen",
                f"127.0.0.1:{self.port}", stdout=asyncio.subprocess.DEVNULL, stderr=log)

        async def healthy() -> bool:
            assert self.process is not None and self.process.returncode is None, \
                f"exited: {self.log.read_text(errors='replace')[-2000:]}"
            try:
                async with aiohttp.ClientSession() as client, client.get(
                        f"{self.url}/healthz") as answer:
                    return answer.status == 200
            except aiohttp.ClientError:
                return False

        await wait_for(healthy, "pluginctl run listening", 60)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def stop(self) -> int | None:
        if self.process is None or self.process.returncode is not None:
            return None
        self.process.terminate()
        return await asyncio.wait_for(self.process.wait(), 30)


def fleet_dir(tmp_path: Path, names: list[str], *documents: str) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir(exist_ok=True)
    (directory / "fleet.yaml").write_text("---\n".join(
        [TEMPLATE, *(workspace_yaml(name) for name in names), *documents]))
    return directory


def seen_of(session: Any, workspace_id: str) -> Any:
    """What the store holds of one workspace now (controller.domain.models.Observed)."""
    from controller.store import queries
    return queries.load_observed(session, now=utcnow(), only=[workspace_id])[workspace_id]


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]  # (name, labels) -> value


async def scrape(url: str) -> Samples:
    """`GET {url}/metrics`, parsed as Prometheus would."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as client, client.get(f"{url}/metrics") as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text_ = await answer.text()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text_) for sample in family.samples}


def metric(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels` (0 if none)."""
    return sum(v for (n, have), v in samples.items()
               if n == name and set(labels.items()) <= set(have))


def has_series(samples: Samples, name: str) -> bool:
    return any(n == name for n, _ in samples)
