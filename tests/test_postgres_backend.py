"""PgDeploymentService against the real PostgreSQL server: what the contract suite cannot show.

Each test uses a schema of its own and drops it at the end. An unreachable server fails the tests.
"""

import asyncio
import logging
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from _support_core import wait_until
from _support_sql import drop_postgres_schema, postgres_execute, postgres_fetch, postgres_url, unique_name

import pikku_mq
from pikku_mq import (
    ConfigurationError,
    DeploymentConfig,
    DeploymentInfo,
    DiscoveryError,
    PgDeploymentService,
    SqlAlchemyDeploymentService,
    deployment_service_from_url,
)
from pikku_mq._presence import ChangeEvent, encode_change
from pikku_mq.backends import postgres as postgres_backend

# Child processes import the same pikku_mq as this process, wherever the installed one points.
CHILD_ENV = {**os.environ, "PYTHONPATH": str(Path(pikku_mq.__file__).parent.parent)}

# The DDL of @pikku/pg's deployment service, without pikku_mq's columns.
PIKKU_DDL = """
CREATE SCHEMA {schema};
CREATE TABLE {schema}.pikku_deployments (
    deployment_id TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL,
    functions TEXT[] NOT NULL,
    last_heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX idx_pikku_deployments_functions ON {schema}.pikku_deployments USING GIN (functions);
CREATE INDEX idx_pikku_deployments_heartbeat ON {schema}.pikku_deployments (last_heartbeat);
"""


@pytest.fixture
def schema() -> Iterator[str]:
    """A schema name of this test's own, dropped at the end whether or not anything created it."""
    name = unique_name()
    yield name
    drop_postgres_schema(name)


@pytest.fixture
async def make_service(schema: str) -> AsyncIterator[Callable[..., PgDeploymentService]]:
    """Build services on the test's schema; all are closed at the end."""
    services: list[PgDeploymentService] = []

    def make(**options: float) -> PgDeploymentService:
        service = PgDeploymentService(postgres_url(), schema=schema, **options)
        services.append(service)
        return service

    yield make
    for service in services:
        await service.close()


def _config(deployment_id: str, *functions: str) -> DeploymentConfig:
    return DeploymentConfig(deployment_id, f"http://127.0.0.1:1/{deployment_id}", functions=list(functions))


async def _ids(service: PgDeploymentService, name: str) -> list[str]:
    return sorted(info.deployment_id for info in await service.find_function(name))


# -- schema ---------------------------------------------------------------------------------------------

# tests/test_concurrent_init.py runs init() from ten processes at once, on this backend and the others.


async def test_init_creates_pikku_layout(schema: str, make_service: Callable[..., PgDeploymentService]) -> None:
    await make_service().init()

    columns = postgres_fetch(
        """
        SELECT column_name, data_type, is_nullable FROM information_schema.columns
        WHERE table_schema = $1 AND table_name = 'pikku_deployments' ORDER BY ordinal_position
        """,
        schema,
    )
    assert [tuple(row) for row in columns] == [
        ("deployment_id", "text", "NO"),
        ("endpoint", "text", "NO"),
        ("functions", "ARRAY", "NO"),
        ("last_heartbeat", "timestamp with time zone", "NO"),
        ("created_at", "timestamp with time zone", "NO"),
        ("fallback_endpoints", "ARRAY", "YES"),
        ("heartbeat_ttl", "double precision", "YES"),
        ("in_flight", "integer", "YES"),
        ("hostname", "text", "YES"),
        ("idempotent_functions", "ARRAY", "YES"),
    ]
    [gin] = postgres_fetch(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND indexname = 'idx_pikku_deployments_functions'",
        schema,
    )
    assert "USING gin (functions)" in gin[0]


async def test_find_uses_gin_index(schema: str, make_service: Callable[..., PgDeploymentService]) -> None:
    service = make_service()
    await service.init()

    conn = await asyncpg.connect(postgres_url())
    try:
        # On an empty table the planner prefers a sequential scan; forbid it to see which index the query can use.
        await conn.execute("SET enable_seqscan = off")
        plan = await conn.fetch("EXPLAIN " + service._sql.find, "greet", 30.0)
    finally:
        await conn.close()

    assert "idx_pikku_deployments_functions" in "\n".join(row[0] for row in plan)


