"""More cases for the deadline scope of a function run, against ``asyncio.timeout()`` that it replaces.

These add nested scopes, a cancellation from outside at the same moment as the deadline, and a
function that catches its cancellation and then waits again. The dispatcher cases abort a function
that runs inside its own ``asyncio.timeout()``, or let that timeout end it before the call's deadline.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from test_deadline_scope import Body, _run_case, _sleep, _with_asyncio, _with_deadline

from pikku_mq import (
    CallInterruptedError,
    DeadlineExceededError,
    FunctionRegistry,
    InternalServerError,
    pikku_sessionless_func,
)
from pikku_mq._dispatch import Dispatcher
from pikku_mq._types import HEADER_DEADLINE


async def _inner_timeout(seconds: float, sleep: float = 1.0) -> str:
    async with asyncio.timeout(seconds):
        await asyncio.sleep(sleep)
    return "inner finished"


async def _catch_then_wait_again() -> str:
    try:
        await asyncio.sleep(1)
    except asyncio.CancelledError:
        await asyncio.sleep(0.01)  # clean-up that waits after the cancellation
        return "cleaned up"
    return "slept"


async def _cancel_self_at(delay: float) -> str:
    # The outside cancellation is due at the same loop time as the deadline, give or take the clock.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().call_later(delay, task.cancel)
    await asyncio.sleep(1)
    return "slept"


async def _finish_at(delay: float) -> str:
    # A timer due with the deadline wakes the function in the same loop iteration as the deadline's.
    future = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(delay, future.set_result, "finished")
    return str(await future)


EDGE_CASES: dict[str, tuple[float | None, Body, dict[str, Any]]] = {
    "inner timeout shorter": (0.5, lambda: _inner_timeout(0.01), {}),
    "inner timeout longer": (0.02, lambda: _inner_timeout(1.0), {}),
    "inner timeout equal": (0.02, lambda: _inner_timeout(0.02), {}),
    "inner timeout not reached": (0.5, lambda: _inner_timeout(0.5, 0.01), {}),
    "catches cancellation, waits, returns": (0.02, _catch_then_wait_again, {}),
    "outside cancel due with deadline": (0.02, lambda: _cancel_self_at(0.02), {}),
    "finishes due with deadline": (0.02, lambda: _finish_at(0.02), {}),
    "zero delay, body returns at once": (0.0, lambda: _sleep(0), {}),
    "negative delay, no await": (-5.0, lambda: asyncio.sleep(0, "at once"), {}),
    "outside cancel before deadline, body swallows": (0.05, _catch_then_wait_again, {"cancel_after": 0.01}),
}


@pytest.mark.parametrize("case", sorted(EDGE_CASES))
async def test_deadline_edge_matches_asyncio_timeout(case: str) -> None:
    delay, body, options = EDGE_CASES[case]

    for _ in range(3):  # the cases due at one moment depend on timer order: repeat them
        expected = await _run_case(_with_asyncio, delay, body, **options)
        actual = await _run_case(_with_deadline, delay, body, **options)

        assert actual == expected


REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def own_timeout(services: Any, seconds: float) -> str:
    async with asyncio.timeout(seconds):
        await asyncio.sleep(5)
    return "unreachable"


@pikku_sessionless_func(expose=True, registry=REG)
async def stubborn(services: Any, seconds: float) -> str:
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        return "ignored the cancellation"
    return "slept"


async def test_function_own_timeout_is_internal_error() -> None:
    dispatcher = Dispatcher(REG)

    outcome = await dispatcher.handle("own_timeout", 0.01, {HEADER_DEADLINE: "5000"})

    # The function's own TimeoutError is its failure, not the call's deadline.
    assert isinstance(outcome.error, InternalServerError)
    assert "TimeoutError" in outcome.error.message
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_call_deadline_inside_function_timeout() -> None:
    dispatcher = Dispatcher(REG)

    outcome = await dispatcher.handle("own_timeout", 5.0, {HEADER_DEADLINE: "30"})

    assert isinstance(outcome.error, DeadlineExceededError)
    assert dispatcher.in_flight == 0


async def test_abort_inside_function_timeout() -> None:
    dispatcher = Dispatcher(REG)
    call = asyncio.create_task(dispatcher.handle("own_timeout", 5.0, {HEADER_DEADLINE: "5000"}))
    await asyncio.sleep(0.02)

    dispatcher.abort()
    outcome = await call

    assert isinstance(outcome.error, CallInterruptedError)
    assert call.cancelling() == 0
    assert dispatcher.in_flight == 0


async def test_abort_and_deadline_at_once() -> None:
    dispatcher = Dispatcher(REG)
    call = asyncio.create_task(dispatcher.handle("own_timeout", 5.0, {HEADER_DEADLINE: "30"}))
    await asyncio.sleep(0.03)  # the deadline's timer is due about now

    dispatcher.abort()
    outcome = await call

    assert isinstance(outcome.error, CallInterruptedError | DeadlineExceededError)
    assert call.cancelling() == 0
    assert dispatcher.in_flight == 0


async def test_function_that_ignores_the_deadline_returns_its_value() -> None:
    # asyncio.timeout() lets a body that swallowed the cancellation return; so does the dispatcher.
    dispatcher = Dispatcher(REG)

    outcome = await dispatcher.handle("stubborn", 5.0, {HEADER_DEADLINE: "20"})

    assert outcome.encode_python() == (200, "ignored the cancellation")
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_many_deadlines_leave_no_cancellation_count() -> None:
    dispatcher = Dispatcher(REG)

    async def one(ms: str) -> Any:
        return await dispatcher.handle("own_timeout", 5.0, {HEADER_DEADLINE: ms})

    tasks = [asyncio.create_task(one(str(1 + i % 5))) for i in range(50)]
    outcomes = await asyncio.gather(*tasks)

    assert all(isinstance(o.error, DeadlineExceededError) for o in outcomes)
    assert all(t.cancelling() == 0 for t in tasks)
    assert dispatcher.in_flight == 0
