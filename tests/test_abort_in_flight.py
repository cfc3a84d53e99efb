"""Attempts in flight to an instance that another call finds unreachable end at once.

A broker drops the requests it held for a worker whose process died: NATS delivered them to a
subscription that is gone, and RabbitMQ deletes the worker's queue with the requests in it. Nothing
informs the callers, so without this their calls would wait for the deadline. Here a "black hole"
subscriber or queue takes a call and never replies, then disappears, and a second call to it gets no
responders or comes back unroutable.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika
import nats
import pytest
from _support_amqp import AMQP_URL, amqp_endpoint
from _support_core import Mesh, wait_until
from _support_servers import drop_subscription
from contract.test_transports import ENDPOINTS

from pikku_mq import (
    DeploymentConfig,
    FunctionRegistry,
    PikkuWorker,
    RoutingError,
    TransportError,
    pikku_sessionless_func,
)

REG = FunctionRegistry()

DEADLINE = 10.0
"""The calls' deadline in seconds, far longer than any of them may take here."""

BlackHole = Callable[[], AsyncIterator[tuple[str, list[Any], Callable[[], Awaitable[None]]]]]


# The callers below have no registry of their own, so they learn that stamp is idempotent from the call.
@pikku_sessionless_func(expose=True, idempotent=True, registry=REG)
async def stamp(services: Any, data: Any) -> str:
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def stamp_once(services: Any, data: Any) -> str:
    return str(services)


@asynccontextmanager
async def nats_black_hole() -> AsyncIterator[tuple[str, list[Any], Callable[[], Awaitable[None]]]]:
    """Yield an endpoint whose subscriber takes requests without replying, its requests, and a way to drop it."""
    prefix = f"pikku_t_{uuid.uuid4().hex[:12]}"
    taken: list[Any] = []
    client = await nats.connect("nats://127.0.0.1:4222", allow_reconnect=False)

    async def take(message: Any) -> None:
        taken.append(message.subject)

    subscription = await client.subscribe(f"{prefix}.>", cb=take)
    await client.flush()

    async def vanish() -> None:
        # The test needs the server to reply "no responders" at once, so wait until it does here.
        await drop_subscription(client, subscription, prefix)

    try:
        yield f"nats://127.0.0.1:4222/{prefix}", taken, vanish
    finally:
        await client.close()


@asynccontextmanager
async def amqp_black_hole() -> AsyncIterator[tuple[str, list[Any], Callable[[], Awaitable[None]]]]:
    """The same on RabbitMQ: a queue whose consumer never replies, deleted by ``vanish``."""
    endpoint = amqp_endpoint()
    vhost, queue_name = endpoint.split("/", 3)[3].split("?queue=")
    taken: list[Any] = []
    connection = await aio_pika.connect(AMQP_URL + vhost)
    channel = await connection.channel()
    queue = await channel.declare_queue(queue_name, exclusive=True)

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        taken.append(message.headers.get("pikku-function"))

    await queue.consume(take, no_ack=True)

    async def vanish() -> None:
        await queue.delete(if_unused=False, if_empty=False)

    try:
        yield endpoint, taken, vanish
    finally:
        await connection.close()


BLACK_HOLES: dict[str, Callable[[], Any]] = {"nats": nats_black_hole, "amqp": amqp_black_hole}


@pytest.fixture(params=sorted(BLACK_HOLES))
def broker(request: pytest.FixtureRequest) -> str:
    if request.param == "amqp":
        request.getfixturevalue("amqp_vhost")  # the session's own vhost on the shared RabbitMQ
    return str(request.param)


async def _start_call(caller: Any, name: str, taken: list[Any], *, idempotent: bool) -> asyncio.Task[Any]:
    """Start a call that the black hole takes, and return it once the black hole has it."""
    call = asyncio.create_task(caller.invoke(name, "x", timeout=DEADLINE, idempotent=idempotent))
    await wait_until(lambda: taken, timeout=5)
    return call


