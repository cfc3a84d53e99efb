"""OpenTelemetry spans of calls, and the W3C ``traceparent`` and ``tracestate`` headers that link them.

Needs the ``otel`` extra (opentelemetry-api). A caller records one CLIENT span per call, named after
the function, with one CLIENT child span per attempt, so retries and failovers show as separate
attempts. Each attempt sends its own span context in ``traceparent``/``tracestate``, and the worker
records a SERVER span for the call as a child of that attempt. The function runs with the server span
as its current span, so its nested calls join the same trace.

Spans are recorded only once a tracer provider is set, with
:func:`opentelemetry.trace.set_tracer_provider` or by passing one in. Until then the global provider
is checked at most once per :data:`PROVIDER_CHECK_INTERVAL`. opentelemetry-api 1.45 reads
``os.environ`` in each check, which took about 0.7 µs in a timeit loop on a 2-core VM, more than the
rest of the hooks together.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, MutableMapping

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import ProxyTracerProvider, Span, SpanKind, StatusCode, Tracer, TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

__all__ = [
    "ATTR_ATTEMPT",
    "ATTR_CALL_ID",
    "ATTR_DEPLOYMENT_ID",
    "ATTR_ERROR_CODE",
    "ATTR_FUNCTION",
    "ATTR_STATUS",
    "ATTR_TRANSPORT",
    "PROVIDER_CHECK_INTERVAL",
    "Tracing",
]

# Span attributes. rpc.system and rpc.method follow OpenTelemetry's semantic conventions for RPC.
ATTR_FUNCTION = "pikku_mq.function"
ATTR_TRANSPORT = "pikku_mq.transport"
ATTR_DEPLOYMENT_ID = "pikku_mq.deployment_id"
ATTR_ATTEMPT = "pikku_mq.attempt"
ATTR_CALL_ID = "pikku_mq.call_id"
ATTR_STATUS = "pikku_mq.status"
"""The call's HTTP status code, as every transport carries it."""
ATTR_ERROR_CODE = "pikku_mq.error_code"
"""The ``code`` of the error that ended the call or attempt (see :mod:`pikku_mq._errors`)."""

PROVIDER_CHECK_INTERVAL = 1.0
"""Seconds between two checks for a global tracer provider while none is set, so calls made within a
second of setting one may go untraced."""

_PROPAGATOR = TraceContextTextMapPropagator()
"""W3C Trace Context only, so that the headers on the wire are ``traceparent`` and ``tracestate`` whatever
global propagator the application sets."""


class Tracing:
    """Starts the spans of calls with the tracer of ``provider``, or of the global provider once one is set."""

    def __init__(self, provider: TracerProvider | None = None) -> None:
        self._provider = provider
        self._tracer: Tracer | None = None
        self._next_check = 0.0

    def tracer(self) -> Tracer | None:
        """Return the tracer, or None while no tracer provider is set."""
        if self._tracer is not None:
            return self._tracer
        now = time.monotonic()
        if now < self._next_check:
            return None
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if isinstance(provider, ProxyTracerProvider):
            self._next_check = now + PROVIDER_CHECK_INTERVAL  # the application has not set one (yet)
            return None
        self._tracer = provider.get_tracer("pikku_mq")
        return self._tracer


def start_call_span(tracer: Tracer, function: str, call_id: str) -> Span:
    """Start the CLIENT span of one call across its attempts, as a child of the current span."""
    return tracer.start_span(
        function,
        kind=SpanKind.CLIENT,
        attributes={"rpc.system": "pikku_mq", "rpc.method": function, ATTR_FUNCTION: function, ATTR_CALL_ID: call_id},
    )


def start_attempt_span(
    tracer: Tracer, call_span: Span, function: str, attempt: int, deployment_id: str, call_id: str
) -> Span:
    """Start the CLIENT span of one attempt, as a child of the call's span."""
    return tracer.start_span(
        f"{function} attempt",
        context=trace.set_span_in_context(call_span),
        kind=SpanKind.CLIENT,
        attributes={
            "rpc.system": "pikku_mq",
            "rpc.method": function,
            ATTR_FUNCTION: function,
            ATTR_ATTEMPT: attempt,
            ATTR_DEPLOYMENT_ID: deployment_id,
            ATTR_CALL_ID: call_id,
        },
    )


def inject(span: Span, headers: MutableMapping[str, str]) -> None:
    """Write the span's context to ``headers`` as ``traceparent`` (and ``tracestate`` when it has one)."""
    headers.pop("tracestate", None)  # the headers of an earlier attempt's span
    _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))


def extract(headers: Mapping[str, str]) -> Context:
    """Return the caller's span context from ``traceparent``/``tracestate``; empty if they are missing or invalid."""
    return _PROPAGATOR.extract(headers)


def trace_id_hex(span: Span) -> str | None:
    """Return the span's trace id as 32 lowercase hex digits, or None for a span without a valid context."""
    context = span.get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


def end_span(span: Span, status: int, error_code: str | None, *, error_is_failure: bool = True) -> None:
    """Record the outcome of a call or attempt on ``span`` and end it.

    ``error_is_failure`` False marks only 5xx statuses as failed. OpenTelemetry's semantic conventions
    specify that for SERVER spans, because a 4xx reply is the caller's fault.
    """
    span.set_attribute(ATTR_STATUS, status)
    if error_code is not None:
        span.set_attribute(ATTR_ERROR_CODE, error_code)
        if error_is_failure or status >= 500:
            span.set_status(StatusCode.ERROR, error_code)
    span.end()
