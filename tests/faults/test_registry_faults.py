"""Fault drills on the registry: the discovery store crashes and comes back, or loses its rows, under load.

Redis and PostgreSQL are private servers on free ports (the shared ones are never touched). Redis runs
without persistence, so it comes back empty: a restart and a wipe at once. PostgreSQL comes back with
its rows, whose heartbeats have gone stale. The SQLite file, the default registry, has its rows
deleted while the workers run. Calls must go on from the callers' routing caches throughout, and the
workers must register again by themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
from _support_servers import PrivatePostgres, PrivateRedis

from pikku_mq import DeploymentService, PikkuMQError

from ._harness import IDEMPOTENT, PLAIN, START_TIMEOUT, Drill, MakeDrill, Wiring

pytestmark = pytest.mark.timeout(90)

OUTAGE = 2.5
"""Seconds the store stays down: longer than the heartbeat TTL, so every registration goes stale."""


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
async def postgres(postgres_server: PrivatePostgres) -> PrivatePostgres:
    """The module's private PostgreSQL server, running, with an empty database ``drill``."""
    if not postgres_server.running:
        postgres_server.start()  # a drill that failed halfway left it stopped
    conn = await asyncpg.connect(postgres_server.dsn(), timeout=10)
    try:
        await conn.execute("DROP DATABASE IF EXISTS drill WITH (FORCE)")
        await conn.execute("CREATE DATABASE drill")
    finally:
        await conn.close()
    return postgres_server


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with PrivateRedis() as server:
        yield server


async def listed_after(probe: DeploymentService, deployment_ids: set[str], since: float) -> float:
    """Wait until both drill functions list every one of ``deployment_ids``; return the seconds since ``since``."""
    end = time.monotonic() + START_TIMEOUT
    while time.monotonic() < end:
        try:
            listed = [{i.deployment_id for i in await probe.find_function(name)} for name in (PLAIN, IDEMPOTENT)]
        except PikkuMQError:
            listed = []
        if listed and all(deployment_ids <= found for found in listed):
            return time.monotonic() - since
        await asyncio.sleep(0.02)
    raise AssertionError(f"{sorted(deployment_ids)} were not registered again within {START_TIMEOUT} s")


async def finish(drill: Drill) -> None:
    """Measure how long the registrations took to return, let the load go on, then check the figures."""
    probe = drill.new_caller(change_feed=False)
    try:
        ids = {w.deployment_id for w in drill.workers}
        drill.recovered_after(await listed_after(probe, ids, drill.faults[-1][1]))
    finally:
        await probe.close()
    await drill.run_on(1.0)
    await drill.load.stop()

    figures = drill.figures()
    drill.report(figures)
    drill.check(figures)
    assert figures.failed == {}, drill.diagnosis()


@pytest.mark.parametrize("transport", ["http", "nats", "amqp"])
async def test_redis_restarted_empty(
    redis_server: PrivateRedis, make_drill: MakeDrill, transport: str, request: pytest.FixtureRequest
) -> None:
    vhost = request.getfixturevalue("amqp_vhost") if transport == "amqp" else "/"
    drill = make_drill(
        "registry restarted empty", Wiring(transport, amqp_vhost=vhost), redis_server.url(), store="redis"
    )
    a, b = await drill.start_workers(2)
    await drill.warm_up()

    await drill.wait_busy(a, b)
    drill.fault()
    await asyncio.to_thread(redis_server.stop)
    await drill.run_on(OUTAGE)
    await asyncio.to_thread(redis_server.start)
    drill.fault_over()
    await finish(drill)


async def test_postgres_restarted(postgres: PrivatePostgres, make_drill: MakeDrill) -> None:
    drill = make_drill("registry restarted", Wiring("http"), postgres.dsn("drill"), store="postgresql")
    a, b = await drill.start_workers(2)
    await drill.warm_up()

    await drill.wait_busy(a, b)
    drill.fault()
    await asyncio.to_thread(postgres.stop)
    await drill.run_on(OUTAGE)
    await asyncio.to_thread(postgres.start)
    drill.fault_over()
    await finish(drill)


async def test_sqlite_rows_deleted(make_drill: MakeDrill, tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    drill = make_drill("registry wiped", Wiring("http"), f"sqlite:///{path}", store="sqlite")
    a, b = await drill.start_workers(2)
    await drill.warm_up()

    await drill.wait_busy(a, b)
    drill.fault()
    await asyncio.to_thread(_delete_registrations, path)
    drill.fault_over()
    await finish(drill)


def _delete_registrations(path: Path) -> None:
    with contextlib.closing(sqlite3.connect(path, timeout=10)) as conn, conn:
        conn.execute("DELETE FROM pikku_deployment_functions")
        conn.execute("DELETE FROM pikku_deployments")
