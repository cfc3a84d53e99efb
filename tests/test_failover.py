"""Failover, retries and outlier ejection on the caller side, against real workers and real broken servers.

The registry is Redis, with a key prefix of the test's own. Instances that fail on purpose are the
TCP servers of ``_support_faults``, registered beside real workers. A test that needs the broken
instance to take the first attempt registers it on the caller's host and calls with ``prefer_local``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _support_core import closed_port
from _support_faults import FaultyInstance
from _support_redis import REDIS_URL, drop_redis_prefixes, redis_prefix
from contract.test_transports import ENDPOINTS

from pikku_mq import (
    DeadlineExceededError,
    DeploymentConfig,
    DeploymentService,
    EjectionPolicy,
    ForbiddenError,
    FunctionRegistry,
    InternalServerError,
    PikkuWorker,
    ProtocolError,
    RedisDeploymentService,
    RetryPolicy,
    TransportError,
    Wire,
    pikku_sessionless_func,
)

REG = FunctionRegistry()

SEEN: list[tuple[str, str, float]] = []
"""Every run of a function below: the instance that ran it, the call id, and the budget it got in seconds."""

STALLED: set[str] = set()
"""Call ids whose first attempt ``stall_once`` has held."""

FAR_AWAY = "far-away-host"
"""The host name of the instances that a ``prefer_local`` caller tries last."""


def _record(services: Any, wire: Wire) -> None:
    SEEN.append((str(services), wire.call_id, wire.remaining or 0.0))


@pikku_sessionless_func(expose=True, idempotent=True, registry=REG)
async def stall_once(services: Any, data: float, wire: Wire) -> str:
    """Sleep ``data`` seconds on the first attempt of a call, on whichever instance gets it; return at once later."""
    _record(services, wire)
    if wire.call_id not in STALLED:
        STALLED.add(wire.call_id)
        await asyncio.sleep(data)
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def tally(services: Any, data: Any, wire: Wire) -> str:
    _record(services, wire)
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def fail_on_purpose(services: Any, data: str) -> None:
    if data == "forbidden":
        raise ForbiddenError("not yours")
    raise ValueError("broken on purpose")


@pytest.fixture(autouse=True)
def _reset_runs() -> Iterator[None]:
    SEEN.clear()
    STALLED.clear()
    yield
    SEEN.clear()
    STALLED.clear()


@pytest.fixture
async def make_service(tmp_path: Path) -> AsyncIterator[Callable[..., DeploymentService]]:
    """Build deployment services on the test's own Redis key prefix; all are closed at the end."""
    services: list[DeploymentService] = []

    def make(**options: Any) -> DeploymentService:
        service = RedisDeploymentService(REDIS_URL, key_prefix=redis_prefix(tmp_path), **options)
        services.append(service)
        return service

    yield make
    for service in services:
        await service.close()
    drop_redis_prefixes()


def _worker(make_service: Callable[..., DeploymentService], name: str, transport: str = "http") -> PikkuWorker:
    return PikkuWorker(
        registry=REG,
        endpoint=ENDPOINTS[transport](),
        deployment_id=name,
        services=name,
        deployment_service=make_service(hostname=FAR_AWAY),
    )


async def _register_local(make_service: Callable[..., DeploymentService], name: str, endpoint: str) -> None:
    """Register ``endpoint`` as an instance on the caller's host, hosting every function above."""
    service = make_service()
    functions = ["stall_once", "tally", "fail_on_purpose"]
    await service.start(DeploymentConfig(name, endpoint, functions=functions))


def _lines(caplog: pytest.LogCaptureFixture, text: str, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level and text in r.getMessage()]


# -- retries after an uncertain failure -------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["http", "nats", "amqp"])
async def test_timeout_retried_with_same_call_id(
    request: pytest.FixtureRequest, make_service: Callable[..., DeploymentService], transport: str
) -> None:
    if transport == "amqp":
        request.getfixturevalue("amqp_vhost")
    caller = make_service(retry=RetryPolicy(attempt_timeout=0.5))

    async with _worker(make_service, "a", transport), _worker(make_service, "b", transport):
        started = time.monotonic()
        served_by = await caller.invoke("stall_once", 5.0, timeout=10, idempotent=True)
        elapsed = time.monotonic() - started

    [(first_instance, first_id, first_budget), (second_instance, second_id, second_budget)] = SEEN
    assert first_id == second_id
    assert {first_instance, second_instance} == {"a", "b"}
    assert served_by == second_instance
    # Each attempt carries its own budget, so the first worker gave up at the attempt timeout too.
    assert first_budget <= 0.5
    assert second_budget <= 0.5
    assert 0.5 <= elapsed < 4.0


