"""Registration in the SQL stores: concurrent starts on one id, collation, time zones and column limits.

Each case works in a MariaDB database, PostgreSQL schema or SQLite file of its own and removes it at
the end, whether or not the test passed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import sqlalchemy as sa
from _support_sql import (
    create_mariadb_database,
    drop_mariadb_database,
    drop_postgres_schema,
    mariadb_execute,
    mariadb_fetch,
    mariadb_url,
    postgres_execute,
    postgres_url,
    unique_name,
)
from sqlalchemy.ext.asyncio import create_async_engine

from pikku_mq import (
    ConfigurationError,
    DeploymentConfig,
    DeploymentConflictError,
    DeploymentService,
    DiscoveryError,
    SqlAlchemyDeploymentService,
    SqliteDeploymentService,
)

INTERVAL = 0.2
TTL = 1.0

ServiceFactory = Callable[[], DeploymentService]


@contextmanager
def _mariadb(tmp_path: Path) -> Iterator[ServiceFactory]:
    database = unique_name()
    create_mariadb_database(database)
    try:
        yield lambda: SqlAlchemyDeploymentService(mariadb_url(database), heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    finally:
        drop_mariadb_database(database)


@contextmanager
def _postgres(tmp_path: Path) -> Iterator[ServiceFactory]:
    # SQLAlchemy creates tables in an existing schema, but not the schema itself.
    schema = unique_name()
    postgres_execute(f"CREATE SCHEMA {schema}")
    try:
        yield lambda: SqlAlchemyDeploymentService(
            postgres_url("asyncpg"), schema=schema, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL
        )
    finally:
        drop_postgres_schema(schema)


@contextmanager
def _sqlite(tmp_path: Path) -> Iterator[ServiceFactory]:
    # pytest removes the folder afterwards.
    path = tmp_path / "registry.db"
    yield lambda: SqliteDeploymentService(path, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)


SQL_STORES = [
    pytest.param(_mariadb, id="sqlalchemy-mariadb"),
    pytest.param(_postgres, id="sqlalchemy-postgres"),
    pytest.param(_sqlite, id="sqlite"),
]


async def _ids(service: DeploymentService, name: str) -> list[str]:
    return sorted(info.deployment_id for info in await service.find_function(name))


async def _close_all(services: list[DeploymentService]) -> None:
    for service in services:
        await service.close()


# -- many instances start at once with one id -------------------------------------------------------------

STARTERS = 12
ROUNDS = 3


@pytest.mark.timeout(120)
@pytest.mark.parametrize("open_store", SQL_STORES)
async def test_concurrent_starts_one_winner(
    open_store: Callable[[Path], AbstractContextManager[ServiceFactory]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="pikku_mq")
    with open_store(tmp_path) as make:
        services: list[DeploymentService] = []
        try:
            observer = make()
            services.append(observer)
            await observer.init()

            # Several rounds, because one round on a buggy store can still end with a single winner.
            winners: dict[str, str] = {}
            for round_number in range(ROUNDS):
                deployment_id = f"shared-{round_number}"
                starters = [make() for _ in range(STARTERS)]
                services.extend(starters)
                configs = [
                    DeploymentConfig(deployment_id, f"http://127.0.0.1:{1000 + index}", functions=["greet"])
                    for index in range(STARTERS)
                ]

                results = await asyncio.gather(
                    *(service.start(config) for service, config in zip(starters, configs, strict=True)),
                    return_exceptions=True,
                )

                started = [config.endpoint for config, result in zip(configs, results, strict=True) if result is None]
                assert len(started) == 1, f"round {round_number}: {len(started)} of {STARTERS} starts succeeded"
                failures = [result for result in results if result is not None]
                assert all(isinstance(failure, DeploymentConflictError) for failure in failures), failures
                winner_message = f"held by a live instance at {started[0]}"
                assert [str(failure) for failure in failures if winner_message not in str(failure)] == []
                winners[deployment_id] = started[0]

            # Heartbeats neither move the rows nor find them missing.
            await asyncio.sleep(INTERVAL * 6)
            records = await observer.list_deployments()
            assert {record.deployment_id: record.endpoint for record in records} == winners
            assert all(record.state == "live" for record in records)
            for deployment_id, endpoint in winners.items():
                assert [
                    info.endpoint
                    for info in await observer.find_function("greet")
                    if info.deployment_id == deployment_id
                ] == [endpoint]
        finally:
            await _close_all(services)

    messages = [record.getMessage() for record in caplog.records]
    assert [message for message in messages if "was missing" in message] == []
    assert [message for message in messages if "is not registered" in message] == []
    assert [message for message in messages if "heartbeat of" in message and "failed" in message] == []


# -- names are compared byte for byte ---------------------------------------------------------------------


@pytest.mark.parametrize("open_store", SQL_STORES)
async def test_names_case_and_spaces_significant(
    open_store: Callable[[Path], AbstractContextManager[ServiceFactory]], tmp_path: Path
) -> None:
    with open_store(tmp_path) as make:
        lower, upper, mixed, observer = make(), make(), make(), make()
        try:
            await lower.start(DeploymentConfig("worker-1", "http://127.0.0.1:1", functions=["greet"]))
            # A live holder of "worker-1" does not hold "Worker-1".
            await upper.start(DeploymentConfig("Worker-1", "http://127.0.0.1:2", functions=["Greet"]))
            # Names that differ only by case or trailing spaces are distinct functions of one instance.
            await mixed.start(DeploymentConfig("mixed", "http://127.0.0.1:3", functions=["sum", "Sum", "sum "]))

            assert await _ids(observer, "greet") == ["worker-1"]
            assert await _ids(observer, "Greet") == ["Worker-1"]
            assert await _ids(observer, "GREET") == []
            assert await _ids(observer, "greet   ") == []
            assert await _ids(observer, "sum") == ["mixed"]
            assert await _ids(observer, "Sum") == ["mixed"]
            assert await _ids(observer, "sum ") == ["mixed"]
            assert await _ids(observer, "sum  ") == []
            records = {record.deployment_id: record for record in await observer.list_deployments()}
            assert sorted(records) == ["Worker-1", "mixed", "worker-1"]
            assert records["mixed"].functions == ("Sum", "sum", "sum ")

            # Heartbeats count the function rows, so all three names must still be there afterwards.
            await asyncio.sleep(INTERVAL * 3)
            assert await _ids(observer, "sum ") == ["mixed"]
        finally:
            await _close_all([lower, upper, mixed, observer])


# An older pikku_mq, or Pikku's Kysely service, created these tables with the database's default collation.
_CASE_INSENSITIVE_TABLES = [
    """CREATE TABLE pikku_deployments (
        deployment_id VARCHAR(255) COLLATE utf8mb4_general_ci PRIMARY KEY,
        endpoint TEXT NOT NULL,
        last_heartbeat DATETIME(6) NOT NULL,
        created_at DATETIME(6) NOT NULL,
        fallback_endpoints TEXT NULL,
        heartbeat_ttl FLOAT NULL,
        INDEX pikku_deployments_last_heartbeat_idx (last_heartbeat)
    ) DEFAULT CHARSET=utf8mb4""",
    """CREATE TABLE pikku_deployment_functions (
        deployment_id VARCHAR(255) COLLATE utf8mb4_general_ci,
        function_name VARCHAR(255) COLLATE utf8mb4_general_ci,
        PRIMARY KEY (deployment_id, function_name),
        INDEX pikku_deployment_functions_name_idx (function_name),
        FOREIGN KEY (deployment_id) REFERENCES pikku_deployments (deployment_id) ON DELETE CASCADE
    ) DEFAULT CHARSET=utf8mb4""",
]


async def test_colliding_function_names_not_conflict(tmp_path: Path) -> None:
    database = unique_name()
    create_mariadb_database(database)
    service = SqlAlchemyDeploymentService(mariadb_url(database), heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    try:
        for statement in _CASE_INSENSITIVE_TABLES:
            mariadb_execute(database, statement)

        # The names collide in the old column, within one registration: no other instance is involved.
        with pytest.raises(DiscoveryError, match="treats two of its function names as equal") as raised:
            await service.start(DeploymentConfig("alpha", "http://127.0.0.1:1", functions=["greet", "Greet"]))

        assert not isinstance(raised.value, DeploymentConflictError)
        assert "collation of pikku_deployment_functions.function_name" in str(raised.value)
        assert await service.list_deployments() == []
    finally:
        await service.close()
        drop_mariadb_database(database)


async def test_mariadb_name_columns_binary(tmp_path: Path) -> None:
    with _mariadb(tmp_path) as make:
        service = make()
        try:
            await service.init()
        finally:
            await service.close()
        database = service.engine.url.database
        rows = mariadb_fetch(
            None,
            "SELECT table_name, column_name, collation_name FROM information_schema.columns "
            "WHERE table_schema = %s AND column_name IN ('deployment_id', 'function_name')",
            database,
        )

    assert sorted(rows) == [
        ("pikku_deployment_functions", "deployment_id", "utf8mb4_nopad_bin"),
        ("pikku_deployment_functions", "function_name", "utf8mb4_nopad_bin"),
        ("pikku_deployments", "deployment_id", "utf8mb4_nopad_bin"),
    ]


# -- liveness does not depend on the session's time zone --------------------------------------------------

TIME_ZONES = ["+00:00", "+02:00", "-02:00"]


async def test_mariadb_time_zones_agree(tmp_path: Path) -> None:
    database = unique_name()
    create_mariadb_database(database)
    engines = [
        create_async_engine(mariadb_url(database), connect_args={"init_command": f"SET time_zone = '{zone}'"})
        for zone in TIME_ZONES
    ]
    services = [
        SqlAlchemyDeploymentService(engine, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL) for engine in engines
    ]
    try:
        # One instance registers and heartbeats from each zone. Then the one in UTC+2 crashes.
        for service, zone in zip(services, TIME_ZONES, strict=True):
            await service.start(DeploymentConfig(f"worker{zone}", f"http://127.0.0.1:1/{zone}", functions=["greet"]))
        await asyncio.sleep(INTERVAL * 3)

        for service in services:
            assert await _ids(service, "greet") == sorted(f"worker{zone}" for zone in TIME_ZONES)
            for record in await service.list_deployments():
                assert record.state == "live", record
                assert 0 <= record.heartbeat_age < TTL, record

        crashed = services[1]
        assert crashed.heartbeating
        await crashed._stop_heartbeats()
        await asyncio.sleep(TTL * 1.5)

        # Stale for every session. The survivors' heartbeats may already have purged it.
        for service in services:
            assert await _ids(service, "greet") == ["worker+00:00", "worker-02:00"]
            for record in await service.list_deployments():
                expected = "stale" if record.deployment_id == "worker+02:00" else "live"
                assert record.state == expected, record
                assert record.heartbeat_age >= 0, record
    finally:
        await _close_all(services)
        for engine in engines:
            await engine.dispose()
        drop_mariadb_database(database)


# -- names longer than their columns ---------------------------------------------------------------------


@pytest.mark.parametrize("open_store", SQL_STORES)
async def test_long_names_rejected(
    open_store: Callable[[Path], AbstractContextManager[ServiceFactory]], tmp_path: Path
) -> None:
    long_id, long_function = "i" * 256, "f" * 300
    with open_store(tmp_path) as make:
        by_id, by_function, at_limit, observer = make(), make(), make(), make()
        try:
            await observer.init()
            with pytest.raises(ConfigurationError, match=r"deployment id 'i+'\.\.\. has 256 characters") as raised:
                await by_id.start(DeploymentConfig(long_id, "http://127.0.0.1:1", functions=["greet"]))
            assert "more than the 255" in str(raised.value)
            assert long_id not in str(raised.value)
            assert "INSERT" not in str(raised.value)

            with pytest.raises(ConfigurationError, match=r"function name 'f+'\.\.\. of deployment 'beta'") as raised:
                await by_function.start(DeploymentConfig("beta", "http://127.0.0.1:2", functions=["ok", long_function]))
            assert "has 300 characters, more than the 255" in str(raised.value)
            assert long_function not in str(raised.value)

            # Nothing was written, and names of exactly 255 characters fit.
            assert await observer.list_deployments() == []
            await at_limit.start(DeploymentConfig("a" * 255, "http://127.0.0.1:3", functions=["g" * 255]))
            assert await _ids(observer, "g" * 255) == ["a" * 255]
        finally:
            await _close_all([by_id, by_function, at_limit, observer])


# -- tables created by Pikku or an older pikku_mq ---------------------------------------------------------

ADDED_COLUMNS = ("fallback_endpoints", "heartbeat_ttl", "in_flight", "hostname", "idempotent_functions")
"""pikku_mq's nullable columns, which a table created by Pikku's Kysely service lacks."""


@pytest.mark.parametrize("open_store", SQL_STORES)
async def test_pikku_table_gets_columns(
    open_store: Callable[[Path], AbstractContextManager[ServiceFactory]], tmp_path: Path
) -> None:
    with open_store(tmp_path) as make:
        services: list[DeploymentService] = []
        try:
            creator = make()
            services.append(creator)
            assert isinstance(creator, SqlAlchemyDeploymentService)
            await creator.init()
            # Reduce the table to Pikku's layout and add a row as Pikku writes it.
            table = creator._deployments
            quoted = creator.engine.dialect.identifier_preparer.format_table(table)
            async with creator.engine.begin() as conn:
                for column in ADDED_COLUMNS:
                    await conn.execute(sa.text(f"ALTER TABLE {quoted} DROP COLUMN {column}"))
                await conn.execute(
                    table.insert().values(
                        deployment_id="pikku-ts",
                        endpoint="http://127.0.0.1:3000",
                        last_heartbeat=creator._clock.now(),
                        created_at=creator._clock.now(),
                    ),
                )
                await conn.execute(creator._functions.insert().values(deployment_id="pikku-ts", function_name="greet"))

            # Another process opens the store, as after an upgrade: init() adds the columns back.
            upgraded = make()
            services.append(upgraded)
            upgraded.in_flight_source = lambda: 4
            await upgraded.start(
                DeploymentConfig("mq", "http://127.0.0.1:1/mq", functions=["greet"], hostname="node-a")
            )

            found = {info.deployment_id: info for info in await upgraded.find_function("greet")}
            assert sorted(found) == ["mq", "pikku-ts"]
            assert (found["pikku-ts"].in_flight, found["pikku-ts"].hostname) == (None, None)
            assert (found["mq"].in_flight, found["mq"].hostname) == (4, "node-a")
            assert await upgraded._missing_columns() == []
        finally:
            await _close_all(services)
