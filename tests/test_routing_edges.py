"""Edge cases of routing, retries and configuration that a review found, each pinned by a test.

Real workers on HTTP and NATS, the shared Redis, and the in-memory registry of ``_support_core``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import redis.asyncio as aioredis
from _support_core import Mesh, wait_until
from _support_redis import REDIS_URL, drop_redis_prefixes, redis_prefix
from _support_servers import drop_subscription

from pikku_mq import (
    RPC,
    ConfigurationError,
    DeadlineExceededError,
    DeploymentConfig,
    EjectionPolicy,
    FunctionRegistry,
    PikkuMQError,
    PikkuWorker,
    RedisDeploymentService,
    RetryPolicy,
    Wire,
    pikku_sessionless_func,
)

REG = FunctionRegistry()

STALLED: set[str] = set()
"""Call ids whose first attempt ``slow_first_attempt`` has held."""

STALL = 0.8
"""Seconds the first attempt of each call takes; later attempts of the same call id return at once."""


@pikku_sessionless_func(expose=True, idempotent=True, registry=REG)
async def slow_first_attempt(services: Any, data: Any, wire: Wire) -> str:
    if wire.call_id not in STALLED:
        STALLED.add(wire.call_id)
        await asyncio.sleep(STALL)
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def nap(services: Any, data: float) -> str:
    await asyncio.sleep(data)
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def relay_nap(services: Any, data: float, wire: Wire) -> str:
    result: str = await wire.rpc.remote("nap", data, timeout=0.2)
    return result


@pytest.mark.parametrize("concurrent", [4, 6])
async def test_retry_after_only_instance_ejected(concurrent: int) -> None:
    # Every first attempt outlasts the 0.3 s attempt timeout, and every retry returns at once. With
    # five or more calls in flight, their timeouts eject the only instance (5 failures in a row), and
    # then no retry is sent: each call fails with "no instance left to retry on" after about 0.35 s
    # of its 5 s deadline. With four calls in flight, all of them succeed on their retry.
    STALLED.clear()
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint="http://127.0.0.1:0",
            deployment_id="only",
            registry=REG,
            services="only",
            deployment_service=mesh.service(),
        )
        caller = mesh.service(retry=RetryPolicy(attempt_timeout=0.3))
        async with worker:
            results = await asyncio.gather(
                *(caller.invoke("slow_first_attempt", None, timeout=5) for _ in range(concurrent)),
                return_exceptions=True,
            )

    failures = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    assert failures == []


async def test_nested_timeout_keeps_upstream_routed() -> None:
    # relay_nap replies every time, with the DeadlineExceededError of its own nested call. The caller
    # counts each such reply as a failure of the relaying instance and ejects it after five, so a slow
    # downstream function takes healthy upstream instances out of routing.
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint="http://127.0.0.1:0",
            deployment_id="relay",
            registry=REG,
            services="relay",
            deployment_service=mesh.service(),
        )
        caller = mesh.service()
        async with worker:
            for _ in range(6):
                with pytest.raises(PikkuMQError):
                    await caller.invoke("relay_nap", 5.0, timeout=5)
            ejected = caller.router.is_ejected("relay")

    assert not ejected


async def test_remote_invalid_timeout_is_typed() -> None:
    async with Mesh() as mesh:
        rpc = RPC(deployment_service=mesh.service())
        for timeout in (0, -1, float("nan"), float("inf")):
            with pytest.raises(PikkuMQError):
                await rpc.remote("anything", None, timeout=timeout)


async def test_idempotent_flag_must_be_bool() -> None:
    # idempotent="false" (a string read from a config file, say) is truthy, so a plain call is retried.
    async with Mesh() as mesh:
        rpc = RPC(deployment_service=mesh.service())
        with pytest.raises(ConfigurationError):
            await rpc.remote("anything", None, timeout=1, idempotent="false")  # type: ignore[arg-type]


async def test_bad_call_arguments_typed() -> None:
    async with Mesh() as mesh:
        rpc = RPC(deployment_service=mesh.service())
        for timeout in ("5", True):
            with pytest.raises(ConfigurationError):
                await rpc.remote("anything", None, timeout=timeout)  # type: ignore[arg-type]
        for name in (None, "", 3):
            with pytest.raises(ConfigurationError, match="a function name must be a non-empty string"):
                await rpc.remote(name, None)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError):
            await mesh.service().invoke("anything", timeout=float("nan"))
        with pytest.raises(ConfigurationError):
            await mesh.service().invoke("anything", timeout=1, idempotent=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options",
    [{"default_timeout": float("nan")}, {"default_timeout": float("inf")}, {"default_timeout": True}, {"hop": -5}],
    ids=["timeout_nan", "timeout_inf", "timeout_bool", "hop_negative"],
)
def test_rpc_options_checked(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RPC(**options)


@pytest.mark.parametrize(
    "make",
    [
        lambda: RetryPolicy(attempt_timeout=True),  # type: ignore[arg-type]
        lambda: RetryPolicy(backoff=None),  # type: ignore[arg-type]
        lambda: EjectionPolicy(base_interval=True),  # type: ignore[arg-type]
        lambda: EjectionPolicy(max_interval="5"),  # type: ignore[arg-type]
    ],
    ids=["attempt_timeout_bool", "backoff_none", "base_interval_bool", "max_interval_str"],
)
def test_policy_values_checked(make: Any) -> None:
    with pytest.raises(ConfigurationError):
        make()


async def test_draining_event_keeps_attempts() -> None:
    # A draining NATS worker leaves its subscription, so a call that the router sends there before it
    # hears the draining event gets "no responders". The attempts in flight to that worker are ended
    # only after a short grace, and not at all once the draining event has come: the worker finishes them.
    async with Mesh() as mesh:
        prefix = f"pikku_t_{uuid.uuid4().hex[:12]}"
        client = await nats.connect("nats://127.0.0.1:4222", allow_reconnect=False)
        taken: list[str] = []

        async def take(message: Any) -> None:
            taken.append(message.subject)

        subscription = await client.subscribe(f"{prefix}.>", cb=take)
        await client.flush()
        endpoint = f"nats://127.0.0.1:4222/{prefix}"
        try:
            await mesh.service().start(DeploymentConfig("draining", endpoint, functions=["nap"]))
            caller = mesh.service()
            first = asyncio.create_task(caller.invoke("nap", 0.0, timeout=1.0))
            await wait_until(lambda: taken, timeout=5)

            await drop_subscription(client, subscription, prefix)
            second = asyncio.create_task(caller.invoke("nap", 0.0, timeout=1.0))
            await wait_until(lambda: caller.router.is_ejected("draining"), timeout=5)
            caller.router.instance_left("draining", endpoint)  # the draining event, just after the failure

            with pytest.raises(PikkuMQError):
                await second
            # Not ended as unreachable: the call waits for its reply until its deadline.
            with pytest.raises(DeadlineExceededError):
                await first
        finally:
            await client.close()


@pytest.fixture
async def other_db_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/14")
    yield client
    await client.aclose()


async def test_heartbeat_url_other_store_rejected(tmp_path: Path, other_db_client: aioredis.Redis) -> None:
    # heartbeat_url names a database other than the passed-in client's. The heartbeat thread then
    # registers the instance there, logging only that the registration "was missing", while the row
    # in the real registry expires after its TTL although the process is alive.
    prefix = redis_prefix(tmp_path)
    client = aioredis.Redis.from_url(REDIS_URL)
    service = RedisDeploymentService(
        client,
        key_prefix=prefix,
        heartbeat_interval=0.3,
        heartbeat_ttl=1.0,
        heartbeat_url="redis://127.0.0.1:6379/14",
    )
    found: list[str] = []
    rejected: PikkuMQError | None = None
    try:
        await service.init()
        try:
            await service.start(DeploymentConfig("hb-url", "http://127.0.0.1:9", functions=["f"]))
        except PikkuMQError as exc:
            rejected = exc
        else:
            time.sleep(1.6)  # noqa: ASYNC251 - blocks the event loop past the TTL, as CPU-bound code does
            await asyncio.sleep(0.1)
            found = [i.deployment_id for i in await service.find_function("f")]
    finally:
        await service.close()
        await client.aclose()
        keys = await other_db_client.keys(prefix + "*")
        if keys:
            await other_db_client.delete(*keys)
        drop_redis_prefixes()

    assert rejected is not None or found == ["hb-url"]
