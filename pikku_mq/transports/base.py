"""The transport contract.

A client transport carries one :class:`~pikku_mq._types.CallRequest` to an endpoint and returns the
peer's :class:`Reply`. It raises only for failures of the transport itself:

- :class:`~pikku_mq.EndpointUnreachableError` when the call certainly did not reach the function
  (connection refused, no responders), so the router may send it to another instance;
- :class:`~pikku_mq.TransportError` when the call may have run (the connection broke mid-call);
- :class:`~pikku_mq.DeadlineExceededError` when no reply came within the timeout.

Error replies are not raised here: the router turns them into exceptions, so an error that a function
raised far downstream is never mistaken for a failure of this hop.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlsplit

from .._errors import ConfigurationError, PikkuMQError
from .._presence import ChangeEvent, ChangeKind
from .._types import CallRequest

if TYPE_CHECKING:
    from .._dispatch import Dispatcher

__all__ = [
    "ClientTransport",
    "PresenceListener",
    "PresencePublisher",
    "Reply",
    "ServerTransport",
    "TransportSet",
    "endpoint_scheme",
]

logger = logging.getLogger(__name__)

_MAX_CACHED_ENDPOINTS = 10_000
"""Endpoints whose scheme a TransportSet remembers; past that it starts over, so the cache stays bounded."""

PresenceListener = Callable[[ChangeEvent | None], None]
"""Receives presence events, and None after each (re)subscription, since events in a gap are lost."""


@dataclass(frozen=True, slots=True)
class Reply:
    """A peer's reply: the HTTP status and the decoded body (the result, or an error envelope).

    ``rejected`` is set when the worker declined the call before running it (it is draining), so the
    router can send it to another instance without risking a second run.
    """

    status: int
    body: Any
    rejected: bool = False


class ClientTransport(ABC):
    """Sends calls to endpoints of the schemes it lists."""

    schemes: ClassVar[tuple[str, ...]]

    @abstractmethod
    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        """Send ``request`` to ``endpoint`` and wait at most ``timeout`` seconds for the reply."""

    async def notify(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        """Hand a one-way call to ``endpoint`` and return the acceptance, without waiting for the function.

        By default the call goes out as a request with the ``pikku-one-way: 1`` header, to which a
        pikku_mq worker replies ``202`` once it admitted the call. A broker transport overrides
        this to store the call durably instead.
        """
        return await self.call(endpoint, request, timeout)

    async def close(self) -> None:  # noqa: B027 - closing is optional for transports without connections
        """Release connections. The transport may be used again afterwards and reconnects."""

    def set_presence_listener(self, listener: PresenceListener | None) -> None:  # noqa: B027 - no presence by default
        """Pass the presence events that workers publish on this transport's brokers to ``listener``.

        A transport without presence ignores the listener. One listener per transport: the last set wins.
        """

    async def open_presence(self, timeout: float) -> None:  # noqa: B027 - no presence by default
        """Connect now to receive presence events, instead of on the first call; raise if that fails."""


class PresencePublisher(ABC):
    """Publishes a worker's presence heartbeats on a broker connection of its own.

    The worker publishes from its heartbeat thread, so that a function that blocks the event loop
    does not stop the heartbeats. All methods run on that thread's event loop: the publisher opens its
    connection on first use, and opens it again after a failure.
    """

    @abstractmethod
    async def publish(self, kind: ChangeKind, deployment_id: str, in_flight: int | None, *, busy: bool) -> None:
        """Publish one presence event, or raise if it could not be sent."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connection, if one is open."""


