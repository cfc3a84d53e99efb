"""A caller that dropped a draining worker from its cache: the only instance, and a restart under the same id."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _support_core import Mesh, closed_port, wait_until
from test_nats_transport import SHARED_URL, make_worker, shared_endpoint
from test_routing import REG

from pikku_mq import RPC, AiohttpTransport, FunctionRegistry, PikkuMQError, PikkuWorker, Reply, TransportSet
from pikku_mq._types import CallRequest
from pikku_mq.transports.memory import MemoryTransport
from pikku_mq.transports.nats import NatsTransport


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


def _worker(mesh: Mesh, name: str, port: int, **options: Any) -> PikkuWorker:
    return PikkuWorker(
        endpoint=f"http://127.0.0.1:{port}",
        deployment_id=name,
        registry=REG,
        services=name,
        deployment_service=mesh.service(),
        **options,
    )


async def test_only_instance_drains_then_restarts(mesh: Mesh) -> None:
    port = closed_port()
    first = _worker(mesh, "A", port, drain_timeout=5)
    await first.start()
    caller_service, transport = mesh.counting_service(routing_cache_ttl=60)
    rpc = RPC(registry=FunctionRegistry(), deployment_service=caller_service)
    direct = AiohttpTransport()
    restarted: PikkuWorker | None = None
    try:
        assert await rpc.remote("work", 0) == "A"
        slow = asyncio.create_task(direct.call(first.endpoint or "", CallRequest("work", 1.0), 5))
        await wait_until(lambda: first.dispatcher.in_flight == 1, timeout=5)
        stopping = asyncio.create_task(first.stop())
        await wait_until(lambda: first.dispatcher.draining, timeout=5)

        # The only instance drains: calls fail at once with a typed error, and never hang.
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises(PikkuMQError) as failed:
                await rpc.remote("work", 0)
            assert failed.value.status in (404, 503)
            assert time.monotonic() - started < 2.0

        assert (await slow).body == "A"
        await stopping

        # The same id on the same endpoint starts again, and the caller routes to it without a restart.
        restarted = _worker(mesh, "A", port)
        await restarted.start()

        async def served() -> bool:
            try:
                return await rpc.remote("work", 0) == "A"
            except PikkuMQError:
                return False

        waited = await wait_until(served, timeout=10, interval=0.1)
        assert waited < 10
        assert [await rpc.remote("work", 0) for _ in range(3)] == ["A"] * 3
    finally:
        await first.stop()
        if restarted is not None:
            await restarted.stop()
        await direct.close()
    assert transport.attempts.count(f"http://127.0.0.1:{port}") >= 4


async def test_sibling_rejection_keeps_instance(mesh: Mesh) -> None:
    # Two workers share one NATS subject, so the sibling of the instance a call went to may reject it.
    # Only the instance that the rejection names leaves the caller's cache.
    endpoint = shared_endpoint()
    caller = mesh.service(transports=TransportSet([NatsTransport(SHARED_URL), MemoryTransport()]))
    async with make_worker(mesh, endpoint, "stay"), make_worker(mesh, endpoint, "leave"):
        assert {await caller.invoke("nap", 0.0, timeout=5) for _ in range(20)} == {"stay", "leave"}
        router = caller.router
        assert set(router.cached_instances("nap")) == {"stay", "leave"}

        sibling = Reply(503, {"code": "service_unavailable", "payload": {"deployment_id": "leave"}}, rejected=True)
        router._judge("stay", sibling)

        assert set(router.cached_instances("nap")) == {"stay", "leave"}
        assert not router.is_ejected("stay")

        own = Reply(503, {"code": "service_unavailable", "payload": {"deployment_id": "leave"}}, rejected=True)
        router._judge("leave", own)

        assert router.cached_instances("nap") == ("stay",)
        assert router.is_ejected("leave")
        # Calls still go through on the shared subject, where either worker may take them.
        assert {await caller.invoke("nap", 0.0, timeout=5) for _ in range(5)} <= {"stay", "leave"}
