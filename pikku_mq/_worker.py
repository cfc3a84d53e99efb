"""The worker: serve exposed functions, register, heartbeat, and drain on SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self
from urllib.parse import urlsplit

from ._dedup import DEFAULT_DEDUP_MAX_BYTES, DEFAULT_DEDUP_MAX_ENTRIES, DEFAULT_DEDUP_WINDOW
from ._dispatch import DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_IN_FLIGHT, Dispatcher
from ._durable import DeliveryPolicy
from ._errors import ConfigurationError
from ._events import ENV_EVENTS_URL, DeliverySource, EventBus, event_bus_from_url
from ._functions import FunctionDefinition, FunctionRegistry, default_registry
from ._liveness import LoopThread, WorkerWatch
from ._presence import ChangeKind
from ._security import RemoteSecurity
from ._settings import ENV_METRICS_HOST, ENV_METRICS_PORT, default_amqp_url, default_discovery_url, default_nats_url
from ._telemetry import make_telemetry
from ._types import DEFAULT_TIMEOUT, DeploymentConfig
from .backends import deployment_service_from_url
from .backends.base import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TTL, DeploymentService
from .transports._nats_wire import parse_nats_endpoint
from .transports.base import ClientTransport, PresencePublisher, ServerTransport, TransportSet, endpoint_scheme
from .transports.http import DEFAULT_MAX_BODY_SIZE, HttpServer, PikkuASGIApp
from .transports.memory import MemoryServer

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from ._metrics import MetricsServer, PikkuMetrics

__all__ = ["PikkuWorker"]

logger = logging.getLogger(__name__)

_QUIET_PERIOD = 0.3
_MAX_LINGER = 2.0
"""A draining worker keeps rejecting calls until none came for ``_QUIET_PERIOD`` s, counted from the
start of the drain at the earliest, for at most ``_MAX_LINGER`` s, so callers that still route here
move on before their connections are closed."""

_ABORT_GRACE = 1.0
"""Seconds the interrupted calls get to send their error replies before the listener closes."""

_ANNOUNCE_TIMEOUT = 1.0
"""Seconds a presence announcement may take, so a slow broker never holds up a start or a stop."""

_WATCH_STOP_TIMEOUT = 5.0
"""Seconds ``stop`` waits for the watch thread to send its last heartbeat and close its connections."""

_SERVED_SCHEMES = ("http", "memory", "nats", "amqp", "amqps")
"""Endpoint schemes a worker can serve."""


class PikkuWorker:
    """A process that serves pikku functions to the other instances of a mesh.

    ``endpoint`` is the URL other instances call, ``http://host:port`` (port 0 picks a free port and
    advertises it), ``nats://host:port/<subject-prefix>`` (see ``nats_url``),
    ``amqp://host:port/<vhost>?queue=<queue>`` to take calls from a RabbitMQ queue (see ``amqp_url``), or
    ``memory://name`` for a worker in the caller's process. ``functions`` lists the functions to serve
    (decorated callables or names); by default every exposed function registered with the decorators is
    served. ``deployment_service`` is a service or a discovery URL, by default ``PIKKU_DISCOVERY_URL`` or
    the SQLite file ``pikku-mq.db`` in the working directory; pass ``discovery=False`` to serve without
    registering.

    ``nats_url`` is the NATS server a ``nats://`` endpoint is served through, with credentials if it
    needs them; by default ``PIKKU_NATS_URL``, else the address in the endpoint. ``amqp_url`` is the
    broker an ``amqp://`` endpoint connects with; by default ``PIKKU_AMQP_URL``. Endpoints are
    advertised without credentials.

    On stop the worker deregisters first, then rejects new calls while it finishes the calls in flight
    for up to ``drain_timeout`` seconds, then closes its listener.

    A retry of a call to an ``idempotent=True`` function that this process ran in the last
    ``dedup_window`` seconds (default 60) gets the first attempt's reply instead of running the
    function again. The worker keeps at most ``dedup_max_entries`` replies (default 10,000) and
    ``dedup_max_bytes`` of their JSON text (default 64 MiB), and drops the oldest first.
    ``dedup_window=0`` turns this off.

    ``durable_notify=True`` makes the worker take durable one-way calls (``rpc.notify``) on its NATS
    and AMQP endpoints: it creates the JetStream stream of its subject prefix, or the durable queues
    of its functions in its vhost, and consumes them. ``events`` is the event bus (an
    :class:`EventBus` or its URL, by default ``PIKKU_EVENTS_URL``) whose events run the functions
    declared with ``events=[...]``; ``rpc.publish`` in a function publishes on it too. ``delivery``
    sets the retries and dead-lettering of both (see :class:`DeliveryPolicy`), and
    ``delivery_concurrency`` the deliveries of each consumer that run at once. docs/events.md
    describes what each broker promises.

    ``security`` is the remote secret (see :class:`RemoteSecurity`), by default from
    ``PIKKU_REMOTE_SECRET``; ``False`` turns it off. With one, the worker serves only calls signed with
    it (or with a previous secret it accepts), gives each function the caller's session, and signs its
    nested calls, with a deployment service that has no secret of its own too. A secret shorter than
    32 characters raises :class:`ConfigurationError` here, before anything starts.

    ``tracing`` and ``metrics`` are as for :class:`~pikku_mq.backends.base.DeploymentService`, and
    apply to the calls this worker serves and to its own deployment service, unless one is passed in.
    With metrics on, an HTTP endpoint also serves them on ``/metrics``. ``metrics_port`` (by default
    ``PIKKU_METRICS_PORT``) serves them on a port of their own, at ``metrics_host`` (by default
    ``PIKKU_METRICS_HOST``, else 127.0.0.1), and turns metrics on; a worker that serves only brokers
    needs it to be scraped.
    """

    def __init__(
        self,
        *,
        endpoint: str = "http://127.0.0.1:0",
        deployment_id: str | None = None,
        fallback_endpoints: Sequence[str] = (),
        functions: Iterable[Callable[..., Any] | FunctionDefinition | str] | None = None,
        services: Any = None,
        deployment_service: DeploymentService | str | None = None,
        discovery: bool = True,
        registry: FunctionRegistry | None = None,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL,
        drain_timeout: float = 10.0,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        default_timeout: float = DEFAULT_TIMEOUT,
        bind_host: str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        nats_url: str | None = None,
        amqp_url: str | None = None,
        security: RemoteSecurity | Literal[False] | None = None,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        dedup_max_entries: int = DEFAULT_DEDUP_MAX_ENTRIES,
        dedup_max_bytes: int = DEFAULT_DEDUP_MAX_BYTES,
        tracing: TracerProvider | bool | None = None,
        metrics: PikkuMetrics | bool | None = None,
        metrics_port: int | None = None,
        metrics_host: str | None = None,
        events: EventBus | str | None = None,
        durable_notify: bool = False,
        delivery: DeliveryPolicy | None = None,
        delivery_concurrency: int = 16,
    ) -> None:
        if drain_timeout < 0:
            raise ConfigurationError(f"drain_timeout must not be negative, got {drain_timeout!r}")
        for url in (endpoint, *fallback_endpoints):
            _check_endpoint(url)
        self._endpoint = urlsplit(endpoint)
        self._endpoints = (endpoint, *fallback_endpoints)

        self.deployment_id = deployment_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.fallback_endpoints = tuple(fallback_endpoints)
        self.registry = _select_functions(registry if registry is not None else default_registry, functions)
        self.services = services
        self.drain_timeout = drain_timeout
        self.max_body_size = max_body_size
        self.bind_host = bind_host
        self.nats_url = nats_url
        self.amqp_url = amqp_url

        self.security = RemoteSecurity.from_env() if security is None else security or None
        self.metrics_port = _metrics_port(metrics_port)
        self.metrics_host = metrics_host or os.environ.get(ENV_METRICS_HOST, "").strip() or "127.0.0.1"
        if metrics is None and self.metrics_port is not None:
            metrics = True
        telemetry = make_telemetry(tracing, metrics)
        own_metrics = telemetry.metrics if telemetry is not None and telemetry.metrics is not None else False
        self._metrics_server: MetricsServer | None = None

        if isinstance(deployment_service, DeploymentService):
            self.deployment_service: DeploymentService | None = deployment_service
            self._owns_deployment_service = False
            if deployment_service.security is None:
                deployment_service.security = self.security
        elif discovery:
            self.deployment_service = deployment_service_from_url(
                deployment_service or default_discovery_url(),
                heartbeat_interval=heartbeat_interval,
                heartbeat_ttl=heartbeat_ttl,
                default_timeout=default_timeout,
                transports=_caller_transports(nats_url, amqp_url),
                security=self.security or False,
                tracing=tracing,
                metrics=own_metrics,
            )
            self._owns_deployment_service = True
        else:
            self.deployment_service = None
            self._owns_deployment_service = False

        self.dispatcher = Dispatcher(
            self.registry,
            services=services,
            deployment_service=self.deployment_service,
            deployment_id=self.deployment_id,
            default_timeout=default_timeout,
            max_concurrency=max_concurrency,
            max_in_flight=max_in_flight,
            security=self.security,
            dedup_window=dedup_window,
            dedup_max_entries=dedup_max_entries,
            dedup_max_bytes=dedup_max_bytes,
        )
        self.dispatcher.telemetry = telemetry
        _check_delivery_options(durable_notify, delivery, delivery_concurrency)
        self.events = _event_bus(events, self.registry)
        self.durable_notify = durable_notify
        self.delivery = delivery if delivery is not None else DeliveryPolicy()
        self.delivery_concurrency = delivery_concurrency
        self._sources: list[DeliverySource] = []
        if self.deployment_service is not None and self.deployment_service.events is None:
            self.deployment_service.events = self.events
        if self.deployment_service is not None:
            # Heartbeats write the calls in flight to the registry, for least-loaded callers.
            self.deployment_service.in_flight_source = self._in_flight
        self.endpoint: str | None = None
        """The advertised endpoint, known once the worker listens (the port filled in)."""
        self._servers: list[ServerTransport] = []
        self._presence_task: asyncio.Task[None] | None = None
        self._watch: LoopThread | None = None
        self._presence_interval = (
            self.deployment_service.heartbeat_interval if self.deployment_service is not None else heartbeat_interval
        )
        self._started = False

    # -- entry point -------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then drain and return (the process exits 0).

        Uses uvloop when it is installed.
        """
        try:
            import uvloop
        except ImportError:
            asyncio.run(self.serve_until_signal())
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self.serve_until_signal())

    async def serve_until_signal(self) -> None:
        """Start, wait for SIGTERM or SIGINT, then stop.

        The handlers stay installed while the worker stops, so a second signal does not cut the drain
        short: ``pikku-mq worker --reload`` sends SIGINT to a worker that Ctrl-C already reached, and
        supervisors repeat SIGTERM. The drain ends by itself after ``drain_timeout`` seconds.
        """
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, _on_signal, signum, stop, self)
        try:
            await self.start()
            await stop.wait()
        finally:
            try:
                await self.stop()
            finally:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Listen first, then register, so nothing is routed here before the worker can serve it."""
        if self._started:
            raise ConfigurationError(f"worker {self.deployment_id} is already started")
        logger.info("worker %s starting with functions: %s", self.deployment_id, ", ".join(self._names()) or "none")

        self.endpoint = await self._listen()
        self.dispatcher.draining = False
        try:
            self._serve_metrics()
            # Before registering, so that a caller that finds this worker finds its queues and streams.
            await self._start_sources()
            if self.deployment_service is not None:
                config = DeploymentConfig(
                    deployment_id=self.deployment_id,
                    endpoint=self.endpoint,
                    functions=self._names(),
                    fallback_endpoints=self.fallback_endpoints,
                    idempotent_functions=sorted(d.name for d in self.registry if d.expose and d.idempotent),
                )
                await self.deployment_service.start(config)
        except BaseException:
            # Not registered, so there is nothing to drain: just release the listener and the store.
            self._stop_metrics()
            await self._close_sources()
            await self._close_listener()
            if self.deployment_service is not None and self._owns_deployment_service:
                await self.deployment_service.close()
            raise
        self._started = True
        await self._announce("join")
        self._start_presence()
        logger.info("worker %s serving at %s", self.deployment_id, self.endpoint)

    async def stop(self) -> None:
        """Deregister, finish the calls in flight (up to ``drain_timeout``), then stop listening."""
        if not self._started:
            return
        self._started = False
        logger.info(
            "worker %s draining: deregistering, then finishing %d calls in flight (up to %.1f s)",
            self.deployment_id,
            self.dispatcher.in_flight,
            self.drain_timeout,
        )
        try:
            await self._stop_presence()
            await self._announce("draining")
            if self.deployment_service is not None:
                await self._deregister()
            # Leave broker queue groups first: a call that arrives before that is still served.
            await self._begin_drain()
            for source in self._sources:
                await source.stop_taking()
            self.dispatcher.draining = True
            drain_began = time.monotonic()
            if not await self.dispatcher.wait_idle(self.drain_timeout):
                logger.warning(
                    "worker %s interrupts %d calls still in flight after the %.1f s drain timeout",
                    self.deployment_id,
                    self.dispatcher.in_flight,
                    self.drain_timeout,
                )
                self.dispatcher.abort()
                await self.dispatcher.wait_idle(_ABORT_GRACE)
            await self.dispatcher.wait_quiet(_QUIET_PERIOD, min(_MAX_LINGER, self.drain_timeout), since=drain_began)
            for source in self._sources:
                await source.wait_settled(_ABORT_GRACE)
            await self._announce("leave")
        finally:
            await self._close_sources()
            await self._close_listener()
            self._stop_metrics()
            if self.deployment_service is not None and self._owns_deployment_service:
                await self.deployment_service.close()
        logger.info("worker %s stopped", self.deployment_id)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    def asgi_app(self) -> PikkuASGIApp:
        """Return an ASGI app serving this worker's functions, to mount in Starlette or FastAPI."""
        return PikkuASGIApp(self.dispatcher, max_body_size=self.max_body_size, path_prefix=self._endpoint.path)

    # -- internals ---------------------------------------------------------------------------------

    def _names(self) -> list[str]:
        return self.registry.exposed_names()

    def _in_flight(self) -> int:
        return self.dispatcher.in_flight

    def _serve_metrics(self) -> None:
        """Serve the metrics on their own port, when one is set."""
        telemetry = self.dispatcher.telemetry
        if self.metrics_port is None or telemetry is None or telemetry.metrics is None:
            return
        from ._metrics import MetricsServer

        server = MetricsServer(telemetry.metrics, self.metrics_host, self.metrics_port)
        try:
            self.metrics_port = server.start()
        except ConfigurationError:
            self._stop_metrics()
            raise
        self._metrics_server = server

    def _stop_metrics(self) -> None:
        server, self._metrics_server = self._metrics_server, None
        if server is not None:
            server.stop()

    async def _deregister(self) -> None:
        assert self.deployment_service is not None
        try:
            await self.deployment_service.stop()
        except Exception as exc:
            # Draining goes on: callers drop this instance at the TTL or when its endpoint refuses them.
            logger.warning("worker %s failed to deregister: %s: %s", self.deployment_id, type(exc).__name__, exc)

    async def _announce(self, kind: ChangeKind) -> None:
        """Publish a presence event on every server's broker; a failure only delays what callers learn.

        Joins and heartbeats carry the calls in flight, which least-loaded callers balance on.
        """
        in_flight = self.dispatcher.in_flight if kind in ("join", "heartbeat") else None
        for server in self._servers:
            await self._announce_on(server, kind, in_flight)

    async def _announce_on(self, server: ServerTransport, kind: ChangeKind, in_flight: int | None) -> None:
        try:
            async with asyncio.timeout(_ANNOUNCE_TIMEOUT):
                await server.announce(kind, self.deployment_id, in_flight)
        except Exception as exc:  # callers still learn of the change from discovery
            logger.info(
                "worker %s could not announce %s on %r: %s: %s",
                self.deployment_id,
                kind,
                server,
                type(exc).__name__,
                exc,
            )

    async def _begin_drain(self) -> None:
        for server in self._servers:
            try:
                async with asyncio.timeout(_ANNOUNCE_TIMEOUT):
                    await server.begin_drain()
            except Exception as exc:  # the dispatcher rejects new calls anyway
                logger.info(
                    "worker %s could not stop taking calls on %r: %s: %s",
                    self.deployment_id,
                    server,
                    type(exc).__name__,
                    exc,
                )

    def _start_presence(self) -> None:
        """Start the presence heartbeats and the watch of the event loop.

        Servers with a presence publisher send their heartbeats from the watch's thread, on connections
        of its own, so a function that blocks the event loop does not stop them. The others announce
        theirs from the event loop.
        """
        publishers: list[PresencePublisher] = []
        on_loop: list[ServerTransport] = []
        for server in self._servers:
            publisher = server.presence_publisher()
            if publisher is None:
                on_loop.append(server)
            else:
                publishers.append(publisher)
        if on_loop:
            self._presence_task = asyncio.create_task(
                self._presence_loop(on_loop), name=f"pikku-presence-{self.deployment_id}"
            )
        watch = WorkerWatch(
            self.deployment_id, asyncio.get_running_loop(), publishers, self._presence_interval, self._in_flight
        )
        self._watch = LoopThread(f"pikku-watch-{self.deployment_id}", watch.run)
        self._watch.start()

    async def _presence_loop(self, servers: list[ServerTransport]) -> None:
        while True:
            await asyncio.sleep(self._presence_interval)
            for server in servers:
                await self._announce_on(server, "heartbeat", self.dispatcher.in_flight)

    async def _stop_presence(self) -> None:
        watch, self._watch = self._watch, None
        if watch is not None and not await watch.stop(_WATCH_STOP_TIMEOUT):
            logger.warning("the watch thread of worker %s did not stop; it ends with the process", self.deployment_id)
        task, self._presence_task = self._presence_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self) -> str:
        """Start one server per endpoint, the fallbacks included, and return the advertised endpoint."""
        advertised: list[str] = []
        try:
            for url in self._endpoints:
                server = self._server_for(url)
                self._servers.append(server)
                advertised.append(await server.start(url, self.dispatcher))
        except BaseException:
            await self._close_listener()
            raise
        self.fallback_endpoints = tuple(advertised[1:])
        return advertised[0]

    def _server_for(self, url: str) -> ServerTransport:
        scheme = endpoint_scheme(url)
        if scheme == "memory":
            return MemoryServer()
        if scheme == "nats":
            return _nats_server(self.nats_url)
        if scheme in ("amqp", "amqps"):
            server: ServerTransport = _amqp().AmqpServer(url=self.amqp_url, max_body_size=self.max_body_size)
            return server
        return HttpServer(bind_host=self.bind_host, max_body_size=self.max_body_size)

    async def _start_sources(self) -> None:
        """Start consuming durable one-way calls (with ``durable_notify``) and the events of the handlers."""
        sources: list[DeliverySource] = []
        if self.durable_notify:
            for url in (self.endpoint, *self.fallback_endpoints):
                source = _notify_source(url or "", self.nats_url, self.amqp_url, self.deployment_id)
                if source is not None:
                    sources.append(source)
        if self.events is not None:
            sources.append(self.events)
        for source in sources:
            self._sources.append(source)
            await source.start(self.dispatcher, self.delivery, self.delivery_concurrency)

    async def _close_sources(self) -> None:
        sources, self._sources = self._sources, []
        for source in sources:
            try:
                await source.close()
            except Exception:
                logger.exception("worker %s failed to close %r", self.deployment_id, source)

    async def _close_listener(self) -> None:
        servers, self._servers = self._servers, []
        for server in reversed(servers):
            try:
                await server.stop()
            except Exception:
                logger.exception("worker %s failed to stop its server %r", self.deployment_id, server)


