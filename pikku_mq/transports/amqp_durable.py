"""Durable one-way calls and events on RabbitMQ: durable queues, persistent messages, publisher confirms.

One-way calls: a worker that serves an ``amqp://`` endpoint with durable one-way calls on declares,
in the endpoint's vhost, the durable queue ``pikku.notify.<function>`` for each function it exposes,
shared by every worker of the vhost that hosts the function. ``rpc.notify`` publishes the call to it
through the default exchange (persistent, ``mandatory``) and returns once the broker confirmed it.
A queue per function, not per worker, because a worker's own queue goes away with the worker.

Events: an event bus ``amqp://user:password@host:port/<vhost>?exchange=<name>`` publishes to the
durable topic exchange ``<name>`` (default ``pikku.events``) with the subject as routing key. Each
function with ``events=[...]`` is one group: the durable queue ``<name>.<function>``, bound with each
of its subjects (``*`` stays ``*``, a final ``>`` becomes ``#``). An event published while no group
queue is bound to its subject is dropped by the exchange.

Both have, beside the queue ``Q``, the queue ``Q.retry``, whose messages go back to ``Q`` when their
expiration (the backoff) ends, and the queue ``Q.dead`` for dead letters. A failed delivery is
published to ``Q.retry`` with ``pikku-attempts`` one higher, and only then acknowledged, so a crash
between the two runs it again rather than losing it. A worker whose connection drops leaves its
unacknowledged deliveries to the broker, which hands them to another consumer of ``Q`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import aio_pika
import aio_pika.abc
import aiormq.exceptions
from yarl import URL

from .._durable import (
    HEADER_ATTEMPTS,
    HEADER_EVENT_ID,
    HEADER_SUBJECT,
    DeliveryPolicy,
    Settlement,
    dead_letter_headers,
)
from .._errors import (
    BadRequestError,
    ConfigurationError,
    DeadlineExceededError,
    EndpointUnreachableError,
    PikkuMQError,
    TransportError,
)
from .._events import DeliverySource, EventBus, run_delivery
from .._functions import check_subject
from .._types import HEADER_REQUEST_ID
from ._durable_body import decode_data, encode_data
from .amqp import MSGPACK, _broker_label, _connect_error, _request_headers, _without_password

if TYPE_CHECKING:
    from .._dispatch import Dispatcher

__all__ = ["DEFAULT_EXCHANGE", "AmqpEventBus", "AmqpNotifySource", "notify_queue"]

logger = logging.getLogger(__name__)

DEFAULT_EXCHANGE = "pikku.events"

_MAX_QUEUE_NAME = 240
"""Maximum length of a queue name made here, in bytes: RabbitMQ allows 255, and ``.retry`` is added."""

_CONNECT_TIMEOUT = 10.0
_FIRST_RECONNECT_DELAY = 0.1
_MAX_RECONNECT_DELAY = 5.0

Handle = Callable[[bytes, dict[str, str], int], Awaitable[Settlement]]
"""Runs one delivery: ``(body, headers, attempt)`` to its settlement."""


def notify_queue(function: str) -> str:
    """Return the durable queue of the one-way calls to ``function``."""
    return _bounded(f"pikku.notify.{function}")


def _bounded(name: str) -> str:
    if len(name.encode()) <= _MAX_QUEUE_NAME:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return name.encode()[: _MAX_QUEUE_NAME - 17].decode(errors="ignore") + "." + digest


def routing_key(subject: str) -> str:
    """Return the topic exchange binding of an event subject: a final ``>`` becomes ``#``."""
    return subject[:-1] + "#" if subject.endswith(">") else subject


class _Group:
    """The consumption of one durable queue, with its retry and dead-letter queues."""

    def __init__(self, queue: str, function: str, handle: Handle, bindings: tuple[str, tuple[str, ...]] | None) -> None:
        self.queue = queue
        self.function = function
        self.handle = handle
        self.bindings = bindings
        """``(exchange, routing keys)`` to bind the queue to a topic exchange, or None."""