def test_invalid_schema_rejected() -> None:
    for name in ["Pikku", "pikku-mq", "1pikku", "pikku; DROP TABLE x", "", "p" * 64]:
        with pytest.raises(ConfigurationError, match="invalid PostgreSQL schema name"):
            PgDeploymentService(postgres_url(), schema=name)


# -- liveness by the database's clock -----------------------------------------------------------------


async def test_app_clock_ignored(
    schema: str, make_service: Callable[..., PgDeploymentService], monkeypatch: pytest.MonkeyPatch
) -> None:
    service = make_service()
    await service.start(_config("alpha", "greet"))
    table = f"{schema}.pikku_deployments"

    # This process believes it is ten minutes later; the database's clock decides.
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 600)
    postgres_execute(f"UPDATE {table} SET last_heartbeat = now() WHERE deployment_id = 'alpha'")

    assert await _ids(service, "greet") == ["alpha"]
    [record] = await service.list_deployments()
    assert record.state == "live"
    assert record.heartbeat_age < 5

    postgres_execute(f"UPDATE {table} SET last_heartbeat = now() - interval '1 hour' WHERE deployment_id = 'alpha'")

    assert await service.find_function("greet") == []
    [record] = await service.list_deployments()
    assert record.state == "stale"
    assert 3590 < record.heartbeat_age < 3700


async def test_pikku_row_uses_reader_ttl(schema: str, make_service: Callable[..., PgDeploymentService]) -> None:
    for statement in PIKKU_DDL.format(schema=schema).split(";"):
        if statement.strip():
            postgres_execute(statement)
    # A row as a Pikku instance writes it: no heartbeat_ttl, no fallbacks, last heartbeat 45 s ago.
    postgres_execute(
        f"""
        INSERT INTO {schema}.pikku_deployments (deployment_id, endpoint, functions, last_heartbeat)
        VALUES ('pikku-ts', 'http://127.0.0.1:3000', ARRAY['greet', 'sum'], now() - interval '45 seconds')
        """
    )
    short = make_service(heartbeat_interval=10.0, heartbeat_ttl=30.0)
    long = make_service(heartbeat_interval=10.0, heartbeat_ttl=60.0)

    # init() adds pikku_mq's nullable columns to the table Pikku created, and keeps its row.
    await short.init()

    assert await short.find_function("greet") == []
    assert await long.find_function("greet") == [DeploymentInfo("pikku-ts", "http://127.0.0.1:3000")]
    assert await _ids(long, "sum") == ["pikku-ts"]
    [record] = await long.list_deployments()
    assert record.functions == ("greet", "sum")
    assert record.fallback_endpoints == ()
    assert record.state == "live"
    [record] = await short.list_deployments()
    assert record.state == "stale"


async def test_older_table_gets_new_columns(schema: str, make_service: Callable[..., PgDeploymentService]) -> None:
    # The table as pikku_mq created it before it reported load and host names, with one of its rows.
    for statement in PIKKU_DDL.format(schema=schema).split(";"):
        if statement.strip():
            postgres_execute(statement)
    table = f"{schema}.pikku_deployments"
    postgres_execute(f"ALTER TABLE {table} ADD COLUMN fallback_endpoints TEXT[], ADD COLUMN heartbeat_ttl FLOAT8")
    postgres_execute(
        f"INSERT INTO {table} (deployment_id, endpoint, functions, heartbeat_ttl) "
        "VALUES ('old', 'http://127.0.0.1:1/old', ARRAY['greet'], 30)"
    )

    service = make_service(heartbeat_interval=10.0, heartbeat_ttl=30.0)
    service.in_flight_source = lambda: 3
    await service.start(DeploymentConfig("new", "http://127.0.0.1:1/new", functions=["greet"], hostname="node-a"))

    found = {info.deployment_id: info for info in await service.find_function("greet")}
    assert sorted(found) == ["new", "old"]
    assert (found["old"].in_flight, found["old"].hostname, found["old"].idempotent) == (None, None, False)
    assert (found["new"].in_flight, found["new"].hostname) == (3, "node-a")


