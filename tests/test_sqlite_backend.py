"""SqliteDeploymentService: what the contract suite cannot show.

Each test works on an SQLite file in its own folder.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from _support_core import wait_until

from pikku_mq import DeploymentConfig, DiscoveryError, SqliteDeploymentService
from pikku_mq.backends import sqlite as sqlite_backend

CONFIG = DeploymentConfig(deployment_id="sqlite-a", endpoint="http://127.0.0.1:9/rpc", functions=["greet"])

# A connection that reads and closes, as another process's lookup does. When it is the last connection
# to the file, SQLite checkpoints the WAL and deletes it under the file's exclusive lock.
READ_AND_CLOSE = textwrap.dedent(
    """
    import sqlite3, sys
    connection = sqlite3.connect(sys.argv[1], isolation_level=None)
    connection.execute("SELECT count(*) FROM pikku_deployments").fetchall()
    connection.close()
    """
)

# A process that closes its connections while no other is open, over and over, as a worker's heartbeats
# do, until the parent kills it. The parent stops it at random moments.
CLOSE_LOOP = textwrap.dedent(
    """
    import sqlite3, sys, time
    end = time.monotonic() + 600
    while time.monotonic() < end:
        connection = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=15)
        connection.execute("BEGIN IMMEDIATE")
        connection.execute("UPDATE pikku_deployments SET in_flight = coalesce(in_flight, 0) + 1")
        connection.execute("COMMIT")
        connection.close()
    """
)


def wal_of(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def open_files(path: Path) -> list[str]:
    """Return the files of this process's open descriptors that are ``path`` or its WAL and shared memory."""
    found = []
    for descriptor in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{descriptor}")
            if target.startswith(str(path)):
                found.append(target)
    return found


async def read_and_close(path: Path) -> None:
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", READ_AND_CLOSE, str(path))
    async with asyncio.timeout(30):
        assert await child.wait() == 0


async def test_pooled_connection_keeps_wal(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    service = SqliteDeploymentService(path)
    await service.start(CONFIG)
    try:
        assert [info.deployment_id for info in await service.find_function("greet")] == ["sqlite-a"]
        await read_and_close(path)
        # The service's idle connection is still open, so the other process's close was not the last one.
        assert wal_of(path).exists()
    finally:
        await service.close()

    # With the service closed, the other process's connection is the last one and removes the WAL.
    await read_and_close(path)
    assert not wal_of(path).exists()


async def test_lookup_ignores_stopped_writer(tmp_path: Path) -> None:
    """Check that lookups do not wait for another process that is stopped between its writes and closes.

    With a connection per operation and none kept open, the other process was sometimes stopped while
    it held the exclusive lock of a last close, and a lookup then waited until it resumed.
    """
    path = tmp_path / "registry.db"
    service = SqliteDeploymentService(path)
    await service.start(CONFIG)
    writer = await asyncio.create_subprocess_exec(sys.executable, "-c", CLOSE_LOOP, str(path))
    timed_out = 0
    try:
        await asyncio.sleep(0.3)
        for _ in range(150):
            writer.send_signal(signal.SIGSTOP)
            try:
                # A lookup held up by the stopped writer waits until it resumes, so any bound catches it.
                async with asyncio.timeout(5.0):
                    found = await service.find_function("greet")
            except TimeoutError:
                timed_out += 1
            else:
                assert [info.deployment_id for info in found] == ["sqlite-a"]
            writer.send_signal(signal.SIGCONT)
            await asyncio.sleep(0.003)
    finally:
        with contextlib.suppress(ProcessLookupError):
            writer.send_signal(signal.SIGCONT)
            writer.kill()
        async with asyncio.timeout(10):
            await writer.wait()
        await service.close()
    assert timed_out == 0


async def test_replaced_file_gets_new_connection(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    service = SqliteDeploymentService(path, heartbeat_interval=0.2)
    await service.start(CONFIG)
    try:
        for suffix in ("", "-wal", "-shm"):
            path.with_name(path.name + suffix).unlink()

        # A heartbeat finds its row missing and registers again, in a new file.
        async def registered_again() -> bool:
            with contextlib.suppress(DiscoveryError):
                return [info.deployment_id for info in await service.find_function("greet")] == ["sqlite-a"]
            return False

        await wait_until(registered_again, timeout=10)

        await read_and_close(path)
        assert wal_of(path).exists()
        assert not [target for target in open_files(path) if target.endswith("(deleted)")]
    finally:
        await service.close()


async def test_connections_bounded_and_closed(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    service = SqliteDeploymentService(path)
    await service.start(CONFIG)
    try:
        await asyncio.gather(*(service.find_function("greet") for _ in range(100)))
        # Each connection has the database file open, and SQLite may keep the descriptors of closed ones.
        database_files = [target for target in open_files(path) if target == str(path)]
        assert 1 <= len(database_files) <= sqlite_backend._MAX_CONNECTIONS
    finally:
        await service.close()

    assert open_files(path) == []
    with pytest.raises(DiscoveryError, match="is closed"):
        await service.find_function("greet")
    assert open_files(path) == []


async def test_concurrent_close_deregisters(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    service = SqliteDeploymentService(path)
    await service.start(CONFIG)
    await asyncio.gather(service.close(), service.close())

    other = SqliteDeploymentService(path)
    try:
        assert await other.list_deployments() == []
    finally:
        await other.close()
