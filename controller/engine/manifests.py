"""Standalone desired state: a directory of YAML files (multi-document allowed), looked at on
every pass so that an edited file is picked up without a restart, and parsed again only when
a file changed (parsing a big fleet's manifests takes long enough to matter)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml

from controller.domain.desired import (
    Catalog,
    Desired,
    DesiredStateError,
    ObjectError,
    add_object,
    resolve,
)

SUFFIXES = (".yaml", ".yml")


class ManifestDirError(DesiredStateError):
    """The directory itself cannot be read (missing, not a directory)."""


def manifest_files(directory: Path) -> list[Path]:
    if not directory.exists():
        raise ManifestDirError(f"manifest directory {directory} does not exist")
    if not directory.is_dir():
        raise ManifestDirError(f"{directory} is not a directory")
    return sorted(
        path for path in directory.rglob("*")
        if path.suffix in SUFFIXES and path.is_file() and not path.name.startswith(".")
    )


#: libyaml's parser when PyYAML has it (about ten times faster), else the pure-Python one.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _documents(path: Path) -> Iterator[object]:
    with path.open(encoding="utf-8") as stream:
        for document in yaml.load_all(stream, Loader=_LOADER):
            if document is not None:
                yield document


def load(directory: Path) -> Desired:
    """Read every YAML file under `directory`. A file that cannot be parsed is reported and
    skipped as a whole; every other file is used."""
    catalog = Catalog()
    for path in manifest_files(directory):
        try:
            documents = list(_documents(path))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
            message = " ".join(str(error).split())
            catalog.errors.append(ObjectError(str(path), "", f"cannot read: {message}"))
            continue
        for document in documents:
            add_object(catalog, document, str(path))
    return resolve(catalog)


Signature = tuple[tuple[str, int, int, int], ...]


class Source:
    """The desired state of a manifest directory, for a loop that asks every pass: parsed
    again only when the set of files or one of them (path, inode, size, mtime) changed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._signature: Signature | None = None
        self._desired: Desired | None = None

    def _signature_now(self) -> Signature:
        stats = []
        for path in manifest_files(self.directory):
            try:
                stat = path.stat()
            except OSError:
                continue  # removed meanwhile: load() reports it if it matters
            stats.append((str(path), stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(stats)

    def __call__(self) -> Desired:
        signature = self._signature_now()
        if self._desired is None or signature != self._signature:
            self._desired = load(self.directory)
            self._signature = signature
        return self._desired
