"""The migrations build exactly the schema the code declares (`store/tables.py`), on both
databases: Alembic's own comparison of a migrated database with the models finds nothing.
The head and the recorded revision the store reads without Alembic are Alembic's own."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from controller.store import current_revision, head_revision, make_engine, upgrade
from controller.store.database import MIGRATIONS
from controller.store.tables import Base


def test_the_migrated_schema_is_the_declared_one(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        upgrade(engine)
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            differences = compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()
    assert differences == [], differences


def test_every_migration_file_is_named_after_its_revision_and_the_head_is_alembics() -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    scripts = ScriptDirectory.from_config(config)
    revisions = list(scripts.walk_revisions())
    assert revisions, "no migrations"
    for script in revisions:
        assert script.path is not None
        assert Path(script.path).name.startswith(f"{script.revision}_"), script.path
    assert head_revision() == scripts.get_current_head()


def test_the_recorded_revision_is_read_as_alembic_reads_it(db_url: str) -> None:
    engine = make_engine(db_url)
    try:
        assert current_revision(engine) is None  # before the first migration
        upgrade(engine)
        with engine.connect() as connection:
            alembic_says = MigrationContext.configure(connection).get_current_revision()
        assert current_revision(engine) == alembic_says == head_revision()
    finally:
        engine.dispose()
