"""Measure what the caller's routing costs per call with each balancing strategy.

Two figures per strategy, both in one process with no network, so they show the router's own work:

- ``pick``: microseconds per ``Router._pick`` on a warm lookup cache of three instances;
- ``call``: microseconds per ``DeploymentService.invoke`` to three in-memory workers, which adds the
  request headers, the attempt bookkeeping and the worker's dispatch to the pick.

Each figure is the median of ``--rounds`` rounds. Run with ``python benchmarks/routing_strategies.py``;
the machine's other load moves single rounds by tens of percent, so compare medians of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from pikku_mq import (
    DeploymentConfig,
    FunctionRegistry,
    MemoryDeploymentService,
    MemoryRegistry,
    PikkuWorker,
    pikku_sessionless_func,
)
from pikku_mq._balancing import BALANCING_STRATEGIES

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def echo(services: Any, data: int) -> int:
    return data


async def measure_pick(strategy: str, rounds: int, picks: int) -> float:
    """Return the median microseconds per ``_pick`` over ``rounds`` rounds of ``picks`` picks."""
    registry = MemoryRegistry()
    for index in range(3):
        config = DeploymentConfig(f"w{index}", f"http://127.0.0.1:{9000 + index}", functions=["echo"])
        await MemoryDeploymentService(registry).start(config)
    caller = MemoryDeploymentService(registry, balancing=strategy)
    router = caller.router
    await router._pick("echo", set())

    per_pick = []
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(picks):
            await router._pick("echo", set())
        per_pick.append((time.perf_counter() - started) / picks * 1e6)
    await caller.close()
    return statistics.median(per_pick)


async def measure_call(strategy: str, rounds: int, calls: int) -> float:
    """Return the median microseconds per call to in-memory workers over ``rounds`` rounds of ``calls`` calls."""
    registry = MemoryRegistry()
    workers = [
        PikkuWorker(
            endpoint=f"memory://bench-{uuid.uuid4().hex[:8]}",
            registry=REG,
            deployment_id=f"w{index}",
            deployment_service=MemoryDeploymentService(registry),
        )
        for index in range(3)
    ]
    for worker in workers:
        await worker.start()
    caller = MemoryDeploymentService(registry, balancing=strategy)
    for index in range(calls // 10):
        await caller.invoke("echo", index)

    per_call = []
    for _ in range(rounds):
        started = time.perf_counter()
        for index in range(calls):
            await caller.invoke("echo", index)
        per_call.append((time.perf_counter() - started) / calls * 1e6)
    await caller.close()
    for worker in workers:
        await worker.stop()
    return statistics.median(per_call)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per figure; the median is reported")
    parser.add_argument("--picks", type=int, default=100_000, help="picks per round")
    parser.add_argument("--calls", type=int, default=20_000, help="calls per round")
    args = parser.parse_args()

    print("| strategy | pick µs | call µs |")
    print("|---|---:|---:|")
    for strategy in sorted(BALANCING_STRATEGIES):
        pick = await measure_pick(strategy, args.rounds, args.picks)
        call = await measure_call(strategy, args.rounds, args.calls)
        print(f"| {strategy} | {pick:.2f} | {call:.1f} |")


if __name__ == "__main__":
    asyncio.run(main())
