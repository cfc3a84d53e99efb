"""The transport contract: the same calls give the same results and errors on every transport.

Each case runs a real :class:`PikkuWorker` serving one endpoint of the transport under test, and a
caller that reaches it through discovery (an in-memory registry shared by both). ``ENDPOINTS`` maps
each transport to a function that returns a fresh endpoint of the test's own (its own port, subject
prefix or queue; AMQP queues live in the session's own vhost), so tests never see each other's traffic.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from _support_amqp import amqp_endpoint
from _support_core import Mesh, wait_until
from pydantic import BaseModel

from pikku_mq import (
    BusyError,
    DeadlineExceededError,
    FunctionNotFoundError,
    FunctionRegistry,
    InputValidationError,
    PikkuMQError,
    PikkuWorker,
    RoutingError,
    Wire,
    pikku_sessionless_func,
)

REG = FunctionRegistry()


class ParcelRejectedError(PikkuMQError):
    status = 409
    code = "parcel_rejected"


class Parcel(BaseModel):
    label: str
    weight: float


@pikku_sessionless_func(expose=True, registry=REG)
async def echo(services: Any, data: Any) -> Any:
    return data


@pikku_sessionless_func(expose=True, registry=REG)
async def nothing(services: Any, data: Any) -> None:
    return None


@pikku_sessionless_func(expose=True, registry=REG)
async def weigh(services: Any, data: Parcel) -> dict[str, Any]:
    if data.weight > 100:
        raise ParcelRejectedError(f"parcel {data.label} is too heavy", payload={"weight": data.weight})
    return {"label": data.label, "grams": data.weight * 1000}


@pikku_sessionless_func(expose=True, registry=REG)
async def nap(services: Any, data: float) -> str:
    await asyncio.sleep(data)
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def trace(services: Any, data: Any, wire: Wire) -> dict[str, Any]:
    return {"trace_id": wire.trace_id, "hop": wire.hop, "remaining_ok": 0 < (wire.remaining or 0) <= 30}


@pikku_sessionless_func(expose=False, registry=REG)
async def hidden(services: Any, data: Any) -> str:
    return "hidden"


def _memory_endpoint() -> str:
    return f"memory://contract-{uuid.uuid4().hex[:12]}"


def _http_endpoint() -> str:
    return "http://127.0.0.1:0"


def _nats_endpoint() -> str:
    # The shared nats-server of the test machine; each worker gets a subject prefix of its own.
    return f"nats://127.0.0.1:4222/pikku_t_{uuid.uuid4().hex[:12]}"


def _amqp_endpoint() -> str:
    return amqp_endpoint()


ENDPOINTS: dict[str, Callable[[], str]] = {
    "memory": _memory_endpoint,
    "http": _http_endpoint,
    "nats": _nats_endpoint,
    "amqp": _amqp_endpoint,
}
"""A fresh endpoint of each transport, for one worker."""


@pytest.fixture(params=sorted(ENDPOINTS))
def transport(request: pytest.FixtureRequest) -> str:
    if request.param == "amqp":
        request.getfixturevalue("amqp_vhost")  # the session's own vhost on the shared RabbitMQ
    return str(request.param)


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


def make_worker(mesh: Mesh, transport: str, deployment_id: str = "t-1", **options: Any) -> PikkuWorker:
    return PikkuWorker(
        registry=REG,
        endpoint=ENDPOINTS[transport](),
        deployment_id=deployment_id,
        services=deployment_id,
        deployment_service=mesh.service(),
        **options,
    )


async def test_round_trip_values(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    values: list[Any] = [
        0,
        -(2**53),
        1.5,
        True,
        "",
        "grüße 🚀 \u0000 end",
        [1, "two", None, [3.0]],
        {"nested": {"list": [1, 2], "empty": {}}, "unicode ключ": "значение"},
        None,
    ]
    async with make_worker(mesh, transport):
        for value in values:
            assert await caller.invoke("echo", value, timeout=5) == value


async def test_none_result(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    async with make_worker(mesh, transport):
        assert await caller.invoke("nothing", {"ignored": 1}, timeout=5) is None


async def test_large_payload(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    payload = {"blob": "x" * 200_000, "items": list(range(5_000))}
    async with make_worker(mesh, transport):
        assert await caller.invoke("echo", payload, timeout=10) == payload


async def test_validated_input_and_output(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    async with make_worker(mesh, transport):
        assert await caller.invoke("weigh", {"label": "a", "weight": 2.5}, timeout=5) == {"label": "a", "grams": 2500.0}
        with pytest.raises(InputValidationError) as invalid:
            await caller.invoke("weigh", {"label": "a", "weight": "heavy"}, timeout=5)
    assert invalid.value.status == 422
    assert "weight" in invalid.value.message


async def test_typed_error_re_raised(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    async with make_worker(mesh, transport):
        with pytest.raises(ParcelRejectedError) as rejected:
            await caller.invoke("weigh", {"label": "crate", "weight": 500}, timeout=5)
    assert rejected.value.message == "parcel crate is too heavy"
    assert rejected.value.payload == {"weight": 500.0}
    assert rejected.value.code == "parcel_rejected"


async def test_hidden_function_not_found(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    async with make_worker(mesh, transport):
        with pytest.raises(FunctionNotFoundError):
            await caller.invoke("hidden", None, timeout=5)
        with pytest.raises(FunctionNotFoundError):
            await caller.invoke("no_such_function", None, timeout=5)


async def test_metadata_carried(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    async with make_worker(mesh, transport):
        seen = await caller.invoke("trace", None, trace_id="trace-contract-1", timeout=5)
    assert seen == {"trace_id": "trace-contract-1", "hop": 1, "remaining_ok": True}


async def test_deadline_honoured(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    async with make_worker(mesh, transport):
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError):
            await caller.invoke("nap", 5.0, timeout=0.3)
        elapsed = time.monotonic() - started
    assert 0.25 < elapsed < 1.5


async def test_no_head_of_line_blocking(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    async with make_worker(mesh, transport, max_concurrency=10):
        await caller.invoke("nap", 0.0, timeout=5)
        started = time.monotonic()
        results = await asyncio.gather(*(caller.invoke("nap", 0.1, timeout=10) for _ in range(50)))
        elapsed = time.monotonic() - started
    assert results == ["t-1"] * 50
    # Five waves of ten 100 ms calls; one call at a time would take 5 s.
    assert 0.45 < elapsed < 1.5


async def test_busy_reply(mesh: Mesh, transport: str) -> None:
    caller = mesh.service()
    async with make_worker(mesh, transport, max_concurrency=1, max_in_flight=1) as worker:
        held = asyncio.create_task(caller.invoke("nap", 1.0, timeout=10))
        await wait_until(lambda: worker.dispatcher.in_flight == 1, timeout=5)
        started = time.monotonic()
        with pytest.raises(BusyError):
            await caller.invoke("nap", 0.0, timeout=10)
        assert time.monotonic() - started < 0.5
        assert await held == "t-1"


async def test_stopped_worker_skipped(mesh: Mesh, transport: str) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    first = make_worker(mesh, transport, "t-1")
    second = make_worker(mesh, transport, "t-2")
    async with second:
        await first.start()
        answers = {await caller.invoke("nap", 0.0, timeout=5) for _ in range(4)}
        assert answers == {"t-1", "t-2"}
        await first.stop()

        # The caller's cache still lists t-1: the transport must report it gone at once.
        started = time.monotonic()
        answers = {await caller.invoke("nap", 0.0, timeout=5) for _ in range(4)}
        assert answers == {"t-2"}
        assert time.monotonic() - started < 2.0


async def test_only_stopped_worker_fails_fast(mesh: Mesh, transport: str) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    worker = make_worker(mesh, transport)
    async with worker:
        assert await caller.invoke("nap", 0.0, timeout=5) == "t-1"
    started = time.monotonic()
    with pytest.raises((RoutingError, FunctionNotFoundError)):
        await caller.invoke("nap", 0.0, timeout=5)
    assert time.monotonic() - started < 2.0
