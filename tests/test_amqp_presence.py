"""AMQP presence: workers publish join, heartbeat, draining and leave on a fanout exchange, callers follow.

The workers and callers share the session's own vhost on the shared RabbitMQ, and each test takes a
presence exchange of its own (``PIKKU_AMQP_PRESENCE_EXCHANGE``).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _support_amqp import amqp_endpoint
from _support_core import Mesh, wait_until

from pikku_mq import FunctionRegistry, PikkuWorker, pikku_sessionless_func

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def whoami(services: Any, data: Any) -> str:
    return str(services)


@pytest.fixture(autouse=True)
def presence_exchange(monkeypatch: pytest.MonkeyPatch, amqp_vhost: str) -> str:
    exchange = f"pikku_t_{uuid.uuid4().hex[:12]}.presence"
    monkeypatch.setenv("PIKKU_AMQP_PRESENCE_EXCHANGE", exchange)
    return exchange


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


def amqp_worker(mesh: Mesh, deployment_id: str) -> PikkuWorker:
    return PikkuWorker(
        registry=REG,
        endpoint=amqp_endpoint(),
        deployment_id=deployment_id,
        services=deployment_id,
        deployment_service=mesh.service(heartbeat_interval=0.2, heartbeat_ttl=2),
    )


async def test_stopped_worker_leaves_within_100_ms(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    first = amqp_worker(mesh, "ap-1")
    async with amqp_worker(mesh, "ap-2"):
        await first.start()
        assert {await caller.invoke("whoami", timeout=5) for _ in range(6)} == {"ap-1", "ap-2"}

        stopping = asyncio.create_task(first.stop())
        started = time.monotonic()
        await wait_until(lambda: "ap-1" not in caller.router.cached_instances("whoami"), timeout=5, interval=0.002)
        assert time.monotonic() - started < 0.1
        await stopping
        assert {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"ap-2"}


async def test_new_worker_used_at_once(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    async with amqp_worker(mesh, "ap-1"):
        # The first call subscribes to presence, which expires the lookup it made; the second caches it.
        for _ in range(2):
            assert await caller.invoke("whoami", timeout=5) == "ap-1"
        async with amqp_worker(mesh, "ap-2"):
            registered = time.monotonic()

            async def second_answers() -> bool:
                return await caller.invoke("whoami", timeout=5) == "ap-2"

            await wait_until(second_answers, timeout=5, interval=0.01)
            assert time.monotonic() - registered < 1.0


async def test_heartbeats_keep_cache(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    async with amqp_worker(mesh, "ap-1"):
        assert await caller.invoke("whoami", timeout=5) == "ap-1"
        cached = caller.router.cached_instances("whoami")
        await asyncio.sleep(0.8)
        assert caller.router.cached_instances("whoami") == cached == ("ap-1",)
