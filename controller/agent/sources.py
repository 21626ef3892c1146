"""Where plugin files come from: `gitea://`, `github://` (any scheme given a `--source-root`)
git repositories at a tag or commit, and `local://` plugin libraries on the box. Fetches run
the `git` command line, hardened and time-limited, into a cache keyed by (repository,
commit, subpath); every tree is checked (size, files, symlinks) before it is used."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

from controller.agent import tree
from controller.domain.models import LOCAL_SCHEME

log = logging.getLogger("pluginctl.agent")

#: Roots known without a flag; `--source-root SCHEME=URL` adds or overrides.
DEFAULT_ROOTS = {"github": "https://github.com"}
_SEGMENT = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9._-]{0,127}$")
#: Segments that are never a plugin's path, whatever the pattern allows.
_FORBIDDEN_SEGMENTS = frozenset({".", "..", ".git"})
_REF = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/+-]{0,199}$")
_COMMIT = re.compile(r"^([0-9a-f]{40}|[0-9a-f]{64})$")
#: Transports git may use at all; `ext::` (runs a command) and `ssh` (prompts) are not here.
_PROTOCOLS = "file:git:http:https"
#: Environment git gets from the agent's own: how to reach the network, nothing else.
_PASSED_THROUGH = frozenset({"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy",
                             "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy",
                             "GIT_SSL_CAINFO", "GIT_SSL_CAPATH", "SSL_CERT_FILE",
                             "SSL_CERT_DIR"})
#: Given to every git command.
_HARDENING = ("-c", "core.hooksPath=/dev/null", "-c", "protocol.ext.allow=never",
              "-c", "submodule.recurse=false", "-c", "fetch.recurseSubmodules=false",
              "-c", "transfer.fsckObjects=true", "-c", "credential.helper=",
              "-c", "gc.auto=0", "-c", "maintenance.auto=false", "-c", "core.askPass=")


class Failure(enum.StrEnum):
    """Why a plugin could not be fetched; each maps to one answer of the runtime API."""

    BAD_SOURCE = "BadSource"  # the source string cannot be used here
    NOT_FOUND = "NotFound"  # no such repository, ref, subpath or library entry
    TIMEOUT = "Timeout"  # the fetch outlasted --fetch-timeout
    REFUSED = "Refused"  # the tree breaks a limit or a safety rule
    FETCH_FAILED = "FetchFailed"  # git failed for another reason


class FetchError(Exception):
    def __init__(self, reason: Failure, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class GitSource:
    """`SCHEME://OWNER/REPO[/SUBPATH]#REF`: SUBPATH's contents at REF of ROOT/OWNER/REPO.git."""

    scheme: str
    owner: str
    repo: str
    subpath: tuple[str, ...]
    ref: str | None

    def url(self, roots: Mapping[str, str]) -> str:
        root = roots.get(self.scheme)
        if root is None:
            raise FetchError(Failure.BAD_SOURCE,
                             f"no repository root for {self.scheme}:// sources: start the "
                             f"agent with --source-root {self.scheme}=URL")
        return f"{root.rstrip('/')}/{self.owner}/{self.repo.removesuffix('.git')}.git"


@dataclass(frozen=True, slots=True)
class LocalSource:
    """`local://NAME[/SUB]`: a directory of the box's plugin library (`--local-root`)."""

    parts: tuple[str, ...]


def parse(source: str) -> GitSource | LocalSource:
    scheme, separator, rest = source.partition("://")
    if not separator:
        raise FetchError(Failure.BAD_SOURCE, f"source {source!r} is not scheme://path")
    path, _, ref = rest.partition("#")
    parts = tuple(path.split("/"))
    for part in parts:
        if not _SEGMENT.fullmatch(part) or part.lower() in _FORBIDDEN_SEGMENTS:
            raise FetchError(Failure.BAD_SOURCE,
                             f"source {source!r}: path segment {part!r} is not allowed (letters, "
                             "digits, '.', '_', '-'; no empty, '.', '..' or '.git' segments)")
    if scheme == LOCAL_SCHEME:
        if ref:
            raise FetchError(Failure.BAD_SOURCE, f"source {source!r}: local:// takes no #ref")
        return LocalSource(parts)
    if len(parts) < 2:
        raise FetchError(Failure.BAD_SOURCE,
                         f"source {source!r}: expected {scheme}://OWNER/REPO[/SUBPATH]#REF")
    if ref and (not _REF.fullmatch(ref) or ".." in ref or ref.endswith((".lock", "/"))):
        raise FetchError(Failure.BAD_SOURCE, f"source {source!r}: {ref!r} is not a ref name")
    return GitSource(scheme, parts[0], parts[1], parts[2:], ref or None)