def _on_signal(signum: int, stop: asyncio.Event, worker: PikkuWorker) -> None:
    name = signal.Signals(signum).name
    if stop.is_set():
        logger.warning(
            "worker %s received %s again while stopping; it still finishes its calls in flight, for up to "
            "%.1f s (drain_timeout)",
            worker.deployment_id,
            name,
            worker.drain_timeout,
        )
        return
    logger.info("received %s", name)
    stop.set()


def _metrics_port(port: int | None) -> int | None:
    """Return the metrics port: ``port``, else ``PIKKU_METRICS_PORT``, else None; 0 picks a free port."""
    if port is None:
        raw = os.environ.get(ENV_METRICS_PORT, "").strip()
        if not raw:
            return None
        if not raw.isdigit():
            raise ConfigurationError(f"{ENV_METRICS_PORT} must be a port number from 0 to 65535, got {raw[:20]!r}")
        port = int(raw)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError(f"metrics_port must be a port number from 0 to 65535, got {port!r}")
    return port


def _caller_transports(nats_url: str | None, amqp_url: str | None) -> TransportSet:
    """Return the transports of the worker's own remote calls, on the worker's broker URLs where given."""
    transports = TransportSet.default()
    if nats_url is not None:
        transports.replace(_nats_client(nats_url))
    if amqp_url is not None:
        transports.replace(_amqp().AmqpTransport(url=amqp_url))
    return transports


