"""NATS workers in their own processes: presence events, SIGKILL, and the HTTP fallback.

Every test publishes presence on a subject of its own (``PIKKU_NATS_PRESENCE_SUBJECT``, inherited by the
worker processes) and serves on subject prefixes of its own, on the shared nats-server.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from _support_core import Mesh, closed_port, wait_until

from pikku_mq import (
    AiohttpTransport,
    DeploymentService,
    FunctionRegistry,
    PayloadTooLargeError,
    PikkuWorker,
    TransportSet,
    Wire,
    deployment_service_from_url,
    pikku_sessionless_func,
)
from pikku_mq.transports.nats import NatsTransport

if TYPE_CHECKING:
    from conftest import WorkerProcesses

MESH_WORKER = Path(__file__).parent / "apps" / "mesh_worker.py"
SHARED_URL = "nats://127.0.0.1:4222"
MIB = 1024 * 1024

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def size_of(services: Any, data: str) -> int:
    return len(data)


@pikku_sessionless_func(expose=True, registry=REG)
async def relay(services: Any, data: str, wire: Wire) -> int:
    result: int = await wire.rpc.remote("size_of", data)
    return result


@pytest.fixture(autouse=True)
def presence_subject(monkeypatch: pytest.MonkeyPatch) -> str:
    subject = f"pikku_t_{uuid.uuid4().hex[:12]}.presence"
    monkeypatch.setenv("PIKKU_NATS_PRESENCE_SUBJECT", subject)
    return subject


def nats_endpoint() -> str:
    return f"{SHARED_URL}/pikku_t_{uuid.uuid4().hex[:12]}"


async def launch_nats_worker(processes: WorkerProcesses, deployment_id: str) -> None:
    args = ["--functions", "whoami", "--endpoint", nats_endpoint(), "--heartbeat-interval", "0.5"]
    await processes.start(MESH_WORKER, deployment_id, *args, "--heartbeat-ttl", "3")


@pytest.fixture
async def nats_caller(discovery_url: str) -> AsyncIterator[DeploymentService]:
    """A caller on the test's registry that keeps lookups for a minute, so only events change its routing."""
    service = deployment_service_from_url(discovery_url, routing_cache_ttl=60)
    yield service
    await service.close()


async def test_sigterm_leaves_routing_within_100_ms(
    worker_processes: WorkerProcesses, nats_caller: DeploymentService
) -> None:
    await launch_nats_worker(worker_processes, "np-1")
    await launch_nats_worker(worker_processes, "np-2")
    answers = {await nats_caller.invoke("whoami", timeout=5) for _ in range(6)}
    assert answers == {"np-1", "np-2"}

    leaving = worker_processes.workers[0]
    leaving.terminate()
    started = time.monotonic()
    await wait_until(lambda: "np-1" not in nats_caller.router.cached_instances("whoami"), timeout=5, interval=0.002)
    assert time.monotonic() - started < 0.1
    assert {await nats_caller.invoke("whoami", timeout=5) for _ in range(4)} == {"np-2"}
    assert leaving.process.wait(timeout=15) == 0


async def test_sigkill_fails_over_at_once(worker_processes: WorkerProcesses, nats_caller: DeploymentService) -> None:
    await launch_nats_worker(worker_processes, "np-1")
    await launch_nats_worker(worker_processes, "np-2")
    assert {await nats_caller.invoke("whoami", timeout=5) for _ in range(6)} == {"np-1", "np-2"}

    worker_processes.workers[0].kill()
    started = time.monotonic()
    answers = [await nats_caller.invoke("whoami", timeout=5) for _ in range(4)]
    assert answers == ["np-2"] * 4
    # No responders: the dead instance costs one round trip to the broker, never a timeout.
    assert time.monotonic() - started < 0.5


async def test_new_worker_used_at_once(worker_processes: WorkerProcesses, nats_caller: DeploymentService) -> None:
    await launch_nats_worker(worker_processes, "np-1")
    # The first call subscribes to presence, which expires the lookup it made; the second caches it.
    for _ in range(2):
        assert await nats_caller.invoke("whoami", timeout=5) == "np-1"

    await launch_nats_worker(worker_processes, "np-2")
    registered = time.monotonic()

    async def second_answers() -> bool:
        return await nats_caller.invoke("whoami", timeout=5) == "np-2"

    await wait_until(second_answers, timeout=5, interval=0.01)
    assert time.monotonic() - registered < 1.0


# -- HTTP fallback ----------------------------------------------------------------------------------


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


def fallback_worker(mesh: Mesh, **options: Any) -> PikkuWorker:
    return PikkuWorker(
        registry=REG,
        endpoint=nats_endpoint(),
        fallback_endpoints=["http://127.0.0.1:0"],
        deployment_id="nf-1",
        deployment_service=mesh.service(),
        **options,
    )


