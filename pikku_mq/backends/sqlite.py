"""The embedded default: discovery in one SQLite file shared by the processes of one host."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from .sqlalchemy import SqlAlchemyDeploymentService

__all__ = ["SqliteDeploymentService"]

logger = logging.getLogger(__name__)

_BUSY_TIMEOUT_MS = 15_000
"""How long a writer waits for another process's write lock before failing."""


class SqliteDeploymentService(SqlAlchemyDeploymentService):
    """Discovery in an SQLite file, safe for several processes on one host.

    The file runs in WAL mode and lookups start their transactions with a plain ``BEGIN``, so they do
    not wait for a writer. Every write transaction starts with ``BEGIN IMMEDIATE``, so two processes
    never both hold a read snapshot and then fail to upgrade it to a write lock. A network file system
    breaks SQLite's locking: keep the file local.

    NOTE: a process stopped (SIGSTOP, a paused VM) while it closes the last open connection to the
    file holds up every lookup on the host until it resumes, for up to the 15 s busy timeout: SQLite
    lets that close take the file's exclusive lock to checkpoint the WAL and delete it. Another
    process that keeps a connection open, such as the ``sqlite3`` shell, prevents it.

    NOTE: each operation opens its own connection, so a deleted database file is noticed and made
    again, at the cost of a few statements per operation. On a 2-core VM one process sustained about
    70 heartbeats per second (``benchmarks/registry.py``), which suits meshes of tens of instances at
    a 1 s interval or a few hundred at the default 10 s; use PostgreSQL or Redis beyond that.
    """

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        # A connection per operation: lookups are cached by callers, and an idle pooled connection
        # would pin the WAL and keep it from being checkpointed.
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{self.path}",
            poolclass=NullPool,
            connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine.sync_engine, "connect", _configure_connection)
        event.listen(engine.sync_engine, "begin", _begin_immediate)
        super().__init__(engine, **options)
        self._owns_engine = True

    def _heartbeat_twin(self) -> SqliteDeploymentService | None:
        if str(self.path) == ":memory:":
            return None  # each connection to ":memory:" opens a database of its own
        return type(self)(self.path, **self._twin_options())

    def __repr__(self) -> str:
        return f"SqliteDeploymentService({str(self.path)!r})"


def _configure_connection(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN IMMEDIATE instead of the driver's deferred BEGIN.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
    except sqlite3.OperationalError as exc:
        # The switch needs the file's exclusive lock. To avoid a deadlock, SQLite raises "database is locked"
        # without waiting in some of the processes that try at once. Another one switches the file, and
        # since the mode is stored in the file, this connection uses WAL from its next transaction on.
        if "locked" not in str(exc):
            raise
        logger.debug("another connection is switching the SQLite file to WAL mode: %s", exc)
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def _begin_immediate(connection: Any) -> None:
    # Lookups only read, so they take no write lock and never wait for a heartbeat in another process.
    if connection.get_execution_options().get("pikku_read_only"):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
