"""Presence: workers announce join, heartbeat, draining and leave on their transports, and callers follow.

These tests use the in-memory transport, whose presence reaches every caller in the process. The broker
transports run the same cases against real servers in their own test files.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _support_core import wait_until

from pikku_mq import DeploymentInfo, DeploymentService, FunctionRegistry, pikku_sessionless_func
from pikku_mq._dispatch import Dispatcher
from pikku_mq.testing import Deployment, Mesh
from pikku_mq.transports.memory import MemoryServer

REG = FunctionRegistry()
INTERVAL = 0.1


@pikku_sessionless_func(expose=True, registry=REG)
async def whoami(services: Any, data: Any) -> str:
    return str(services)


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh(heartbeat_interval=INTERVAL, heartbeat_ttl=5 * INTERVAL) as shared:
        yield shared


async def add_worker(mesh: Mesh, deployment_id: str) -> Deployment:
    return await mesh.add(deployment_id, registry=REG, services=deployment_id)


def count_lookups(service: DeploymentService) -> list[str]:
    lookups: list[str] = []
    inner = service.router._lookup

    async def counted(name: str) -> list[DeploymentInfo]:
        lookups.append(name)
        return await inner(name)

    service.router._lookup = counted
    return lookups


async def test_stopped_worker_dropped_at_once(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    first = await add_worker(mesh, "p-1")
    await add_worker(mesh, "p-2")
    assert {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"p-1", "p-2"}
    lookups = count_lookups(caller)

    stopping = asyncio.create_task(first.stop())
    started = time.monotonic()
    await wait_until(lambda: "p-1" not in caller.router.cached_instances("whoami"), timeout=2, interval=0.005)
    assert time.monotonic() - started < 0.1
    await stopping

    assert {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"p-2"}
    assert lookups == []


async def test_killed_worker_sends_no_leave(mesh: Mesh) -> None:
    # A killed process announces nothing: the caller learns of it from the refused call.
    caller = mesh.service(routing_cache_ttl=60)
    first = await add_worker(mesh, "p-1")
    await add_worker(mesh, "p-2")
    assert {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"p-1", "p-2"}

    await first.kill()
    await asyncio.sleep(2 * INTERVAL)
    assert set(caller.router.cached_instances("whoami")) == {"p-1", "p-2"}

    assert {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"p-2"}
    assert caller.router.is_ejected("p-1")


async def test_joined_worker_found_at_once(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    await add_worker(mesh, "p-1")
    assert await caller.invoke("whoami", timeout=5) == "p-1"

    await add_worker(mesh, "p-2")
    answers = {await caller.invoke("whoami", timeout=5) for _ in range(4)}
    assert answers == {"p-1", "p-2"}


async def test_heartbeats_keep_cache(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    await add_worker(mesh, "p-1")
    assert await caller.invoke("whoami", timeout=5) == "p-1"
    lookups = count_lookups(caller)
    await asyncio.sleep(4 * INTERVAL)
    assert await caller.invoke("whoami", timeout=5) == "p-1"
    assert lookups == []


async def test_forged_leave_healed_by_heartbeat(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    await add_worker(mesh, "p-1")
    await add_worker(mesh, "p-2")
    assert {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"p-1", "p-2"}

    # Anyone on the broker can publish a leave for a live worker.
    await MemoryServer().announce("leave", "p-1")
    assert caller.router.cached_instances("whoami") == ("p-2",)

    # The worker's next heartbeat takes it back.
    async def both_answer() -> bool:
        return {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"p-1", "p-2"}

    waited = await wait_until(both_answer, timeout=5 * INTERVAL + 1, interval=0.02)
    assert waited < 3 * INTERVAL + 0.5


async def test_leave_of_another_mesh_ignored(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    await add_worker(mesh, "p-1")
    assert await caller.invoke("whoami", timeout=5) == "p-1"

    # A worker of another mesh on the same broker, with the same deployment id, stops.
    other = MemoryServer()
    await other.start(f"memory://other-mesh-{uuid.uuid4().hex[:8]}", other_dispatcher())
    await other.announce("leave", "p-1")
    await other.stop()

    assert caller.router.cached_instances("whoami") == ("p-1",)
    assert await caller.invoke("whoami", timeout=5) == "p-1"


def other_dispatcher() -> Dispatcher:
    return Dispatcher(REG, deployment_id="p-1")
