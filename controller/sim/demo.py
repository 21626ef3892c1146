"""`pluginctl demo`: the standalone controller and one real agent per declared workspace,
installing real files from real git repositories, all in a temporary folder.

A publisher turns every git source the manifests name into a tag of a bare repository built
with the `git` command line (each plugin a `plugin.json` with its name and version and a
`README.md`; web-search both as v1.4.0 and v1.5.0), and fills a plugin library for the
`local://` sources. Each workspace gets an agent (`pluginctl agent`'s server over a disk
box) with its own plugins directory and fetch cache. The controller runs on a copy of the
manifests. Each workspace takes a path that broke edge-triggered installs or that the loop
must ride out:

- one registers without a report and never heartbeats (the controller reads its disk through
  the runtime API);
- one has a plugin directory its user made by hand (`scratchpad/`), which is left untouched;
- one has its box re-created once all converged: its plugins directory emptied (pluginctl's
  records too) and registered again; every plugin comes back, from its agent's cache;
- one pins a tag its publisher has not pushed yet: the fetch fails and the controller backs
  off (1 s, 2 s, 4 s, shortened for the demo) until the publisher pushes the tag, then the
  next retry installs it.

Then the copied template moves web-search from v1.4.0 to v1.5.0 and every workspace built
from it gets the new tree swapped in. Last, the template gains a release that cannot be
installed, rolled out in waves (`spec.rollout`): the first wave fails, the rollout halts and
the other workspaces get no call for it; `pluginctl rollout abort` puts every workspace back
on the previous revision. Converged means that every plugins directory holds
what its workspace should have (complete, unmodified) and that the store agrees. The demo
ends with the status table and a listing of one plugins directory, file by file."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import click
import yaml

from controller.agent.box import DiskBox
from controller.agent.disk import PluginsDir
from controller.agent.runtime import AgentServer
from controller.agent.sources import FetchError, GitSource, LocalSource, SourceConfig, Sources
from controller.agent.sources import parse as parse_source
from controller.domain import status
from controller.domain.desired import Desired
from controller.domain.models import ActionKind, DesiredWorkspace, Plugin, Policy, utcnow
from controller.domain.render import table
from controller.domain.rollout import RolloutPhase
from controller.engine import manifests, rollouts, service
from controller.engine.report import PassReport, WorkspaceResult
from controller.registry.tokens import issue_token
from controller.store import (
    Sessions,
    ensure_schema,
    make_engine,
    make_sessions,
    queries,
    transaction,
)

RepoKey = tuple[str, str, str]  # scheme, owner, repo

USER_DIR = "scratchpad"  # made by hand in one box's plugins directory, before its agent starts
BROKEN_FOR = 3  # failed installs of the unpublished tag before its publisher pushes it
#: Last, the template gains this release, never published: its rollout halts at wave 1.
BAD_RELEASE = "gitea://agents/skills/broken-tool#v0.1.0"
#: After the first convergence, the copied manifests move this source from one tag to the next.
UPGRADE = ("gitea://agents/skills/web-search", "v1.4.0", "v1.5.0")
GIT_IDENTITY = ("-c", "user.name=Demo Publisher", "-c", "user.email=publisher@example.invalid",
                "-c", "commit.gpgsign=false", "-c", "tag.gpgsign=false")


# --- the publisher: bare git repositories and a plugin library --------------------------------

def _git(*args: str | Path) -> None:
    """Run the publisher's git (no system or user config: the demo reads the same anywhere)."""
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "LC_ALL": "C"}
    try:
        subprocess.run(["git", *GIT_IDENTITY, *map(str, args)], env=env, check=True,
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=30)
    except FileNotFoundError as error:
        raise click.ClickException("the demo needs the git command line (apt-get install "
                                   "git)") from error
    except subprocess.CalledProcessError as error:
        detail = " ".join(error.stderr.decode("utf-8", "replace").split())
        raise click.ClickException(f"git {args[2] if args[0] == '-C' else args[0]} failed: "
                                   f"{detail}") from error


