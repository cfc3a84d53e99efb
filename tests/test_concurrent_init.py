"""``init()`` from ten processes at once on an empty store, and by a user who may not create tables.

Ten child processes each build a service and wait on stdin. The test releases them together, so they all
create the schema at the same moment, then each registers a deployment of its own. The test checks that
every registration is found, stops the children and checks that each exited 0 with nothing on stderr.
Each case works in a PostgreSQL schema, MariaDB database, SQLite file or Redis key prefix of its own and
removes it at the end, whether or not the test passed.

The SQLAlchemy backend is also run by a database user who may read and write the tables but not create
them: once the tables exist, its ``init()`` must issue no DDL.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import sqlite3
import sys
import textwrap
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _support_redis import REDIS_URL, delete_prefix
from _support_sql import (
    create_mariadb_database,
    drop_mariadb_database,
    drop_postgres_schema,
    mariadb_execute,
    mariadb_fetch,
    mariadb_url,
    postgres_execute,
    postgres_fetch,
    postgres_url,
    unique_name,
)
from sqlalchemy.engine import make_url

import pikku_mq
from pikku_mq import DeploymentConfig, DeploymentService, DiscoveryError
from pikku_mq.backends.sqlite import _configure_connection

PROCESSES = 10

LINE_TIMEOUT = 90.0
"""Seconds a child gets to print its next line. Ten children import pikku_mq at once, which is slow on a small host."""

EXIT_TIMEOUT = 30.0
"""Seconds a child gets to exit once it has printed its last line."""

# Child processes import the same pikku_mq as this process, wherever the installed one points.
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(pikku_mq.__file__).parent.parent)}

# argv: the service as JSON (class name, first argument, keyword options) and the deployment id.
_CHILD = textwrap.dedent(
    """
    import asyncio, json, sys
    import pikku_mq
    from pikku_mq import DeploymentConfig

    async def main():
        spec, deployment_id = json.loads(sys.argv[1]), sys.argv[2]
        service = getattr(pikku_mq, spec["class"])(spec["target"], **spec["options"])
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        try:
            await service.init()
            config = DeploymentConfig(deployment_id, "http://127.0.0.1:1/" + deployment_id,
                                      functions=["shared", deployment_id])
            await service.start(config)
            print("registered", flush=True)
            await asyncio.to_thread(sys.stdin.readline)
        finally:
            await service.close()
        print("closed", flush=True)

    asyncio.run(main())
    """
)


@dataclass(frozen=True)
class Store:
    """The class and arguments of a service on one test's store, and the layout that ``init()`` creates there.

    ``layout()``, where the store has tables, returns the names of the tables and indexes that exist,
    to compare with ``expected_layout``.
    """

    class_name: str
    target: str
    options: dict[str, str] = field(default_factory=dict)
    layout: Callable[[], list[str]] | None = None
    expected_layout: list[str] = field(default_factory=list)

    def spec(self) -> str:
        return json.dumps({"class": self.class_name, "target": self.target, "options": self.options})

    def make(self) -> DeploymentService:
        service: DeploymentService = getattr(pikku_mq, self.class_name)(self.target, **self.options)
        return service


def _postgres_indexes(schema: str) -> list[str]:
    rows = postgres_fetch("SELECT indexname FROM pg_indexes WHERE schemaname = $1 ORDER BY indexname", schema)
    return [row[0] for row in rows]


# The tables and named indexes that SqlAlchemyDeploymentService creates, in the layout of Pikku's Kysely service.
SQLALCHEMY_INDEXES = ["pikku_deployment_functions_name_idx", "pikku_deployments_last_heartbeat_idx"]
SQLALCHEMY_TABLES = ["pikku_deployment_functions", "pikku_deployments"]


@contextmanager
def _postgres(tmp_path: Path) -> Iterator[Store]:
    # PgDeploymentService creates the schema itself, so the database starts without it.
    schema = unique_name()
    try:
        yield Store(
            "PgDeploymentService",
            postgres_url(),
            {"schema": schema},
            layout=lambda: _postgres_indexes(schema),
            expected_layout=[
                "idx_pikku_deployments_functions",
                "idx_pikku_deployments_heartbeat",
                "pikku_deployments_pkey",
            ],
        )
    finally:
        drop_postgres_schema(schema)


@contextmanager
def _sqlalchemy_postgres(tmp_path: Path) -> Iterator[Store]:
    # SQLAlchemy creates tables in an existing schema, but not the schema itself.
    schema = unique_name()
    try:
        postgres_execute(f"CREATE SCHEMA {schema}")
        yield Store(
            "SqlAlchemyDeploymentService",
            postgres_url("asyncpg"),
            {"schema": schema},
            layout=lambda: _postgres_indexes(schema),
            expected_layout=sorted([*SQLALCHEMY_INDEXES, "pikku_deployment_functions_pkey", "pikku_deployments_pkey"]),
        )
    finally:
        drop_postgres_schema(schema)


def _mariadb_layout(database: str) -> list[str]:
    tables = mariadb_fetch(None, "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", database)
    indexes = mariadb_fetch(
        None,
        "SELECT DISTINCT index_name FROM information_schema.statistics WHERE table_schema = %s AND index_name <> %s",
        database,
        "PRIMARY",
    )
    return sorted(row[0] for row in [*tables, *indexes])


@contextmanager
def _sqlalchemy_mariadb(tmp_path: Path) -> Iterator[Store]:
    database = unique_name()
    try:
        create_mariadb_database(database)
        yield Store(
            "SqlAlchemyDeploymentService",
            mariadb_url(database),
            layout=lambda: _mariadb_layout(database),
            expected_layout=sorted([*SQLALCHEMY_TABLES, *SQLALCHEMY_INDEXES]),
        )
    finally:
        drop_mariadb_database(database)


def _sqlite_layout(path: Path) -> list[str]:
    with sqlite3.connect(path, timeout=15) as conn:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%' ORDER BY name").fetchall()
    return [row[0] for row in rows]


@contextmanager
def _sqlite(tmp_path: Path) -> Iterator[Store]:
    # The file does not exist yet, and pytest removes the folder afterwards.
    path = tmp_path / "registry.db"
    yield Store(
        "SqliteDeploymentService",
        str(path),
        layout=lambda: _sqlite_layout(path),
        expected_layout=sorted([*SQLALCHEMY_TABLES, *SQLALCHEMY_INDEXES]),
    )


@contextmanager
def _redis(tmp_path: Path) -> Iterator[Store]:
    # Redis has no schema. Its init() only checks the connection, and registering creates the keys.
    prefix = f"pikku_t_{uuid.uuid4().hex}:"
    try:
        yield Store("RedisDeploymentService", REDIS_URL, {"key_prefix": prefix})
    finally:
        delete_prefix(prefix)


STORES = [
    pytest.param(_postgres, id="postgres"),
    pytest.param(_sqlalchemy_postgres, id="sqlalchemy-postgres"),
    pytest.param(_sqlalchemy_mariadb, id="sqlalchemy-mariadb"),
    pytest.param(_sqlite, id="sqlite"),
    pytest.param(_redis, id="redis"),
]


async def _read_line(process: asyncio.subprocess.Process) -> str:
    """Return the child's next line of stdout, or "" once it has exited."""
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=LINE_TIMEOUT)
    return line.decode().strip()


