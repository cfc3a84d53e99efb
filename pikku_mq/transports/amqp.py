"""AMQP 0.9.1 transport (RabbitMQ) on aio-pika: request-reply over direct reply-to.

An endpoint is ``amqp://host:port/<vhost>?queue=<queue>``: the worker consumes ``queue`` in ``vhost``,
and a caller publishes the call to the default exchange with the queue as routing key, ``mandatory``
set and ``reply_to`` set to RabbitMQ's direct reply-to pseudo-queue ``amq.rabbitmq.reply-to``.
docs/protocol.md describes the messages property by property.

Advertised endpoints never carry credentials. A caller connects with its own broker URL
(``PIKKU_AMQP_URL`` or ``url=``) and takes only the vhost and the queue from the endpoint. So every
instance of a mesh must reach the workers' queues through its own broker (one node or one cluster).

Choices, and why:

- The worker's queue is exclusive, so the broker deletes it when the worker's connection drops, and a
  stopping worker deletes it itself, once it has replied to the requests still queued with a rejection.
  So a call to a stopped or crashed worker comes back from the broker as unroutable at once
  (``mandatory``), instead of waiting until its deadline in a queue that no consumer reads. The queue
  is not auto-delete, because cancelling the consumer would then drop the requests that reached the
  queue meanwhile.
- The worker acknowledges each request when it arrives (at-most-once). It replies to a redelivered
  request with :class:`~pikku_mq.CallInterruptedError` instead of running it, so a redelivery never
  runs a call twice. Retrying is the caller's decision, and only for idempotent functions.
- The prefetch count is the worker's ``max_in_flight`` (at most 65,535). Since requests are acknowledged
  on arrival, it only bounds the requests read from the socket and not yet acknowledged. The
  dispatcher's limits decide what runs and what gets a busy reply, as on HTTP.
- Each request is served in a task owned by the server, not by the channel, so a function keeps running
  when the worker's connection drops and its reply goes out on the next connection, within the call's
  deadline.
- A caller keeps one connection per vhost, with one channel that has publisher confirms on (aio-pika
  reports a returned message only on such a channel) and consumes the direct reply-to pseudo-queue.
  A lost connection fails the calls waiting on it with :class:`~pikku_mq.TransportError` (direct
  replies to a closed channel are lost) and the next call connects again. A caller keeps no reconnect
  loop, so a call made while the broker is down fails at once with
  :class:`~pikku_mq.EndpointUnreachableError` instead of waiting for a reconnection.
- The worker reconnects on its own, with a backoff from 0.1 s to 5 s, and declares its queue again.
- Presence: a worker publishes its join, heartbeat, draining and leave events (JSON, as the discovery
  change feeds carry them) on the fanout exchange ``PIKKU_AMQP_PRESENCE_EXCHANGE`` (default
  ``pikku.presence``) of its vhost. A caller whose deployment service listens binds a queue of its own
  to that exchange when it connects to the vhost, and expires its cached lookups then, since events
  sent while it was not connected are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any, ClassVar, cast
from urllib.parse import parse_qs, quote, unquote, urlsplit

import aio_pika
import aiormq
import aiormq.exceptions
import msgpack
import pydantic_core
from aiormq.abc import DeliveredMessage
from pamqp import commands as spec
from yarl import URL

from .._dispatch import header_count
from .._errors import (
    BadRequestError,
    CallInterruptedError,
    ConfigurationError,
    DeadlineExceededError,
    DeploymentConflictError,
    EndpointUnreachableError,
    OutputValidationError,
    PayloadTooLargeError,
    PikkuMQError,
    ProtocolError,
    ServiceUnavailableError,
    TransportError,
    UnsupportedMediaTypeError,
)
from .._logs import RepeatedFailureLog
from .._presence import ChangeKind, decode_change, encode_change
from .._settings import default_amqp_url
from .._types import HEADER_CALL_ID, HEADER_DEADLINE, HEADER_HOP, HEADER_REQUEST_ID, MAX_DEADLINE_DIGITS, CallRequest
from ._amqp_frames import DamagedProperties, install, lenient_frames
from .base import ClientTransport, PresenceListener, PresencePublisher, Reply, ServerTransport
from .http import DEFAULT_MAX_BODY_SIZE, _decode_call_body

if TYPE_CHECKING:
    from .._dispatch import Dispatcher

__all__ = [
    "DEFAULT_HEARTBEAT",
    "DEFAULT_MAX_MESSAGE_SIZE",
    "AmqpEndpoint",
    "AmqpServer",
    "AmqpTransport",
    "parse_endpoint",
]

logger = logging.getLogger(__name__)

_BEARER_TOKEN = re.compile(r"Bearer\s+[A-Za-z0-9_\-.=+/]+")


class _RedactBearerTokens(logging.Filter):
    """Replace the signed tokens in aiormq's log records with ``Bearer ***``.

    At DEBUG, aiormq 7 logs every frame it sends with its properties, the ``authorization`` header of a
    signed call included, and at ERROR it logs a returned message that no handler took. A token is
    valid for minutes and carries the sealed session, so it must not reach the logs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted fails in the handler, as it would without this filter
            return True
        if "Bearer" in message:
            record.msg = _BEARER_TOKEN.sub("Bearer ***", message)
            record.args = ()
        return True


_REDACT_BEARER_TOKENS = _RedactBearerTokens()
for _name in ("aiormq.connection", "aiormq.channel"):
    if _REDACT_BEARER_TOKENS not in logging.getLogger(_name).filters:
        logging.getLogger(_name).addFilter(_REDACT_BEARER_TOKENS)

install()

DEFAULT_MAX_MESSAGE_SIZE = 128 * 1024 * 1024
"""RabbitMQ's default ``max_message_size`` in bytes (``rabbitmqctl environment`` shows 134217728 on
3.10.8). The broker closes the channel of a larger message."""

