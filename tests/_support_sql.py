"""Helpers for tests that run against the PostgreSQL and MariaDB servers on 127.0.0.1.

Every test works in a schema (PostgreSQL) or database (MariaDB) of its own with a random name, and drops
it at the end, so tests run in any order and leave nothing behind. The helpers are synchronous, for the
contract suite's store callbacks: each PostgreSQL statement runs on a fresh asyncpg connection in a
worker thread with its own event loop. An unreachable server makes them raise, so the tests fail.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import pymysql

POSTGRES_DSN = os.environ.get("PIKKU_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")
"""The PostgreSQL database the tests use; each test adds a schema of its own to it."""

MARIADB_HOST = "127.0.0.1"
MARIADB_PORT = 3306
MARIADB_USER = os.environ.get("PIKKU_TEST_MARIADB_USER", "root")

SQL_TIMEOUT = 30.0
"""Seconds one helper call may take, connection included."""


def unique_name() -> str:
    """Return a new schema or database name that no other test uses."""
    return f"pikku_t_{uuid.uuid4().hex[:16]}"


async def _postgres(method: str, sql: str, args: tuple[Any, ...]) -> Any:
    conn = await asyncpg.connect(POSTGRES_DSN, timeout=SQL_TIMEOUT)
    try:
        return await getattr(conn, method)(sql, *args)
    finally:
        await conn.close()


def _run_postgres(method: str, sql: str, args: tuple[Any, ...]) -> Any:
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, _postgres(method, sql, args)).result(timeout=SQL_TIMEOUT)


def postgres_execute(sql: str, *args: Any) -> str:
    """Run one statement and return its command tag, such as ``DELETE 1``."""
    return str(_run_postgres("execute", sql, args))


def postgres_fetch(sql: str, *args: Any) -> list[asyncpg.Record]:
    """Run one query and return its rows."""
    return list(_run_postgres("fetch", sql, args))


def postgres_url(driver: str = "") -> str:
    """Return the test database's URL, with ``+driver`` after the scheme when one is given."""
    scheme, rest = POSTGRES_DSN.split("://", 1)
    return f"{scheme}+{driver}://{rest}" if driver else POSTGRES_DSN


def drop_postgres_schema(schema: str) -> None:
    assert schema.startswith("pikku_t_"), f"refusing to drop {schema!r}, which the tests did not create"
    postgres_execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def mariadb_url(database: str) -> str:
    return f"mysql+aiomysql://{MARIADB_USER}@{MARIADB_HOST}:{MARIADB_PORT}/{database}"


def _mariadb_connect(database: str | None) -> pymysql.Connection:
    return pymysql.connect(
        host=MARIADB_HOST,
        port=MARIADB_PORT,
        user=MARIADB_USER,
        database=database,
        autocommit=True,
        connect_timeout=int(SQL_TIMEOUT),
    )


def mariadb_execute(database: str | None, sql: str, *args: Any) -> int:
    """Run one statement in ``database`` (or none) and return its row count."""
    conn = _mariadb_connect(database)
    try:
        with conn.cursor() as cursor:
            return int(cursor.execute(sql, args or None))
    finally:
        conn.close()


def mariadb_fetch(database: str | None, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Run one query in ``database`` (or none) and return its rows."""
    conn = _mariadb_connect(database)
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql, args or None)
            return list(cursor.fetchall())
    finally:
        conn.close()


def create_mariadb_database(database: str) -> None:
    mariadb_execute(None, f"CREATE DATABASE {database}")


def drop_mariadb_database(database: str) -> None:
    assert database.startswith("pikku_t_"), f"refusing to drop {database!r}, which the tests did not create"
    mariadb_execute(None, f"DROP DATABASE IF EXISTS {database}")
