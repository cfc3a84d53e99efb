"""Fixtures of the fault drills: the transport of each drill and a factory of drills that closes them."""

from __future__ import annotations

import sqlite3
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
    # The last connection to close an SQLite file in WAL mode takes its exclusive lock, and a worker
    # stopped at that moment would hold up every lookup until it resumes (see SqliteDeploymentService).
    # The drills test what a stopped worker does to calls, so this connection stays open throughout.
    registry = tmp_path / "registry.db"
    holder = sqlite3.connect(registry, isolation_level=None)
    holder.execute("PRAGMA journal_mode = WAL")
    holder.execute("SELECT count(*) FROM sqlite_master").fetchall()

    def make(name: str, wiring: Wiring, discovery_url: str | None = None, **options: Any) -> Drill:
        url = discovery_url or f"sqlite:///{registry}"
        drill = Drill(name, wiring, tmp_path, url, **options)
        drills.append(drill)
        return drill

    try:
        yield make
        for drill in drills:
            await drill.close()
    finally:
        holder.close()
