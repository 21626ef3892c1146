"""Where the migration lock of an embedded SQLite database lives (store/database.py): beside
the file, whatever form its URL takes; nowhere for a database only one process can see."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from controller.store.database import sqlite_lock_path


@pytest.mark.parametrize(("url", "expected"), [
    ("sqlite:///pluginctl.db", Path("pluginctl.db.lock")),
    ("sqlite:////var/lib/pluginctl/store.db", Path("/var/lib/pluginctl/store.db.lock")),
    ("sqlite:///file:/srv/p.db?uri=true", Path("/srv/p.db.lock")),
    ("sqlite://", None),
    ("sqlite:///:memory:", None),
    ("sqlite:///file:shared?mode=memory&cache=shared&uri=true", None),
])
def test_the_lock_file_sits_beside_the_database_file(url: str, expected: Path | None) -> None:
    assert sqlite_lock_path(make_url(url)) == expected
