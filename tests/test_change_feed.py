"""The change feed: PostgreSQL LISTEN/NOTIFY and Redis pub/sub push joins and leaves into routing caches.

The callers here cache lookups for a minute, so an instance leaves their routing within the second only
if the feed carried the event. The tests also count lookups, to show that nothing polled.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio
from _support_core import wait_until
from _support_redis import REDIS_URL, delete_prefix, redis_prefix
from _support_sql import drop_postgres_schema, postgres_execute, postgres_fetch, postgres_url, unique_name

from pikku_mq import (
    DeploymentInfo,
    DeploymentService,
    FunctionRegistry,
    MemoryDeploymentService,
    PgDeploymentService,
    PikkuWorker,
    RedisDeploymentService,
    pikku_sessionless_func,
)
from pikku_mq._presence import MAX_CHANGE_PAYLOAD, ChangeEvent, decode_change, encode_change

REG = FunctionRegistry()
INTERVAL = 0.2
TTL = 1.0
CACHE_TTL = 60.0
"""Callers keep lookups this long, so only the feed can change their routing during a test."""


@pikku_sessionless_func(expose=True, registry=REG)
async def whoami(services: Any, data: Any) -> str:
    return str(services)


class Backend:
    """Builds deployment services on one test's own schema or key prefix, and closes them all."""

    def __init__(self, make: Callable[..., DeploymentService]) -> None:
        self._make = make
        self.services: list[DeploymentService] = []

    def service(self, **options: Any) -> DeploymentService:
        service = self._make(heartbeat_interval=INTERVAL, heartbeat_ttl=TTL, **options)
        self.services.append(service)
        return service

    def caller(self) -> DeploymentService:
        return self.service(routing_cache_ttl=CACHE_TTL)

    def worker(self, deployment_id: str) -> PikkuWorker:
        return PikkuWorker(
            registry=REG, deployment_id=deployment_id, services=deployment_id, deployment_service=self.service()
        )

    async def close(self) -> None:
        for service in self.services:
            await service.close()


@pytest.fixture
def schema() -> Iterator[str]:
    name = unique_name()
    yield name
    drop_postgres_schema(name)


