"""A worker's limits: calls run side by side up to ``max_concurrency``, and past ``max_in_flight`` it is busy."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from _support_core import Mesh, wait_until

from pikku_mq import (
    BusyError,
    ConfigurationError,
    DeadlineExceededError,
    FunctionRegistry,
    PikkuWorker,
    pikku_sessionless_func,
)
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


ACTIVE: list[int] = [0, 0]
"""Calls of ``count_running`` running now, and the most that ran at once."""


@pikku_sessionless_func(expose=True, registry=REG)
async def count_running(services: Any, data: str) -> str:
    ACTIVE[0] += 1
    ACTIVE[1] = max(ACTIVE[1], ACTIVE[0])
    try:
        await RELEASE[data].wait()
    finally:
        ACTIVE[0] -= 1
    return data


def _headers(deadline_ms: int = 10_000) -> dict[str, str]:
    return {"pikku-deadline-ms": str(deadline_ms)}


async def test_concurrency_limit_holds() -> None:
    dispatcher = Dispatcher(REG, max_concurrency=2, max_in_flight=10)
    ACTIVE[:] = [0, 0]
    RELEASE["limit"] = asyncio.Event()
    calls = [asyncio.create_task(dispatcher.handle("count_running", "limit", _headers())) for _ in range(5)]
    await wait_until(lambda: dispatcher.in_flight == 5 and ACTIVE[0] == 2, timeout=5)
    await asyncio.sleep(0.05)
    assert ACTIVE[0] == 2

    RELEASE["limit"].set()
    outcomes = await asyncio.wait_for(asyncio.gather(*calls), 5)
    assert [outcome.result for outcome in outcomes] == ["limit"] * 5
    assert ACTIVE == [0, 2]
    assert dispatcher.in_flight == 0


async def test_slot_waiter_deadline_frees_nothing() -> None:
    # A call that times out while waiting for a slot takes none, so the next one runs at once.
    dispatcher = Dispatcher(REG, max_concurrency=1, max_in_flight=10)
    ACTIVE[:] = [0, 0]
    RELEASE["first"], RELEASE["next"] = asyncio.Event(), asyncio.Event()
    first = asyncio.create_task(dispatcher.handle("count_running", "first", _headers()))
    await wait_until(lambda: ACTIVE[0] == 1, timeout=5)

    waiting = await dispatcher.handle("count_running", "late", _headers(deadline_ms=50))
    assert waiting.error is not None
    assert isinstance(waiting.error, DeadlineExceededError)

    RELEASE["first"].set()
    assert (await asyncio.wait_for(first, 5)).result == "first"
    after = asyncio.create_task(dispatcher.handle("count_running", "next", _headers()))
    await wait_until(lambda: ACTIVE[0] == 1, timeout=5)
    RELEASE["next"].set()
    assert (await asyncio.wait_for(after, 5)).result == "next"
    assert dispatcher.in_flight == 0


async def test_drain_quiet_counts_from_drain_start() -> None:
    # A worker that rejected nothing still waits the quiet time from the start of its drain, so a
    # caller that picked it just before gets a rejection, not a closed connection.
    dispatcher = Dispatcher(REG)
    began = time.monotonic()
    await dispatcher.wait_quiet(0.5, 5.0, since=began)
    assert time.monotonic() - began >= 0.5

    started = time.monotonic()
    await dispatcher.wait_quiet(0.5, 5.0)  # nothing rejected, no drain start: no wait
    assert time.monotonic() - started < 0.4
