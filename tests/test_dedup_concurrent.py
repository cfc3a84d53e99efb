"""Concurrent attempts of one idempotent call on one dispatcher, where the first does not finish.

The claim of a running call makes its future only when an attempt waits. These cases check that two
waiting attempts then run the function once more between them, whether the first attempt passed its
deadline, was cancelled by its caller, or a waiter gave up.
"""

from __future__ import annotations

import asyncio
import uuid

from _support_core import wait_until
from test_dedup import REG, Ledger

from pikku_mq import BadRequestError, DeadlineExceededError
from pikku_mq._dispatch import Dispatcher, Outcome
from pikku_mq._types import HEADER_CALL_ID, HEADER_DEADLINE

DATA = {"account": "c", "hold": 0.3}


def _headers(call_id: str, ms: int) -> dict[str, str]:
    return {HEADER_CALL_ID: call_id, HEADER_DEADLINE: str(ms)}


def _start(dispatcher: Dispatcher, call_id: str, ms: int) -> asyncio.Task[Outcome]:
    """Start an attempt of the ``charge`` call with ``DATA`` under ``call_id``, with a deadline of ``ms``."""
    return asyncio.create_task(dispatcher.handle("charge", DATA, _headers(call_id, ms)))


async def test_two_waiters_after_first_deadline_run_once() -> None:
    ledger = Ledger()
    dispatcher = Dispatcher(REG, services=ledger)
    call_id = uuid.uuid4().hex

    first = _start(dispatcher, call_id, 100)
    await wait_until(lambda: ledger.runs["c"] == 1, timeout=5)
    waiters = [_start(dispatcher, call_id, 5000) for _ in range(2)]
    first_outcome = await first
    outcomes = [await waiter for waiter in waiters]

    assert isinstance(first_outcome.error, DeadlineExceededError)
    assert [outcome.encode_python() for outcome in outcomes] == [(200, {"account": "c", "runs": 2})] * 2
    assert ledger.runs["c"] == 2
    assert dispatcher.in_flight == 0


async def test_two_waiters_after_first_cancelled_run_once() -> None:
    ledger = Ledger()
    dispatcher = Dispatcher(REG, services=ledger)
    call_id = uuid.uuid4().hex

    first = _start(dispatcher, call_id, 5000)
    await wait_until(lambda: ledger.runs["c"] == 1, timeout=5)
    waiters = [_start(dispatcher, call_id, 5000) for _ in range(2)]
    await asyncio.sleep(0.02)
    first.cancel()
    outcomes = [await waiter for waiter in waiters]

    assert first.cancelled()
    assert [outcome.encode_python() for outcome in outcomes] == [(200, {"account": "c", "runs": 2})] * 2
    assert ledger.runs["c"] == 2
    assert all(waiter.cancelling() == 0 for waiter in waiters)
    assert dispatcher.in_flight == 0


async def test_waiter_gives_up_others_get_outcome() -> None:
    ledger = Ledger()
    dispatcher = Dispatcher(REG, services=ledger)
    call_id = uuid.uuid4().hex

    first = _start(dispatcher, call_id, 5000)
    await wait_until(lambda: ledger.runs["c"] == 1, timeout=5)
    quitter = _start(dispatcher, call_id, 5000)
    short = _start(dispatcher, call_id, 50)
    patient = _start(dispatcher, call_id, 5000)
    await asyncio.sleep(0.02)
    quitter.cancel()
    outcomes = [await first, await short, await patient]

    assert quitter.cancelled()
    assert outcomes[0].encode_python() == (200, {"account": "c", "runs": 1})
    assert isinstance(outcomes[1].error, DeadlineExceededError)
    assert "still running" in outcomes[1].error.message
    assert outcomes[2].encode_python() == (200, {"account": "c", "runs": 1})
    assert ledger.runs["c"] == 1
    assert dispatcher.in_flight == 0


async def test_replay_and_mismatch_after_finish() -> None:
    ledger = Ledger()
    dispatcher = Dispatcher(REG, services=ledger)
    call_id = uuid.uuid4().hex
    data = {"account": "r"}

    first = await dispatcher.handle("charge", data, _headers(call_id, 5000))
    replay = await dispatcher.handle("charge", data, _headers(call_id, 5000))
    other = await dispatcher.handle("charge", {"account": "s"}, _headers(call_id, 5000))

    assert first.encode_python() == replay.encode_python() == (200, {"account": "r", "runs": 1})
    assert isinstance(other.error, BadRequestError)
    assert ledger.runs["r"] == 1
    assert ledger.runs["s"] == 0


async def test_mismatch_while_running_leaves_claim() -> None:
    ledger = Ledger()
    dispatcher = Dispatcher(REG, services=ledger)
    call_id = uuid.uuid4().hex

    first = _start(dispatcher, call_id, 5000)
    await wait_until(lambda: ledger.runs["c"] == 1, timeout=5)
    other = await dispatcher.handle("charge", {**DATA, "account": "d"}, _headers(call_id, 5000))
    retry = await dispatcher.handle("charge", DATA, _headers(call_id, 5000))

    assert isinstance(other.error, BadRequestError)
    assert (await first).encode_python() == (200, {"account": "c", "runs": 1})
    assert retry.encode_python() == (200, {"account": "c", "runs": 1})
    assert ledger.runs["c"] == 1
    assert ledger.runs["d"] == 0
