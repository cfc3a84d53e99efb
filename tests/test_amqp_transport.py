"""The AMQP transport on the real RabbitMQ at 127.0.0.1:5672, beyond what the transport contract shows.

Unroutable calls and crashed workers, replies that are not pikku_mq's, large payloads, malformed raw
requests, credentials, a wrong broker URL, connections closed by the broker, and the CLI. Every test
works in the session's vhost or in a vhost of its own, never in another.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq
import msgpack
import pytest
from _support_amqp import (
    AMQP_URL,
    REPLY_TO,
    RawProperties,
    amqp_endpoint,
    close_vhost_connections,
    create_vhost,
    delete_vhost,
    field_table,
    long_string_entry,
    nested_table,
    new_vhost,
    raw_properties,
    short_string,
    vhost_connections,
    vhost_heartbeats,
)
from _support_core import Mesh, closed_port, wait_until
from aiormq.abc import DeliveredMessage

from pikku_mq import (
    ConfigurationError,
    DeploymentService,
    EndpointUnreachableError,
    FunctionRegistry,
    PayloadTooLargeError,
    PikkuMQError,
    PikkuWorker,
    ProtocolError,
    RoutingError,
    TransportSet,
    pikku_sessionless_func,
)
from pikku_mq._settings import DEFAULT_AMQP_URL, ENV_AMQP_URL, default_amqp_url
from pikku_mq._types import CallRequest
from pikku_mq.transports.amqp import AmqpServer, AmqpTransport, parse_endpoint

if TYPE_CHECKING:
    from conftest import WorkerProcesses

MESH_WORKER = Path(__file__).parent / "apps" / "mesh_worker.py"
MiB = 1024 * 1024

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def echo(services: Any, data: Any) -> Any:
    return data


@pikku_sessionless_func(expose=True, registry=REG)
async def nap(services: Any, data: float) -> str:
    await asyncio.sleep(data)
    return str(services)


@pytest.fixture
async def mesh(amqp_vhost: str) -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


@pytest.fixture
async def transport(amqp_vhost: str) -> AsyncIterator[AmqpTransport]:
    """A caller's AMQP transport on the test broker, closed at the end."""
    client = AmqpTransport(url=AMQP_URL)
    yield client
    await client.close()


@pytest.fixture
def own_vhost() -> Iterator[str]:
    """A vhost for this test alone, so it can close every connection in it; deleted at the end."""
    vhost = new_vhost()
    create_vhost(vhost)
    try:
        yield vhost
    finally:
        delete_vhost(vhost)


def make_worker(mesh: Mesh, endpoint: str, deployment_id: str = "a-1", **options: Any) -> PikkuWorker:
    return PikkuWorker(
        registry=REG,
        endpoint=endpoint,
        deployment_id=deployment_id,
        services=deployment_id,
        deployment_service=mesh.service(),
        **options,
    )


def request(name: str, data: Any = None, **headers: str) -> CallRequest:
    return CallRequest(name=name, data=data, headers=dict(headers))


# -- endpoints and settings ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "vhost", "queue"),
    [
        ("amqp://127.0.0.1:5672/%2F?queue=q1", "/", "q1"),
        ("amqp://127.0.0.1:5672?queue=q1", "/", "q1"),
        ("amqp://127.0.0.1:5672/?queue=q1", "/", "q1"),
        ("amqp://broker/pikku%20prod?queue=a.b", "pikku prod", "a.b"),
        ("amqps://broker:5671/v1?queue=", "v1", None),
    ],
)
def test_endpoint_parts(endpoint: str, vhost: str, queue: str | None) -> None:
    parsed = parse_endpoint(endpoint)
    assert parsed.vhost == vhost
    assert parsed.queue == queue
    assert parse_endpoint(parsed.advertised()) == parsed


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("amqp://broker/a/b?queue=q", "several segments"),
        ("amqp://broker/v?queue=amq.mine", "reserved"),
        ("amqp://broker/v?queue=q&queue=r", "more than one queue"),
        ("amqp://broker/v?queue=q&prefetch=5", "unknown query parameters"),
        ("amqp://user:hunter2-pw@broker/v?queue=q", "contains credentials"),
    ],
)
def test_worker_endpoint_rejected(endpoint: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as rejected:
        PikkuWorker(registry=REG, endpoint=endpoint, discovery=False)
    assert message in str(rejected.value)
    assert "hunter2-pw" not in str(rejected.value)


def test_default_amqp_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_AMQP_URL, raising=False)
    assert default_amqp_url() == DEFAULT_AMQP_URL == "amqp://guest:guest@127.0.0.1:5672/"
    monkeypatch.setenv(ENV_AMQP_URL, " amqp://me:pw@rabbit:5673/ ")
    assert default_amqp_url() == "amqp://me:pw@rabbit:5673/"
    assert AmqpTransport().url == "amqp://me:pw@rabbit:5673/"


