"""Liveness under a blocked event loop, with real worker processes and real discovery stores.

A worker process runs a function that blocks its event loop with ``time.sleep`` for more than three
TTLs. It must stay in ``find_function`` results the whole time, which the test checks by polling the
store. The calls that reach it meanwhile must be served once the loop is free, or fail with a deadline
error by their deadline. Its presence heartbeats on a broker must go on, marked busy, and callers must
send their calls to another instance. Once the worker is killed with SIGKILL, its registration must
expire within the TTL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats
import pytest
import redis.asyncio
from _support_core import wait_until
from _support_redis import REDIS_URL, delete_prefix
from _support_sql import POSTGRES_DSN, drop_postgres_schema, unique_name
from _support_workers import WorkerProcesses

from pikku_mq import (
    ConfigurationError,
    DeadlineExceededError,
    DeploymentConfig,
    DeploymentService,
    PgDeploymentService,
    RedisDeploymentService,
    deployment_service_from_url,
)
from pikku_mq._types import CallRequest

if TYPE_CHECKING:
    from _support_workers import WorkerProcess

MESH_WORKER = Path(__file__).parent / "apps" / "mesh_worker.py"
INTERVAL = 0.5
TTL = 1.5
BLOCK = 3.5 * TTL
"""Seconds the function blocks its worker's event loop: more than three TTLs."""
FAST_HEARTBEAT = ("--heartbeat-interval", str(INTERVAL), "--heartbeat-ttl", str(TTL))
EXPIRY_SLACK = 1.0
"""Seconds a killed worker's registration may outlive its TTL in the test: the polls' own latency on a loaded host."""


@dataclass
class Registry:
    """A discovery store of the test's own, a caller on it, and the worker flags that select it."""

    url: str
    caller: DeploymentService
    worker_args: tuple[str, ...] = ()
    cleanups: list[Callable[[], Any]] = field(default_factory=list)


@pytest.fixture(params=["sqlite", "postgres", "redis"])
async def registry(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Registry]:
    options: dict[str, Any] = {"heartbeat_interval": INTERVAL, "heartbeat_ttl": TTL}
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'registry.db'}"
        built = Registry(url, deployment_service_from_url(url, **options))
    elif request.param == "postgres":
        schema = unique_name()
        built = Registry(
            POSTGRES_DSN, PgDeploymentService(POSTGRES_DSN, schema=schema, **options), ("--schema", schema)
        )
        built.cleanups.append(lambda: drop_postgres_schema(schema))
    else:
        prefix = f"pikku_t_{uuid.uuid4().hex}:"
        caller = RedisDeploymentService(REDIS_URL, key_prefix=prefix, **options)
        built = Registry(REDIS_URL, caller, ("--key-prefix", prefix))
        built.cleanups.append(lambda: delete_prefix(prefix))
    await built.caller.init()
    try:
        yield built
    finally:
        await built.caller.close()
        for cleanup in built.cleanups:
            cleanup()


def sqlite_registry(tmp_path: Path) -> Registry:
    url = f"sqlite:///{tmp_path / 'registry.db'}"
    return Registry(url, deployment_service_from_url(url, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL))


async def listed(caller: DeploymentService, deployment_id: str) -> bool:
    return deployment_id in {i.deployment_id for i in await caller.find_function("whoami")}


async def launch(processes: WorkerProcesses, registry: Registry, deployment_id: str, *args: str) -> WorkerProcess:
    """Start a worker that serves whoami and block_loop on the registry, and wait until it is listed."""
    worker = processes.launch(
        MESH_WORKER, deployment_id, "--functions", "whoami,block_loop", *FAST_HEARTBEAT, *registry.worker_args, *args
    )
    await wait_until(lambda: listed(registry.caller, deployment_id), timeout=20)
    return worker


async def block(caller: DeploymentService, marker: Path) -> asyncio.Task[Any]:
    """Start a call that blocks the worker's event loop for BLOCK seconds, and return once it runs."""
    call = asyncio.create_task(
        caller.invoke("block_loop", {"seconds": BLOCK, "started_marker": str(marker)}, timeout=BLOCK + 20)
    )
    await wait_until(marker.exists, timeout=10)
    return call


async def timed(call: Any) -> tuple[float, Any]:
    """Await ``call`` and return the seconds it took with its result, or with the exception it raised."""
    started = time.monotonic()
    try:
        result = await call
    except Exception as exc:
        result = exc
    return time.monotonic() - started, result


