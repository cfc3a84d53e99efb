"""Balancing strategies against real workers: round-robin, random, least-loaded and prefer-local.

The registry is Redis, with a key prefix of the test's own, except where a test says otherwise. The
distributions are checked with generous bounds, since the machine runs other work at the same time.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from _support_amqp import amqp_endpoint
from _support_core import wait_until
from _support_redis import REDIS_URL, drop_redis_prefixes, redis_prefix

from pikku_mq import (
    RPC,
    AiohttpTransport,
    ClientTransport,
    ConfigurationError,
    DeploymentInfo,
    DeploymentService,
    EjectionPolicy,
    FunctionRegistry,
    PikkuWorker,
    RedisDeploymentService,
    RetryPolicy,
    pikku_sessionless_func,
)
from pikku_mq._balancing import is_local
from pikku_mq._types import CallRequest
from pikku_mq.transports.amqp import AmqpTransport
from pikku_mq.transports.nats import NatsTransport

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def whoami(services: Any) -> str:
    return str(services["name"])


@pikku_sessionless_func(expose=True, registry=REG)
async def where(services: Any) -> str:
    return str(services["name"])


@pikku_sessionless_func(expose=True, registry=REG)
async def paced(services: Any) -> str:
    """Answer after the instance's own delay, so slow and fast instances host the same function."""
    await asyncio.sleep(services["delay"])
    return str(services["name"])


@pikku_sessionless_func(expose=True, registry=REG)
async def hold(services: Any, data: float) -> str:
    await asyncio.sleep(data)
    return str(services["name"])


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[Callable[..., DeploymentService]]:
    """Build deployment services on the test's own Redis key prefix; all are closed at the end."""
    services: list[DeploymentService] = []

    def make(**options: Any) -> DeploymentService:
        service = RedisDeploymentService(REDIS_URL, key_prefix=redis_prefix(tmp_path), **options)
        services.append(service)
        return service

    yield make
    for service in services:
        await service.close()
    drop_redis_prefixes()


def _worker(
    service: DeploymentService, name: str, *, delay: float = 0.0, endpoint: str = "http://127.0.0.1:0"
) -> PikkuWorker:
    return PikkuWorker(
        registry=REG,
        endpoint=endpoint,
        deployment_id=name,
        services={"name": name, "delay": delay},
        deployment_service=service,
    )


class Workers:
    """Workers started together and stopped at the end of the block."""

    def __init__(self, *workers: PikkuWorker) -> None:
        self.workers = workers

    async def __aenter__(self) -> tuple[PikkuWorker, ...]:
        for worker in self.workers:
            await worker.start()
        return self.workers

    async def __aexit__(self, *exc_info: object) -> None:
        for worker in self.workers:
            await worker.stop()


# -- choosing a strategy ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["fastest", "", "Round_Robin", 3])
def test_unknown_strategy_rejected(make_service: Callable[..., DeploymentService], name: Any) -> None:
    with pytest.raises(ConfigurationError) as caught:
        make_service(balancing=name)

    assert "use one of least_loaded, prefer_local, random, round_robin" in caught.value.message


def test_unknown_function_strategy_rejected(make_service: Callable[..., DeploymentService]) -> None:
    with pytest.raises(ConfigurationError, match="unknown balancing strategy 'nearest'"):
        make_service(function_balancing={"whoami": "random", "where": "nearest"})
    with pytest.raises(ConfigurationError, match="must map function names"):
        make_service(function_balancing=["random"])


def test_unknown_rpc_strategy_rejected(make_service: Callable[..., DeploymentService]) -> None:
    with pytest.raises(ConfigurationError, match="unknown balancing strategy"):
        RPC(deployment_service=make_service(), balancing="closest")


