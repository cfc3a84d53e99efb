"""deployment_service.watch() on every discovery backend, and on the change feeds and broker presence.

The contract cases run on each backend of the deployment-service contract suite. The feed cases set a
poll interval far above the test's timeouts, so only the change feed or the presence messages can
deliver the events they wait for.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from _support_amqp import AMQP_URL, SESSION_VHOST, amqp_endpoint
from _support_core import wait_until
from _support_redis import REDIS_URL, delete_prefix, redis_prefix
from _support_sql import drop_postgres_schema, postgres_execute, postgres_fetch, postgres_url, unique_name
from test_change_feed import kill_feed_connection

from pikku_mq import (
    ClientTransport,
    ConfigurationError,
    DeploymentConfig,
    DeploymentService,
    DeploymentWatch,
    FunctionRegistry,
    MemoryDeploymentService,
    MeshEvent,
    PgDeploymentService,
    PikkuWorker,
    RedisDeploymentService,
    TransportSet,
    pikku_sessionless_func,
)
from pikku_mq.transports.amqp import AmqpTransport
from pikku_mq.transports.nats import NatsTransport

from .test_deployment_services import BACKENDS, INTERVAL, TTL, Store, _open_store

POLL = 0.2
EVENT_TIMEOUT = 5.0
"""Seconds a test waits for one event: several TTLs and poll intervals of the fast settings used here."""


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async for shared in _open_store(request.param, tmp_path):
        yield shared


def _config(deployment_id: str, *functions: str) -> DeploymentConfig:
    return DeploymentConfig(
        deployment_id=deployment_id,
        endpoint=f"http://127.0.0.1:1/{deployment_id}",
        functions=list(functions),
        fallback_endpoints=(f"http://127.0.0.1:2/{deployment_id}",),
    )


async def next_event(events: DeploymentWatch, timeout: float = EVENT_TIMEOUT) -> MeshEvent:
    async with asyncio.timeout(timeout):
        return await anext(events)


async def assert_no_event(events: DeploymentWatch, seconds: float) -> None:
    try:
        event = await next_event(events, seconds)
    except TimeoutError:
        return
    pytest.fail(f"unexpected event {event}")


# -- contract: every backend ----------------------------------------------------------------------------


async def test_watch_reports_existing_then_join(store: Store) -> None:
    a, b, watcher = store.service(), store.service(), store.service()
    await a.start(_config("watch-a", "greet", "add"))

    async with watcher.watch(poll_interval=POLL) as events:
        first = await next_event(events)
        assert first.kind == "join"
        assert first.deployment_id == "watch-a"
        assert first.endpoints == ("http://127.0.0.1:1/watch-a", "http://127.0.0.1:2/watch-a")
        assert first.functions == ("add", "greet")

        await b.start(_config("watch-b", "greet"))
        second = await next_event(events)
        assert (second.kind, second.deployment_id, second.functions) == ("join", "watch-b", ("greet",))


async def test_watch_without_existing(store: Store) -> None:
    a, b, watcher = store.service(), store.service(), store.service()
    await a.start(_config("watch-a", "greet"))

    async with watcher.watch(poll_interval=POLL, include_existing=False) as events:
        await assert_no_event(events, 3 * POLL)
        await b.start(_config("watch-b", "greet"))
        event = await next_event(events)
        assert (event.kind, event.deployment_id) == ("join", "watch-b")


async def test_watch_reports_stop(store: Store) -> None:
    a, watcher = store.service(), store.service()
    await a.start(_config("watch-a", "greet"))

    async with watcher.watch(poll_interval=POLL) as events:
        assert (await next_event(events)).kind == "join"
        await a.stop()
        kinds = [(await next_event(events)).kind]
        if watcher.has_change_feed:
            # The feed carries the draining announcement that stop() sends before it deregisters.
            kinds.append((await next_event(events)).kind)
            assert kinds == ["draining", "leave"]
        else:
            assert kinds == ["leave"]


async def test_watch_reports_expiry(store: Store) -> None:
    a, watcher = store.service(), store.service()
    await a.start(_config("watch-a", "greet"))

    async with watcher.watch(poll_interval=POLL) as events:
        assert (await next_event(events)).kind == "join"
        started = time.monotonic()
        await a._stop_heartbeats()  # as if the process were killed: no draining, no deregistration
        event = await next_event(events)
        assert (event.kind, event.deployment_id) == ("expired", "watch-a")
        assert event.endpoint == "http://127.0.0.1:1/watch-a"
        # Reported after the TTL, and no later than a TTL plus a few poll intervals.
        assert TTL - INTERVAL <= time.monotonic() - started < TTL + 10 * POLL


async def test_watch_reports_deleted_row_as_leave(store: Store) -> None:
    # A long TTL on both sides, so the row is live when it is deleted and the watch judges it by that TTL.
    a, watcher = store.service(INTERVAL, TTL * 20), store.service(INTERVAL, TTL * 20)
    await a.start(_config("watch-a", "greet"))

    async with watcher.watch(poll_interval=POLL) as events:
        assert (await next_event(events)).kind == "join"
        await a._stop_heartbeats()
        store.delete_registration("watch-a")
        event = await next_event(events)
        assert (event.kind, event.deployment_id) == ("leave", "watch-a")


async def test_watch_close_releases_everything(store: Store) -> None:
    watcher = store.service()
    events = watcher.watch(poll_interval=POLL)
    async with events:
        assert watcher._watch_listeners == [events._on_change]
        task = events._task
        assert task is not None
        assert not task.done()
    assert task.done()
    assert watcher._watch_listeners == []
    with pytest.raises(StopAsyncIteration):
        await anext(events)
    with pytest.raises(RuntimeError, match="closed"):
        await events.start()


async def test_watch_iterated_without_context(store: Store) -> None:
    a, watcher = store.service(), store.service()
    await a.start(_config("watch-a", "greet"))
    events = watcher.watch(poll_interval=POLL)
    try:
        event = await next_event(events)
        assert (event.kind, event.deployment_id) == ("join", "watch-a")
    finally:
        await events.aclose()
    assert events._task is None


@pytest.mark.parametrize("poll_interval", [0, -1, float("inf"), float("nan")])
def test_watch_bad_poll_interval_rejected(poll_interval: float) -> None:
    with pytest.raises(ConfigurationError, match="poll_interval"):
        MemoryDeploymentService().watch(poll_interval=poll_interval)


# -- change feeds: PostgreSQL LISTEN/NOTIFY and Redis pub/sub --------------------------------------------

SLOW_POLL = 600.0
"""A poll interval no test waits for, so that events can only come from a feed."""


@pytest.fixture(params=["postgres", "redis"])
async def feed_services(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[list[DeploymentService]]:
    services: list[DeploymentService] = []
    if request.param == "postgres":
        schema = unique_name()

        def make() -> DeploymentService:
            return PgDeploymentService(
                postgres_url(),
                schema=schema,
                heartbeat_interval=INTERVAL,
                heartbeat_ttl=TTL,
                # The application name lets kill_listener find this test's connections among the server's.
                pool_options={"server_settings": {"application_name": schema}},
            )
    else:
        prefix = redis_prefix(tmp_path)
        # The client name lets kill_feed_connection find this test's connections among the server's.
        url = f"{REDIS_URL}?client_name={prefix}"

        def make() -> DeploymentService:
            return RedisDeploymentService(url, key_prefix=prefix, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)

    services.extend(make() for _ in range(3))
    try:
        yield services
    finally:
        for service in services:
            await service.close()
        if request.param == "postgres":
            drop_postgres_schema(schema)
        else:
            delete_prefix(redis_prefix(tmp_path))


async def test_feed_delivers_join_and_leave(feed_services: list[DeploymentService]) -> None:
    a, watcher, _ = feed_services
    async with watcher.watch(poll_interval=SLOW_POLL) as events:
        await a.start(_config("feed-a", "greet"))
        joined = await next_event(events)
        assert (joined.kind, joined.deployment_id, joined.functions) == ("join", "feed-a", ("greet",))
        await a.stop()
        assert [(await next_event(events)).kind, (await next_event(events)).kind] == ["draining", "leave"]


async def test_feed_loss_resyncs_from_table(feed_services: list[DeploymentService]) -> None:
    a, watcher, b = feed_services
    await a.start(_config("feed-a", "greet"))
    async with watcher.watch(poll_interval=SLOW_POLL) as events:
        assert (await next_event(events)).deployment_id == "feed-a"
        assert watcher.change_feed_live
        await kill_listener(watcher)
        # Changes made while the feed is down: their notifications are lost, so only the resync can report them.
        await b.start(_config("feed-b", "greet"))
        await a.stop()
        # The feed may be back in time to carry some of these changes, so collect until both are seen.
        seen: list[tuple[str, str]] = []
        while not {("join", "feed-b"), ("leave", "feed-a")} <= set(seen):
            event = await next_event(events)
            seen.append((event.kind, event.deployment_id))
            assert len(seen) <= 3, seen
        # The feed notices the loss at its next check and subscribes again with a backoff, which a
        # loaded machine stretches: allow a few rounds of both.
        await wait_until(lambda: watcher.change_feed_live, timeout=EVENT_TIMEOUT * 4)


async def kill_listener(service: DeploymentService) -> None:
    """Close the service's change-feed connection from the server's side."""
    if not isinstance(service, PgDeploymentService):
        await kill_feed_connection(service)
        return
    # pg_stat_activity shows each connection's last statement: LISTEN, or the feed's periodic SELECT 1
    # check. The pool's connections run the registry's queries.
    rows = postgres_fetch(
        "SELECT pid FROM pg_stat_activity "
        "WHERE application_name = $1 AND (query LIKE 'LISTEN %' OR query = 'SELECT 1')",
        service.schema,
    )
    assert len(rows) == 1
    postgres_execute("SELECT pg_terminate_backend($1)", rows[0][0])


# -- broker presence: NATS and AMQP ---------------------------------------------------------------------

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def whoami(services: Any) -> str:
    return str(services)


def _nats_presence(monkeypatch: pytest.MonkeyPatch) -> tuple[ClientTransport, str, dict[str, str]]:
    monkeypatch.setenv("PIKKU_NATS_PRESENCE_SUBJECT", f"pikku_t_{uuid.uuid4().hex[:12]}.presence")
    endpoint = f"nats://127.0.0.1:4222/pikku_t_{uuid.uuid4().hex[:12]}"
    return NatsTransport("nats://127.0.0.1:4222"), endpoint, {"nats_url": "nats://127.0.0.1:4222"}


def _amqp_presence(monkeypatch: pytest.MonkeyPatch) -> tuple[ClientTransport, str, dict[str, str]]:
    monkeypatch.setenv("PIKKU_AMQP_PRESENCE_EXCHANGE", f"pikku_t_{uuid.uuid4().hex[:12]}.presence")
    url = f"{AMQP_URL}{quote(SESSION_VHOST, safe='')}"
    return AmqpTransport(url), amqp_endpoint(), {"amqp_url": AMQP_URL}


@pytest.mark.usefixtures("amqp_vhost")
@pytest.mark.parametrize("broker", [_nats_presence, _amqp_presence], ids=["nats", "amqp"])
async def test_broker_presence_triggers_resync(
    broker: Callable[[pytest.MonkeyPatch], tuple[ClientTransport, str, dict[str, str]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A registry without a change feed and a slow poll: the worker's presence messages bring the events.
    transport, endpoint, worker_options = broker(monkeypatch)
    registry_service = MemoryDeploymentService(heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    watcher = MemoryDeploymentService(
        registry_service.registry,
        heartbeat_interval=INTERVAL,
        heartbeat_ttl=TTL,
        transports=TransportSet([transport]),
    )
    worker = PikkuWorker(
        registry=REG,
        deployment_id="presence-a",
        services="presence-a",
        deployment_service=registry_service,
        endpoint=endpoint,
        **worker_options,
    )
    try:
        async with watcher.watch(poll_interval=SLOW_POLL) as events:
            async with worker:
                joined = await next_event(events)
                assert (joined.kind, joined.deployment_id, joined.functions) == ("join", "presence-a", ("whoami",))
            kinds = [(await next_event(events)).kind, (await next_event(events)).kind]
            assert kinds == ["draining", "leave"]
    finally:
        await watcher.close()
        await registry_service.close()
