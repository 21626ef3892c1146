"""The real agent: plugins fetched from real git repositories (file:// and smart HTTP) and
local libraries, checked, digested, staged and swapped into a real plugins directory; the
disk is the inventory; restarts through the configured command; refusals change nothing."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from controller.agent import tree
from controller.agent.box import DiskBox, RestartCommand
from controller.agent.disk import PluginsDir
from controller.agent.runtime import AgentServer
from controller.agent.sources import SourceConfig, Sources
from controller.domain.models import Plugin, Policy, utcnow
from controller.engine.passes import reconcile_once
from controller.runtime.driver import RuntimeCallError, RuntimeDriver
from controller.store import Sessions, queries, transaction
from controller.store.queries import records
from tests.support.gitrepos import Repo, http_server
from tests.support.helpers import Registry, desired_from, seen_of, wait_for

V1 = {"web-search/plugin.json": '{"version": "1"}\n', "web-search/bin/run": "#!/bin/sh\n",
      "web-search/README.md": "v1\n", "other/x.txt": "not part of web-search\n"}
V2 = {"web-search/plugin.json": '{"version": "2"}\n', "web-search/README.md": "v2\n"}
WEB_V1 = "gitea://agents/skills/web-search#v1"
WEB_V2 = "gitea://agents/skills/web-search#v2"


class Box:
    """An agent on loopback over a real plugins directory, and a driver to call it."""

    def __init__(self, tmp: Path, roots: dict[str, str], **config: Any) -> None:
        self.dir = tmp / "box" / "plugins"
        self.dir.mkdir(parents=True)
        self.plugins = PluginsDir(self.dir)
        self.plugins.prepare()
        self.sources = Sources(SourceConfig(cache_dir=tmp / "cache", roots=roots,
                                            local_root=tmp / "library", **config))
        self.restart: RestartCommand | None = None
        self.disk = DiskBox(self.plugins, self.sources, "ws-1")
        self.server = AgentServer("ws-1", self.disk)
        self.driver = RuntimeDriver(timeout=30)

    async def put(self, name: str, source: str, digest: str | None = None) -> Any:
        return await self.driver.install(self.server.url, Plugin(name, source, digest))

    async def inventory(self) -> dict[str, Plugin]:
        return {p.name: p for p in (await self.driver.list_plugins(self.server.url))[0]}


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    skills = Repo(tmp_path / "git", "agents", "skills")
    skills.commit(V1, tag="v1", symlinks={"web-search/docs": "README.md"},
                  executable=("web-search/bin/run",))
    skills.commit(V2, tag="v2")
    return skills


@pytest.fixture
async def make_box(tmp_path: Path, repo: Repo) -> AsyncIterator[Callable[..., Awaitable[Box]]]:
    boxes: list[Box] = []

    async def make(root: str | None = None, **config: Any) -> Box:
        box = Box(tmp_path / f"b{len(boxes)}",
                  {"gitea": root or (tmp_path / "git").as_uri()}, **config)
        await box.server.start()
        await box.driver.__aenter__()
        boxes.append(box)
        return box

    yield make
    for box in boxes:
        await box.driver.__aexit__(None, None, None)
        await box.server.stop()


def files(directory: Path) -> dict[str, str]:
    """Every entry under `directory` with its content ('->target' for links, '/' for dirs)."""
    found = {}
    for path in sorted(directory.rglob("*")):
        relative = str(path.relative_to(directory))
        if path.is_symlink():
            found[relative] = "->" + os.readlink(path)
        elif path.is_dir():
            found[relative] = "/"
        else:
            found[relative] = path.read_text()
    return found


# --- the digest ----------------------------------------------------------------------------------

def test_digest_follows_the_documented_recipe_and_ignores_what_it_says(tmp_path: Path) -> None:
    root = tmp_path / "p"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello\n")
    (root / "sub" / "run").write_text("#!/bin/sh\n")
    (root / "sub" / "run").chmod(0o755)
    (root / "link").symlink_to("a.txt")
    records = [
        b"file 644 a.txt\0" + hashlib.sha256(b"hello\n").hexdigest().encode() + b"\n",
        b"link link\0a.txt\0\n",
        b"dir sub\0\n",
        b"file 755 sub/run\0" + hashlib.sha256(b"#!/bin/sh\n").hexdigest().encode() + b"\n",
    ]
    expected = "sha256:" + hashlib.sha256(b"".join(records)).hexdigest()
    assert tree.digest(root) == expected

    (root / ".complete").write_text("anything")
    os.utime(root / "a.txt", (1, 1))
    (root / "a.txt").chmod(0o600)  # no execute bit: still 644
    assert tree.digest(root) == expected
    (root / "a.txt").chmod(0o700)
    assert tree.digest(root) != expected


async def test_digest_command_prints_the_digest(tmp_path: Path) -> None:
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "f").write_text("x")
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "digest", str(tmp_path / "p"),
        stdout=asyncio.subprocess.PIPE)
    out, _ = await process.communicate()
    assert process.returncode == 0
    assert out.decode().strip() == tree.digest(tmp_path / "p")


# --- installing ----------------------------------------------------------------------------------

async def test_install_from_git_puts_the_subpath_only_with_a_marker(
        make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    result = await box.put("web-search", WEB_V1)

    assert result.restart_required is True
    installed = files(box.dir / "web-search")
    assert installed == {".complete": result.digest + "\n", "README.md": "v1\n", "bin": "/",
                         "bin/run": "#!/bin/sh\n", "docs": "->README.md",
                         "plugin.json": '{"version": "1"}\n'}
    assert os.access(box.dir / "web-search" / "bin" / "run", os.X_OK)
    assert result.digest == tree.digest(box.dir / "web-search")
    assert (await box.inventory())["web-search"] == Plugin("web-search", WEB_V1, result.digest)
    assert result.seq is not None and result.seq > 0


async def test_install_over_smart_http(tmp_path: Path,
                                       make_box: Callable[..., Awaitable[Box]]) -> None:
    async with http_server(tmp_path / "git") as url:
        box = await make_box(url)
        result = await box.put("web-search", WEB_V2)
    assert files(box.dir / "web-search")["README.md"] == "v2\n"
    assert result.digest == tree.digest(box.dir / "web-search")


async def test_install_by_commit_id_and_from_the_local_library(
        tmp_path: Path, repo: Repo, make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    commit = repo.commit({"web-search/README.md": "v3\n"})
    await box.put("web-search", f"gitea://agents/skills/web-search#{commit}")
    assert files(box.dir / "web-search")["README.md"] == "v3\n"

    library = tmp_path / "b0" / "library" / "plugins" / "translator"
    library.mkdir(parents=True)
    (library / "dict.txt").write_text("hola\n")
    await box.put("translator", "local://plugins/translator")
    assert files(box.dir / "translator") == {".complete": tree.digest(library) + "\n",
                                             "dict.txt": "hola\n"}


async def test_an_install_of_what_is_there_changes_nothing(
        make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    first = await box.put("web-search", WEB_V1)
    await box.driver.restart(box.server.url)  # the restart the install asked for
    await box.server.restarted()
    inode = (box.dir / "web-search").stat().st_ino
    again = await box.put("web-search", WEB_V1, first.digest)
    assert again.restart_required is False and again.digest == first.digest
    assert (box.dir / "web-search").stat().st_ino == inode  # not even swapped
    assert again.seq is not None and first.seq is not None and again.seq > first.seq


async def test_a_restart_owed_is_asked_for_again_until_it_happens(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    """An install whose answer was lost (the controller timed out during a slow fetch) left
    the files in place; the retry finds them there and must still ask for the restart, or
    the workspace never loads them. The debt survives the agent, and a restart pays it."""
    box = await make_box()
    await box.put("web-search", WEB_V1)  # pretend this answer never reached the controller
    retry = await box.put("web-search", WEB_V1)
    assert retry.restart_required is True
    again = PluginsDir(box.dir)  # a new agent process on the same box
    assert again.restart_pending()
    removal = await box.driver.remove(box.server.url, "nothing-here")  # 404, debt still owed
    assert removal.restart_required is True
    await box.driver.restart(box.server.url)
    await box.server.restarted()
    assert (await box.put("web-search", WEB_V1)).restart_required is False

    failing = tmp_path / "fail.sh"
    failing.write_text("exit 1\n")
    box.disk.restart_command = RestartCommand(("sh", str(failing)))
    await box.put("web-search", WEB_V2)
    await box.driver.restart(box.server.url)
    await box.server.restarted()  # the restart failed: still owed
    assert (await box.put("web-search", WEB_V2)).restart_required is True


async def test_a_warm_cache_fetches_nothing(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    await box.put("web-search", WEB_V1)
    (tmp_path / "git").rename(tmp_path / "git-gone")  # the origin is unreachable now
    for leftover in box.dir.iterdir():  # a wiped box, pluginctl's records too
        shutil.rmtree(leftover)
    result = await box.put("web-search", WEB_V1)
    assert result.restart_required is True
    assert files(box.dir / "web-search")["README.md"] == "v1\n"


async def test_a_version_swap_is_never_seen_half_done(
        make_box: Callable[..., Awaitable[Box]]) -> None:
    """A reader looking at the plugin all the time sees v1 or v2 whole, never a mix, never
    a missing directory, never a tree without its marker."""
    box = await make_box()
    await box.put("web-search", WEB_V1)
    target = box.dir / "web-search"
    seen: list[str] = []
    broken: list[str] = []
    stop = threading.Event()

    def read() -> None:
        """Read the tree DIR/web-search is; a sample the swap overtook (the directory read
        is no longer DIR/web-search afterwards: an old tree on its way out) is not counted."""
        while not stop.is_set():
            try:
                fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    names = set(os.listdir(fd))
                    readme = open(f"/proc/self/fd/{fd}/README.md").read()  # noqa: SIM115
                    version = open(f"/proc/self/fd/{fd}/plugin.json").read()  # noqa: SIM115
                    still_current = os.fstat(fd).st_ino == os.stat(target).st_ino
                finally:
                    os.close(fd)
            except FileNotFoundError:
                if os.path.isdir(target):
                    continue  # a file of a tree swapped out (and being deleted) under us
                broken.append("DIR/web-search missing")
                continue
            if not still_current:
                continue
            if ".complete" not in names or f'"{readme.strip()[1:]}"' not in version:
                broken.append(f"mixed tree: {sorted(names)} {readme!r} {version!r}")
            seen.append(readme.strip())

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for _ in range(15):
            await box.put("web-search", WEB_V2)
            await box.put("web-search", WEB_V1)
    finally:
        stop.set()
        reader.join()
    assert not broken, broken[:3]
    assert {"v1", "v2"} <= set(seen)


async def test_a_declared_digest_that_differs_is_refused_and_nothing_changes(
        make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    first = await box.put("web-search", WEB_V1)
    before = files(box.dir)
    wrong = "sha256:" + "0" * 64
    with pytest.raises(RuntimeCallError) as refused:
        await box.put("web-search", WEB_V2, wrong)
    assert "HTTP 422" in str(refused.value) and wrong in str(refused.value)
    assert "sha256:" in str(refused.value).replace(wrong, "")  # the fetched digest is named
    assert files(box.dir) == before
    assert (await box.inventory())["web-search"].digest == first.digest


async def test_a_users_directory_is_reported_as_theirs_and_never_touched(
        make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    mine = box.dir / "web-search"
    mine.mkdir()
    (mine / "notes.md").write_text("mine\n")
    (box.dir / "scratchpad").mkdir()
    (box.dir / "scratchpad" / "x").write_text("keep\n")

    def theirs() -> dict[str, str]:
        return {path: content for path, content in files(box.dir).items()
                if not path.startswith(".pluginctl")}

    before = theirs()

    assert await box.inventory() == {
        "scratchpad": Plugin("scratchpad", "user://scratchpad"),
        "web-search": Plugin("web-search", "user://web-search")}
    with pytest.raises(RuntimeCallError, match=r"HTTP 409.*not installed by pluginctl"):
        await box.put("web-search", WEB_V1)  # install
    with pytest.raises(RuntimeCallError, match="HTTP 409"):
        await box.driver.remove(box.server.url, "scratchpad")  # removal
    await box.put("other", "gitea://agents/skills/other#v1")  # an install beside them
    await box.put("other", "gitea://agents/skills/other#v2")  # an upgrade beside them
    await box.driver.remove(box.server.url, "other")  # a removal beside them
    assert theirs() == before


async def test_removal_takes_the_tree_and_its_record(
        make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    await box.put("web-search", WEB_V1)
    removed = await box.driver.remove(box.server.url, "web-search")
    assert removed.seq is not None and removed.restart_required  # to unload it
    assert not (box.dir / "web-search").exists()
    assert box.plugins.record("web-search") is None
    assert await box.inventory() == {}
    await box.driver.remove(box.server.url, "web-search")  # 404 counts as already removed


async def test_a_tree_edited_by_hand_is_reported_modified_and_put_back(
        make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    first = await box.put("web-search", WEB_V1)
    (box.dir / "web-search" / "README.md").write_text("edited\n")
    reported = (await box.inventory())["web-search"]
    assert reported.modified and reported.digest != first.digest
    assert not reported.satisfies(Plugin("web-search", WEB_V1))  # the loop installs again
    again = await box.put("web-search", WEB_V1)
    assert again.restart_required is True
    assert files(box.dir / "web-search")["README.md"] == "v1\n"
    assert not (await box.inventory())["web-search"].modified


# --- refusals: a clear error, nothing written outside (or inside) DIR ----------------------------

@pytest.mark.parametrize(("source", "files_", "config", "status", "words"), [
    ("gitea://agents/evil/p#v1", {"p/ok": "x"}, {}, 422, "points outside"),
    ("gitea://agents/skills/../../etc#v1", {}, {}, 422, "not allowed"),
    ("gitea://agents/big/p#v1", {"p/blob": "x" * 5000}, {"max_bytes": 4096}, 422,
     "larger than 4096 bytes"),
    ("gitea://agents/many/p#v1", {f"p/{i}": "x" for i in range(12)}, {"max_files": 10}, 422,
     "more than 10 files"),
    ("gitea://agents/skills/web-search#v9", {}, {}, 422, "no tag or branch 'v9'"),
    ("gitea://agents/skills/nowhere#v1", {}, {}, 422, "no such directory"),
    ("ftp://agents/skills/web-search#v1", {}, {}, 422, "no repository root for ftp"),
])
async def test_bad_sources_are_refused_and_nothing_is_written(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]], source: str,
        files_: dict[str, str], config: dict[str, int], status: int, words: str) -> None:
    if files_:
        owner_repo = source.split("://")[1].split("/")
        evil = Repo(tmp_path / "git", owner_repo[0], owner_repo[1])
        evil.commit(files_, tag="v1", symlinks={"p/escape": "../../../../etc/passwd"}
                    if "evil" in source else None)
    from controller.agent.tree import Limits
    box = await make_box(limits=Limits(**config)) if config else await make_box()
    outside = sorted(p.name for p in box.dir.parent.parent.iterdir())
    with pytest.raises(RuntimeCallError) as refused:
        await box.put("p", source)
    assert f"HTTP {status}" in str(refused.value) and words in str(refused.value)
    assert files(box.dir) == {".pluginctl": "/", ".pluginctl/records": "/",
                              ".pluginctl/staging": "/"}
    assert sorted(p.name for p in box.dir.parent.parent.iterdir()) == outside


async def test_a_fetch_that_hangs_is_cut_at_the_time_limit(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    async with http_server(tmp_path / "git", hang=True) as url:
        box = await make_box(url, fetch_timeout=1.0)
        install = asyncio.create_task(box.put("web-search", WEB_V1))
        await asyncio.sleep(0.2)  # the fetch is under way (and hangs)...
        assert not install.done()
        # ...and reports (what heartbeats send) are answered meanwhile, not held up by it.
        assert await asyncio.wait_for(box.inventory(), 0.5) == {}
        with pytest.raises(RuntimeCallError) as refused:
            await install
    assert "HTTP 504" in str(refused.value) and "--fetch-timeout" in str(refused.value)
    assert not (box.dir / "web-search").exists()


# --- restarts ------------------------------------------------------------------------------------

async def test_restart_runs_the_configured_command_and_reports_its_failure(
        tmp_path: Path, registry: Registry, make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    box.server.registry_url, box.server.token = registry.url, registry.token("ws-1")
    marker = tmp_path / "restarted"
    box.disk.restart_command = RestartCommand(
        ("sh", "-c", f'echo "$PLUGINCTL_WORKSPACE_ID" > {marker}'))
    await box.server.register()
    await box.driver.restart(box.server.url)
    await box.server.restarted()
    assert marker.read_text() == "ws-1\n"

    box.disk.restart_command = RestartCommand(("sh", "-c", "echo no such service >&2; exit 3"))
    await box.driver.restart(box.server.url)
    await box.server.restarted()  # the agent heartbeats its report with the error at once
    with transaction(registry.sessions) as session:
        seen = queries.load_observed(session, now=utcnow(), only=["ws-1"])["ws-1"]
    assert seen.runtime_error == "restart command exited with 3: no such service"

    box.disk.restart_command = RestartCommand(("true",))
    await box.driver.restart(box.server.url)
    await box.server.restarted()
    with transaction(registry.sessions) as session:
        assert seen_of(session, "ws-1").runtime_error is None


# --- against the loop ----------------------------------------------------------------------------

TEMPLATE = """
apiVersion: pluginctl.dev/v1alpha1
kind: WorkspaceTemplate
metadata: {{name: base}}
spec:
  plugins:
    - source: {source}
