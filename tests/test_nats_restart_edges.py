"""A private nats-server restarted under many calls in flight, and replies at the edges of max_payload."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgpack
import pytest
from _support_core import Mesh, wait_until
from _support_servers import PrivateNats
from test_nats_transport import make_worker, new_prefix

from pikku_mq import PayloadTooLargeError, PikkuMQError, TransportSet
from pikku_mq.transports._nats_wire import header_block_size
from pikku_mq.transports.memory import MemoryTransport
from pikku_mq.transports.nats import NatsTransport

SMALL_MAX_PAYLOAD = 64 * 1024


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


@pytest.fixture
def small_nats(tmp_path: Path) -> Iterator[str]:
    """A nats-server of this test with a max_payload of 64 KiB; yields its URL."""
    server = PrivateNats(tmp_path / "nats.log", max_payload=SMALL_MAX_PAYLOAD)
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


async def test_restart_with_many_calls_in_flight(mesh: Mesh, private_nats: PrivateNats) -> None:
    endpoint = f"{private_nats.url}/{new_prefix()}"
    caller = mesh.service(transports=TransportSet([NatsTransport(private_nats.url), MemoryTransport()]))
    async with make_worker(mesh, endpoint, nats_url=private_nats.url):
        assert await caller.invoke("nap", 0.0, timeout=5) == "n-1"
        in_flight = [asyncio.create_task(caller.invoke("nap", 3.0, timeout=20)) for _ in range(20)]
        await asyncio.sleep(0.3)

        private_nats.stop()
        started = time.monotonic()
        results = await asyncio.gather(*in_flight, return_exceptions=True)
        elapsed = time.monotonic() - started

        assert all(isinstance(result, PikkuMQError) for result in results), results
        assert elapsed < 3.0

        private_nats.start()

        async def served() -> bool:
            try:
                return await caller.invoke("nap", 0.0, timeout=1) == "n-1"
            except PikkuMQError:
                return False

        assert await wait_until(served, timeout=15, interval=0.2) < 15
        after = await asyncio.gather(*(caller.invoke("echo", i, timeout=10) for i in range(50)))
        assert after == list(range(50))


def _reply_size(length: int) -> int:
    return header_block_size({"pikku-status": "200"}) + len(msgpack.packb("x" * length))


async def test_reply_at_max_payload_edges(mesh: Mesh, small_nats: str) -> None:
    largest = max(n for n in range(SMALL_MAX_PAYLOAD - 100, SMALL_MAX_PAYLOAD) if _reply_size(n) <= SMALL_MAX_PAYLOAD)
    endpoint = f"{small_nats}/{new_prefix()}"
    caller = mesh.service(transports=TransportSet([NatsTransport(small_nats), MemoryTransport()]))
    async with make_worker(mesh, endpoint, nats_url=small_nats):
        fast_path_edge = SMALL_MAX_PAYLOAD - 8 * 1024
        for length in (fast_path_edge - 10, fast_path_edge, fast_path_edge + 10, largest - 1, largest):
            assert await caller.invoke("blob", length, timeout=5) == "x" * length, length

        for length in (largest + 1, largest + 2, SMALL_MAX_PAYLOAD):
            with pytest.raises(PayloadTooLargeError) as too_large:
                await caller.invoke("blob", length, timeout=5)
            assert too_large.value.status == 413
            assert too_large.value.payload["max_payload"] == SMALL_MAX_PAYLOAD

        # The worker kept its connection and serves on.
        assert await caller.invoke("echo", "still here", timeout=5) == "still here"
