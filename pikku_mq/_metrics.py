"""Prometheus metrics of calls, heartbeats and the routing cache (the ``metrics`` extra: prometheus-client).

This module imports without prometheus-client; building a :class:`PikkuMetrics` raises
:class:`ConfigurationError` naming the extra when it is missing.

One :class:`PikkuMetrics` registers every collector in a registry. A caller (a deployment service) and
a worker in one process share it, and the worker serves the registry on ``/metrics``. Label values
are bounded: a worker labels a call to a function it does not serve as ``(unknown)``, so hostile
requests cannot add label values without limit.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from ._errors import ConfigurationError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

__all__ = ["LATENCY_BUCKETS", "MetricsServer", "PikkuMetrics"]

logger = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Upper bounds, in seconds, of the latency histograms' buckets: from a local call (about 0.1 ms) to the
default deadline of 30 s."""

_defaults: dict[int, PikkuMetrics] = {}
_defaults_lock = threading.Lock()


def _require_prometheus() -> None:
    try:
        import prometheus_client  # noqa: F401 - only checks that it is installed
    except ImportError as exc:
        raise ConfigurationError(
            f"metrics need prometheus-client, which failed to import ({exc}); install it with "
            "pip install 'pikku-mq[metrics]'"
        ) from None


class PikkuMetrics:
    """The collectors of pikku_mq's metrics, registered in ``registry`` (by default the global one).

    A registry accepts each metric name once, so build one instance per registry and pass it to the
    worker and to the deployment services, or use :meth:`default`.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        _require_prometheus()
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        self.registry = registry = registry if registry is not None else REGISTRY
        call = ["function", "transport"]
        error = ["function", "transport", "code"]
        buckets = LATENCY_BUCKETS

        self.client_calls = Counter(
            "pikku_mq_client_calls", "Calls made by this process that ended", call, registry=registry
        )
        self.client_errors = Counter(
            "pikku_mq_client_errors",
            "Calls made by this process that ended in an error, by error code",
            error,
            registry=registry,
        )
        self.client_duration = Histogram(
            "pikku_mq_client_call_duration_seconds",
            "Time from the start of a call to its result or error, all attempts included",
            call,
            buckets=buckets,
            registry=registry,
        )
        self.client_in_flight = Gauge(
            "pikku_mq_client_calls_in_flight",
            "Calls made by this process that have not ended",
            ["function"],
            registry=registry,
        )
        self.client_attempts = Counter(
            "pikku_mq_client_attempts",
            "Attempts sent to an instance, by outcome (ok, error, rejected, unreachable, uncertain, too_large, "
            "not_sent)",
            ["function", "transport", "outcome"],
            registry=registry,
        )

        self.server_calls = Counter(
            "pikku_mq_server_calls", "Calls served by this worker that ended", call, registry=registry
        )
        self.server_errors = Counter(
            "pikku_mq_server_errors",
            "Calls served by this worker that ended in an error, by error code",
            error,
            registry=registry,
        )
        self.server_duration = Histogram(
            "pikku_mq_server_call_duration_seconds",
            "Time from a call's arrival at the worker to its reply, waiting for a free slot included",
            call,
            buckets=buckets,
            registry=registry,
        )
        self.server_in_flight = Gauge(
            "pikku_mq_server_calls_in_flight", "Calls this worker has taken and not answered", call, registry=registry
        )

        self.heartbeat_failures = Counter(
            "pikku_mq_heartbeat_failures", "Heartbeats to the discovery store that failed", registry=registry
        )
        self.cache_hits = Counter(
            "pikku_mq_routing_cache_hits",
            "Calls routed from a cached lookup, without a query",
            ["function"],
            registry=registry,
        )
        self.cache_misses = Counter(
            "pikku_mq_routing_cache_misses",
            "Calls that waited for a lookup because the cached one was missing or expired",
            ["function"],
            registry=registry,
        )

    @classmethod
    def default(cls, registry: CollectorRegistry | None = None) -> PikkuMetrics:
        """Return the one instance for ``registry`` (by default the global one), creating it on first use."""
        _require_prometheus()
        from prometheus_client import REGISTRY

        registry = registry if registry is not None else REGISTRY
        with _defaults_lock:
            metrics = _defaults.get(id(registry))
            if metrics is None or metrics.registry is not registry:
                metrics = _defaults[id(registry)] = cls(registry)
            return metrics

    def render(self) -> tuple[bytes, str]:
        """Return the registry in the Prometheus text format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsServer:
    """Serves a registry on ``http://host:port/metrics`` from a thread, for workers that serve only brokers."""

    def __init__(self, metrics: PikkuMetrics, host: str, port: int) -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Start listening and return the port (the free port picked for port 0)."""
        from prometheus_client import start_http_server

        try:
            self._server, self._thread = start_http_server(self.port, self.host, self.metrics.registry)
        except OSError as exc:
            raise ConfigurationError(f"cannot serve metrics on {self.host}:{self.port}: {exc}") from exc
        self.port = self._server.server_port
        logger.info("serving metrics on http://%s:%d/metrics", self.host, self.port)
        return self.port

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