def _version_key(ref: str) -> tuple[tuple[int, ...], str]:
    return tuple(int(number) for number in re.findall(r"\d+", ref)), ref


def _write_plugin(directory: Path, name: str, version: str, source: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "plugin.json").write_text(
        json.dumps({"name": name, "version": version}) + "\n", encoding="utf-8")
    (directory / "README.md").write_text(
        f"# {name} {version}\n\nA demo plugin, published as {source}.\n", encoding="utf-8")


@dataclass
class Repo:
    """One OWNER/REPO of one scheme: the plugins (subpath -> name) at each tag."""

    key: RepoKey
    tags: dict[str, dict[tuple[str, ...], str]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return "{}://{}/{}".format(*self.key)


class Publisher:
    """Publishes the demo's sources under `root`: `root/bare/SCHEME/OWNER/REPO.git` (what the
    agents fetch from), pushed from working copies in `root/work/`; `root/library/` is the
    agents' `--local-root`. Blocking: call from a thread."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.library = root / "library"
        self.repos: dict[RepoKey, Repo] = {}
        self.local: dict[tuple[str, ...], tuple[str, str]] = {}  # parts -> (name, source)

    def add(self, plugin: Plugin) -> None:
        try:
            parsed = parse_source(plugin.source)
        except FetchError:
            return  # the agent will refuse it, and the demo shows so
        if isinstance(parsed, LocalSource):
            self.local.setdefault(parsed.parts, (plugin.name, plugin.source))
        elif parsed.ref is not None:
            self._tag(parsed, parsed.ref, plugin.name)

    def add_upgrade(self, source: str, old: str, new: str) -> bool:
        """Also publish `source` at tag `new` when it is named at `old`."""
        parsed = parse_source(f"{source}#{old}")
        assert isinstance(parsed, GitSource)
        repo = self.repos.get((parsed.scheme, parsed.owner, parsed.repo))
        name = repo.tags.get(old, {}).get(parsed.subpath) if repo is not None else None
        if name is None:
            return False
        self._tag(parsed, new, name)
        return True

    def _tag(self, source: GitSource, tag: str, name: str) -> None:
        key = (source.scheme, source.owner, source.repo)
        repo = self.repos.setdefault(key, Repo(key))
        repo.tags.setdefault(tag, {}).setdefault(source.subpath, name)

    def roots(self) -> dict[str, str]:
        """The agents' `--source-root`s: every scheme named, and `github` (which would
        otherwise be https://github.com)."""
        schemes = {key[0] for key in self.repos} | {"github"}
        return {scheme: (self.root / "bare" / scheme).as_uri() for scheme in sorted(schemes)}

    def _paths(self, key: RepoKey) -> tuple[Path, Path]:
        scheme, owner, name = key
        return (self.root / "work" / scheme / owner / name,
                self.root / "bare" / scheme / owner / f"{name}.git")

    def publish(self, held_back: set[tuple[RepoKey, str]]) -> list[str]:
        """Build every repository: one commit and tag per version (in version order, each
        changing the plugins released at it), every tag pushed but those held back; and the
        plugin library. Says what was published."""
        told = []
        for key, repo in sorted(self.repos.items()):
            work, bare = self._paths(key)
            _git("init", "-q", "-b", "main", work)
            _git("init", "-q", "--bare", "-b", "main", bare)
            pushed: list[str] = []
            held: list[str] = []
            for tag in sorted(repo.tags, key=_version_key):
                for subpath, name in repo.tags[tag].items():
                    _write_plugin(work.joinpath(*subpath), name, tag.removeprefix("v"),
                                  f"{repo.address}{'/' if subpath else ''}"
                                  f"{'/'.join(subpath)}#{tag}")
                _git("-C", work, "add", "-A")
                _git("-C", work, "commit", "-q", "-m", f"release {tag}")
                _git("-C", work, "tag", "-a", tag, "-m", tag)
                (held if (key, tag) in held_back else pushed).append(tag)
            if pushed:
                _git("-C", work, "push", "-q", bare, *(f"refs/tags/{tag}" for tag in pushed))
            told.append(f"{repo.address}: pushed tag{'s' if len(pushed) > 1 else ''} "
                        f"{_named(repo, pushed) or 'none'}"
                        + (f"; tagged {_named(repo, held)}, not pushed yet" if held else ""))
        for parts, (name, source) in sorted(self.local.items()):
            _write_plugin(self.library.joinpath(*parts), name, "local", source)
            told.append(f"plugin library: {source} ({name})")
        return told

    def push(self, key: RepoKey, tag: str) -> None:
        work, bare = self._paths(key)
        _git("-C", work, "push", "-q", bare, f"refs/tags/{tag}")


def _named(repo: Repo, tags: list[str]) -> str:
    """Tags with the plugins released at each."""
    return ", ".join(f"{tag} ({', '.join(sorted(repo.tags[tag].values()))})" for tag in tags)


# --- the boxes -----------------------------------------------------------------------------

@dataclass
class Box:
    """One workspace's box: its plugins directory, its agent's fetch cache, its agent."""

    workspace_id: str
    role: int
    root: Path
    agent: AgentServer
    disk: PluginsDir  # the agent's
    reader: PluginsDir = field(init=False)  # the demo's own eyes on the same directory

    def __post_init__(self) -> None:
        self.reader = PluginsDir(self.root / "plugins")

    @property
    def plugins_dir(self) -> Path:
        return self.root / "plugins"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    def holds(self, wanted: DesiredWorkspace) -> bool:
        """Whether the plugins directory has every wanted plugin, complete and unmodified."""
        have = {plugin.name: plugin for plugin in self.reader.inventory()}
        return all((found := have.get(name)) is not None and found.satisfies(plugin)
                   for name, plugin in wanted.plugins.items())


def _files(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under `root`: relative path -> (size, content)."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            content = path.read_bytes()
            found[path.relative_to(root).as_posix()] = (len(content), content)
    return found


def _held_back(workspaces: list[DesiredWorkspace], broken: DesiredWorkspace
               ) -> tuple[RepoKey, str, str] | None:
    """The tag to hold back: one of `broken`'s git plugins at a tag of its repository that
    no other workspace needs (repository, tag, plugin name), or None."""

    def tag(plugin: Plugin) -> tuple[RepoKey, str] | None:
        try:
            parsed = parse_source(plugin.source)
        except FetchError:
            return None
        if not isinstance(parsed, GitSource) or parsed.ref is None:
            return None
        return (parsed.scheme, parsed.owner, parsed.repo), parsed.ref

    others = {tag(plugin) for w in workspaces if w is not broken
              for plugin in w.plugins.values()}
    for name, plugin in sorted(broken.plugins.items(), reverse=True):
        mine = tag(plugin)
        if mine is not None and mine not in others:
            return *mine, name
    return None


class Demo:
    """The demo's state: the publisher, the boxes, and what the story waits for."""

    def __init__(self, scratch: Path, manifest_dir: Path, desired: Desired,
                 *, sessions: Sessions, policy: Policy, seconds: float) -> None:
        self.scratch = scratch
        self.manifest_dir = manifest_dir  # the copy the controller reads
        self.desired = desired
        self.sessions = sessions
        self.policy = policy
        self.seconds = seconds
        self.publisher = Publisher(scratch / "forge")
        self.boxes: list[Box] = []
        self.held: tuple[RepoKey, str, str] | None = None  # repository, tag, plugin
        self.broken: str | None = None  # the workspace pinning the held-back tag
        self.failures = 0
        self.pushing: asyncio.Task[None] | None = None
        self.user_files: dict[str, tuple[int, bytes]] = {}  # the user's directory, as made
        self.in_flight = 0  # passes started and not yet narrated
        self.started_at = time.monotonic()

    def say(self, who: str, text: str) -> None:
        click.echo(f"[{time.monotonic() - self.started_at:5.1f}s] {who:<12} {text}")

    def wanted(self, workspace_id: str) -> DesiredWorkspace | None:
        return self.desired.workspaces.get(workspace_id)

    # --- setting up -------------------------------------------------------------------------

    async def publish(self, workspaces: list[DesiredWorkspace]) -> bool:
        for wanted in workspaces:
            for plugin in wanted.plugins.values():
                self.publisher.add(plugin)
        upgrade = self.publisher.add_upgrade(*UPGRADE)
        if len(workspaces) > 3:
            broken = workspaces[3]
            self.held = _held_back(workspaces, broken)
            if self.held is not None:
                self.broken = broken.workspace_id
        held = {self.held[:2]} if self.held is not None else set()
        for line in await asyncio.to_thread(self.publisher.publish, held):
            self.say("publisher", line)
        return upgrade

    async def start_agents(self, workspaces: list[DesiredWorkspace], port: int) -> None:
        self.say("agents", "one per workspace: boxes/WORKSPACE/plugins/ its plugins "
                           "directory, boxes/WORKSPACE/cache/ its fetch cache")
        for role, wanted in enumerate(workspaces):
            role %= 4
            root = self.scratch / "boxes" / wanted.workspace_id
            disk = PluginsDir(root / "plugins")
            (root / "plugins").mkdir(parents=True)
            if role == 1:
                mine = root / "plugins" / USER_DIR
                mine.mkdir()
                (mine / "notes.md").write_text("# My notes\n\nKept by hand, not by pluginctl.\n",
                                               encoding="utf-8")
                self.user_files = _files(mine)
            disk.prepare()
            sources = Sources(SourceConfig(
                cache_dir=root / "cache", roots=self.publisher.roots(),
                local_root=self.publisher.library, fetch_timeout=10.0))
            agent = AgentServer(
                wanted.workspace_id, DiskBox(disk, sources, wanted.workspace_id),
                registry_url=f"http://127.0.0.1:{port}",
                token=issue_token(self.sessions, wanted.workspace_id),
                report=role != 0, heartbeat_interval=1.0)
            box = Box(wanted.workspace_id, role, root, agent, disk)
            self.boxes.append(box)
            await agent.start()
            await agent.register()
            held = self.held
            story = {
                0: "registered without a report and never heartbeats (the boot path edge "
                   "triggers missed)",
                1: f"registered with {USER_DIR}/, a plugin directory its user made by hand; "
                   "heartbeats",
                2: "registered empty; heartbeats; its box will be re-created later",
                3: "registered empty; heartbeats" + (
                    f"; it pins {held[2]} {held[1]}, a tag its publisher has not pushed yet"
                    if held is not None and self.broken == wanted.workspace_id else ""),
            }[role]
            self.say(wanted.workspace_id, story)
            if role != 0:
                agent.start_heartbeats()

    # --- narrating the controller's passes ---------------------------------------------------

    def source(self) -> Desired:
        """The controller's desired state, read at the start of each of its passes."""
        self.in_flight += 1
        try:
            return manifests.load(self.manifest_dir)
        except BaseException:
            self.in_flight -= 1
            raise

    def on_pass(self, report: PassReport, _trigger: str) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        for result in report.results:
            for outcome in result.outcomes:
                if outcome.action.kind is ActionKind.DISOWN:
                    continue
                verdict = "ok" if outcome.ok else f"failed: {outcome.message}"
                self.say(result.workspace_id, f"{outcome.action.describe()} -> {verdict} "
                                              f"[{result.trigger_of(outcome.action)}]")
                if not outcome.ok:
                    self._backing_off(result, outcome.action.key)
                    if (self.held is not None and result.workspace_id == self.broken
                            and outcome.action.key == self.held[2]):
                        self.failures += 1
        if self.held is not None and self.pushing is None and self.failures >= BROKEN_FOR:
            self.pushing = asyncio.create_task(self._push_held())

    def _backing_off(self, result: WorkspaceResult, key: str) -> None:
        with transaction(self.sessions) as session:
            seen = queries.load_observed(session, now=utcnow(), only=[result.workspace_id])
        attempt = seen[result.workspace_id].attempts.get(key) \
            if result.workspace_id in seen else None
        if attempt is not None:
            wait = (attempt.next_retry_at - utcnow()).total_seconds()
            self.say(result.workspace_id, f"backing off: {key} failed {attempt.failures}x, "
                                          f"next try in {max(0.0, wait):.1f}s")

    async def _push_held(self) -> None:
        assert self.held is not None
        key, tag, name = self.held
        await asyncio.to_thread(self.publisher.push, key, tag)
        self.say("publisher", f"pushed tag {tag} of {'{}://{}/{}'.format(*key)}; "
                              f"{self.broken}'s next retry will install {name}")

    # --- the story --------------------------------------------------------------------------

    def in_sync(self, desired: Desired) -> bool:
        return all(state.in_sync for state in _statuses(desired, self.sessions,
                                                       self.policy).values())

    async def until_converged(self, deadline: float) -> bool:
        """Every box holds its plugins on disk, and the store agrees; checked between passes,
        so that what a pass did is narrated before it is counted."""

        def on_disk(desired: Desired) -> bool:
            return all((wanted := desired.workspaces.get(box.workspace_id)) is None
                       or box.holds(wanted) for box in self.boxes)

        while time.monotonic() < deadline:
            desired = await self.held_desired()
            if self.in_flight == 0 and await asyncio.to_thread(on_disk, desired) \
                    and self.in_sync(desired) and self.in_flight == 0:
                return True
            await asyncio.sleep(0.1)
        return False

    async def held_desired(self) -> Desired:
        """The desired state with each workspace at the revision its rollout wave allows."""
        return (await rollouts.gate(self.desired, self.sessions, self.policy, now=utcnow(),
                                    advance=False)).desired

    async def run(self, upgrade: bool) -> bool:
        deadline = self.started_at + self.seconds
        if not await self.until_converged(deadline):
            self.say("controller", f"not converged after {self.seconds:g}s")
            return False
        self.say("controller", f"all {len(self.boxes)} workspaces converged: every plugin on "
                               "disk, complete, and the store agrees")
        if not await self.recreate(deadline):
            return False
        if upgrade and not await self.upgrade(deadline):
            return False
        if not await self.bad_release(deadline):
            return False
        for box in self.boxes:
            if box.role != 1:
                continue
            if _files(box.plugins_dir / USER_DIR) != self.user_files:
                self.say(box.workspace_id, f"user-installed {USER_DIR} was changed!")
                return False
            self.say(box.workspace_id, f"user-installed {USER_DIR} still there, byte for byte: "
                                       "never touched")
        return True

    async def recreate(self, deadline: float) -> bool:
        # Not the box with the user's own directory: a re-created box loses that too.
        box = next((b for b in self.boxes if b.role == 2), None) \
            or [b for b in self.boxes if b.role != 1][-1]
        cached = _files(box.cache_dir / "trees")
        # Synchronously, so that no heartbeat or install runs between the two steps.
        for entry in list(box.plugins_dir.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        box.disk.prepare()
        self.say(box.workspace_id, "box re-created: its plugins directory emptied "
                                   "(.pluginctl/ too); its agent registers again")
        await box.agent.register()
        if not await self.until_converged(deadline):
            self.say("controller", f"not converged again after {self.seconds:g}s")
            return False
        again = _files(box.cache_dir / "trees") == cached
        self.say("controller", "converged again" + (
            f" ({box.workspace_id}'s plugins copied from its agent's cache: nothing fetched "
            "again)" if again else ""))
        return True

    async def upgrade(self, deadline: float) -> bool:
        source, old, new = UPGRADE
        edited = []
        for path in manifests.manifest_files(self.manifest_dir):
            text = path.read_text(encoding="utf-8")
            if f"{source}#{old}" in text:
                path.write_text(text.replace(f"{source}#{old}", f"{source}#{new}"),
                                encoding="utf-8")
                edited.append(path.name)
        if not edited:
            return True
        name = source.rsplit("/", 1)[-1]
        before = self.desired
        self.desired = manifests.load(self.manifest_dir)
        self.say("manifests", f"{', '.join(edited)}: {name} #{old} -> #{new} (the next "
                              "periodic pass reads it)")
        if not await self.until_converged(deadline):
            self.say("controller", f"{name} {new} not everywhere after {self.seconds:g}s")
            return False
        moved = [box.workspace_id for box in self.boxes
                 if _source(before, box.workspace_id, name) == f"{source}#{old}"
                 and _source(self.desired, box.workspace_id, name) == f"{source}#{new}"]
        self.say("controller", f"{name} {old} -> {new} swapped in on {', '.join(moved)}")
        return True

    async def bad_release(self, deadline: float) -> bool:
        """The template gains a release that cannot be installed, rolled out in waves: the
        first wave fails, the rollout halts, the rest get no call for it; then it is
        aborted and every workspace is back on the previous revision."""
        path = next((p for p in manifests.manifest_files(self.manifest_dir)
                     if "kind: WorkspaceTemplate" in p.read_text(encoding="utf-8")), None)
        if path is None:
            return True
        documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        template = next(d for d in documents if isinstance(d, dict)
                        and d.get("kind") == "WorkspaceTemplate")
        name, source = BAD_RELEASE.rsplit("/", 1)[-1].split("#")[0], BAD_RELEASE
        template["spec"]["rollout"] = {"steps": [25, 100], "bakeSeconds": 2,
                                       "maxFailedWorkspaces": 0}
        template["spec"]["plugins"].append({"name": name, "source": source})
        path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
        self.desired = manifests.load(self.manifest_dir)
        key = f"{template['metadata'].get('namespace') or 'default'}/" \
              f"{template['metadata']['name']}"
        self.say("manifests", f"{path.name}: template {key} adds {name} (a release its "
                              f"publisher never pushed), rolled out in waves: 25 %, then "
                              f"100 %, each healthy for 2 s first")
        halted = None
        while time.monotonic() < deadline and halted is None:
            await asyncio.sleep(0.1)
            with transaction(self.sessions) as session:
                found = queries.load_rollouts(session).get(key)
            if found is not None and found.phase is RolloutPhase.HALTED:
                halted = found
        if halted is None:
            self.say("controller", f"the rollout did not halt within {self.seconds:g}s")
            return False
        self.say("controller", f"rollout halted: {halted.message}")
        with transaction(self.sessions) as session:
            observed = queries.load_observed(session, now=utcnow())
        spared = sorted(b.workspace_id for b in self.boxes
                        if b.workspace_id in observed
                        and name not in observed[b.workspace_id].attempts
                        and not (b.plugins_dir / name).exists())
        self.say("controller", f"{', '.join(spared)}: no call for {name}; still on the "
                               f"previous revision")
        aborted = await rollouts.command(self.sessions, key, "abort", now=utcnow())
        self.say("you", f"pluginctl rollout abort {key}: {aborted.message}")
        if not await self.until_converged(deadline):
            self.say("controller", f"not back on the previous revision after {self.seconds:g}s")
            return False
        self.say("controller", f"every workspace in sync on revision {aborted.stable.short} "
                               "again")
        return True

    def show_listing(self) -> None:
        box = next((b for b in self.boxes if b.role == 1), self.boxes[0])
        click.echo("")
        click.echo(f"{box.workspace_id}'s plugins directory "
                   f"(boxes/{box.workspace_id}/plugins/), every file and its size:")
        files = _files(box.plugins_dir)
        for path, (size, _) in files.items():
            click.echo(f"  {size:>6} B  {path}")
        name = UPGRADE[0].rsplit("/", 1)[-1]
        shown = next((p for p in (f"{name}/plugin.json", *files) if p.endswith("plugin.json")
                      and p in files), None)
        if shown is not None:
            click.echo("")
            click.echo(f"{shown}:")
            click.echo("  " + files[shown][1].decode("utf-8", "replace").strip())


def _source(desired: Desired, workspace_id: str, name: str) -> str | None:
    wanted = desired.workspaces.get(workspace_id)
    plugin = wanted.plugins.get(name) if wanted is not None else None
    return plugin.source if plugin is not None else None


async def run_demo(directory: Path, seconds: float, db: str | None) -> bool:
    # Every action is narrated on stdout; the loop's and the agents' own warnings would say
    # it twice.
    logging.getLogger("pluginctl.reconciler").setLevel(logging.ERROR)
    logging.getLogger("pluginctl.agent").setLevel(logging.ERROR)
    logging.getLogger("pluginctl.rollout").setLevel(logging.CRITICAL)  # the halt is narrated
    desired = manifests.load(directory)
    for error in desired.errors:
        click.echo(f"error: {error}", err=True)
    workspaces = sorted((w for w in desired.workspaces.values()
                         if w.error is None and not w.suspended),
                        key=lambda w: w.workspace_id)
    if not workspaces:
        click.echo(f"no usable Workspace objects in {directory}", err=True)
        return False

    with tempfile.TemporaryDirectory(prefix="pluginctl-demo-") as scratch_name:
        scratch = Path(scratch_name)
        copy = scratch / "manifests"
        shutil.copytree(directory, copy)
        url = db or f"sqlite:///{scratch / 'pluginctl.db'}"
        engine = make_engine(url)
        ensure_schema(engine)
        # Short backoff and interval so that a few retries fit in a few seconds.
        policy = Policy(call_timeout=5.0, backoff_base=timedelta(seconds=1),
                        backoff_cap=timedelta(seconds=4))
        demo = Demo(scratch, copy, manifests.load(copy), sessions=make_sessions(engine),
                    policy=policy, seconds=seconds)
        demo.say("demo", f"working in {scratch}/ (deleted at exit)")
        upgrade = await demo.publish(workspaces)

        port_ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        stop = asyncio.Event()
        controller = asyncio.create_task(service.serve(
            demo.source, demo.sessions, policy, host="127.0.0.1", port=0, interval=1.0,
            started=port_ready.set_result, stop=stop, on_pass=demo.on_pass))
        try:
            port = await asyncio.wait_for(port_ready, 10)
            database = engine.url.render_as_string(hide_password=True) if db \
                else "pluginctl.db (SQLite)"
            demo.say("controller", f"registry on http://127.0.0.1:{port}, full pass every 1s, "
                                   f"reading manifests/ (a copy of {directory}), database "
                                   f"{database}")
            await demo.start_agents(workspaces, port)
            converged = await demo.run(upgrade)
            _print_status(await demo.held_desired(), demo.sessions, policy)
            demo.show_listing()
            return converged
        finally:
            stop.set()
            await controller
            if demo.pushing is not None:
                await demo.pushing
            for box in demo.boxes:
                await box.agent.stop()
            engine.dispose()


def _statuses(desired: Desired, sessions: Sessions, policy: Policy
              ) -> dict[str, status.WorkspaceStatus]:
    now = utcnow()
    with transaction(sessions) as session:
        observed = queries.load_observed(session, now=utcnow())
    return {workspace_id: status.build(wanted, observed.get(workspace_id), now, policy)
            for workspace_id, wanted in sorted(desired.workspaces.items())}


def _print_status(desired: Desired, sessions: Sessions, policy: Policy) -> None:
    rows = []
    for workspace_id, state in _statuses(desired, sessions, policy).items():
        rows.append([workspace_id, state.phase.value, f"{state.installed}/{state.desired}",
                     "yes" if state.in_sync else "no", str(policy.restart_budget -
                                                            state.restarts_left)])
    click.echo("")
    click.echo(table(["WORKSPACE", "PHASE", "PLUGINS", "IN-SYNC", "RESTARTS"], rows))

