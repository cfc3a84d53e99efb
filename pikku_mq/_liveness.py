"""Heartbeats that a blocked event loop cannot hold up.

A function that computes without awaiting (CPU-bound code, a blocking library call) blocks its event
loop, and everything scheduled on that loop waits, heartbeats included. If the heartbeats stopped
for a TTL, callers would take a busy worker for a dead one. So heartbeats run in a :class:`LoopThread`:
a daemon thread with an event loop and connections of its own. The thread dies with the process, so
the heartbeats of a killed worker stop and its registration expires after its TTL. They also stop
when the event loop that started them is closed.

:class:`LoopMonitor` measures from such a thread how long the main event loop has gone without
running a callback, so the worker can log a blocked loop and report itself busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from .transports.base import PresencePublisher

__all__ = ["BLOCKED_AFTER", "LoopMonitor", "LoopThread", "WorkerWatch", "wait_for_event"]

logger = logging.getLogger(__name__)

_CANCEL_GRACE = 2.0
"""Seconds a thread gets to end after its coroutine was cancelled."""

_PROBE_INTERVAL = 0.25
"""Seconds between two checks, from the heartbeat thread, that the worker's event loop runs callbacks."""

BLOCKED_AFTER = 1.0
"""Seconds without running a callback after which a worker's event loop counts as blocked."""

_PUBLISH_TIMEOUT = 2.0
"""Seconds one presence heartbeat may take, so one broker that hangs does not hold up the others."""


class LoopThread:
    """Runs ``main(stop)`` on a daemon thread with an event loop of its own.

    ``stop`` is an :class:`asyncio.Event` of the thread's loop, set by :meth:`stop`, and ``main``
    should return soon after it is set. Everything ``main`` awaits runs on the thread's loop, so it must open
    its own connections there: connections belong to the loop that opened them.
    """

    def __init__(self, name: str, main: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        self.name = name
        self._main = main
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._done: concurrent.futures.Future[None] = concurrent.futures.Future()

    @property
    def alive(self) -> bool:
        """Whether the thread was started and still runs ``main``."""
        return self._loop is not None and not self._done.done()

    def start(self) -> None:
        if self._loop is not None:
            raise RuntimeError(f"thread {self.name} was already started")
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._run, args=(self._loop,), name=self.name, daemon=True).start()

    async def stop(self, timeout: float) -> bool:
        """Set ``stop`` and wait up to ``timeout`` seconds for the thread to end, then cancel ``main``.

        Return whether the thread ended. One that did not is a daemon and dies with the process.
        """
        if self._loop is None:
            return True
        self._call_soon(self._stop.set)
        done = asyncio.wrap_future(self._done)
        # asyncio.wait never cancels what it waits for, so the thread's future stays valid.
        finished, _ = await asyncio.wait({done}, timeout=timeout)
        if not finished:
            self._call_soon(self._cancel)
            finished, _ = await asyncio.wait({done}, timeout=_CANCEL_GRACE)
        return bool(finished)

    def _call_soon(self, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        # A closed loop raises RuntimeError: its thread has ended already.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback)

    def _cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            with asyncio.Runner(loop_factory=lambda: loop) as runner:
                runner.run(self._serve())
        except asyncio.CancelledError:
            logger.info("thread %s was cancelled because it did not stop in time", self.name)
        except Exception:
            logger.exception("thread %s failed", self.name)
        finally:
            self._done.set_result(None)

    async def _serve(self) -> None:
        self._task = asyncio.current_task()
        await self._main(self._stop)


class LoopMonitor:
    """Measures, from another thread, how long ``loop`` has gone without running a callback.

    :meth:`probe` posts a callback to the loop unless one is still waiting there. :meth:`lag` is the
    age of the waiting one. A loop that runs its callbacks shows a lag near zero. A blocked loop
    shows a lag that grows until it is free again.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._posted_at: float | None = None

    def probe(self) -> None:
        if self._posted_at is not None:
            return
        self._posted_at = time.monotonic()
        # A closed loop raises RuntimeError and never runs the callback, so its lag keeps growing.
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self._answer)

    def lag(self) -> float:
        """Return the seconds the last probe has waited for the loop, or 0.0 if it ran."""
        posted = self._posted_at
        return 0.0 if posted is None else time.monotonic() - posted

    def _answer(self) -> None:
        self._posted_at = None


async def wait_for_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for ``event``, and return whether it is set."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass
    return event.is_set()


class WorkerWatch:
    """Publishes a worker's presence heartbeats and watches its event loop, from the worker's heartbeat thread.

    Every ``interval`` seconds each publisher sends a heartbeat with the calls in flight that
    ``in_flight`` returns, and with ``busy`` set while the event loop is blocked. A blocked loop is
    logged once with a WARNING when it has run nothing for :data:`BLOCKED_AFTER` seconds, and once
    with an INFO when it runs again.
    """

    def __init__(
        self,
        deployment_id: str,
        loop: asyncio.AbstractEventLoop,
        publishers: Sequence[PresencePublisher],
        interval: float,
        in_flight: Callable[[], int],
    ) -> None:
        self.deployment_id = deployment_id
        self.in_flight = in_flight
        """Returns the worker's calls in flight. It is called from the watch's thread, so it must only read."""
        self.monitor = LoopMonitor(loop)
        self.publishers = list(publishers)
        self.interval = interval
        self.blocked_for = 0.0
        """The maximum lag seen in the current block, or 0.0 while the loop runs."""
        self._failing: set[int] = set()
        """Indexes of the publishers whose last heartbeat failed."""

    async def run(self, stop: asyncio.Event) -> None:
        """Watch and publish until ``stop`` is set or the worker's loop is closed, then close the publishers."""
        next_beat = time.monotonic() + self.interval
        try:
            while not await wait_for_event(stop, _PROBE_INTERVAL) and not self.monitor.loop.is_closed():
                self.monitor.probe()
                busy = self._check_loop(self.monitor.lag())
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + self.interval
                    await self._beat(busy)
        finally:
            for publisher in self.publishers:
                await publisher.close()

    def _check_loop(self, lag: float) -> bool:
        """Log a block as it starts and ends, and return whether the loop counts as blocked now."""
        if lag >= BLOCKED_AFTER:
            if not self.blocked_for:
                logger.warning(
                    "event loop of worker %s has run nothing for %.1f s: a function blocks it, with CPU-bound code "
                    "or a blocking call. Calls wait until it is free; heartbeats go on from a thread",
                    self.deployment_id,
                    lag,
                )
            self.blocked_for = max(self.blocked_for, lag)
            return True
        if self.blocked_for:
            logger.info(
                "event loop of worker %s runs again after it was blocked for about %.1f s",
                self.deployment_id,
                self.blocked_for,
            )
            self.blocked_for = 0.0
        return False

    async def _beat(self, busy: bool) -> None:
        in_flight = self.in_flight()
        for index, publisher in enumerate(self.publishers):
            try:
                async with asyncio.timeout(_PUBLISH_TIMEOUT):
                    await publisher.publish("heartbeat", self.deployment_id, in_flight, busy=busy)
            except Exception as exc:  # callers still find the worker through discovery
                if index not in self._failing:
                    logger.info(
                        "worker %s could not publish its presence heartbeat, retrying every %.1f s: %s: %s",
                        self.deployment_id,
                        self.interval,
                        type(exc).__name__,
                        exc,
                    )
                self._failing.add(index)
                continue
            if index in self._failing:
                logger.info("worker %s publishes its presence heartbeats again", self.deployment_id)
                self._failing.discard(index)
