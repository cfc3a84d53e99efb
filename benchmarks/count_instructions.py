"""Count the CPU instructions that pikku_mq executes per call, with valgrind's callgrind.

An instruction count does not depend on what else the machine runs: two runs of the same code give
the same count to within about 0.1%, where CPU time on a shared 2-core VM moves by 10% or more. So
a change of 1% in the work per call shows here, and the timed benchmarks then confirm it. Each part
runs in a child process under ``valgrind --tool=callgrind`` that counts only its measured loop, and
the report gives instructions per call:

- ``worker``: a PikkuWorker's NATS client takes ``--batch`` requests per read, as if nats-server had
  sent them (the benchmark's ``echo``, a 100-byte payload and the four call headers), and serves them.
  Its writes are discarded, so the count covers parsing, the task per request, the dispatcher and the
  reply's encoding, but no system call;
- ``dispatcher``: ``Dispatcher.handle`` and the msgpack-ready encoding of its outcome, as a broker
  worker runs them;
- ``http-app``: pikku_mq's ASGI app serving one HTTP request at a time, called directly with the
  scope, headers and JSON body that uvicorn passes on for the benchmark's call. The count covers the
  headers, the route, the body, the dispatcher and the reply, but neither uvicorn nor a socket;
- ``required``: only the steps that the worker's design requires for each call, written plainly. That
  is the msgpack body, the fingerprint, input and output validation, the function, the reply's
  encoding and a deadline timer;
- ``caller``: ``rpc.remote`` with ``--in-flight`` calls in flight (64 by default) over a NATS
  connection. For each request it writes, a reply is fed to its parser, so the count covers
  routing, the request's encoding, the reply's way in and its decoding, but no system call;
- ``raw-worker`` and ``raw-caller``, counted only when named: the benchmark's raw NATS floor in the
  same harnesses. That is a plain nats-py subscriber that sends each body back, fed ``--batch``
  requests per read without headers, and nats-py's ``request()`` with ``--in-flight`` calls in
  flight;
- ``http-caller``, ``http-server``, ``raw-http-caller`` and ``raw-http-server``, counted only when
  named: one HTTP call at a time over a real connection on 127.0.0.1, as the benchmark's
  sequential phase makes them, with the other end in a process that is not counted. The callers are
  ``rpc.remote`` and the raw floor's aiohttp client, both calling a PikkuWorker, so they read the
  same replies. The servers are a PikkuWorker and the raw floor's bare ASGI app on uvicorn, both
  called by an aiohttp client that sends the headers of pikku_mq's caller. Their counts cover
  uvicorn, the app and the event loop, and the callers' counts cover aiohttp and the event loop.

The ``worker`` and ``caller`` parts connect to NATS on 127.0.0.1:4222 for their set-up, under a
subject prefix of their own, and the HTTP parts listen on free ports of 127.0.0.1. Counts are those
of the Python, uvloop and libraries installed here. Under valgrind OpenSSL may take another code
path than on the bare CPU, so compare counts with counts, not with timings. To compare two trees,
run this file with ``PYTHONPATH`` set to each.

Run from the repository root: ``python benchmarks/count_instructions.py [--parts worker caller]
[--calls 1984] [--batch 64] [--in-flight 64]``; ``--batch 1`` and ``--in-flight 1`` count one
call at a time (the HTTP parts always make one call at a time). Needs valgrind (Debian's
``valgrind`` package); each part takes about 10 to 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

NATS_URL = "nats://127.0.0.1:4222"
PARTS = ("worker", "dispatcher", "required", "caller", "http-app")
RAW_PARTS = ("raw-worker", "raw-caller", "http-caller", "http-server", "raw-http-caller", "raw-http-server")
"""The parts counted only when named: the raw floors, and the HTTP call parts, which start a second process."""
CALL_HEADERS = {"x-request-id": "a" * 32, "pikku-hop": "1", "pikku-deadline-ms": "29999"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=PARTS + RAW_PARTS,
        default=list(PARTS),
        help="what to count (default: all but the raw and the HTTP call parts)",
    )
    parser.add_argument("--calls", type=int, default=1984, help="calls counted in each part")
    parser.add_argument("--batch", type=int, default=64, help="worker: requests per read")
    parser.add_argument("--in-flight", type=int, default=64, help="caller: calls in flight")
    parser.add_argument("--child", choices=PARTS + RAW_PARTS, help=argparse.SUPPRESS)
    parser.add_argument("--serve-http", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--drive-http", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # SystemExit on SIGTERM, so that subprocess.run() kills the counted child, as it does on Ctrl-C.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if args.serve_http is not None:
        uvloop.run(serve_http(args.serve_http))
        return
    if args.drive_http is not None:
        uvloop.run(drive_http(args.drive_http, args.calls))
        return
    if args.child:
        uvloop.run(CHILDREN[args.child](args))
        return

    print("| part | instructions per call |")
    print("|---|---:|")
    for part in args.parts:
        count = count_part(part, args)
        print(f"| {part} | {count / args.calls:,.0f} |", flush=True)


def count_part(part: str, args: argparse.Namespace) -> int:
    """Run one part in a child under callgrind and return the instructions counted in its loop."""
    argv = [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        part,
        "--calls",
        str(args.calls),
        "--batch",
        str(args.batch),
        "--in-flight",
        str(args.in_flight),
    ]
    # PIKKU_* variables would turn on signing, events or metrics in the counted processes.
    env = {name: value for name, value in os.environ.items() if not name.startswith("PIKKU_")}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False, env=env)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise SystemExit(f"the {part} part failed under valgrind (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return int(found.group(1))


async def counted(calls: Callable[[], Awaitable[None]]) -> None:
    """Run ``calls`` with callgrind counting, and only then."""
    toggle("on")
    try:
        await calls()
    finally:
        toggle("off")


def toggle(state: str) -> None:
    # callgrind_control makes the valgrind of this process to start or stop counting, and waits until it has.
    subprocess.run(["callgrind_control", "-i", state, str(os.getpid())], capture_output=True, check=True)


# -- the parts -----------------------------------------------------------------------------------------


class _DiscardingWriter:
    """The part of asyncio's StreamWriter that pikku_mq's NATS client writes to, handing the bytes to ``on_write``."""

    def __init__(self, on_write: Callable[[list[bytes]], None]) -> None:
        self.transport = self
        self.writelines = on_write

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class _DiscardingTransport:
    """nats-py's transport, with writes handed to ``on_write`` and reads passed to the real one."""

    def __init__(self, real: Any, on_write: Callable[[list[bytes]], None] = lambda parts: None) -> None:
        self._real = real
        self._io_writer = _DiscardingWriter(on_write)
        self.writelines = on_write

    async def drain(self) -> None:
        return None

    def at_eof(self) -> bool:
        return bool(self._real.at_eof())

    async def read(self, size: int) -> bytes:
        return bytes(await self._real.read(size))


