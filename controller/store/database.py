"""Connections and schema: the engine for a database URL, the session factory, and
`pluginctl db upgrade` (Alembic, under an advisory lock on PostgreSQL and a file lock beside
an embedded SQLite file)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import URL, Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from controller.domain.models import Unavailable

if TYPE_CHECKING:
    from alembic.config import Config

DEFAULT_URL = "sqlite:///pluginctl.db"
MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"  # Alembic's default
# Any constant will do: it only has to be the same for every replica of pluginctl.
_ADVISORY_LOCK_ID = 0x706C7567  # "plug"

log = logging.getLogger("pluginctl.store")


class DatabaseError(Unavailable):
    """The database cannot be used; the message is meant for the operator."""


def database_url(explicit: str | None) -> str:
    return explicit or os.environ.get("PLUGINCTL_DB") or DEFAULT_URL


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def make_engine(url: str, **kwargs: Any) -> Engine:
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30}, **kwargs)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = create_engine(url, pool_pre_ping=True, **kwargs)
    except (ArgumentError, ImportError) as error:
        raise DatabaseError(f"bad database URL {_safe(url)}: {error}") from error
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")  # the registry and the CLI write side by side
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def _alembic_config(connection: Connection) -> Config:
    from alembic.config import Config  # Alembic loads only to migrate (or to test migrations)

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest schema: the highest revision among the migration files, which are named
    after their revisions (`0009_rollout_workspaces.py` is "0009"; a test holds the files and
    Alembic's own idea of the head to that). Read without loading Alembic, which every command
    would otherwise pay for at start."""
    revisions = sorted(path.name.partition("_")[0]
                       for path in (MIGRATIONS / "versions").glob("[0-9]*_*.py"))
    if not revisions:
        raise DatabaseError("no migrations found in the package")
    return revisions[-1]


def _revision(connection: Connection) -> str | None:
    """The schema revision Alembic recorded in the database; None before the first migration."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return None
    return connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar_one_or_none()


@contextmanager
def _migration_lock(connection: Connection) -> Iterator[None]:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _ADVISORY_LOCK_ID})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _ADVISORY_LOCK_ID})
    else:
        yield


def current_revision(engine: Engine) -> str | None:
    try:
        with engine.connect() as connection:
            return _revision(connection)
    except SQLAlchemyError as error:
        raise DatabaseError(f"cannot reach the database {_safe(str(engine.url))}: "
                            f"{_first_line(error)}") from error


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Migrate to the newest schema; returns (revision before, revision after). Processes
    running this at once take turns: on an advisory lock with PostgreSQL, on a lock file
    beside the database file with SQLite. Whoever comes second finds the schema at head
    (the revision is read under the lock) and has nothing to do."""
    try:
        with _embedded_lock(engine), engine.connect() as connection:
            with _migration_lock(connection):
                from alembic import command

                before = _revision(connection)
                command.upgrade(_alembic_config(connection), "head")
                connection.commit()
            return before, head_revision()
    except SQLAlchemyError as error:
        raise DatabaseError(f"cannot migrate {_safe(str(engine.url))}: "
                            f"{_first_line(error)}") from error


def sqlite_lock_path(url: URL) -> Path | None:
    """The lock file beside an SQLite database file (`<file>.lock`); None for an in-memory
    database, which no other process can see."""
    database = url.database or ""
    if url.query.get("mode") == "memory" or database in ("", ":memory:"):
        return None
    if database.startswith("file:"):  # a URI filename (uri=true)
        database = database.removeprefix("file:")
    return Path(database + ".lock")