def test_default_transports_include_amqp() -> None:
    transports = TransportSet.default()
    amqp = transports.for_endpoint("amqp://127.0.0.1:5672/v?queue=q")
    assert isinstance(amqp, AmqpTransport)
    assert transports.for_endpoint("amqps://127.0.0.1:5671/v?queue=q") is amqp
    assert amqp._links == {}


def test_missing_aio_pika_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import pikku_mq.transports

    # Make `import aio_pika` fail, as it does when the amqp extra is not installed.
    monkeypatch.setitem(sys.modules, "aio_pika", None)
    monkeypatch.delitem(sys.modules, "pikku_mq.transports.amqp")
    monkeypatch.delattr(pikku_mq.transports, "amqp")

    with pytest.raises(ConfigurationError) as missing:
        PikkuWorker(registry=REG, endpoint="amqp://127.0.0.1:5672/v?queue=q", discovery=False)
    assert "pip install 'pikku-mq[amqp]'" in str(missing.value)
    assert TransportSet.default().for_endpoint("amqp://127.0.0.1:5672/v?queue=q") is None
    assert TransportSet.default().for_endpoint("http://127.0.0.1:1") is not None


# -- routing failures ------------------------------------------------------------------------------


async def test_unroutable_call_fails_at_once(transport: AmqpTransport) -> None:
    missing = amqp_endpoint()
    with pytest.raises(EndpointUnreachableError):
        await transport.call(missing, request("echo", 1), 5)  # connects first
    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as unroutable:
        await transport.call(missing, request("echo", 1), 5)
    assert time.monotonic() - started < 0.2
    assert "is gone" in str(unroutable.value)


async def _wait_queue_deleted(vhost: str, queue: str | None) -> None:
    """Return once the broker reports ``queue`` gone, polling for at most 5 s."""
    assert queue is not None
    connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:5672/{vhost}", timeout=5)
    try:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            channel = await connection.channel()
            try:
                await channel.declare_queue(queue, passive=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                return
            await channel.close()
            await asyncio.sleep(0.02)
        raise AssertionError(f"queue {queue!r} still exists 5 s after its worker was killed")
    finally:
        await connection.close()


async def test_crashed_worker_fails_over_at_once(
    worker_processes: WorkerProcesses, caller: DeploymentService, amqp_vhost: str
) -> None:
    options = ("--functions", "whoami,whoami_once")
    crashing = worker_processes.launch(MESH_WORKER, "amqp-crash", *options, "--endpoint", amqp_endpoint())
    steady = worker_processes.launch(MESH_WORKER, "amqp-steady", *options, "--endpoint", amqp_endpoint())
    await worker_processes.wait_registered(crashing)
    await worker_processes.wait_registered(steady)
    assert crashing.endpoint.startswith(f"amqp://127.0.0.1:5672/{amqp_vhost}?queue=")
    served_by = {await caller.invoke("whoami_once", None, timeout=5) for _ in range(6)}
    assert served_by == {"amqp-crash", "amqp-steady"}

    # SIGKILL: no deregistration, no draining. The broker drops the exclusive queue with the connection,
    # so calls routed to the crashed worker come back unroutable instead of waiting for the heartbeat TTL.
    crashing.kill()
    killed = time.monotonic()
    # The broker deletes the queue a moment after the connection drops, and a call published in that
    # moment is lost with the queue. That case is a call in flight on a killed worker, tested elsewhere.
    await _wait_queue_deleted(amqp_vhost, parse_endpoint(crashing.endpoint).queue)
    started = time.monotonic()
    assert started - killed < 2.0, f"the broker kept the crashed worker's queue for {started - killed:.2f} s"
    served_by = {await caller.invoke("whoami_once", None, timeout=5) for _ in range(10)}
    elapsed = time.monotonic() - started
    assert served_by == {"amqp-steady"}
    assert elapsed < 2.0, f"10 calls took {elapsed:.2f} s after the crash"
    assert {r.deployment_id for r in await caller.find_function("whoami_once")} >= {"amqp-crash"}


# -- replies that are not pikku_mq's --------------------------------------------------------------


@pytest.fixture
async def raw_responder(amqp_vhost: str) -> AsyncIterator[str]:
    """Start a plain aio-pika consumer on a queue of its own that replies as the pikku-function header selects."""
    endpoint = amqp_endpoint()
    queue = parse_endpoint(endpoint).queue
    assert queue is not None
    connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}", timeout=5)
    channel = await connection.channel()
    declared = await channel.declare_queue(queue, exclusive=True, auto_delete=True)
    replies: dict[str, tuple[dict[str, Any], bytes, str | None]] = {
        "no-status": ({}, msgpack.packb("hi"), "application/msgpack"),
        "bad-status": ({"pikku-status": "ok"}, msgpack.packb("hi"), "application/msgpack"),
        "json-body": ({"pikku-status": 200}, b'"hi"', "application/json"),
        "not-msgpack": ({"pikku-status": 200}, b"\xc1\xc1", None),
        "empty": ({"pikku-status": 200}, b"", None),
        "proper": ({"pikku-status": "200"}, msgpack.packb("hi"), None),
    }

    async def reply_as_asked(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with message.process():
            headers, body, content_type = replies[str(message.headers["pikku-function"])]
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body, headers=headers, content_type=content_type, correlation_id=message.correlation_id
                ),
                routing_key=str(message.reply_to),
            )

    await declared.consume(reply_as_asked)
    try:
        yield endpoint
    finally:
        await connection.close()