DEFAULT_HEARTBEAT = 15
"""Heartbeat timeout in seconds, unless the broker URL sets ``?heartbeat=`` (aiormq's default is 60).
RabbitMQ sends heartbeats every half timeout and closes a connection after two missed ones. So the
queue of a worker whose host vanished goes away after an estimated 15 to 30 s."""

ENV_PRESENCE_EXCHANGE = "PIKKU_AMQP_PRESENCE_EXCHANGE"
DEFAULT_PRESENCE_EXCHANGE = "pikku.presence"


def presence_exchange() -> str:
    """Return the fanout exchange of presence events: ``PIKKU_AMQP_PRESENCE_EXCHANGE``, else ``pikku.presence``."""
    return os.environ.get(ENV_PRESENCE_EXCHANGE, "").strip() or DEFAULT_PRESENCE_EXCHANGE


async def _declare_presence(channel: aiormq.Channel, exchange: str) -> None:
    # Not durable and not auto-deleted: presence is transient, and callers bind and unbind all the time.
    await channel.exchange_declare(exchange=exchange, exchange_type="fanout", durable=False, auto_delete=False)


REPLY_TO = "amq.rabbitmq.reply-to"
HEADER_FUNCTION = "pikku-function"
HEADER_STATUS = "pikku-status"
HEADER_REJECTED = "pikku-rejected"
MSGPACK = "application/msgpack"

_MSGPACK_TYPES = frozenset({MSGPACK, "application/x-msgpack", ""})
_METADATA_HEADERS = frozenset(
    {HEADER_REQUEST_ID, HEADER_CALL_ID, HEADER_DEADLINE, HEADER_HOP, "authorization", "traceparent", "tracestate"}
)
_NUMERIC_HEADERS = frozenset({HEADER_DEADLINE, HEADER_HOP})
_MAX_QUEUE_NAME = 255
"""Maximum bytes in a queue name, since AMQP 0.9.1 sends it as a short string."""
_MAX_PREFETCH = 65535
_FIRST_RECONNECT_DELAY = 0.1
_MAX_RECONNECT_DELAY = 5.0
_RECONNECT_PAUSE = 5.0
"""Seconds a caller fails fast after a failed connection attempt to a vhost before it tries again, so a
stalled broker does not cost every call the connect timeout before the call moves to a fallback."""
_STOP_TIMEOUT = 5.0
_LEFTOVER_ROUNDS = 5
"""Times a stopping server empties its queue and tries to delete it while requests keep arriving."""
"""Seconds that :meth:`AmqpServer.stop` waits for the replies still being sent, and for the broker."""
_MAX_CACHED_ENDPOINTS = 10_000
"""Parsed endpoints a caller keeps; past that, new endpoints are parsed on every call."""
_REPLY_WAIT_LIMIT = 300.0
"""Maximum seconds that a reply waits for the worker to reconnect, whatever the deadline of its call."""


# -- endpoints -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AmqpEndpoint:
    """The parts of an AMQP endpoint: the broker's address, and the vhost and queue that take the calls."""

    scheme: str
    host: str | None
    port: int | None
    vhost: str
    queue: str | None
    has_credentials: bool = False

    def advertised(self) -> str:
        """Return the endpoint as a worker advertises it: no credentials, the vhost always spelled out."""
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{host}:{self.port}" if self.port is not None else host
        query = f"?queue={quote(self.queue, safe='')}" if self.queue else ""
        return f"{self.scheme}://{netloc}/{quote(self.vhost, safe='')}{query}"


def parse_endpoint(endpoint: str, *, worker: bool = False) -> AmqpEndpoint:
    """Parse ``amqp://host:port/<vhost>?queue=<queue>``, raising ConfigurationError if it is invalid.

    The vhost is percent-encoded (``/`` as ``%2F``), and an empty path means the vhost ``/``. With
    ``worker`` set, the stricter rules of an endpoint to serve apply: no credentials, and no query
    parameter but ``queue``.
    """
    redacted = _without_password(endpoint)
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"endpoint {redacted!r} is not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in AmqpTransport.schemes:
        raise ConfigurationError(f"endpoint {redacted!r} is not an amqp:// URL")

    raw_path = parts.path[1:] if parts.path.startswith("/") else parts.path
    if "/" in raw_path:
        raise ConfigurationError(
            f"endpoint {redacted!r} has a path with several segments; the path is the vhost, with '/' written as %2F"
        )
    vhost = unquote(raw_path) or "/"

    query = parse_qs(parts.query, keep_blank_values=True)
    queues = query.pop("queue", [])
    if len(queues) > 1:
        raise ConfigurationError(f"endpoint {redacted!r} names more than one queue")
    queue = queues[0] if queues and queues[0] else None
    if queue is not None:
        _check_queue_name(queue, redacted)

    has_credentials = parts.username is not None or parts.password is not None
    if worker:
        if has_credentials:
            raise ConfigurationError(
                f"endpoint {redacted!r} contains credentials, and endpoints are advertised to "
                "every instance; give the worker its broker URL with amqp_url= or PIKKU_AMQP_URL instead"
            )
        if query:
            raise ConfigurationError(
                f"endpoint {redacted!r} has unknown query parameters {sorted(query)}; only 'queue' is allowed"
            )
    return AmqpEndpoint(scheme, parts.hostname, port, vhost, queue, has_credentials)


def _check_queue_name(queue: str, redacted: str) -> None:
    if len(queue.encode()) > _MAX_QUEUE_NAME:
        raise ConfigurationError(f"endpoint {redacted!r} names a queue longer than {_MAX_QUEUE_NAME} bytes")
    if queue.startswith("amq."):
        raise ConfigurationError(f"endpoint {redacted!r} names queue {queue!r}; names starting 'amq.' are reserved")


def queue_for_deployment(deployment_id: str) -> str:
    """Return the queue a worker consumes when its endpoint names none: ``pikku.<deployment id>``."""
    name = f"pikku.{deployment_id or uuid.uuid4().hex}"
    if len(name.encode()) > _MAX_QUEUE_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:16]
        name = name.encode()[: _MAX_QUEUE_NAME - 17].decode(errors="ignore") + "." + digest
    return name


