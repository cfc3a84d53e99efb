"""Run the events example with the command that README.md gives, on NATS JetStream and on RabbitMQ."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _support_events import TestBroker, amqp_broker, nats_broker

ROOT = Path(__file__).resolve().parent.parent


def readme_command() -> list[str]:
    """Return the command of the events example as README.md writes it."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"^(python examples/orders_events\.py.*)$", readme, re.MULTILINE)
    assert match is not None, "README.md has no line that runs python examples/orders_events.py"
    command = shlex.split(match.group(1))
    return [sys.executable, *command[1:]]


@pytest.fixture(params=["nats", "amqp"])
def broker(request: pytest.FixtureRequest) -> Iterator[TestBroker]:
    created = nats_broker() if request.param == "nats" else amqp_broker()
    try:
        yield created
    finally:
        asyncio.run(created.close())


@pytest.mark.timeout(90)
def test_example_ships_every_order(broker: TestBroker) -> None:
    environment = {**os.environ, "PIKKU_EVENTS_URL": broker.events_url}

    completed = subprocess.run(
        readme_command(), cwd=ROOT, env=environment, capture_output=True, text=True, timeout=80, check=False
    )

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines() == [
        "order a1 (tea): parcel PARCEL-A1",
        "order a2 (cups): parcel PARCEL-A2",
        "order a3 (kettle): parcel PARCEL-A3",
    ]