---
apiVersion: pluginctl.dev/v1alpha1
kind: Workspace
metadata: {{name: ws-1}}
spec: {{templateRef: {{name: base}}}}
"""


async def test_a_report_built_before_an_install_never_undoes_it(
        sessions: Sessions, registry: Registry, make_box: Callable[..., Awaitable[Box]]
) -> None:
    """A heartbeat whose report was read from disk before an install, delivered after it,
    must not make the loop install again: its seq is below the install's."""
    box = await make_box()
    box.server.registry_url, box.server.token = registry.url, registry.token("ws-1")
    # No restart budget: a restart makes the agent send a fresh report at once, which
    # would hide the stale one.
    policy = Policy(call_timeout=30, restart_budget=0)
    desired = desired_from(TEMPLATE.format(source=WEB_V1))
    await box.server.register()
    stale = await box.server._body()  # the report as it was: nothing installed
    async with RuntimeDriver.for_policy(policy) as driver:
        await reconcile_once(desired, sessions, driver, policy)
        assert box.server.count("PUT") == 1
        async with aiohttp.ClientSession() as client, client.post(
                registry.url + "/registry/heartbeat", json=stale,
                headers={"Authorization": f"Bearer {box.server.token}"}) as answer:
            assert answer.status == 200
        await reconcile_once(desired, sessions, driver, policy)
    assert box.server.count("PUT") == 1  # installed exactly once
    with transaction(sessions) as session:
        seen = queries.load_observed(session, now=utcnow(), only=["ws-1"])["ws-1"]
    assert seen.report is not None and "web-search" in seen.report


