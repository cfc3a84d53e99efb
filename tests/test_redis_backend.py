"""RedisDeploymentService against the Redis server at 127.0.0.1:6379: layout, round trips, clock, recovery.

The contract suite covers the behaviour every backend shares; these tests cover what only Redis has.
Each test works under a key prefix of its own and deletes its keys at the end. An unreachable server
fails the tests instead of skipping them.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio
from _support_core import wait_until
from _support_redis import REDIS_URL, delete_prefix, drop_redis_prefixes, prefix_keys, redis_prefix, sync_client

from pikku_mq import (
    ConfigurationError,
    DeploymentConfig,
    DeploymentConflictError,
    DeploymentInfo,
    RedisDeploymentService,
    deployment_service_from_url,
)
from pikku_mq.backends.redis import RETENTION_FACTOR

INTERVAL = 0.2
TTL = 0.6


class CountingRedis(redis.asyncio.Redis):
    """An asyncio client that records the name of every command it sends, one per round trip."""

    commands: list[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.commands.append(str(args[0]).upper())
        return await super().execute_command(*args, **options)


def counting_client() -> CountingRedis:
    client = CountingRedis.from_url(REDIS_URL)
    client.commands = []
    return client


@pytest.fixture(autouse=True)
def _redis_keys_dropped() -> Iterator[None]:
    yield
    drop_redis_prefixes()


@pytest.fixture
def prefix(tmp_path: Path) -> str:
    return redis_prefix(tmp_path)


class Services:
    """Builds services under the test's prefix and closes them, and the clients handed to them, at teardown."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.services: list[RedisDeploymentService] = []
        self.clients: list[redis.asyncio.Redis] = []

    def make(
        self, client: redis.asyncio.Redis | None = None, *, interval: float = INTERVAL, ttl: float = TTL
    ) -> RedisDeploymentService:
        if client is not None:
            self.clients.append(client)
        service = RedisDeploymentService(
            REDIS_URL if client is None else client,
            key_prefix=self.prefix,
            heartbeat_interval=interval,
            heartbeat_ttl=ttl,
        )
        self.services.append(service)
        return service

    async def close(self) -> None:
        for service in self.services:
            await service.close()
        for client in self.clients:
            await client.aclose()


@pytest.fixture
async def services(prefix: str) -> AsyncIterator[Services]:
    built = Services(prefix)
    yield built
    await built.close()


def _config(deployment_id: str, *functions: str, endpoint: str | None = None) -> DeploymentConfig:
    return DeploymentConfig(deployment_id, endpoint or f"http://127.0.0.1:1/{deployment_id}", functions=list(functions))


def _server_ms(client: redis.Redis) -> int:
    seconds, microseconds = client.time()
    return int(seconds) * 1000 + int(microseconds) // 1000


async def _ids(service: RedisDeploymentService, name: str) -> list[str]:
    return sorted(info.deployment_id for info in await service.find_function(name))


# -- layout -----------------------------------------------------------------------------------------------


async def test_layout_matches_pikku(services: Services, prefix: str) -> None:
    service = services.make()
    await service.start(_config("alpha", "sum", "greet"))

    with sync_client() as client:
        row = {k.decode(): v.decode() for k, v in client.hgetall(f"{prefix}deployment:alpha").items()}
        now_ms = _server_ms(client)
        row_ttl_ms = client.pttl(f"{prefix}deployment:alpha")
        scores = {name: client.zscore(f"{prefix}fn:{name}", "alpha") for name in ("greet", "sum")}
        types = {key.decode(): client.type(key).decode() for key in prefix_keys(client, prefix)}

    assert row["endpoint"] == "http://127.0.0.1:1/alpha"
    assert json.loads(row["functions"]) == ["greet", "sum"]
    assert float(row["heartbeat_ttl"]) == TTL
    assert 0 < row_ttl_ms <= TTL * 1000 * RETENTION_FACTOR
    for name, score in scores.items():
        assert score is not None, name
        # The score is the expiry time in milliseconds: the last heartbeat plus the TTL.
        assert 0 < score - now_ms <= TTL * 1000, name
    assert types == {
        f"{prefix}deployment:alpha": "hash",
        f"{prefix}fn:greet": "zset",
        f"{prefix}fn:sum": "zset",
        f"{prefix}deployments": "zset",
    }


