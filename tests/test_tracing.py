"""OpenTelemetry tracing: spans on both sides of a call, linked by W3C trace context on every transport.

The process tests run a caller in this process and two worker processes (tests/apps/observed_worker.py),
each with the SDK's in-memory exporter, and compare the spans that the three recorded.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from _support_amqp import amqp_endpoint
from _support_core import Mesh, closed_port
from _support_workers import WorkerProcesses
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, TraceState

from pikku_mq import (
    DeploymentConfig,
    DeploymentService,
    EndpointUnreachableError,
    FunctionNotFoundError,
    FunctionRegistry,
    PikkuWorker,
    RetryPolicy,
    Wire,
    deployment_service_from_url,
    pikku_sessionless_func,
)
from pikku_mq._types import CallRequest
from pikku_mq.transports.base import Reply

pytestmark = pytest.mark.timeout(120)

OBSERVED_WORKER = Path(__file__).parent / "apps" / "observed_worker.py"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> TracerProvider:
    """A tracer provider of this test only; the global one stays unset."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


@pytest.fixture
async def traced_caller(discovery_url: str, provider: TracerProvider) -> AsyncIterator[DeploymentService]:
    service = deployment_service_from_url(discovery_url, tracing=provider)
    await service.init()
    yield service
    await service.close()


def _endpoint_factory(transport: str, request: pytest.FixtureRequest) -> Callable[[], str]:
    if transport == "nats":
        return lambda: f"nats://127.0.0.1:4222/pikku_t_{uuid.uuid4().hex[:12]}"
    if transport == "amqp":
        vhost = request.getfixturevalue("amqp_vhost")
        return lambda: amqp_endpoint(vhost)
    return lambda: "http://127.0.0.1:0"


def _hex(span_id: int) -> str:
    return trace.format_span_id(span_id)


def _by_name(spans: list[dict[str, Any]], name: str, kind: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["name"] == name and s["kind"] == kind]


@pytest.mark.parametrize("transport", ["http", "nats", "amqp"])
async def test_trace_crosses_two_workers(
    transport: str,
    request: pytest.FixtureRequest,
    worker_processes: WorkerProcesses,
    traced_caller: DeploymentService,
    exporter: InMemorySpanExporter,
) -> None:
    endpoint = _endpoint_factory(transport, request)
    await worker_processes.start(OBSERVED_WORKER, "trace-a", "--functions", "relay", "--endpoint", endpoint())
    await worker_processes.start(OBSERVED_WORKER, "trace-b", "--functions", "leaf", "--endpoint", endpoint())

    assert await traced_caller.invoke("relay", {"text": "hi"}, timeout=15) == "trace-a>trace-b:hi"

    # The caller: one call span and one attempt span, which the worker's server span continues.
    caller_spans = list(exporter.get_finished_spans())
    call = _only(caller_spans, "relay", SpanKind.CLIENT)
    attempt = _only(caller_spans, "relay attempt", SpanKind.CLIENT)
    trace_id = trace.format_trace_id(call.context.trace_id)
    assert call.parent is None
    assert attempt.parent is not None
    assert attempt.parent.span_id == call.context.span_id
    assert call.attributes is not None
    assert call.attributes["pikku_mq.function"] == "relay"
    assert call.attributes["pikku_mq.transport"] == transport
    assert call.attributes["pikku_mq.status"] == 200
    assert call.status.status_code == StatusCode.UNSET
    assert attempt.attributes is not None
    assert attempt.attributes["pikku_mq.attempt"] == 1
    assert attempt.attributes["pikku_mq.deployment_id"] == "trace-a"
    assert attempt.attributes["pikku_mq.transport"] == transport
    assert attempt.attributes["pikku_mq.status"] == 200

    # Worker A: a server span under the caller's attempt, and its own call to leaf under that.
    spans_a = [s for s in await traced_caller.invoke("spans_trace-a", timeout=15) if s["trace_id"] == trace_id]
    served_a = _one(_by_name(spans_a, "relay", "SERVER"))
    assert served_a["parent_span_id"] == _hex(attempt.context.span_id)
    assert served_a["attributes"]["pikku_mq.transport"] == transport
    assert served_a["attributes"]["pikku_mq.deployment_id"] == "trace-a"
    assert served_a["attributes"]["pikku_mq.status"] == 200
    assert served_a["attributes"]["pikku_mq.call_id"] == call.attributes["pikku_mq.call_id"]
    nested_call = _one(_by_name(spans_a, "leaf", "CLIENT"))
    nested_attempt = _one(_by_name(spans_a, "leaf attempt", "CLIENT"))
    assert nested_call["parent_span_id"] == served_a["span_id"]
    assert nested_attempt["parent_span_id"] == nested_call["span_id"]
    assert nested_attempt["attributes"]["pikku_mq.deployment_id"] == "trace-b"

    # Worker B: a server span under worker A's attempt, in the same trace.
    spans_b = [s for s in await traced_caller.invoke("spans_trace-b", timeout=15) if s["trace_id"] == trace_id]
    served_b = _one(_by_name(spans_b, "leaf", "SERVER"))
    assert served_b["parent_span_id"] == nested_attempt["span_id"]
    assert served_b["attributes"]["pikku_mq.deployment_id"] == "trace-b"
    assert served_b["attributes"]["pikku_mq.transport"] == transport


