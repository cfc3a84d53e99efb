"""Tracing and metrics around calls: the hooks that the router and the dispatcher call when either is on.

The router keeps a :class:`Telemetry` only when tracing or metrics may be on, and asks it for a
:class:`CallObservation` per call. When the ``otel`` extra is installed but no tracer provider is set
and metrics are off, that costs a clock reading per call (see :class:`~pikku_mq._tracing.Tracing`).
Without the extra and with metrics off, the router and the dispatcher keep None and skip every hook.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from ._errors import ConfigurationError, EndpointUnreachableError, PayloadTooLargeError, PikkuMQError
from ._settings import ENV_METRICS
from ._types import HEADER_CALL_ID, HEADER_REQUEST_ID

if TYPE_CHECKING:
    from opentelemetry.trace import Span, Tracer, TracerProvider

    from ._dispatch import Outcome
    from ._metrics import PikkuMetrics
    from ._tracing import Tracing
    from ._types import DeploymentInfo

__all__ = ["UNKNOWN_FUNCTION", "CallObservation", "Telemetry", "make_telemetry", "transport_of"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"", "0", "false", "no", "off"})

UNKNOWN_FUNCTION = "(unknown)"
"""The ``function`` label of calls to a function that the worker does not serve."""

_NO_TRANSPORT = "none"
"""The ``transport`` label of a call that ended before any attempt was sent."""

_TRANSPORTS = {"http": "http", "https": "http", "nats": "nats", "amqp": "amqp", "amqps": "amqp", "memory": "memory"}


def transport_of(endpoint: str) -> str:
    """Return the transport label of an endpoint URL: http, nats, amqp or memory."""
    scheme = endpoint.partition(":")[0].lower()
    return _TRANSPORTS.get(scheme, "other")


def make_telemetry(tracing: TracerProvider | bool | None, metrics: PikkuMetrics | bool | None) -> Telemetry | None:
    """Build the telemetry of a ``tracing=`` and a ``metrics=`` option, or return None when both are off.

    ``tracing`` None traces when opentelemetry-api is installed and a tracer provider is set, True
    requires opentelemetry-api, a provider traces with it, and False turns tracing off. ``metrics``
    None follows ``PIKKU_METRICS``; True uses the global Prometheus registry.

    Raises :class:`ConfigurationError` when ``PIKKU_METRICS`` is set to an unknown value.
    """
    tracer = _tracing_option(tracing)
    if metrics is None:
        metrics = _metrics_from_env()
    recorder = _metrics_option(metrics)
    if tracer is None and recorder is None:
        return None
    return Telemetry(tracer, recorder)


def _tracing_option(tracing: TracerProvider | bool | None) -> Tracing | None:
    if tracing is False:
        return None
    try:
        from ._tracing import Tracing
    except ImportError as exc:
        if tracing is None:
            return None
        raise ConfigurationError(
            f"tracing needs opentelemetry-api, which failed to import ({exc}); install it with "
            "pip install 'pikku-mq[otel]'"
        ) from None
    return Tracing(None if tracing is None or tracing is True else tracing)


def _metrics_from_env() -> bool:
    raw = os.environ.get(ENV_METRICS, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(
        f"{ENV_METRICS} must be 1, true, yes or on to turn metrics on, or 0, false, no, off or empty to leave "
        f"them off, got {raw[:20]!r}"
    )


def _metrics_option(metrics: PikkuMetrics | bool) -> PikkuMetrics | None:
    if metrics is False:
        return None
    from ._metrics import PikkuMetrics

    if metrics is True:
        return PikkuMetrics.default()
    if not isinstance(metrics, PikkuMetrics):
        raise ConfigurationError(f"metrics must be a PikkuMetrics, True, False or None, got {type(metrics).__name__}")
    return metrics


class Telemetry:
    """The tracing and the metrics of one router or dispatcher; either may be None."""

    __slots__ = ("metrics", "tracing")

    def __init__(self, tracing: Tracing | None, metrics: PikkuMetrics | None) -> None:
        self.tracing = tracing
        self.metrics = metrics

    def recording(self) -> bool:
        """Return whether metrics are on or a tracer provider is set, so that calls are recorded."""
        return self.metrics is not None or (self.tracing is not None and self.tracing.tracer() is not None)

    # -- caller side -------------------------------------------------------------------------------

    def observe_call(self, function: str, call_id: str) -> CallObservation | None:
        """Begin observing one call, or return None when nothing records it."""
        tracer = self.tracing.tracer() if self.tracing is not None else None
        if tracer is None and self.metrics is None:
            return None
        return CallObservation(tracer, self.metrics, function, call_id)

    def heartbeat_failed(self) -> None:
        if self.metrics is not None:
            self.metrics.heartbeat_failures.inc()

    # -- worker side -------------------------------------------------------------------------------

    async def serve(
        self,
        handle: Callable[[str, Any, Mapping[str, str]], Awaitable[Outcome]],
        name: str,
        data: Any,
        headers: Mapping[str, str],
        transport: str,
        function: str,
        deployment_id: str,
    ) -> Outcome:
        """Run ``handle`` for one call in a SERVER span that continues the caller's trace, and count it.

        ``function`` is the name to record, which the dispatcher bounds to the functions it serves.
        """
        tracer = self.tracing.tracer() if self.tracing is not None else None
        metrics = self.metrics
        if tracer is None and metrics is None:
            return await handle(name, data, headers)

        if metrics is not None:
            in_flight = metrics.server_in_flight.labels(function, transport)
            in_flight.inc()
        started = time.perf_counter()
        try:
            if tracer is None:
                outcome = await handle(name, data, headers)
            else:
                outcome = await _serve_traced(tracer, handle, name, data, headers, transport, function, deployment_id)
        finally:
            if metrics is not None:
                in_flight.dec()

        if metrics is not None:
            metrics.server_calls.labels(function, transport).inc()
            metrics.server_duration.labels(function, transport).observe(time.perf_counter() - started)
            if outcome.error is not None:
                metrics.server_errors.labels(function, transport, outcome.error.code).inc()
        return outcome


async def _serve_traced(
    tracer: Tracer,
    handle: Callable[[str, Any, Mapping[str, str]], Awaitable[Outcome]],
    name: str,
    data: Any,
    headers: Mapping[str, str],
    transport: str,
    function: str,
    deployment_id: str,
) -> Outcome:
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    from . import _tracing

    span = tracer.start_span(
        function,
        context=_tracing.extract(headers),
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system": "pikku_mq",
            "rpc.method": function,
            _tracing.ATTR_FUNCTION: function,
            _tracing.ATTR_TRANSPORT: transport,
            _tracing.ATTR_DEPLOYMENT_ID: deployment_id,
            _tracing.ATTR_CALL_ID: headers.get(HEADER_CALL_ID, "")[:200],
        },
    )
    if not headers.get(HEADER_REQUEST_ID):
        # A caller without the header (a plain client of the transport) gets the trace id as its request id,
        # so the function's log records name the same trace as its spans.
        trace_id = _tracing.trace_id_hex(span)
        if trace_id is not None:
            headers = {**headers, HEADER_REQUEST_ID: trace_id}
    outcome: Outcome | None = None
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=False, set_status_on_exception=False):
            outcome = await handle(name, data, headers)
    finally:
        if outcome is None:
            _tracing.end_span(span, 500, "cancelled")
        elif outcome.error is not None:
            _tracing.end_span(span, outcome.error.http_status, outcome.error.code, error_is_failure=False)
        else:
            _tracing.end_span(span, 200, None)
    return outcome


class CallObservation:
    """The span and the metrics of one call on the caller's side, across its attempts."""

    __slots__ = ("_attempt_span", "_metrics", "_span", "_started", "_tracer", "function", "transport")

    def __init__(self, tracer: Tracer | None, metrics: PikkuMetrics | None, function: str, call_id: str) -> None:
        self._tracer = tracer
        self._metrics = metrics
        self.function = function
        self.transport = _NO_TRANSPORT
        """The transport of the latest attempt."""
        self._span: Span | None = None
        self._attempt_span: Span | None = None
        if tracer is not None:
            from ._tracing import start_call_span

            self._span = start_call_span(tracer, function, call_id)
        self._started = 0.0

    @property
    def trace_id(self) -> str | None:
        """The trace id of the call's span as 32 hex digits, or None when the call is not traced."""
        if self._span is None:
            return None
        from ._tracing import trace_id_hex

        return trace_id_hex(self._span)

    async def run(self, send: Callable[[], Awaitable[Any]]) -> Any:
        """Await ``send`` (the whole call), record its result or error, and return or raise it."""
        metrics = self._metrics
        if metrics is not None:
            in_flight = metrics.client_in_flight.labels(self.function)
            in_flight.inc()
        self._started = time.perf_counter()
        status: int = 500
        code: str | None = "cancelled"
        try:
            result = await send()
            status, code = 200, None
            return result
        except PikkuMQError as exc:
            status, code = exc.http_status, exc.code
            raise
        finally:
            if metrics is not None:
                in_flight.dec()
                self._count(metrics, code)
            if self._span is not None:
                from ._tracing import ATTR_TRANSPORT, end_span

                self._span.set_attribute(ATTR_TRANSPORT, self.transport)
                end_span(self._span, status, code)

    def _count(self, metrics: PikkuMetrics, code: str | None) -> None:
        function, transport = self.function, self.transport
        metrics.client_calls.labels(function, transport).inc()
        metrics.client_duration.labels(function, transport).observe(time.perf_counter() - self._started)
        if code is not None:
            metrics.client_errors.labels(function, transport, code).inc()

    async def attempt(
        self, send: Callable[[DeploymentInfo, Any], Awaitable[Any]], instance: DeploymentInfo, call: Any, number: int
    ) -> Any:
        """Await ``send`` (one attempt to ``instance``) in an attempt span, and record its outcome.

        ``send`` returns a :class:`~pikku_mq.transports.base.Reply`, or raises the errors of
        ``Router._attempt``; an uncertain failure carries its error in ``.error``.
        """
        span = None
        if self._span is not None:
            from ._tracing import start_attempt_span

            span = self._attempt_span = start_attempt_span(
                self._tracer,  # type: ignore[arg-type]  # set whenever the call has a span
                self._span,
                self.function,
                number,
                instance.deployment_id,
                call.request.headers.get(HEADER_CALL_ID, ""),
            )
        outcome, status = "error", 500
        code: str | None = "cancelled"
        try:
            reply = await send(instance, call)
        except EndpointUnreachableError as exc:
            outcome, status, code = "unreachable", exc.http_status, exc.code
            raise
        except PayloadTooLargeError as exc:
            outcome, status, code = "too_large", exc.http_status, exc.code
            raise
        except PikkuMQError as exc:
            status, code = exc.http_status, exc.code
            raise
        except Exception as exc:
            error = getattr(exc, "error", None)  # the router's uncertain failure wraps the error
            if isinstance(error, PikkuMQError):
                outcome, status, code = "uncertain", error.http_status, error.code
            else:
                outcome, code = "not_sent", type(exc).__name__
            raise
        else:
            status = reply.status
            body = reply.body
            found = body.get("code") if status >= 400 and isinstance(body, dict) else None
            code = found if isinstance(found, str) else None
            if status < 400:
                outcome = "ok"
            elif reply.rejected:
                outcome = "rejected"
            return reply
        finally:
            self._attempt_span = None
            if self._metrics is not None:
                self._metrics.client_attempts.labels(self.function, self.transport, outcome).inc()
            if span is not None:
                from ._tracing import ATTR_TRANSPORT, end_span

                span.set_attribute(ATTR_TRANSPORT, self.transport)
                end_span(span, status, code)

    def sending(self, endpoint: str, headers: MutableMapping[str, str]) -> None:
        """Record the endpoint an attempt goes to, and put the attempt's span context in its headers."""
        self.transport = transport_of(endpoint)
        if self._attempt_span is not None:
            from ._tracing import inject

            inject(self._attempt_span, headers)