async def test_idempotent_call_instance_vanishes(broker: str) -> None:
    async with Mesh() as mesh, BLACK_HOLES[broker]() as (endpoint, taken, vanish):
        await mesh.service().start(DeploymentConfig("hole", endpoint, functions=["stamp"]))
        caller = mesh.service()
        first = await _start_call(caller, "stamp", taken, idempotent=True)

        good = PikkuWorker(
            endpoint=ENDPOINTS[broker](),
            deployment_id="good",
            registry=REG,
            services="good",
            deployment_service=mesh.service(),
        )
        async with good:
            # The worker registers which of its functions are idempotent.
            assert {i.deployment_id: i.idempotent for i in await caller.find_function("stamp")}["good"] is True
            assert [i.idempotent for i in await caller.find_function("stamp_once")] == [False]
            await vanish()
            started = time.monotonic()
            # Round-robin sends one of these calls to the black hole. It finds it gone and moves to good,
            # and it ends the first call's attempt, which moves to good as well.
            assert [await caller.invoke("stamp", "y", timeout=DEADLINE) for _ in range(3)] == ["good"] * 3
            assert caller.router.is_ejected("hole")
            assert await asyncio.wait_for(first, timeout=5) == "good"
            assert time.monotonic() - started < 5
    assert len(taken) == 1


async def test_plain_call_instance_vanishes(broker: str) -> None:
    async with Mesh() as mesh, BLACK_HOLES[broker]() as (endpoint, taken, vanish):
        await mesh.service().start(DeploymentConfig("hole", endpoint, functions=["stamp_once"]))
        caller = mesh.service()
        first = await _start_call(caller, "stamp_once", taken, idempotent=False)

        await vanish()
        started = time.monotonic()
        with pytest.raises(RoutingError):
            await caller.invoke("stamp_once", "y", timeout=DEADLINE)  # nothing else hosts it
        # The plain call may have run, so it is not sent again, but it fails now with a typed error.
        with pytest.raises(TransportError) as raised:
            await asyncio.wait_for(first, timeout=5)
        assert time.monotonic() - started < 5
        assert "became unreachable while the call was in flight" in raised.value.message
        assert "not retried, because 'stamp_once' is not marked idempotent=True" in raised.value.message


async def test_application_cancel_beats_abort() -> None:
    # The application cancels a call in the same loop iteration in which the router ends its attempt:
    # the call ends with CancelledError, not with a retry.
    async with Mesh() as mesh, nats_black_hole() as (endpoint, taken, _):
        await mesh.service().start(DeploymentConfig("hole", endpoint, functions=["stamp"]))
        caller = mesh.service()
        first = await _start_call(caller, "stamp", taken, idempotent=True)
        caller.router._abort_in_flight("hole", "gone on purpose", time.monotonic())
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert caller.router._in_flight == {}
        assert caller.router._aborted == {}


@pytest.mark.parametrize("registered", [True, False], ids=["registered_idempotent", "registered_plain"])
async def test_retry_follows_registration(registered: bool) -> None:
    # A caller without the function's definition retries it only if the instance registered it as idempotent.
    async with Mesh() as mesh, nats_black_hole() as (endpoint, taken, vanish):
        idempotent = ["stamp"] if registered else []
        config = DeploymentConfig("hole", endpoint, functions=["stamp"], idempotent_functions=idempotent)
        await mesh.service().start(config)
        caller = mesh.service()
        first = asyncio.create_task(caller.invoke("stamp", "x", timeout=DEADLINE))
        await wait_until(lambda: taken, timeout=5)

        good = PikkuWorker(
            endpoint=ENDPOINTS["nats"](),
            deployment_id="good",
            registry=REG,
            services="good",
            deployment_service=mesh.service(),
        )
        async with good:
            await vanish()
            assert [await caller.invoke("stamp", "y", timeout=DEADLINE) for _ in range(3)] == ["good"] * 3
            if registered:
                assert await asyncio.wait_for(first, timeout=5) == "good"
            else:
                with pytest.raises(TransportError) as raised:
                    await asyncio.wait_for(first, timeout=5)
                assert "not retried, because instance hole did not register 'stamp' as idempotent" in str(raised.value)