async def test_the_loop_converges_a_wiped_box_and_a_template_change(
        sessions: Sessions, registry: Registry, make_box: Callable[..., Awaitable[Box]]
) -> None:
    box = await make_box()
    box.server.registry_url, box.server.token = registry.url, registry.token("ws-1")
    policy = Policy(call_timeout=30)
    policy = Policy(call_timeout=30, restart_budget=10)  # one restart per change here
    await box.server.register()
    async with RuntimeDriver.for_policy(policy) as driver:
        async def converge(source: str) -> None:
            """Passes until in sync (an install asks for a restart, after which the loop
            waits for the box's next report): at most three."""
            for _ in range(3):
                report = await reconcile_once(desired_from(TEMPLATE.format(source=source)),
                                              sessions, driver, policy)
                await box.server.restarted()
                if report.in_sync:
                    return
            raise AssertionError([(r.workspace_id, r.outcomes) for r in report.results])

        await converge(WEB_V1)
        assert files(box.dir / "web-search")["README.md"] == "v1\n"
        await converge(WEB_V2)  # the template moved to the next tag
        assert files(box.dir / "web-search")["README.md"] == "v2\n"

        for entry in list(box.dir.iterdir()):  # the box is wiped while the agent runs
            shutil.rmtree(entry)
        await box.server.register()
        await converge(WEB_V2)
        assert files(box.dir / "web-search")["README.md"] == "v2\n"

        await converge("gitea://agents/skills/other#v1")  # web-search no longer declared
        assert not (box.dir / "web-search").exists()
        assert (box.dir / "other" / "x.txt").exists()


