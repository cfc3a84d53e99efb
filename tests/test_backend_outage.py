"""A discovery server that crashes and comes back: calls keep routing and registrations return.

Each test runs a private PostgreSQL or Redis server on a free port of 127.0.0.1 (never the shared
servers), kills it while a worker and a caller use it, and starts it again on the same port. Calls must
keep succeeding from the caller's routing cache, the worker must log one WARNING for the outage, and
its registration must be back within about one heartbeat interval of the server accepting connections
again, with no ERROR logged and no exception left in a background task.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Protocol

import asyncpg
import pytest
from _support_core import wait_until
from _support_servers import PrivatePostgres, PrivateRedis

from pikku_mq import (
    DeadlineExceededError,
    DeploymentConfig,
    DeploymentService,
    DiscoveryError,
    FunctionRegistry,
    PgDeploymentService,
    PikkuWorker,
    RedisDeploymentService,
    SqlAlchemyDeploymentService,
    pikku_sessionless_func,
)

pytestmark = pytest.mark.timeout(60)

REG = FunctionRegistry()
INTERVAL = 0.3
TTL = 1.5
OUTAGE = 2.5
"""Seconds the server stays away: longer than the TTL, so only a heartbeat can make the worker live again."""

RETURN_SLACK = 0.5
"""Seconds allowed beyond one heartbeat interval for reconnecting and for the caller's lookup."""

HEARTBEAT_FAILED = "heartbeat of {} failed"
HEARTBEAT_RECOVERED = "heartbeat of {} recovered"
ROUTING_FROM_CACHE = "routing from the last lookups"


@pikku_sessionless_func(expose=True, registry=REG)
async def ping(services: Any, data: Any) -> str:
    return "pong"


class Server(Protocol):
    def stop(self) -> None: ...

    def start(self) -> float: ...


MakeService = Callable[..., DeploymentService]


# -- servers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PrivatePostgres]:
    with PrivatePostgres() as server:
        yield server


@pytest.fixture
async def postgres(postgres_server: PrivatePostgres) -> PrivatePostgres:
    """The private PostgreSQL server, running, with an empty database ``outage`` of this test's own."""
    if not postgres_server.running:
        postgres_server.start()  # a test that failed halfway left it stopped
    conn = await asyncpg.connect(postgres_server.dsn(), timeout=10)
    try:
        await conn.execute("DROP DATABASE IF EXISTS outage WITH (FORCE)")
        await conn.execute("CREATE DATABASE outage")
    finally:
        await conn.close()
    return postgres_server


@pytest.fixture
def redis_server() -> Iterator[PrivateRedis]:
    with PrivateRedis() as server:
        yield server


@pytest.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    """What reaches the event loop's exception handler, such as "Task exception was never retrieved"."""
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    try:
        yield errors
    finally:
        loop.set_exception_handler(previous)


# -- the scenario -------------------------------------------------------------------------------------


def _messages(caplog: pytest.LogCaptureFixture, level: int, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and text in r.getMessage()]


async def _is_registered(caller: DeploymentService, deployment_id: str) -> bool:
    try:
        found = await caller.find_function("ping")
    except Exception:
        return False
    return [i.deployment_id for i in found] == [deployment_id]


async def _survive_outage(
    server: Server,
    make_service: MakeService,
    caplog: pytest.LogCaptureFixture,
    loop_errors: list[dict[str, Any]],
) -> float:
    """Run a worker and a caller through a crash of ``server``.

    Return the seconds the registration took to come back after the server accepted connections again.
    """
    caplog.set_level(logging.INFO)
    deployment_id = f"outage-{uuid.uuid4().hex[:8]}"
    worker_service = make_service()
    caller = make_service(routing_cache_ttl=0.2)
    worker = PikkuWorker(registry=REG, deployment_id=deployment_id, deployment_service=worker_service)
    try:
        async with worker:
            assert await caller.invoke("ping", timeout=5) == "pong"

            server.stop()
            stopped = time.monotonic()
            calls = 0
            while time.monotonic() - stopped < OUTAGE:
                assert await caller.invoke("ping", timeout=5) == "pong"
                calls += 1
                await asyncio.sleep(INTERVAL / 3)
            assert calls >= 10
            assert len(_messages(caplog, logging.WARNING, HEARTBEAT_FAILED.format(deployment_id))) == 1
            assert len(_messages(caplog, logging.WARNING, ROUTING_FROM_CACHE)) == 1
            assert not await _is_registered(caller, deployment_id)

            answered = server.start()
            await wait_until(lambda: _is_registered(caller, deployment_id), timeout=INTERVAL * 20)
            back = time.monotonic() - answered

            assert await caller.invoke("ping", timeout=5) == "pong"
            assert worker_service.heartbeating
            await wait_until(
                lambda: _messages(caplog, logging.INFO, HEARTBEAT_RECOVERED.format(deployment_id)), timeout=5
            )
    finally:
        await caller.close()
        await worker_service.close()

    # One WARNING per kind of trouble for the whole outage, and none from the drivers' own loggers.
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    templates = [str(r.msg) for r in warnings]
    assert len(templates) == len(set(templates)), templates
    assert not [r.getMessage() for r in warnings if not r.name.startswith("pikku_mq.")]
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(_messages(caplog, logging.INFO, HEARTBEAT_RECOVERED.format(deployment_id))) == 1
    gc.collect()
    assert not loop_errors
    assert back < INTERVAL + RETURN_SLACK, f"the registration took {back:.2f} s to come back"
    return back


# -- the backends -------------------------------------------------------------------------------------


def _options(**extra: Any) -> dict[str, Any]:
    return {"heartbeat_interval": INTERVAL, "heartbeat_ttl": TTL, **extra}


