"""The plugins directory of one box, in the layout the platform's runtimes read:
`DIR/<name>/` holds a plugin's files and a `.complete` marker. pluginctl's own records live
beside the trees in `DIR/.pluginctl/` (never inside one). A plugin is staged on the same
filesystem and swapped in with one atomic `renameat2(RENAME_EXCHANGE)`, so `DIR/<name>` is
at every instant the whole old tree or the whole new one; removal is one rename away too."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from controller.agent import tree
from controller.agent.sources import Fetched
from controller.models import InvalidSpec, Plugin, check_plugin_name, utcnow

log = logging.getLogger("pluginctl.agent")

BOOKKEEPING = ".pluginctl"
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

    def __init__(self, root: Path) -> None:
        self.root = root
        self._records = root / BOOKKEEPING / "records"
        self._staging = root / BOOKKEEPING / "staging"
        self._digests: dict[str, tuple[object, str]] = {}  # name -> (signature, digest)
        self._ignored: set[str] = set()  # names already logged as unreportable

    def prepare(self) -> None:
        """Create the layout; throw away what a killed install or removal left behind
        (staged trees, old trees waiting to be deleted, records of trees that are gone)."""
        self._records.mkdir(parents=True, exist_ok=True)
        if self._staging.exists():
            for leftover in self._staging.iterdir():
                log.info("removing %s left by an interrupted install or removal", leftover.name)
                _remove_tree(leftover)
        self._staging.mkdir(exist_ok=True)
        for record in self._records.glob("*.json"):
            if not (self.root / record.stem).is_dir():
                record.unlink()

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

    def inventory(self) -> list[Plugin]:
        """What is on disk now: pluginctl's plugins with their current digest (`modified`
        when that is not the recorded one, or the `.complete` marker is missing), and every
        other plugin directory as the user's (`user://NAME`)."""
        found: list[Plugin] = []
        try:
            entries = sorted(os.scandir(self.root), key=lambda entry: entry.name)
        except FileNotFoundError:
            return found
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            try:
                check_plugin_name(name)
            except InvalidSpec:
                if name not in self._ignored:
                    self._ignored.add(name)
                    log.warning("not reporting %s: not a valid plugin name", entry.path)
                continue
            record = self.record(name)
            if record is None or entry.is_symlink() or not entry.is_dir():
                found.append(Plugin(name, f"{USER_SCHEME}://{name}"))
                continue
            try:
                digest = self.current_digest(name)
            except (OSError, tree.TreeError) as error:
                log.warning("cannot read %s: %s", entry.path, error)
                found.append(Plugin(name, record.source, None, modified=True))
                continue
            intact = digest == record.digest and (self.root / name / tree.COMPLETE_MARKER
                                                  ).is_file()
            found.append(Plugin(name, record.source, digest, modified=not intact))
        return found

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
        """Whether `DIR/<name>` already is exactly this plugin (so an install is a no-op)."""
        record = self.record(name)
        return (record is not None and record.source == source
                and record.digest == fetched.digest
                and (self.root / name / tree.COMPLETE_MARKER).is_file()
                and self.current_digest(name) == fetched.digest)

    # --- changing --------------------------------------------------------------------------

    def install(self, name: str, source: str, fetched: Fetched) -> bool:
        """Put `fetched` at `DIR/<name>`: copied into a staging directory beside it, the
        `.complete` marker written last, the record written, then swapped in atomically.
        False when it was already there (nothing changes)."""
        check_plugin_name(name)
        problem = self.owner_problem(name)
        if problem is not None:
            raise DiskError(problem, conflict=True)
        if self.unchanged(name, source, fetched):
            return False
        staged = self._staging / f"{name}.{uuid.uuid4().hex[:8]}"
        try:
            shutil.copytree(fetched.path, staged, symlinks=True, copy_function=shutil.copy)
            (staged / tree.COMPLETE_MARKER).write_text(fetched.digest + "\n")
            # The record first: a kill between the two leaves a record whose digest the tree
            # does not match (reported `modified`, installed again), never a tree of ours
            # without a record (which would pass for the user's).
            self._write_record(Record(name, source, fetched.digest, fetched.commit,
                                      utcnow().isoformat()))
            target = self.root / name
            if target.is_dir():
                _exchange(staged, target)  # `staged` now holds the old tree
            else:
                _rename_new(staged, target)
        finally:
            _remove_tree(staged)
        self._digests.pop(name, None)
        return True

    def remove(self, name: str) -> bool:
        """Take `DIR/<name>` away in one rename, then delete it. False when it was not there;
        DiskError (conflict) when it is the user's."""
        check_plugin_name(name)
        problem = self.owner_problem(name)
        if problem is not None:
            raise DiskError(problem, conflict=True)
        target = self.root / name
        if not target.exists():
            with contextlib.suppress(FileNotFoundError):
                (self._records / f"{name}.json").unlink()
            return False
        doomed = self._staging / f"{name}.{uuid.uuid4().hex[:8]}.removed"
        target.rename(doomed)
        (self._records / f"{name}.json").unlink(missing_ok=True)
        _remove_tree(doomed)
        self._digests.pop(name, None)
        return True

    def _write_record(self, record: Record) -> None:
        path = self._records / f"{record.name}.json"
        scratch = self._records / f".{record.name}.json.{uuid.uuid4().hex[:8]}"
        scratch.write_text(json.dumps(asdict(record), sort_keys=True), encoding="utf-8")
        os.replace(scratch, path)


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
        staged.rename(target)
        aside.rename(staged)


def _rename_new(staged: Path, target: Path) -> None:
    try:
        _rename2(staged, target, _RENAME_NOREPLACE)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
        staged.rename(target)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