class _AmqpConsumer:
    """Consumes durable queues on one connection, reconnecting after it is lost, and settles each delivery."""

    def __init__(self, url: URL, vhost: str, name: str, policy: DeliveryPolicy, concurrency: int) -> None:
        self.url = url
        self.vhost = vhost
        self.name = name
        self.policy = policy
        self.concurrency = concurrency
        self.groups: list[_Group] = []
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._queues: list[tuple[aio_pika.abc.AbstractQueue, str]] = []
        self._lost = asyncio.Event()
        self._stopping = False
        self._taking = True
        self._supervisor: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        await self._open()
        self._supervisor = asyncio.create_task(self._supervise(), name=f"pikku-amqp-durable-{self.name}")

    async def _open(self) -> None:
        try:
            connection = await aio_pika.connect(
                self.url, timeout=_CONNECT_TIMEOUT, client_properties={"connection_name": self.name}
            )
        except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
            raise _connect_error(exc, self.url, self.vhost) from exc
        try:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=self.concurrency)
            self._queues = []
            for group in self.groups:
                queue = await self._declare(channel, group)
                tag = await queue.consume(self._on_message_for(group))
                self._queues.append((queue, tag))
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await connection.close()
            if isinstance(exc, aiormq.exceptions.AMQPError | OSError | TimeoutError | RuntimeError):
                raise EndpointUnreachableError(
                    f"cannot declare or consume the durable queues on {_broker_label(self.url)}: {exc}"
                ) from exc
            raise
        connection.close_callbacks.add(self._on_lost)
        channel.close_callbacks.add(self._on_lost)
        self._connection, self._channel = connection, channel
        self._lost.clear()

    async def _declare(self, channel: aio_pika.abc.AbstractChannel, group: _Group) -> aio_pika.abc.AbstractQueue:
        queue = await channel.declare_queue(group.queue, durable=True)
        await channel.declare_queue(
            group.queue + ".retry",
            durable=True,
            arguments={"x-dead-letter-exchange": "", "x-dead-letter-routing-key": group.queue},
        )
        await channel.declare_queue(group.queue + ".dead", durable=True)
        if group.bindings is not None:
            exchange_name, keys = group.bindings
            exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
            for key in keys:
                await queue.bind(exchange, routing_key=key)
        return queue

    def _on_lost(self, *args: Any) -> None:
        if not self._stopping:
            self._lost.set()

    async def _supervise(self) -> None:
        while not self._stopping:
            await self._lost.wait()
            if self._stopping or not self._taking:
                return
            logger.warning("%s lost its AMQP connection or channel, reconnecting", self.name)
            await self._close_connection()
            delay = _FIRST_RECONNECT_DELAY
            failures = 0
            while not self._stopping and self._taking:
                await asyncio.sleep(delay)
                try:
                    await self._open()
                except PikkuMQError as exc:
                    failures += 1
                    log = logger.warning if failures == 1 or failures % 10 == 0 else logger.debug
                    log("%s cannot reconnect yet (attempt %d): %s", self.name, failures, exc)
                    delay = min(delay * 2, _MAX_RECONNECT_DELAY)
                    continue
                logger.info("%s is consuming again", self.name)
                break

    def _on_message_for(self, group: _Group) -> Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]:
        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            task = asyncio.create_task(self._process(group, message), name=f"pikku-delivery-{group.queue}")
            self._running.add(task)
            task.add_done_callback(self._running.discard)

        return on_message

    async def _process(self, group: _Group, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        channel = self._channel
        try:
            try:
                headers = _request_headers(message.headers)
            except BadRequestError:
                headers = {}
            attempt = _previous_attempts(headers) + 1
            settlement = await group.handle(message.body, headers, attempt)
            if settlement.action == "retry":
                headers[HEADER_ATTEMPTS] = str(attempt)
                await self._republish(channel, group.queue + ".retry", message, headers, settlement.delay)
            elif settlement.action == "dead":
                assert settlement.error is not None
                dead = dead_letter_headers(headers, settlement.error, attempt, group.function)
                await self._republish(channel, group.queue + ".dead", message, dead, None)
            await message.ack()
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, OSError, RuntimeError) as exc:
            # Not acknowledged, so the broker delivers it again once this channel is gone.
            logger.warning(
                "settling a delivery from %s failed, it will be delivered again: %s: %s",
                group.queue,
                type(exc).__name__,
                exc,
            )
        except Exception:
            logger.exception("a delivery from %s failed unexpectedly; it will be delivered again", group.queue)

    async def _republish(
        self,
        channel: aio_pika.abc.AbstractChannel | None,
        queue: str,
        message: aio_pika.abc.AbstractIncomingMessage,
        headers: dict[str, str],
        delay: float | None,
    ) -> None:
        if channel is None or channel.is_closed:
            raise RuntimeError("the channel is closed")
        copy = aio_pika.Message(
            message.body,
            headers=dict(headers),
            content_type=message.content_type or MSGPACK,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=message.message_id,
            # RabbitMQ takes the expiration in whole milliseconds; aio-pika converts seconds.
            expiration=max(0.001, delay) if delay is not None else None,
        )
        await channel.default_exchange.publish(copy, routing_key=queue, mandatory=True)

    async def stop_taking(self) -> None:
        self._taking = False
        for queue, tag in self._queues:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
        self._queues = []

    async def wait_settled(self, timeout: float) -> None:
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)

    async def close(self) -> None:
        self._stopping = True
        self._lost.set()
        supervisor, self._supervisor = self._supervisor, None
        if supervisor is not None:
            supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervisor
        await self._close_connection()

    async def _close_connection(self) -> None:
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5.0)