def _without_password(url: str) -> str:
    try:
        parsed = URL(url)
        return str(parsed.with_password(None)) if parsed.password is not None else url
    except (ValueError, TypeError):
        return "<a URL that cannot be parsed>"


def _broker_label(url: URL) -> str:
    """Return the broker URL to show in messages: scheme, user, host, port and vhost, without the password."""
    return str(url.with_password(None).with_query(None))


def _connection_url(url: str, vhost: str) -> URL:
    try:
        base = URL(url)
        host = base.host
        base.port  # noqa: B018 - yarl parses the port on first access and raises ValueError for a bad one
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"AMQP broker URL {_without_password(url)!r} is not a valid URL: {exc}") from None
    if base.scheme not in AmqpTransport.schemes or not host:
        raise ConfigurationError(
            f"AMQP broker URL {_without_password(url)!r} is not an amqp:// or amqps:// URL with a host"
        )
    connect_to = base.with_path("/" + quote(vhost, safe=""), encoded=True).with_query(base.query)
    return connect_to if "heartbeat" in connect_to.query else connect_to.update_query(heartbeat=DEFAULT_HEARTBEAT)


def _connect_error(exc: BaseException, url: URL, vhost: str) -> PikkuMQError:
    """Return the error to raise for a failed connection attempt: unreachable, or misconfigured."""
    label = _broker_label(url)
    if isinstance(exc, aiormq.exceptions.ProbableAuthenticationError | aiormq.exceptions.AuthenticationError):
        return ConfigurationError(
            f"the AMQP broker at {label} rejected the login of user {url.user!r}: {exc}. "
            "Check the user and password in the broker URL (PIKKU_AMQP_URL or amqp_url)"
        )
    if isinstance(exc, TimeoutError):
        return EndpointUnreachableError(f"connecting to the AMQP broker at {label} timed out")
    if isinstance(exc, aiormq.exceptions.InvalidFrameError | aiormq.exceptions.ConnectionNotAllowed):
        return EndpointUnreachableError(
            f"the AMQP broker at {label} failed to open vhost {vhost!r} ({type(exc).__name__}). Check that the "
            f"vhost exists and that user {url.user!r} has permissions on it"
        )
    reason = str(exc) or type(exc).__name__
    return EndpointUnreachableError(f"cannot connect to the AMQP broker at {label}: {reason}")


# -- codec -----------------------------------------------------------------------------------------


def _pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value)
    return packed


def _request_headers(table: Mapping[str, Any] | None) -> dict[str, str]:
    """Convert the message headers to the strings that the dispatcher reads.

    ``pikku-deadline-ms`` and ``pikku-hop`` may also be numbers. Any other pikku_mq header that is not
    a string raises BadRequestError. Other headers are kept as text when they are numbers, and left out
    when they have another type, such as a tracing tool's tables.
    """
    headers: dict[str, str] = {}
    for key, value in (table or {}).items():
        name = str(key).lower()
        ours = name in _METADATA_HEADERS or name.startswith("pikku-")
        text: str | None = None
        if isinstance(value, str):
            text = value
        elif isinstance(value, bytes):
            with contextlib.suppress(UnicodeDecodeError):
                text = value.decode()
        elif _is_number(value) and (not ours or name in _NUMERIC_HEADERS):
            text = str(value)
        if text is None:
            if ours:
                raise BadRequestError(f"header {name} must be a string, got {type(value).__name__}")
            continue
        headers[name] = text
    return headers


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _reply_status(value: Any) -> int | None:
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) == 3:
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599:
        return value
    return None


def _decode_reply(message: DeliveredMessage, endpoint: str, name: str) -> Reply:
    properties = message.header.properties
    headers = properties.headers or {}
    status = _reply_status(headers.get(HEADER_STATUS))
    if status is None:
        raise ProtocolError(
            f"the reply from {endpoint} to '{name}' is not a pikku_mq reply: it has no valid {HEADER_STATUS} header"
        )
    content_type = (properties.content_type or "").split(";", 1)[0].strip().lower()
    if content_type not in _MSGPACK_TYPES:
        raise ProtocolError(
            f"the reply from {endpoint} to '{name}' has content type {content_type[:100]!r}, not msgpack"
        )
    try:
        body = msgpack.unpackb(message.body, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"the reply from {endpoint} to '{name}' is not valid msgpack: {exc}") from None
    rejected = headers.get(HEADER_REJECTED) in ("1", b"1", 1, True)
    return Reply(status=status, body=body, rejected=rejected)


# -- calling ---------------------------------------------------------------------------------------


class _LinkLostError(Exception):
    """Raised in a waiting call when the connection or channel of its link closes."""


