"""Standalone desired state: a directory of YAML files (multi-document allowed), re-read on
every pass so that an edited file is picked up without a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import yaml

from controller.desired import (
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


def _documents(path: Path) -> Iterator[object]:
    with path.open(encoding="utf-8") as stream:
        for document in yaml.safe_load_all(stream):
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