async def test_pikku_reads_our_rows(schema: str, make_service: Callable[..., PgDeploymentService]) -> None:
    service = make_service()
    await service.start(_config("alpha", "greet", "sum"))

    # A lookup in Pikku's form (name = ANY(functions)) returns pikku_mq's row.
    rows = postgres_fetch(
        f"SELECT deployment_id, endpoint FROM {schema}.pikku_deployments WHERE $1 = ANY(functions)", "sum"
    )
    assert [tuple(row) for row in rows] == [("alpha", "http://127.0.0.1:1/alpha")]


async def test_lost_function_restored(schema: str, make_service: Callable[..., PgDeploymentService]) -> None:
    service = make_service(heartbeat_interval=0.2, heartbeat_ttl=0.6)
    await service.start(_config("alpha", "greet", "sum"))

    postgres_execute(f"UPDATE {schema}.pikku_deployments SET functions = array_remove(functions, 'sum')")
    assert await service.find_function("sum") == []

    deadline = time.monotonic() + 2.0
    while await _ids(service, "sum") != ["alpha"]:
        assert time.monotonic() < deadline, "the heartbeat did not restore the lost function"
        await asyncio.sleep(0.05)


# -- pools, URLs and passwords ------------------------------------------------------------------------


async def test_borrowed_pool_left_open(schema: str) -> None:
    pool = await asyncpg.create_pool(postgres_url(), min_size=1, max_size=2)
    try:
        service = PgDeploymentService(pool, schema=schema)
        await service.start(_config("alpha", "greet"))
        assert service.pool is pool

        await service.close()

        assert not pool._closed
        assert await pool.fetchval(f"SELECT count(*) FROM {schema}.pikku_deployments") == 0
    finally:
        await pool.close()


async def test_owned_pool_closed(make_service: Callable[..., PgDeploymentService]) -> None:
    service = make_service()
    await service.init()
    pool = service.pool
    assert pool is not None
    # The service replaces asyncpg's reset query, which costs a round trip per release, with nothing.
    assert pool._reset is not None

    await service.close()

    assert pool._closed
    assert service.pool is None


@pytest.mark.parametrize("scheme", ["postgresql", "postgres", "POSTGRESQL"])
def test_url_builds_pg_service(scheme: str) -> None:
    service = deployment_service_from_url(f"{scheme}://user@127.0.0.1:5432/test", schema="pikku_x")

    assert type(service) is PgDeploymentService
    assert service.schema == "pikku_x"


def test_url_with_driver_builds_sqlalchemy() -> None:
    service = deployment_service_from_url("postgresql+asyncpg://user@127.0.0.1:5432/test")

    assert type(service) is SqlAlchemyDeploymentService


def test_repr_hides_password() -> None:
    service = PgDeploymentService("postgresql://app:hunter2@127.0.0.1:5432/test?password=hunter3&sslmode=disable")

    assert "hunter2" not in repr(service)
    assert "hunter3" not in repr(service)
    assert "app:***@127.0.0.1:5432" in repr(service)
    assert "sslmode=disable" in repr(service)


async def test_unreachable_error_hides_password() -> None:
    # Port 1 on the loopback address refuses connections at once.
    service = PgDeploymentService("postgresql://app:hunter2@127.0.0.1:1/test", pool_options={"timeout": 5})
    try:
        with pytest.raises(DiscoveryError, match="creating the schema") as raised:
            await service.init()
    finally:
        await service.close()

    assert "hunter2" not in str(raised.value)
    assert "app:***@127.0.0.1:1" in str(raised.value)


def test_missing_asyncpg_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)

    with pytest.raises(ImportError, match=r"pip install 'pikku-mq\[postgres\]'"):
        PgDeploymentService("postgresql://127.0.0.1/test")


def test_module_imports_without_asyncpg(tmp_path: Path) -> None:
    # Importing pikku_mq must not need asyncpg: only building a PgDeploymentService does.
    script = tmp_path / "check.py"
    script.write_text(
        "import sys\nsys.modules['asyncpg'] = None\nimport pikku_mq\nprint(pikku_mq.PgDeploymentService)\n"
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=CHILD_ENV)

    assert result.returncode == 0, result.stderr