async def _send_to_all(processes: list[asyncio.subprocess.Process], command: str) -> list[str]:
    """Write ``command`` to every child at once and return the line that each prints next."""
    for process in processes:
        assert process.stdin is not None
        process.stdin.write(f"{command}\n".encode())
    return await asyncio.gather(*(_read_line(process) for process in processes))


async def _stderr_of_failed(processes: list[asyncio.subprocess.Process], lines: list[str], expected: str) -> str:
    """Return the stderr of each child that printed something other than ``expected``."""
    reports = []
    for index, (process, line) in enumerate(zip(processes, lines, strict=True)):
        if line == expected:
            continue
        assert process.stderr is not None
        if line == "":
            # The child has exited, so its stderr is complete.
            stderr = await asyncio.wait_for(process.stderr.read(), timeout=EXIT_TIMEOUT)
        else:
            stderr = b"(still running)"
        reports.append(f"--- child {index} printed {line!r}:\n{stderr.decode(errors='replace')[-3000:]}")
    return "\n".join(reports)


async def _ids(service: DeploymentService, name: str) -> list[str]:
    return sorted(info.deployment_id for info in await service.find_function(name))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("open_store", STORES)
async def test_init_from_ten_processes(
    open_store: Callable[[Path], AbstractContextManager[Store]], tmp_path: Path
) -> None:
    ids = [f"init-{index}" for index in range(PROCESSES)]
    with open_store(tmp_path) as store:
        processes: list[asyncio.subprocess.Process] = []
        observer = store.make()
        try:
            for deployment_id in ids:
                process = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-c",
                    _CHILD,
                    store.spec(),
                    deployment_id,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=CHILD_ENV,
                )
                processes.append(process)
            ready = await asyncio.gather(*(_read_line(process) for process in processes))
            assert ready == ["ready"] * PROCESSES, await _stderr_of_failed(processes, ready, "ready")

            # Release them together on a store where the schema does not exist yet.
            registered = await _send_to_all(processes, "go")
            failures = await _stderr_of_failed(processes, registered, "registered")
            assert registered == ["registered"] * PROCESSES, failures

            # init() on the store that the children created succeeds too.
            await observer.init()
            assert await _ids(observer, "shared") == ids
            for deployment_id in ids:
                assert await _ids(observer, deployment_id) == [deployment_id]
            if store.layout is not None:
                assert store.layout() == store.expected_layout

            closed = await _send_to_all(processes, "stop")
            assert closed == ["closed"] * PROCESSES, await _stderr_of_failed(processes, closed, "closed")
            outputs = await asyncio.gather(
                *(asyncio.wait_for(process.communicate(), timeout=EXIT_TIMEOUT) for process in processes)
            )
            for process, (stdout, stderr) in zip(processes, outputs, strict=True):
                assert stderr.decode() == ""
                assert stdout.decode() == ""
                assert process.returncode == 0

            # Each child deregistered on close.
            assert await observer.list_deployments() == []
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            await observer.close()


