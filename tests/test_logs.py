"""Log records of calls: the ``extra`` fields they carry, their levels, and the limit on repeated failures."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from _support_core import Mesh, closed_port

from pikku_mq import (
    DeploymentConfig,
    FunctionRegistry,
    InternalServerError,
    PikkuWorker,
    RemoteSecurity,
    UnauthorizedError,
    Wire,
    pikku_sessionless_func,
)
from pikku_mq._logs import RepeatedFailureLog

SECRET = "log-test-secret-0123456789-abcdefghijkl"
CALL_FIELDS = ("call_id", "trace_id", "function", "deployment_id")

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def chatty(services: Any, data: str, wire: Wire) -> str:
    wire.logger.info("chatty got %s", data)
    return data


@pikku_sessionless_func(expose=True, registry=REG)
async def broken(services: Any, data: Any) -> None:
    raise RuntimeError("broken on purpose")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_repeated_failures_first_then_summary(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RepeatedFailureLog(logging.getLogger("pikku_mq.test"), interval=60.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="pikku_mq.test")

    logged = []
    for _ in range(10):
        logged.append(log.failed(logging.WARNING, "store %s failed", "redis"))
        clock.now += 5.0
    # 10 failures over 50 s: only the first is logged.
    assert logged == [True] + [False] * 9
    assert [r.getMessage() for r in caplog.records] == ["store redis failed"]

    clock.now = 1000.0 + 61.0
    assert log.failed(logging.WARNING, "store %s failed", "redis")
    assert caplog.records[-1].getMessage() == "store redis failed (10 more times in the last 61 s, failing for 61 s)"
    assert caplog.records[-1].levelno == logging.WARNING

    assert log.recovered() == 11
    assert not log.failing
    # A new run logs its first failure at once.
    assert log.failed(logging.WARNING, "store %s failed", "redis")
    assert caplog.records[-1].getMessage() == "store redis failed"


def test_repeated_failures_summary_interval_from_last_line(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    log = RepeatedFailureLog(logging.getLogger("pikku_mq.test"), interval=60.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="pikku_mq.test")

    for _ in range(300):  # a failure a second for 5 minutes
        log.failed(logging.WARNING, "down")
        clock.now += 1.0

    assert len(caplog.records) == 5  # the first, then one summary a minute
    assert caplog.records[1].getMessage() == "down (60 more times in the last 60 s, failing for 60 s)"


async def test_call_records_carry_extra_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pikku_mq")
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint="memory://logged", deployment_id="logged-1", deployment_service=mesh.service(), registry=REG
        )
        caller = mesh.service()
        async with worker:
            assert await caller.invoke("chatty", "hello", trace_id="t" * 32, timeout=5) == "hello"
            with pytest.raises(InternalServerError):
                await caller.invoke("broken", None, trace_id="u" * 32, timeout=5)

    chatty_record = _one(caplog.records, "chatty got hello")
    assert _fields(chatty_record) == {
        "call_id": chatty_record.call_id,  # type: ignore[attr-defined]
        "trace_id": "t" * 32,
        "function": "chatty",
        "deployment_id": "logged-1",
    }
    assert len(chatty_record.call_id) == 32  # type: ignore[attr-defined]

    raised = [r for r in caplog.records if r.getMessage().startswith("function broken raised RuntimeError")]
    assert [r.levelno for r in raised] == [logging.DEBUG, logging.ERROR]
    for record in raised:
        assert _fields(record)["trace_id"] == "u" * 32
        assert _fields(record)["function"] == "broken"
        assert _fields(record)["deployment_id"] == "logged-1"
        assert record.exc_info is not None


async def test_attempt_records_carry_extra_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pikku_mq._routing")
    async with Mesh() as mesh:
        dead = mesh.service()
        await dead.start(DeploymentConfig("dead-1", f"http://127.0.0.1:{closed_port()}", functions=["chatty"]))
        with pytest.raises(Exception, match="tried dead-1"):
            await mesh.service().invoke("chatty", "x", trace_id="v" * 32, timeout=5)

    record = next(r for r in caplog.records if "is unreachable at" in r.getMessage())
    fields = _fields(record)
    assert fields["trace_id"] == "v" * 32
    assert fields["function"] == "chatty"
    assert fields["deployment_id"] == "dead-1"
    assert len(fields["call_id"]) == 32


async def test_nothing_above_debug_per_call(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="pikku_mq")
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint="memory://quiet",
            deployment_id="quiet-1",
            deployment_service=mesh.service(),
            registry=REG,
            security=RemoteSecurity(SECRET),
        )
        signed = mesh.service(security=RemoteSecurity(SECRET))
        unsigned = mesh.service(security=False)
        async with worker:
            caplog.clear()
            for _ in range(20):
                assert await signed.invoke("chatty", "x", timeout=5) == "x"
                with pytest.raises(InternalServerError):
                    await signed.invoke("broken", None, timeout=5)
                with pytest.raises(UnauthorizedError):
                    await unsigned.invoke("chatty", "x", timeout=5)
            records = list(caplog.records)  # before the worker logs its stop

    # The function's own INFO lines aside.
    loud = [r for r in records if r.levelno > logging.DEBUG and r.name != "pikku_mq.function"]
    # The first failure of each kind, and nothing for the 19 repeats nor for the 20 calls that succeeded.
    assert sorted(r.getMessage().split(":")[0][:30] for r in loud) == [
        "function broken raised Runtime",
        "rejected a call to 'chatty'",
    ]
    assert all(SECRET not in r.getMessage() for r in records)


def _fields(record: logging.LogRecord) -> dict[str, str]:
    return {name: getattr(record, name) for name in CALL_FIELDS}


def _one(records: list[logging.LogRecord], message: str) -> logging.LogRecord:
    found = [r for r in records if r.getMessage() == message]
    assert len(found) == 1, [r.getMessage() for r in records]
    return found[0]
