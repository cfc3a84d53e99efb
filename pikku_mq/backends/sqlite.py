"""The embedded default: discovery in one SQLite file shared by the processes of one host."""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import event, exc
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool

from .sqlalchemy import SqlAlchemyDeploymentService

__all__ = ["SqliteDeploymentService"]

logger = logging.getLogger(__name__)

_BUSY_TIMEOUT_MS = 15_000
"""How long a writer waits for another process's write lock before failing."""

_MAX_CONNECTIONS = 16
"""Connections one service opens to the file at once; operations beyond that wait for one to return."""

_POOL_TIMEOUT = 5.0
"""Seconds an operation waits for one of those connections before it fails."""

_POOL_OPTIONS = {"pool_size": 1, "max_overflow": _MAX_CONNECTIONS - 1, "pool_timeout": _POOL_TIMEOUT}
"""One connection stays in the pool, and the others close when their operation ends."""

_CLOSE_WAIT = 5.0
"""Seconds close() waits for the operations still running before it closes the connections."""


class SqliteDeploymentService(SqlAlchemyDeploymentService):
    """Discovery in an SQLite file, safe for several processes on one host.

    The file runs in WAL mode and lookups start their transactions with a plain ``BEGIN``, so they do
    not wait for a writer. Every write transaction starts with ``BEGIN IMMEDIATE``, so two processes
    never both hold a read snapshot and then fail to upgrade it to a write lock. A network file system
    breaks SQLite's locking: keep the file local.

    Each service keeps one connection open between operations, outside any transaction. SQLite lets
    the last connection to close take the file's exclusive lock, to checkpoint the WAL and delete it.
    While every process keeps a connection open, no process's close is the last one. Otherwise a
    process stopped while it held that lock (SIGSTOP, a paused VM) would hold up every lookup on the
    host until it resumed. A connection is checked against the file's identity before each operation,
    so a deleted database file is noticed and made again.

    NOTE: to reset the registry while services run, delete the file together with its ``-wal`` and
    ``-shm`` files. A new file next to the old ``-shm`` fails with "disk I/O error" in every process
    until each service that still holds the old file has run an operation (a heartbeat or a lookup).
    Do not restore a copy by renaming it over the file while services run: they keep reading the old
    WAL, and its pages can overwrite the copy. Restore with SQLite's backup API (the ``.restore``
    command of the ``sqlite3`` shell) or with every service stopped.

    NOTE: when each operation opened its own connection, one process sustained about 70 heartbeats
    per second on a 2-core VM (``benchmarks/registry.py``), which suits meshes of tens of instances at
    a 1 s interval or a few hundred at the default 10 s; use PostgreSQL or Redis beyond that.
    """

    def __init__(self, path: str | os.PathLike[str], **options: Any) -> None:
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._closed = False
        memory = str(path) == ":memory:"
        engine = create_async_engine(
            f"sqlite+aiosqlite:///{self.path}",
            poolclass=NullPool if memory else AsyncAdaptedQueuePool,
            connect_args={"timeout": _BUSY_TIMEOUT_MS / 1000},
            **({} if memory else _POOL_OPTIONS),
        )
        event.listen(engine.sync_engine, "connect", self._on_connect)
        event.listen(engine.sync_engine, "begin", _begin_immediate)
        if not memory:
            event.listen(engine.sync_engine, "checkout", self._on_checkout)
            event.listen(engine.sync_engine, "checkin", self._on_checkin)
        self._closing: asyncio.Task[None] | None = None
        super().__init__(engine, **options)
        self._owns_engine = True

    def _on_connect(self, dbapi_connection: Any, record: Any) -> None:
        if self._closed:
            # A pooled connection opened now would stay open, since close() already disposed of the pool.
            raise sqlite3.ProgrammingError(
                f"the deployment service on {self.path} is closed; create a new one to use it"
            )
        _configure_connection(dbapi_connection, record)
        record.info["pikku_file"] = _file_identity(self.path)

    def _on_checkout(self, _dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        # SQLAlchemy's pool discards a connection whose checkout raises DisconnectionError and opens a new
        # one, which _on_connect refuses once the service is closed.
        if self._closed:
            raise exc.DisconnectionError(f"the deployment service on {self.path} is closed")
        if record.info.get("pikku_file") != _file_identity(self.path):
            raise exc.DisconnectionError(f"{self.path} was deleted or replaced since this connection opened it")

    def _on_checkin(self, _dbapi_connection: Any, record: Any) -> None:
        # A connection that an operation returns after close() gave up waiting for it would stay open
        # in the disposed pool.
        if self._closed and record.dbapi_connection is not None:
            record.invalidate()

    async def close(self) -> None:
        # A second close() while the first runs waits for it, so it cannot refuse the first one's
        # deregistration.
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(super().close())
        await asyncio.shield(self._closing)

    async def _close_store(self) -> None:
        self._closed = True
        # Disposing of the pool closes the connections in it, not those that operations still use, so
        # close() waits for those first. One that comes back later is closed by _on_checkin().
        pool = self.engine.pool
        deadline = time.monotonic() + _CLOSE_WAIT
        # The pool has no event for the return of its last connection, so close() polls it.
        while isinstance(pool, AsyncAdaptedQueuePool) and pool.checkedout() and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        await super()._close_store()

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


def _file_identity(path: Path) -> tuple[int, int] | None:
    """Return the device and inode of the file at ``path``, or None if there is none."""
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_dev, status.st_ino


def _begin_immediate(connection: Any) -> None:
    # Lookups only read, so they take no write lock and never wait for a heartbeat in another process.
    if connection.get_execution_options().get("pikku_read_only"):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")