# -- a role that may use the tables but not create them ---------------------------------------------------


@dataclass(frozen=True)
class RestrictedStore:
    """A store seen by its administrator and by a user without the CREATE privilege.

    ``grant()`` lets the user read and write the tables that exist at the time, and no more.
    """

    admin: Store
    user: Store
    grant: Callable[[], None]


@contextmanager
def _postgres_restricted(tmp_path: Path) -> Iterator[RestrictedStore]:
    role = unique_name()
    with _sqlalchemy_postgres(tmp_path) as admin:
        schema = admin.options["schema"]

        def grant() -> None:
            postgres_execute(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
            postgres_execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}")

        try:
            postgres_execute(f"CREATE ROLE {role} LOGIN")
            user_url = make_url(admin.target).set(username=role).render_as_string(hide_password=False)
            yield RestrictedStore(admin, Store(admin.class_name, user_url, admin.options), grant)
        finally:
            # The schema and the grants on it go first, or PostgreSQL rejects the DROP ROLE.
            drop_postgres_schema(schema)
            postgres_execute(f"DROP ROLE IF EXISTS {role}")


@contextmanager
def _mariadb_restricted(tmp_path: Path) -> Iterator[RestrictedStore]:
    user = unique_name()
    account = f"'{user}'@'127.0.0.1'"
    with _sqlalchemy_mariadb(tmp_path) as admin:
        database = make_url(admin.target).database

        def grant() -> None:
            mariadb_execute(None, f"GRANT SELECT, INSERT, UPDATE, DELETE ON {database}.* TO {account}")

        try:
            mariadb_execute(None, f"CREATE USER {account}")
            user_url = make_url(admin.target).set(username=user).render_as_string(hide_password=False)
            yield RestrictedStore(admin, Store(admin.class_name, user_url), grant)
        finally:
            mariadb_execute(None, f"DROP USER IF EXISTS {account}")


@pytest.mark.parametrize(
    "open_store",
    [
        pytest.param(_postgres_restricted, id="sqlalchemy-postgres"),
        pytest.param(_mariadb_restricted, id="sqlalchemy-mariadb"),
    ],
)
async def test_init_without_create_privilege(
    open_store: Callable[[Path], AbstractContextManager[RestrictedStore]], tmp_path: Path
) -> None:
    with open_store(tmp_path) as store:
        store.grant()

        # Without the tables, the user's init() must create them and is denied.
        denied = store.user.make()
        try:
            with pytest.raises(DiscoveryError, match="denied"):
                await denied.init()
        finally:
            await denied.close()

        admin = store.admin.make()
        try:
            await admin.init()
        finally:
            await admin.close()
        store.grant()

        # Once the tables exist, the user's init() issues no DDL, and the user can register and look up.
        async with store.user.make() as service:
            config = DeploymentConfig("limited", "http://127.0.0.1:1/limited", functions=["greet"])
            await service.start(config)
            assert [info.deployment_id for info in await service.find_function("greet")] == ["limited"]


# -- SQLite's switch to WAL mode --------------------------------------------------------------------------


def _configure_after_barrier(path: str, barrier: Any, results: Any) -> None:
    connection = sqlite3.connect(path, timeout=15, isolation_level=None)
    try:
        barrier.wait(timeout=LINE_TIMEOUT)
        try:
            _configure_connection(connection, None)
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("CREATE TABLE IF NOT EXISTS probe (x)")
            connection.execute("COMMIT")
            results.put(connection.execute("PRAGMA journal_mode").fetchone()[0])
        except sqlite3.Error as exc:
            results.put(f"{type(exc).__name__}: {exc}")
    finally:
        connection.close()


@pytest.mark.timeout(150)
def test_sqlite_wal_switch_concurrent(tmp_path: Path) -> None:
    """Ten processes that open a new file at one moment all get a working connection in WAL mode.

    Only one of them can take the exclusive lock that the switch needs, and SQLite raises
    "database is locked" in some of the others without waiting. Without the handling in the connection hook, a run on a
    2-core host failed within the first 30 of these 100 rounds each time it was tried.
    """
    context = multiprocessing.get_context("fork")
    for round_number in range(100):
        path = str(tmp_path / f"round-{round_number}.db")
        barrier = context.Barrier(PROCESSES)
        results = context.Queue()
        children = [
            context.Process(target=_configure_after_barrier, args=(path, barrier, results)) for _ in range(PROCESSES)
        ]
        for child in children:
            child.start()
        try:
            outcomes = [results.get(timeout=LINE_TIMEOUT) for _ in children]
        finally:
            for child in children:
                child.join(timeout=EXIT_TIMEOUT)
                if child.is_alive():
                    child.kill()
        assert outcomes == ["wal"] * PROCESSES, f"round {round_number}: {outcomes}"