@pytest.mark.parametrize("kind", ["no-status", "bad-status", "json-body", "not-msgpack", "empty"])
async def test_foreign_reply_is_protocol_error(transport: AmqpTransport, raw_responder: str, kind: str) -> None:
    with pytest.raises(ProtocolError):
        await transport.call(raw_responder, request(kind), 5)
    reply = await transport.call(raw_responder, request("proper"), 5)
    assert reply.status == 200
    assert reply.body == "hi"
    assert not reply.rejected


# -- payload sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [2 * MiB, 20 * MiB])
async def test_payload_over_body_limit_rejected(mesh: Mesh, size: int) -> None:
    caller = mesh.service()
    async with make_worker(mesh, amqp_endpoint()):  # max_body_size: 1 MiB by default
        started = time.monotonic()
        with pytest.raises(PayloadTooLargeError) as too_large:
            await caller.invoke("echo", "x" * size, timeout=30)
        elapsed = time.monotonic() - started
        assert await caller.invoke("echo", "still serving", timeout=5) == "still serving"
    assert too_large.value.payload == {"max_body_size": 1024 * 1024}
    assert elapsed < 5.0


@pytest.mark.parametrize("size", [2 * MiB, 20 * MiB])
async def test_payload_within_body_limit_served(mesh: Mesh, size: int) -> None:
    caller = mesh.service()
    payload = {"blob": "x" * size, "tail": [1, 2, 3]}
    async with make_worker(mesh, amqp_endpoint(), max_body_size=64 * MiB):
        started = time.monotonic()
        assert await caller.invoke("echo", payload, timeout=30) == payload
        elapsed = time.monotonic() - started
    assert elapsed < 10.0


async def test_payload_over_message_limit_unsent(mesh: Mesh) -> None:
    transport = AmqpTransport(url=AMQP_URL, max_message_size=MiB)
    try:
        with pytest.raises(PayloadTooLargeError) as too_large:
            await transport.call(amqp_endpoint(), request("echo", "x" * 2 * MiB), 5)
        assert transport._links == {}  # rejected before connecting, so nothing was published
    finally:
        await transport.close()
    assert too_large.value.payload["max_message_size"] == MiB


# -- raw requests ----------------------------------------------------------------------------------


