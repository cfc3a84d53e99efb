"""Echo servers of the transport benchmark, one process each: ``python rpc_servers.py KIND [options]``.

Each server prints ``READY`` on stdout once it takes calls, and stops cleanly on SIGTERM. Every kind
runs on uvloop. The kinds:

- ``pikku``: a PikkuWorker serving ``rpc_echo.echo`` at ``--endpoint``, registered in Redis under
  ``--key-prefix`` (it signs and checks calls when ``PIKKU_REMOTE_SECRET`` is set);
- ``raw-http``: the bare ASGI echo app of raw_echo_server.py on uvicorn (httptools), at ``--port``;
- ``raw-nats``: nats-py, replying to each request on ``--subject`` with its own bytes;
- ``features-nats``: nats-py by hand with only the work per call that pikku_mq's design requires
  (see :func:`features_nats_server`); with ``--pikku-client`` it runs on pikku_mq's nats-py client class;
- ``raw-amqp``: aio-pika, consuming ``--queue`` without acks and publishing each body back to its reply_to;
- ``faststream-nats`` and ``faststream-rabbit``: a FastStream subscriber that returns its ``Payload``;
- ``aiopika-rpc``: aio-pika's RPC pattern (``aio_pika.patterns.RPC``) with its defaults.

nameko runs from nameko_echo.py under eventlet.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import msgpack
import uvloop
from rpc_echo import Payload, echo


@asynccontextmanager
async def pikku_server(args: argparse.Namespace) -> AsyncIterator[None]:
    from pikku_mq import PikkuWorker
    from pikku_mq.backends.redis import RedisDeploymentService

    discovery = RedisDeploymentService(args.redis_url, key_prefix=args.key_prefix)
    worker = PikkuWorker(
        endpoint=args.endpoint,
        deployment_id=args.id,
        functions=[echo],
        deployment_service=discovery,
        drain_timeout=2.0,
    )
    try:
        async with worker:
            yield
    finally:
        await discovery.close()


@asynccontextmanager
async def raw_http_server(args: argparse.Namespace) -> AsyncIterator[None]:
    import uvicorn
    from raw_echo_server import app

    config = uvicorn.Config(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn exited during startup")
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task


@asynccontextmanager
async def features_nats_server(args: argparse.Namespace) -> AsyncIterator[None]:
    """Serve ``echo`` over nats-py with the work per call that pikku_mq's design requires, and nothing else.

    That is a task per request, so that calls run concurrently, and a timer that ends the call at the
    deadline of its ``pikku-deadline-ms`` header. The msgpack envelope is decoded, and the input and
    output are validated with the ``Payload`` model. A fingerprint of the body is kept under the call id
    while the call runs, for de-duplication. The reply carries ``pikku-status``.
    """
    loop = asyncio.get_running_loop()
    nc = await connect_nats(args)
    running: dict[str, bytes] = {}
    tasks: set[asyncio.Task[None]] = set()
    ok = {"pikku-status": "200"}

    async def serve(msg: Any) -> None:
        headers = msg.headers or {}
        call_id = headers.get("pikku-call-id", "")
        task = asyncio.current_task(loop)
        assert task is not None
        timer = loop.call_later(int(headers.get("pikku-deadline-ms", "30000")) / 1000, task.cancel)
        try:
            running[call_id] = hashlib.blake2b(msg.data, digest_size=16).digest()
            data = Payload.model_validate(msgpack.unpackb(msg.data)["data"])
            result = await echo(None, data)
            body = msgpack.packb(Payload.model_validate(result).model_dump(mode="json"))
            await nc.publish(msg.reply, body, headers=ok)
        finally:
            timer.cancel()
            running.pop(call_id, None)

    async def on_request(msg: Any) -> None:
        task = loop.create_task(serve(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    await nc.subscribe(args.subject, queue="bench", cb=on_request)
    try:
        yield
    finally:
        await nc.close()


async def connect_nats(args: argparse.Namespace) -> Any:
    """Connect with nats-py's client, or with pikku_mq's subclass of it when ``--pikku-client`` is given."""
    import nats

    if not args.pikku_client:
        return await nats.connect(args.nats_url)
    from pikku_mq.transports.nats import _Client

    nc = _Client()
    await nc.connect(args.nats_url)
    return nc


@asynccontextmanager
async def raw_nats_server(args: argparse.Namespace) -> AsyncIterator[None]:
    import nats

    nc = await nats.connect(args.nats_url)

    async def on_request(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(args.subject, queue="bench", cb=on_request)
    await nc.flush()
    try:
        yield
    finally:
        await nc.drain()


@asynccontextmanager
async def raw_amqp_server(args: argparse.Namespace) -> AsyncIterator[None]:
    import aio_pika

    connection = await aio_pika.connect(args.amqp_url)
    channel = await connection.channel(publisher_confirms=False)
    await channel.set_qos(prefetch_count=1024)
    queue = await channel.declare_queue(args.queue, auto_delete=True)
    exchange = channel.default_exchange

    async def on_request(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        reply = aio_pika.Message(body=message.body, correlation_id=message.correlation_id)
        await exchange.publish(reply, routing_key=message.reply_to or "")

    await queue.consume(on_request, no_ack=True)
    try:
        yield
    finally:
        await connection.close()


@asynccontextmanager
async def faststream_nats_server(args: argparse.Namespace) -> AsyncIterator[None]:
    from faststream.nats import NatsBroker

    broker = NatsBroker(args.nats_url, logger=None)

    @broker.subscriber(args.subject, queue="bench")
    async def handle(message: Payload) -> Payload:
        return message

    async with broker:
        await broker.start()
        yield


@asynccontextmanager
async def faststream_rabbit_server(args: argparse.Namespace) -> AsyncIterator[None]:
    from faststream.rabbit import RabbitBroker, RabbitQueue

    broker = RabbitBroker(args.amqp_url, logger=None)

    @broker.subscriber(RabbitQueue(args.queue, auto_delete=True))
    async def handle(message: Payload) -> Payload:
        return message

    async with broker:
        await broker.start()
        yield


@asynccontextmanager
async def aiopika_rpc_server(args: argparse.Namespace) -> AsyncIterator[None]:
    import aio_pika
    from aio_pika.patterns import RPC

    connection = await aio_pika.connect(args.amqp_url)
    channel = await connection.channel()
    rpc = await RPC.create(channel)

    async def echo_call(*, data: Any) -> Any:
        return data

    await rpc.register(args.queue, echo_call, auto_delete=True)
    try:
        yield
    finally:
        await rpc.close()
        await connection.close()


SERVERS: dict[str, Callable[[argparse.Namespace], AbstractAsyncContextManager[None]]] = {
    "pikku": pikku_server,
    "raw-http": raw_http_server,
    "raw-nats": raw_nats_server,
    "features-nats": features_nats_server,
    "raw-amqp": raw_amqp_server,
    "faststream-nats": faststream_nats_server,
    "faststream-rabbit": faststream_rabbit_server,
    "aiopika-rpc": aiopika_rpc_server,
}


async def serve(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with SERVERS[args.kind](args):
        print("READY", flush=True)
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=sorted(SERVERS))
    parser.add_argument("--endpoint", help="pikku: the endpoint to serve")
    parser.add_argument("--id", help="pikku: the deployment id")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="pikku: the discovery store")
    parser.add_argument("--key-prefix", help="pikku: the Redis key prefix of the discovery namespace")
    parser.add_argument("--port", type=int, help="raw-http: the port to listen on")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222", help="NATS server URL")
    parser.add_argument("--subject", help="raw-nats, faststream-nats: the request subject")
    parser.add_argument("--pikku-client", action="store_true", help="features-nats: pikku_mq's nats-py client class")
    parser.add_argument("--amqp-url", help="AMQP broker URL with the benchmark's vhost")
    parser.add_argument("--queue", help="raw-amqp, faststream-rabbit, aiopika-rpc: the request queue or method")
    args = parser.parse_args()
    try:
        uvloop.run(serve(args))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