async def test_timeout_retried_on_only_instance(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service(retry=RetryPolicy(attempt_timeout=0.4))

    async with _worker(make_service, "only"):
        served_by = await caller.invoke("stall_once", 5.0, timeout=10, idempotent=True)

    assert served_by == "only"
    assert [instance for instance, _, _ in SEEN] == ["only", "only"]
    assert len({call_id for _, call_id, _ in SEEN}) == 1


async def test_non_idempotent_waits_whole_deadline(make_service: Callable[..., DeploymentService]) -> None:
    # The attempt timeout applies to idempotent calls only: this call gets the whole deadline, once.
    caller = make_service(retry=RetryPolicy(attempt_timeout=0.2))

    async with _worker(make_service, "only"):
        served_by = await caller.invoke("stall_once", 0.6, timeout=10, idempotent=False)

    assert served_by == "only"
    [(_, _, budget)] = SEEN
    assert budget > 5


async def test_lost_connection_not_retried(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service()
    async with FaultyInstance("drop") as faulty, _worker(make_service, "remote"):
        await _register_local(make_service, "faulty", faulty.endpoint)

        with pytest.raises(TransportError) as caught:
            await caller.invoke("tally", timeout=5, balancing="prefer_local")

    error = caught.value
    assert "not retried, because instance faulty did not register 'tally' as idempotent" in error.message
    assert "1 attempt on faulty" in error.message
    assert error.payload["attempts"] == 1
    assert len(faulty.requests) == 1
    assert SEEN == []


async def test_lost_connection_retried_elsewhere(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service()
    async with FaultyInstance("drop") as faulty, _worker(make_service, "remote"):
        await _register_local(make_service, "faulty", faulty.endpoint)

        served_by = await caller.invoke("tally", timeout=5, idempotent=True, balancing="prefer_local")

    assert served_by == "remote"
    [(_, call_id, _)] = SEEN
    assert faulty.call_ids() == [call_id]


async def test_gateway_page_is_uncertain(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service()
    async with FaultyInstance("gateway") as faulty, _worker(make_service, "remote"):
        await _register_local(make_service, "faulty", faulty.endpoint)

        retried = await caller.invoke("tally", timeout=5, idempotent=True, balancing="prefer_local")
        with pytest.raises(ProtocolError, match="not retried"):
            await caller.invoke("tally", timeout=5, balancing="prefer_local")

    assert retried == "remote"
    assert len(faulty.requests) == 2
    assert [instance for instance, _, _ in SEEN] == ["remote"]


async def test_retries_end_with_attempt_count(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service(retry=RetryPolicy(max_attempts=3, backoff=0.2, max_backoff=1.0))
    async with FaultyInstance("drop") as faulty:
        await _register_local(make_service, "faulty", faulty.endpoint)

        with pytest.raises(TransportError) as caught:
            await caller.invoke("tally", timeout=10, idempotent=True)

    error = caught.value
    assert "3 attempts on faulty; the limit of 3 attempts" in error.message
    assert error.payload["attempts"] == 3
    assert error.payload["instances"] == ["faulty"]
    call_ids = faulty.call_ids()
    assert len(call_ids) == 3
    assert len(set(call_ids)) == 1
    # The waits between attempts: 0.2 s then 0.4 s, each cut by at most half by the jitter.
    arrivals = [request.arrived for request in faulty.requests]
    assert arrivals[1] - arrivals[0] >= 0.1
    assert arrivals[2] - arrivals[1] >= 0.2


async def test_retries_stop_at_deadline(make_service: Callable[..., DeploymentService]) -> None:
    caller = make_service(
        retry=RetryPolicy(max_attempts=1000, backoff=0.1, max_backoff=0.1),
        ejection=EjectionPolicy(consecutive_failures=1000),
    )
    async with FaultyInstance("drop") as faulty:
        await _register_local(make_service, "faulty", faulty.endpoint)

        started = time.monotonic()
        with pytest.raises(TransportError) as caught:
            await caller.invoke("tally", timeout=1.0, idempotent=True)
        elapsed = time.monotonic() - started

    assert elapsed < 1.0 + 0.5
    assert "no time left for another attempt before the deadline" in caught.value.message
    assert 3 <= caught.value.payload["attempts"] == len(faulty.requests) < 30


async def test_ejected_only_instance_retried(make_service: Callable[..., DeploymentService]) -> None:
    # Ejection does not end the retries of a call whose only instance it takes out of routing: the
    # attempt limit and the deadline do.
    caller = make_service(
        retry=RetryPolicy(max_attempts=4, backoff=0.01), ejection=EjectionPolicy(consecutive_failures=2)
    )
    async with FaultyInstance("drop") as faulty:
        await _register_local(make_service, "faulty", faulty.endpoint)

        with pytest.raises(TransportError) as caught:
            await caller.invoke("tally", timeout=5, idempotent=True)
        assert caller.router.is_ejected("faulty")

    assert "4 attempts on faulty; the limit of 4 attempts" in caught.value.message
    assert caught.value.payload["attempts"] == 4
    assert len(faulty.requests) == 4


async def test_hanging_instance_times_out_once(make_service: Callable[..., DeploymentService]) -> None:
    # Without an attempt timeout, the first attempt takes the whole deadline and nothing is left to retry.
    caller = make_service()
    async with FaultyInstance("hang") as faulty:
        await _register_local(make_service, "faulty", faulty.endpoint)

        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as caught:
            await caller.invoke("tally", timeout=0.5, idempotent=True)
        elapsed = time.monotonic() - started

    assert 0.5 <= elapsed < 3.0
    assert caught.value.payload["attempts"] == 1
    assert len(faulty.requests) == 1


# -- outlier ejection ----------------------------------------------------------------------------------------


async def test_failing_instance_ejected(
    make_service: Callable[..., DeploymentService], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="pikku_mq")
    caller = make_service(ejection=EjectionPolicy(consecutive_failures=3, base_interval=30.0))
    async with FaultyInstance("drop") as faulty, _worker(make_service, "w"):
        await _register_local(make_service, "faulty", faulty.endpoint)

        served = [await caller.invoke("tally", timeout=5, idempotent=True) for _ in range(20)]

    assert served == ["w"] * 20
    assert len(faulty.requests) == 3
    assert caller.router.is_ejected("faulty")
    assert not caller.router.is_ejected("w")
    [ejected] = _lines(caplog, "out of routing", logging.INFO)
    assert "taking instance faulty out of routing for 30.0 s" in ejected
    assert "3 failures in a row" in ejected
    # The caller logs no line per call above DEBUG.
    routing = [r for r in caplog.records if r.name in ("pikku_mq._routing", "pikku_mq._outliers")]
    assert [r.getMessage() for r in routing if r.levelno >= logging.INFO] == [ejected]


async def test_recovered_instance_restored(
    make_service: Callable[..., DeploymentService], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pikku_mq")
    caller = make_service(ejection=EjectionPolicy(consecutive_failures=2, base_interval=0.5))
    async with FaultyInstance("drop", answer="faulty") as faulty, _worker(make_service, "w"):
        await _register_local(make_service, "faulty", faulty.endpoint)
        for _ in range(4):
            await caller.invoke("tally", timeout=5, idempotent=True)
        assert caller.router.is_ejected("faulty")

        faulty.mode = "answer"
        await asyncio.sleep(0.6)
        served = [await caller.invoke("tally", timeout=5, idempotent=True) for _ in range(10)]

    assert not caller.router.is_ejected("faulty")
    # The probe got a reply, so round-robin sends the instance its share again.
    assert 4 <= served.count("faulty") <= 6
    assert len(_lines(caplog, "taking instance faulty out of routing", logging.WARNING)) == 1
    [restored] = _lines(caplog, "faulty responds again", logging.INFO)
    assert "back in routing" in restored


async def test_probe_failure_extends_ejection(
    make_service: Callable[..., DeploymentService], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pikku_mq")
    caller = make_service(
        retry=RetryPolicy(attempt_timeout=0.5),
        ejection=EjectionPolicy(consecutive_failures=1, base_interval=0.5, max_interval=10.0),
    )
    async with FaultyInstance("drop") as faulty, _worker(make_service, "w"):
        await _register_local(make_service, "faulty", faulty.endpoint)
        assert await caller.invoke("tally", timeout=5, idempotent=True, balancing="prefer_local") == "w"
        assert len(faulty.requests) == 1

        # When the interval ends, one call of a burst probes the instance, which now hangs.
        faulty.mode = "hang"
        await asyncio.sleep(0.6)
        burst = await asyncio.gather(
            *(caller.invoke("tally", timeout=5, idempotent=True, balancing="prefer_local") for _ in range(8))
        )
        after_probe = len(faulty.requests)

        # The failed probe doubled the interval to 1 s: calls right after it stay away.
        later = [await caller.invoke("tally", timeout=5, idempotent=True, balancing="prefer_local") for _ in range(5)]

    assert burst == ["w"] * 8
    assert after_probe == 2
    assert later == ["w"] * 5
    assert len(faulty.requests) == 2
    assert len(_lines(caplog, "out of routing", logging.INFO)) == 1


async def test_function_errors_not_failures(
    make_service: Callable[..., DeploymentService], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pikku_mq")
    caller = make_service(ejection=EjectionPolicy(consecutive_failures=1))
    async with _worker(make_service, "w"):
        for _ in range(3):
            with pytest.raises(InternalServerError):
                await caller.invoke("fail_on_purpose", "value", timeout=5, idempotent=True)
            with pytest.raises(ForbiddenError):
                await caller.invoke("fail_on_purpose", "forbidden", timeout=5, idempotent=True)

        assert not caller.router.is_ejected("w")
    assert _lines(caplog, "out of routing", logging.INFO) == []


async def test_refused_instance_logged_once(
    make_service: Callable[..., DeploymentService], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pikku_mq")
    caller = make_service(ejection=EjectionPolicy(base_interval=0.1))
    await _register_local(make_service, "dead", f"http://127.0.0.1:{closed_port()}")

    async with _worker(make_service, "w"):
        served = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            served.append(await caller.invoke("tally", timeout=5))  # not idempotent: refusals move it anyway
            await asyncio.sleep(0.02)

    assert set(served) == {"w"}
    [ejected] = _lines(caplog, "out of routing", logging.INFO)
    assert "taking instance dead out of routing for 0.1 s" in ejected
    assert "unreachable" in ejected
    assert caller.router.is_ejected("dead")