async def test_unknown_call_strategy_rejected(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service()
    async with Workers(_worker(make_service(), "a")):
        with pytest.raises(ConfigurationError, match="unknown balancing strategy 'lightest'"):
            await RPC(deployment_service=caller).remote("whoami", balancing="lightest")
        # The service still works after the rejected call.
        assert await caller.invoke("whoami", timeout=5) == "a"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: RetryPolicy(max_attempts=0), "max_attempts must be an integer of at least 1"),
        (lambda: RetryPolicy(attempt_timeout=-1.0), "attempt_timeout must be a positive"),
        (lambda: RetryPolicy(backoff=2.0, max_backoff=1.0), "0 <= backoff <= max_backoff"),
        (lambda: EjectionPolicy(consecutive_failures=0), "consecutive_failures must be at least 1"),
        (lambda: EjectionPolicy(base_interval=2.0, max_interval=1.0), "at least base_interval"),
    ],
    ids=["max-attempts", "attempt-timeout", "backoff", "failures", "intervals"],
)
def test_invalid_policies_rejected(build: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        build()


def test_policy_of_wrong_type_rejected(make_service: Callable[..., DeploymentService]) -> None:
    with pytest.raises(ConfigurationError, match="retry must be a RetryPolicy"):
        make_service(retry={"max_attempts": 2})


def test_hyphenated_names_accepted(make_service: Callable[..., DeploymentService]) -> None:
    service = make_service(balancing="least-loaded", function_balancing={"whoami": "prefer-local"})

    assert service.router.balancing == "least_loaded"
    assert service.router.function_balancing == {"whoami": "prefer_local"}


# -- round-robin and random -----------------------------------------------------------------------------------


async def test_round_robin_is_default(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service()
    async with Workers(*(_worker(make_service(), f"w{i}") for i in range(3))):
        served = [await caller.invoke("whoami", timeout=5) for _ in range(30)]

    assert collections.Counter(served) == {"w0": 10, "w1": 10, "w2": 10}
    # Each instance in turn: no instance twice in a row.
    assert all(a != b for a, b in itertools.pairwise(served))


async def test_random_spreads_calls(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service(balancing="random")
    async with Workers(*(_worker(make_service(), f"w{i}") for i in range(3))):
        served = [await caller.invoke("whoami", timeout=5) for _ in range(300)]

    counts = collections.Counter(served)
    assert set(counts) == {"w0", "w1", "w2"}
    assert all(50 <= count <= 150 for count in counts.values()), counts
    # Round-robin would never pick one instance twice in a row; 300 random picks of 3 do so about 100 times.
    assert sum(a == b for a, b in itertools.pairwise(served)) > 30


# -- least-loaded -------------------------------------------------------------------------------------------


def _load_directly(transport: ClientTransport, endpoint: str, calls: int, seconds: float) -> list[asyncio.Task[Any]]:
    """Start ``calls`` calls of ``hold`` straight to ``endpoint``, which no caller under test observes."""
    request = CallRequest("hold", seconds)
    return [asyncio.create_task(transport.call(endpoint, request, seconds + 10)) for _ in range(calls)]


async def test_least_loaded_reads_registry_load(make_service: Callable[..., DeploymentService]) -> None:
    interval = {"heartbeat_interval": 0.2, "heartbeat_ttl": 2.0}
    busy = _worker(make_service(**interval), "busy")
    idle = _worker(make_service(**interval), "idle")
    observer = make_service()
    transport = AiohttpTransport()
    async with Workers(busy, idle):
        assert busy.endpoint is not None
        load = _load_directly(transport, busy.endpoint, 30, 4.0)

        async def reported_busy() -> bool:
            return any(i.in_flight == 30 for i in await observer.find_function("whoami") if i.deployment_id == "busy")

        try:
            await wait_until(reported_busy, timeout=5)
            # Both callers look the load up once; least-loaded keeps away from the busy instance.
            least = make_service(balancing="least_loaded")
            round_robin = make_service()
            by_least = collections.Counter([await least.invoke("whoami", timeout=5) for _ in range(40)])
            by_round_robin = collections.Counter([await round_robin.invoke("whoami", timeout=5) for _ in range(40)])
            await asyncio.gather(*load)
        finally:
            await transport.close()

    assert by_least["idle"] >= 36, by_least
    assert by_round_robin == {"busy": 20, "idle": 20}


def _broker(transport: str) -> tuple[Callable[[], str], ClientTransport]:
    """Return a maker of fresh endpoints of ``transport`` and a client that calls them directly."""
    if transport == "nats":
        return (lambda: f"nats://127.0.0.1:4222/pikku_t_{uuid.uuid4().hex[:12]}"), NatsTransport()
    return amqp_endpoint, AmqpTransport()


@pytest.mark.parametrize("transport", ["nats", "amqp"])
async def test_least_loaded_follows_presence(
    request: pytest.FixtureRequest,
    make_service: Callable[..., DeploymentService],
    monkeypatch: pytest.MonkeyPatch,
    transport: str,
) -> None:
    if transport == "amqp":
        request.getfixturevalue("amqp_vhost")
    # A presence subject and exchange of the test's own, so other tests' workers stay out of view.
    channel = f"pikku_t_{uuid.uuid4().hex[:12]}.presence"
    monkeypatch.setenv("PIKKU_NATS_PRESENCE_SUBJECT", channel)
    monkeypatch.setenv("PIKKU_AMQP_PRESENCE_EXCHANGE", channel)
    new_endpoint, client = _broker(transport)
    interval = {"heartbeat_interval": 0.2, "heartbeat_ttl": 2.0}
    busy = _worker(make_service(**interval), "busy", endpoint=new_endpoint())
    idle = _worker(make_service(**interval), "idle", endpoint=new_endpoint())
    # The cache outlives the test, so the load can only arrive with presence heartbeats.
    caller = make_service(balancing="least_loaded", routing_cache_ttl=60)
    try:
        async with Workers(busy, idle):
            assert await caller.invoke("whoami", timeout=5) in ("busy", "idle")
            assert caller.router.load("busy") == 0

            # Calls held on the busy instance by another client, which this caller does not observe.
            assert busy.endpoint is not None
            load = _load_directly(client, busy.endpoint, 30, 4.0)
            await wait_until(lambda: caller.router.load("busy") >= 30, timeout=5)
            served = collections.Counter([await caller.invoke("whoami", timeout=5) for _ in range(40)])
            await asyncio.gather(*load)
    finally:
        await client.close()

    assert served["idle"] >= 36, served


async def test_least_loaded_observes_own_calls(make_service: Callable[..., DeploymentService]) -> None:
    # Instances that report no load (no source of calls in flight): only the caller's own counts decide.
    slow_service, fast_service = make_service(), make_service()
    slow, fast = _worker(slow_service, "slow", delay=0.2), _worker(fast_service, "fast")

    async def spread(balancing: str) -> collections.Counter[str]:
        caller = make_service(balancing=balancing)
        served: collections.Counter[str] = collections.Counter()

        async def loop() -> None:
            for _ in range(12):
                served[await caller.invoke("paced", timeout=5)] += 1

        await asyncio.gather(*(loop() for _ in range(8)))
        return served

    async with Workers(slow, fast):
        for service in (slow_service, fast_service):
            service.in_flight_source = None
        by_least = await spread("least_loaded")
        by_round_robin = await spread("round_robin")

    assert sum(by_least.values()) == 96
    assert by_least["fast"] >= 72, by_least
    assert abs(by_round_robin["fast"] - by_round_robin["slow"]) <= 16, by_round_robin


# -- prefer-local ---------------------------------------------------------------------------------------------


async def test_prefer_local_then_others(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service(balancing="prefer_local", hostname="node-a")
    local = _worker(make_service(hostname="node-a"), "local")
    remotes = [_worker(make_service(hostname="node-b"), f"remote{i}") for i in range(2)]
    async with Workers(*remotes):
        await local.start()
        try:
            near = [await caller.invoke("whoami", timeout=5) for _ in range(20)]
        finally:
            await local.stop()
        far = [await caller.invoke("whoami", timeout=5) for _ in range(20)]

    assert near == ["local"] * 20
    assert collections.Counter(far) == {"remote0": 10, "remote1": 10}


async def test_prefer_local_skips_refusing_local(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service(balancing="prefer_local", hostname="node-a")
    local = _worker(make_service(hostname="node-a"), "local")
    remote = _worker(make_service(hostname="node-b"), "remote")
    async with Workers(local, remote):
        assert await caller.invoke("whoami", timeout=5) == "local"
        # The local worker dies without deregistering: its port refuses, and the call moves at once.
        for server in local._servers:
            await server.stop()
        served = [await caller.invoke("whoami", timeout=5) for _ in range(5)]

    assert served == ["remote"] * 5
    assert caller.router.is_ejected("local")


async def test_strategy_per_function_and_call(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service(hostname="node-a", function_balancing={"where": "prefer_local"})
    rpc = RPC(registry=FunctionRegistry(), deployment_service=caller)
    local = _worker(make_service(hostname="node-a"), "local")
    remote = _worker(make_service(hostname="node-b"), "remote")
    async with Workers(local, remote):
        mapped = [await rpc.remote("where") for _ in range(10)]
        default = collections.Counter([await rpc.remote("whoami") for _ in range(10)])
        per_call = [await rpc.remote("whoami", balancing="prefer_local") for _ in range(10)]
        overridden = collections.Counter([await rpc.remote("where", balancing="round_robin") for _ in range(10)])
        per_rpc = [
            await RPC(registry=FunctionRegistry(), deployment_service=caller, balancing="prefer-local").remote("whoami")
            for _ in range(10)
        ]

    assert mapped == ["local"] * 10
    assert default == {"local": 5, "remote": 5}
    assert per_call == ["local"] * 10
    assert overridden == {"local": 5, "remote": 5}
    assert per_rpc == ["local"] * 10


@pytest.mark.parametrize(
    ("info", "local"),
    [
        (DeploymentInfo("a", "http://10.0.0.5:8001", hostname="node-a"), True),
        (DeploymentInfo("a", "http://127.0.0.1:8001", hostname="node-b"), False),
        (DeploymentInfo("a", "nats://127.0.0.1:4222/orders", hostname="node-a"), True),
        (DeploymentInfo("a", "http://127.0.0.1:8001"), True),
        (DeploymentInfo("a", "http://localhost:8001"), True),
        (DeploymentInfo("a", "http://[::1]:8001"), True),
        (DeploymentInfo("a", "http://10.0.0.5:8001"), False),
        (DeploymentInfo("a", "nats://127.0.0.1:4222/orders"), False),
    ],
)
def test_locality_rule(info: DeploymentInfo, local: bool) -> None:
    assert is_local(info, "node-a") is local
