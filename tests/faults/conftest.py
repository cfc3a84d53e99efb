"""Fixtures of the fault drills: the transport of each drill and a factory of drills that closes them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ._harness import TRANSPORTS, Drill, MakeDrill, Wiring


@pytest.fixture(params=TRANSPORTS)
def wiring(request: pytest.FixtureRequest) -> Wiring:
    """The drill's transport on the shared brokers: AMQP in the session's vhost, NATS on its own subjects."""
    if request.param == "amqp":
        return Wiring("amqp", amqp_vhost=request.getfixturevalue("amqp_vhost"))
    return Wiring(request.param)


@pytest.fixture
async def make_drill(tmp_path: Path) -> AsyncIterator[MakeDrill]:
    """Build drills in the test's folder, by default on an SQLite registry there, and close them at the end.

    A test requests the fixture of a private server before this one, so its drills close before the server stops.
    """
    drills: list[Drill] = []

    def make(name: str, wiring: Wiring, discovery_url: str | None = None, **options: Any) -> Drill:
        url = discovery_url or f"sqlite:///{tmp_path / 'registry.db'}"
        drill = Drill(name, wiring, tmp_path, url, **options)
        drills.append(drill)
        return drill

    yield make
    for drill in drills:
        await drill.close()