async def worker_part(args: argparse.Namespace) -> None:
    import msgpack
    from rpc_echo import echo, make_payload

    from pikku_mq import MemoryDeploymentService, MemoryRegistry, PikkuWorker

    tag = f"count{uuid.uuid4().hex[:8]}"
    worker = PikkuWorker(
        endpoint=f"{NATS_URL}/{tag}",
        functions=[echo],
        deployment_service=MemoryDeploymentService(MemoryRegistry()),
    )
    async with worker:
        server: Any = worker._servers[0]
        nc = server._nc
        real, nc._transport = nc._transport, _DiscardingTransport(nc._transport)
        line = f"HMSG {tag}.echo {server._sub._id} _INBOX.count.%d %d %d\r\n"
        body = msgpack.packb({"data": make_payload(100)})

        def read(size: int) -> bytes:
            """Return ``size`` requests as nats-server sends them, each with a fresh call id."""
            messages = []
            for index in range(size):
                headers = {**CALL_HEADERS, "pikku-call-id": uuid.uuid4().hex}
                block = ("NATS/1.0\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n").encode()
                messages.append((line % (index, len(block), len(block) + len(body))).encode() + block + body + b"\r\n")
            return b"".join(messages)

        async def serve(reads: list[bytes]) -> None:
            for data in reads:
                await nc._ps.parse(data)  # makes a task for each request
                # Polling adds less to the count than a wait on 64 tasks would.
                while server._tasks:  # noqa: ASYNC110
                    await asyncio.sleep(0)

        await serve([read(args.batch) for _ in range(10)])
        reads = [read(args.batch) for _ in range(args.calls // args.batch)]
        await counted(lambda: serve(reads))
        nc._transport = real


async def dispatcher_part(args: argparse.Namespace) -> None:
    from rpc_echo import echo, make_payload

    from pikku_mq import FunctionRegistry
    from pikku_mq._dispatch import Dispatcher

    registry = FunctionRegistry()
    registry.add(echo.__pikku__)
    dispatcher = Dispatcher(registry)
    payload = make_payload(100)
    # A fresh call id per call: echo is idempotent, so a repeated id would replay the recorded result.
    headers = [{**CALL_HEADERS, "pikku-call-id": uuid.uuid4().hex} for _ in range(args.calls + 200)]

    async def handle(batch: list[dict[str, str]]) -> None:
        for call_headers in batch:
            (await dispatcher.handle("echo", payload, call_headers)).encode_python()

    await handle(headers[:200])
    await counted(lambda: handle(headers[200:]))


async def http_app_part(args: argparse.Namespace) -> None:
    import json

    from rpc_echo import echo, make_payload

    from pikku_mq import FunctionRegistry
    from pikku_mq._dispatch import Dispatcher
    from pikku_mq.transports.http import JSON, PikkuASGIApp

    registry = FunctionRegistry()
    registry.add(echo.__pikku__)
    app = PikkuASGIApp(Dispatcher(registry))
    body = json.dumps({"data": make_payload(100)}).encode()
    # The headers that pikku_mq's aiohttp client sends, as uvicorn passes them on: names in lower case,
    # new bytes objects for each request, and a fresh call id.
    sent = {
        "host": "127.0.0.1:8000",
        "accept": "*/*",
        "accept-encoding": "gzip, deflate",
        "content-type": JSON,
        "content-length": str(len(body)),
        **CALL_HEADERS,
    }

    def scope() -> dict[str, Any]:
        headers = [(name.encode(), value.encode()) for name, value in sent.items()]
        headers.append((b"pikku-call-id", uuid.uuid4().hex.encode()))
        path = "/remote/rpc/echo"
        return {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "headers": headers}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        return None

    async def serve(scopes: list[dict[str, Any]]) -> None:
        for request in scopes:
            await app(request, receive, send)

    await serve([scope() for _ in range(200)])
    scopes = [scope() for _ in range(args.calls)]
    await counted(lambda: serve(scopes))


async def required_part(args: argparse.Namespace) -> None:
    import hashlib

    import msgpack
    from rpc_echo import Payload, echo, make_payload

    loop = asyncio.get_running_loop()
    body = msgpack.packb({"data": make_payload(100)})

    running: dict[int, bytes] = {}

    async def serve_one(call: int) -> bytes:
        task = asyncio.current_task(loop)
        assert task is not None
        timer = loop.call_later(29.999, task.cancel)
        try:
            running[call] = hashlib.blake2b(body, digest_size=16).digest()
            data = Payload.model_validate(msgpack.unpackb(body)["data"])
            result = await echo(None, data)
            return msgpack.packb(Payload.model_validate(result).model_dump(mode="json"))  # type: ignore[no-any-return]
        finally:
            timer.cancel()
            running.pop(call, None)

    async def serve(calls: int) -> None:
        for call in range(calls):
            await serve_one(call)

    await serve(200)
    await counted(lambda: serve(args.calls))


async def caller_part(args: argparse.Namespace) -> None:
    import msgpack
    from rpc_echo import echo, make_payload

    from pikku_mq import RPC, MemoryDeploymentService, MemoryRegistry, PikkuWorker

    tag = f"count{uuid.uuid4().hex[:8]}"
    registry = MemoryRegistry()
    endpoint = f"{NATS_URL}/{tag}"
    worker = PikkuWorker(endpoint=endpoint, functions=[echo], deployment_service=MemoryDeploymentService(registry))
    discovery = MemoryDeploymentService(registry)
    rpc = RPC(deployment_service=discovery)
    payload = make_payload(100)
    reply_block = b"NATS/1.0\r\npikku-status: 200\r\n\r\n"
    reply_body = msgpack.packb(payload)
    inboxes = re.compile(rb"HPUB \S+ (\S+) ")
    loop = asyncio.get_running_loop()

    async with worker:
        await rpc.remote("echo", payload)  # opens the caller's connection and fills its routing cache
        transport: Any = discovery.router.transports.for_endpoint(endpoint)
        nc = transport._slots[0].nc
        inbox_sid = next(iter(nc._direct))

        def answer(parts: list[bytes]) -> None:
            """Feed the reply to every request written, on the next turn of the loop, as nats-server would."""
            replies = []
            for inbox in inboxes.findall(b"".join(parts)):
                size = len(reply_block) + len(reply_body)
                replies.append(
                    b"HMSG %s %d %d %d\r\n%s%s\r\n"
                    % (inbox, inbox_sid, len(reply_block), size, reply_block, reply_body)
                )
            if replies:
                loop.call_soon(loop.create_task, nc._ps.parse(b"".join(replies)))

        await count_calls(nc, answer, args, rpc.remote, "echo", payload)
    await discovery.close()


async def count_calls(
    nc: Any,
    answer: Callable[[list[bytes]], None],
    args: argparse.Namespace,
    call: Callable[..., Awaitable[Any]],
    *call_args: Any,
) -> None:
    """Count ``args.calls`` calls of ``call(*call_args)``, ``args.in_flight`` at a time, after a warm-up.

    The client ``nc`` writes to ``answer``, which feeds it the replies, in place of its socket.
    """

    async def call_all(calls: int) -> None:
        async def one_after_another(count: int) -> None:
            for _ in range(count):
                await call(*call_args)

        await asyncio.gather(*(one_after_another(calls // args.in_flight) for _ in range(args.in_flight)))

    real, nc._transport = nc._transport, _DiscardingTransport(nc._transport, answer)
    try:
        await call_all(args.in_flight * 10)
        await counted(lambda: call_all(args.calls))
    finally:
        nc._transport = real


async def raw_worker_part(args: argparse.Namespace) -> None:
    import msgpack
    import nats
    from rpc_echo import make_payload

    subject = f"count{uuid.uuid4().hex[:8]}.raw"
    nc = await nats.connect(NATS_URL)
    served = 0

    async def on_request(msg: Any) -> None:
        nonlocal served
        await msg.respond(msg.data)
        served += 1

    sub = await nc.subscribe(subject, queue="bench", cb=on_request)
    await nc.flush()
    real, nc._transport = nc._transport, _DiscardingTransport(nc._transport)
    body = msgpack.packb({"data": make_payload(100)})

    def read(size: int) -> bytes:
        return b"".join(
            b"MSG %s %d _INBOX.count.%d %d\r\n%s\r\n" % (subject.encode(), sub._id, index, len(body), body)
            for index in range(size)
        )

    async def serve(reads: list[bytes]) -> None:
        for data in reads:
            expected = served + args.batch
            await nc._ps.parse(data)  # queues each message for the subscription's task
            while served < expected:  # noqa: ASYNC110
                await asyncio.sleep(0)

    try:
        await serve([read(args.batch) for _ in range(10)])
        reads = [read(args.batch) for _ in range(args.calls // args.batch)]
        await counted(lambda: serve(reads))
    finally:
        nc._transport = real
        await nc.close()


async def raw_caller_part(args: argparse.Namespace) -> None:
    import msgpack
    import nats
    from rpc_echo import make_payload

    subject = f"count{uuid.uuid4().hex[:8]}.raw"
    nc = await nats.connect(NATS_URL)
    body = msgpack.packb(make_payload(100))
    loop = asyncio.get_running_loop()

    async def echo(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(subject, cb=echo)
    await nc.request(subject, body, timeout=5)  # makes the inbox subscription, the last one made
    inbox_sid = max(nc._subs)
    requests = re.compile(rb"PUB \S+ (\S+) ")

    def answer(parts: list[bytes]) -> None:
        replies = [
            b"MSG %s %d %d\r\n%s\r\n" % (inbox, inbox_sid, len(body), body)
            for inbox in requests.findall(b"".join(parts))
        ]
        if replies:
            loop.call_soon(loop.create_task, nc._ps.parse(b"".join(replies)))

    try:
        await count_calls(nc, answer, args, nc.request, subject, body, 5)
    finally:
        await nc.close()


# -- HTTP, one call at a time over a real connection -------------------------------------------------

WARM_UP_CALLS = 200
"""Calls made before counting starts, so that connections, caches and lookups are in place."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def start_helper(*argv: str) -> asyncio.subprocess.Process:
    """Start this file in a process that valgrind does not count (it follows no children)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )


async def read_line(helper: asyncio.subprocess.Process, expected: bytes) -> None:
    assert helper.stdout is not None
    try:
        line = await asyncio.wait_for(helper.stdout.readline(), 300)
    except TimeoutError:
        raise SystemExit(f"the helper process did not write {expected!r} within 300 s") from None
    if line.strip() != expected:
        raise SystemExit(f"the helper process wrote {line!r} where {expected!r} was expected")


async def stop_helper(helper: asyncio.subprocess.Process) -> None:
    if helper.returncode is None:
        helper.terminate()
    await asyncio.wait_for(helper.wait(), 30)


async def serve_http(port: int) -> None:
    """Serve the benchmark's ``echo`` with a PikkuWorker on ``port`` until stdin closes."""
    from rpc_echo import echo

    from pikku_mq import MemoryDeploymentService, PikkuWorker

    worker = PikkuWorker(
        endpoint=f"http://127.0.0.1:{port}", functions=[echo], deployment_service=MemoryDeploymentService()
    )
    async with worker:
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def drive_http(url: str, calls: int) -> None:
    """Post ``echo`` calls to ``url`` one at a time with the headers of pikku_mq's caller: a warm-up, then ``calls``."""
    import json

    import aiohttp
    from rpc_echo import make_payload

    body = json.dumps({"data": make_payload(100)}).encode()
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(headers={"User-Agent": "pikku-mq"}) as session:

        async def call_all(count: int) -> None:
            for _ in range(count):
                headers = {
                    **CALL_HEADERS,
                    "pikku-call-id": uuid.uuid4().hex,
                    "content-type": "application/json",
                }
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"the server replied {response.status} to a call")

        await call_all(WARM_UP_CALLS)
        print("warm", flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)
        await call_all(calls)
        print("done", flush=True)


async def count_served(args: argparse.Namespace, url: str) -> None:
    """Count what this process does while a helper process makes ``args.calls`` calls to ``url``."""
    helper = await start_helper("--drive-http", url, "--calls", str(args.calls))
    assert helper.stdin is not None
    try:
        await read_line(helper, b"warm")
        toggle("on")
        helper.stdin.write(b"go\n")
        await helper.stdin.drain()
        await read_line(helper, b"done")
        toggle("off")
    finally:
        await stop_helper(helper)


async def http_server_part(args: argparse.Namespace) -> None:
    from rpc_echo import echo

    from pikku_mq import MemoryDeploymentService, PikkuWorker

    endpoint = f"http://127.0.0.1:{free_port()}"
    worker = PikkuWorker(endpoint=endpoint, functions=[echo], deployment_service=MemoryDeploymentService())
    async with worker:
        await count_served(args, f"{endpoint}/remote/rpc/echo")


async def raw_http_server_part(args: argparse.Namespace) -> None:
    import uvicorn
    from raw_echo_server import app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
                raise SystemExit("uvicorn exited during startup")
            await asyncio.sleep(0.01)
        await count_served(args, f"http://127.0.0.1:{port}/remote/rpc/echo")
    finally:
        server.should_exit = True
        await task


async def count_http_calls(args: argparse.Namespace, call: Callable[[], Awaitable[Any]]) -> None:
    """Count ``args.calls`` sequential calls of ``call`` in this process, after a warm-up."""

    async def call_all(count: int) -> None:
        for _ in range(count):
            await call()

    await call_all(WARM_UP_CALLS)
    await counted(lambda: call_all(args.calls))


@contextlib.asynccontextmanager
async def http_worker_process() -> AsyncIterator[str]:
    """Run a PikkuWorker serving ``echo`` in a helper process and yield its endpoint."""
    port = free_port()
    helper = await start_helper("--serve-http", str(port))
    try:
        await read_line(helper, b"ready")
        yield f"http://127.0.0.1:{port}"
    finally:
        assert helper.stdin is not None
        helper.stdin.close()
        await stop_helper(helper)


async def http_caller_part(args: argparse.Namespace) -> None:
    from rpc_echo import make_payload

    from pikku_mq import RPC, DeploymentConfig, MemoryDeploymentService, MemoryRegistry

    payload = make_payload(100)
    registry = MemoryRegistry()
    async with http_worker_process() as endpoint:
        # The worker registers in its own process, so its endpoint is registered here on its behalf.
        peer = MemoryDeploymentService(registry)
        await peer.start(DeploymentConfig("count-worker", endpoint, functions=["echo"]))
        # A long-lived routing cache, since valgrind slows the counted calls past the default 5 s.
        discovery = MemoryDeploymentService(registry, routing_cache_ttl=3600)
        rpc = RPC(deployment_service=discovery)
        try:
            await count_http_calls(args, lambda: rpc.remote("echo", payload))
        finally:
            await discovery.close()
            await peer.close()


async def raw_http_caller_part(args: argparse.Namespace) -> None:
    import json

    import aiohttp
    from rpc_echo import make_payload

    payload = make_payload(100)
    async with http_worker_process() as endpoint, aiohttp.ClientSession() as session:
        url = f"{endpoint}/remote/rpc/echo"

        async def call() -> Any:
            body = json.dumps({"data": payload}).encode()
            async with session.post(url, data=body, headers={"content-type": "application/json"}) as response:
                reply = json.loads(await response.read())
                if response.status != 200:
                    raise SystemExit(f"the worker replied {response.status} to a call: {reply}")
                return reply

        await count_http_calls(args, call)


CHILDREN: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {
    "worker": worker_part,
    "dispatcher": dispatcher_part,
    "http-app": http_app_part,
    "required": required_part,
    "caller": caller_part,
    "raw-worker": raw_worker_part,
    "raw-caller": raw_caller_part,
    "http-caller": http_caller_part,
    "http-server": http_server_part,
    "raw-http-caller": raw_http_caller_part,
    "raw-http-server": raw_http_server_part,
}


if __name__ == "__main__":
    main()
