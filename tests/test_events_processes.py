"""Events and one-way calls with worker processes on real brokers: groups, SIGKILL and broker restarts.

The group and SIGKILL tests use the shared NATS and RabbitMQ servers, on subjects or a vhost of the
test's own. The restart tests start a private nats-server with JetStream and its own store folder,
or a private RabbitMQ node, and kill and start it again. The shared servers are never restarted.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _support_core import wait_until
from _support_events import TestBroker, amqp_broker, nats_broker
from _support_servers import PrivateNats, PrivateRabbitMQ
from _support_workers import WorkerProcesses

from pikku_mq import TransportSet, deployment_service_from_url, event_bus_from_url
from pikku_mq.transports.amqp import AmqpTransport
from pikku_mq.transports.nats import NatsTransport

WORKER = Path(__file__).parent / "apps" / "events_worker.py"

EVENTS = 20


@pytest.fixture(params=["nats", "amqp"])
async def broker(request: pytest.FixtureRequest) -> AsyncIterator[TestBroker]:
    created = nats_broker() if request.param == "nats" else amqp_broker()
    try:
        yield created
    finally:
        await created.close()


def ledger_lines(ledger: Path, kind: str) -> list[tuple[str, str]]:
    """Return the ``(tag, deployment id)`` of the finished runs of ``kind`` in the ledger."""
    if not ledger.exists():
        return []
    lines = [line.split() for line in ledger.read_text().splitlines()]
    return [(tag, deployment_id) for line_kind, tag, deployment_id in lines if line_kind == kind]


def broker_args(broker: TestBroker) -> list[str]:
    """Return the arguments of a worker that consumes the events of ``broker`` and serves HTTP."""
    return ["--endpoint", "http://127.0.0.1:0", "--events", broker.events_url]


@pytest.mark.timeout(120)
async def test_group_of_two_runs_each_event_once(
    broker: TestBroker, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.log"
    for index in (1, 2):
        await worker_processes.start(WORKER, f"group-{index}", "--ledger", str(ledger), *broker_args(broker))

    publisher = event_bus_from_url(broker.events_url)
    try:
        for number in range(EVENTS):
            await publisher.publish("jobs.created", {"tag": f"job-{number}"})
    finally:
        await publisher.close()
    await wait_until(lambda: len(ledger_lines(ledger, "event")) >= EVENTS, timeout=30, interval=0.1)
    await asyncio.sleep(1.0)  # a duplicate would show up by now

    runs = ledger_lines(ledger, "event")
    assert sorted(tag for tag, _ in runs) == sorted(f"job-{number}" for number in range(EVENTS))
    assert {deployment_id for _, deployment_id in runs} <= {"group-1", "group-2"}


@pytest.mark.timeout(120)
async def test_killed_worker_event_redelivered(
    broker: TestBroker, worker_processes: WorkerProcesses, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.log"
    started = ledger.with_suffix(".started")
    workers = {}
    for index in (1, 2):
        deployment_id = f"kill-{index}"
        workers[deployment_id] = await worker_processes.start(
            WORKER, deployment_id, "--ledger", str(ledger), "--ack-wait", "2", *broker_args(broker)
        )

    publisher = event_bus_from_url(broker.events_url)
    try:
        await publisher.publish("jobs.created", {"tag": "held", "hold": 60})
    finally:
        await publisher.close()
    await wait_until(started.exists, timeout=20, interval=0.05)
    holder = started.read_text().split()[1]
    workers[holder].kill()

    await wait_until(lambda: ledger_lines(ledger, "event"), timeout=30, interval=0.1)
    runs = ledger_lines(ledger, "event")
    survivor = next(deployment_id for deployment_id in workers if deployment_id != holder)
    assert runs == [("held", survivor)]


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    server = PrivateNats(tmp_path / "nats.log", store_dir=tmp_path / "jetstream")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    with PrivateRabbitMQ() as node:
        yield node


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["nats", "amqp"])
async def test_notify_survives_broker_restart(
    kind: str, request: pytest.FixtureRequest, worker_processes: WorkerProcesses, tmp_path: Path, discovery_url: str
) -> None:
    ledger = tmp_path / "ledger.log"
    if kind == "nats":
        server = request.getfixturevalue("private_nats")
        endpoint = f"nats://127.0.0.1:{server.port}/pikku-restart"
        args = ["--endpoint", endpoint, "--nats-url", server.url]
        transport = NatsTransport(server.url)
    else:
        server = request.getfixturevalue("private_rabbitmq")
        args = ["--amqp-url", server.url]
        transport = AmqpTransport(server.url)

    # The first worker creates the durable stream or queue, then dies without leaving the registry.
    first_args = args if kind == "nats" else [*args, "--endpoint", f"amqp://127.0.0.1:{server.port}/%2F?queue=first"]
    first = await worker_processes.start(WORKER, "first", "--ledger", str(ledger), "--durable-notify", *first_args)
    first.kill()

    caller = deployment_service_from_url(discovery_url, transports=TransportSet([transport]), security=False)
    try:
        await caller.notify("record", {"tag": "kept"})
    finally:
        await caller.close()

    server.stop()
    server.start()

    second_args = args if kind == "nats" else [*args, "--endpoint", f"amqp://127.0.0.1:{server.port}/%2F?queue=second"]
    await worker_processes.start(WORKER, "second", "--ledger", str(ledger), "--durable-notify", *second_args)
    await wait_until(lambda: ledger_lines(ledger, "notify"), timeout=30, interval=0.1)
    assert ledger_lines(ledger, "notify") == [("kept", "second")]