async def test_key_prefix_isolates(services: Services, tmp_path: Path) -> None:
    other_prefix = redis_prefix(tmp_path / "other")
    mine = services.make()
    other = RedisDeploymentService(REDIS_URL, key_prefix=other_prefix)
    try:
        await mine.start(_config("alpha", "greet"))

        assert await other.find_function("greet") == []
        assert await other.list_deployments() == []
    finally:
        await other.close()


async def test_pikku_row_read(services: Services, prefix: str) -> None:
    """A row as Pikku writes it, without pikku_mq's own fields, is found, listed and defended."""
    with sync_client() as client:
        expiry = _server_ms(client) + 30_000
        client.hset(f"{prefix}deployment:ts-1", mapping={"endpoint": "http://10.0.0.5:4002", "functions": '["greet"]'})
        client.pexpire(f"{prefix}deployment:ts-1", 30_000)
        client.zadd(f"{prefix}fn:greet", {"ts-1": expiry})
    service, intruder = services.make(), services.make()

    assert await service.find_function("greet") == [DeploymentInfo("ts-1", "http://10.0.0.5:4002")]
    [record] = await service.list_deployments()
    assert record.functions == ("greet",)
    assert record.state == "live"
    with pytest.raises(DeploymentConflictError, match=r"http://10\.0\.0\.5:4002"):
        await intruder.start(_config("ts-1", "greet"))

    # Purging leaves a row it did not write alone.
    await service.start(_config("alpha", "greet"))
    await service._purge_stale()
    assert await _ids(service, "greet") == ["alpha", "ts-1"]


async def test_expired_member_ignored(services: Services, prefix: str) -> None:
    with sync_client() as client:
        client.hset(f"{prefix}deployment:ts-1", mapping={"endpoint": "http://10.0.0.5:4002", "functions": '["greet"]'})
        client.zadd(f"{prefix}fn:greet", {"ts-1": _server_ms(client) - 1})
    service = services.make()

    assert await service.find_function("greet") == []


async def test_decoded_responses_client(services: Services) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL, decode_responses=True)
    service, observer = services.make(client), services.make()
    await service.start(_config("alpha", "greet"))

    assert await _ids(service, "greet") == ["alpha"]
    [record] = await service.list_deployments()
    assert record.deployment_id == "alpha"
    with pytest.raises(DeploymentConflictError):
        await services.make(client)._register(_config("alpha", "greet", endpoint="http://127.0.0.1:9"), ["greet"])
    assert await _ids(observer, "greet") == ["alpha"]


# -- round trips --------------------------------------------------------------------------------------------


async def _heartbeat_commands(services: Services, function_count: int) -> list[str]:
    client = counting_client()
    service = services.make(client, interval=5.0, ttl=15.0)
    functions = [f"fn{i:02d}" for i in range(function_count)]
    config = _config(f"dep-{function_count}", *functions)
    await service.init()
    await service._register(config, functions)
    # The first call of each script may add SCRIPT LOAD; count a warm heartbeat.
    await service._heartbeat(config, functions)
    await service._purge_stale()

    client.commands.clear()
    assert await service._heartbeat(config, functions)
    await service._purge_stale()
    return list(client.commands)


async def test_heartbeat_round_trips_constant(services: Services, prefix: str) -> None:
    few = await _heartbeat_commands(services, 2)
    many = await _heartbeat_commands(services, 50)

    assert few == ["EVALSHA", "EVALSHA"]
    assert many == few


