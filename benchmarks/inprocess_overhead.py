"""Measure pikku_mq's own work per call, without any I/O: the worker's dispatcher, and a whole call in memory.

Reports CPU µs per call. Runs on uvloop in one process, with the benchmark's validated ``echo`` and a 100-byte payload:

- ``Dispatcher.handle`` plus the encoding of its result, as a broker worker (msgpack) and an HTTP
  worker (JSON) run them for each call;
- ``rpc.remote("echo", ...)`` to a PikkuWorker on the in-memory transport, which runs the caller's
  routing and the worker's dispatch in this process.

Run from the repository root: ``python benchmarks/inprocess_overhead.py [--calls 20000]``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rpc_echo import echo, make_payload

from pikku_mq import RPC, FunctionRegistry, MemoryDeploymentService, MemoryRegistry, PikkuWorker
from pikku_mq._dispatch import Dispatcher

HEADERS = {"x-request-id": "a" * 32, "pikku-call-id": "b" * 32, "pikku-hop": "1", "pikku-deadline-ms": "29999"}


async def per_call(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    """Return the mean CPU µs per call of ``calls`` calls, after ``calls // 10`` warm-up calls.

    CPU time of this process, not wall time, so other processes on the machine distort it less.
    """
    for _ in range(calls // 10):
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def main(calls: int) -> None:
    payload = make_payload(100)
    registry = FunctionRegistry()
    registry.add(echo.__pikku__)
    dispatcher = Dispatcher(registry)

    async def broker_worker() -> None:
        (await dispatcher.handle("echo", payload, HEADERS)).encode_python()

    async def http_worker() -> None:
        (await dispatcher.handle("echo", payload, HEADERS)).encode_json()

    print(f"Dispatcher.handle + encode_python: {await per_call(broker_worker, calls):.1f} µs")
    print(f"Dispatcher.handle + encode_json:   {await per_call(http_worker, calls):.1f} µs")

    mesh = MemoryRegistry()
    caller = MemoryDeploymentService(mesh)
    worker = PikkuWorker(endpoint="memory://bench", functions=[echo], deployment_service=MemoryDeploymentService(mesh))
    async with worker:
        rpc = RPC(deployment_service=caller)
        result = await per_call(lambda: rpc.remote("echo", payload), calls)
        print(f"rpc.remote over the memory transport, both sides: {result:.1f} µs")
    await caller.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls per measurement")
    uvloop.run(main(parser.parse_args().calls))
