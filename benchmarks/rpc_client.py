"""The measuring client of the transport benchmark: one case, one payload size, one JSON line on stdout.

Run by benchmarks/rpc_bench.py in a fresh process per measurement, on uvloop. Phases:

1. warm-up for ``--warmup`` seconds (connections, caches, discovery lookups);
2. sequential calls, one at a time, until ``--sequential`` calls or ``--sequential-seconds``: latency
   p50/p99 and calls/s at 1 in flight;
3. ``--concurrency`` calls in flight for ``--seconds``: calls/s, latency p50/p99, and the CPU time that
   this process, the servers (``--pids``) and the brokers (``--broker-pids``) spent per call, beside
   how busy the whole machine was.

With ``--memory-pid`` it instead makes ``--total-calls`` calls at ``--concurrency`` in flight and reports
the resident memory of that process after every ``--memory-every`` calls.

The raw cases encode the payload and decode the reply on every call, as a hand-written client must,
with the same codec as pikku_mq on that transport (JSON for HTTP, msgpack for the brokers).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import msgpack
import uvloop
from rpc_echo import make_payload

Call = Callable[[], Awaitable[Any]]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- cases -------------------------------------------------------------------------------------------


@asynccontextmanager
async def pikku_case(args: argparse.Namespace, payload: dict[str, Any]) -> AsyncIterator[Call]:
    from pikku_mq import RPC
    from pikku_mq.backends.redis import RedisDeploymentService

    discovery = RedisDeploymentService(args.redis_url, key_prefix=args.key_prefix)
    lookup = discovery.router._lookup

    async def counted_lookup(name: str) -> Any:
        LOOKUPS[0] += 1
        return await lookup(name)

    discovery.router._lookup = counted_lookup
    # The session travels, sealed in each call's token, only when PIKKU_REMOTE_SECRET is set.
    rpc = RPC(deployment_service=discovery, session={"userId": "bench-user", "roles": ["reader"]})

    async def call() -> Any:
        return await rpc.remote("echo", payload)

    try:
        yield call
    finally:
        await discovery.close()


@asynccontextmanager
async def raw_http_case(args: argparse.Namespace, payload: dict[str, Any]) -> AsyncIterator[Call]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:

        async def call() -> Any:
            body = json.dumps({"data": payload}).encode()
            async with session.post(args.url, data=body, headers={"content-type": "application/json"}) as response:
                return json.loads(await response.read())

        yield call


@asynccontextmanager
async def raw_nats_case(args: argparse.Namespace, payload: dict[str, Any]) -> AsyncIterator[Call]:
    import nats

    nc = await nats.connect(args.nats_url)

    async def call() -> Any:
        reply = await nc.request(args.subject, msgpack.packb({"data": payload}), timeout=30)
        return msgpack.unpackb(reply.data)

    try:
        yield call
    finally:
        await nc.close()


@asynccontextmanager
async def features_nats_case(args: argparse.Namespace, payload: dict[str, Any]) -> AsyncIterator[Call]:
    """nats-py's ``request()`` with the work per call that pikku_mq's design requires of a caller.

    That is the four metadata headers with two random ids, the msgpack envelope, and a check of the
    reply's ``pikku-status``. The deadline is nats-py's own request timeout, as in ``raw-nats``.
    With ``--pikku-client`` it runs on pikku_mq's subclass of nats-py's client.
    """
    import nats

    nc: Any
    if args.pikku_client:
        from pikku_mq.transports.nats import _Client

        nc = _Client()
        await nc.connect(args.nats_url)
    else:
        nc = await nats.connect(args.nats_url)

    async def call() -> Any:
        headers = {
            "x-request-id": os.urandom(16).hex(),
            "pikku-call-id": os.urandom(16).hex(),
            "pikku-hop": "1",
            "pikku-deadline-ms": "30000",
        }
        reply = await nc.request(args.subject, msgpack.packb({"data": payload}), timeout=30, headers=headers)
        if (reply.headers or {}).get("pikku-status") != "200":
            status = (reply.headers or {}).get("pikku-status")
            raise RuntimeError(f"the reply has pikku-status {status!r}, expected '200'")
        return msgpack.unpackb(reply.data)

    try:
        yield call
    finally:
        await nc.close()


@asynccontextmanager
async def raw_nats_2conn_case(args: argparse.Namespace, payload: dict[str, Any]) -> AsyncIterator[Call]:
    """nats-py request-reply as in ``raw-nats``, with the calls alternating over two connections."""
    import nats

    connections = [await nats.connect(args.nats_url), await nats.connect(args.nats_url)]
    turn = itertools.count()

    async def call() -> Any:
        nc = connections[next(turn) % 2]
        reply = await nc.request(args.subject, msgpack.packb({"data": payload}), timeout=30)
        return msgpack.unpackb(reply.data)

    try:
        yield call
    finally:
        for nc in connections:
            await nc.close()


@asynccontextmanager
async def raw_amqp_case(args: argparse.Namespace, payload: dict[str, Any]) -> AsyncIterator[Call]:
    import aio_pika

    connection = await aio_pika.connect(args.amqp_url)
    channel = await connection.channel(publisher_confirms=False)
    pending: dict[str, asyncio.Future[bytes]] = {}

    async def on_reply(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        future = pending.pop(message.correlation_id or "", None)
        if future is not None and not future.done():
            future.set_result(message.body)

    # Direct reply-to: consume the pseudo-queue without acks before the first publish.
    reply_queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
    await reply_queue.consume(on_reply, no_ack=True)
    exchange = channel.default_exchange
    loop = asyncio.get_running_loop()

    async def call() -> Any:
        correlation_id = uuid.uuid4().hex
        future: asyncio.Future[bytes] = loop.create_future()
        pending[correlation_id] = future
        message = aio_pika.Message(
            body=msgpack.packb({"data": payload}), correlation_id=correlation_id, reply_to="amq.rabbitmq.reply-to"
        )
        await exchange.publish(message, routing_key=args.queue)
        return msgpack.unpackb(await future)

    try:
        yield call
    finally:
        await connection.close()


@asynccontextmanager
async def faststream_nats_case(args: argparse.Namespace, payload: dict[str, Any]) -> AsyncIterator[Call]:
    from faststream.nats import NatsBroker

    broker = NatsBroker(args.nats_url, logger=None)
    async with broker:

        async def call() -> Any:
            response = await broker.request(payload, args.subject, timeout=30)
            return await response.decode()

        yield call


@asynccontextmanager
async def faststream_rabbit_case(args: argparse.Namespace, payload: dict[str, Any]) -> AsyncIterator[Call]:
    from faststream.rabbit import RabbitBroker

    broker = RabbitBroker(args.amqp_url, logger=None)
    async with broker:

        async def call() -> Any:
            response = await broker.request(payload, args.queue, timeout=30)
            return await response.decode()

        yield call


@asynccontextmanager
async def aiopika_rpc_case(args: argparse.Namespace, payload: dict[str, Any]) -> AsyncIterator[Call]:
    import aio_pika
    from aio_pika.patterns import RPC

    connection = await aio_pika.connect(args.amqp_url)
    channel = await connection.channel()
    rpc = await RPC.create(channel)

    async def call() -> Any:
        return await rpc.call(args.queue, kwargs={"data": payload})

    try:
        yield call
    finally:
        await rpc.close()
        await connection.close()


CASES: dict[str, Callable[[argparse.Namespace, dict[str, Any]], AbstractAsyncContextManager[Call]]] = {
    "pikku": pikku_case,
    "raw-http": raw_http_case,
    "raw-nats": raw_nats_case,
    "raw-nats-2conn": raw_nats_2conn_case,
    "features-nats": features_nats_case,
    "raw-amqp": raw_amqp_case,
    "faststream-nats": faststream_nats_case,
    "faststream-rabbit": faststream_rabbit_case,
    "aiopika-rpc": aiopika_rpc_case,
}

LOOKUPS = [0]
"""Discovery lookups that the pikku case made so far."""


# -- accounting --------------------------------------------------------------------------------------


def process_cpu(pid: int) -> float:
    """Return the CPU seconds (user and system) that process ``pid`` has used, or 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_times() -> tuple[float, float]:
    """Return the machine's busy and total CPU seconds since boot, summed over every core."""
    with open("/proc/stat") as stat:
        values = [int(v) for v in stat.readline().split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def resident_memory(pid: int) -> int:
    """Return the resident set size of process ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class CpuMeter:
    """CPU time of this process, the servers, the brokers and the machine over one phase."""

    def __init__(self, servers: list[int], brokers: list[int]) -> None:
        self.servers = servers
        self.brokers = brokers
        self.start = self._sample()

    def _sample(self) -> tuple[float, list[float], list[float], float, float]:
        busy, total = machine_times()
        own = time.process_time()
        return own, [process_cpu(p) for p in self.servers], [process_cpu(p) for p in self.brokers], busy, total

    def stop(self, calls: int, elapsed: float) -> dict[str, float]:
        end = self._sample()
        own, busy, total = end[0] - self.start[0], end[3] - self.start[3], end[4] - self.start[4]
        # A process that exits during the phase reads as 0.0 at the end: count only what each one added.
        servers = sum(max(0.0, b - a) for a, b in zip(self.start[1], end[1], strict=True))
        brokers = sum(max(0.0, b - a) for a, b in zip(self.start[2], end[2], strict=True))
        per_call = 1e6 / max(calls, 1)
        return {
            "client_cpu_us": own * per_call,
            "server_cpu_us": servers * per_call,
            "broker_cpu_us": brokers * per_call,
            "client_cpu_share": own / elapsed,
            "machine_busy_share": busy / total if total else 0.0,
            "others_cpu_share": max(0.0, busy - own - servers - brokers) / elapsed,
        }


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(fraction * len(sorted_values)) - 1))
    return sorted_values[index]


# -- phases ------------------------------------------------------------------------------------------


async def warm_up(call: Call, seconds: float) -> None:
    end = time.perf_counter() + seconds
    calls = 0
    while time.perf_counter() < end or calls < 20:
        await call()
        calls += 1


async def sequential(call: Call, count: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    started = time.perf_counter()
    end = started + seconds
    while len(latencies) < count and (time.perf_counter() < end or len(latencies) < 50):
        begin = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "calls": len(latencies),
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        "calls_per_s": len(latencies) / elapsed,
    }


async def in_flight(call: Call, concurrency: int, seconds: float, meter: CpuMeter) -> dict[str, float]:
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def loop() -> None:
        while (begin := time.perf_counter()) < stop_at:
            await call()
            latencies.append(time.perf_counter() - begin)

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "calls": len(latencies),
        "calls_per_s": len(latencies) / elapsed,
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": percentile(latencies, 0.99) * 1e6,
        **meter.stop(len(latencies), elapsed),
    }


async def memory_run(call: Call, args: argparse.Namespace) -> dict[str, Any]:
    """Make ``--total-calls`` calls and sample the resident memory of ``--memory-pid`` along the way."""
    samples: list[dict[str, int]] = []
    done = 0
    next_sample = args.memory_every
    started = time.perf_counter()

    async def loop() -> None:
        nonlocal done, next_sample
        while done < args.total_calls:
            done += 1
            await call()

    tasks = [asyncio.create_task(loop()) for _ in range(args.concurrency)]
    while not all(task.done() for task in tasks):
        await asyncio.sleep(0.02)
        if done >= next_sample:
            samples.append({"calls": done, "rss_bytes": resident_memory(args.memory_pid)})
            next_sample += args.memory_every
    await asyncio.gather(*tasks)
    samples.append({"calls": done, "rss_bytes": resident_memory(args.memory_pid)})
    return {"calls": done, "seconds": time.perf_counter() - started, "samples": samples}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    payload = make_payload(args.payload_size)
    async with CASES[args.case](args, payload) as call:
        result = await call()
        if result != payload and result != {"data": payload}:
            raise RuntimeError(f"{args.case} returned something other than its payload: {str(result)[:200]}")
        await warm_up(call, args.warmup)
        if args.memory_pid:
            return {"memory": await memory_run(call, args)}
        lookups_before = LOOKUPS[0]
        report: dict[str, Any] = {"sequential": await sequential(call, args.sequential, args.sequential_seconds)}
        meter = CpuMeter(args.pids, args.broker_pids)
        report["concurrent"] = await in_flight(call, args.concurrency, args.seconds, meter)
        report["discovery_lookups"] = LOOKUPS[0] - lookups_before
        return report


def pid_list(text: str) -> list[int]:
    return [int(p) for p in text.split(",") if p.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=sorted(CASES))
    parser.add_argument("--payload-size", type=int, default=100, help="bytes of the payload's compact JSON")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up calls")
    parser.add_argument("--sequential", type=int, default=2000, help="maximum sequential calls")
    parser.add_argument("--sequential-seconds", type=float, default=2.0, help="maximum seconds of sequential calls")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight in the throughput phase")
    parser.add_argument("--seconds", type=float, default=3.0, help="seconds of the throughput phase")
    parser.add_argument("--pids", type=pid_list, default=[], help="comma-separated server process ids")
    parser.add_argument("--broker-pids", type=pid_list, default=[], help="comma-separated broker process ids")
    parser.add_argument("--memory-pid", type=int, default=0, help="process whose resident memory is sampled")
    parser.add_argument("--total-calls", type=int, default=100_000, help="calls of a memory run")
    parser.add_argument("--memory-every", type=int, default=10_000, help="calls between two memory samples")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--key-prefix", help="pikku: the Redis key prefix of the discovery namespace")
    parser.add_argument("--url", help="raw-http: the URL to post to")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222")
    parser.add_argument("--subject", help="raw-nats, faststream-nats: the request subject")
    parser.add_argument("--pikku-client", action="store_true", help="features-nats: pikku_mq's nats-py client class")
    parser.add_argument("--amqp-url", help="AMQP broker URL with the benchmark's vhost")
    parser.add_argument("--queue", help="raw-amqp, faststream-rabbit, aiopika-rpc: the request queue or method")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