async def test_retry_shows_two_attempt_spans(
    worker_processes: WorkerProcesses,
    discovery_url: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
    tmp_path: Path,
) -> None:
    await worker_processes.start(OBSERVED_WORKER, "trace-r", "--functions", "sleepy_once")
    # The first attempt sleeps 5 s, five times the attempt timeout, so it certainly times out.
    caller = deployment_service_from_url(discovery_url, tracing=provider, retry=RetryPolicy(attempt_timeout=1.0))
    try:
        data = {"marker": str(tmp_path / "slept"), "seconds": 5.0}
        assert await caller.invoke("sleepy_once", data, idempotent=True, timeout=15) == "trace-r"

        spans = list(exporter.get_finished_spans())
        call = _only(spans, "sleepy_once", SpanKind.CLIENT)
        attempts = sorted(
            (s for s in spans if s.name == "sleepy_once attempt"),
            key=lambda s: s.attributes["pikku_mq.attempt"],  # type: ignore[index]
        )
        assert [s.attributes["pikku_mq.attempt"] for s in attempts] == [1, 2]  # type: ignore[index]
        assert all(s.parent is not None and s.parent.span_id == call.context.span_id for s in attempts)
        assert attempts[0].status.status_code == StatusCode.ERROR
        assert attempts[0].attributes["pikku_mq.error_code"] == "deadline_exceeded"  # type: ignore[index]
        assert attempts[1].status.status_code == StatusCode.UNSET
        assert attempts[1].attributes["pikku_mq.status"] == 200  # type: ignore[index]

        # The worker served each attempt in a span of its own, under that attempt's span.
        trace_id = trace.format_trace_id(call.context.trace_id)
        served = [
            s
            for s in await caller.invoke("spans_trace-r", timeout=15)
            if s["trace_id"] == trace_id and s["kind"] == "SERVER"
        ]
        assert sorted(s["parent_span_id"] for s in served) == sorted(_hex(s.context.span_id) for s in attempts)
    finally:
        await caller.close()


# -- in one process ------------------------------------------------------------------------------

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def trace_ids(services: Any, data: Any, wire: Wire) -> str:
    return wire.trace_id