async def test_heartbeat_refreshes_every_function(services: Services, prefix: str) -> None:
    service = services.make(interval=5.0, ttl=15.0)
    functions = [f"fn{i:02d}" for i in range(50)]
    config = _config("alpha", *functions)
    await service.init()
    await service._register(config, functions)
    with sync_client() as client:
        before = [client.zscore(f"{prefix}fn:{name}", "alpha") for name in functions]
        await asyncio.sleep(0.01)

        assert await service._heartbeat(config, functions)

        after = [client.zscore(f"{prefix}fn:{name}", "alpha") for name in functions]
    for name, old, new in zip(functions, before, after, strict=True):
        assert old is not None, name
        assert new is not None, name
        assert new > old, name


async def test_lookup_one_round_trip(services: Services) -> None:
    client = counting_client()
    service = services.make(client)
    for deployment_id in ("alpha", "beta", "gamma"):
        await services.make().start(_config(deployment_id, "greet"))
    await service.find_function("greet")

    client.commands.clear()
    found = await service.find_function("greet")

    assert sorted(info.deployment_id for info in found) == ["alpha", "beta", "gamma"]
    assert client.commands == ["EVALSHA"]


# -- the server's clock ---------------------------------------------------------------------------------------


async def test_server_clock_used(services: Services, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + 600)
    monkeypatch.setattr(time, "time_ns", lambda: int((real_time() + 600) * 1e9))
    service, observer = services.make(), services.make()

    await service.start(_config("alpha", "greet"))
    await asyncio.sleep(TTL * 1.5)

    # A host clock ten minutes ahead changes nothing: every expiry comes from the server's TIME.
    assert await _ids(observer, "greet") == ["alpha"]
    [record] = await observer.list_deployments()
    assert record.state == "live"
    assert 0 <= record.heartbeat_age < TTL
    with sync_client() as client:
        score = client.zscore(f"{prefix}fn:greet", "alpha")
        now_ms = _server_ms(client)
    assert score is not None
    assert 0 < score - now_ms <= TTL * 1000


# -- lost registrations and purging ---------------------------------------------------------------------------


async def test_deleted_row_restored(services: Services, prefix: str) -> None:
    service, observer = services.make(), services.make()
    await service.start(_config("alpha", "greet", "sum"))

    with sync_client() as client:
        assert client.delete(f"{prefix}deployment:alpha") == 1
    assert await observer.find_function("greet") == []

    async def restored() -> bool:
        return await _ids(observer, "greet") == ["alpha"] and await _ids(observer, "sum") == ["alpha"]

    # Two intervals, because the heartbeat that notices the loss may have been mid-sleep for one.
    await wait_until(restored, timeout=INTERVAL * 2 + 0.6)


async def test_all_keys_lost_restored(services: Services, prefix: str) -> None:
    service, observer = services.make(), services.make()
    await service.start(_config("alpha", "greet", "sum"))

    # As if the server had been flushed or restarted without persistence.
    assert delete_prefix(prefix) == 4
    assert await observer.list_deployments() == []

    async def restored() -> bool:
        return await _ids(observer, "greet") == ["alpha"] and await _ids(observer, "sum") == ["alpha"]

    await wait_until(restored, timeout=INTERVAL * 2 + 0.6)
    [record] = await observer.list_deployments()
    assert record.functions == ("greet", "sum")
    assert record.state == "live"


async def test_lost_function_set_restored(services: Services, prefix: str) -> None:
    service, observer = services.make(), services.make()
    await service.start(_config("alpha", "greet", "sum"))

    with sync_client() as client:
        assert client.delete(f"{prefix}fn:sum") == 1

    async def restored() -> bool:
        return await _ids(observer, "sum") == ["alpha"]

    await wait_until(restored, timeout=INTERVAL * 2 + 0.6)


async def test_purge_bounded_per_call(services: Services, prefix: str) -> None:
    writer = services.make(interval=0.1, ttl=0.2)
    await writer.init()
    for i in range(150):
        await writer._register(_config(f"dep-{i:03d}", "greet", "shared"), ["greet", "shared"])
    assert len(await writer.list_deployments()) == 150
    await asyncio.sleep(0.3)

    purger = services.make()
    assert await purger._purge_stale() == 100
    assert await purger._purge_stale() == 50
    assert await purger._purge_stale() == 0

    assert await purger.list_deployments() == []
    with sync_client() as client:
        assert prefix_keys(client, prefix) == []


