"""The deployment service contract shared by every discovery backend.

A backend stores one row per instance (its id, endpoint, fallback endpoints and functions) and the
time of its last heartbeat, judged by the store's own clock where it has one. This base class owns what
every backend does alike: configuration checks, the heartbeat loop, the change feed's reconnect loop,
and calling functions through the caller-side :class:`~pikku_mq._routing.Router`.

A backend with a change feed (PostgreSQL ``LISTEN/NOTIFY``, Redis pub/sub) announces joins, draining
and leaves as :class:`ChangeEvent` messages, and a caller that subscribed applies them to its routing
cache at once instead of waiting for the cache to expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import random
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self

from .._errors import (
    ConfigurationError,
    DeadlineExceededError,
    DeploymentConflictError,
    DiscoveryError,
    PikkuMQError,
    check_flag,
    check_seconds,
)
from .._events import EventBus, event_bus_from_env
from .._liveness import LoopThread, wait_for_event
from .._logs import RepeatedFailureLog
from .._outliers import EjectionPolicy
from .._presence import ChangeEvent, ChangeKind
from .._routing import RetryPolicy, Router
from .._security import RemoteSecurity
from .._settings import ENV_HOSTNAME
from .._telemetry import Telemetry, make_telemetry
from .._types import DEFAULT_TIMEOUT, DeploymentConfig, DeploymentInfo, DeploymentRecord
from .._watch import MIN_POLL_INTERVAL, DeploymentWatch, check_poll_interval
from ..transports.base import TransportSet

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider

    from .._metrics import PikkuMetrics

__all__ = [
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_HEARTBEAT_TTL",
    "DeploymentService",
    "conflict_error",
    "decode_string_list",
    "default_hostname",
]

logger = logging.getLogger(__name__)

DEFAULT_HEARTBEAT_INTERVAL = 10.0
DEFAULT_HEARTBEAT_TTL = 30.0

_HEARTBEAT_STOP_TIMEOUT = 5.0
"""Seconds ``stop`` waits for a heartbeat in progress before cancelling it."""

_ANNOUNCE_TIMEOUT = 2.0
"""Seconds ``stop`` gives the draining announcement, which is only a hint to callers."""

_DEREGISTER_TIMEOUT = 5.0
"""Seconds ``stop`` gives the deregistration; callers drop an instance that stays at its TTL."""

_FEED_FIRST_RETRY = 0.25
"""Seconds before the first attempt to subscribe again after the change feed is lost; it doubles."""

_FEED_MAX_RETRY = 5.0
"""The maximum wait, in seconds, between two attempts to subscribe to the change feed again."""

_FEED_CHECK_INTERVAL = 5.0
"""Seconds a change feed may stay silent before its connection is checked with a round trip."""

_FEED_STOP_TIMEOUT = 5.0
"""Seconds ``close`` waits for the change feed task to end after each of its two cancellations.

