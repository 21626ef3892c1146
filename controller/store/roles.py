"""A role that one process at a time holds among the replicas sharing a database, for as
long as it lives: a session-level advisory lock on PostgreSQL (the server frees it when the
process or its connection goes), an flock on a file beside an SQLite database file (the
kernel frees it). The engine uses one so that a single replica reports the fleet-wide
gauges. Every call blocks: run it on a thread."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import threading
from typing import IO

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from controller.store.database import Sessions, sqlite_lock_path

log = logging.getLogger("pluginctl.store")


class ExclusiveRole:
    def __init__(self, sessions: Sessions, name: str) -> None:
        self.name = name
        self._engine: Engine = sessions.kw["bind"]
        digest = hashlib.sha256(f"pluginctl role {name}".encode()).digest()
        self._key = int.from_bytes(digest[:8], "big", signed=True)  # a bigint lock key
        self._connection: Connection | None = None
        self._file: IO[str] | None = None
        self._lock = threading.Lock()  # hold() and release() may race at a stop

    def hold(self) -> bool:
        """Take the role if nobody holds it, or make sure it is still ours: True if this
        process holds it afterwards, False if another does or the database cannot be
        reached (then it is tried again on the next call)."""
        with self._lock:
            dialect = self._engine.dialect.name
            if dialect == "postgresql":
                return self._hold_advisory()
            if dialect == "sqlite":
                return self._hold_file()
            return True  # no other database is supported; nothing to share it with

    def release(self) -> None:
        """Give the role up (nothing if not held), so that another replica can take it."""
        with self._lock:
            if self._connection is not None:
                try:
                    self._connection.execute(text("SELECT pg_advisory_unlock(:key)"),
                                             {"key": self._key})
                    self._connection.close()
                except SQLAlchemyError:
                    self._drop_connection()
                self._connection = None
            if self._file is not None:
                with contextlib.suppress(OSError):
                    fcntl.flock(self._file, fcntl.LOCK_UN)
                self._file.close()
                self._file = None

    def _hold_advisory(self) -> bool:
        if self._connection is not None:
            try:
                self._connection.execute(text("SELECT 1"))
                return True
            except SQLAlchemyError as error:
                # The connection, and the lock with it, is gone (a server restart): whoever
                # asked first since then holds it now; try again below.
                log.warning("lost the %s role's connection: %s", self.name, error)
                self._drop_connection()
        try:
            connection = self._engine.connect().execution_options(
                isolation_level="AUTOCOMMIT")
        except SQLAlchemyError as error:
            log.debug("cannot take the %s role: %s", self.name, error)
            return False
        try:
            got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"),
                                     {"key": self._key}).scalar()
        except SQLAlchemyError as error:
            log.debug("cannot take the %s role: %s", self.name, error)
            connection.invalidate()
            connection.close()
            return False
        if not got:
            connection.close()
            return False
        self._connection = connection
        return True

    def _drop_connection(self) -> None:
        """Discard the held connection rather than pool it: it may still hold the lock."""
        if self._connection is not None:
            with contextlib.suppress(SQLAlchemyError):
                self._connection.invalidate()
                self._connection.close()
            self._connection = None

    def _hold_file(self) -> bool:
        if self._file is not None:
            return True
        path = sqlite_lock_path(self._engine.url)
        if path is None:
            return True  # an in-memory database: no other process can share it
        path = path.with_name(f"{path.name.removesuffix('.lock')}.{self.name}.lock")
        try:
            handle = path.open("a")
        except OSError as error:
            log.warning("cannot take the %s role: %s", self.name, error.strerror or error)
            return False
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # BlockingIOError: another process holds it
            handle.close()
            return False
        self._file = handle
        return True