class ServerTransport(ABC):
    """Takes calls at one endpoint and hands them to a :class:`~pikku_mq._dispatch.Dispatcher`.

    A worker starts one server per endpoint it advertises (its endpoint and its fallback endpoints).
    """

    @abstractmethod
    async def start(self, endpoint: str, dispatcher: Dispatcher) -> str:
        """Start taking calls at ``endpoint``; return the endpoint to advertise, with a chosen port filled in."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop taking calls and release the listener; the worker has drained the calls in flight by then."""

    async def begin_drain(self) -> None:  # noqa: B027 - most servers reject new calls through the dispatcher
        """Stop taking new calls where the broker can hand them to another worker; calls in flight go on."""

    async def announce(  # noqa: B027 - no presence by default
        self, kind: ChangeKind, deployment_id: str, in_flight: int | None = None
    ) -> None:
        """Publish a presence event for this worker, where the transport has a broker to carry it.

        ``in_flight`` is the worker's count of calls in flight, sent with the event when given.
        """

    def presence_publisher(self) -> PresencePublisher | None:
        """Return a publisher of this worker's heartbeats on a connection of its own, once the server has started.

        None means the transport has no broker, or that :meth:`announce` carries the heartbeats.
        """
        return None


class TransportSet:
    """The client transports a caller uses, by endpoint scheme."""

    def __init__(self, transports: Iterable[ClientTransport]) -> None:
        self._by_scheme: dict[str, ClientTransport] = {}
        self._schemes: dict[str, str] = {}
        """Schemes of the endpoints seen so far."""
        self._by_endpoint: dict[str, ClientTransport] = {}
        """The transport of each endpoint seen so far that has one, since every attempt looks its endpoint up twice."""
        for transport in transports:
            for scheme in transport.schemes:
                self._by_scheme[scheme] = transport

    @classmethod
    def default(cls) -> TransportSet:
        """Return the built-in transports: HTTP on aiohttp's client, the in-memory transport, and NATS and
        AMQP when nats-py and aio-pika are installed (none of them connects before its first call)."""
        from .http import AiohttpTransport
        from .memory import MemoryTransport

        transports: list[ClientTransport] = [AiohttpTransport(), MemoryTransport()]
        try:
            from .nats import NatsTransport
        except ImportError:
            pass
        else:
            transports.append(NatsTransport())
        try:
            from .amqp import AmqpTransport
        except ImportError:
            pass
        else:
            transports.append(AmqpTransport())
        return cls(transports)

    def replace(self, transport: ClientTransport) -> None:
        """Use ``transport`` for its schemes in place of the transport that served them."""
        for scheme in transport.schemes:
            self._by_scheme[scheme] = transport
        self._by_endpoint.clear()

    def for_endpoint(self, endpoint: str) -> ClientTransport | None:
        transport = self._by_endpoint.get(endpoint)
        if transport is None:
            transport = self._by_scheme.get(self._scheme(endpoint))
            if transport is not None:
                if len(self._by_endpoint) >= _MAX_CACHED_ENDPOINTS:
                    self._by_endpoint.clear()
                self._by_endpoint[endpoint] = transport
        return transport

    def supports(self, endpoint: str) -> bool:
        return self.for_endpoint(endpoint) is not None

    def _scheme(self, endpoint: str) -> str:
        scheme = self._schemes.get(endpoint)
        if scheme is None:
            scheme = endpoint_scheme(endpoint)
            if len(self._schemes) >= _MAX_CACHED_ENDPOINTS:
                self._schemes.clear()
            self._schemes[endpoint] = scheme
        return scheme

    def set_presence_listener(self, listener: PresenceListener | None) -> None:
        """Pass the presence events of every transport in the set to ``listener``."""
        for transport in {id(t): t for t in self._by_scheme.values()}.values():
            transport.set_presence_listener(listener)

    async def open_presence(self, timeout: float) -> None:
        """Connect every transport that carries presence, each within ``timeout`` seconds, logging those that fail."""
        for transport in {id(t): t for t in self._by_scheme.values()}.values():
            try:
                await transport.open_presence(timeout)
            except (PikkuMQError, OSError) as exc:
                logger.info("no presence events from %s: %s: %s", type(transport).__name__, type(exc).__name__, exc)

    async def close(self) -> None:
        for transport in {id(t): t for t in self._by_scheme.values()}.values():
            await transport.close()


def endpoint_scheme(endpoint: str) -> str:
    scheme = urlsplit(endpoint).scheme.lower()
    if not scheme:
        raise ConfigurationError(f"endpoint {endpoint!r} has no scheme; expected a URL such as http://host:port")
    return scheme