def _previous_attempts(headers: Mapping[str, str]) -> int:
    raw = headers.get(HEADER_ATTEMPTS, "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) <= 6 else 0


def _vhost_url(url: str, vhost: str) -> URL:
    try:
        base = URL(url)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(f"AMQP broker URL {_without_password(url)!r} is not a valid URL: {exc}") from None
    return base.with_path("/" + quote(vhost, safe=""), encoded=True).with_query(None)


class AmqpNotifySource(DeliverySource):
    """The durable one-way calls of a worker, from the queues ``pikku.notify.<function>`` of ``vhost``."""

    def __init__(self, url: str, vhost: str, deployment_id: str) -> None:
        self.url = url
        self.vhost = vhost
        self.deployment_id = deployment_id
        self._consumer: _AmqpConsumer | None = None

    async def start(self, dispatcher: Dispatcher, policy: DeliveryPolicy, concurrency: int) -> None:
        consumer = _AmqpConsumer(
            _vhost_url(self.url, self.vhost),
            self.vhost,
            f"pikku-mq one-way calls {self.deployment_id}",
            policy,
            concurrency,
        )
        for name in dispatcher.registry.exposed_names():

            async def handle(body: bytes, headers: dict[str, str], attempt: int, name: str = name) -> Settlement:
                try:
                    data: Any = decode_data(body)
                except PikkuMQError as exc:
                    data = exc
                # The queue names the function; a pikku-function header in the message is not trusted over it.
                return await run_delivery(
                    dispatcher, name, data, headers, attempt, policy, event=False, transport="amqp"
                )

            consumer.groups.append(_Group(notify_queue(name), name, handle, None))
        await consumer.start()
        self._consumer = consumer
        logger.info(
            "taking durable one-way calls of %d functions from vhost %r at %s",
            len(consumer.groups),
            self.vhost,
            _broker_label(consumer.url),
        )

    async def stop_taking(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop_taking()

    async def wait_settled(self, timeout: float) -> None:
        if self._consumer is not None:
            await self._consumer.wait_settled(timeout)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.close()


class AmqpEventBus(EventBus):
    """Events on a RabbitMQ topic exchange: ``amqp://user:password@host:port/<vhost>?exchange=<name>``."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        # Blank values are kept, so that "?exchange=" is rejected instead of meaning the default.
        query = parse_qs(parts.query, keep_blank_values=True)
        exchanges = query.pop("exchange", [DEFAULT_EXCHANGE])
        if len(exchanges) != 1:
            raise ConfigurationError(
                f"the AMQP event bus URL {_without_password(url)!r} names the exchange {len(exchanges)} times"
            )
        self.exchange = exchanges[0]
        if query:
            raise ConfigurationError(
                f"the AMQP event bus URL {_without_password(url)!r} has unknown query parameters {sorted(query)}; "
                "only 'exchange' is allowed"
            )
        if not self.exchange or self.exchange.startswith("amq."):
            raise ConfigurationError(
                f"the event exchange {self.exchange!r} is empty or starts with the reserved 'amq.'"
            )
        self.vhost = unquote(parts.path.lstrip("/")) or "/"
        self.url = _vhost_url(url, self.vhost)
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._channel: aio_pika.abc.AbstractChannel | None = None
        self._exchange: aio_pika.abc.AbstractExchange | None = None
        self._connecting = asyncio.Lock()
        self._consumer: _AmqpConsumer | None = None

    def __repr__(self) -> str:
        return f"AmqpEventBus({_broker_label(self.url)}, exchange={self.exchange!r})"

    async def _publisher(self) -> aio_pika.abc.AbstractExchange:
        async with self._connecting:
            usable = self._channel is not None and not self._channel.is_closed and self._exchange is not None
            if not usable:
                await self._close_publisher()
                try:
                    self._connection = await aio_pika.connect(
                        self.url, timeout=_CONNECT_TIMEOUT, client_properties={"connection_name": "pikku-mq events"}
                    )
                    self._channel = await self._connection.channel(publisher_confirms=True)
                    self._exchange = await self._channel.declare_exchange(
                        self.exchange, aio_pika.ExchangeType.TOPIC, durable=True
                    )
                except (aiormq.exceptions.AMQPError, OSError, TimeoutError) as exc:
                    await self._close_publisher()
                    raise _connect_error(exc, self.url, self.vhost) from exc
            assert self._exchange is not None
            return self._exchange

    async def publish(
        self,
        subject: str,
        data: Any = None,
        *,
        trace_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> str:
        check_subject(subject, wildcards=False)
        event_id = uuid.uuid4().hex
        message_headers = {
            **(headers or {}),
            HEADER_EVENT_ID: event_id,
            HEADER_SUBJECT: subject,
            HEADER_REQUEST_ID: trace_id or uuid.uuid4().hex,
        }
        message = aio_pika.Message(
            encode_data(data, f"event {subject}"),
            headers=dict(message_headers),
            content_type=MSGPACK,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event_id,
        )
        try:
            async with asyncio.timeout(timeout):
                exchange = await self._publisher()
                await exchange.publish(message, routing_key=subject)
        except TimeoutError:
            await self._close_publisher()
            raise DeadlineExceededError(
                f"the AMQP broker did not confirm the event on '{subject}' within {timeout:.3f} s; "
                "it may have been stored"
            ) from None
        except (aiormq.exceptions.AMQPError, aio_pika.exceptions.AMQPException, ConnectionError) as exc:
            await self._close_publisher()
            raise TransportError(
                f"publishing the event on '{subject}' failed; it may have been stored: {exc}"
            ) from None
        return event_id

    async def _close_publisher(self) -> None:
        connection, self._connection, self._channel, self._exchange = self._connection, None, None, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), 5.0)

    async def start(self, dispatcher: Dispatcher, policy: DeliveryPolicy, concurrency: int) -> None:
        handlers = self.handlers(dispatcher)
        if not handlers:
            return
        consumer = _AmqpConsumer(self.url, self.vhost, "pikku-mq event handlers", policy, concurrency)
        for definition in handlers:

            async def handle(
                body: bytes, headers: dict[str, str], attempt: int, name: str = definition.name
            ) -> Settlement:
                try:
                    data: Any = decode_data(body)
                except PikkuMQError as exc:
                    data = exc
                return await run_delivery(
                    dispatcher, name, data, headers, attempt, policy, event=True, transport="amqp"
                )

            keys = tuple(routing_key(subject) for subject in definition.events)
            queue = _bounded(f"{self.exchange}.{definition.name}")
            consumer.groups.append(_Group(queue, definition.name, handle, (self.exchange, keys)))
        await consumer.start()
        self._consumer = consumer
        logger.info(
            "consuming events for %s from exchange %r at %s",
            ", ".join(d.name for d in handlers),
            self.exchange,
            _broker_label(self.url),
        )

    async def stop_taking(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop_taking()

    async def wait_settled(self, timeout: float) -> None:
        if self._consumer is not None:
            await self._consumer.wait_settled(timeout)

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.close()
        await self._close_publisher()