# --- the agent process ---------------------------------------------------------------------------

async def test_a_token_file_others_can_read_is_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("plc_secret\n")
    token.chmod(0o644)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "agent", "--workspace-id", "ws-1",
        "--token-file", str(token), "--plugins-dir", str(tmp_path / "plugins"),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PLUGINCTL_TOKEN": ""})
    _, err = await process.communicate()
    assert process.returncode == 1  # could not run: a bad flag
    assert "can be read or written by other users (mode 0644)" in err.decode()

    token.chmod(0o600)  # now accepted: the agent gets as far as the (absent) registry
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "agent", "--workspace-id", "ws-1",
        "--token-file", str(token), "--plugins-dir", str(tmp_path / "plugins"),
        "--cache-dir", str(tmp_path / "cache"), "--registry", "http://127.0.0.1:9",
        stderr=asyncio.subprocess.PIPE)
    _, err = await process.communicate()
    assert process.returncode == 1 and "cannot register with http://127.0.0.1:9" in err.decode()


async def test_sigkill_mid_install_leaves_the_old_tree_and_a_restart_cleans_up(
        tmp_path: Path, registry: Registry) -> None:
    """Kill the agent while it copies a large plugin over an installed one: the old version
    is whole in place, and the next start throws the staged copy away."""
    library = tmp_path / "library"
    for version, count in (("small", 3), ("large", 8000)):
        for i in range(count):
            path = library / version / f"d{i % 50}" / f"f{i}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{version} {i}\n")
    plugins = tmp_path / "plugins"
    env = {**os.environ, "PLUGINCTL_TOKEN": registry.token("ws-1")}

    async def start_agent(previous: str | None = None
                          ) -> tuple[asyncio.subprocess.Process, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "controller", "agent", "--workspace-id", "ws-1",
            "--registry", registry.url, "--plugins-dir", str(plugins),
            "--cache-dir", str(tmp_path / "cache"), "--local-root", str(library),
            "--max-plugin-files", "100000", env=env, stderr=asyncio.subprocess.PIPE)

        async def url() -> str | None:
            with transaction(registry.sessions) as session:
                seen = queries.load_observed(session, now=utcnow(), only=["ws-1"]).get("ws-1")
            return seen.url if seen is not None and seen.url != previous else None

        return process, await wait_for(url, "the agent registered")

    process, url = await start_agent()
    async with RuntimeDriver(timeout=60) as driver:
        await driver.install(url, Plugin("p", "local://small"))
        before = files(plugins / "p")
        install = asyncio.create_task(driver.install(url, Plugin("p", "local://large")))
        staging = plugins / ".pluginctl" / "staging"
        await wait_for(lambda: any(staging.iterdir()) and any(
            any(d.iterdir()) for d in staging.iterdir() if d.is_dir()), "copying under way")
        process.send_signal(signal.SIGKILL)
        await process.wait()
        with pytest.raises(RuntimeCallError):
            await install
        assert files(plugins / "p") == before  # the old version, whole
        assert any(staging.iterdir())  # the half copy, beside it

        process, url = await start_agent(previous=url)
        try:
            assert not any(staging.iterdir())
            assert files(plugins / "p") == before
            result = await driver.install(url, Plugin("p", "local://large"))
            assert result.restart_required
            assert len(list((plugins / "p").rglob("f*"))) == 8000
        finally:
            process.terminate()
            await process.wait()


