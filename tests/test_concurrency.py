"""A worker's limits: calls run side by side up to ``max_concurrency``, and past ``max_in_flight`` it is busy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _support_core import Mesh, wait_until

from pikku_mq import BusyError, ConfigurationError, FunctionRegistry, PikkuWorker, pikku_sessionless_func
from pikku_mq._dispatch import Dispatcher

REG = FunctionRegistry()
RELEASE: dict[str, asyncio.Event] = {}


@pikku_sessionless_func(expose=True, registry=REG)
async def nap(services: Any, data: float) -> str:
    await asyncio.sleep(data)
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def hold(services: Any, data: str) -> str:
    await RELEASE[data].wait()
    return str(services)


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


async def test_no_head_of_line_blocking(mesh: Mesh) -> None:
    caller = mesh.service()
    worker = PikkuWorker(registry=REG, deployment_id="c-1", deployment_service=mesh.service(), max_concurrency=10)
    async with worker:
        await caller.invoke("nap", 0.0, timeout=5)
        started = time.monotonic()
        results = await asyncio.gather(*(caller.invoke("nap", 0.1, timeout=10) for _ in range(50)))
        elapsed = time.monotonic() - started

    assert results == ["None"] * 50
    # Five waves of ten calls of 100 ms each: serial handling would take 5 s.
    assert 0.45 < elapsed < 1.5


async def test_busy_worker_declines_at_once(mesh: Mesh) -> None:
    caller = mesh.service()
    worker = PikkuWorker(
        registry=REG, deployment_id="c-1", deployment_service=mesh.service(), max_concurrency=1, max_in_flight=2
    )
    RELEASE["busy"] = asyncio.Event()
    async with worker:
        holding = [asyncio.create_task(caller.invoke("hold", "busy", timeout=10)) for _ in range(2)]
        await wait_until(lambda: worker.dispatcher.in_flight == 2, timeout=5)

        started = time.monotonic()
        with pytest.raises(BusyError) as caught:
            await caller.invoke("nap", 0.0, timeout=10)
        assert time.monotonic() - started < 1.0
        assert caught.value.payload == {"deployment_id": "c-1", "max_in_flight": 2}
        assert caught.value.retryable

        RELEASE["busy"].set()
        assert await asyncio.gather(*holding) == ["None", "None"]
        # Busy is not held against the instance: it takes the next call.
        assert await caller.invoke("nap", 0.0, timeout=5) == "None"


async def test_busy_call_moves_to_another_instance(mesh: Mesh) -> None:
    caller = mesh.service()
    first = PikkuWorker(
        registry=REG,
        deployment_id="c-1",
        services="c-1",
        deployment_service=mesh.service(),
        max_concurrency=1,
        max_in_flight=1,
    )
    second = PikkuWorker(registry=REG, deployment_id="c-2", services="c-2", deployment_service=mesh.service())
    RELEASE["move"] = asyncio.Event()
    async with first, second:
        # Fill c-1 by calling it until one call is held there.
        pending: list[asyncio.Task[Any]] = []
        while first.dispatcher.in_flight == 0:
            pending.append(asyncio.create_task(caller.invoke("hold", "move", timeout=10)))
            await asyncio.sleep(0.05)

        answers = [await caller.invoke("nap", 0.0, timeout=5) for _ in range(4)]
        assert answers == ["c-2"] * 4
        RELEASE["move"].set()
        assert set(await asyncio.gather(*pending)) <= {"c-1", "c-2"}


@pytest.mark.parametrize(("concurrency", "in_flight"), [(0, 10), (5, 4), (-1, 1)])
def test_bad_limits_rejected(concurrency: int, in_flight: int) -> None:
    with pytest.raises(ConfigurationError):
        Dispatcher(REG, max_concurrency=concurrency, max_in_flight=in_flight)
