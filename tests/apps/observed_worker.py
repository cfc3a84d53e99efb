"""A worker process for the tracing and metrics tests, with an OpenTelemetry SDK and metrics on.

``python observed_worker.py --id ID --discovery URL --functions relay,leaf [--endpoint URL]
[--metrics-port PORT]``. The process sets the global tracer provider to the SDK's, with an
in-memory exporter, and ``finished_spans`` returns what it recorded, so a test in another process
can check the links between the spans of both sides. Each process serves it as ``spans_<ID>``, so
that a caller can read the spans of one instance.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import BaseModel

from pikku_mq import FunctionRegistry, PikkuWorker, Wire, deployment_service_from_url, pikku_sessionless_func

functions = FunctionRegistry()
exporter = InMemorySpanExporter()


class Message(BaseModel):
    text: str


class Sleepy(BaseModel):
    marker: str
    """A file that the first run creates; that run sleeps ``seconds``, and later runs return at once."""
    seconds: float


@pikku_sessionless_func(expose=True, registry=functions)
async def relay(services: Any, data: Message, wire: Wire) -> str:
    """Call ``leaf`` on another instance and return its result with this instance's id in front."""
    result: str = await wire.rpc.remote("leaf", data)
    return f"{services['deployment_id']}>{result}"


@pikku_sessionless_func(expose=True, registry=functions)
async def leaf(services: Any, data: Message) -> str:
    return f"{services['deployment_id']}:{data.text}"


@pikku_sessionless_func(expose=True, idempotent=True, registry=functions)
async def sleepy_once(services: Any, data: Sleepy) -> str:
    marker = Path(data.marker)
    if not await asyncio.to_thread(marker.exists):
        await asyncio.to_thread(marker.touch)
        await asyncio.sleep(data.seconds)
    return str(services["deployment_id"])


async def finished_spans(services: Any) -> list[dict[str, Any]]:
    """Return the spans this process has finished, oldest first."""
    return [_describe(span) for span in exporter.get_finished_spans()]


def _describe(span: ReadableSpan) -> dict[str, Any]:
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": trace.format_trace_id(context.trace_id),
        "span_id": trace.format_span_id(context.span_id),
        "parent_span_id": trace.format_span_id(span.parent.span_id) if span.parent is not None else None,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--id", required=True, help="deployment id")
    parser.add_argument("--discovery", required=True, help="discovery URL, such as sqlite:///registry.db")
    parser.add_argument("--functions", required=True, help="comma-separated names of the functions to serve")
    parser.add_argument("--endpoint", default="http://127.0.0.1:0", help="endpoint to serve and advertise")
    parser.add_argument("--metrics-port", type=int, help="serve the metrics on this port too (0: a free one)")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)

    pikku_sessionless_func(expose=True, name=f"spans_{args.id}", registry=functions)(finished_spans)
    service = deployment_service_from_url(args.discovery, metrics=True)
    worker = PikkuWorker(
        deployment_id=args.id,
        deployment_service=service,
        registry=functions,
        functions=[*args.functions.split(","), f"spans_{args.id}"],
        services={"deployment_id": args.id},
        endpoint=args.endpoint,
        metrics=True,
        metrics_port=args.metrics_port,
    )
    asyncio.run(serve(worker))


async def serve(worker: PikkuWorker) -> None:
    try:
        await worker.serve_until_signal()
    finally:
        assert worker.deployment_service is not None
        await worker.deployment_service.close()


if __name__ == "__main__":
    main()
