"""Fault drills on the broker: a private NATS server or RabbitMQ node crashes during calls and starts again.

The shared brokers are never touched: each drill runs its workers and its caller on a broker of its
own on a free port (``PrivateNats``, ``PrivateRabbitMQ``), kills it with SIGKILL under load and
starts it again on the same port. A third variant serves NATS with an HTTP fallback endpoint, to
which the calls move while the broker is away.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from _support_servers import PrivateNats, PrivateRabbitMQ

from ._harness import MakeDrill, Wiring

pytestmark = pytest.mark.timeout(120)

OUTAGE = 1.0
"""Seconds the broker stays down, on top of the time it takes to start again."""


@pytest.fixture(scope="module")
def private_rabbitmq() -> Iterator[PrivateRabbitMQ]:
    """A RabbitMQ node of this module, booted once (about 4 s) and restarted by the drills."""
    with PrivateRabbitMQ() as node:
        yield node


@pytest.fixture
def broker(request: pytest.FixtureRequest, variant: str) -> PrivateNats | PrivateRabbitMQ:
    """The private broker of the drill, set up before the drill so that it is torn down after it."""
    return request.getfixturevalue("private_rabbitmq" if variant == "amqp" else "private_nats")


@pytest.mark.parametrize("variant", ["nats", "amqp", "nats-http-fallback"])
async def test_broker_restarted(broker: PrivateNats | PrivateRabbitMQ, make_drill: MakeDrill, variant: str) -> None:
    if isinstance(broker, PrivateRabbitMQ):
        wiring = Wiring("amqp", amqp_url=broker.url)
    else:
        wiring = Wiring("nats", nats_url=broker.url, http_fallback=variant == "nats-http-fallback")
    drill = make_drill("broker restarted", wiring)
    a, b = await drill.start_workers(2)
    await drill.warm_up()

    await drill.wait_busy(a, b)
    drill.fault()
    await asyncio.to_thread(broker.stop)
    await drill.run_on(OUTAGE)
    await asyncio.to_thread(broker.start)
    drill.fault_over()
    for worker in (a, b):
        served = worker.served_by
        await drill.wait_recovered(lambda s, served=served: s == served)
    await drill.run_on(0.5)
    await drill.load.stop()

    # With a fallback, the function stays reachable over HTTP throughout; without one, from its first
    # success after the broker came back.
    available_from = None if wiring.http_fallback else drill.faults[-1][1] + min(drill.recoveries)
    figures = drill.figures(available_from=available_from)
    drill.report(figures)
    drill.check(figures, available_from=available_from)
