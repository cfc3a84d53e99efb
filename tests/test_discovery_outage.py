"""Discovery going away and coming back empty: calls keep routing and registrations return."""

from __future__ import annotations

import asyncio
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from _support_core import wait_until

from pikku_mq import (
    DeploymentConfig,
    DiscoveryError,
    FunctionRegistry,
    PikkuWorker,
    SqliteDeploymentService,
    pikku_sessionless_func,
)

REG = FunctionRegistry()
INTERVAL = 0.3
TTL = 1.5


@pikku_sessionless_func(expose=True, registry=REG)
async def ping(services: Any, data: Any) -> str:
    return "pong"


def _take_away(folder: Path) -> None:
    shutil.rmtree(folder)


def _bring_back(folder: Path) -> None:
    folder.mkdir()


async def test_store_outage_survived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The registry's folder disappears, so every connection to the store fails, then comes back empty.
    folder = tmp_path / "registry"
    path = folder / "pikku.db"
    options = {"heartbeat_interval": INTERVAL, "heartbeat_ttl": TTL}
    caller = SqliteDeploymentService(path, routing_cache_ttl=0.2, **options)
    worker = PikkuWorker(
        registry=REG, deployment_id="outage-1", deployment_service=SqliteDeploymentService(path, **options)
    )

    async with worker:
        assert await caller.invoke("ping", timeout=5) == "pong"

        _take_away(folder)
        with pytest.raises(DiscoveryError):
            await caller.find_function("ping")
        with caplog.at_level(logging.WARNING):
            for _ in range(8):
                assert await caller.invoke("ping", timeout=5) == "pong"
                await asyncio.sleep(INTERVAL)
        heartbeat_warnings = [r for r in caplog.records if "heartbeat of outage-1 failed" in r.getMessage()]
        routing_warnings = [r for r in caplog.records if "routing from the last lookups" in r.getMessage()]
        assert len(heartbeat_warnings) == 1
        assert len(routing_warnings) == 1

        _bring_back(folder)

        async def registered() -> bool:
            try:
                found = await caller.find_function("ping")
            except DiscoveryError:
                return False
            return [i.deployment_id for i in found] == ["outage-1"]

        waited = await wait_until(registered, timeout=INTERVAL * 10)
        assert waited < INTERVAL * 4
        assert await caller.invoke("ping", timeout=5) == "pong"

    await caller.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class _StrayCancellationStore(SqliteDeploymentService):
    """A real SQLite store whose next heartbeat raises CancelledError, as a buggy driver might."""

    stray = 1

    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        if self.stray:
            self.stray -= 1
            raise asyncio.CancelledError
        return await super()._heartbeat(config, functions)


async def test_stray_cancellation_keeps_heartbeats(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # Only a cancellation of the heartbeat task itself may end it. A CancelledError from a store is a failure.
    caplog.set_level(logging.INFO)
    service = _StrayCancellationStore(tmp_path / "pikku.db", heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    await service.start(DeploymentConfig("stray", "http://127.0.0.1:9", functions=["ping"]))
    try:
        recovered = "heartbeat of stray recovered"
        await wait_until(lambda: any(recovered in r.getMessage() for r in caplog.records), timeout=INTERVAL * 10)
        assert service.heartbeating
    finally:
        await service.close()

    failures = [r.getMessage() for r in caplog.records if "heartbeat of stray failed" in r.getMessage()]
    assert len(failures) == 1
    assert "CancelledError" in failures[0]


async def test_stop_during_outage_raises_discovery_error(tmp_path: Path) -> None:
    folder = tmp_path / "registry"
    folder.mkdir()
    service = SqliteDeploymentService(folder / "pikku.db", heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    await service.start(DeploymentConfig("outage-stop", "http://127.0.0.1:1", functions=["ping"]))

    _take_away(folder)
    with pytest.raises(DiscoveryError) as caught:
        await service.close()
    assert "deregistering outage-stop" in str(caught.value)
    assert service.deployment_id is None