async def test_run_with_agent_processes_installs_upgrades_and_removes_real_files(
        tmp_path: Path, repo: Repo) -> None:
    """What the README promises a new user, as processes: `pluginctl run` and a `pluginctl
    agent --plugins-dir`; plugin files from a real git repository appear, are upgraded by
    editing the template, and are removed when no longer declared."""
    from controller.registry.serving import free_port
    from tests.support.helpers import pluginctl

    repo.commit({"seo-all/rules.txt": "seo\n", "notebook/nb.txt": "nb\n"}, tag="v3")
    manifests = tmp_path / "manifests"
    manifests.mkdir()

    def declare(*sources: str) -> None:
        (manifests / "fleet.yaml").write_text(
            "apiVersion: pluginctl.dev/v1alpha1\nkind: WorkspaceTemplate\n"
            "metadata: {name: base}\nspec:\n  plugins:\n"
            + "".join(f"    - source: {source}\n" for source in sources)
            + "---\napiVersion: pluginctl.dev/v1alpha1\nkind: Workspace\n"
              "metadata: {name: ws-1}\nspec: {templateRef: {name: base}}\n")

    declare(WEB_V1, "gitea://agents/skills/seo-all#v3", "gitea://agents/skills/notebook#v3")
    db = f"sqlite:///{tmp_path / 'pluginctl.db'}"
    code, token, _ = await pluginctl("token", "create", "ws-1", "--db", db)
    assert code == 0
    token_file = tmp_path / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    port = free_port()
    plugins = tmp_path / "plugins"
    processes = []
    try:
        for args in (
            ["run", "--manifests", str(manifests), "--db", db, "--listen",
             f"127.0.0.1:{port}", "--interval", "1"],
            ["agent", "--workspace-id", "ws-1", "--token-file", str(token_file),
             "--registry", f"http://127.0.0.1:{port}", "--plugins-dir", str(plugins),
             "--cache-dir", str(tmp_path / "cache"), "--heartbeat-interval", "0.5",
             "--source-root", f"gitea={(tmp_path / 'git').as_uri()}"],
        ):
            processes.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controller", *args,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL))
            if args[0] == "run":
                await wait_for(lambda: _listening(port), "the registry")

        def on_disk() -> dict[str, str]:
            return {path.parent.name: (path.parent / "README.md").read_text()
                    if (path.parent / "README.md").exists() else ""
                    for path in plugins.glob("*/.complete")}

        await wait_for(lambda: on_disk() == {"web-search": "v1\n", "seo-all": "",
                                             "notebook": ""}, "three plugins on disk")
        declare(WEB_V2, "gitea://agents/skills/seo-all#v3", "gitea://agents/skills/notebook#v3")
        await wait_for(lambda: on_disk().get("web-search") == "v2\n", "the upgrade")
        declare(WEB_V2, "gitea://agents/skills/seo-all#v3")
        await wait_for(lambda: set(on_disk()) == {"web-search", "seo-all"}, "the removal")
        assert not (plugins / "notebook").exists()

        async def in_sync() -> bool:
            _, out, _ = await pluginctl("status", "--db", db, "--manifests", str(manifests),
                                        "-o", "json")
            return bool(json.loads(out)["workspaces"][0]["in_sync"])

        await wait_for(in_sync, "status in sync")
    finally:
        for process in processes:
            process.terminate()
            await process.wait()


async def _listening(port: int) -> bool:
    try:
        async with aiohttp.ClientSession() as client, \
                client.get(f"http://127.0.0.1:{port}/healthz") as answer:
            return answer.status == 200
    except aiohttp.ClientError:
        return False


def test_a_restart_forgets_the_report_unless_the_box_reported_since(sessions: Sessions) -> None:
    from controller.domain.outcomes import Changes

    plugin = Plugin("web-search", WEB_V1, "sha256:" + "1" * 64)
    now = utcnow()
    with transaction(sessions) as session:
        queries.record_register(session, "ws-1", "http://127.0.0.1:1", report=[], now=now, seq=5)
        queries.record_changed_report(session, "ws-1", [plugin], now=now, seq=11)

    def after_restart(seq: int) -> dict[str, Plugin] | None:
        with transaction(sessions) as session:
            queries.apply_many(session, [(Changes("ws-1", report_put=(plugin,),
                                                  report_forget=True, report_seq=seq,
                                                  restarted_at=now), now)])
        with transaction(sessions) as session:
            report = queries.load_observed(session, now=utcnow(), only=["ws-1"])["ws-1"].report
        return None if report is None else dict(report)

    # The install answered seq 10; the box reported (seq 11) after it: that report stands.
    assert after_restart(10) == {"web-search": plugin}
    # The install answered seq 12: the stored report is older, so it is forgotten.
    assert after_restart(12) is None


# --- what the review of the first version found ---------------------------------------------------

def test_hostile_directory_names_and_too_many_directories_never_silence_the_box(
        tmp_path: Path) -> None:
    from controller.domain import wire as api

    plugins = PluginsDir(tmp_path / "plugins")
    plugins.prepare()
    (tmp_path / "plugins" / "foo\n").mkdir()  # `$` would let this pass for a plugin name
    for i in range(api.MAX_PLUGINS + 1):
        (tmp_path / "plugins" / f"user-{i:03d}").mkdir()
    report = plugins.inventory()
    assert len(report) == api.MAX_PLUGINS and all("\n" not in p.name for p in report)
    api.HeartbeatRequest.model_validate({"workspace_id": "ws-1",
                                         "plugins": [p.to_json() for p in report]})


