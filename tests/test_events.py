"""Event handlers and ``rpc.publish`` on NATS JetStream and RabbitMQ, with workers in the test process.

Each test has subjects and streams, or a vhost, of its own on the shared servers (see _support_events).
test_events_processes.py runs workers as processes: groups of two, SIGKILL and broker restarts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _support_core import Mesh, closed_port, wait_until
from _support_events import RecordingTransport, TestBroker, amqp_broker, nats_broker
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pikku_mq import (
    RPC,
    ConfigurationError,
    DeliveryPolicy,
    EndpointUnreachableError,
    FunctionRegistry,
    InputValidationError,
    InternalServerError,
    PikkuWorker,
    TransportSet,
    Wire,
    event_bus_from_url,
    pikku_sessionless_func,
)

REG = FunctionRegistry()

SEEN: list[tuple[str, Any]] = []
"""Runs of the handlers: the handler's name and the event's data."""

FAILURES: list[Any] = []

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pikku_sessionless_func(registry=REG, events=["orders.created"])
async def bill_order(services: Any, data: dict[str, Any]) -> None:
    SEEN.append(("bill_order", data))


@pikku_sessionless_func(registry=REG, events=["orders.created", "orders.*.cancelled"])
async def ship_order(services: Any, data: dict[str, Any], wire: Wire) -> None:
    SEEN.append(("ship_order", data))
    if data.get("call_back"):
        await wire.rpc.remote("echo", data)
        await wire.rpc.notify("echo", data)
        await wire.rpc.publish("orders.shipped", data)


@pikku_sessionless_func(registry=REG, events=["orders.shipped"])
async def track_order(services: Any, data: dict[str, Any]) -> None:
    SEEN.append(("track_order", data))


@pikku_sessionless_func(registry=REG, events=["payments.received"])
async def always_fails(services: Any, data: Any) -> None:
    FAILURES.append(data)
    raise RuntimeError("the ledger is closed")


@pikku_sessionless_func(registry=REG, events=["payments.received"])
async def count_payment(services: Any, data: int) -> None:
    SEEN.append(("count_payment", data))


@pikku_sessionless_func(expose=True, registry=REG)
async def echo(services: Any, data: Any) -> Any:
    return data


@pytest.fixture(autouse=True)
def _clear() -> None:
    SEEN.clear()
    FAILURES.clear()


@pytest.fixture(params=["nats", "amqp"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[TestBroker]:
    created = nats_broker() if request.param == "nats" else amqp_broker()
    try:
        yield created
    finally:
        await created.close()


def seen(handler: str) -> list[Any]:
    return [data for name, data in SEEN if name == handler]


def policy() -> DeliveryPolicy:
    # The first retry waits at least 0.5 s, far longer than five other events take to run.
    return DeliveryPolicy(max_attempts=3, backoff=1.0, max_backoff=2.0)


async def test_event_runs_each_group_once(broker: TestBroker) -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint="memory://events-groups", registry=REG, deployment_service=mesh.service(), events=broker.events_url
        )
        async with worker:
            publisher = event_bus_from_url(broker.events_url)
            try:
                event_id = await publisher.publish("orders.created", {"order": 1})
                await publisher.publish("orders.eu.cancelled", {"order": 2})
                await wait_until(lambda: len(seen("ship_order")) == 2 and seen("bill_order"), timeout=10)
                await asyncio.sleep(0.5)
            finally:
                await publisher.close()

    assert len(event_id) == 32
    assert seen("bill_order") == [{"order": 1}]
    assert sorted(d["order"] for d in seen("ship_order")) == [1, 2]


async def test_failing_handler_dead_letter(broker: TestBroker) -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint="memory://events-dead",
            registry=REG,
            deployment_service=mesh.service(),
            events=broker.events_url,
            delivery=policy(),
        )
        async with worker:
            publisher = event_bus_from_url(broker.events_url)
            try:
                for amount in range(5):
                    await publisher.publish("payments.received", amount)
                # The other group, and the events behind the failing one, are not held up by its retries.
                await wait_until(lambda: len(seen("count_payment")) == 5, timeout=10)
                assert len(FAILURES) < 15

                await wait_until(lambda: len(FAILURES) == 15, timeout=20)
                letters: list[tuple[dict[str, str], Any]] = []

                async def dead_lettered() -> bool:
                    nonlocal letters
                    letters = await broker.dead_letters("always_fails")
                    return len(letters) == 5

                await wait_until(dead_lettered, timeout=10, interval=0.2)
            finally:
                await publisher.close()

    assert sorted(data for _, data in letters) == [0, 1, 2, 3, 4]
    headers = letters[0][0]
    assert headers["pikku-error-class"] == InternalServerError.__name__
    assert "raised RuntimeError" in headers["pikku-error-message"]
    assert headers["pikku-attempts"] == "3"
    assert headers["pikku-failed-by"] == "always_fails"
    assert headers["pikku-subject"] == "payments.received"


async def test_invalid_event_dead_letter_at_once(broker: TestBroker) -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint="memory://events-invalid",
            registry=REG,
            deployment_service=mesh.service(),
            events=broker.events_url,
            delivery=policy(),
        )
        async with worker:
            publisher = event_bus_from_url(broker.events_url)
            try:
                await publisher.publish("payments.received", "not a number")
                letters: list[tuple[dict[str, str], Any]] = []

                async def dead_lettered() -> bool:
                    nonlocal letters
                    letters = await broker.dead_letters("count_payment")
                    return bool(letters)

                await wait_until(dead_lettered, timeout=10, interval=0.2)
            finally:
                await publisher.close()

    assert letters[0][0]["pikku-error-class"] == InputValidationError.__name__
    assert letters[0][0]["pikku-attempts"] == "1"


async def test_handler_calls_carry_trace(broker: TestBroker) -> None:
    async with Mesh() as mesh:
        recording = RecordingTransport()
        handler_service = mesh.service(transports=TransportSet([recording]))
        echo_worker = PikkuWorker(
            endpoint="memory://events-echo",
            functions=["echo"],
            registry=REG,
            deployment_service=mesh.service(),
        )
        worker = PikkuWorker(
            endpoint="memory://events-trace",
            functions=["ship_order", "track_order"],
            registry=REG,
            deployment_service=handler_service,
            events=broker.events_url,
        )
        async with echo_worker, worker:
            publisher = event_bus_from_url(broker.events_url)
            try:
                headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=1"}
                await publisher.publish("orders.created", {"call_back": True}, trace_id="trace-7", headers=headers)
                await wait_until(lambda: seen("track_order"), timeout=10)
                await wait_until(lambda: len(recording.sent) == 2, timeout=5)
            finally:
                await publisher.close()

    assert [name for name, _ in recording.sent] == ["echo", "echo"]
    for _, sent in recording.sent:
        assert sent["traceparent"] == TRACEPARENT
        assert sent["tracestate"] == "vendor=1"
        assert sent["x-request-id"] == "trace-7"
    assert "pikku-one-way" in recording.sent[1][1]


async def test_handler_span_continues_event_trace(broker: TestBroker) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    async with Mesh() as mesh:
        echo_worker = PikkuWorker(
            endpoint="memory://events-span-echo", functions=["echo"], registry=REG, deployment_service=mesh.service()
        )
        worker = PikkuWorker(
            endpoint="memory://events-span",
            functions=["ship_order", "track_order"],
            registry=REG,
            deployment_service=mesh.service(tracing=provider),
            events=broker.events_url,
            tracing=provider,
        )
        async with echo_worker, worker:
            publisher = event_bus_from_url(broker.events_url)
            try:
                await publisher.publish("orders.created", {"call_back": True}, headers={"traceparent": TRACEPARENT})
                await wait_until(lambda: seen("track_order"), timeout=10)
            finally:
                await publisher.close()

    spans = list(exporter.get_finished_spans())
    handler = [span for span in spans if span.name == "ship_order" and span.kind == SpanKind.SERVER]
    echo_calls = [span for span in spans if span.name == "echo" and span.kind == SpanKind.CLIENT]
    assert len(handler) == 1
    assert handler[0].parent is not None
    assert trace.format_span_id(handler[0].parent.span_id) == TRACEPARENT.split("-")[2]
    assert trace.format_trace_id(handler[0].context.trace_id) == TRACEPARENT.split("-")[1]
    assert handler[0].attributes is not None
    assert handler[0].attributes["pikku_mq.transport"] == broker.kind
    assert len(echo_calls) == 1
    assert echo_calls[0].context.trace_id == handler[0].context.trace_id


async def test_publish_without_event_bus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIKKU_EVENTS_URL", raising=False)
    async with Mesh() as mesh:
        rpc = RPC(deployment_service=mesh.service())
        with pytest.raises(ConfigurationError, match="PIKKU_EVENTS_URL"):
            await rpc.publish("orders.created", {})


@pytest.mark.parametrize("url", ["nats://127.0.0.1:{port}/events", "amqp://guest:guest@127.0.0.1:{port}/%2F"])
async def test_publish_broker_unreachable(url: str) -> None:
    bus = event_bus_from_url(url.format(port=closed_port()))
    try:
        with pytest.raises(EndpointUnreachableError, match="cannot connect"):
            await bus.publish("orders.created", {}, timeout=5)
    finally:
        await bus.close()


@pytest.mark.parametrize("subject", ["", "orders..created", "orders.*", "orders created", "orders.>"])
async def test_publish_invalid_subject(subject: str) -> None:
    bus = event_bus_from_url("nats://127.0.0.1:4222/pikku-unused")
    with pytest.raises(ConfigurationError, match="subject"):
        await bus.publish(subject, {})


@pytest.mark.parametrize("events", [["orders..created"], ["a.>.b"], ["orders created"], ["x", "x"]])
def test_handler_invalid_subject(events: list[str]) -> None:
    with pytest.raises(ConfigurationError, match="subject"):

        @pikku_sessionless_func(registry=FunctionRegistry(), events=events)
        async def handler(services: Any, data: Any) -> None:
            return None