@pytest.fixture(params=["postgres", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Backend]:
    if request.param == "postgres":
        schema = request.getfixturevalue("schema")
        built = Backend(lambda **options: PgDeploymentService(postgres_url(), schema=schema, **options))
    else:
        prefix = redis_prefix(tmp_path)
        # The client name lets kill_feed_connection find this test's connections among the server's.
        url = f"{REDIS_URL}?client_name={prefix}"
        built = Backend(lambda **options: RedisDeploymentService(url, key_prefix=prefix, **options))
    try:
        yield built
    finally:
        await built.close()
        if request.param == "redis":
            delete_prefix(redis_prefix(tmp_path))


def count_lookups(service: DeploymentService) -> list[str]:
    """Record every lookup that ``service``'s router makes from now on."""
    lookups: list[str] = []
    inner = service.router._lookup

    async def counted(name: str) -> list[DeploymentInfo]:
        lookups.append(name)
        return await inner(name)

    service.router._lookup = counted
    return lookups


async def call_until_cached(caller: DeploymentService, *deployment_ids: str) -> None:
    """Call until the caller's cache contains exactly ``deployment_ids`` and its feed is subscribed."""

    async def ready() -> bool:
        # Read the flag before the call: subscribing expires the cache, and a subscription that
        # completes during the call would leave an expired entry behind.
        live = caller.change_feed_live
        await caller.invoke("whoami", timeout=5)
        cached = set(caller.router.cached_instances("whoami"))
        return cached == set(deployment_ids) and live

    await wait_until(ready, timeout=10, interval=0.05)


async def seconds_until_gone(caller: DeploymentService, deployment_id: str, action: Awaitable[Any]) -> float:
    """Run ``action`` in the background and return the seconds until the caller stops routing to the id."""
    started = time.monotonic()
    task = asyncio.ensure_future(action)
    try:
        await wait_until(
            lambda: deployment_id not in caller.router.cached_instances("whoami"), timeout=5, interval=0.01
        )
        return time.monotonic() - started
    finally:
        await task


async def test_stopped_worker_leaves_routing_fast(backend: Backend) -> None:
    caller = backend.caller()
    async with backend.worker("feed-a") as a, backend.worker("feed-b"):
        await call_until_cached(caller, "feed-a", "feed-b")
        lookups = count_lookups(caller)

        assert await seconds_until_gone(caller, "feed-a", a.stop()) < 1.0
        assert lookups == []
        answers = {await caller.invoke("whoami", timeout=5) for _ in range(6)}
        assert answers == {"feed-b"}
        assert lookups == []


async def test_new_worker_used_at_once(backend: Backend) -> None:
    caller = backend.caller()
    async with backend.worker("feed-a"):
        await call_until_cached(caller, "feed-a")
        async with backend.worker("feed-c"):
            registered = time.monotonic()

            async def new_instance_answers() -> bool:
                return await caller.invoke("whoami", timeout=5) == "feed-c"

            await wait_until(new_instance_answers, timeout=5, interval=0.02)
            assert time.monotonic() - registered < 1.0


async def test_crashed_worker_purged_and_dropped(backend: Backend) -> None:
    # A worker whose heartbeats stop (as if killed) is purged by another worker's heartbeat once its
    # TTL passes, and the purge's leave event reaches the caller.
    caller = backend.caller()
    async with backend.worker("feed-a") as a, backend.worker("feed-b"):
        await call_until_cached(caller, "feed-a", "feed-b")
        lookups = count_lookups(caller)
        assert a.deployment_service is not None
        await a.deployment_service._stop_heartbeats()

        waited = await seconds_until_gone(caller, "feed-a", asyncio.sleep(0))
        # Dropped by the purge's event, well before the caller's cache would have expired.
        assert TTL - INTERVAL < waited < TTL + 1.5
        assert lookups == []


async def test_feed_survives_malformed_messages(backend: Backend) -> None:
    caller = backend.caller()
    async with backend.worker("feed-a") as a, backend.worker("feed-b"):
        await call_until_cached(caller, "feed-a", "feed-b")
        for junk in ["not json", "[1, 2]", '{"event": "explode", "deployment_id": "feed-b"}', '{"event": "leave"}']:
            await publish_raw(caller, junk)
        assert await seconds_until_gone(caller, "feed-a", a.stop()) < 1.0
        assert caller.change_feed_live
        assert set(caller.router.cached_instances("whoami")) == {"feed-b"}


async def test_feed_resubscribes_after_kill(backend: Backend, caplog: pytest.LogCaptureFixture) -> None:
    caller = backend.caller()
    subscriptions = count_subscriptions(caller)
    async with backend.worker("feed-a") as a, backend.worker("feed-b"):
        await call_until_cached(caller, "feed-a", "feed-b")
        assert subscriptions == [1]
        with caplog.at_level(logging.INFO, logger="pikku_mq"):
            await kill_feed_connection(caller)
            await wait_until(lambda: len(subscriptions) == 2, timeout=5)
            # The events it may have missed are made up for by a lookup on the next call.
            assert set(caller.router.cached_instances("whoami")) == {"feed-a", "feed-b"}
            lookups = count_lookups(caller)
            await caller.invoke("whoami", timeout=5)
            assert lookups == ["whoami"]
            assert await seconds_until_gone(caller, "feed-a", a.stop()) < 1.0
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == []


def count_subscriptions(caller: DeploymentService) -> list[int]:
    """Record each time the caller's feed subscribes, as a running count; patch before the first call."""
    subscriptions: list[int] = []
    inner = caller._on_change

    def counted(event: ChangeEvent | None) -> None:
        if event is None:
            subscriptions.append(len(subscriptions) + 1)
        inner(event)

    caller._on_change = counted  # type: ignore[method-assign]
    return subscriptions


async def publish_raw(caller: DeploymentService, payload: str) -> None:
    if isinstance(caller, PgDeploymentService):
        postgres_execute("SELECT pg_notify($1, $2)", caller._sql.channel, payload)
    else:
        assert isinstance(caller, RedisDeploymentService)
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            assert await client.publish(caller.change_channel, payload) >= 1
        finally:
            await client.aclose()


async def kill_feed_connection(caller: DeploymentService) -> None:
    """Close the caller's feed connection from the server's side, as a restart or a proxy would."""
    if isinstance(caller, PgDeploymentService):
        listen = f'LISTEN "{caller._sql.channel}"'
        rows = postgres_fetch("SELECT pid FROM pg_stat_activity WHERE query = $1", listen)
        assert len(rows) == 1
        postgres_execute("SELECT pg_terminate_backend($1)", rows[0][0])
        return
    assert isinstance(caller, RedisDeploymentService)
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        assert await client.pubsub_numsub(caller.change_channel) == [(caller.change_channel, 1)]
        mine = [c for c in await client.client_list(_type="pubsub") if c.get("name") == caller.key_prefix]
        assert len(mine) == 1
        assert await client.client_kill_filter(_id=mine[0]["id"]) == 1
    finally:
        await client.aclose()


# -- without servers ---------------------------------------------------------------------------------


def test_change_events_round_trip() -> None:
    assert decode_change(encode_change("leave", "a-1")) == ChangeEvent("leave", "a-1")
    assert decode_change(encode_change("join", "b").encode()) == ChangeEvent("join", "b")
    assert decode_change('{"event": "resync"}') == ChangeEvent("resync", "")


def test_overlong_event_becomes_resync() -> None:
    payload = encode_change("leave", "x" * MAX_CHANGE_PAYLOAD)
    assert decode_change(payload) == ChangeEvent("resync", "")


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "nope",
        "[]",
        "{}",
        '{"event": "leave"}',
        '{"event": "boom", "deployment_id": "a"}',
        '{"event": 1}',
        "[" * 100_000,
        '{"event": "leave", "deployment_id": ' + "[" * 5_000 + "}",
    ],
)
def test_malformed_events_ignored(raw: str) -> None:
    assert decode_change(raw) is None


async def test_router_applies_events() -> None:
    service = MemoryDeploymentService(routing_cache_ttl=CACHE_TTL)
    router = service.router
    found = [DeploymentInfo("a", "http://127.0.0.1:1/a"), DeploymentInfo("b", "http://127.0.0.1:1/b")]
    lookups = 0

    async def lookup(name: str) -> list[DeploymentInfo]:
        nonlocal lookups
        lookups += 1
        return list(found)

    router._lookup = lookup
    assert [i.deployment_id for i in await router._instances("f")] == ["a", "b"]

    router.instance_left("a")
    assert router.cached_instances("f") == ("b",)
    assert [i.deployment_id for i in await router._instances("f")] == ["b"]
    assert lookups == 1

    # A lookup that still returns the departed instance (it started before the event) is filtered.
    router.instance_joined("c")
    assert [i.deployment_id for i in await router._instances("f")] == ["b"]
    assert lookups == 2

    router.instance_joined("a")
    assert [i.deployment_id for i in await router._instances("f")] == ["a", "b"]
    assert lookups == 3

    router.instance_left("a")
    router.instance_left("b")
    assert router.cached_instances("f") == ()
    found.clear()
    assert await router._instances("f") == []
    assert lookups == 4
    await service.close()