@dataclass(frozen=True, slots=True)
class Fetched:
    """A checked tree ready to be copied in, and what it is."""

    path: Path
    digest: str
    commit: str | None  # git sources: the commit the ref resolved to


@dataclass(frozen=True)
class SourceConfig:
    """How the agent reaches sources (flags of `pluginctl agent`)."""

    cache_dir: Path
    roots: Mapping[str, str] = field(default_factory=lambda: dict(DEFAULT_ROOTS))
    local_root: Path | None = None
    fetch_timeout: float = 120.0
    limits: tree.Limits = field(default_factory=tree.Limits)
    # What one fetch may bring into the cache (the commit's whole tree, not only the plugin).
    max_fetch_bytes: int = 1024 * 1024 * 1024
    # SCHEME -> an HTTP header line git sends to that scheme's root (private repositories),
    # e.g. "Authorization: Bearer …"; passed to git in its environment, never in argv.
    headers: Mapping[str, str] = field(default_factory=dict)


class Sources:
    """Fetches sources into the cache; one instance per agent (one agent per cache dir)."""

    def __init__(self, config: SourceConfig) -> None:
        self.config = config
        self._git_dir = config.cache_dir / "git"
        self._trees = config.cache_dir / "trees"
        self._home = config.cache_dir / "home"  # an empty HOME: no user git config is read
        self._busy: dict[str, asyncio.Lock] = {}  # one fetch per repository at a time
        self._held: IO[str] | None = None
        for directory in (self._git_dir, self._trees, self._home):
            directory.mkdir(parents=True, exist_ok=True)
        self._env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self._home),
            "LC_ALL": "C",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_ASKPASS": "",
            "SSH_ASKPASS": "",
            "GIT_ALLOW_PROTOCOL": _PROTOCOLS,
            "GIT_PROTOCOL_FROM_USER": "0",
            "GIT_NO_REPLACE_OBJECTS": "1",
            # How the box reaches the network (proxies, its CA bundle): passed through.
            **{name: value for name, value in os.environ.items() if name in _PASSED_THROUGH},
            **_header_config(config),
        }

    def lock(self) -> None:
        """Hold `CACHE/lock` for as long as this process lives (one agent per cache), then
        clear what a killed agent left: half-written trees and repositories, git's locks."""
        handle = (self.config.cache_dir / "lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            handle.close()
            raise FetchError(Failure.FETCH_FAILED, f"another agent uses the cache "
                                                   f"{self.config.cache_dir}") from error
        self._held = handle
        for leftover in [*self._trees.glob(".*"), *self._git_dir.glob(".*")]:
            shutil.rmtree(leftover, ignore_errors=True)
        for stale in self._git_dir.glob("*.git/shallow.lock"):
            stale.unlink(missing_ok=True)

    async def fetch(self, source: str) -> Fetched:
        """A checked copy of `source` (cached for git sources), or FetchError."""
        parsed = parse(source)
        try:
            if isinstance(parsed, LocalSource):
                return await asyncio.wait_for(asyncio.to_thread(self._local, parsed),
                                              self.config.fetch_timeout)
            return await asyncio.wait_for(self._git(parsed), self.config.fetch_timeout)
        except TimeoutError as error:
            raise FetchError(Failure.TIMEOUT, f"fetching {source} took longer than "
                                              f"{self.config.fetch_timeout:g}s "
                                              "(--fetch-timeout)") from error

    # --- local:// --------------------------------------------------------------------------

    def _local(self, source: LocalSource) -> Fetched:
        root = self.config.local_root
        if root is None:
            raise FetchError(Failure.BAD_SOURCE, "local:// sources need the agent's "
                                                 "--local-root")
        base = root.resolve()
        wanted = base.joinpath(*source.parts)
        resolved = wanted.resolve()
        if resolved != base and base not in resolved.parents:
            raise FetchError(Failure.REFUSED, f"local://{'/'.join(source.parts)} leads "
                                              f"outside --local-root")
        if not resolved.is_dir():
            raise FetchError(Failure.NOT_FOUND, f"local://{'/'.join(source.parts)}: no such "
                                                f"directory in the plugin library")
        _check(resolved, self.config.limits)
        return Fetched(resolved, tree.digest(resolved), None)

    # --- git --------------------------------------------------------------------------------

    async def _git(self, source: GitSource) -> Fetched:
        url = source.url(self.config.roots)
        shown = _redact(url)
        if source.ref is None:
            raise FetchError(Failure.BAD_SOURCE, f"{shown}: no #ref: the agent fetches a tag "
                                                 "or a commit, never whatever is newest")
        key = hashlib.sha256(url.encode()).hexdigest()[:32]
        async with self._busy.setdefault(key, asyncio.Lock()):
            return await self._git_locked(source, source.ref, url, key)

    async def _git_locked(self, source: GitSource, ref: str, url: str, key: str) -> Fetched:
        shown = _redact(url)
        repo = self._git_dir / f"{key}.git"
        if not repo.is_dir():
            scratch = self._git_dir / f".{key}.{os.getpid()}.new"
            shutil.rmtree(scratch, ignore_errors=True)
            await self._run(["init", "--bare", "-q", str(scratch)], shown)
            scratch.rename(repo)
        commit = await self._commit(repo, url, ref)
        subpath = "/".join(source.subpath)
        cached = self._trees / hashlib.sha256(f"{url}\0{commit}\0{subpath}".encode()).hexdigest()
        if (cached / "digest").is_file():  # complete: a cached tree is renamed in whole
            digest = await asyncio.to_thread((cached / "digest").read_text)
            return Fetched(cached / "tree", digest.strip(), commit)
        where = f"{shown} at {commit[:12]}" + (f", {subpath}" if subpath else "")
        scratch = self._trees / f".{cached.name}.{uuid.uuid4().hex[:8]}"
        running = _Running()
        try:
            await asyncio.to_thread(self._export, repo, f"{commit}:{subpath}", scratch,
                                    where=where, running=running)
        except asyncio.CancelledError:
            running.cancel()  # the time limit: git is killed, the thread stops and cleans up
            raise
        digest = (scratch / "digest").read_text().strip()
        try:
            scratch.rename(cached)
        except OSError:  # another agent's fetch got there first: same content
            shutil.rmtree(scratch, ignore_errors=True)
        return Fetched(cached / "tree", digest, commit)

    def _export(self, repo: Path, treeish: str, scratch: Path, *, where: str,
                running: _Running) -> None:
        """Write `treeish` (a commit's subdirectory) into `scratch/tree` blob by blob, as
        git stores it: no checkout, no `.gitattributes` (no export-subst, export-ignore or
        line-ending filters), nothing but files, directories and symlinks. The listing is
        checked against the limits before a byte is written; then the tree is checked as a
        whole and its digest written beside it. Runs in a thread, which stops when `running`
        is cancelled; removes `scratch` on failure."""
        try:
            entries = self._listing(repo, treeish, where, running)
            destination = scratch / "tree"
            destination.mkdir(parents=True)
            self._write_blobs(repo, entries, destination, where=where, running=running)
            tree.check(destination, self.config.limits)
            (scratch / "digest").write_text(tree.digest(destination) + "\n")
        except tree.TreeError as error:
            shutil.rmtree(scratch, ignore_errors=True)
            raise FetchError(Failure.REFUSED, f"{where}: {error}") from error
        except (OSError, ValueError) as error:  # ENOSPC, a NUL in a link target, ...
            shutil.rmtree(scratch, ignore_errors=True)
            raise FetchError(Failure.REFUSED, f"{where}: cannot write it: {error}") from error
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise

    def _popen(self, args: list[str], running: _Running, stdin: bool = False
               ) -> tuple[subprocess.Popen[bytes], IO[bytes]]:
        """git started from a thread, registered with `running` so that a time limit kills
        it; its stderr goes to a file (never a pipe nobody reads while it streams)."""
        errors = tempfile.TemporaryFile()  # noqa: SIM115 - closed by the caller
        try:
            process = running.start(["git", *_HARDENING, *args], env=self._env,
                                    stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=errors)
        except FileNotFoundError as error:
            errors.close()
            raise FetchError(Failure.FETCH_FAILED, "git is not installed") from error
        return process, errors

    def _listing(self, repo: Path, treeish: str, where: str, running: _Running
                 ) -> list[tuple[int, bytes, bytes]]:
        """(mode, object id, path) of every blob under `treeish`, read as git streams it and
        refused as soon as it passes --max-plugin-files (files and directories) or
        --max-plugin-bytes; the listing must end whole."""
        limits = self.config.limits
        listing, errors = self._popen(["--git-dir", str(repo), "ls-tree", "-r", "-z", "-l",
                                       "--full-tree", treeish], running)
        entries: list[tuple[int, bytes, bytes]] = []
        directories: set[bytes] = set()
        size, pending = 0, b""
        output = _stream(listing.stdout)
        try:
            for chunk in iter(lambda: output.read(65536), b""):
                *items, pending = (pending + chunk).split(b"\0")
                for item in items:
                    meta, _, path = item.partition(b"\t")
                    mode, kind, oid, length = meta.split()
                    if kind == b"commit":
                        log.info("%s: %s is a submodule; not fetched", where,
                                 path.decode(errors="replace"))
                        continue
                    path = _safe_path(path, where)
                    parts = path.split(b"/")
                    directories.update(b"/".join(parts[:n]) for n in range(1, len(parts)))
                    if len(entries) + 1 + len(directories) > limits.max_files:
                        raise FetchError(Failure.REFUSED, f"{where}: more than "
                                         f"{limits.max_files} files (--max-plugin-files)")
                    size += int(length) if length.isdigit() else 0
                    if size > limits.max_bytes:
                        raise FetchError(Failure.REFUSED, f"{where}: larger than "
                                         f"{limits.max_bytes} bytes (--max-plugin-bytes)")
                    entries.append((int(mode, 8), oid, path))
            returncode = listing.wait()
        except BaseException:
            listing.kill()
            listing.wait()
            raise
        finally:
            errors.seek(0)
            err = errors.read()
            errors.close()
        if returncode != 0 or pending:
            detail = " ".join(err.decode("utf-8", "replace").split())[-300:]
            if any(sign in detail.lower() for sign in ("not a valid object", "not a tree")):
                raise FetchError(Failure.NOT_FOUND, f"{where}: no such directory")
            raise FetchError(Failure.FETCH_FAILED,
                             f"git ls-tree {where}: {detail or f'ended with {returncode}'}")
        return entries

    def _write_blobs(self, repo: Path, entries: list[tuple[int, bytes, bytes]],
                     destination: Path, *, where: str, running: _Running) -> None:
        """One `git cat-file --batch` for all blobs, asked and answered one at a time. No
        path is written through a symlink of the plugin's own (git's fsck refuses such trees
        too; this does not depend on it)."""
        batch, errors = self._popen(["--git-dir", str(repo), "cat-file", "--batch"], running,
                                    stdin=True)
        asking, answers = _stream(batch.stdin), _stream(batch.stdout)
        links: set[bytes] = set()
        try:
            for mode, oid, path in entries:
                running.check()
                parts = path.split(b"/")
                if any(b"/".join(parts[:n]) in links for n in range(1, len(parts))):
                    raise FetchError(Failure.REFUSED, f"{where}: {path!r} lies under a "
                                                      "symlink of the plugin")
                asking.write(oid + b"\n")
                asking.flush()
                header = answers.readline().split()
                if len(header) != 3 or header[1] != b"blob" or not header[2].isdigit():
                    raise FetchError(Failure.FETCH_FAILED, f"git cat-file: no blob {oid!r}")
                content = answers.read(int(header[2]))
                if len(content) != int(header[2]) or answers.read(1) != b"\n":
                    raise FetchError(Failure.FETCH_FAILED, f"git cat-file: {oid!r} cut short")
                target = destination / os.fsdecode(path)
                target.parent.mkdir(parents=True, exist_ok=True)
                if mode == 0o120000:
                    os.symlink(content, target)
                    links.add(path)
                    continue
                descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                                     | os.O_NOFOLLOW, 0o755 if mode & 0o111 else 0o644)
                with os.fdopen(descriptor, "wb") as stream:
                    stream.write(content)
        finally:
            batch.kill()
            batch.communicate()
            errors.close()

    async def _commit(self, repo: Path, url: str, ref: str) -> str:
        """The commit `ref` names, fetched into `repo` (shallow, that one commit only). Tags
        and commit ids are pins: once resolved they are not asked for again; any other ref
        (a branch) is looked up every time."""
        shown = _redact(url)
        known_file = repo / "pluginctl-refs.json"
        known: dict[str, str] = {}
        with contextlib.suppress(OSError, ValueError):
            known = dict(json.loads(known_file.read_text()))
        if _COMMIT.fullmatch(ref):
            commit = ref
        elif ref in known and await self._has_commit(repo, known[ref]):
            return known[ref]
        else:
            listed = await self._run(["ls-remote", "--", url, f"refs/tags/{ref}",
                                      f"refs/tags/{ref}^{{}}", f"refs/heads/{ref}"], shown)
            found: dict[str, str] = {}
            for line in listed.splitlines():
                commit_id, _, name = line.partition("\t")
                found[name] = commit_id
            commit = (found.get(f"refs/tags/{ref}^{{}}") or found.get(f"refs/tags/{ref}")
                      or found.get(f"refs/heads/{ref}") or "")
            if not commit:
                raise FetchError(Failure.NOT_FOUND, f"{shown}: no tag or branch {ref!r}")
            if f"refs/tags/{ref}" in found:
                known[ref] = commit
        if not await self._has_commit(repo, commit):
            # unpackLimit=1: what a fetch brings stays in packs of its own, so a fetch that
            # brought too much can be taken back whole.
            await self._run(["--git-dir", str(repo), "-c", "fetch.unpackLimit=1",
                             "-c", "transfer.unpackLimit=1", "fetch", "-q", "--depth=1",
                             "--no-tags", "--no-write-fetch-head", "--", url, commit], shown,
                            missing=f"{shown}: no commit {commit}", grows=repo)
            if not await self._has_commit(repo, commit):
                raise FetchError(Failure.NOT_FOUND, f"{shown}: {ref} is not a commit")
        if known.get(ref) == commit:
            tree.write_atomically(known_file, json.dumps(known, sort_keys=True))
        return commit

    async def _watched(self, process: asyncio.subprocess.Process, directory: Path,
                       shown: str) -> tuple[bytes, bytes]:
        """communicate(), while `directory` grows by at most --max-fetch-bytes (checked as it
        runs, and once more at the end)."""
        limit = self.config.max_fetch_bytes
        before = await asyncio.to_thread(_size, directory)
        talking = asyncio.ensure_future(process.communicate())
        try:
            while True:
                done, _ = await asyncio.wait({talking}, timeout=0.25)
                if await asyncio.to_thread(_size, directory) - before > limit:
                    raise FetchError(Failure.REFUSED, f"fetching {shown} brought more than "
                                                      f"{limit} bytes (--max-fetch-bytes)")
                if done:
                    return talking.result()
        finally:
            if not talking.done():
                talking.cancel()

    async def _has_commit(self, repo: Path, commit: str) -> bool:
        try:
            await self._run(["--git-dir", str(repo), "cat-file", "-e", f"{commit}^{{commit}}"],
                            "")
        except FetchError:
            return False
        return True

    async def _run(self, args: list[str], shown: str, missing: str | None = None,
                   grows: Path | None = None) -> str:
        """Run git hardened (no prompts, hooks, submodules, system or user config, `ext::`);
        stdout on success, FetchError naming `shown` (never a credential) otherwise. The
        caller's time limit kills the whole process group, and so does `grows` (a directory)
        growing by more than --max-fetch-bytes."""
        try:
            process = await asyncio.create_subprocess_exec(
                "git", *_HARDENING, *args, env=self._env, stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
        except FileNotFoundError as error:
            raise FetchError(Failure.FETCH_FAILED, "git is not installed (the agent fetches "
                                                   "git sources with it)") from error
        undo = _Undo(grows) if grows is not None else None
        try:
            if grows is None:
                out, err = await process.communicate()
            else:
                out, err = await self._watched(process, grows, shown)
        except (asyncio.CancelledError, FetchError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            if undo is not None:
                await asyncio.to_thread(undo.undo)
            raise
        if process.returncode != 0:
            detail = " ".join(_redact_text(err.decode("utf-8", "replace")).split())[-300:]
            lowered = detail.lower()
            if missing and any(sign in lowered for sign in (
                    "not a valid object", "not a tree object", "couldn't find remote ref",
                    "not our ref", "does not exist")):
                raise FetchError(Failure.NOT_FOUND, missing)
            if "does not appear to be a git repository" in lowered or "not found" in lowered:
                raise FetchError(Failure.NOT_FOUND, f"{shown}: no such repository ({detail})")
            verb = next((a for a, before in zip(args, ["", *args], strict=False)
                         if not a.startswith("-") and before not in ("--git-dir", "-c")), "")
            raise FetchError(Failure.FETCH_FAILED, f"git {verb} {shown}: {detail or 'failed'}")
        return out.decode("utf-8", "replace")


def _check(root: Path, limits: tree.Limits) -> None:
    try:
        tree.check(root, limits)
    except tree.TreeError as error:
        raise FetchError(Failure.REFUSED, str(error)) from error


class _Undo:
    """Takes a fetch back: the packs it added (and its temporary ones) go, and the list of
    shallow commits is what it was."""

    def __init__(self, repo: Path) -> None:
        self.packs = repo / "objects" / "pack"
        self.before = set(self.packs.glob("*")) if self.packs.is_dir() else set()
        self.shallow = repo / "shallow"
        self.shallow_text = self.shallow.read_bytes() if self.shallow.exists() else None

    def undo(self) -> None:
        for added in set(self.packs.glob("*")) - self.before:
            added.unlink(missing_ok=True)
        # A killed shallow fetch leaves its lock, and every later fetch would fail on it.
        (self.shallow.parent / "shallow.lock").unlink(missing_ok=True)
        if self.shallow_text is None:
            self.shallow.unlink(missing_ok=True)
        else:
            self.shallow.write_bytes(self.shallow_text)


def git_version() -> tuple[int, ...] | None:
    """The installed git's version, or None without git."""
    try:
        out = subprocess.run(["git", "--version"], capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    numbers = re.findall(r"\d+", out)[:3]
    return tuple(int(n) for n in numbers) or None


def _size(directory: Path) -> int:
    total = 0
    for parent, _, names in os.walk(directory):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(parent, name)).st_size
    return total


def _header_config(config: SourceConfig) -> dict[str, str]:
    """git configuration in its environment (GIT_CONFIG_COUNT/KEY_n/VALUE_n: never visible in
    `ps`): each scheme's header, sent only to URLs under that scheme's root."""
    entries = []
    for scheme, header in sorted(config.headers.items()):
        root = config.roots.get(scheme)
        if root is None or not root.startswith(("https://", "http://")):
            raise FetchError(Failure.BAD_SOURCE, f"credentials for {scheme}: its root must be "
                                                 "an http:// or https:// --source-root")
        entries.append((f"http.{root.rstrip('/')}/.extraHeader", header))
    variables = {"GIT_CONFIG_COUNT": str(len(entries))} if entries else {}
    for index, (key, value) in enumerate(entries):
        variables[f"GIT_CONFIG_KEY_{index}"] = key
        variables[f"GIT_CONFIG_VALUE_{index}"] = value
    return variables


def _safe_path(path: bytes, where: str) -> bytes:
    """A path from a git tree, refused if any part of it could leave the plugin, or if it
    is the plugin's own top-level `.complete` (the marker is the agent's to write)."""
    parts = path.split(b"/")
    if path.startswith(b"/") or any(part in (b"", b".", b"..") or part.lower() == b".git"
                                    for part in parts):
        raise FetchError(Failure.REFUSED, f"{where}: path {path!r} leaves the plugin")
    if parts[0] == tree.COMPLETE_MARKER.encode():
        raise FetchError(Failure.REFUSED, f"{where}: the plugin has its own "
                                          f"{tree.COMPLETE_MARKER}; that name is the marker's")
    return path


class _Running:
    """The git processes a fetch's thread starts, so that its time limit can stop them; once
    cancelled, no new one starts and the thread's loop stops."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._processes: list[subprocess.Popen[bytes]] = []
        self._cancelled = False

    def start(self, argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            self.check()
            process = subprocess.Popen(argv, start_new_session=True, **options)
            self._processes.append(process)
            return process

    def check(self) -> None:
        if self._cancelled:
            raise FetchError(Failure.TIMEOUT, "cancelled by the fetch's time limit")

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            for process in self._processes:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


def _stream(stream: IO[bytes] | None) -> IO[bytes]:
    if stream is None:
        raise FetchError(Failure.FETCH_FAILED, "git was started without a pipe")
    return stream


def _redact(url: str) -> str:
    """A URL fit for logs and answers: any user or password replaced."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, "***@" + host, parts.path, parts.query, parts.fragment))


_CREDENTIALS = re.compile(r"(\w+://)[^/@\s]+@")


def _redact_text(text: str) -> str:
    return _CREDENTIALS.sub(r"\1***@", text)