class _Link:
    """A caller's connection to one vhost, with a channel that has publisher confirms on and consumes direct replies."""

    def __init__(self, connection: aio_pika.abc.AbstractConnection, channel: aiormq.Channel) -> None:
        self.connection = connection
        self.channel = channel
        self.pending: dict[str, asyncio.Future[DeliveredMessage]] = {}
        self.lost = False

    @classmethod
    async def open(
        cls, url: URL, vhost: str, timeout: float, name: str, presence: PresenceListener | None = None
    ) -> _Link:
        try:
            with lenient_frames():
                connection = await aio_pika.connect(url, timeout=timeout, client_properties={"connection_name": name})
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
            raise _connect_error(exc, url, vhost) from exc
        try:
            async with asyncio.timeout(timeout):
                wrapper = await connection.channel(publisher_confirms=True, on_return_raises=True)
                channel = cast(aiormq.Channel, await wrapper.get_underlay_channel())
                link = cls(connection, channel)
                # Direct reply-to: consume the pseudo-queue without acks before the first publish.
                await channel.basic_consume(REPLY_TO, link._on_reply, no_ack=True)
                if presence is not None:
                    await link._subscribe_presence(presence)
        except BaseException as exc:
            await connection.close()
            if isinstance(exc, aiormq.exceptions.AMQPError | OSError | TimeoutError | RuntimeError):
                raise EndpointUnreachableError(
                    f"cannot open a channel on the AMQP broker at {_broker_label(url)}: {exc or type(exc).__name__}"
                ) from exc
            raise
        connection.close_callbacks.add(link._on_close)
        wrapper.close_callbacks.add(link._on_close)
        if presence is not None:
            # Lookups made before this subscription may miss events: the listener expires them.
            presence(None)
        return link

    async def _subscribe_presence(self, listener: PresenceListener) -> None:
        """Bind a queue of this connection's own to the presence exchange and pass its events on."""
        exchange = presence_exchange()
        await _declare_presence(self.channel, exchange)
        declared = await self.channel.queue_declare("", exclusive=True, auto_delete=True)
        queue = declared.queue
        assert queue is not None
        await self.channel.queue_bind(queue, exchange, routing_key="")

        async def on_event(message: DeliveredMessage) -> None:
            event = decode_change(message.body)
            if event is not None:
                listener(event)

        await self.channel.basic_consume(queue, on_event, no_ack=True)

    @property
    def usable(self) -> bool:
        return not self.lost and not self.channel.is_closed and self.connection.connected.is_set()

    async def _on_reply(self, message: DeliveredMessage) -> None:
        future = self.pending.pop(message.header.properties.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message)
        elif future is None:
            logger.debug("dropped a late or unknown AMQP reply %r", message.header.properties.correlation_id)

    def _on_close(self, sender: Any, exc: BaseException | None = None) -> None:
        self.lost = True
        pending, self.pending = self.pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(_LinkLostError(str(exc) if exc else "closed"))

    async def request(self, queue: str, body: bytes, properties: spec.Basic.Properties) -> DeliveredMessage:
        """Publish one request and wait for its reply, for as long as the caller waits."""
        correlation_id = properties.correlation_id or ""
        future: asyncio.Future[DeliveredMessage] = asyncio.get_running_loop().create_future()
        self.pending[correlation_id] = future
        try:
            await self.channel.basic_publish(body, routing_key=queue, properties=properties, mandatory=True, wait=False)
            return await future
        finally:
            self.pending.pop(correlation_id, None)
            if future.done() and not future.cancelled():
                # Mark the exception retrieved: a lost link may fail the future after the publish raised.
                future.exception()

    async def close(self) -> None:
        self.lost = True
        with contextlib.suppress(Exception):
            await self.connection.close()


