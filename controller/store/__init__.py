"""The store: the only package that speaks SQL. Use-cases open a `transaction(sessions)` and
call the functions of `queries` inside it."""

from controller.store.database import (
    DatabaseError,
    Sessions,
    count_statements,
    database_url,
    ensure_schema,
    make_engine,
    make_sessions,
    transaction,
    upgrade,
)

__all__ = [
    "DatabaseError",
    "Sessions",
    "count_statements",
    "database_url",
    "ensure_schema",
    "make_engine",
    "make_sessions",
    "transaction",
    "upgrade",
]
