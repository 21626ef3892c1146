"""Plugin trees on disk: the canonical digest (`pluginctl digest DIR`), and the checks every
tree passes before it may be installed (file count, size, symlinks that stay inside)."""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

#: The marker file the platform's runtimes look for; written last, never part of a digest.
COMPLETE_MARKER = ".complete"
DIGEST_PREFIX = "sha256:"
_CHUNK = 1 << 20


class TreeError(ValueError):
    """A tree that may not be installed; the message names the path and the limit."""


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps on one plugin tree (`--max-plugin-bytes`, `--max-plugin-files`)."""

    max_bytes: int = 100 * 1024 * 1024
    max_files: int = 10_000


def _entries(root: Path) -> list[tuple[bytes, os.stat_result]]:
    """Every entry under `root` (not following symlinks) as (relative POSIX path in bytes,
    lstat), sorted by path bytes; the root's `.complete` marker left out."""
    found: list[tuple[bytes, os.stat_result]] = []
    base = os.fsencode(root)
    stack = [b""]
    while stack:
        relative = stack.pop()
        with os.scandir(os.path.join(base, relative) if relative else base) as listing:
            for entry in listing:
                path = relative + b"/" + entry.name if relative else entry.name
                if path == COMPLETE_MARKER.encode():
                    continue
                info = entry.stat(follow_symlinks=False)
                found.append((path, info))
                if stat.S_ISDIR(info.st_mode):
                    stack.append(path)
    found.sort(key=lambda item: item[0])
    return found


def signature(root: Path) -> tuple[tuple[bytes, int, int, int, int, int], ...]:
    """What changes whenever the tree's digest may have changed (path, mode, size, mtime,
    ctime, inode of every entry), at the cost of an lstat per entry and no reading."""
    return tuple((path, info.st_mode, info.st_size, info.st_mtime_ns, info.st_ctime_ns,
                  info.st_ino) for path, info in _entries(root))


def digest(root: Path) -> str:
    """`sha256:<hex>` of the tree at `root`, reproducible anywhere:

    every entry except the root's `.complete`, sorted by its relative path as bytes (`/`
    separated), contributes one record to a SHA-256 stream:
    `dir <path>\\0\\n`, `file <mode> <path>\\0<sha256 of the content, hex>\\n` with mode `755`
    if any execute bit is set else `644` (as git keeps it), `link <path>\\0<target>\\0\\n`
    (paths and targets may hold newlines, never NUL: every field ends unambiguously).
    Owners, times and other mode bits do not count; other file types are refused."""
    total = hashlib.sha256()
    for path, info in _entries(root):
        if stat.S_ISDIR(info.st_mode):
            total.update(b"dir " + path + b"\0\n")
        elif stat.S_ISLNK(info.st_mode):
            target = os.readlink(os.path.join(os.fsencode(root), path))
            total.update(b"link " + path + b"\0" + target + b"\0\n")
        elif stat.S_ISREG(info.st_mode):
            mode = b"755" if info.st_mode & 0o111 else b"644"
            content = hashlib.sha256()
            with open(os.path.join(os.fsencode(root), path), "rb") as stream:
                while chunk := stream.read(_CHUNK):
                    content.update(chunk)
            total.update(b"file " + mode + b" " + path + b"\0"
                         + content.hexdigest().encode() + b"\n")
        else:
            raise TreeError(f"{_show(path)}: not a file, directory or symlink")
    return DIGEST_PREFIX + total.hexdigest()


def check(root: Path, limits: Limits) -> None:
    """Refuse a tree with too many files, too many bytes, special files, a symlink that
    resolves outside the tree (absolute, climbing above the root, or through other links),
    or a top-level `.complete` of its own (the digest would not see it)."""
    if os.path.lexists(root / COMPLETE_MARKER):
        raise TreeError(f"the plugin has its own {COMPLETE_MARKER} at the top; that name is "
                        "the marker's")
    size = 0
    links: dict[bytes, bytes] = {}
    for files, (path, info) in enumerate(_entries(root), start=1):
        if files > limits.max_files:
            raise TreeError(f"more than {limits.max_files} files (--max-plugin-files)")
        if stat.S_ISLNK(info.st_mode):
            links[path] = os.readlink(os.path.join(os.fsencode(root), path))
        elif stat.S_ISREG(info.st_mode):
            size += info.st_size
            if size > limits.max_bytes:
                raise TreeError(f"larger than {limits.max_bytes} bytes (--max-plugin-bytes)")
        elif not stat.S_ISDIR(info.st_mode):
            raise TreeError(f"{_show(path)}: not a file, directory or symlink")
    for path, target in links.items():
        if not _stays_inside(links, path, target):
            raise TreeError(f"symlink {_show(path)} -> {_show(target)} points outside "
                            "the plugin")


_MAX_HOPS = 40  # as the kernel's ELOOP limit


def _stays_inside(links: dict[bytes, bytes], link: bytes, target: bytes) -> bool:
    """Resolve `target` as the kernel would from the directory holding `link`, following the
    tree's other symlinks, on the strings alone (nothing is read); False if any step leaves
    the root, a target is absolute, or the chain is too long."""
    hops = 0

    def resolve(start: list[bytes], path: bytes) -> list[bytes] | None:
        nonlocal hops
        if path.startswith(b"/") or not path:
            return None
        current = list(start)
        for part in path.split(b"/"):
            if part == b"..":
                if not current:
                    return None
                current.pop()
            elif part not in (b"", b"."):
                followed = links.get(b"/".join([*current, part]))
                if followed is None:
                    current.append(part)
                    continue
                hops += 1
                resolved = None if hops > _MAX_HOPS else resolve(current, followed)
                if resolved is None:
                    return None
                current = resolved
        return current

    return resolve(link.split(b"/")[:-1], target) is not None


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename: a reader (or a kill) never sees half."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, encoding="utf-8",
                                     prefix=f".{path.name}.") as stream:
        stream.write(text)
    os.replace(stream.name, path)


def _show(path: bytes) -> str:
    return os.fsdecode(path)


def is_digest(value: str) -> bool:
    hexpart = value.removeprefix(DIGEST_PREFIX)
    return (value.startswith(DIGEST_PREFIX) and len(hexpart) == 64
            and all(c in "0123456789abcdef" for c in hexpart))