async def test_purge_keeps_taken_over_id(services: Services, prefix: str) -> None:
    old, new = services.make(), services.make(interval=5.0, ttl=15.0)
    await old.start(_config("alpha", "greet"))
    assert old.heartbeating
    await old._stop_heartbeats()
    await asyncio.sleep(TTL * 1.5)

    await new.start(_config("alpha", "greet", endpoint="http://127.0.0.1:9"))
    assert await new._purge_stale() == 0

    assert await new.find_function("greet") == [DeploymentInfo("alpha", "http://127.0.0.1:9")]


# -- construction and URLs ----------------------------------------------------------------------------------------


async def test_url_builds_blocking_pool(prefix: str) -> None:
    service = deployment_service_from_url(REDIS_URL, key_prefix=prefix, heartbeat_interval=1.0, heartbeat_ttl=3.0)
    assert isinstance(service, RedisDeploymentService)
    try:
        pool = service.client.connection_pool
        assert isinstance(pool, redis.asyncio.BlockingConnectionPool)
        assert pool.max_connections == 50
        assert pool.connection_kwargs["socket_keepalive"] is True
        assert pool.connection_kwargs["health_check_interval"] == 30
        assert service.key_prefix == prefix
        assert service.heartbeat_ttl == 3.0

        await service.start(_config("alpha", "greet"))
        assert await _ids(service, "greet") == ["alpha"]
    finally:
        await service.close()


async def test_url_rediss_scheme() -> None:
    service = deployment_service_from_url("rediss://user:hunter2@cache.invalid:6380/2", key_prefix="app:")

    try:
        assert isinstance(service, RedisDeploymentService)
        assert "hunter2" not in repr(service)
        assert "app:" in repr(service)
    finally:
        await service.close()


async def test_owned_client_closed(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    service = RedisDeploymentService(REDIS_URL, key_prefix=prefix)
    closed: list[bool] = []
    original = service.client.aclose

    async def spy(*args: Any, **kwargs: Any) -> None:
        closed.append(True)
        await original(*args, **kwargs)

    monkeypatch.setattr(service.client, "aclose", spy)
    await service.init()

    await service.close()

    assert closed == [True]


async def test_caller_client_kept_open(services: Services) -> None:
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    service = services.make(client)
    await service.start(_config("alpha", "greet"))

    await service.close()

    assert await client.ping() is True
    await client.aclose()
    services.clients.remove(client)


def test_empty_key_prefix_rejected() -> None:
    with pytest.raises(ConfigurationError, match="key_prefix"):
        RedisDeploymentService(REDIS_URL, key_prefix="")


def test_missing_redis_package_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)

    with pytest.raises(ConfigurationError, match=r"pip install 'pikku-mq\[redis\]'"):
        RedisDeploymentService(REDIS_URL)


async def test_malformed_row_ignored(services: Services, prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    # A row with fields that are not numbers, written by hand or by another program under the prefix.
    with sync_client() as client:
        client.hset(
            f"{prefix}deployment:bad",
            mapping={"endpoint": "http://x", "functions": "[]", "heartbeat_ttl": "abc", "last_heartbeat_ms": "1"},
        )
        client.zadd(f"{prefix}deployments", {"bad": 1})
    service = services.make()
    with caplog.at_level("WARNING", logger="pikku_mq"):
        await service.start(_config("good", "greet"))
        await asyncio.sleep(INTERVAL * 3)
        records = {record.deployment_id: record for record in await service.list_deployments()}
        # The id is free for registration: the row holds no heartbeat that pikku_mq can read.
        await services.make().start(_config("bad", "greet"))

    assert records["good"].state == "live"
    assert records["bad"].endpoint == "http://x"
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    assert sorted(await _ids(service, "greet")) == ["bad", "good"]
