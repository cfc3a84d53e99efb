"""The deadline scope of a function run on a worker, against ``asyncio.timeout()`` that it replaces.

``_Deadline`` must end each case as ``asyncio.timeout()`` does: the same exception, and the same
cancellation count left on the task. The dispatcher's own errors follow from it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from pikku_mq import CallInterruptedError, DeadlineExceededError, FunctionRegistry, pikku_sessionless_func
from pikku_mq._dispatch import Dispatcher, _Deadline
from pikku_mq._types import HEADER_DEADLINE

Body = Callable[[], Awaitable[Any]]


async def _with_asyncio(delay: float | None, body: Body) -> Any:
    async with asyncio.timeout(delay):
        return await body()


async def _with_deadline(delay: float | None, body: Body) -> Any:
    deadline = _Deadline(asyncio.current_task(), delay)
    try:
        result = await body()
    except BaseException as exc:
        deadline.leave(exc)
        raise
    deadline.leave(None)
    return result


async def _sleep(seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "done"


async def _swallow_cancel() -> str:
    try:
        await asyncio.sleep(1)
    except asyncio.CancelledError:
        return "swallowed"
    return "slept"


async def _cancel_to_value_error() -> str:
    try:
        await asyncio.sleep(1)
    except asyncio.CancelledError:
        raise ValueError("replaced") from None
    return "slept"


async def _raise_timeout() -> str:
    raise TimeoutError("the function's own")


async def _run_case(
    scope: Callable[[float | None, Body], Awaitable[Any]],
    delay: float | None,
    body: Body,
    *,
    cancel_after: float | None = None,
    cancel_before: bool = False,
) -> tuple[str, int]:
    """Run ``body`` under ``scope`` in a task; return how it ended and the cancellation count left on it."""
    outcome: list[tuple[str, int]] = []

    async def runner() -> None:
        task = asyncio.current_task()
        assert task is not None
        if cancel_before:
            task.cancel()
            # The count stays 1, as for a task that caught an earlier cancellation.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
        try:
            result = await scope(delay, body)
        except BaseException as exc:
            outcome.append((type(exc).__name__, task.cancelling()))
        else:
            outcome.append((f"returned {result}", task.cancelling()))

    task = asyncio.create_task(runner())
    if cancel_after is not None:
        await asyncio.sleep(cancel_after)
        task.cancel()
    await task
    return outcome[0]


CASES: dict[str, tuple[float | None, Body, dict[str, Any]]] = {
    "finishes in time": (1.0, lambda: _sleep(0.01), {}),
    "no deadline": (None, lambda: _sleep(0.01), {}),
    "deadline passes": (0.02, lambda: _sleep(1), {}),
    "deadline already passed": (0.0, lambda: _sleep(1), {}),
    "negative delay": (-1.0, lambda: _sleep(1), {}),
    "deadline passes, body swallows it": (0.02, _swallow_cancel, {}),
    "deadline passes, body raises another error": (0.02, _cancel_to_value_error, {}),
    "cancelled from outside": (1.0, lambda: _sleep(1), {"cancel_after": 0.02}),
    "cancelled from outside and deadline passes": (0.02, lambda: _sleep(1), {"cancel_after": 0.02}),
    "earlier cancellation caught, then deadline passes": (0.02, lambda: _sleep(1), {"cancel_before": True}),
    "body raises TimeoutError": (1.0, _raise_timeout, {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_deadline_matches_asyncio_timeout(case: str) -> None:
    delay, body, options = CASES[case]

    expected = await _run_case(_with_asyncio, delay, body, **options)
    actual = await _run_case(_with_deadline, delay, body, **options)

    assert actual == expected


async def test_deadline_outside_task_raises() -> None:
    with pytest.raises(RuntimeError, match="inside a task"):
        _Deadline(None, 1.0)


REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def nap(services: Any, seconds: float) -> str:
    await asyncio.sleep(seconds)
    return "rested"


async def test_dispatcher_deadline_passes() -> None:
    dispatcher = Dispatcher(REG)

    outcome = await dispatcher.handle("nap", 1.0, {HEADER_DEADLINE: "50"})

    assert isinstance(outcome.error, DeadlineExceededError)
    assert "did not finish before the call's deadline" in outcome.error.message
    assert dispatcher.in_flight == 0


async def test_dispatcher_finishes_in_time() -> None:
    dispatcher = Dispatcher(REG)

    outcome = await dispatcher.handle("nap", 0.01, {HEADER_DEADLINE: "5000"})

    assert outcome.encode_python() == (200, "rested")
    task = asyncio.current_task()
    assert task is not None
    assert task.cancelling() == 0


async def test_dispatcher_abort_interrupts() -> None:
    dispatcher = Dispatcher(REG)
    call = asyncio.create_task(dispatcher.handle("nap", 1.0, {HEADER_DEADLINE: "5000"}))
    await asyncio.sleep(0.02)

    dispatcher.abort()
    outcome = await call

    assert isinstance(outcome.error, CallInterruptedError)
    assert not call.cancelled()


async def test_dispatcher_cancel_propagates() -> None:
    dispatcher = Dispatcher(REG)
    call = asyncio.create_task(dispatcher.handle("nap", 1.0, {HEADER_DEADLINE: "5000"}))
    await asyncio.sleep(0.02)

    call.cancel()

    with pytest.raises(asyncio.CancelledError):
        await call
    assert dispatcher.in_flight == 0


async def test_dispatcher_task_given_is_tracked() -> None:
    """A call whose transport passes its task is counted in, and abort() interrupts it, as without."""
    dispatcher = Dispatcher(REG)

    async def serve() -> Any:
        return await dispatcher.handle("nap", 1.0, {HEADER_DEADLINE: "5000"}, task=asyncio.current_task())

    call = asyncio.create_task(serve())
    await asyncio.sleep(0.02)
    assert dispatcher._running == {call}

    dispatcher.abort()
    outcome = await call

    assert isinstance(outcome.error, CallInterruptedError)
    assert dispatcher.in_flight == 0
    assert not dispatcher._running