async def test_blocked_worker_stays_listed(tmp_path: Path, registry: Registry) -> None:
    processes = WorkerProcesses(tmp_path, registry.url)
    try:
        worker = await launch(processes, registry, "blocker")
        call = await block(registry.caller, tmp_path / "blocking")
        blocked_at = time.monotonic()

        # Two calls reach the blocked worker: one whose deadline passes first, one that can wait.
        short = asyncio.create_task(timed(registry.caller.invoke("whoami", timeout=1.0)))
        patient = asyncio.create_task(registry.caller.invoke("whoami", timeout=BLOCK + 20))

        polls, missing = 0, []
        while not call.done() and time.monotonic() - blocked_at < BLOCK + 10:
            if not await listed(registry.caller, "blocker"):
                missing.append(round(time.monotonic() - blocked_at, 2))
            polls += 1
            await asyncio.sleep(0.1)
        blocked_for = time.monotonic() - blocked_at
        short_took, short_result = await short

        assert await call == "blocker"
        assert blocked_for >= BLOCK - 0.5
        assert polls >= 20
        assert missing == [], (
            f"the blocked worker was missing from lookups at these seconds: {missing}; its log:\n{worker.stderr()}"
        )
        assert isinstance(short_result, DeadlineExceededError)
        assert short_took < 1.0 + 1.0, "the call with a 1 s deadline did not fail by its deadline"
        assert await patient == "blocker"
        assert "event loop of worker blocker has run nothing" in worker.stderr()

        # A killed process sends no more heartbeats, so its registration expires within the TTL.
        worker.kill()
        killed_at = time.monotonic()
        await wait_until(lambda: not_listed(registry.caller, "blocker"), timeout=TTL * 10, interval=0.05)
        assert time.monotonic() - killed_at <= TTL + EXPIRY_SLACK
    finally:
        await processes.close()


async def not_listed(caller: DeploymentService, deployment_id: str) -> bool:
    return not await listed(caller, deployment_id)


async def test_loop_heartbeats_expire_when_blocked(tmp_path: Path) -> None:
    # The control case: heartbeats sent from the event loop stop while it is blocked.
    registry = sqlite_registry(tmp_path)
    await registry.caller.init()
    processes = WorkerProcesses(tmp_path, registry.url)
    try:
        await launch(processes, registry, "loop-heartbeats", "--no-heartbeat-thread")
        call = await block(registry.caller, tmp_path / "blocking")
        await wait_until(lambda: not_listed(registry.caller, "loop-heartbeats"), timeout=BLOCK + 5, interval=0.1)
        assert await call == "loop-heartbeats"
    finally:
        await processes.close()
        await registry.caller.close()


async def test_presence_heartbeats_marked_busy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subject = f"pikku_t_{uuid.uuid4().hex[:12]}.presence"
    monkeypatch.setenv("PIKKU_NATS_PRESENCE_SUBJECT", subject)
    endpoint = f"nats://127.0.0.1:4222/pikku_t_{uuid.uuid4().hex[:12]}"
    events: list[tuple[float, dict[str, Any]]] = []
    listener = await nats.connect("nats://127.0.0.1:4222")

    async def record(msg: Any) -> None:
        events.append((time.monotonic(), json.loads(msg.data)))

    await listener.subscribe(subject, cb=record)
    registry = sqlite_registry(tmp_path)
    await registry.caller.init()
    processes = WorkerProcesses(tmp_path, registry.url)
    try:
        await launch(processes, registry, "nats-blocker", "--endpoint", endpoint)
        call = await block(registry.caller, tmp_path / "blocking")
        blocked_at = time.monotonic()
        assert await call == "nats-blocker"
        freed_at = time.monotonic()
        await asyncio.sleep(INTERVAL * 3)
    finally:
        await listener.close()
        await processes.close()
        await registry.caller.close()

    beats = [(at, event) for at, event in events if event["event"] == "heartbeat"]
    during = [event for at, event in beats if blocked_at + 1.5 <= at <= freed_at - 0.2]
    after = [event for at, event in beats if at >= freed_at + INTERVAL]
    assert len(during) >= 4, f"too few heartbeats while the loop was blocked: {beats}"
    assert all(event.get("busy") is True for event in during), during
    assert all(event["deployment_id"] == "nats-blocker" for event in during)
    assert after
    assert all("busy" not in event for event in after), after