class RawCaller:
    """A plain aio-pika client that publishes hand-made requests and collects replies by correlation id."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel) -> None:
        self.channel = channel
        self.replies: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}

    async def on_reply(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.replies[str(message.correlation_id)] = message

    async def send(self, queue: str, body: bytes, *, reply: bool = True, **properties: Any) -> str:
        correlation_id = uuid.uuid4().hex
        message = aio_pika.Message(
            body,
            correlation_id=correlation_id,
            reply_to="amq.rabbitmq.reply-to" if reply else None,
            **properties,
        )
        await self.channel.default_exchange.publish(message, routing_key=queue)
        return correlation_id

    async def reply(self, correlation_id: str, timeout: float = 5.0) -> tuple[int, Any]:
        await wait_until(lambda: correlation_id in self.replies, timeout=timeout)
        message = self.replies.pop(correlation_id)
        assert message.headers is not None
        return int(str(message.headers["pikku-status"])), msgpack.unpackb(message.body)


async def test_malformed_raw_requests_rejected(mesh: Mesh, amqp_vhost: str, caplog: pytest.LogCaptureFixture) -> None:
    endpoint = amqp_endpoint()
    queue = parse_endpoint(endpoint).queue
    assert queue is not None
    fn = {"pikku-function": "echo"}
    cases: list[tuple[bytes, dict[str, Any], str | None, int, str]] = [
        (b"not msgpack \xc1", fn, None, 400, "BadRequestError"),
        (msgpack.packb([1, 2]), fn, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1, "extra": 2}), fn, None, 400, "BadRequestError"),
        (b"", fn, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1}), {}, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1}), {**fn, "pikku-hop": "x"}, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1}), {**fn, "pikku-deadline-ms": "soon"}, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1}), {**fn, "pikku-deadline-ms": 0}, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1}), {**fn, "pikku-deadline-ms": 2500.5}, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1}), {**fn, "pikku-deadline-ms": -1}, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1}), {**fn, "pikku-hop": {"nested": 1}}, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1}), {"pikku-function": 7}, None, 400, "BadRequestError"),
        (msgpack.packb({"data": float("nan")}), fn, None, 400, "BadRequestError"),
        (msgpack.packb({"data": 1}), fn, "application/json", 415, "UnsupportedMediaTypeError"),
        (msgpack.packb({"data": "x" * 5000}), fn, None, 413, "PayloadTooLargeError"),
        (msgpack.packb({"data": 1}), {"pikku-function": "no_such"}, None, 404, "FunctionNotFoundError"),
        (msgpack.packb({"data": 1}), {**fn, "pikku-hop": 17}, None, 508, "LoopDetectedError"),
    ]
    async with make_worker(mesh, endpoint, max_body_size=4096):
        connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}", timeout=5)
        try:
            channel = await connection.channel()
            raw = RawCaller(channel)
            reply_queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
            await reply_queue.consume(raw.on_reply, no_ack=True)

            sent = [
                (await raw.send(queue, body, headers=headers, content_type=content_type), status, name)
                for body, headers, content_type, status, name in cases
            ]
            for correlation_id, status, name in sent:
                got_status, envelope = await raw.reply(correlation_id)
                assert got_status == status, envelope
                assert envelope["name"] == name, envelope

            # Without reply_to, a malformed request is logged and dropped.
            await raw.send(queue, b"\xc1", reply=False, headers=fn)
            await wait_until(lambda: "dropped a request without reply_to" in caplog.text, timeout=5)

            # Every metadata header is optional, and numbers are accepted where numbers are expected.
            plain = await raw.send(queue, msgpack.packb({"data": [1, "a"]}), headers={**fn, "pikku-deadline-ms": 5000})
            assert await raw.reply(plain) == (200, [1, "a"])
            assert await mesh.service().invoke("echo", "after all that", timeout=5) == "after all that"
        finally:
            await connection.close()


UNDECODABLE_PROPERTIES = {
    "content-type-not-utf8": {"content_type": b"\xff\xfe"},
    "key-not-utf8": {
        "table": field_table([long_string_entry(b"pikku-function", b"echo"), long_string_entry(b"\xff", b"")])
    },
    "huge-timestamp": {"table": field_table([short_string(b"x-when") + b"T" + b"\xff" * 8])},
    "deep-table": {"table": field_table([short_string(b"x-deep") + nested_table(3000)])},
    "correlation-not-utf8": {"correlation_id": b"\xff\xfe"},
}


@pytest.mark.parametrize("variant", list(UNDECODABLE_PROPERTIES))
async def test_undecodable_properties_keep_connection(mesh: Mesh, amqp_vhost: str, variant: str) -> None:
    # RabbitMQ passes these on, pamqp failed to decode them, and aiormq closed the worker's connection,
    # which deleted its exclusive queue with every request waiting there.
    endpoint = amqp_endpoint()
    queue = parse_endpoint(endpoint).queue
    assert queue is not None
    options: dict[str, Any] = {"table": field_table([long_string_entry(b"pikku-function", b"echo")])}
    options["correlation_id"] = uuid.uuid4().hex.encode()
    options.update(UNDECODABLE_PROPERTIES[variant])
    async with make_worker(mesh, endpoint) as worker:
        [server] = worker._servers
        assert isinstance(server, AmqpServer)
        connection = await aiormq.connect(f"amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}")
        try:
            channel = await connection.channel(publisher_confirms=True)
            replies: list[DeliveredMessage] = []

            async def on_reply(message: DeliveredMessage) -> None:
                replies.append(message)

            await channel.basic_consume(REPLY_TO, on_reply, no_ack=True)
            properties = RawProperties(raw_properties(**options))
            await channel.basic_publish(msgpack.packb({"data": 1}), routing_key=queue, properties=properties)

            await wait_until(lambda: replies, timeout=5)
            headers = replies[0].header.properties.headers or {}
            assert headers["pikku-status"] == 400
            assert "cannot be decoded" in msgpack.unpackb(replies[0].body)["message"]
            assert await mesh.service().invoke("echo", "still here", timeout=5) == "still here"
            assert server.reconnects == 0
        finally:
            await connection.close()


async def test_stop_answers_requests_left_in_queue(mesh: Mesh, amqp_vhost: str) -> None:
    # Requests that reach the queue after the consumer is cancelled get a rejection, not silence.
    endpoint = amqp_endpoint()
    queue = parse_endpoint(endpoint).queue
    assert queue is not None
    worker = make_worker(mesh, endpoint)
    await worker.start()
    [server] = worker._servers
    assert isinstance(server, AmqpServer)
    connection = await aio_pika.connect(f"amqp://guest:guest@127.0.0.1:5672/{amqp_vhost}", timeout=5)
    try:
        channel = await connection.channel()
        raw = RawCaller(channel)
        reply_queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
        await reply_queue.consume(raw.on_reply, no_ack=True)

        assert server._channel is not None
        await server._channel.basic_cancel(server._consumer_tag)
        fn = {"pikku-function": "echo"}
        left = [await raw.send(queue, msgpack.packb({"data": index}), headers=fn) for index in range(3)]
        started = time.monotonic()
        await worker.stop()

        for correlation_id in left:
            status, envelope = await raw.reply(correlation_id, timeout=2)
            assert status == 503
            assert envelope["name"] == "ServiceUnavailableError"
        assert time.monotonic() - started < 5
        # The queue is gone, so a later request comes back unroutable at once.
        confirming = await connection.channel(publisher_confirms=True, on_return_raises=True)
        with pytest.raises(aio_pika.exceptions.PublishError):
            await confirming.default_exchange.publish(aio_pika.Message(b"x"), routing_key=queue, mandatory=True)
    finally:
        await connection.close()


# -- credentials and broker URLs -------------------------------------------------------------------


async def test_credentials_never_advertised(mesh: Mesh, amqp_vhost: str) -> None:
    registry = mesh.service()
    worker = make_worker(
        mesh, f"amqp:///{amqp_vhost}", "cred-1", amqp_url="amqp://guest:guest@127.0.0.1:5672/ignored-vhost"
    )
    async with worker:
        assert worker.endpoint == f"amqp://127.0.0.1:5672/{amqp_vhost}?queue=pikku.cred-1"
        [record] = await registry.list_deployments()
        assert record.endpoint == worker.endpoint
        assert "guest" not in record.endpoint
        assert await registry.invoke("echo", "served", timeout=5) == "served"


async def test_wrong_worker_url_fails_fast(mesh: Mesh, amqp_vhost: str) -> None:
    port = closed_port()
    unreachable_broker = make_worker(mesh, amqp_endpoint(), amqp_url=f"amqp://guest:s3cret-pw@127.0.0.1:{port}/")
    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as unreachable:
        await unreachable_broker.start()
    assert time.monotonic() - started < 2.0
    assert f"127.0.0.1:{port}" in str(unreachable.value)
    assert "s3cret-pw" not in str(unreachable.value)

    wrong_login = make_worker(mesh, amqp_endpoint(), amqp_url="amqp://guest:wrong-s3cret@127.0.0.1:5672/")
    with pytest.raises(ConfigurationError) as refused_login:
        await wrong_login.start()
    assert "127.0.0.1:5672" in str(refused_login.value)
    assert "wrong-s3cret" not in str(refused_login.value)

    no_vhost = make_worker(mesh, amqp_endpoint(vhost=new_vhost()), amqp_url=AMQP_URL)
    with pytest.raises(EndpointUnreachableError, match="failed to open vhost"):
        await no_vhost.start()


async def test_wrong_caller_url_fails_fast(mesh: Mesh, amqp_vhost: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with make_worker(mesh, amqp_endpoint(), amqp_url=AMQP_URL):
        port = closed_port()
        monkeypatch.setenv(ENV_AMQP_URL, f"amqp://guest:s3cret-pw@127.0.0.1:{port}/")
        caller = mesh.service()
        started = time.monotonic()
        with pytest.raises(RoutingError):
            await caller.invoke("echo", 1, timeout=5)
        assert time.monotonic() - started < 2.0

        transport = AmqpTransport()
        try:
            with pytest.raises(EndpointUnreachableError) as unreachable:
                await transport.call(amqp_endpoint(), request("echo"), 5)
        finally:
            await transport.close()
        assert f"127.0.0.1:{port}" in str(unreachable.value)
        assert "s3cret-pw" not in str(unreachable.value)

        monkeypatch.setenv(ENV_AMQP_URL, "amqp://guest:wrong-s3cret@127.0.0.1:5672/")
        with pytest.raises(ConfigurationError) as refused_login:
            await mesh.service().invoke("echo", 1, timeout=5)
        assert "127.0.0.1:5672" in str(refused_login.value)
        assert "wrong-s3cret" not in str(refused_login.value)


# -- connections closed by the broker --------------------------------------------------------------


def server_of(worker: PikkuWorker) -> AmqpServer:
    [server] = worker._servers
    assert isinstance(server, AmqpServer)
    return server


async def test_all_connections_closed_recovers(own_vhost: str, mesh: Mesh) -> None:
    caller = mesh.service()
    async with make_worker(mesh, amqp_endpoint(own_vhost), "drill-1") as worker:
        assert await caller.invoke("nap", 0.0, timeout=5) == "drill-1"
        timeout = 10.0
        in_flight = [asyncio.create_task(caller.invoke("nap", 4.0, timeout=timeout)) for _ in range(3)]
        await wait_until(lambda: worker.dispatcher.in_flight == 3, timeout=5)
        started = time.monotonic()

        # What a broker restart does to clients, limited to this test's vhost: every connection is closed.
        # The worker's presence connection opens at its first heartbeat, 10 s after it started, if the
        # test has run that long.
        assert await asyncio.to_thread(close_vhost_connections, own_vhost) in (2, 3)
        outcomes = await asyncio.gather(*in_flight, return_exceptions=True)
        for outcome in outcomes:
            assert outcome == "drill-1" or isinstance(outcome, PikkuMQError), repr(outcome)
        assert time.monotonic() - started < timeout

        async def served() -> bool:
            try:
                return await caller.invoke("nap", 0.0, timeout=2) == "drill-1"
            except PikkuMQError:
                return False

        await wait_until(served, timeout=20, interval=0.2)
        assert server_of(worker).reconnects >= 1
        assert len(await asyncio.to_thread(vhost_connections, own_vhost, "pikku-mq worker drill-1")) == 1
        heartbeats = await asyncio.to_thread(vhost_heartbeats, own_vhost)
        assert set(heartbeats) == {15}
        assert len(heartbeats) in (2, 3)


async def test_worker_reconnect_keeps_call(own_vhost: str, mesh: Mesh) -> None:
    caller = mesh.service()
    async with make_worker(mesh, amqp_endpoint(own_vhost), "drill-2") as worker:
        assert await caller.invoke("nap", 0.0, timeout=5) == "drill-2"
        call = asyncio.create_task(caller.invoke("nap", 4.0, timeout=15))
        await wait_until(lambda: worker.dispatcher.in_flight == 1, timeout=5)

        # Only the worker's connection: the function keeps running and replies on the next connection.
        assert await asyncio.to_thread(close_vhost_connections, own_vhost, "pikku-mq worker drill-2") == 1
        assert await call == "drill-2"
        assert server_of(worker).reconnects == 1
        assert await caller.invoke("nap", 0.0, timeout=5) == "drill-2"


# -- the command line ------------------------------------------------------------------------------


def test_cli_worker_serves_amqp(tmp_path: Path, amqp_vhost: str) -> None:
    (tmp_path / "calc.py").write_text(
        "from pikku_mq import pikku_sessionless_func\n\n\n"
        "@pikku_sessionless_func(expose=True)\n"
        "async def add(services, data: dict) -> int:\n"
        "    return data['a'] + data['b']\n"
    )
    env = {**os.environ, "PIKKU_DISCOVERY_URL": f"sqlite:///{tmp_path / 'registry.db'}", ENV_AMQP_URL: AMQP_URL}
    endpoint = amqp_endpoint()
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "pikku_mq", "worker", "calc", "--id", "calc-amqp", "--endpoint", endpoint],
            cwd=tmp_path,
            env={**env, ENV_AMQP_URL: "amqp://nobody:nothing@127.0.0.1:1/"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        # The worker's own URL is wrong, so it exits at once with an error naming the broker.
        assert worker.wait(30) == 1
        assert "127.0.0.1:1" in (tmp_path / "worker.log").read_text()
        assert "nothing" not in (tmp_path / "worker.log").read_text()

        command = [sys.executable, "-m", "pikku_mq", "worker", "calc", "--id", "calc-amqp", "--endpoint", endpoint]
        with (tmp_path / "worker.log").open("wb") as log:
            worker = subprocess.Popen(
                [*command, "--amqp-url", AMQP_URL],
                cwd=tmp_path,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            call = subprocess.run(
                [sys.executable, "-m", "pikku_mq", "call", "add", '{"a": 2, "b": 3}', "--timeout", "5"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            if call.returncode == 0 or time.monotonic() > deadline or worker.poll() is not None:
                break
            time.sleep(0.3)
        assert call.returncode == 0, f"{call.stderr}\n{(tmp_path / 'worker.log').read_text()}"
        assert json.loads(call.stdout) == 5
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(15) == 0
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(10)


async def test_queue_named_after_deployment(mesh: Mesh, amqp_vhost: str) -> None:
    worker = make_worker(mesh, f"amqp://127.0.0.1:5672/{amqp_vhost}", "queue-from-id")
    async with worker:
        assert worker.endpoint is not None
        assert parse_endpoint(worker.endpoint).queue == "pikku.queue-from-id"
        duplicate = make_worker(mesh, f"amqp://127.0.0.1:5672/{amqp_vhost}", "queue-from-id")
        with pytest.raises(ConfigurationError, match="in use by another connection"):
            await duplicate.start()


async def test_silent_broker_fails_fast_after_first_attempt() -> None:
    # Something accepts TCP on the caller's broker port but never speaks AMQP, as a stalled broker does.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        transport = AmqpTransport(f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/", connect_timeout=1.0)
        request = CallRequest(name="echo", data=1, headers={})
        try:
            started = time.monotonic()
            with pytest.raises(EndpointUnreachableError):
                await transport.call("amqp://127.0.0.1:5672/%2F?queue=pikku-t-silent", request, 5)
            assert time.monotonic() - started < 3
            started = time.monotonic()
            with pytest.raises(EndpointUnreachableError, match="a moment ago"):
                await transport.call("amqp://127.0.0.1:5672/%2F?queue=pikku-t-silent", request, 5)
            assert time.monotonic() - started < 0.1
        finally:
            await transport.close()


def test_unparsable_broker_url_is_configuration_error() -> None:
    for url in ("amqp://guest:pa#x@127.0.0.1:5672/", "amqp://guest:guest@127.0.0.1:notaport/", "amqp://u:p@[::1/"):
        with pytest.raises(ConfigurationError) as caught:
            AmqpServer(url=url)
        assert "pa#x" not in str(caught.value)
