"""The migrations build exactly the schema the code declares (`store/tables.py`), on both
databases: Alembic's own comparison of a migrated database with the models finds nothing."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from controller.store import make_engine, upgrade
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