class _HeaderRecorder:
    """Wraps a transport's ``call`` and keeps the headers of every request it sends."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

    def wrap(self, service: DeploymentService) -> None:
        transport = service.router.transports.for_endpoint("memory://x")
        assert transport is not None
        inner = transport.call

        async def call(endpoint: str, request: CallRequest, timeout: float) -> Reply:
            self.headers.append(dict(request.headers))
            return await inner(endpoint, request, timeout)

        transport.call = call  # type: ignore[method-assign]


async def test_traceparent_names_attempt_span(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint="memory://traced", deployment_service=mesh.service(), registry=REG, tracing=provider
        )
        caller = mesh.service(tracing=provider)
        recorder = _HeaderRecorder()
        recorder.wrap(caller)
        async with worker:
            request_id = await caller.invoke("trace_ids", None, timeout=5)

    attempt = _only(list(exporter.get_finished_spans()), "trace_ids attempt", SpanKind.CLIENT)
    context = attempt.context
    sent = recorder.headers[0]["traceparent"]
    assert sent == f"00-{trace.format_trace_id(context.trace_id)}-{_hex(context.span_id)}-{context.trace_flags:02x}"
    # Without an x-request-id of its own, the call's request id is its trace id, so logs name the trace.
    assert request_id == trace.format_trace_id(context.trace_id)
    server = _only(list(exporter.get_finished_spans()), "trace_ids", SpanKind.SERVER)
    assert server.attributes is not None
    assert server.attributes["pikku_mq.transport"] == "memory"


@pytest.mark.parametrize("transport", ["http", "nats", "amqp"])
async def test_tracestate_reaches_worker(
    transport: str,
    request: pytest.FixtureRequest,
    discovery_url: str,
    provider: TracerProvider,
    exporter: InMemorySpanExporter,
) -> None:
    # A remote parent with vendor data in its tracestate, as an incoming request of the caller would have.
    parent = trace.SpanContext(
        trace_id=0x0AF7651916CD43DD8448EB211C80319C,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
        trace_state=TraceState([("vendor", "value42")]),
    )
    worker = PikkuWorker(
        endpoint=_endpoint_factory(transport, request)(),
        deployment_service=deployment_service_from_url(discovery_url, tracing=provider),
        registry=REG,
        tracing=provider,
    )
    caller = deployment_service_from_url(discovery_url, tracing=provider)
    await caller.init()
    try:
        async with worker:
            with trace.use_span(trace.NonRecordingSpan(parent)):
                trace_id = await caller.invoke("trace_ids", None, timeout=10)
    finally:
        await caller.close()

    assert trace_id == trace.format_trace_id(parent.trace_id)
    spans = list(exporter.get_finished_spans())
    attempt = _only(spans, "trace_ids attempt", SpanKind.CLIENT)
    server = _only(spans, "trace_ids", SpanKind.SERVER)
    assert server.parent is not None
    assert server.parent.span_id == attempt.context.span_id
    assert server.context.trace_id == parent.trace_id
    assert server.context.trace_state.get("vendor") == "value42"


async def test_no_provider_sends_no_traceparent() -> None:
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)  # no test sets the global one
    async with Mesh() as mesh:
        worker = PikkuWorker(endpoint="memory://untraced", deployment_service=mesh.service(), registry=REG)
        caller = mesh.service()
        recorder = _HeaderRecorder()
        recorder.wrap(caller)
        async with worker:
            await caller.invoke("trace_ids", None, timeout=5)

    assert "traceparent" not in recorder.headers[0]
    assert "tracestate" not in recorder.headers[0]


async def test_unknown_function_span_name(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint="memory://unknown", deployment_service=mesh.service(), registry=REG, tracing=provider
        )
        async with worker:
            outcome = await worker.dispatcher.handle("no_such_function", None, {}, "memory")

    assert isinstance(outcome.error, FunctionNotFoundError)
    server = _only(list(exporter.get_finished_spans()), "(unknown)", SpanKind.SERVER)
    assert server.attributes is not None
    assert server.attributes["pikku_mq.status"] == 404
    assert server.attributes["pikku_mq.error_code"] == outcome.error.code
    # A 4xx reply is the caller's fault, so the server span is not marked failed.
    assert server.status.status_code == StatusCode.UNSET


async def test_failover_shows_two_attempt_spans(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(endpoint="memory://live", deployment_service=mesh.service(), registry=REG)
        dead = mesh.service()
        await dead.start(DeploymentConfig("dead", f"http://127.0.0.1:{closed_port()}", functions=["trace_ids"]))
        caller = mesh.service(tracing=provider)
        async with worker:
            # Round-robin sends one of the first two calls to the dead instance first, then ejects it.
            for _ in range(2):
                await caller.invoke("trace_ids", None, timeout=5)

    spans = list(exporter.get_finished_spans())
    calls = [s for s in spans if s.name == "trace_ids" and s.kind == SpanKind.CLIENT]
    assert len(calls) == 2
    moved = [
        c for c in calls if sum(1 for s in spans if s.parent is not None and s.parent.span_id == c.context.span_id) == 2
    ]
    assert len(moved) == 1
    attempts = sorted(
        (s for s in spans if s.parent is not None and s.parent.span_id == moved[0].context.span_id),
        key=lambda s: s.attributes["pikku_mq.attempt"],  # type: ignore[index]
    )
    first, second = (s.attributes for s in attempts)
    assert first is not None
    assert second is not None
    assert first["pikku_mq.deployment_id"] == "dead"
    assert first["pikku_mq.transport"] == "http"
    assert first["pikku_mq.error_code"] == EndpointUnreachableError.code
    assert second["pikku_mq.deployment_id"] != "dead"
    assert second["pikku_mq.transport"] == "memory"
    assert second["pikku_mq.status"] == 200


def _only(spans: list[ReadableSpan], name: str, kind: SpanKind) -> ReadableSpan:
    matching = [s for s in spans if s.name == name and s.kind == kind]
    assert len(matching) == 1, f"expected one {kind.name} span {name!r}, got {[(s.name, s.kind.name) for s in spans]}"
    return matching[0]


def _one(spans: list[dict[str, Any]]) -> dict[str, Any]:
    assert len(spans) == 1, spans
    return spans[0]
