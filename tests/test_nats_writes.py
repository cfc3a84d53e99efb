"""When pikku_mq's NATS client writes its buffer to the socket, and how it hands messages over in the read loop.

Each test runs its own nats-server, so it can stop or kill it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator

import nats
import pytest
from _support_core import wait_until
from _support_servers import PrivateNats
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from pikku_mq import DeadlineExceededError
from pikku_mq._types import CallRequest
from pikku_mq.transports.nats import _MAX_HOLD, NatsTransport, _Client, _close_client, _ignore, _open_client


async def _connect(url: str) -> _Client:
    return await _open_client(
        url, name="test", connect_timeout=2, on_disconnected=_ignore, on_reconnected=_ignore, on_closed=_ignore
    )


@pytest.fixture
async def client(private_nats: PrivateNats) -> AsyncIterator[_Client]:
    nc = await _connect(private_nats.url)
    yield nc
    await _close_client(nc)


@pytest.fixture
async def listener(private_nats: PrivateNats) -> AsyncIterator[NatsClient]:
    nc = await nats.connect(private_nats.url, connect_timeout=2, allow_reconnect=False)
    yield nc
    await nc.close()


async def _until_routed(publisher: NatsClient, subject: str, received: list[bytes]) -> None:
    """Publish probes on ``subject`` until one reaches ``received``, then empty it.

    A plain nats-py (2.16) subscriber's ``flush()`` may return before the server has its subscription
    (see :func:`test_flush_after_subscribe_reaches_server`).
    """
    for _ in range(200):
        await publisher.publish(subject, b"probe")
        await publisher.flush(timeout=2)
        await asyncio.sleep(0.01)
        if received:
            break
    await publisher.publish(subject, b"probe-end")
    await wait_until(lambda: received[-1:] == [b"probe-end"], timeout=2)
    received.clear()


async def _collect(nc: NatsClient, subject: str, publisher: NatsClient) -> list[bytes]:
    received: list[bytes] = []

    async def keep(msg: Msg) -> None:
        received.append(msg.data)

    await nc.subscribe(subject, cb=keep)
    await nc.flush(timeout=2)
    await _until_routed(publisher, subject, received)
    return received


async def test_only_call_written_at_once(client: _Client, listener: NatsClient) -> None:
    received = await _collect(listener, "w.once", client)

    client.write_at_once = True
    await client.publish("w.once", b"first")
    # Written within publish(), before the event loop gives nats-py's flusher a turn.
    assert client._pending == []

    client.write_at_once = False
    await client.publish("w.once", b"second")
    assert len(client._pending) == 1  # left for the flusher

    await wait_until(lambda: received == [b"first", b"second"], timeout=2)


async def test_buffer_written_after_hold(client: _Client, listener: NatsClient) -> None:
    received = await _collect(listener, "w.hold", client)

    await client.publish("w.hold", b"1")
    # A busy event loop: the flusher gets no turn while the first message waits past the hold time.
    busy_until = time.perf_counter() + 2 * _MAX_HOLD
    while time.perf_counter() < busy_until:
        pass
    await client.publish("w.hold", b"2")
    assert client._pending == []

    await wait_until(lambda: received == [b"1", b"2"], timeout=2)


async def test_backed_up_socket_left_to_flusher(private_nats: PrivateNats, listener: NatsClient) -> None:
    """While nats-server reads nothing, the client stops writing by itself, and nothing is lost."""
    client = await _connect(private_nats.url)
    received = await _collect(listener, "w.full", client)
    assert private_nats.process is not None
    chunk = b"x" * (256 * 1024)
    sent = 0
    os.kill(private_nats.process.pid, signal.SIGSTOP)
    try:
        client.write_at_once = True
        writer = client._transport._io_writer  # type: ignore[union-attr]
        # Fill the socket until the client's own transport buffers: at most 128 x 256 KiB.
        while not writer.transport.get_write_buffer_size() and sent < 128:
            await client.publish("w.full", chunk)
            sent += 1
        assert writer.transport.get_write_buffer_size() > 0, "the socket never backed up"
        await client.publish("w.full", b"last")
        sent += 1
        assert client._pending, "the client wrote to a backed-up socket instead of leaving it to the flusher"
    finally:
        os.kill(private_nats.process.pid, signal.SIGCONT)
    await wait_until(lambda: len(received) == sent, timeout=20)
    assert received[-1] == b"last"
    assert all(data == chunk for data in received[:-1])
    await _close_client(client)


async def test_no_write_while_reconnecting(private_nats: PrivateNats, client: _Client) -> None:
    private_nats.stop()
    await wait_until(lambda: client.is_reconnecting, timeout=5)

    client.write_at_once = True
    await client.publish("w.down", b"kept")
    assert client._pending
    assert client._pending[-1].endswith(b"kept\r\n")


async def test_publish_now_delivers_in_order(client: _Client, listener: NatsClient) -> None:
    received: list[Msg] = []
    data: list[bytes] = []

    async def keep(msg: Msg) -> None:
        received.append(msg)
        data.append(msg.data)

    await listener.subscribe("w.now", cb=keep)
    await listener.flush(timeout=2)
    await _until_routed(client, "w.now", data)
    received.clear()

    headers = {"pikku-status": "200", "x-request-id": "abc"}
    assert client.publish_now("w.now", b"1", headers, reply="w.reply.1")
    await client.publish("w.now", b"2", headers=headers)
    assert client.publish_now("w.now", b"3", headers)
    # Nothing else runs: only nats-py's flusher, which publish_now() woke, can write "3".
    await wait_until(lambda: [m.data for m in received] == [b"1", b"2", b"3"], timeout=2)

    assert [m.headers for m in received] == [headers] * 3
    assert [m.reply for m in received] == ["w.reply.1", "", ""]
    assert client.stats["out_msgs"] >= 3


async def test_publish_now_written_at_once(client: _Client) -> None:
    client.write_at_once = True
    assert client.publish_now("w.now.once", b"x", {"pikku-status": "200"})
    assert client._pending == []


async def test_publish_now_leaves_others_to_publish(private_nats: PrivateNats, client: _Client) -> None:
    # Each of these goes through publish(), which checks, buffers or raises as nats-py does.
    assert not client.publish_now("w.big", b"x" * (client.max_payload + 1), {"pikku-status": "200"})
    assert not client.publish_now("w.odd", b"x", {"pikku-status": " 200"})  # a value nats-py strips
    assert not client.publish_now("", b"x", {"pikku-status": "200"})
    client._pending_data_size = client._max_pending_size  # a full buffer, which publish() flushes first
    assert not client.publish_now("w.full", b"x", {"pikku-status": "200"})
    client._pending_data_size = sum(len(command) for command in client._pending)
    assert client._pending == []

    private_nats.stop()
    await wait_until(lambda: client.is_reconnecting, timeout=5)
    assert not client.publish_now("w.down", b"x", {"pikku-status": "200"})
    assert client._pending == []


async def test_direct_delivery_survives_handler_error(
    client: _Client, listener: NatsClient, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[bytes] = []

    def deliver(subject: str, reply: str, data: bytes, headers: object) -> None:
        if data == b"bad":
            raise RuntimeError("handler failed")
        got.append(data)

    await client.subscribe_direct("w.direct", deliver)
    await client.flush(timeout=2)
    await _until_routed(listener, "w.direct", got)
    with caplog.at_level(logging.ERROR, logger="pikku_mq.transports.nats"):
        for data in (b"a", b"bad", b"b"):
            await listener.publish("w.direct", data)
        await listener.flush(timeout=2)
        await wait_until(lambda: got == [b"a", b"b"], timeout=2)

    assert client.is_connected
    assert any("handling a message on b'w.direct' failed" in r.getMessage() for r in caplog.records)
    # The read loop still runs: a request through it gets its reply.

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    await listener.subscribe("w.echo", cb=echo)
    await listener.flush(timeout=2)
    replies: list[bytes] = []
    for _ in range(200):  # no responders until the server routes the new subscription (see _until_routed)
        with contextlib.suppress(nats.errors.NoRespondersError):
            replies.append((await client.request("w.echo", b"ping", timeout=2)).data)
            break
        await asyncio.sleep(0.01)
    assert replies == [b"ping"]


async def test_direct_delivery_ends_with_unsubscribe(client: _Client, listener: NatsClient) -> None:
    got: list[bytes] = []
    sub = await client.subscribe_direct("w.gone", lambda subject, reply, data, headers: got.append(data))
    await client.flush(timeout=2)
    await _until_routed(listener, "w.gone", got)
    marks: asyncio.Queue[bytes] = asyncio.Queue()

    async def mark(msg: Msg) -> None:
        marks.put_nowait(msg.data)

    await client.subscribe("w.mark", cb=mark)
    await client.flush(timeout=2)
    for _ in range(200):
        await listener.publish("w.mark", b"0")
        await listener.flush(timeout=2)
        with contextlib.suppress(TimeoutError):
            if await asyncio.wait_for(marks.get(), 0.01) == b"0":
                break
    await listener.publish("w.mark", b"0-end")
    while await asyncio.wait_for(marks.get(), 2) != b"0-end":
        pass

    await listener.publish("w.gone", b"before")
    await listener.publish("w.mark", b"1")
    assert await asyncio.wait_for(marks.get(), 2) == b"1"
    await sub.unsubscribe()
    await client.flush(timeout=2)
    await listener.publish("w.gone", b"after")
    await listener.publish("w.mark", b"2")
    # The server sends to one client in order: once the mark arrived, "after" would have too.
    assert await asyncio.wait_for(marks.get(), 2) == b"2"

    assert got == [b"before"]
    assert sub._id not in client._direct


async def test_flush_after_subscribe_reaches_server(client: _Client, listener: NatsClient) -> None:
    # nats-py (2.16) writes a flush's PING ahead of a SUB still in its buffer. In one loop of 2,000 with
    # plain nats-py, 28 messages were lost, because the server did not have the subscription yet.
    missed = []
    for index in range(300):
        arrived = asyncio.Event()

        async def note(msg: Msg, arrived: asyncio.Event = arrived) -> None:
            arrived.set()

        sub = await client.subscribe(f"w.sub.{index}", cb=note)
        await client.flush(timeout=2)
        await listener.publish(f"w.sub.{index}", b"x")
        try:
            await asyncio.wait_for(arrived.wait(), 1)
        except TimeoutError:
            missed.append(index)
        await sub.unsubscribe()

    assert missed == []


async def test_full_buffer_ends_at_deadline(private_nats: PrivateNats) -> None:
    """While nats-server reads nothing, calls whose request cannot be written still end at their deadline."""
    assert private_nats.process is not None
    transport = NatsTransport(private_nats.url)
    endpoint = f"nats://127.0.0.1:{private_nats.port}/w.frozen"
    connection = await transport._connection("echo", 2)  # connected before the server stops reading
    nc = connection.nc
    assert nc is not None
    data = {"note": "x" * (900 * 1024)}
    outcomes: list[tuple[float, BaseException | None]] = []

    async def timed_call() -> None:
        started = time.monotonic()
        try:
            await transport.call(endpoint, CallRequest("echo", data, {}), 1.0)
        except Exception as exc:
            outcomes.append((time.monotonic() - started, exc))
        else:
            outcomes.append((time.monotonic() - started, None))

    os.kill(private_nats.process.pid, signal.SIGSTOP)
    try:
        # The kernel takes tens of MiB for a socket whose reader stopped, then nats-py's buffer of 2 MiB
        # fills: waves of 10 calls of 900 KiB until a request can no longer be written (at most 90 MiB).
        calls: list[asyncio.Task[None]] = []
        for _ in range(10):
            calls += [asyncio.create_task(timed_call()) for _ in range(10)]
            await asyncio.sleep(0.05)
            if nc._pending_data_size > nc._max_pending_size:
                break
        full = nc._pending_data_size > nc._max_pending_size
        calls += [asyncio.create_task(timed_call()) for _ in range(3)]  # these wait in publish()
        await asyncio.wait_for(asyncio.gather(*calls), 10)
    finally:
        os.kill(private_nats.process.pid, signal.SIGCONT)
        await transport.close()

    assert full, "nats-py's buffer never filled"
    assert any("was not written" in str(error) for _, error in outcomes)
    assert all(isinstance(error, DeadlineExceededError) for _, error in outcomes), outcomes
    assert max(seconds for seconds, _ in outcomes) < 1.5
