"""Split the sequential latency of a pikku_mq call over NATS between the worker, the transport and the router.

Starts a raw nats-py echo server and a pikku_mq worker (``rpc_servers.py``), then times one call at a
time from this process in four ways, interleaved over ``--rounds`` rounds:

- ``raw → raw``: nats-py ``request()`` to the raw echo server, as the benchmark's floor;
- ``raw → worker``: the same ``request()`` with pikku_mq's body and four call headers, to the worker;
- ``transport → worker``: ``NatsTransport.call``, pikku_mq's client transport without the router;
- ``rpc.remote → worker``: the whole call, with routing from a Redis registry.

Each row's difference to the one before is what that layer adds: the worker, the client transport,
and the router (routing cache, balancing, ids, deadline). The report gives the median p50 over the
rounds with the lowest and highest, and the CPU µs per call of the caller and of the server. Needs
NATS and Redis on their standard ports on 127.0.0.1; uses subjects and a Redis key prefix of its own
and removes the keys.

Run from the repository root: ``python benchmarks/nats_latency_split.py [--calls 1500] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgpack
import uvloop

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from rpc_echo import make_payload  # noqa: E402

from pikku_mq import RPC  # noqa: E402
from pikku_mq._types import HEADER_CALL_ID, HEADER_DEADLINE, HEADER_HOP, HEADER_REQUEST_ID, CallRequest  # noqa: E402
from pikku_mq.backends.redis import RedisDeploymentService  # noqa: E402
from pikku_mq.transports.nats import NatsTransport, _encode_request, parse_nats_endpoint  # noqa: E402

NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"
Call = Callable[[], Awaitable[Any]]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def start(argv: list[str], env: dict[str, str], benchmarks: Path = HERE) -> subprocess.Popen[bytes]:
    """Start a server of the rpc_servers.py in ``benchmarks`` and wait until it prints READY (at most 60 s)."""
    process = subprocess.Popen(
        [sys.executable, "rpc_servers.py", *argv], cwd=benchmarks, stdout=subprocess.PIPE, env={**os.environ, **env}
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if b"READY" in line:
            return process
        if not line and process.poll() is not None:
            break
    process.kill()
    raise RuntimeError(f"server {argv[0]} did not start")


def cpu_seconds(pid: int) -> float:
    """Return the user and system CPU seconds that process ``pid`` has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def p50(call: Call, calls: int, server: int) -> tuple[float, float, float]:
    """Time ``calls`` sequential calls after a warm-up.

    Return their p50 latency in µs, and the CPU µs per call of this process and of the server ``server``.
    """
    for _ in range(200):
        await call()
    times = []
    cpu, server_cpu = time.process_time(), cpu_seconds(server)
    for _ in range(calls):
        started = time.perf_counter()
        await call()
        times.append(time.perf_counter() - started)
    cpu_per_call = (time.process_time() - cpu) / calls * 1e6
    server_per_call = (cpu_seconds(server) - server_cpu) / calls * 1e6
    return statistics.median(times) * 1e6, cpu_per_call, server_per_call


async def measure(
    tag: str, endpoint: str, calls: int, rounds: int, pids: tuple[int, int]
) -> dict[str, list[tuple[float, float, float]]]:
    import nats

    payload = make_payload(100)
    nc = await nats.connect(NATS_URL)
    transport = NatsTransport(NATS_URL)
    discovery = RedisDeploymentService(REDIS_URL, key_prefix=f"{tag}:")
    rpc = RPC(deployment_service=discovery)
    subject = parse_nats_endpoint(endpoint).subject("echo")
    raw_body = msgpack.packb({"data": payload})

    def headers() -> dict[str, str]:
        return {
            HEADER_REQUEST_ID: os.urandom(16).hex(),
            HEADER_CALL_ID: os.urandom(16).hex(),
            HEADER_HOP: "1",
            HEADER_DEADLINE: "30000",
        }

    async def raw_to_raw() -> Any:
        return msgpack.unpackb((await nc.request(f"{tag}.raw", raw_body, timeout=30)).data)

    async def raw_to_worker() -> Any:
        body = _encode_request(CallRequest("echo", payload, {}))
        return msgpack.unpackb((await nc.request(subject, body, timeout=30, headers=headers())).data)

    async def transport_to_worker() -> Any:
        return (await transport.call(endpoint, CallRequest("echo", payload, headers()), 30)).body

    async def remote_to_worker() -> Any:
        return await rpc.remote("echo", payload)

    cases: dict[str, Call] = {
        "raw → raw": raw_to_raw,
        "raw → worker": raw_to_worker,
        "transport → worker": transport_to_worker,
        "rpc.remote → worker": remote_to_worker,
    }
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in cases}
    try:
        for call in cases.values():  # one untimed call each, so that no case times its set-up
            await call()
        for _ in range(rounds):
            for name, call in cases.items():
                server = pids[0] if name == "raw → raw" else pids[1]
                results[name].append(await p50(call, calls, server))
    finally:
        await discovery.close()
        await transport.close()
        await nc.close()
    return results


def report(results: dict[str, list[tuple[float, float, float]]]) -> None:
    print("| case | seq p50 µs | adds to the row above, µs | caller CPU µs/call | server CPU µs/call |")
    print("|---|---:|---:|---:|---:|")
    previous = None
    for name, rows in results.items():
        latencies = [row[0] for row in rows]
        median = statistics.median(latencies)
        added = "" if previous is None else f"{median - previous:+.0f}"
        cpu = statistics.median(row[1] for row in rows)
        server = statistics.median(row[2] for row in rows)
        spread = f"{min(latencies):.0f}-{max(latencies):.0f}"
        print(f"| {name} | {median:.0f} ({spread}) | {added} | {cpu:.0f} | {server:.0f} |")
        previous = median


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1500, help="timed sequential calls per case and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    args = parser.parse_args()

    tag = f"pikku_split_{uuid.uuid4().hex[:10]}"
    endpoint = f"{NATS_URL}/{tag}.pikku"
    env = {"PIKKU_NATS_PRESENCE_SUBJECT": f"{tag}.presence", "PIKKU_NATS_URL": NATS_URL}
    os.environ.update(env)
    servers = [start(["raw-nats", "--subject", f"{tag}.raw"], env)]
    try:
        servers.append(start(["pikku", "--endpoint", endpoint, "--id", f"{tag}-w", "--key-prefix", f"{tag}:"], env))
        results = uvloop.run(measure(tag, endpoint, args.calls, args.rounds, (servers[0].pid, servers[1].pid)))
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(30)
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{tag}:*", count=500))
        if keys:
            client.delete(*keys)
        client.close()
    report(results)


if __name__ == "__main__":
    main()