@contextmanager
def _embedded_lock(engine: Engine) -> Iterator[None]:
    """Hold an exclusive lock on the SQLite file's lock file (nothing for other databases):
    SQLite has no advisory lock of its own, and Alembic's DDL on it is not one transaction.
    The lock file stays: removing it would let a process that opened it before the removal
    lock a file nobody else sees."""
    path = sqlite_lock_path(engine.url) if engine.dialect.name == "sqlite" else None
    if path is None:
        yield
        return
    try:
        handle = path.open("a")
    except OSError as error:
        raise DatabaseError(f"cannot open the migration lock {path}: "
                            f"{error.strerror or error}") from error
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process migrating %s", _safe(str(engine.url)))
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_schema(engine: Engine, *, migrate_embedded: bool = True) -> None:
    """Make sure the schema is current before use. The embedded SQLite database is migrated on
    the spot (under its file lock: the first commands on a fresh file often start together);
    a shared PostgreSQL database must be migrated on purpose (`pluginctl db upgrade`)
    so that replicas of different versions never race a migration."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if engine.dialect.name == "sqlite" and migrate_embedded:
        upgrade(engine)
        return
    raise DatabaseError(
        f"database schema is at {current or 'nothing'}, this pluginctl needs {head}: "
        f"run `pluginctl db upgrade --db URL` first"
    )


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


Sessions = sessionmaker[Session]


@contextmanager
def transaction(sessions: Sessions) -> Iterator[Session]:
    """One unit of work: commits on success, rolls back on error, and turns driver errors into
    DatabaseError so that callers need not know SQLAlchemy."""
    lock = _writer_lock(sessions)
    try:
        with lock, sessions.begin() as session:
            yield session
    except SQLAlchemyError as error:
        raise DatabaseError(f"database error: {_first_line(error)}") from error


_SQLITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()


def _writer_lock(sessions: Sessions) -> contextlib.AbstractContextManager[Any]:
    """SQLite has one writer at a time, and a writer that finds the file locked sleeps in
    steps of up to 100 ms: within one process, transactions take turns on a lock instead
    (they are short). Other databases need no such thing."""
    engine: Engine = sessions.kw["bind"]
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    lock = _SQLITE_LOCKS.get(engine)
    if lock is None:
        lock = _SQLITE_LOCKS.setdefault(engine, threading.Lock())
    return lock


T = TypeVar("T")


#: SQLSTATEs after which PostgreSQL asks the client to run the transaction again: a
#: deadlock (two transactions took row locks in different orders, as a heartbeat flush and
#: a pass's claim of the same workspaces may; the server aborts one of them) and a
#: serialization failure.
RETRY_STATES = frozenset({"40P01", "40001"})
#: Times a unit of work is tried before such an error reaches the caller.
ATTEMPTS = 3


def _retryable(error: BaseException | None) -> bool:
    return getattr(getattr(error, "orig", None), "sqlstate", None) in RETRY_STATES


def run_transaction(sessions: Sessions, work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction. One the database aborted to break a deadlock (or for a
    serialization failure) is rolled back and run again, up to ATTEMPTS times in all: `work`
    must do nothing but speak to the session (so that a second run is the same as a
    first). SQLite never raises these (it has one writer at a time)."""
    attempt = 1
    while True:
        try:
            with transaction(sessions) as session:
                return work(session)
        except DatabaseError as error:
            if attempt == ATTEMPTS or not _retryable(error.__cause__):
                raise
            attempt += 1
            log.info("%s; trying the transaction again (%d of %d)", error, attempt, ATTEMPTS)


async def in_thread(sessions: Sessions, work: Callable[[Session], T]) -> T:
    """Run `work` in one transaction (`run_transaction`: tried again after a deadlock) on a
    worker thread, so that a long read or write never stalls the event loop (the registry
    shares it with the loop)."""
    return await asyncio.to_thread(run_transaction, sessions, work)


class PinnedReader:
    """One connection held open for a hot read path (autocommit: each statement sees the
    latest commits), so that a read costs one round trip instead of a pool checkout, a
    liveness ping, BEGIN and COMMIT. Reopened on the next use after an error."""

    def __init__(self, sessions: Sessions) -> None:
        self._engine: Engine = sessions.kw["bind"]
        self._connection: Connection | None = None

    def run(self, work: Callable[[Connection], T]) -> T:
        try:
            if self._connection is None:
                self._connection = self._engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT")
            return work(self._connection)
        except SQLAlchemyError as error:
            self.close()
            raise DatabaseError(f"database error: {_first_line(error)}") from error

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._connection.close()
            self._connection = None


@contextmanager
def count_statements(sessions: Sessions) -> Iterator[list[str]]:
    """Collect every SQL statement sent through these sessions' engine while inside."""
    engine = sessions.kw["bind"]
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_rest: Any) -> None:
        statements.append(statement)

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


def create_database(server_url: str, name: str) -> str:
    """Create database `name` on a PostgreSQL server and return its URL (benchmarks)."""
    from sqlalchemy.engine import make_url

    if not name.replace("_", "").isalnum():
        raise DatabaseError(f"refusing an odd database name {name!r}")
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except SQLAlchemyError as error:
        raise DatabaseError(f"cannot create database {name}: {_first_line(error)}") from error
    finally:
        admin.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)
