"""The plugins directory of one box, in the layout the platform's runtimes read:
`DIR/<name>/` holds a plugin's files and a `.complete` marker. pluginctl's own records live
beside the trees in `DIR/.pluginctl/` (never inside one). A plugin is staged on the same
filesystem and swapped in with one atomic `renameat2(RENAME_EXCHANGE)`, so `DIR/<name>` is
at every instant the whole old tree or the whole new one; removal is one rename away too."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

from controller.agent import tree
from controller.agent.sources import Fetched
from controller.domain.models import InvalidSpec, Plugin, check_plugin_name, utcnow
from controller.domain.wire import MAX_PLUGINS

log = logging.getLogger("pluginctl.agent")

BOOKKEEPING = ".pluginctl"
RESTART_PENDING = "restart-pending"
RESTART_RUNNING = "restart-running"
#: Reported as the source of a plugin directory pluginctl did not put there.
USER_SCHEME = "user"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


class DiskError(Exception):
    """An install or removal that must not happen; `conflict` when the directory is not
    pluginctl's (the user's), else the request itself is wrong."""

    def __init__(self, message: str, *, conflict: bool = False) -> None:
        super().__init__(message)
        self.conflict = conflict


@dataclass(frozen=True, slots=True)
class Record:
    """What pluginctl installed at `DIR/<name>` (kept in `DIR/.pluginctl/records/`)."""

    name: str
    source: str
    digest: str
    commit: str | None
    installed_at: str


class PluginsDir:
    """Reads and changes `root` (the box's plugins directory). Blocking: call from a thread,
    one change at a time."""

    def __init__(self, root: Path, limits: tree.Limits | None = None) -> None:
        self.root = root
        self.limits = limits or tree.Limits()
        self._records = root / BOOKKEEPING / "records"
        self._staging = root / BOOKKEEPING / "staging"
        self._digests: dict[str, tuple[object, str]] = {}  # name -> (signature, digest)
        self._ignored: set[str] = set()  # names already logged as unreportable
        self._lock: IO[str] | None = None

    def prepare(self) -> None:
        """Create the layout; put back an old tree a killed swap left aside, and throw away
        what killed installs and removals left (staged trees, trees on their way out,
        half-written records, records of trees that are gone)."""
        self._ensure_layout()
        for leftover in sorted(self._staging.iterdir()):
            if leftover.name.endswith(".old"):
                # The two-rename swap was killed between its renames: the old tree is whole.
                name = leftover.name.removesuffix(".old").rsplit(".", 1)[0]
                target = self.root / name
                if not target.exists() and not target.is_symlink():
                    log.info("putting back %s, left aside by an interrupted swap", name)
                    leftover.rename(target)
                    continue
            log.info("removing %s left by an interrupted install or removal", leftover.name)
            _remove_tree(leftover)
        for record in self._records.iterdir():
            if record.name.startswith(".") or not (self.root / record.stem).is_dir():
                record.unlink()

    def lock(self) -> None:
        """Hold `DIR/.pluginctl/lock` for as long as this process lives: one agent per
        plugins directory (a second would throw away the first one's staged installs)."""
        if self._lock is not None:
            return
        self._ensure_layout()
        handle = (self.root / BOOKKEEPING / "lock").open("a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            handle.close()
            raise DiskError(f"another agent uses {self.root} (it holds "
                            f"{BOOKKEEPING}/lock)") from error
        self._lock = handle

    def _ensure_layout(self) -> None:
        """The bookkeeping directories exist (again, after a wipe) and are directories of
        ours, not symlinks someone put there."""
        self.root.mkdir(parents=True, exist_ok=True)
        for directory in (self.root / BOOKKEEPING, self._records, self._staging):
            if directory.is_symlink():
                raise DiskError(f"{directory} is a symlink; pluginctl keeps its records in "
                                "a real directory")
            directory.mkdir(exist_ok=True)

    # --- restarts owed ---------------------------------------------------------------------

    def restart_pending(self) -> bool:
        """Whether the box changed since the start of its last successful restart (kept on
        disk: an answer that was lost, or an agent killed after the change, must not lose
        the restart)."""
        state = self.root / BOOKKEEPING
        return (state / RESTART_PENDING).exists() or (state / RESTART_RUNNING).exists()

    def mark_restart_pending(self) -> None:
        self._ensure_layout()
        (self.root / BOOKKEEPING / RESTART_PENDING).touch()

    def restart_starting(self) -> None:
        """A restart starts: it covers the changes made so far (and only those: a change
        made while it runs owes another one)."""
        state = self.root / BOOKKEEPING
        with contextlib.suppress(FileNotFoundError):
            (state / RESTART_PENDING).rename(state / RESTART_RUNNING)

    def restart_finished(self, ok: bool) -> None:
        state = self.root / BOOKKEEPING
        if ok:
            (state / RESTART_RUNNING).unlink(missing_ok=True)
        elif (state / RESTART_RUNNING).exists():
            (state / RESTART_RUNNING).rename(state / RESTART_PENDING)

    # --- reading -------------------------------------------------------------------------

    def record(self, name: str) -> Record | None:
        try:
            data = json.loads((self._records / f"{name}.json").read_text(encoding="utf-8"))
            return Record(**data)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as error:
            log.warning("unreadable record of %s (treated as absent): %s", name, error)
            return None

    def current_digest(self, name: str) -> str:
        """The digest of `DIR/<name>` as it is now; re-read only when an lstat of its entries
        says something changed."""
        path = self.root / name
        signature = tree.signature(path)
        known = self._digests.get(name)
        if known is not None and known[0] == signature:
            return known[1]
        digest = tree.digest(path)
        self._digests[name] = (signature, digest)
        return digest

    def inventory(self, limit: int = MAX_PLUGINS) -> list[Plugin]:
        """What is on disk now: pluginctl's plugins with their current digest (`modified`
        when that is not the recorded one, or the `.complete` marker is missing), and other
        plugin directories as the user's (`user://NAME`), at most `limit` entries in all
        (pluginctl's first: a report the registry refuses would take the box offline)."""
        ours: list[Plugin] = []
        users: list[Plugin] = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        except FileNotFoundError:
            return []
        present = set()
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                check_plugin_name(name)
            except InvalidSpec:
                self._ignore(entry.path, "not a valid plugin name")
                continue
            record = self.record(name)
            if record is None or entry.is_symlink() or not entry.is_dir():
                users.append(Plugin(name, f"{USER_SCHEME}://{name}"))
                continue
            present.add(name)
            try:
                digest = self.current_digest(name)
            except (OSError, tree.TreeError) as error:
                log.warning("cannot read %s: %s", entry.path, error)
                ours.append(Plugin(name, record.source, None, modified=True))
                continue
            intact = digest == record.digest and (self.root / name / tree.COMPLETE_MARKER
                                                  ).is_file()
            ours.append(Plugin(name, record.source, digest, modified=not intact))
        self._forget_records_except(present)
        for plugin in users[max(0, limit - len(ours)):]:
            self._ignore(str(self.root / plugin.name), f"more than {limit} plugin directories")
        return sorted(ours[:limit] + users[:max(0, limit - len(ours))], key=lambda p: p.name)

    def _ignore(self, path: str, why: str) -> None:
        if path not in self._ignored:
            self._ignored.add(path)
            log.warning("not reporting %s: %s", path, why)

    def _forget_records_except(self, present: set[str]) -> None:
        """A record whose tree is gone (deleted by hand, a wiped box) is dropped at once, so
        that a directory someone makes later under that name is theirs, not ours."""
        try:
            records = list(self._records.iterdir())
        except FileNotFoundError:
            return
        for record in records:
            if record.suffix == ".json" and not record.name.startswith(".") \
                    and record.stem not in present and not (self.root / record.stem).is_dir():
                record.unlink(missing_ok=True)
                self._digests.pop(record.stem, None)

    def owner_problem(self, name: str) -> str | None:
        """Why pluginctl may not touch `DIR/<name>`, or None (absent, or pluginctl's)."""
        path = self.root / name
        if not path.exists() and not path.is_symlink():
            return None
        if self.record(name) is None or path.is_symlink() or not path.is_dir():
            return (f"{path} was not installed by pluginctl (no record in {BOOKKEEPING}/): "
                    "it is the user's and is left alone")
        return None

    def unchanged(self, name: str, source: str, fetched: Fetched) -> bool:
        """Whether `DIR/<name>` already holds exactly these files (so an install changes
        nothing on disk). The same files from another source (a tag, then the same commit by
        its id) only get their record rewritten."""
        record = self.record(name)
        try:
            same = (record is not None and record.digest == fetched.digest
                    and (self.root / name / tree.COMPLETE_MARKER).is_file()
                    and self.current_digest(name) == fetched.digest)
        except (OSError, tree.TreeError):  # unreadable, or a FIFO put in by hand: replace it
            same = False
        if same and record is not None and (record.source, record.commit) != (
                source, fetched.commit):
            self._write_record(Record(name, source, fetched.digest, fetched.commit,
                                      utcnow().isoformat()))
        return same

    # --- changing --------------------------------------------------------------------------

    def install(self, name: str, source: str, fetched: Fetched) -> bool:
        """Put `fetched` at `DIR/<name>`: copied into a staging directory beside it, checked
        and digested again there (what is swapped in is exactly what was checked), the
        `.complete` marker written last, the record written, then swapped in atomically.
        False when it was already there (nothing changes)."""
        check_plugin_name(name)
        self._ensure_layout()
        problem = self.owner_problem(name)
        if problem is not None:
            raise DiskError(problem, conflict=True)
        if self.unchanged(name, source, fetched):
            return False
        before = self.record(name)  # None: a new plugin, which must not replace anything
        staged = self._staging / f"{name}.{uuid.uuid4().hex[:8]}"
        target = self.root / name
        try:
            shutil.copytree(fetched.path, staged, symlinks=True, copy_function=_copy_file)
            tree.check(staged, self.limits)
            if tree.digest(staged) != fetched.digest:
                raise DiskError(f"{source} changed while it was being copied; nothing was "
                                "changed (try again)")
            marker = os.open(staged / tree.COMPLETE_MARKER,
                             os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(marker, "w") as stream:
                stream.write(fetched.digest + "\n")
            # The record first: a kill between the two leaves a record whose digest the tree
            # does not match (reported `modified`, installed again), never a tree of ours
            # without a record (which would pass for the user's).
            self._write_record(Record(name, source, fetched.digest, fetched.commit,
                                      utcnow().isoformat()))
            self.mark_restart_pending()  # before the swap: a kill after it still owes one
            try:
                if before is not None and target.is_dir() and not target.is_symlink():
                    _exchange(staged, target)  # `staged` now holds the old tree
                else:
                    _rename_new(staged, target)
            except FileExistsError as error:
                self._restore_record(name, before)
                raise DiskError(self.owner_problem(name) or f"{target} appeared meanwhile",
                                conflict=True) from error
            except BaseException:
                self._restore_record(name, before)
                raise
        except tree.TreeError as error:
            raise DiskError(f"{source}: {error}") from error
        finally:
            _remove_tree(staged)
        self._digests.pop(name, None)
        return True

    def _restore_record(self, name: str, record: Record | None) -> None:
        if record is None:
            (self._records / f"{name}.json").unlink(missing_ok=True)
        else:
            self._write_record(record)

    def remove(self, name: str) -> bool:
        """Take `DIR/<name>` away in one rename, then delete it. False when it was not there;
        DiskError (conflict) when it is the user's."""
        check_plugin_name(name)
        self._ensure_layout()
        problem = self.owner_problem(name)
        if problem is not None:
            raise DiskError(problem, conflict=True)
        target = self.root / name
        if not target.exists():
            with contextlib.suppress(FileNotFoundError):
                (self._records / f"{name}.json").unlink()
            return False
        doomed = self._staging / f"{name}.{uuid.uuid4().hex[:8]}.removed"
        self.mark_restart_pending()  # a running workspace keeps it loaded until a restart
        target.rename(doomed)
        (self._records / f"{name}.json").unlink(missing_ok=True)
        _remove_tree(doomed)
        self._digests.pop(name, None)
        return True

    def _write_record(self, record: Record) -> None:
        self._ensure_layout()
        tree.write_atomically(self._records / f"{record.name}.json",
                              json.dumps(asdict(record), sort_keys=True))


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)


def _rename2(source: Path, target: Path, flags: int) -> None:
    if _renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(target))


def _exchange(staged: Path, target: Path) -> None:
    """Swap two directories in one step. Where the filesystem cannot (EINVAL/ENOSYS: no
    RENAME_EXCHANGE), two renames: for a moment `target` is absent, never half written."""
    try:
        _rename2(staged, target, _RENAME_EXCHANGE)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        aside = staged.with_name(staged.name + ".old")
        target.rename(aside)
        try:
            staged.rename(target)
        except OSError:
            aside.rename(target)  # put the old tree back
            raise
        aside.rename(staged)


def _rename_new(staged: Path, target: Path) -> None:
    """Move a new plugin in; FileExistsError if anything is at `target` (never replaced)."""
    try:
        _rename2(staged, target, _RENAME_NOREPLACE)
    except OSError as error:
        if error.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from error
        if error.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        if target.exists() or target.is_symlink():
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from error
        staged.rename(target)


def _copy_file(source: str, destination: str) -> str:
    """Contents, and an execute bit if any was set: never setuid, group- or world-writable
    bits from a library."""
    shutil.copyfile(source, destination, follow_symlinks=False)
    mode = 0o755 if os.stat(source, follow_symlinks=False).st_mode & 0o111 else 0o644
    os.chmod(destination, mode)
    return destination


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