class AmqpTransport(ClientTransport):
    """AMQP client transport: one connection per vhost, opened on its first call, with direct reply-to.

    ``url`` is the broker URL with the caller's credentials (default ``PIKKU_AMQP_URL``, else
    ``amqp://guest:guest@127.0.0.1:5672/``), and each endpoint's vhost replaces its vhost. A request
    larger than ``max_message_size`` bytes (RabbitMQ's ``max_message_size``, 128 MiB by default) raises
    :class:`~pikku_mq.PayloadTooLargeError` before it is published, because the broker would close the
    channel under the other calls. Constructing the transport does not connect.
    """

    schemes: ClassVar[tuple[str, ...]] = ("amqp", "amqps")

    def __init__(
        self,
        url: str | None = None,
        *,
        connect_timeout: float = 5.0,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connection_name: str = "pikku-mq caller",
    ) -> None:
        # Checked on the first call, so a wrong PIKKU_AMQP_URL does not break callers that never use AMQP.
        self.url = url or default_amqp_url()
        self.connect_timeout = connect_timeout
        self.max_message_size = max_message_size
        self.connection_name = connection_name
        self._links: dict[str, _Link] = {}
        self._opening: dict[str, asyncio.Task[_Link]] = {}
        self._presence_listener: PresenceListener | None = None
        self._failures: dict[str, tuple[float, EndpointUnreachableError]] = {}
        self._targets: dict[str, AmqpEndpoint] = {}
        """Endpoints parsed so far, so a call does not parse its endpoint again."""

    def set_presence_listener(self, listener: PresenceListener | None) -> None:
        """Pass presence events to ``listener``; each vhost's connection subscribes when it opens next."""
        self._presence_listener = listener

    async def open_presence(self, timeout: float) -> None:
        """Open the connection to the vhost of ``url``, which binds a presence queue, if a listener is set."""
        if self._presence_listener is not None:
            try:
                vhost = unquote(URL(self.url).raw_path.lstrip("/")) or "/"
            except (ValueError, TypeError) as exc:
                raise ConfigurationError(
                    f"AMQP broker URL {_without_password(self.url)!r} is not a valid URL: {exc}"
                ) from None
            await self._link(vhost, timeout, _without_password(self.url))

    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        deadline = time.monotonic() + timeout
        target = self._targets.get(endpoint)
        if target is None:
            try:
                target = parse_endpoint(endpoint)
            except ConfigurationError as exc:
                raise EndpointUnreachableError(f"cannot call {endpoint}: {exc}") from None
            if len(self._targets) < _MAX_CACHED_ENDPOINTS:
                self._targets[endpoint] = target
        if target.queue is None:
            raise EndpointUnreachableError(f"cannot call {endpoint}: the endpoint names no queue")
        body = self._encode(request)

        link = await self._link(target.vhost, timeout, endpoint)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(f"call to '{request.name}' timed out while connecting for {endpoint}")
        correlation_id = os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID
        properties = spec.Basic.Properties(
            content_type=MSGPACK,
            delivery_mode=1,
            correlation_id=correlation_id,
            message_id=correlation_id,
            reply_to=REPLY_TO,
            # The request expires in the queue when the caller stops waiting for it.
            expiration=str(max(1, math.ceil(remaining * 1000))),
            headers={**request.headers, HEADER_FUNCTION: request.name},
        )
        try:
            async with asyncio.timeout(remaining):
                message = await link.request(target.queue, body, properties)
        except TimeoutError:
            raise DeadlineExceededError(
                f"no reply from {endpoint} to '{request.name}' within {timeout:.3f} s"
            ) from None
        except aiormq.exceptions.ChannelInvalidStateError:
            # aiormq raises it on entering the publish, so the request was not sent.
            raise EndpointUnreachableError(
                f"the channel to the AMQP broker closed before the call to '{request.name}' at {endpoint} was sent"
            ) from None
        except aiormq.exceptions.PublishError:
            raise EndpointUnreachableError(
                f"no queue {target.queue!r} in vhost {target.vhost!r}: the worker at {endpoint} is gone"
            ) from None
        except aiormq.exceptions.DeliveryError as exc:
            raise EndpointUnreachableError(f"the AMQP broker rejected the call to {endpoint}: {exc}") from None
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            if "max size" in str(exc):
                raise PayloadTooLargeError(
                    f"the AMQP broker rejected the call to '{request.name}': {exc}", payload={"size": len(body)}
                ) from None
            raise TransportError(f"call to '{request.name}' at {endpoint} failed: {exc}") from None
        except (_LinkLostError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise TransportError(
                f"the connection to the AMQP broker closed during the call to '{request.name}' at {endpoint}; "
                f"it may have run: {exc}"
            ) from None
        return _decode_reply(message, endpoint, request.name)

    async def notify(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        """Store a one-way call in the durable queue ``pikku.notify.<function>`` of the endpoint's vhost.

        It returns once the broker confirmed the persistent message. A vhost without that queue (no
        worker there takes durable one-way calls) returns the message as unroutable, which raises
        :class:`EndpointUnreachableError`.
        """
        from .amqp_durable import notify_queue

        deadline = time.monotonic() + timeout
        try:
            target = parse_endpoint(endpoint)
        except ConfigurationError as exc:
            raise EndpointUnreachableError(f"cannot call {endpoint}: {exc}") from None
        body = self._encode(request)
        link = await self._link(target.vhost, timeout, endpoint)
        queue = notify_queue(request.name)
        properties = spec.Basic.Properties(
            content_type=MSGPACK,
            delivery_mode=2,
            message_id=request.headers.get(HEADER_CALL_ID),
            headers={**request.headers, HEADER_FUNCTION: request.name},
        )
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                confirmation = await link.channel.basic_publish(
                    body, routing_key=queue, properties=properties, mandatory=True
                )
        except TimeoutError:
            raise DeadlineExceededError(
                f"the AMQP broker did not confirm the one-way call to '{request.name}' within {timeout:.3f} s; "
                "it may have been stored"
            ) from None
        except aiormq.exceptions.ChannelInvalidStateError:
            raise EndpointUnreachableError(
                f"the channel to the AMQP broker closed before the one-way call to '{request.name}' was sent"
            ) from None
        except aiormq.exceptions.PublishError:
            raise EndpointUnreachableError(
                f"no queue {queue!r} in vhost {target.vhost!r}: no worker there takes durable one-way calls "
                "(start them with PikkuWorker(durable_notify=True))"
            ) from None
        except (_LinkLostError, aiormq.exceptions.AMQPError, ConnectionError) as exc:
            raise TransportError(
                f"the connection to the AMQP broker closed during the one-way call to '{request.name}'; "
                f"it may have been stored: {exc}"
            ) from None
        if not isinstance(confirmation, spec.Basic.Ack):
            raise TransportError(f"the AMQP broker did not store the one-way call to '{request.name}' ({confirmation})")
        return Reply(status=202, body=None)

    def _encode(self, request: CallRequest) -> bytes:
        try:
            body = _pack({"data": pydantic_core.to_jsonable_python(request.data)})
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError, OverflowError) as exc:
            raise BadRequestError(f"data for function '{request.name}' cannot be serialised: {exc}") from None
        if len(body) > self.max_message_size:
            raise PayloadTooLargeError(
                f"the call to '{request.name}' is {len(body)} bytes, over the AMQP message limit of "
                f"{self.max_message_size} bytes",
                payload={"size": len(body), "max_message_size": self.max_message_size},
            )
        return body

    async def _link(self, vhost: str, timeout: float, endpoint: str) -> _Link:
        link = self._links.get(vhost)
        if link is not None and link.usable:
            return link
        failure = self._failures.get(vhost)
        if failure is not None and time.monotonic() - failure[0] < _RECONNECT_PAUSE:
            raise EndpointUnreachableError(f"{failure[1]} (a moment ago; trying again within {_RECONNECT_PAUSE:g} s)")
        opening = self._opening.get(vhost)
        if opening is None:
            opening = asyncio.create_task(self._open(vhost), name=f"pikku-amqp-connect-{vhost}")
            opening.add_done_callback(_retrieve)
            self._opening[vhost] = opening
        try:
            async with asyncio.timeout(timeout):
                # Shielded, because the calls that wait for one connection share it and may time out first.
                return await asyncio.shield(opening)
        except TimeoutError:
            raise DeadlineExceededError(f"connecting to the AMQP broker for {endpoint} timed out") from None

    async def _open(self, vhost: str) -> _Link:
        try:
            old = self._links.pop(vhost, None)
            if old is not None:
                await old.close()
            try:
                link = await _Link.open(
                    _connection_url(self.url, vhost),
                    vhost,
                    self.connect_timeout,
                    self.connection_name,
                    presence=self._presence_listener,
                )
            except EndpointUnreachableError as exc:
                self._failures[vhost] = (time.monotonic(), exc)
                raise
            self._failures.pop(vhost, None)
            self._links[vhost] = link
            return link
        finally:
            self._opening.pop(vhost, None)

    async def close(self) -> None:
        opening, self._opening = list(self._opening.values()), {}
        for task in opening:
            task.cancel()
        await asyncio.gather(*opening, return_exceptions=True)
        links, self._links = list(self._links.values()), {}
        for link in links:
            await link.close()


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


# -- serving ---------------------------------------------------------------------------------------


class AmqpServer(ServerTransport):
    """Serves a :class:`~pikku_mq._dispatch.Dispatcher` on an exclusive queue, which it deletes when it stops.

    ``url`` is the broker URL with the worker's credentials (default ``PIKKU_AMQP_URL``). The vhost and
    the queue come from the endpoint, and the queue defaults to ``pikku.<deployment id>``. The
    advertised endpoint has the endpoint's host and port, or the URL's when the endpoint has none, and
    never credentials. A request body over ``max_body_size`` bytes gets a 413 reply. A reply over
    ``max_message_size`` bytes is replaced by a 413 error, because the broker would close the channel.
    """

    def __init__(
        self,
        *,
        url: str | None = None,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        connect_timeout: float = 10.0,
        prefetch_count: int | None = None,
    ) -> None:
        self.url = url or default_amqp_url()
        _connection_url(self.url, "/")
        self.max_body_size = max_body_size
        self.max_message_size = max_message_size
        self.connect_timeout = connect_timeout
        self.prefetch_count = prefetch_count
        self.endpoint: str | None = None
        self._dispatcher: Dispatcher | None = None
        self._url: URL | None = None
        self._vhost = "/"
        self._queue = ""
        self._consumer_tag = f"pikku-{uuid.uuid4().hex}"
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._wrapper: aio_pika.abc.AbstractChannel | None = None
        self._channel: aiormq.Channel | None = None
        self._presence_channel: aiormq.Channel | None = None
        """The channel on which the presence exchange was declared last."""
        self._ready = asyncio.Event()
        self._lost = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._dropped = 0
        """Malformed requests without reply_to that the server dropped."""
        self.reconnects = 0
        """Number of times the server reconnected after losing its connection or channel."""

    @property
    def connected(self) -> bool:
        """True while the server consumes its queue."""
        return self._ready.is_set()

    async def start(self, endpoint: str, dispatcher: Dispatcher) -> str:
        target = parse_endpoint(endpoint, worker=True)
        self._dispatcher = dispatcher
        self._vhost = target.vhost
        self._queue = target.queue or queue_for_deployment(dispatcher.deployment_id)
        self._url = _connection_url(self.url, self._vhost)
        self._stopping = False
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"pikku-amqp-server-{self._queue}")
        self.endpoint = AmqpEndpoint(
            target.scheme,
            target.host or self._url.host,
            target.port if target.host else self._url.port,
            self._vhost,
            self._queue,
        ).advertised()
        return self.endpoint

    async def stop(self) -> None:
        self._stopping = True
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        channel = self._channel
        if channel is not None and not channel.is_closed:
            try:
                await channel.basic_cancel(self._consumer_tag, timeout=_STOP_TIMEOUT)
                await self._reject_leftovers(channel)
            except Exception as exc:
                logger.warning("AMQP server on queue %s failed to empty and delete its queue: %s", self._queue, exc)
        if self._tasks:
            # Wait for the replies still being sent, which include the rejections of a draining worker.
            _, still = await asyncio.wait(set(self._tasks), timeout=_STOP_TIMEOUT)
            for task in still:
                task.cancel()
            await asyncio.gather(*still, return_exceptions=True)
        await self._close_connection()
        self._ready.clear()

    async def _reject_leftovers(self, channel: aiormq.Channel) -> None:
        """Reply to the requests still in the queue with a rejection, then delete the queue once it is empty.

        A request published after the consumer was cancelled would otherwise go down with the queue and
        leave its caller waiting for its deadline. Deleting only an empty queue is atomic on the broker,
        so a request either gets its reply here or, after the deletion, returns to its caller as unroutable.
        """
        for _ in range(_LEFTOVER_ROUNDS):
            while True:
                message = await channel.basic_get(self._queue, no_ack=True, timeout=_STOP_TIMEOUT)
                if isinstance(message.delivery, spec.Basic.GetEmpty):
                    break
                await self._serve(message)  # the server is stopping, so this replies "rejected"
            try:
                await channel.queue_delete(self._queue, if_empty=True, timeout=_STOP_TIMEOUT)
            except aiormq.exceptions.ChannelPreconditionFailed:
                # A request arrived after the last get; the broker closed the channel for it.
                assert self._connection is not None
                wrapper = await self._connection.channel(publisher_confirms=False)
                channel = cast(aiormq.Channel, await wrapper.get_underlay_channel())
                self._wrapper, self._channel = wrapper, channel
                continue
            return
        logger.warning("AMQP server on queue %s kept receiving requests while stopping", self._queue)

    async def announce(self, kind: ChangeKind, deployment_id: str, in_flight: int | None = None) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            return  # callers learn of the change from discovery
        exchange = presence_exchange()
        if self._presence_channel is not channel:
            await _declare_presence(channel, exchange)
            self._presence_channel = channel
        properties = spec.Basic.Properties(content_type="application/json", delivery_mode=1)
        body = encode_change(kind, deployment_id, self.endpoint or "", in_flight).encode()
        await channel.basic_publish(body, exchange=exchange, routing_key="", properties=properties)

    def presence_publisher(self) -> PresencePublisher | None:
        if self._url is None or self.endpoint is None:
            return None
        return _AmqpPresencePublisher(self._url, self.endpoint, self.connect_timeout)

    # -- connection --------------------------------------------------------------------------------

    async def _open(self) -> None:
        """Connect if needed, then consume the queue on a new channel; raise the error of a failed step."""
        connection = self._connection
        # aio-pika sets is_closed only in close(), so a connection that the broker closed shows as not connected.
        if connection is None or connection.is_closed or not connection.connected.is_set():
            connection = await self._connect()
        await self._consume(connection)
        self._lost.clear()
        self._ready.set()

    async def _connect(self) -> aio_pika.abc.AbstractConnection:
        assert self._url is not None
        assert self._dispatcher is not None
        await self._close_connection()

        name = f"pikku-mq worker {self._dispatcher.deployment_id}"
        try:
            # A request whose properties fail to decode must not close the connection (see _amqp_frames).
            with lenient_frames():
                connection = await aio_pika.connect(
                    self._url, timeout=self.connect_timeout, client_properties={"connection_name": name}
                )
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
            raise _connect_error(exc, self._url, self._vhost) from exc

        connection.close_callbacks.add(self._on_connection_closed)
        self._connection = connection
        return connection

    async def _consume(self, connection: aio_pika.abc.AbstractConnection) -> None:
        """Open a channel, declare the queue and consume it."""
        assert self._url is not None
        assert self._dispatcher is not None
        prefetch = self.prefetch_count or self._dispatcher.max_in_flight
        try:
            async with asyncio.timeout(self.connect_timeout):
                wrapper = await connection.channel(publisher_confirms=False)
                channel = cast(aiormq.Channel, await wrapper.get_underlay_channel())
                await channel.basic_qos(prefetch_count=max(1, min(prefetch, _MAX_PREFETCH)))
                # Exclusive, so the broker deletes it when this connection dies (a crash). Not
                # auto-delete: stop() replies to the requests still queued before it deletes the queue.
                await channel.queue_declare(self._queue, exclusive=True, auto_delete=False)
                await channel.basic_consume(self._queue, self._on_delivery, consumer_tag=self._consumer_tag)
        except aiormq.exceptions.ChannelLockedResource:
            raise DeploymentConflictError(
                f"queue {self._queue!r} in vhost {self._vhost!r} is in use by another connection, so another "
                "worker serves this endpoint"
            ) from None
        except aiormq.exceptions.ChannelAccessRefused as exc:
            raise ConfigurationError(
                f"user {self._url.user!r} has no permission to declare or consume queue {self._queue!r} in vhost "
                f"{self._vhost!r}: {exc}"
            ) from None
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError, RuntimeError) as exc:
            raise EndpointUnreachableError(
                f"failed to consume queue {self._queue!r} on the AMQP broker at {_broker_label(self._url)}: "
                f"{exc or type(exc).__name__}"
            ) from exc

        wrapper.close_callbacks.add(self._on_channel_closed)
        channel.on_consumer_cancel_callbacks.add(self._on_cancelled)
        self._wrapper, self._channel = wrapper, channel

    def _on_connection_closed(self, sender: Any, exc: BaseException | None = None) -> None:
        if sender is self._connection:
            self._on_lost()

    def _on_channel_closed(self, sender: Any, exc: BaseException | None = None) -> None:
        if sender is self._wrapper:
            self._on_lost()

    def _on_cancelled(self, frame: Any) -> None:
        # The broker cancelled the consumer, because the queue was deleted, so consume again on a new channel.
        self._on_lost()

    def _on_lost(self) -> None:
        if not self._stopping:
            self._ready.clear()
            self._lost.set()

    async def _supervise(self) -> None:
        """Reconnect after the connection or channel is lost, with a backoff, until stopped."""
        while not self._stopping:
            await self._lost.wait()
            logger.warning("AMQP server on queue %s lost its connection or channel, reconnecting", self._queue)
            wrapper, self._wrapper, self._channel = self._wrapper, None, None
            if wrapper is not None and not wrapper.is_closed:
                with contextlib.suppress(Exception):
                    await wrapper.close()
            delay = _FIRST_RECONNECT_DELAY
            failures = RepeatedFailureLog(logger)
            while not self._stopping:
                await asyncio.sleep(delay)
                try:
                    await self._open()
                except Exception as exc:
                    failures.failed(
                        logging.WARNING, "AMQP server on queue %s cannot reconnect yet: %s", self._queue, exc
                    )
                    delay = min(delay * 2, _MAX_RECONNECT_DELAY)
                    continue
                self.reconnects += 1
                logger.info("AMQP server on queue %s is consuming again", self._queue)
                break

    async def _close_connection(self) -> None:
        connection, self._connection = self._connection, None
        self._wrapper = self._channel = None
        if connection is not None:
            try:
                await asyncio.wait_for(connection.close(), _STOP_TIMEOUT)
            except Exception as exc:
                logger.debug("closing the AMQP connection failed: %s", exc)

    # -- requests ----------------------------------------------------------------------------------

    async def _on_delivery(self, message: DeliveredMessage) -> None:
        # Acknowledge at receipt (at-most-once), then serve in a task that the server owns. The task
        # outlives the channel, so a function keeps running when the connection drops.
        tag = message.delivery_tag
        try:
            if tag is not None:
                await message.channel.basic_ack(tag, wait=False)
        except Exception as exc:
            # Not acknowledged, so the broker delivers it again and the worker replies to that delivery.
            logger.info(
                "AMQP server on queue %s failed to acknowledge a request, left to its redelivery: %s", self._queue, exc
            )
            return
        task = asyncio.create_task(self._serve(message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, message: DeliveredMessage) -> None:
        assert self._dispatcher is not None
        properties = message.header.properties
        reply_to = properties.reply_to
        received = time.monotonic()
        try:
            status, body, rejected, budget = await self._handle(message)
        except Exception:
            logger.exception("AMQP server on queue %s failed to serve a request", self._queue)
            return
        if not reply_to:
            return
        deadline = received + budget
        try:
            await self._reply(reply_to, properties.correlation_id, status, body, rejected, deadline)
        except Exception:
            logger.exception("AMQP server on queue %s failed to send a reply", self._queue)

    async def _handle(self, message: DeliveredMessage) -> tuple[int, Any, bool, float]:
        """Serve one request and return the reply's status and body, its rejected flag, and the call's budget."""
        assert self._dispatcher is not None
        properties = message.header.properties
        budget = self._dispatcher.default_timeout
        try:
            headers, name, data = self._parse(message)
            # An invalid header keeps the default budget, since the dispatcher replies 400 to it at once.
            with contextlib.suppress(BadRequestError):
                deadline_ms = header_count(headers, HEADER_DEADLINE, MAX_DEADLINE_DIGITS)
                budget = budget if deadline_ms is None else deadline_ms / 1000
            budget = min(budget, _REPLY_WAIT_LIMIT)
            if getattr(message.delivery, "redelivered", False):
                raise CallInterruptedError(
                    f"the broker delivered the call to '{name}' a second time after a channel failure; "
                    "it was not run again, and it may have run once",
                    payload={"deployment_id": self._dispatcher.deployment_id},
                )
        except PikkuMQError as exc:
            if not properties.reply_to:
                # Anyone who can publish to the queue can send these, so only every 100th is a warning.
                self._dropped += 1
                log = logger.warning if self._dropped % 100 == 1 else logger.debug
                log(
                    "AMQP server on queue %s dropped a request without reply_to (%d so far): %s: %s",
                    self._queue,
                    self._dropped,
                    type(exc).__name__,
                    exc,
                )
            return exc.http_status, exc.to_envelope(), False, budget

        if self._stopping:
            error = ServiceUnavailableError(
                f"instance '{self._dispatcher.deployment_id}' is stopping and takes no new calls",
                payload={"deployment_id": self._dispatcher.deployment_id},
            )
            return error.http_status, error.to_envelope(), True, budget
        outcome = await self._dispatcher.handle(name, data, headers, "amqp")
        status, body = outcome.encode_python()
        return status, body, outcome.rejected, budget

    def _parse(self, message: DeliveredMessage) -> tuple[dict[str, str], str, Any]:
        if len(message.body) > self.max_body_size:
            raise PayloadTooLargeError(
                f"request body is larger than the limit of {self.max_body_size} bytes",
                payload={"max_body_size": self.max_body_size},
            )
        properties = message.header.properties
        if isinstance(properties, DamagedProperties):
            raise BadRequestError(
                f"the message properties {properties.undecodable} cannot be decoded: send strings as UTF-8, "
                "timestamps within range and header tables of reasonable depth"
            )
        headers = _request_headers(properties.headers)
        name = headers.pop(HEADER_FUNCTION, None)
        if not name:
            raise BadRequestError(f"the request has no {HEADER_FUNCTION} header naming the function to call")
        content_type = (properties.content_type or "").split(";", 1)[0].strip().lower()
        if content_type not in _MSGPACK_TYPES:
            raise UnsupportedMediaTypeError(
                f'content type {content_type[:100]!r} is not supported; send {MSGPACK} of {{"data": ...}}'
            )
        return headers, name, _decode_call_body(message.body, binary=True)

    async def _reply(
        self, reply_to: str, correlation_id: str | None, status: int, body: Any, rejected: bool, deadline: float
    ) -> None:
        try:
            payload = _pack(body)
        except (ValueError, TypeError, OverflowError) as exc:
            # A JSON-compatible result can still fail in msgpack, for example an integer beyond 64 bits.
            error = OutputValidationError(f"the reply cannot be encoded as msgpack: {exc}")
            status, payload = error.http_status, _pack(error.to_envelope())
        if len(payload) > self.max_message_size:
            status, body = self._too_large(len(payload))
            payload = _pack(body)
        headers: dict[str, Any] = {HEADER_STATUS: status}
        if rejected:
            headers[HEADER_REJECTED] = "1"
        properties = spec.Basic.Properties(
            content_type=MSGPACK, delivery_mode=1, correlation_id=correlation_id, headers=headers
        )
        # Without a connection, a reply waits for the next one while its caller may still be waiting.
        while True:
            channel = self._channel
            if self._ready.is_set() and channel is not None:
                if not channel.is_closed:
                    try:
                        await channel.basic_publish(payload, routing_key=reply_to, properties=properties, wait=False)
                        return
                    except (
                        aiormq.exceptions.AMQPError,
                        aiormq.exceptions.ChannelInvalidStateError,
                        ConnectionError,
                    ) as exc:
                        logger.debug("sending an AMQP reply failed; it waits for the next connection: %s", exc)
                self._on_lost()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._stopping:
                logger.info(
                    "AMQP server on queue %s dropped the reply to %s: no connection before the call's deadline",
                    self._queue,
                    correlation_id,
                )
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._ready.wait()

    def _too_large(self, size: int) -> tuple[int, Any]:
        error = PayloadTooLargeError(
            f"the result is {size} bytes, over the AMQP message limit of {self.max_message_size} bytes",
            payload={"size": size, "max_message_size": self.max_message_size},
        )
        return error.http_status, error.to_envelope()


class _AmqpPresencePublisher(PresencePublisher):
    """Publishes a worker's presence heartbeats on an AMQP connection of the heartbeat thread."""

    def __init__(self, url: URL, endpoint: str, connect_timeout: float) -> None:
        self._url = url
        self._endpoint = endpoint
        self._connect_timeout = connect_timeout
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aiormq.Channel | None = None

    async def publish(self, kind: ChangeKind, deployment_id: str, in_flight: int | None, *, busy: bool) -> None:
        channel = self._channel
        if channel is None or channel.is_closed:
            channel = await self._open(deployment_id)
        properties = spec.Basic.Properties(content_type="application/json", delivery_mode=1)
        body = encode_change(kind, deployment_id, self._endpoint, in_flight, busy=busy).encode()
        try:
            await channel.basic_publish(body, exchange=presence_exchange(), routing_key="", properties=properties)
        except BaseException:
            await self.close()  # the next heartbeat connects again
            raise

    async def _open(self, deployment_id: str) -> aiormq.Channel:
        await self.close()
        name = f"pikku-mq presence {deployment_id}"
        try:
            async with asyncio.timeout(self._connect_timeout):
                connection = await aio_pika.connect(self._url, client_properties={"connection_name": name})
                self._connection = connection
                wrapper = await connection.channel(publisher_confirms=False)
                channel = cast(aiormq.Channel, await wrapper.get_underlay_channel())
                await _declare_presence(channel, presence_exchange())
        except BaseException:
            await self.close()
            raise
        self._channel = channel
        return channel

    async def close(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), _STOP_TIMEOUT)
