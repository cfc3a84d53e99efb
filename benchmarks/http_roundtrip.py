"""Compare one pikku_mq call over HTTP with a raw aiohttp POST to a bare uvicorn echo app, in one run.

Both servers run as separate processes on 127.0.0.1 and the client runs here, on uvloop. For each
case: 200 warm-up calls, then sequential calls (p50 and p99 latency), then a fixed number of calls
in flight for a fixed time (calls per second). The pikku_mq case goes through the whole caller path
(discovery cache, routing, validation on the worker). Run from the repository root:

    python benchmarks/http_roundtrip.py [--sequential 2000] [--concurrency 64] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import uvloop

from pikku_mq import deployment_service_from_url

HERE = Path(__file__).resolve().parent
PAYLOAD = {"name": "Ada Lovelace", "items": [1, 2, 3], "note": "x" * 40}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def wait_for_port(port: int, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {deadline_s} s")


async def measure(
    call: Callable[[], Awaitable[object]], sequential: int, concurrency: int, seconds: float
) -> dict[str, float]:
    for _ in range(200):
        await call()

    latencies = []
    for _ in range(sequential):
        start = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - start)
    latencies.sort()

    done = 0
    stop_at = time.monotonic() + seconds

    async def loop() -> None:
        nonlocal done
        while time.monotonic() < stop_at:
            await call()
            done += 1

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "p50_us": statistics.median(latencies) * 1e6,
        "p99_us": latencies[int(len(latencies) * 0.99) - 1] * 1e6,
        "calls_per_s": done / elapsed,
    }


def start_servers(workdir: Path) -> tuple[list[subprocess.Popen[bytes]], int, int, str]:
    discovery = f"sqlite:///{workdir / 'registry.db'}"
    raw_port, worker_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    worker = [sys.executable, "-m", "pikku_mq", "worker", "echo_functions", "--id", "bench-echo"]
    worker += ["--endpoint", f"http://127.0.0.1:{worker_port}", "--discovery", discovery, "--log-level", "WARNING"]
    processes = [
        subprocess.Popen([sys.executable, str(HERE / "raw_echo_server.py"), str(raw_port)], env=env),
        subprocess.Popen(worker, env=env, cwd=HERE),
    ]
    return processes, raw_port, worker_port, discovery


async def run(args: argparse.Namespace, raw_port: int, worker_port: int, discovery: str) -> None:
    await wait_for_port(raw_port)
    await wait_for_port(worker_port)
    await asyncio.sleep(0.5)

    connector = aiohttp.TCPConnector(limit=100)
    async with aiohttp.ClientSession(connector=connector) as session, deployment_service_from_url(discovery) as ds:
        raw_url = f"http://127.0.0.1:{raw_port}/remote/rpc/echo"
        body = b'{"data": {"name": "Ada Lovelace", "items": [1, 2, 3], "note": "' + b"x" * 40 + b'"}}'

        async def raw_call() -> object:
            async with session.post(raw_url, data=body, headers={"content-type": "application/json"}) as response:
                return await response.read()

        async def pikku_call() -> object:
            return await ds.invoke("echo", PAYLOAD)

        results = {}
        for name, call in (("raw aiohttp -> uvicorn", raw_call), ("pikku_mq HTTP", pikku_call)):
            results[name] = await measure(call, args.sequential, args.concurrency, args.seconds)

    floor = results["raw aiohttp -> uvicorn"]
    print(f"| case | seq p50 µs | seq p99 µs | calls/s @{args.concurrency} | p50 ÷ raw | raw calls/s ÷ this |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in results.items():
        print(
            f"| {name} | {row['p50_us']:,.0f} | {row['p99_us']:,.0f} | {row['calls_per_s']:,.0f} | "
            f"{row['p50_us'] / floor['p50_us']:.2f} | {floor['calls_per_s'] / row['calls_per_s']:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequential", type=int, default=2000, help="number of sequential calls per case")
    parser.add_argument("--concurrency", type=int, default=64, help="calls in flight in the throughput phase")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of the throughput phase, in seconds")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="pikku-bench-") as workdir:
        processes, raw_port, worker_port, discovery = start_servers(Path(workdir))
        try:
            uvloop.run(run(args, raw_port, worker_port, discovery))
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(timeout=15)


if __name__ == "__main__":
    main()