async def test_postgres_outage_survived(
    postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    services: list[PgDeploymentService] = []

    def make_service(**extra: Any) -> PgDeploymentService:
        service = PgDeploymentService(postgres.dsn("outage"), pool_options={"timeout": 5}, **_options(**extra))
        services.append(service)
        return service

    back = await _survive_outage(postgres, make_service, caplog, loop_errors)

    print(f"PostgreSQL: registration back {back:.3f} s after the server accepted connections again")
    for service in services:
        assert service.pool is None  # closed and dropped by close()


async def test_postgres_pool_replaces_dead_connections(
    postgres: PrivatePostgres, loop_errors: list[dict[str, Any]]
) -> None:
    # Every pooled connection dies with the server; after the restart the pool must open new ones. The
    # floor of two connections makes asyncpg (0.32 and later) reconnect in a task of its own meanwhile.
    service = PgDeploymentService(postgres.dsn("outage"), pool_options={"min_size": 2, "max_size": 2, "timeout": 5})
    try:
        await service.init()
        pool = service.pool
        assert pool is not None
        before = {await pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)}

        postgres.stop()
        with pytest.raises((OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError)):
            await service.find_function("ping")
        postgres.start()

        await wait_until(lambda: _answers_query(service), timeout=5)
        assert service.pool is pool
        after = {await pool.fetchval("SELECT pg_backend_pid()") for _ in range(4)}
        assert not before & after
    finally:
        await service.close()
    assert pool._closed
    gc.collect()
    assert not loop_errors


async def _answers_query(service: PgDeploymentService) -> bool:
    try:
        await service.find_function("ping")
    except Exception:
        return False
    return True


async def test_sqlalchemy_postgres_outage_survived(
    postgres: PrivatePostgres, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    url = postgres.dsn("outage").replace("postgresql://", "postgresql+asyncpg://", 1)

    def make_service(**extra: Any) -> SqlAlchemyDeploymentService:
        return SqlAlchemyDeploymentService(url, **_options(**extra))

    back = await _survive_outage(postgres, make_service, caplog, loop_errors)

    print(f"SQLAlchemy on PostgreSQL: registration back {back:.3f} s after the server accepted connections again")


async def test_redis_outage_survived(
    redis_server: PrivateRedis, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    # Redis comes back empty, so the worker's heartbeat must register it again.
    def make_service(**extra: Any) -> RedisDeploymentService:
        return RedisDeploymentService(redis_server.url(), socket_timeout=5, **_options(**extra))

    back = await _survive_outage(redis_server, make_service, caplog, loop_errors)

    print(f"Redis: registration back {back:.3f} s after the server accepted connections again")
    assert any("registered again" in m for m in _messages(caplog, logging.INFO, "recovered"))


async def test_short_outage_retried_before_next_interval(
    redis_server: PrivateRedis, caplog: pytest.LogCaptureFixture, loop_errors: list[dict[str, Any]]
) -> None:
    # The first retry of a failed heartbeat comes at most 0.25 s after the failure, not a whole
    # interval later, so a server that is back at once finds the registration back at once too.
    interval = 2.0
    caplog.set_level(logging.INFO)
    options = {"heartbeat_interval": interval, "heartbeat_ttl": 3 * interval, "socket_timeout": 5}
    worker_service = RedisDeploymentService(redis_server.url(), **options)
    caller = RedisDeploymentService(redis_server.url(), **options)
    worker = PikkuWorker(registry=REG, deployment_id="blip", deployment_service=worker_service)
    try:
        async with worker:
            redis_server.stop()
            failed = HEARTBEAT_FAILED.format("blip")
            await wait_until(lambda: _messages(caplog, logging.WARNING, failed), timeout=interval * 2)
            answered = redis_server.start()
            await wait_until(lambda: _is_registered(caller, "blip"), timeout=interval * 2)
            back = time.monotonic() - answered
    finally:
        await caller.close()
        await worker_service.close()

    print(f"Redis blip: registration back {back:.3f} s after the server accepted connections again")
    assert back < 0.6
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    gc.collect()
    assert not loop_errors


# -- a store that stops answering -------------------------------------------------------------------


@pytest.fixture
def frozen_redis(redis_server: PrivateRedis) -> Iterator[PrivateRedis]:
    """The private redis-server, to be frozen with SIGSTOP by the test and thawed again at its end."""
    yield redis_server
    if redis_server.process is not None:
        redis_server.process.send_signal(signal.SIGCONT)


async def test_cold_lookup_bounded_by_deadline(frozen_redis: PrivateRedis) -> None:
    caller = RedisDeploymentService(frozen_redis.url(), **_options())
    await caller.init()
    assert frozen_redis.process is not None
    frozen_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="looking up the instances of 'ping'"):
            await caller.invoke("ping", timeout=1.0)
        assert time.monotonic() - started < 1.5
    finally:
        frozen_redis.process.send_signal(signal.SIGCONT)
        await caller.close()


async def test_stop_bounded_when_store_frozen(frozen_redis: PrivateRedis) -> None:
    service = RedisDeploymentService(frozen_redis.url(), **_options())
    await service.start(DeploymentConfig("frozen-1", "http://127.0.0.1:1", functions=["ping"]))
    assert frozen_redis.process is not None
    frozen_redis.process.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(DiscoveryError, match="deregistering frozen-1"):
            await service.close()
        # The draining announcement (2 s), a heartbeat in progress (5 s) and the deregistration (5 s).
        assert time.monotonic() - started < 13
    finally:
        frozen_redis.process.send_signal(signal.SIGCONT)
