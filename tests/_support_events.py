"""Brokers for the tests of one-way calls and events, each test with subjects, streams or a vhost of its own.

NATS: a subject prefix and an event prefix of the test's own on the shared server, whose JetStream
streams are deleted at the end. AMQP: a vhost of the test's own on the shared RabbitMQ, deleted at
the end with its queues and exchanges.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack
import nats
from _support_amqp import AMQP_URL, create_vhost, delete_vhost, new_vhost

from pikku_mq import ClientTransport, MemoryTransport, Reply
from pikku_mq._types import CallRequest
from pikku_mq.transports.jetstream import events_stream, notify_stream

SHARED_NATS_URL = "nats://127.0.0.1:4222"


@dataclass
class TestBroker:
    """Where a test's workers serve, and the event bus they consume, on one broker."""

    __test__ = False  # not a test class, despite the name

    kind: str
    endpoint: str
    events_url: str
    broker_url: str
    """The URL a worker or caller connects with, credentials included."""
    prefix: str = ""
    vhost: str = ""
    streams: list[str] = field(default_factory=list)

    def worker_options(self) -> dict[str, Any]:
        """Return the PikkuWorker options that connect it to this broker."""
        if self.kind == "nats":
            return {"nats_url": self.broker_url}
        return {"amqp_url": self.broker_url}

    async def dead_letters(self, function: str) -> list[tuple[dict[str, str], Any]]:
        """Return the headers and data of the dead letters of an event handler, oldest first."""
        if self.kind == "nats":
            return await nats_letters(f"{self.events_url.rsplit('/', 1)[1]}-dead.{function}")
        return await amqp_letters(self.vhost, f"{self.prefix}.{function}.dead")

    async def close(self) -> None:
        if self.kind == "nats":
            await delete_streams(self.streams)
        else:
            delete_vhost(self.vhost)


def nats_broker() -> TestBroker:
    tag = uuid.uuid4().hex[:10]
    prefix, events_prefix = f"pikku-t-{tag}", f"pikku-ev-{tag}"
    return TestBroker(
        kind="nats",
        endpoint=f"{SHARED_NATS_URL}/{prefix}",
        events_url=f"{SHARED_NATS_URL}/{events_prefix}",
        broker_url=SHARED_NATS_URL,
        prefix=prefix,
        streams=[notify_stream(prefix), events_stream(events_prefix)],
    )


def amqp_broker() -> TestBroker:
    vhost = new_vhost()
    create_vhost(vhost)
    exchange = f"ev-{uuid.uuid4().hex[:8]}"
    return TestBroker(
        kind="amqp",
        endpoint=f"amqp://127.0.0.1:5672/{vhost}?queue=pikku-t-{uuid.uuid4().hex[:10]}",
        events_url=f"{AMQP_URL.rstrip('/')}/{vhost}?exchange={exchange}",
        broker_url=AMQP_URL,
        prefix=exchange,
        vhost=vhost,
    )


async def delete_streams(names: list[str], url: str = SHARED_NATS_URL) -> None:
    """Delete JetStream streams that exist among ``names``."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name in names:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await js.delete_stream(name)
    finally:
        await nc.close()


async def nats_letters(subject: str) -> list[tuple[dict[str, str], Any]]:
    """Return the headers and data of the messages that JetStream stores on ``subject``, oldest first."""
    nc = await nats.connect(SHARED_NATS_URL)
    letters = []
    try:
        js = nc.jetstream()
        subscription = await js.subscribe(subject, ordered_consumer=True)
        try:
            while True:
                try:
                    msg = await subscription.next_msg(timeout=0.5)
                except nats.errors.TimeoutError:
                    break
                letters.append((dict(msg.headers or {}), msgpack.unpackb(msg.data)["data"]))
        finally:
            await subscription.unsubscribe()
    finally:
        await nc.close()
    return letters


async def amqp_letters(vhost: str, queue: str) -> list[tuple[dict[str, str], Any]]:
    """Return the headers and data of the messages in ``queue``, oldest first, and leave them there."""
    import aio_pika

    connection = await aio_pika.connect(f"{AMQP_URL.rstrip('/')}/{vhost}")
    letters = []
    try:
        channel = await connection.channel()
        dead = await channel.declare_queue(queue, durable=True, passive=True)
        while True:
            message = await dead.get(no_ack=False, fail=False)
            if message is None:
                break
            headers = {k: v.decode() if isinstance(v, bytes) else str(v) for k, v in (message.headers or {}).items()}
            letters.append((headers, msgpack.unpackb(message.body)["data"]))
            # Left unacknowledged, so the queue keeps them when the connection closes.
    finally:
        await connection.close()
    return letters


class RecordingTransport(ClientTransport):
    """The in-memory transport, recording the headers of every request it sends."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self) -> None:
        self.inner = MemoryTransport()
        self.sent: list[tuple[str, Mapping[str, str]]] = []

    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        self.sent.append((request.name, dict(request.headers)))
        return await self.inner.call(endpoint, request, timeout)