async def test_long_escaped_id_leaves_and_purges(schema: str, make_service: Callable[..., PgDeploymentService]) -> None:
    # 4,000 quotes encode to 8,000 bytes of JSON, over what pg_notify takes: the event becomes a resync.
    ident = '"' * 4000
    leaving = make_service(heartbeat_interval=0.2, heartbeat_ttl=1.0)
    await leaving.start(_config(ident, "f"))
    await leaving.stop()
    assert await _ids(leaving, "f") == []

    crashed = make_service(heartbeat_interval=0.2, heartbeat_ttl=1.0)
    await crashed.start(_config(ident, "f"))
    await crashed._stop_heartbeats()
    purger = make_service(heartbeat_interval=0.2, heartbeat_ttl=1.0)
    await purger.start(_config("purger", "g"))

    async def purged() -> bool:
        return [r.deployment_id for r in await purger.list_deployments()] == ["purger"]

    await wait_until(purged, timeout=5)


# -- closing --------------------------------------------------------------------------------------------

CLOSE_WAIT = 3.0
"""Seconds a test gives close() to return, less than the 5 s after which close() cancels the change feed again."""


def _server_connections(application_name: str) -> int:
    rows = postgres_fetch("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", application_name)
    return int(rows[0][0])


async def test_close_during_notification_burst(schema: str, caplog: pytest.LogCaptureFixture) -> None:
    # close() cancels the change feed while notifications are still queued for it. On Python 3.11 the
    # feed's asyncio.wait_for dropped a cancellation that arrived in the same loop iteration as its
    # result, so the feed kept running and close() waited for it forever.
    service = PgDeploymentService(
        postgres_url(),
        schema=schema,
        heartbeat_interval=0.2,
        heartbeat_ttl=1.0,
        # The application name lets the test count this service's connections on the server.
        pool_options={"server_settings": {"application_name": schema}},
    )
    closing: list[asyncio.Task[None]] = []

    def close_on_first_event(event: ChangeEvent | None) -> None:
        # The feed task calls this for the first event of the burst, while the others are still queued.
        if event is not None and not closing:
            closing.append(asyncio.ensure_future(service.close()))

    await service.init()
    service._add_watch_listener(close_on_first_event)
    service._ensure_change_feed()
    feed = service._feed_task
    assert feed is not None
    try:
        await wait_until(lambda: service.change_feed_live, timeout=10)
        assert _server_connections(schema) == 2  # the pool's connection and the feed's

        # PostgreSQL sends the notifications of one transaction together when it commits.
        payloads = [encode_change("join", f"burst-{i}") for i in range(20)]
        postgres_execute("SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", service._sql.channel, payloads)
        with caplog.at_level(logging.WARNING, logger="pikku_mq"):
            await wait_until(lambda: closing, timeout=5)
            done, _ = await asyncio.wait(closing, timeout=CLOSE_WAIT)

        assert done == set(closing), f"close() did not return within {CLOSE_WAIT} s; the feed task is {feed}"
        assert feed.cancelled()
        assert service._feed_task is None
        assert service.pool is None
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        await wait_until(lambda: _server_connections(schema) == 0, timeout=5)
    finally:
        # Where close() hangs, a second cancellation ends the feed, so that close() can finish.
        feed.cancel()
        await asyncio.wait([*closing, feed], timeout=CLOSE_WAIT)
        await service.close()


async def test_close_terminates_unreleased_connection(
    schema: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(postgres_backend, "_POOL_CLOSE_TIMEOUT", 0.5)
    service = PgDeploymentService(
        postgres_url(), schema=schema, pool_options={"server_settings": {"application_name": schema}}
    )
    await service.init()
    pool = service.pool
    assert pool is not None
    # A connection acquired and never released, as a caller's bug would leave it. Pool.close() waits for
    # its release.
    unreleased = await pool.acquire()
    assert await unreleased.fetchval("SELECT 1") == 1
    try:
        with caplog.at_level(logging.WARNING, logger="pikku_mq"):
            started = time.monotonic()
            async with asyncio.timeout(CLOSE_WAIT):
                await service.close()
            elapsed = time.monotonic() - started

        assert 0.5 <= elapsed < CLOSE_WAIT
        assert service.pool is None
        assert pool._closed
        [warning] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert "timed out after 0.5 s, so its connections were terminated" in warning
        # The server ends each backend, the unreleased connection's too, once the client closes its socket.
        await wait_until(lambda: _server_connections(schema) == 0, timeout=5)
    finally:
        pool.terminate()