It is longer than a feed needs to give its connection back, which for PostgreSQL's UNLISTEN is at most 2 s.
"""


class DeploymentService(ABC):
    """Registers this instance, keeps it alive and finds the instances that host a function.

    ``heartbeat_interval`` and ``heartbeat_ttl`` are in seconds. An instance whose last heartbeat is
    older than its TTL is stale, so lookups skip it and heartbeats of other instances delete it.
    ``routing_cache_ttl`` (seconds, default ``min(5, heartbeat_interval)``) bounds how long a caller
    reuses a lookup.

    Where the backend has a change feed and ``change_feed`` is true (the default), the first call
    subscribes to it, so joins, draining and leaves reach this caller's routing cache at once. The
    subscription keeps one connection to the store open until ``close``.

    ``security`` holds the remote secret that signs this caller's calls and carries their sessions; by
    default it comes from ``PIKKU_REMOTE_SECRET`` (see :class:`RemoteSecurity`), and ``False`` turns
    signing off regardless of the environment. Without a secret, sessions are not sent.

    ``balancing`` is the strategy that picks an instance for each call: ``round_robin`` (the default),
    ``random``, ``least_loaded`` or ``prefer_local`` (see :mod:`pikku_mq._balancing`).
    ``function_balancing`` maps function names to other strategies, and a call can name its own.
    ``retry`` (a :class:`RetryPolicy`) says how idempotent calls are retried after an uncertain
    failure, and ``ejection`` (an :class:`EjectionPolicy`) when failing instances are taken out of
    routing. ``hostname`` is the host name this instance registers with and that ``prefer_local``
    compares: by default ``PIKKU_HOSTNAME``, else :func:`socket.gethostname`.

    With ``heartbeat_thread`` true (the default), a service built from a URL, DSN or file path sends its
    heartbeats from a daemon thread, through a second service on the same store with connections of
    its own. A function that blocks the event loop for longer than the TTL then does not get its
    instance expired, while the heartbeats of a killed process stop with it. A service built on a
    pool, client or engine that the caller passed in heartbeats on the event loop that called
    ``start``, because their connections belong to that loop, unless ``heartbeat_url`` gives the URL
    or DSN of the same store for the thread to connect with. The in-memory service always heartbeats
    on the event loop.

    ``tracing`` and ``metrics`` turn on OpenTelemetry spans and Prometheus metrics of this caller's
    calls, heartbeats and routing cache. ``tracing=None`` traces once a tracer provider is set, if the
    ``otel`` extra is installed; pass a ``TracerProvider`` to use that one, or False to turn tracing off.
    ``metrics`` is a :class:`~pikku_mq.PikkuMetrics` or True for the global Prometheus registry;
    None turns metrics on when ``PIKKU_METRICS`` is 1.
    """

    has_change_feed: ClassVar[bool] = False
    """Whether the backend implements :meth:`_watch_changes` and :meth:`_announce`."""

    def __init__(
        self,
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL,
        transports: TransportSet | None = None,
        routing_cache_ttl: float | None = None,
        default_timeout: float = DEFAULT_TIMEOUT,
        change_feed: bool = True,
        security: RemoteSecurity | Literal[False] | None = None,
        balancing: str = "round_robin",
        function_balancing: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        ejection: EjectionPolicy | None = None,
        hostname: str | None = None,
        heartbeat_thread: bool = True,
        heartbeat_url: str | None = None,
        tracing: TracerProvider | bool | None = None,
        metrics: PikkuMetrics | bool | None = None,
    ) -> None:
        if heartbeat_url is not None and (not isinstance(heartbeat_url, str) or not heartbeat_url):
            raise ConfigurationError(
                f"heartbeat_url must be a non-empty URL or DSN string or None, got {heartbeat_url!r:.80}"
            )
        if not heartbeat_interval > 0:
            raise ConfigurationError(f"heartbeat_interval must be positive seconds, got {heartbeat_interval!r}")
        if not heartbeat_ttl > heartbeat_interval:
            raise ConfigurationError(
                f"heartbeat_ttl ({heartbeat_ttl!r} s) must be greater than heartbeat_interval "
                f"({heartbeat_interval!r} s), or every instance would look dead between two heartbeats"
            )
        if not default_timeout > 0:
            raise ConfigurationError(f"default_timeout must be positive seconds, got {default_timeout!r}")
        cache_ttl = min(5.0, heartbeat_interval) if routing_cache_ttl is None else routing_cache_ttl
        if cache_ttl < 0:
            raise ConfigurationError(f"routing_cache_ttl must not be negative, got {routing_cache_ttl!r}")
        if retry is not None and not isinstance(retry, RetryPolicy):
            raise ConfigurationError(f"retry must be a RetryPolicy, got {type(retry).__name__}")
        if ejection is not None and not isinstance(ejection, EjectionPolicy):
            raise ConfigurationError(f"ejection must be an EjectionPolicy, got {type(ejection).__name__}")
        if hostname is not None and (not isinstance(hostname, str) or not hostname):
            raise ConfigurationError(f"hostname must be a non-empty string or None, got {hostname!r}")

        self.heartbeat_interval = float(heartbeat_interval)
        self.heartbeat_ttl = float(heartbeat_ttl)
        self.default_timeout = float(default_timeout)
        self.hostname = hostname or default_hostname()
        self.router = Router(
            self.find_function,
            transports or TransportSet.default(),
            cache_ttl=cache_ttl,
            suspect_ttl=self.heartbeat_ttl,
            balancing=balancing,
            function_balancing=function_balancing,
            retry=retry,
            ejection=ejection,
            hostname=self.hostname,
        )
        self.router.transports.set_presence_listener(self._on_presence)
        self.router.security = RemoteSecurity.from_env() if security is None else security or None
        self.router.telemetry = make_telemetry(tracing, metrics)
        self._config: DeploymentConfig | None = None
        self.heartbeat_thread = heartbeat_thread
        self.heartbeat_url = heartbeat_url
        """The URL or DSN the heartbeat thread connects with, for a service built on a pool, client or engine."""
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._heartbeat_runner: LoopThread | None = None
        self._heartbeat_stop = asyncio.Event()
        self._owner_loop: asyncio.AbstractEventLoop | None = None
        """In a heartbeat thread, the event loop of the service that started it. Heartbeats end when it closes."""
        self._initialized = False
        self.change_feed = change_feed and self.has_change_feed
        self._feed_task: asyncio.Task[None] | None = None
        self._feed_failures = RepeatedFailureLog(logger)
        self._feed_subscribed = False
        self._watch_listeners: list[Callable[[ChangeEvent | None], None]] = []
        self._own_events: EventBus | None = None
        self.events: EventBus | None = None
        """The event bus that :meth:`publish` uses. None builds one from ``PIKKU_EVENTS_URL`` on the first publish;
        :class:`~pikku_mq.PikkuWorker` sets its own."""
        self.in_flight_source: Callable[[], int] | None = None
        """Returns this instance's calls in flight, which registrations and heartbeats write to the registry.

        :class:`~pikku_mq.PikkuWorker` sets it; without it, the registry gets no count (NULL). The
        heartbeat thread calls it too, so it must only read values, and never touch the event loop."""

    # -- the backend's part ------------------------------------------------------------------------

    @abstractmethod
    async def _create_schema(self) -> None:
        """Create tables, indexes or keys idempotently."""

    @abstractmethod
    async def _register(self, config: DeploymentConfig, functions: list[str]) -> None:
        """Insert or replace this instance's registration and set its heartbeat to now.

        Raise :class:`DeploymentConflictError` (see :func:`conflict_error`) if a live instance with
        another endpoint has the id, so two processes never take turns on one row.
        """

    @abstractmethod
    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        """Refresh the heartbeat; return False if this instance's registration is missing, in part or whole.

        Only a row with this instance's endpoint counts, so a heartbeat never keeps alive a row that
        another instance wrote under the same id.
        """

    @abstractmethod
    async def _deregister(self, config: DeploymentConfig) -> None:
        """Delete this instance's registration, unless another instance has taken the id over."""

    @abstractmethod
    async def _purge_stale(self) -> int:
        """Delete instances whose heartbeat is older than the TTL; return how many."""

    @abstractmethod
    async def find_function(self, name: str) -> list[DeploymentInfo]:
        """Return the live instances that host ``name``, in no particular order."""

    @abstractmethod
    async def list_deployments(self) -> list[DeploymentRecord]:
        """Return every registered instance, stale ones included, for operators."""

    async def _close_store(self) -> None:  # noqa: B027 - stores without connections have nothing to close
        """Release the store's connections."""

    def _heartbeat_twin(self) -> DeploymentService | None:
        """Return a new service on the same store, to send the heartbeats from a thread, or None if there is none.

        It must open connections of its own when first used, since connections belong to the event loop
        that opened them. Build it with :meth:`_twin_options`, and with ``type(self)``, so that a
        subclass's overrides apply to its heartbeats too.
        """
        return None

    def _twin_options(self) -> dict[str, Any]:
        """Return the constructor options of a heartbeat twin: this service's timing, and no feed or transports."""
        return {
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_ttl": self.heartbeat_ttl,
            "default_timeout": self.default_timeout,
            "hostname": self.hostname,
            "transports": TransportSet([]),
            "change_feed": False,
            "security": False,
            "heartbeat_thread": False,
        }

    async def _announce(self, kind: ChangeKind, deployment_id: str) -> None:  # noqa: B027 - no feed by default
        """Publish a change event on the store's change feed, if it has one."""

    async def _watch_changes(self, deliver: Callable[[ChangeEvent | None], None], check_interval: float) -> None:
        """Subscribe to the change feed and pass each event to ``deliver`` until the connection fails.

        Call ``deliver(None)`` after each successful subscription, since events sent while this
        caller was not subscribed are lost. Raise when the connection is lost, and check a silent
        connection with a round trip every ``check_interval`` seconds, so a half-open connection is
        noticed. Release the connection when cancelled.
        """
        raise NotImplementedError(f"{type(self).__name__} has no change feed")

    # -- lifecycle ---------------------------------------------------------------------------------

    async def init(self) -> None:
        """Create the schema if needed. Idempotent; ``start`` calls it too."""
        if not self._initialized:
            async with self._translate_errors("creating the schema"):
                await self._create_schema()
            self._initialized = True

    async def start(self, config: DeploymentConfig) -> None:
        """Register ``config`` and start heartbeating every ``heartbeat_interval`` seconds."""
        if config.functions is None:
            raise ConfigurationError(
                "DeploymentConfig.functions is None; list the function names to register "
                "(PikkuWorker fills in its exposed functions)"
            )
        if self._config is not None:
            raise ConfigurationError(f"this deployment service already registered '{self._config.deployment_id}'")

        await self.init()
        functions = sorted(set(config.functions))
        if config.hostname is None:
            config = dataclasses.replace(config, hostname=self.hostname)
        idempotent = tuple(sorted(set(config.idempotent_functions) & set(functions)))
        if tuple(config.idempotent_functions) != idempotent:
            config = dataclasses.replace(config, idempotent_functions=idempotent)
        async with self._translate_errors(f"registering {config.deployment_id}"):
            await self._register(config, functions)
        if self.heartbeat_url is not None and self.heartbeat_thread:
            await self._check_heartbeat_url(config, functions)
        self._config = config
        self._start_heartbeats(config, functions)
        logger.info(
            "registered deployment %s at %s with %d functions", config.deployment_id, config.endpoint, len(functions)
        )

    async def _check_heartbeat_url(self, config: DeploymentConfig, functions: list[str]) -> None:
        """Check that ``heartbeat_url`` reaches the store of this registration, or deregister and raise.

        A URL of another database would have the heartbeat thread register the instance there, while
        the registration that callers read expires. The check sends one heartbeat through a service
        on that URL, from a thread with an event loop of its own, as the heartbeat thread does.
        """
        probe = self._heartbeat_twin()
        if probe is None:
            return

        async def heartbeat() -> bool:
            try:
                return await probe._heartbeat(config, functions)
            finally:
                await probe.close()

        try:
            found = await asyncio.to_thread(asyncio.run, heartbeat())
        except Exception as exc:
            found = False
            reason = f"it failed: {type(exc).__name__}: {exc}"
        else:
            reason = f"it found no registration of {config.deployment_id} there"
        if not found:
            async with self._translate_errors(f"deregistering {config.deployment_id}"):
                await self._deregister(config)
            raise ConfigurationError(
                f"heartbeat_url does not reach the store that {self!r} registered {config.deployment_id} in: "
                f"a heartbeat through {probe!r} was sent to check it, and {reason}. Pass the URL or DSN of "
                "the same database, with the same schema or key prefix."
            )

    def _start_heartbeats(self, config: DeploymentConfig, functions: list[str]) -> None:
        """Start the heartbeat loop: in a thread through a twin service where there is one, else as a task."""
        name = f"pikku-heartbeat-{config.deployment_id}"
        twin = self._heartbeat_twin() if self.heartbeat_thread else None
        if twin is None:
            if self.heartbeat_thread and type(self)._heartbeat_twin is not DeploymentService._heartbeat_twin:
                logger.info(
                    "%r sends its heartbeats from the event loop, because it was built on a pool, client or "
                    "engine passed in: a function that blocks the loop for longer than the TTL (%.1f s) gets "
                    "%s expired. Pass heartbeat_url= to send them from a thread with connections of their own.",
                    self,
                    self.heartbeat_ttl,
                    config.deployment_id,
                )
            self._heartbeat_stop = asyncio.Event()
            self._heartbeat_task = asyncio.create_task(self._heartbeat_loop(config, functions), name=name)
            return
        twin.in_flight_source = self.in_flight_source
        twin.router.telemetry = self.router.telemetry  # heartbeat failures count in this service's metrics
        owner = asyncio.get_running_loop()
        self._heartbeat_runner = LoopThread(
            name, lambda stop: twin._heartbeat_in_thread(config, functions, stop, owner)
        )
        self._heartbeat_runner.start()

    async def _heartbeat_in_thread(
        self, config: DeploymentConfig, functions: list[str], stop: asyncio.Event, owner: asyncio.AbstractEventLoop
    ) -> None:
        """Run the heartbeat loop of a twin in its thread, then close the twin's connections."""
        self._heartbeat_stop = stop
        self._owner_loop = owner
        try:
            await self._heartbeat_loop(config, functions)
        finally:
            await self.close()

    async def stop(self) -> None:
        """Announce draining, stop heartbeating and delete the registration. Safe to call when not started."""
        config, self._config = self._config, None
        if config is not None and self.has_change_feed:
            await self._announce_quietly("draining", config.deployment_id)
        await self._stop_heartbeats()
        if config is not None:
            async with self._translate_errors(f"deregistering {config.deployment_id}"):
                try:
                    async with asyncio.timeout(_DEREGISTER_TIMEOUT):
                        await self._deregister(config)
                except TimeoutError:
                    raise TimeoutError(f"no response within {_DEREGISTER_TIMEOUT:g} s") from None
            logger.info("deregistered deployment %s", config.deployment_id)

    async def _announce_quietly(self, kind: ChangeKind, deployment_id: str) -> None:
        """Announce a change; if that fails, callers still learn of it by their next lookup."""
        try:
            async with asyncio.timeout(_ANNOUNCE_TIMEOUT):
                await self._announce(kind, deployment_id)
        except Exception as exc:  # an announcement is only a hint
            logger.info("could not announce %s of %s: %s: %s", kind, deployment_id, type(exc).__name__, exc)

    async def _stop_heartbeats(self) -> None:
        """End the heartbeat loop between two heartbeats, without deregistering.

        The loop is asked to stop rather than cancelled, so no store operation is cut off halfway (a
        cancelled aiosqlite call leaves its thread calling back into a loop that may be closed).
        """
        runner, self._heartbeat_runner = self._heartbeat_runner, None
        if runner is not None and not await runner.stop(_HEARTBEAT_STOP_TIMEOUT):
            logger.warning("the heartbeat thread %s did not stop; it ends with the process", runner.name)
        task, self._heartbeat_task = self._heartbeat_task, None
        if task is None:
            return
        self._heartbeat_stop.set()
        if await _wait_task(task, _HEARTBEAT_STOP_TIMEOUT):
            return
        task.cancel()
        if not await _wait_task(task, _HEARTBEAT_STOP_TIMEOUT):
            logger.warning(
                "the heartbeat task %s did not stop within %g s of its cancellation, so it is left to end with "
                "the event loop",
                task.get_name(),
                _HEARTBEAT_STOP_TIMEOUT,
            )

    async def close(self) -> None:
        """Stop if started, end the change feed, then close the caller's connections and the store's."""
        try:
            await self.stop()
        finally:
            await self._stop_feed()
            await self.router.close()
            await self.router.transports.close()
            if self._own_events is not None:
                await self._own_events.close()
            await self._close_store()

    async def __aenter__(self) -> Self:
        await self.init()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def security(self) -> RemoteSecurity | None:
        """The remote secret this caller signs its calls with, or None."""
        return self.router.security

    @security.setter
    def security(self, security: RemoteSecurity | None) -> None:
        self.router.security = security

    @property
    def heartbeating(self) -> bool:
        """Whether the heartbeat loop runs, in its thread or as a task."""
        if self._heartbeat_runner is not None:
            return self._heartbeat_runner.alive
        return self._heartbeat_task is not None and not self._heartbeat_task.done()

    @property
    def deployment_id(self) -> str | None:
        """The id this service registered, or None before ``start``."""
        return self._config.deployment_id if self._config is not None else None

    def _in_flight(self) -> int | None:
        """Return the count of calls in flight to write to the registry, or None without a source."""
        source = self.in_flight_source
        if source is None:
            return None
        try:
            count = int(source())
        except Exception as exc:  # a broken source must not stop the heartbeats
            logger.debug("in_flight_source of %r raised %s: %s", self, type(exc).__name__, exc)
            return None
        return max(count, 0)

    # -- calling -----------------------------------------------------------------------------------

    async def invoke(
        self,
        name: str,
        data: Any = None,
        session: Any = None,
        trace_id: str | None = None,
        *,
        timeout: float | None = None,
        idempotent: bool | None = None,
        balancing: str | None = None,
    ) -> Any:
        """Call ``name`` on a live instance and return its result (Pikku's ``invoke``).

        ``timeout`` is in seconds and defaults to ``default_timeout``. ``idempotent`` allows retries
        after an uncertain failure; None takes the flag that the instance registered the function
        with. ``balancing`` overrides the strategy for this call.
        """
        budget = self.default_timeout if timeout is None else check_seconds(timeout, "timeout")
        check_flag(idempotent, "idempotent")
        return await self.call(
            name,
            data,
            session=session,
            trace_id=trace_id,
            deadline=time.monotonic() + budget,
            hop=1,
            idempotent=idempotent,
            balancing=balancing,
        )

    async def call(
        self,
        name: str,
        data: Any,
        *,
        session: Any,
        trace_id: str | None,
        deadline: float,
        hop: int,
        idempotent: bool | None,
        balancing: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Route one call with an absolute :func:`time.monotonic` deadline (used by ``RPC.remote``).

        ``headers`` are sent with every attempt, beside the metadata headers (an event's trace context).
        """
        # Callers need not call init(), and on a fresh store the lookup would query tables that do not exist.
        if not self._initialized:
            await self.init()
        if self._feed_task is None:
            self._ensure_change_feed()
        # Sessions travel only sealed in signed tokens, so without a remote secret the router drops them.
        return await self.router.call(
            name,
            data,
            deadline=deadline,
            trace_id=trace_id,
            hop=hop,
            idempotent=idempotent,
            session=session,
            balancing=balancing,
            headers=headers,
        )

    async def notify(
        self,
        name: str,
        data: Any = None,
        *,
        session: Any = None,
        trace_id: str | None = None,
        deadline: float | None = None,
        hop: int = 1,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Start ``name`` on a live instance without waiting for its result (one-way call).

        ``deadline`` (a :func:`time.monotonic` instant, by default ``default_timeout`` from now)
        bounds the wait for the broker's or worker's acknowledgement. See :meth:`RPC.notify`.
        """
        await self.init()
        self._ensure_change_feed()
        await self.router.notify(
            name,
            data,
            deadline=time.monotonic() + self.default_timeout if deadline is None else deadline,
            trace_id=trace_id,
            hop=hop,
            session=session,
            headers=headers,
        )

    async def publish(
        self,
        subject: str,
        data: Any = None,
        *,
        trace_id: str | None = None,
        deadline: float | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> str:
        """Publish an event on ``subject`` through :attr:`events`; return its event id once the broker stored it."""
        bus = self.events
        if bus is None:
            bus = self.events = self._own_events = event_bus_from_env()
        timeout = self.default_timeout if deadline is None else deadline - time.monotonic()
        if timeout <= 0:
            raise DeadlineExceededError(f"publishing on '{subject}' was not started because its deadline had passed")
        return await bus.publish(subject, data, trace_id=trace_id, headers=headers, timeout=timeout)

    @contextlib.asynccontextmanager
    async def _translate_errors(self, action: str) -> AsyncIterator[None]:
        """Raise a store's own exceptions as :class:`DiscoveryError`, naming the store and the action."""
        try:
            yield
        except PikkuMQError:
            raise
        except Exception as exc:
            # SQLAlchemy appends a "(Background on this error at: <url>)" line that adds nothing here.
            reason = str(exc).split("\n(Background on this error", 1)[0] or "no further detail"
            if isinstance(exc, TimeoutError) and not str(exc):
                reason = "timed out"
            raise DiscoveryError(f"{action} in {self!r} failed: {type(exc).__name__}: {reason}") from exc

    # -- change feed -------------------------------------------------------------------------------

    @property
    def change_feed_live(self) -> bool:
        """Whether this caller is subscribed to the change feed right now."""
        return self._feed_subscribed

    def _on_change(self, event: ChangeEvent | None) -> None:
        if event is None:
            if self._feed_failures.recovered():
                logger.info("change feed of %r is back; looking every function up again", self)
            self._feed_subscribed = True
        self._on_presence(event)

    def _ensure_change_feed(self) -> None:
        """Subscribe to the change feed in a task of its own, unless it is off or already running."""
        if self.change_feed and self._feed_task is None:
            self._feed_task = asyncio.create_task(self._feed_loop(), name=f"pikku-change-feed-{id(self):x}")

    def watch(
        self, *, poll_interval: float | None = None, include_existing: bool = True, presence: bool = True
    ) -> DeploymentWatch:
        """Return a :class:`~pikku_mq.DeploymentWatch` of the joins, draining, leaves and expiries in this registry.

        ``poll_interval`` (seconds, at least 0.1, default ``min(5, heartbeat_interval)``) is how often
        the table is listed, which bounds how late an expiry is reported past the TTL. With ``include_existing``
        every live instance is reported as a ``join`` first. With ``presence`` the watch also opens the
        NATS and AMQP connections that receive the workers' presence messages (``PIKKU_NATS_URL``,
        ``PIKKU_AMQP_URL``); a broker that cannot be reached is logged and left out.
        """
        if poll_interval is None:
            poll_interval = max(MIN_POLL_INTERVAL, min(5.0, self.heartbeat_interval))
        interval = check_poll_interval(poll_interval)
        return DeploymentWatch(self, poll_interval=interval, include_existing=include_existing, presence=presence)

    def _add_watch_listener(self, listener: Callable[[ChangeEvent | None], None]) -> None:
        self._watch_listeners.append(listener)

    def _remove_watch_listener(self, listener: Callable[[ChangeEvent | None], None]) -> None:
        with contextlib.suppress(ValueError):
            self._watch_listeners.remove(listener)

    def _on_presence(self, event: ChangeEvent | None) -> None:
        """Apply a change or presence event to the routing cache; None means the feed (re)subscribed."""
        for listener in self._watch_listeners:
            listener(event)
        if event is None or event.kind == "resync":
            self.router.resync()
        elif event.kind == "join":
            self.router.instance_joined(event.deployment_id)
            self.router.instance_alive(event.deployment_id, event.in_flight)
        elif event.kind in ("draining", "leave"):
            self.router.instance_left(event.deployment_id, event.endpoint)
        elif event.kind == "heartbeat":
            self.router.instance_alive(event.deployment_id, event.in_flight)
            self.router.instance_busy(event.deployment_id, event.busy)

    async def _feed_loop(self) -> None:
        """Keep a subscription to the change feed, subscribing again with backoff after each loss."""
        check_interval = min(_FEED_CHECK_INTERVAL, self.heartbeat_interval)
        delay = _FEED_FIRST_RETRY
        while True:
            try:
                await self._watch_changes(self._on_change, check_interval)
                raise ConnectionError("the change feed ended")  # noqa: TRY301 - handled as any other loss
            except asyncio.CancelledError:
                self._feed_subscribed = False
                raise
            except Exception as exc:  # the loop must outlive any failure of the store
                if self._feed_subscribed:
                    delay = _FEED_FIRST_RETRY  # it was up, so this is a new outage
                self._feed_subscribed = False
                self._feed_failures.failed(
                    logging.WARNING,
                    "change feed of %r lost, subscribing again with backoff; until then routing "
                    "caches expire as usual: %s: %s",
                    self,
                    type(exc).__name__,
                    exc,
                )
            # Jitter keeps many callers from subscribing again in step after an outage.
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 - not for security
            delay = min(delay * 2, _FEED_MAX_RETRY)

    async def _stop_feed(self) -> None:
        """Cancel the change feed task and wait for it, cancelling it once more if it outlives the first wait."""
        task, self._feed_task = self._feed_task, None
        if task is None:
            return
        task.cancel()
        if await _wait_task(task, _FEED_STOP_TIMEOUT):
            return
        # A store's client can drop a cancellation, as Python 3.11's asyncio.wait_for does when its
        # result arrives at the same moment. A second cancellation ends such a task unless the race repeats.
        logger.warning(
            "the change feed task of %r did not stop within %g s of its cancellation, so it is cancelled again",
            self,
            _FEED_STOP_TIMEOUT,
        )
        task.cancel()
        if not await _wait_task(task, _FEED_STOP_TIMEOUT):
            logger.warning(
                "the change feed task of %r did not stop within %g s of a second cancellation, so it is left to "
                "end with the event loop, and its connection may stay open until then",
                self,
                _FEED_STOP_TIMEOUT,
            )

    # -- heartbeats --------------------------------------------------------------------------------

    async def _heartbeat_loop(self, config: DeploymentConfig, functions: list[str]) -> None:
        """Heartbeat every ``heartbeat_interval`` seconds until ``_heartbeat_stop`` is set.

        A failed heartbeat is retried with backoff (see :func:`_heartbeat_retry_delay`), so a short
        outage costs a fraction of an interval and a registration is back within one interval of the
        store's return. No exception but the task's own cancellation leaves the loop.
        """
        health = _HeartbeatHealth(config.deployment_id, self.heartbeat_interval, self.router.telemetry)
        delay = self.heartbeat_interval
        while not await self._heartbeat_stopped(delay):
            try:
                restored, purged = await self._heartbeat_once(config, functions, quiet=health.failing)
            except asyncio.CancelledError:
                if _cancelling():
                    raise
                # The store's client raised CancelledError, although this task was not cancelled.
                self._initialized = False
                delay = health.failed(_StrayCancellationError("the store's client raised CancelledError"))
            except DeploymentConflictError as exc:
                delay = health.fenced(exc)
            except Exception as exc:  # the loop must outlive any failure of the store
                # The store may have been wiped (a deleted SQLite file): create the schema again next time.
                self._initialized = False
                delay = health.failed(exc)
            else:
                delay = health.succeeded(restored)
                if purged:
                    logger.info("removed %d stale deployments", purged)

    async def _heartbeat_stopped(self, delay: float) -> bool:
        """Wait ``delay`` seconds, or less once ``stop`` sets ``_heartbeat_stop``, and return whether it is set."""
        if await wait_for_event(self._heartbeat_stop, delay):
            return True
        if self._owner_loop is not None and self._owner_loop.is_closed():
            logger.info("heartbeats stop: the event loop that started them has closed")
            return True
        return False

    async def _heartbeat_once(self, config: DeploymentConfig, functions: list[str], *, quiet: bool) -> tuple[bool, int]:
        """Send one heartbeat, registering again if the registration is missing, then purge stale rows.

        Return whether it registered again and how many stale rows it purged. A missing registration
        is logged as a WARNING unless ``quiet``, because a store may well come back empty from an outage.
        """
        await self.init()
        restored = False
        if not await self._heartbeat(config, functions):
            await self._register(config, functions)
            restored = True
            if not quiet:
                logger.warning(
                    "registration of %s was missing from the registry; registered it again", config.deployment_id
                )
        return restored, await self._purge_stale()


_HEARTBEAT_FIRST_RETRY = 0.25
"""The max seconds before the first retry of a failed heartbeat. Each further failure doubles the delay."""


def _heartbeat_retry_delay(failures: int, interval: float) -> float:
    """Return the seconds to wait after the ``failures``-th failed heartbeat in a row.

    The delay starts at ``min(_HEARTBEAT_FIRST_RETRY, interval)`` and doubles up to ``interval``. The
    jitter only shortens it, so retries never fall further apart than one interval, and instances that
    lost the store at the same moment do not all retry in step.
    """
    base: float = min(_HEARTBEAT_FIRST_RETRY * 2.0 ** min(failures - 1, 32), interval)
    return base * random.uniform(0.8, 1.0)  # noqa: S311 - jitter, not security


class _HeartbeatHealth:
    """Failure state of one heartbeat loop, which decides what to log and how long to wait after each attempt.

    An outage logs one WARNING with its first error, a WARNING with the count of failed attempts at
    most every :data:`~pikku_mq._logs.SUMMARY_INTERVAL` seconds while it lasts, and one INFO when it
    ends. ``telemetry``, when set, counts every failed heartbeat.
    """

    def __init__(self, deployment_id: str, interval: float, telemetry: Telemetry | None = None) -> None:
        self.deployment_id = deployment_id
        self.interval = interval
        self.telemetry = telemetry
        self.log = RepeatedFailureLog(logger)
        self.is_fenced = False

    @property
    def failing(self) -> bool:
        return self.log.failing

    @property
    def failures(self) -> int:
        """Failed heartbeats in a row."""
        return self.log.failures

    def failed(self, error: Exception) -> float:
        """Record a failed heartbeat and return the seconds until the next attempt."""
        if self.telemetry is not None:
            self.telemetry.heartbeat_failed()
        self.log.failed(
            logging.WARNING,
            "heartbeat of %s failed, retrying with backoff up to every %.1f s: %s: %s",
            self.deployment_id,
            self.interval,
            type(error).__name__,
            error,
        )
        return _heartbeat_retry_delay(self.log.failures, self.interval)

    def fenced(self, error: DeploymentConflictError) -> float:
        """Record that a live instance at another endpoint has the id, and return the seconds until the next attempt."""
        if self.telemetry is not None:
            self.telemetry.heartbeat_failed()
        if not self.is_fenced:
            logger.error("deployment %s is not registered: %s", self.deployment_id, error)
        self.is_fenced = True
        return self.interval

    def succeeded(self, restored: bool) -> float:
        """Record a heartbeat that went through, and return the seconds until the next one."""
        started_at = self.log.started_at
        if started_at is not None:
            logger.info(
                "heartbeat of %s recovered after %.1f s and %d failed attempts%s",
                self.deployment_id,
                time.monotonic() - started_at,
                self.log.failures,
                "; the registration was missing, so it registered again" if restored else "",
            )
        elif self.is_fenced:
            logger.info("heartbeat of %s recovered", self.deployment_id)
        self.log.recovered()
        self.is_fenced = False
        return self.interval


async def _wait_task(task: asyncio.Task[None], timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``task`` to end, and return whether it ended.

    Unlike ``await task``, this neither raises the task's CancelledError nor drops a cancellation of the
    caller. Any other exception of the task is raised here.
    """
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if done and not task.cancelled():
        task.result()
    return bool(done)


def _cancelling() -> bool:
    """Return whether the running task has a pending cancellation request, not only a CancelledError in flight."""
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


class _StrayCancellationError(Exception):
    """A store's client raised CancelledError although the heartbeat task was not cancelled."""


def default_hostname() -> str:
    """Return the host name instances register with: ``PIKKU_HOSTNAME``, else :func:`socket.gethostname`.

    Set ``PIKKU_HOSTNAME`` where the OS host name does not name the machine, for example to the node
    name in a container, so that ``prefer_local`` callers find the instances on their node.
    """
    return os.environ.get(ENV_HOSTNAME, "").strip() or socket.gethostname()


def conflict_error(deployment_id: str, endpoint: str, age: float, ttl: float) -> DeploymentConflictError:
    """Return the error for an id that a live instance at ``endpoint`` already has."""
    return DeploymentConflictError(
        f"deployment id '{deployment_id}' is held by a live instance at {endpoint} (last heartbeat "
        f"{age:.1f} s ago); stop that instance, give this one another id, or wait {max(ttl - age, 0):.0f} s "
        "for that registration to expire",
        payload={"deployment_id": deployment_id, "endpoint": endpoint},
    )


def decode_string_list(raw: str | None) -> tuple[str, ...]:
    """Decode a stored JSON array of strings; a missing or malformed value is an empty tuple."""
    if not raw:
        return ()
    try:
        value = json.loads(raw)
    except ValueError:
        return ()
    return tuple(str(item) for item in value) if isinstance(value, list) else ()