def test_a_directory_made_during_an_install_is_the_users_and_survives(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from controller.agent import disk
    from controller.agent.disk import DiskError
    from controller.agent.sources import Fetched

    library = tmp_path / "library" / "p"
    library.mkdir(parents=True)
    (library / "f").write_text("ours\n")
    plugins = PluginsDir(tmp_path / "plugins")
    plugins.prepare()
    copy = disk._copy_file

    def copy_while_the_user_works(source: str, destination: str) -> str:
        (tmp_path / "plugins" / "p").mkdir(exist_ok=True)
        (tmp_path / "plugins" / "p" / "mine.txt").write_text("mine\n")
        return copy(source, destination)

    monkeypatch.setattr(disk, "_copy_file", copy_while_the_user_works)
    with pytest.raises(DiskError, match="not installed by pluginctl") as refused:
        plugins.install("p", "local://p", Fetched(library, tree.digest(library), None))
    assert refused.value.conflict
    assert files(tmp_path / "plugins" / "p") == {"mine.txt": "mine\n"}
    assert plugins.record("p") is None
    assert plugins.inventory() == [Plugin("p", "user://p")]


def test_a_swap_killed_between_its_two_renames_is_put_back(tmp_path: Path) -> None:
    """Where RENAME_EXCHANGE is missing the swap is two renames; a kill between them leaves
    the old tree aside, and the next start puts it back."""
    plugins = PluginsDir(tmp_path / "plugins")
    plugins.prepare()
    aside = tmp_path / "plugins" / ".pluginctl" / "staging" / "my.plugin.1a2b3c4d.old"
    aside.mkdir()
    (aside / "f").write_text("old\n")
    (tmp_path / "plugins" / ".pluginctl" / "staging" / "my.plugin.1a2b3c4d").mkdir()
    plugins.prepare()
    assert files(tmp_path / "plugins" / "my.plugin") == {"f": "old\n"}
    assert list((tmp_path / "plugins" / ".pluginctl" / "staging").iterdir()) == []


async def test_a_record_whose_tree_is_gone_is_forgotten(
        make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    await box.put("web-search", WEB_V1)
    shutil.rmtree(box.dir / "web-search")  # deleted by hand
    assert await box.inventory() == {}
    (box.dir / "web-search").mkdir()  # a directory of the user's, under the same name
    assert (await box.inventory())["web-search"].source == "user://web-search"


async def test_gitattributes_never_change_what_is_installed(
        tmp_path: Path, repo: Repo, make_box: Callable[..., Awaitable[Box]]) -> None:
    """Installed bytes are the repository's bytes: no export-subst, export-ignore or
    line-ending filter applies (git archive would apply them)."""
    repo.commit({".gitattributes": "* export-subst\nskipped export-ignore\n*.txt eol=crlf\n",
                 "web-search/.gitattributes": "* export-subst\nskipped export-ignore\n",
                 "web-search/version": "$Format:%H$\n", "web-search/skipped": "kept\n",
                 "web-search/lines.txt": "a\nb\n"}, tag="v5")
    box = await make_box()
    result = await box.put("web-search", "gitea://agents/skills/web-search#v5")
    installed = files(box.dir / "web-search")
    assert installed["version"] == "$Format:%H$\n"
    assert installed["skipped"] == "kept\n" and installed["lines.txt"] == "a\nb\n"
    # The publisher's own files give the same digest (`pluginctl digest` on their tree).
    assert result.digest == tree.digest(repo.work / "web-search")


def test_the_digest_tells_link_targets_from_names(tmp_path: Path) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "a").symlink_to("x\nlink b")
    (first / "c").symlink_to("y")
    (second / "a").symlink_to("x")
    (second / "b\nlink c").symlink_to("y")
    assert tree.digest(first) != tree.digest(second)


@pytest.mark.parametrize(("links", "escapes"), [
    ({"b": ".", "a": "b/../../x"}, True),  # through a link to "." ... and out
    ({"b": "sub", "a": "b/../x"}, False),
    ({"loop1": "loop2", "loop2": "loop1"}, True),
    ({"deep": "sub/../sub/f"}, False),
    ({"abs": "/etc/passwd"}, True),
])
def test_symlinks_are_resolved_through_the_trees_own_links(
        tmp_path: Path, links: dict[str, str], escapes: bool) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f").write_text("x")
    for name, target in links.items():
        (tmp_path / name).symlink_to(target)
    if escapes:
        with pytest.raises(tree.TreeError, match="points outside the plugin"):
            tree.check(tmp_path, tree.Limits())
    else:
        tree.check(tmp_path, tree.Limits())


async def test_a_symlink_chain_out_of_a_git_plugin_is_refused(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    chain = Repo(tmp_path / "git", "agents", "chain")
    chain.commit({"p/f": "x"}, tag="v1", symlinks={"p/b": ".", "p/a": "b/../../../etc"})
    box = await make_box()
    with pytest.raises(RuntimeCallError, match=r"HTTP 422.*points outside the plugin"):
        await box.put("p", "gitea://agents/chain/p#v1")
    assert not (box.dir / "p").exists()


async def test_local_sources_may_not_leave_the_library(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    library = tmp_path / "b0" / "library"
    (library / "escaping").mkdir(parents=True)
    (library / "escaping" / "passwd").symlink_to("/etc/passwd")
    (library / "elsewhere").symlink_to(tmp_path)  # a library entry that is a link out
    with pytest.raises(RuntimeCallError, match=r"HTTP 422.*points outside the plugin"):
        await box.put("escaping", "local://escaping")
    with pytest.raises(RuntimeCallError, match=r"HTTP 422.*outside --local-root"):
        await box.put("elsewhere", "local://elsewhere")
    assert sorted(p.name for p in box.dir.iterdir()) == [".pluginctl"]


async def test_limits_are_checked_before_anything_is_written(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    from controller.agent.tree import Limits

    big = Repo(tmp_path / "git", "agents", "big")
    big.commit({"p/blob": "x" * 5000}, tag="v1")
    box = await make_box(limits=Limits(max_bytes=4096))
    with pytest.raises(RuntimeCallError, match="larger than 4096 bytes"):
        await box.put("p", "gitea://agents/big/p#v1")
    assert list((tmp_path / "b0" / "cache" / "trees").iterdir()) == []  # not even cached


async def test_the_restart_command_never_sees_the_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        make_box: Callable[..., Awaitable[Box]]) -> None:
    monkeypatch.setenv("PLUGINCTL_TOKEN", "plc_secret")
    box = await make_box()
    seen = tmp_path / "env"
    box.disk.restart_command = RestartCommand(("sh", "-c", f"env > {seen}"))
    await box.driver.restart(box.server.url)
    await box.server.restarted()
    assert "PLUGINCTL_WORKSPACE_ID=ws-1" in seen.read_text()
    assert "plc_secret" not in seen.read_text()


async def test_an_agent_on_a_public_address_needs_the_controllers_secret(
        tmp_path: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "controller", "agent", "--workspace-id", "ws-1",
        "--plugins-dir", str(tmp_path / "plugins"), "--listen", "0.0.0.0:0",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PLUGINCTL_TOKEN": "plc_x"})
    _, err = await process.communicate()
    assert process.returncode == 1
    assert "--controller-secret-file" in err.decode() and "--allow-any-caller" in err.decode()


def test_one_agent_per_plugins_directory(tmp_path: Path) -> None:
    from controller.agent.disk import DiskError

    first = PluginsDir(tmp_path / "plugins")
    first.lock()
    with pytest.raises(DiskError, match="another agent uses"):
        PluginsDir(tmp_path / "plugins").lock()


def test_a_report_sent_after_an_observe_is_not_replaced_by_it(sessions: Sessions) -> None:
    from controller.domain.outcomes import Changes

    newer = Plugin("web-search", WEB_V2, "sha256:" + "2" * 64)
    older = Plugin("web-search", WEB_V1, "sha256:" + "1" * 64)
    now = utcnow()
    with transaction(sessions) as session:
        queries.record_register(session, "ws-1", "http://127.0.0.1:1", report=None, now=now, seq=5)
        queries.record_changed_report(session, "ws-1", [newer], now=now, seq=12)
        # A GET /plugins answered with seq 10, recorded after the heartbeat of seq 12.
        queries.apply_many(session, [(Changes("ws-1", report_replace=(older,),
                                              report_seq=10), now)])
    with transaction(sessions) as session:
        report = queries.load_observed(session, now=utcnow(), only=["ws-1"])["ws-1"].report
    assert report is not None and report["web-search"] == newer


async def test_the_same_files_from_another_source_change_only_the_record(
        repo: Repo, make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    await box.put("web-search", WEB_V2)
    await box.driver.restart(box.server.url)
    await box.server.restarted()
    inode = (box.dir / "web-search").stat().st_ino
    commit = git_rev(repo, "v2")
    by_id = f"gitea://agents/skills/web-search#{commit}"
    result = await box.put("web-search", by_id)
    assert result.restart_required is False
    assert (box.dir / "web-search").stat().st_ino == inode
    assert (await box.inventory())["web-search"].source == by_id


@pytest.mark.parametrize(("source", "url", "subpath"), [
    ("gitea://agents/skills/.claude/web-search#v1", "https://g/agents/skills.git",
     (".claude", "web-search")),
    ("gitea://agents/skills.git/web-search#v1", "https://g/agents/skills.git",
     ("web-search",)),
    ("gitea://agents/skills/.git/web-search#v1", None, None),
    ("gitea://agents/skills/-x#v1", None, None),  # never an option to git
    ("gitea://agents/skills/web-search#-upload-pack=x", None, None),
])
def test_source_paths_and_refs(source: str, url: str | None,
                               subpath: tuple[str, ...] | None) -> None:
    from controller.agent.sources import FetchError, GitSource, parse

    if url is None:
        with pytest.raises(FetchError):
            parse(source)
        return
    parsed = parse(source)
    assert isinstance(parsed, GitSource)
    assert parsed.url({"gitea": "https://g"}) == url and parsed.subpath == subpath


def git_rev(repo: Repo, ref: str) -> str:
    from tests.support.gitrepos import git

    return git("rev-parse", f"{ref}^{{commit}}", cwd=repo.work)


def test_a_register_committed_while_a_pass_records_is_not_overwritten(
        sessions: Sessions, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process (the registry) stores a register between the loop's read of the
    report and its write: the register must survive (SQLite has no FOR UPDATE)."""
    from controller.domain.outcomes import Changes
    from controller.store import make_engine, make_sessions

    plugin = Plugin("web-search", WEB_V1, "sha256:" + "1" * 64)
    now = utcnow()
    with transaction(sessions) as session:
        queries.record_register(session, "ws-1", "http://127.0.0.1:1", report=[], now=now, seq=5)
    other = make_engine(db_url)  # another process's connection
    registry_sessions = make_sessions(other)

    def register_again() -> None:
        with registry_sessions.begin() as session:
            queries.record_register(session, "ws-1", "http://127.0.0.1:2", report=[plugin],
                                    now=utcnow(),
                                    seq=20)

    real_report = records.report_from_json
    racer: list[threading.Thread] = []

    def report_then_race(data: Any) -> Any:
        if not racer:  # between the read and the write: the registry commits a register
            racer.append(threading.Thread(target=register_again))
            racer[0].start()
            racer[0].join(timeout=1.0)  # done at once without the write lock; else it waits
        return real_report(data)

    monkeypatch.setattr(records, "report_from_json", report_then_race)
    with transaction(sessions) as session:  # the restart's forget, recorded late
        queries.apply_many(session, [(Changes("ws-1", report_forget=True, report_seq=10,
                                              restarted_at=now), now)])
    racer[0].join(timeout=30)
    other.dispose()
    with transaction(sessions) as session:
        seen = queries.load_observed(session, now=utcnow(), only=["ws-1"])["ws-1"]
    assert seen.url == "http://127.0.0.1:2"
    assert seen.report == {"web-search": plugin}


async def test_a_private_repository_with_credentials_from_a_file(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    """The header goes to git through its environment, never its command line."""
    async with http_server(tmp_path / "git", require="Bearer s3cret") as url:
        without = await make_box(url)
        with pytest.raises(RuntimeCallError, match="HTTP 502"):
            await without.put("web-search", WEB_V1)
        box = await make_box(url, headers={"gitea": "Authorization: Bearer s3cret"})
        result = await box.put("web-search", WEB_V1)
    assert result.restart_required and (box.dir / "web-search" / "README.md").exists()


async def test_a_fetch_that_brings_too_much_is_cut_and_cleaned(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    mono = Repo(tmp_path / "git", "agents", "mono")
    mono.commit({"p/f": "x", "elsewhere/big": os.urandom(3_000_000)}, tag="v1")
    box = await make_box(max_fetch_bytes=500_000)
    with pytest.raises(RuntimeCallError, match=r"HTTP 422.*more than 500000 bytes"):
        await box.put("p", "gitea://agents/mono/p#v1")
    assert not (box.dir / "p").exists()
    packs = tmp_path / "b0" / "cache" / "git"
    assert sum(f.stat().st_size for f in packs.rglob("*") if f.is_file()) < 500_000


def test_source_credentials_file_is_checked(tmp_path: Path) -> None:
    import click

    from controller.cli.tools import _source_credentials

    roots = {"gitea": "https://gitea.example.com", "local2": "file:///srv/git"}
    creds = tmp_path / "creds"
    creds.write_text("# private hosts\ngitea=Authorization: Bearer abc\n")
    creds.chmod(0o644)
    with pytest.raises(click.BadParameter, match="mode 0644"):
        _source_credentials(creds, roots)
    creds.chmod(0o600)
    assert _source_credentials(creds, roots) == {"gitea": "Authorization: Bearer abc"}
    for bad in ("gitea=no header here\n", "local2=Authorization: x\n", "nope=A: b\n"):
        creds.write_text(bad)
        with pytest.raises(click.BadParameter, match="line 1"):
            _source_credentials(creds, roots)


# --- what the second review found ------------------------------------------------------------

async def test_a_plugin_of_its_own_complete_is_refused_and_writes_nothing(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    sneaky = Repo(tmp_path / "git", "agents", "sneaky")
    sneaky.commit({"p/f": "x"}, tag="v1", symlinks={"p/.complete": str(victim)})
    box = await make_box()
    with pytest.raises(RuntimeCallError, match=r"HTTP 422.*that name is the marker's"):
        await box.put("p", "gitea://agents/sneaky/p#v1")
    library = tmp_path / "b0" / "library" / "dir"
    (library / ".complete").mkdir(parents=True)
    (library / ".complete" / "big").write_text("x" * 5000)
    with pytest.raises(RuntimeCallError, match=r"HTTP 422.*that name is the marker's"):
        await box.put("dir", "local://dir")
    assert victim.read_text() == "precious\n"
    assert sorted(p.name for p in box.dir.iterdir()) == [".pluginctl"]


async def test_a_fetch_taken_back_leaves_the_repository_usable(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    mono = Repo(tmp_path / "git", "agents", "mono")
    mono.commit({"p/f": "x"}, tag="small")
    mono.commit({"elsewhere/big": os.urandom(3_000_000)}, tag="big")
    box = await make_box(max_fetch_bytes=500_000)
    with pytest.raises(RuntimeCallError, match="--max-fetch-bytes"):
        await box.put("p", "gitea://agents/mono/p#big")
    result = await box.put("p", "gitea://agents/mono/p#small")  # the same repository again
    assert result.restart_required and files(box.dir / "p")["f"] == "x"


async def test_heartbeats_go_on_after_an_answer_that_is_not_json(tmp_path: Path) -> None:
    from aiohttp import web

    heartbeats: list[int] = []

    async def heartbeat(_request: web.Request) -> web.Response:
        heartbeats.append(1)
        if len(heartbeats) == 2:  # a proxy's error page, once
            return web.Response(status=502, text="<html>Bad Gateway</html>",
                                content_type="text/html")
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/registry/heartbeat", heartbeat)
    from aiohttp.test_utils import TestServer

    from controller.agent.simulated import ReferenceRuntime

    async with TestServer(app, host="127.0.0.1") as server:
        agent = ReferenceRuntime("ws-1", registry_url=str(server.make_url("")).rstrip("/"),
                                 token="t", heartbeat_interval=0.1)
        await agent.start()
        try:
            agent.start_heartbeats()
            await wait_for(lambda: len(heartbeats) >= 4, "heartbeats after the bad answer")
        finally:
            await agent.stop()


async def test_a_change_made_while_a_restart_runs_still_owes_a_restart(
        tmp_path: Path, make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    await box.put("web-search", WEB_V1)
    started = tmp_path / "started"
    box.disk.restart_command = RestartCommand(
        ("sh", "-c", f"touch {started}; sleep 0.5"))
    await box.driver.restart(box.server.url)
    await wait_for(started.exists, "the restart command running")
    changed = await box.put("web-search", WEB_V2)  # during the restart
    assert changed.restart_required
    await box.server.restarted()
    assert box.plugins.restart_pending()  # the restart began before this change
    box.disk.restart_command = RestartCommand(("true",))
    await box.driver.restart(box.server.url)
    await box.server.restarted()
    assert not box.plugins.restart_pending()


async def test_a_tree_with_a_fifo_put_in_by_hand_is_replaced(
        make_box: Callable[..., Awaitable[Box]]) -> None:
    box = await make_box()
    await box.put("web-search", WEB_V1)
    os.mkfifo(box.dir / "web-search" / "pipe")
    assert (await box.inventory())["web-search"].modified
    result = await box.put("web-search", WEB_V1)
    assert result.restart_required and not (box.dir / "web-search" / "pipe").exists()


def test_one_agent_per_cache_and_its_leftovers_are_cleared(tmp_path: Path) -> None:
    from controller.agent.sources import FetchError

    first = Sources(SourceConfig(cache_dir=tmp_path / "cache"))
    leftover = tmp_path / "cache" / "trees" / ".abc.1234"
    leftover.mkdir()
    first.lock()
    assert not leftover.exists()
    with pytest.raises(FetchError, match="another agent uses the cache"):
        Sources(SourceConfig(cache_dir=tmp_path / "cache")).lock()