def _nats_client(nats_url: str) -> ClientTransport:
    try:
        from .transports.nats import NatsTransport
    except ImportError as exc:
        raise ConfigurationError(
            f"nats_url needs nats-py, which is not installed ({exc}); install it with pip install 'pikku-mq[nats]'"
        ) from None
    return NatsTransport(nats_url)


def _check_endpoint(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in _SERVED_SCHEMES:
        raise ConfigurationError(
            f"endpoint {url!r} cannot be served by a worker; use http://host:port, "
            "nats://host:port/<subject-prefix>, amqp://host:port/<vhost>?queue=<queue> or memory://name"
        )
    if parts.scheme == "http" and not parts.hostname:
        raise ConfigurationError(f"endpoint {url!r} has no host; use http://host:port")
    if parts.scheme == "nats":
        parse_nats_endpoint(url)
    if parts.scheme in ("amqp", "amqps"):
        _amqp().parse_endpoint(url, worker=True)


def _nats_server(nats_url: str | None) -> ServerTransport:
    try:
        from .transports.nats import NatsServer
    except ImportError as exc:
        raise ConfigurationError(
            f"serving a nats:// endpoint needs nats-py, which is not installed ({exc}); "
            "install it with pip install 'pikku-mq[nats]'"
        ) from None
    return NatsServer(nats_url)


def _amqp() -> Any:
    """Import the AMQP transport, which needs the optional aio-pika."""
    try:
        from .transports import amqp
    except ImportError as exc:
        raise ConfigurationError(
            f"serving an amqp:// endpoint requires aio-pika, which failed to import ({exc}). "
            "Install it with: pip install 'pikku-mq[amqp]'"
        ) from None
    return amqp


def _check_delivery_options(durable_notify: object, delivery: object, delivery_concurrency: object) -> None:
    """Raise :class:`ConfigurationError` unless the options of durable deliveries have their types."""
    if not isinstance(durable_notify, bool):
        raise ConfigurationError(f"durable_notify must be True or False, got {durable_notify!r:.80}")
    if delivery is not None and not isinstance(delivery, DeliveryPolicy):
        raise ConfigurationError(f"delivery must be a DeliveryPolicy or None, got {delivery!r:.80}")
    concurrency = delivery_concurrency
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError(f"delivery_concurrency must be an integer of at least 1, got {concurrency!r:.80}")


def _event_bus(events: EventBus | str | None, registry: FunctionRegistry) -> EventBus | None:
    """Return the worker's event bus: the one given, or the one that ``PIKKU_EVENTS_URL`` names."""
    if isinstance(events, EventBus):
        return events
    if events is not None and not isinstance(events, str):
        raise ConfigurationError(f"events must be an EventBus, an event bus URL or None, got {events!r:.80}")
    url = events if events is not None else os.environ.get(ENV_EVENTS_URL, "").strip()
    if url:
        return event_bus_from_url(url)
    listening = [d.name for d in registry if d.events]
    if listening:
        logger.warning(
            "functions %s listen to events, but the worker has no event bus; pass events= or set %s",
            ", ".join(listening),
            ENV_EVENTS_URL,
        )
    return None


def _notify_source(
    endpoint: str, nats_url: str | None, amqp_url: str | None, deployment_id: str
) -> DeliverySource | None:
    """Return the source of durable one-way calls for an endpoint on a broker, or None for other endpoints."""
    scheme = endpoint_scheme(endpoint)
    if scheme == "nats":
        try:
            from .transports.jetstream_events import JetStreamNotifySource
        except ImportError as exc:
            raise ConfigurationError(
                f"durable one-way calls on a nats:// endpoint need nats-py, which is not installed ({exc}); "
                "install it with pip install 'pikku-mq[nats]'"
            ) from None

        parsed = parse_nats_endpoint(endpoint)
        return JetStreamNotifySource(nats_url or default_nats_url(parsed.server_url), parsed.prefix)
    if scheme in ("amqp", "amqps"):
        try:
            from .transports.amqp_durable import AmqpNotifySource
        except ImportError as exc:
            raise ConfigurationError(
                f"durable one-way calls on an amqp:// endpoint need aio-pika, which is not installed ({exc}); "
                "install it with pip install 'pikku-mq[amqp]'"
            ) from None

        vhost = _amqp().parse_endpoint(endpoint).vhost
        return AmqpNotifySource(amqp_url or default_amqp_url(), vhost, deployment_id)
    return None


def _select_functions(
    registry: FunctionRegistry, functions: Iterable[Callable[..., Any] | FunctionDefinition | str] | None
) -> FunctionRegistry:
    if functions is None:
        return registry
    selected = FunctionRegistry()
    for item in functions:
        definition = _definition_of(registry, item)
        selected.add(definition)
    return selected


def _definition_of(
    registry: FunctionRegistry, item: Callable[..., Any] | FunctionDefinition | str
) -> FunctionDefinition:
    if isinstance(item, FunctionDefinition):
        return item
    if isinstance(item, str):
        definition = registry.get(item)
        if definition is None:
            raise ConfigurationError(f"no pikku function named '{item}' is registered")
        return definition
    definition = getattr(item, "__pikku__", None)
    if not isinstance(definition, FunctionDefinition):
        raise TypeError(f"{item!r} is not a pikku function; decorate it with @pikku_func or @pikku_sessionless_func")
    return definition