@pytest.mark.parametrize("size", [2 * MIB, 20 * MIB])
async def test_large_payload_takes_http_fallback(mesh: Mesh, size: int) -> None:
    caller = mesh.service()
    async with fallback_worker(mesh, max_body_size=32 * MIB):
        started = time.monotonic()
        assert await caller.invoke("size_of", "x" * size, timeout=30) == size
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("size", [2 * MIB, 20 * MIB])
async def test_payload_too_large_everywhere_fails_at_once(mesh: Mesh, size: int) -> None:
    caller = mesh.service()
    async with fallback_worker(mesh, max_body_size=MIB):
        started = time.monotonic()
        with pytest.raises(PayloadTooLargeError):
            await caller.invoke("size_of", "x" * size, timeout=30)
        assert time.monotonic() - started < 5


async def test_broker_unreachable_takes_http_fallback(mesh: Mesh) -> None:
    # The caller's broker URL points at a closed port, as when its NATS is down.
    transports = TransportSet([NatsTransport(f"nats://127.0.0.1:{closed_port()}"), AiohttpTransport()])
    caller = mesh.service(transports=transports)
    async with fallback_worker(mesh) as worker:
        answers = [await caller.invoke("size_of", "abc", timeout=10) for _ in range(3)]
        assert answers == [3, 3, 3]
        assert not caller.router.is_ejected("nf-1")
        assert worker.fallback_endpoints[0].startswith("http://127.0.0.1:")


async def test_presence_flushes_before_stop(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    first = PikkuWorker(registry=REG, endpoint=nats_endpoint(), deployment_id="nf-1", deployment_service=mesh.service())
    async with PikkuWorker(
        registry=REG, endpoint=nats_endpoint(), deployment_id="nf-2", deployment_service=mesh.service()
    ):
        await first.start()
        for _ in range(4):
            await caller.invoke("size_of", "a", timeout=5)
        assert set(caller.router.cached_instances("size_of")) == {"nf-1", "nf-2"}
        stopping = asyncio.create_task(first.stop())
        started = time.monotonic()
        await wait_until(lambda: "nf-1" not in caller.router.cached_instances("size_of"), timeout=5, interval=0.002)
        assert time.monotonic() - started < 0.1
        await stopping


async def test_nested_call_uses_worker_nats_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The environment points at a closed port: only the workers' own nats_url reaches the broker.
    monkeypatch.setenv("PIKKU_NATS_URL", f"nats://127.0.0.1:{closed_port()}")
    registry_url = f"sqlite:///{tmp_path / 'registry.db'}"
    options: dict[str, Any] = {"registry": REG, "nats_url": SHARED_URL, "deployment_service": registry_url}
    sizer = PikkuWorker(functions=["size_of"], endpoint=nats_endpoint(), deployment_id="nn-size", **options)
    relayer = PikkuWorker(functions=["relay"], endpoint="http://127.0.0.1:0", deployment_id="nn-relay", **options)
    caller = deployment_service_from_url(registry_url)
    try:
        async with sizer, relayer:
            assert await caller.invoke("relay", "abcd", timeout=10) == 4
    finally:
        await caller.close()


async def test_no_responders_takes_http_fallback(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    async with fallback_worker(mesh) as worker:
        assert await caller.invoke("size_of", "abc", timeout=5) == 3
        # The worker's NATS side goes away while its HTTP side stays: NATS answers "no responders".
        nats_server = worker._servers[0]
        await nats_server.stop()
        started = time.monotonic()
        answers = [await caller.invoke("size_of", "abcd", timeout=5) for _ in range(3)]
        assert answers == [4, 4, 4]
        assert time.monotonic() - started < 1.0
        assert not caller.router.is_ejected("nf-1")


async def test_silent_broker_takes_http_fallback(mesh: Mesh) -> None:
    # Something accepts TCP on the caller's NATS port but never speaks NATS, as a stalled broker does.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"nats://127.0.0.1:{silent.getsockname()[1]}"
        caller = mesh.service(transports=TransportSet([NatsTransport(url), AiohttpTransport()]))
        async with fallback_worker(mesh):
            started = time.monotonic()
            assert await caller.invoke("size_of", "abc", timeout=10) == 3
            first = time.monotonic() - started
            # The failed attempt is remembered, so the next calls skip the broker at once.
            started = time.monotonic()
            assert [await caller.invoke("size_of", "ab", timeout=10) for _ in range(3)] == [2, 2, 2]
            later = time.monotonic() - started
    assert first < 4
    assert later < 0.5
