"""The NATS JetStream event bus and the source of a worker's durable one-way calls (see :mod:`.jetstream`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import DeliverPolicy

from .._durable import DeliveryPolicy, Settlement
from .._errors import DeadlineExceededError, EndpointUnreachableError, PikkuMQError
from .._events import DeliverySource, EventBus, check_max_age, run_delivery
from ._durable_body import decode_data, encode_data
from ._nats_wire import escape_name, server_addresses
from .jetstream import (
    DEFAULT_MAX_AGE,
    JetStreamConsumer,
    consumer_name,
    ensure_stream,
    event_headers,
    events_stream,
    function_of_notify_subject,
    notify_dead_subject,
    notify_stream,
    notify_subject,
    parse_events_url,
    publish_stored,
)
from .nats import _close_client, _open_client

if TYPE_CHECKING:
    from .._dispatch import Dispatcher

__all__ = ["JetStreamEventBus", "JetStreamNotifySource"]

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT = 5.0


async def _ignore() -> None:
    return None


async def _connect(url: str, name: str) -> NatsClient:
    return await _open_client(
        url,
        name=name,
        connect_timeout=_CONNECT_TIMEOUT,
        on_disconnected=_ignore,
        on_reconnected=_ignore,
        on_closed=_ignore,
    )


class _Consumers:
    """The JetStream consumers of one source, on one connection."""

    def __init__(self) -> None:
        self.nc: NatsClient | None = None
        self.consumers: list[JetStreamConsumer] = []

    async def stop_taking(self) -> None:
        for consumer in self.consumers:
            await consumer.stop_taking()

    async def wait_settled(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        for consumer in self.consumers:
            await consumer.wait_settled(max(0.0, end - loop.time()))

    async def close(self) -> None:
        await self.stop_taking()
        self.consumers = []
        nc, self.nc = self.nc, None
        if nc is not None:
            await _close_client(nc)


class JetStreamNotifySource(DeliverySource):
    """The durable one-way calls of a worker that serves the NATS subject prefix ``prefix``."""

    def __init__(self, url: str, prefix: str, *, max_age: float = DEFAULT_MAX_AGE) -> None:
        self.url = url
        self.prefix = prefix
        self.max_age = check_max_age(max_age)
        self._consumers = _Consumers()

    async def start(self, dispatcher: Dispatcher, policy: DeliveryPolicy, concurrency: int) -> None:
        nc = self._consumers.nc = await _connect(self.url, "pikku-mq one-way calls")
        stream = notify_stream(self.prefix)
        await ensure_stream(nc.jetstream(), stream, [f"pikku-notify.{self.prefix}.>"], self.max_age)
        for name in dispatcher.registry.exposed_names():

            async def handle(payload: bytes, headers: dict[str, str], subject: str, attempt: int) -> Settlement:
                try:
                    data: Any = decode_data(payload)
                    function = function_of_notify_subject(self.prefix, subject)
                except PikkuMQError as exc:
                    data, function = exc, subject
                return await run_delivery(
                    dispatcher, function, data, headers, attempt, policy, event=False, transport="nats"
                )

            consumer = JetStreamConsumer(
                nc,
                stream=stream,
                durable=consumer_name("notify", escape_name(name)),
                filter_subject=notify_subject(self.prefix, name),
                dead_subject=notify_dead_subject(self.prefix, name),
                function=name,
                policy=policy,
                handle=handle,
                deliver_policy=DeliverPolicy.ALL,
                concurrency=concurrency,
            )
            await consumer.bind()
            consumer.start()
            self._consumers.consumers.append(consumer)
        logger.info(
            "taking durable one-way calls of %d functions from JetStream stream %s at %s",
            len(self._consumers.consumers),
            stream,
            server_addresses(self.url),
        )

    async def stop_taking(self) -> None:
        await self._consumers.stop_taking()

    async def wait_settled(self, timeout: float) -> None:
        await self._consumers.wait_settled(timeout)

    async def close(self) -> None:
        await self._consumers.close()


class JetStreamEventBus(EventBus):
    """Events in the JetStream stream of a subject prefix: ``nats://[user:password@]host:port/<prefix>``.

    ``max_age`` (seconds, default 7 days) is how long the stream keeps an event. It applies only when
    this bus creates the stream.
    """

    def __init__(self, url: str, *, max_age: float | None = None) -> None:
        self.server_url, self.prefix = parse_events_url(url)
        self.max_age = DEFAULT_MAX_AGE if max_age is None else check_max_age(max_age)
        self.stream = events_stream(self.prefix)
        self._publisher: NatsClient | None = None
        self._connecting = asyncio.Lock()
        self._stream_ready = False
        self._consumers = _Consumers()

    def __repr__(self) -> str:
        return f"JetStreamEventBus({server_addresses(self.server_url)}, prefix={self.prefix!r})"

    async def _publisher_client(self) -> NatsClient:
        async with self._connecting:
            if self._publisher is None or self._publisher.is_closed:
                self._publisher = await _connect(self.server_url, "pikku-mq events")
                self._stream_ready = False
            if not self._stream_ready:
                await self._ensure_stream(self._publisher)
                self._stream_ready = True
            return self._publisher

    async def _ensure_stream(self, nc: NatsClient) -> None:
        subjects = [f"{self.prefix}.>", f"{self.prefix}-dead.>"]
        await ensure_stream(nc.jetstream(), self.stream, subjects, self.max_age)

    async def publish(
        self,
        subject: str,
        data: Any = None,
        *,
        trace_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> str:
        message_headers = event_headers(subject, trace_id, headers)
        payload = encode_data(data, f"event {subject}")
        try:
            nc = await asyncio.wait_for(self._publisher_client(), timeout)
        except TimeoutError:
            raise DeadlineExceededError(
                f"connecting to NATS at {server_addresses(self.server_url)} for an event on '{subject}' timed out"
            ) from None
        except (nats.errors.Error, nats.js.errors.APIError) as exc:
            raise EndpointUnreachableError(
                f"cannot set up the JetStream stream {self.stream} for an event on '{subject}': "
                f"{type(exc).__name__}: {exc}"
            ) from None
        await publish_stored(
            nc, f"{self.prefix}.{subject}", payload, message_headers, timeout, f"an event on '{subject}'"
        )
        return message_headers["pikku-event-id"]

    async def start(self, dispatcher: Dispatcher, policy: DeliveryPolicy, concurrency: int) -> None:
        handlers = self.handlers(dispatcher)
        if not handlers:
            return
        nc = self._consumers.nc = await _connect(self.server_url, "pikku-mq event handlers")
        await self._ensure_stream(nc)
        for definition in handlers:
            name = definition.name

            async def handle(
                payload: bytes, headers: dict[str, str], subject: str, attempt: int, name: str = name
            ) -> Settlement:
                try:
                    data: Any = decode_data(payload)
                except PikkuMQError as exc:
                    data = exc
                return await run_delivery(
                    dispatcher, name, data, headers, attempt, policy, event=True, transport="nats"
                )

            for subject in definition.events:
                consumer = JetStreamConsumer(
                    nc,
                    stream=self.stream,
                    durable=consumer_name(escape_name(name), subject),
                    filter_subject=f"{self.prefix}.{subject}",
                    dead_subject=f"{self.prefix}-dead.{escape_name(name)}",
                    function=name,
                    policy=policy,
                    handle=handle,
                    deliver_policy=DeliverPolicy.NEW,
                    concurrency=concurrency,
                )
                await consumer.bind()
                consumer.start()
                self._consumers.consumers.append(consumer)
        logger.info(
            "consuming events for %s from JetStream stream %s at %s",
            ", ".join(d.name for d in handlers),
            self.stream,
            server_addresses(self.server_url),
        )

    async def stop_taking(self) -> None:
        await self._consumers.stop_taking()

    async def wait_settled(self, timeout: float) -> None:
        await self._consumers.wait_settled(timeout)

    async def close(self) -> None:
        await self._consumers.close()
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            await _close_client(publisher)
