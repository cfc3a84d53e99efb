"""One-way calls (``rpc.notify``) over HTTP, the in-memory transport, NATS JetStream and RabbitMQ.

The broker tests use the shared NATS and RabbitMQ servers, each test on subjects or a vhost of its own
(see _support_events). The tests of crashes and broker restarts are in test_events_processes.py.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pytest
from _support_core import Mesh, wait_until
from _support_events import TestBroker, amqp_broker, amqp_letters, nats_broker, nats_letters
from _support_servers import PrivateNats

from pikku_mq import (
    RPC,
    DeliveryPolicy,
    EndpointUnreachableError,
    FunctionNotFoundError,
    FunctionRegistry,
    InputValidationError,
    PikkuWorker,
    RemoteSecurity,
    RoutingError,
    ServiceUnavailableError,
    UnauthorizedError,
    Wire,
    pikku_sessionless_func,
)
from pikku_mq._dispatch import Dispatcher
from pikku_mq.transports.amqp_durable import notify_queue

REG = FunctionRegistry()

RUNS: list[tuple[str, Any, str]] = []
"""The runs of ``record``: the call id, the data and the trace id."""

GATE: dict[str, asyncio.Event] = {}


@pikku_sessionless_func(expose=True, registry=REG)
async def record(services: Any, data: dict[str, Any], wire: Wire) -> None:
    gate = GATE.get(str(data.get("gate")))
    if gate is not None:
        await gate.wait()
    RUNS.append((wire.call_id, data, wire.trace_id))


@pikku_sessionless_func(expose=True, registry=REG)
async def typed(services: Any, data: int) -> int:
    return data


@pytest.fixture(autouse=True)
def _clear_runs() -> None:
    RUNS.clear()
    GATE.clear()


@pytest.fixture(params=["nats", "amqp"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[TestBroker]:
    created = nats_broker() if request.param == "nats" else amqp_broker()
    try:
        yield created
    finally:
        await created.close()


def runs_of(tag: str) -> list[tuple[str, Any, str]]:
    return [run for run in RUNS if run[1].get("tag") == tag]


async def test_notify_http_runs_in_background() -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(endpoint="http://127.0.0.1:0", registry=REG, deployment_service=mesh.service())
        async with worker:
            GATE["held"] = asyncio.Event()
            rpc = RPC(deployment_service=mesh.service(), trace_id="trace-http")

            await asyncio.wait_for(rpc.notify("record", {"tag": "h", "gate": "held"}), 5)
            assert runs_of("h") == []  # notify returned while the function waits on its gate

            GATE["held"].set()
            await wait_until(lambda: runs_of("h"), timeout=5)
            assert runs_of("h")[0][2] == "trace-http"


async def test_notify_memory_unknown_function() -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(endpoint="memory://notify-bad", registry=REG, deployment_service=mesh.service())
        async with worker:
            rpc = RPC(deployment_service=mesh.service())
            await rpc.notify("typed", 3)
            # Input is validated when the function starts, after the one-way call was admitted.
            await rpc.notify("typed", "not a number")
            with pytest.raises(FunctionNotFoundError):
                await rpc.notify("missing_function", {})


async def test_one_way_call_id_runs_once() -> None:
    dispatcher = Dispatcher(REG, deployment_id="d-1")
    headers = {"pikku-call-id": "call-1", "pikku-one-way": "1"}

    assert dispatcher.accept_one_way("record", {"tag": "dup"}, headers) is None
    assert dispatcher.accept_one_way("record", {"tag": "dup"}, headers) is None
    assert await dispatcher.wait_idle(5)

    assert len(runs_of("dup")) == 1


async def test_one_way_rejected_while_draining() -> None:
    dispatcher = Dispatcher(REG, deployment_id="d-1")
    dispatcher.draining = True

    rejection = dispatcher.accept_one_way("record", {"tag": "drain"}, {})

    assert rejection is not None
    assert isinstance(rejection.error, ServiceUnavailableError)
    assert rejection.rejected


async def test_notify_durable_runs_once(broker: TestBroker) -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint=broker.endpoint,
            registry=REG,
            deployment_service=mesh.service(),
            durable_notify=True,
            **broker.worker_options(),
        )
        async with worker:
            GATE["held"] = asyncio.Event()
            rpc = RPC(deployment_service=mesh.service(), trace_id=f"trace-{broker.kind}")

            await asyncio.wait_for(rpc.notify("record", {"tag": "d", "gate": "held"}), 10)
            await asyncio.sleep(0.2)
            assert runs_of("d") == []  # stored and delivered, but the function waits on its gate

            GATE["held"].set()
            await wait_until(lambda: runs_of("d"), timeout=10)
            await asyncio.sleep(0.5)
            assert len(runs_of("d")) == 1
            assert runs_of("d")[0][2] == f"trace-{broker.kind}"


async def test_notify_without_durable_consumers(broker: TestBroker) -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint=broker.endpoint, registry=REG, deployment_service=mesh.service(), **broker.worker_options()
        )
        async with worker:
            rpc = RPC(deployment_service=mesh.service())
            with pytest.raises(RoutingError) as caught:
                await rpc.notify("record", {"tag": "none"})
    assert "durable_notify=True" in caught.value.message


async def test_notify_invalid_input_dead_letter(broker: TestBroker) -> None:
    async with Mesh() as mesh:
        worker = PikkuWorker(
            endpoint=broker.endpoint,
            registry=REG,
            deployment_service=mesh.service(),
            durable_notify=True,
            delivery=DeliveryPolicy(max_attempts=3, backoff=0.05, max_backoff=0.1),
            **broker.worker_options(),
        )
        async with worker:
            rpc = RPC(deployment_service=mesh.service())
            await rpc.notify("typed", "not a number")
            await rpc.notify("record", {"tag": "after"})
            await wait_until(lambda: runs_of("after"), timeout=10)

            letters = await _notify_dead_letters(broker, "typed")
    assert len(letters) == 1
    headers, data = letters[0]
    assert data == "not a number"
    assert headers["pikku-error-class"] == InputValidationError.__name__
    assert headers["pikku-attempts"] == "1"  # a 4xx failure is not retried


async def test_amqp_redelivered_call_runs_once() -> None:
    broker = amqp_broker()
    try:
        async with Mesh() as mesh:
            worker = PikkuWorker(
                endpoint=broker.endpoint,
                registry=REG,
                deployment_service=mesh.service(),
                durable_notify=True,
                **broker.worker_options(),
            )
            async with worker:
                # The same call twice, as a broker redelivers it after a lost acknowledgement.
                call_id = uuid.uuid4().hex
                connection = await aio_pika.connect(f"{broker.broker_url.rstrip('/')}/{broker.vhost}")
                async with connection:
                    channel = await connection.channel()
                    for _ in range(2):
                        message = aio_pika.Message(
                            msgpack.packb({"data": {"tag": "twice"}}), headers={"pikku-call-id": call_id}
                        )
                        await channel.default_exchange.publish(message, routing_key=notify_queue("record"))
                await wait_until(lambda: runs_of("twice"), timeout=10)
                await asyncio.sleep(0.5)
                assert len(runs_of("twice")) == 1
    finally:
        await broker.close()


async def test_signed_redelivery_runs_once() -> None:
    security = RemoteSecurity("a-secret-of-at-least-32-characters-for-tests")
    broker = amqp_broker()
    try:
        async with Mesh() as mesh:
            worker = PikkuWorker(
                endpoint=broker.endpoint,
                registry=REG,
                deployment_service=mesh.service(),
                durable_notify=True,
                security=security,
                **broker.worker_options(),
            )
            async with worker:
                data = {"tag": "signed"}
                token = security.signer("record", data, None)()
                headers = {"pikku-call-id": uuid.uuid4().hex, "authorization": token}
                connection = await aio_pika.connect(f"{broker.broker_url.rstrip('/')}/{broker.vhost}")
                async with connection:
                    channel = await connection.channel()
                    # The same signed call twice: the token id is accepted again, and the call id runs once.
                    for _ in range(2):
                        message = aio_pika.Message(msgpack.packb({"data": data}), headers=headers)
                        await channel.default_exchange.publish(message, routing_key=notify_queue("record"))
                    unsigned = aio_pika.Message(msgpack.packb({"data": {"tag": "unsigned"}}))
                    await channel.default_exchange.publish(unsigned, routing_key=notify_queue("record"))

                await wait_until(lambda: runs_of("signed"), timeout=10)
                letters = await _notify_dead_letters(broker, "record")
                await asyncio.sleep(1.0)  # the redelivery takes milliseconds to replay or fail
                letters = await _notify_dead_letters(broker, "record")
                assert len(runs_of("signed")) == 1
        assert runs_of("unsigned") == []
        assert len(letters) == 1
        assert letters[0][1] == {"tag": "unsigned"}
        assert letters[0][0]["pikku-error-class"] == UnauthorizedError.__name__
    finally:
        await broker.close()


async def test_durable_notify_needs_jetstream(tmp_path: Path) -> None:
    server = PrivateNats(tmp_path / "nats.log")
    server.start()
    try:
        worker = PikkuWorker(
            endpoint=f"nats://127.0.0.1:{server.port}/pikku-nojs",
            registry=REG,
            discovery=False,
            durable_notify=True,
            nats_url=server.url,
        )
        with pytest.raises(EndpointUnreachableError, match="start nats-server with JetStream"):
            await worker.start()
    finally:
        server.stop()


async def _notify_dead_letters(broker: TestBroker, function: str) -> list[tuple[dict[str, str], Any]]:
    """Wait for and return the dead letters of the one-way calls to ``function``."""
    letters: list[tuple[dict[str, str], Any]] = []

    async def found() -> bool:
        nonlocal letters
        if broker.kind == "nats":
            letters = await nats_letters(f"pikku-notify.{broker.prefix}.dead.{function}")
        else:
            letters = await amqp_letters(broker.vhost, notify_queue(function) + ".dead")
        return bool(letters)

    await wait_until(found, timeout=10, interval=0.2)
    return letters
