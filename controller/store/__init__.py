"""The store: the only package that speaks SQL. Use-cases open a `transaction(sessions)` and
call the functions of `queries` inside it."""

from sqlalchemy.orm import Session

from controller.store.database import (
    DatabaseError,
    PinnedReader,
    Sessions,
    count_statements,
    current_revision,
    database_url,
    ensure_schema,
    head_revision,
    in_thread,
    make_engine,
    make_sessions,
    run_transaction,
    transaction,
    upgrade,
)

__all__ = [
    "DatabaseError",
    "PinnedReader",
    "Session",
    "Sessions",
    "count_statements",
    "current_revision",
    "database_url",
    "ensure_schema",
    "head_revision",
    "in_thread",
    "make_engine",
    "make_sessions",
    "run_transaction",
    "transaction",
    "upgrade",
]