async def test_busy_worker_avoided(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIKKU_NATS_PRESENCE_SUBJECT", f"pikku_t_{uuid.uuid4().hex[:12]}.presence")
    registry = sqlite_registry(tmp_path)
    await registry.caller.init()
    caller = deployment_service_from_url(registry.url, routing_cache_ttl=60)
    processes = WorkerProcesses(tmp_path, registry.url)
    try:
        for deployment_id in ("busy-a", "free-b"):
            endpoint = f"nats://127.0.0.1:4222/pikku_t_{uuid.uuid4().hex[:12]}"
            await launch(processes, registry, deployment_id, "--endpoint", endpoint)
        # The first call subscribes the caller to presence. Both workers serve calls after it.
        await wait_until(lambda: both_answer(caller), timeout=10)

        # Only busy-a is asked to block, through its own endpoint.
        [busy] = [i for i in await registry.caller.find_function("whoami") if i.deployment_id == "busy-a"]
        marker = tmp_path / "blocking"
        request = CallRequest("block_loop", {"seconds": BLOCK, "started_marker": str(marker)}, {})
        transport = caller.router.transports.for_endpoint(busy.endpoint)
        assert transport is not None
        blocking = asyncio.create_task(transport.call(busy.endpoint, request, BLOCK + 20))
        await wait_until(marker.exists, timeout=10)
        await wait_until(lambda: "busy-a" in caller.router._busy, timeout=BLOCK)
        answers = [await caller.invoke("whoami", timeout=1.0) for _ in range(6)]
        reply = await blocking
        await wait_until(lambda: "busy-a" not in caller.router._busy, timeout=INTERVAL * 6)
    finally:
        await caller.close()
        await processes.close()
        await registry.caller.close()

    assert answers == ["free-b"] * 6
    assert reply.body == "busy-a"


async def both_answer(caller: DeploymentService) -> bool:
    return {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"busy-a", "free-b"}


def _listed_from_thread(url: str, options: dict[str, Any], deployment_id: str) -> bool:
    """Look ``deployment_id`` up from a thread of its own, with a new service, while this event loop is blocked."""

    async def check() -> bool:
        service = deployment_service_from_url(url, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL, **options)
        try:
            return deployment_id in {i.deployment_id for i in await service.find_function("whoami")}
        finally:
            await service.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, check()).result(timeout=30)


@pytest.mark.parametrize("heartbeat_url", [True, False], ids=["heartbeat_url", "loop_heartbeats"])
async def test_passed_in_client_heartbeats_from_thread(heartbeat_url: bool, caplog: pytest.LogCaptureFixture) -> None:
    # A service built on a Redis client that the application passed in can still send its heartbeats
    # from a thread, given the URL to connect with. Without it, blocking the loop expires the instance.
    caplog.set_level(logging.INFO, logger="pikku_mq")
    prefix = f"pikku_t_{uuid.uuid4().hex}:"
    client = redis.asyncio.Redis.from_url(REDIS_URL)
    service = RedisDeploymentService(
        client,
        key_prefix=prefix,
        heartbeat_interval=INTERVAL,
        heartbeat_ttl=TTL,
        heartbeat_url=REDIS_URL if heartbeat_url else None,
        change_feed=False,
    )
    try:
        await service.init()
        await service.start(DeploymentConfig("passed-in", "http://127.0.0.1:9", functions=["whoami"]))
        time.sleep(BLOCK)  # noqa: ASYNC251 - blocking the event loop is what this test does
        assert _listed_from_thread(REDIS_URL, {"key_prefix": prefix}, "passed-in") is heartbeat_url
        hints = [r.getMessage() for r in caplog.records if "Pass heartbeat_url=" in r.getMessage()]
        assert len(hints) == (0 if heartbeat_url else 1)
    finally:
        await service.close()
        await client.aclose()
        delete_prefix(prefix)


@pytest.mark.parametrize("value", ["", 42])
def test_heartbeat_url_checked(value: Any) -> None:
    with pytest.raises(ConfigurationError, match="heartbeat_url must be a non-empty URL or DSN string or None"):
        RedisDeploymentService(REDIS_URL, heartbeat_url=value)
