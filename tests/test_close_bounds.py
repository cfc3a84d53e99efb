"""close() returns within its bounds when a background task ignores a cancellation.

A store's client can drop a cancellation (Python 3.11's asyncio.wait_for does when its result arrives at
the same moment). These services run on the memory backend with tasks that ignore cancellations on
purpose, and with the bounds shortened so that the tests run in a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from _support_core import wait_until

from pikku_mq import DeploymentConfig, MemoryDeploymentService
from pikku_mq._presence import ChangeEvent
from pikku_mq.backends import base

BOUND = 0.2
"""Seconds each shortened bound lasts."""


class StubbornFeedService(MemoryDeploymentService):
    """A memory service with a change feed that ignores the first ``ignored`` cancellations."""

    has_change_feed = True

    def __init__(self, ignored: int, **options: Any) -> None:
        super().__init__(**options)
        self.ignored = ignored
        self.cancellations = 0

    async def _watch_changes(self, deliver: Callable[[ChangeEvent | None], None], check_interval: float) -> None:
        deliver(None)
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.cancellations > self.ignored:
                    raise


class StubbornHeartbeatService(MemoryDeploymentService):
    """A memory service whose heartbeats hang once ``hang_heartbeats`` is set, ignoring the first cancellation."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.hang_heartbeats = False
        self.heartbeat_hanging = False
        self.cancellations = 0

    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        while self.hang_heartbeats:
            self.heartbeat_hanging = True
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancellations += 1
                if self.cancellations > 1:
                    raise
        return await super()._heartbeat(config, functions)


async def _timed_close(service: MemoryDeploymentService, caplog: pytest.LogCaptureFixture) -> float:
    """Close ``service`` with its warnings captured, within 5 s, and return the seconds it took."""
    with caplog.at_level(logging.WARNING, logger="pikku_mq"):
        started = time.monotonic()
        async with asyncio.timeout(5):
            await service.close()
        return time.monotonic() - started


def _warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


async def test_close_cancels_feed_again(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(base, "_FEED_STOP_TIMEOUT", BOUND)
    service = StubbornFeedService(ignored=1)
    service._ensure_change_feed()
    await wait_until(lambda: service.change_feed_live, timeout=5)
    feed = service._feed_task
    assert feed is not None

    elapsed = await _timed_close(service, caplog)

    assert feed.cancelled()
    assert service.cancellations == 2
    assert BOUND <= elapsed < 2 * BOUND + 0.5
    [warning] = _warnings(caplog)
    assert "did not stop within 0.2 s of its cancellation, so it is cancelled again" in warning


async def test_close_leaves_feed_ignoring_cancellations(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(base, "_FEED_STOP_TIMEOUT", BOUND)
    service = StubbornFeedService(ignored=2)
    service._ensure_change_feed()
    await wait_until(lambda: service.change_feed_live, timeout=5)
    feed = service._feed_task
    assert feed is not None

    try:
        elapsed = await _timed_close(service, caplog)

        assert not feed.done()
        assert service.cancellations == 2
        assert 2 * BOUND <= elapsed < 2 * BOUND + 0.5
        first, second = _warnings(caplog)
        assert "so it is cancelled again" in first
        assert "did not stop within 0.2 s of a second cancellation" in second
    finally:
        feed.cancel()  # the third cancellation, which the feed obeys
        await asyncio.wait({feed}, timeout=5)
    assert feed.cancelled()


async def test_close_bounds_hung_heartbeat(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(base, "_HEARTBEAT_STOP_TIMEOUT", BOUND)
    service = StubbornHeartbeatService(heartbeat_interval=0.05, heartbeat_ttl=1.0)
    await service.start(DeploymentConfig("hung", "http://127.0.0.1:1/hung", functions=["f"]))
    heartbeats = service._heartbeat_task
    assert heartbeats is not None
    service.hang_heartbeats = True
    await wait_until(lambda: service.heartbeat_hanging, timeout=5)

    try:
        elapsed = await _timed_close(service, caplog)

        assert not heartbeats.done()
        assert service.cancellations == 1
        assert 2 * BOUND <= elapsed < 2 * BOUND + 0.5
        # close() still deregistered the instance.
        assert await service.find_function("f") == []
        [warning] = _warnings(caplog)
        assert "the heartbeat task pikku-heartbeat-hung did not stop within 0.2 s of its cancellation" in warning
    finally:
        heartbeats.cancel()  # the second cancellation, which the heartbeat obeys
        await asyncio.wait({heartbeats}, timeout=5)
    assert heartbeats.cancelled()
