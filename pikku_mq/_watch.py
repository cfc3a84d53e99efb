"""Mesh events: a stream of joins, draining, leaves and expiries of the instances in a registry.

:meth:`DeploymentService.watch <pikku_mq.DeploymentService.watch>` returns a :class:`DeploymentWatch`.
It combines three sources, because each of them misses some changes:

- the registry table, listed every ``poll_interval`` seconds and compared with the last listing. Only
  this sees an instance expire (its heartbeat grew older than the TTL), and it is the only source on
  backends without a change feed (memory, SQLite, SQLAlchemy);
- the backend's change feed (PostgreSQL ``LISTEN/NOTIFY``, Redis pub/sub), which reports joins,
  draining and leaves within milliseconds;
- the presence messages that workers publish on NATS and AMQP, received through the service's transports.

A feed that subscribes again after a loss lists the table at once, since the events sent during the
gap are lost. Events from a feed carry only the deployment id, so the watch lists the table to learn
a new instance's endpoints and functions before it reports the join.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Literal, Self

from ._errors import ConfigurationError, check_seconds
from ._liveness import wait_for_event
from ._presence import ChangeEvent
from ._types import DeploymentRecord

if TYPE_CHECKING:
    from .backends.base import DeploymentService

__all__ = ["DEFAULT_WATCH_QUEUE_SIZE", "DeploymentWatch", "MeshEvent", "MeshEventKind"]

logger = logging.getLogger(__name__)

MeshEventKind = Literal["join", "draining", "leave", "expired"]

MIN_POLL_INTERVAL = 0.1
"""Minimum seconds between two listings of the registry table by a watch, so that a mistyped interval
cannot query the registry without pause."""

DEFAULT_WATCH_QUEUE_SIZE = 10_000
"""Events a watch buffers for a slow consumer. Past this count the oldest events are dropped."""

_STOP_TIMEOUT = 5.0
"""Seconds ``aclose`` waits for the polling task to end after cancelling it."""

_PRESENCE_CONNECT_TIMEOUT = 5.0
"""Seconds a watch waits for each broker connection that carries presence messages."""


@dataclass(frozen=True, slots=True)
class MeshEvent:
    """A change of one instance in the mesh.

    ``join``: the instance registered (or is live again). ``draining``: it announced that it stops and
    takes no new calls. ``leave``: it deregistered. ``expired``: its last heartbeat is older than the
    TTL, so callers no longer route to it. ``endpoint``, ``fallback_endpoints`` and ``functions`` are
    those of the registration the watch last listed.
    """

    kind: MeshEventKind
    deployment_id: str
    endpoint: str
    fallback_endpoints: tuple[str, ...]
    functions: tuple[str, ...]
    hostname: str | None = None

    @property
    def endpoints(self) -> tuple[str, ...]:
        """The preferred endpoint followed by the fallback endpoints."""
        return (self.endpoint, *self.fallback_endpoints)


@dataclass(slots=True)
class _Known:
    """An instance the watch has reported as joined and not yet as gone."""

    record: DeploymentRecord
    listed_at: float
    """The time.monotonic() of the listing that returned ``record``."""
    draining: bool = False

    def event(self, kind: MeshEventKind) -> MeshEvent:
        record = self.record
        return MeshEvent(
            kind, record.deployment_id, record.endpoint, record.fallback_endpoints, record.functions, record.hostname
        )


def _same_registration(old: DeploymentRecord, new: DeploymentRecord) -> bool:
    return (
        old.endpoint == new.endpoint
        and old.fallback_endpoints == new.fallback_endpoints
        and old.functions == new.functions
    )


def check_poll_interval(poll_interval: object) -> float:
    """Return ``poll_interval`` as seconds, or raise :class:`ConfigurationError` unless it is finite and >= 0.1."""
    seconds = check_seconds(poll_interval, "poll_interval")
    if seconds < MIN_POLL_INTERVAL:
        raise ConfigurationError(f"poll_interval must be at least {MIN_POLL_INTERVAL:g} seconds, got {seconds!r}")
    return seconds


class DeploymentWatch:
    """An async iterator of :class:`MeshEvent`, and an async context manager that stops its tasks on exit.

    Use it as ``async with service.watch() as events: async for event in events: ...``. Iterating
    without ``async with`` starts the watch on the first ``__anext__``, and then :meth:`aclose` must
    be called to release it. With ``include_existing`` (the default) the watch first reports every
    live instance as a ``join``.
    """

    def __init__(
        self,
        service: DeploymentService,
        *,
        poll_interval: float,
        include_existing: bool = True,
        presence: bool = True,
        max_queue: int = DEFAULT_WATCH_QUEUE_SIZE,
    ) -> None:
        check_poll_interval(poll_interval)
        if max_queue < 1:
            raise ConfigurationError(f"max_queue must be at least 1, got {max_queue!r}")
        self.service = service
        self.poll_interval = float(poll_interval)
        self.include_existing = include_existing
        self.presence = presence
        self._queue: asyncio.Queue[MeshEvent] = asyncio.Queue(max_queue)
        self._known: dict[str, _Known] = {}
        self._gone_at: dict[str, float] = {}
        """When a feed event removed each instance, so a listing that started earlier does not bring it back."""
        self._resync_requested = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = False
        self._closed = False
        self._listing_failed = False
        self._dropped = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """List the table once, then start following the feeds and polling. Called by ``__aenter__``."""
        if self._closed:
            raise RuntimeError("this watch is closed; call service.watch() again")
        if self._started:
            return
        self._started = True
        await self.service.init()
        await self._resync(report_joins=self.include_existing)
        self.service._add_watch_listener(self._on_change)
        self.service._ensure_change_feed()
        if self.presence:
            await self.service.router.transports.open_presence(_PRESENCE_CONNECT_TIMEOUT)
        self._task = asyncio.create_task(self._poll_loop(), name=f"pikku-watch-{id(self):x}")

    async def aclose(self) -> None:
        """Stop following the feeds and polling. The service's change feed stays up for its routing cache."""
        if self._closed:
            return
        self._closed = True
        self.service._remove_watch_listener(self._on_change)
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            done, _ = await asyncio.wait({task}, timeout=_STOP_TIMEOUT)
            if not done:
                logger.warning(
                    "watch of %r did not stop within %g s; it ends with the event loop", self.service, _STOP_TIMEOUT
                )

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> MeshEvent:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        if not self._started:
            await self.start()
        return await self._queue.get()

    @property
    def dropped(self) -> int:
        """Events dropped because the consumer fell ``max_queue`` events behind."""
        return self._dropped

    # -- sources -----------------------------------------------------------------------------------

    def _on_change(self, event: ChangeEvent | None) -> None:
        """Apply one event of a change feed or of broker presence; None means the feed subscribed again."""
        if event is None or event.kind in ("resync", "join"):
            self._resync_requested.set()
            return
        known = self._known.get(event.deployment_id)
        if known is None or (
            event.endpoint and event.endpoint not in (known.record.endpoint, *known.record.fallback_endpoints)
        ):
            # An unknown instance, or another mesh's instance with the same id on a shared broker.
            if event.kind == "heartbeat" and event.deployment_id not in self._gone_at:
                self._resync_requested.set()
            return
        if event.kind == "draining" and not known.draining:
            known.draining = True
            self._emit(known.event("draining"))
        elif event.kind == "leave":
            del self._known[event.deployment_id]
            self._gone_at[event.deployment_id] = time.monotonic()
            self._emit(known.event("leave"))

    async def _poll_loop(self) -> None:
        while not self._closed:
            await wait_for_event(self._resync_requested, self.poll_interval)
            self._resync_requested.clear()
            await self._resync(report_joins=True)
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # A store client can swallow a cancellation that arrives during a command (seen here with the
                # Redis backend), and this loop must still end.
                raise asyncio.CancelledError

    async def _resync(self, *, report_joins: bool) -> None:
        """List the table and report what changed since the last listing."""
        started = time.monotonic()
        try:
            records = await self.service.list_deployments()
        except Exception as exc:  # the watch outlives an outage of the store, and catches up when it ends
            if not self._listing_failed:
                logger.warning(
                    "watch of %r failed to list the registry, retrying every %g s: %s: %s",
                    self.service,
                    self.poll_interval,
                    type(exc).__name__,
                    exc,
                )
            self._listing_failed = True
            return
        if self._listing_failed:
            logger.info("watch of %r lists the registry again", self.service)
            self._listing_failed = False
        self._apply_listing(records, started, report_joins=report_joins)

    def _apply_listing(self, records: list[DeploymentRecord], started: float, *, report_joins: bool) -> None:
        listed = {record.deployment_id: record for record in records}
        for deployment_id, known in list(self._known.items()):
            record = listed.get(deployment_id)
            if record is not None and record.state == "live" and _same_registration(record, known.record):
                known.record, known.listed_at = record, started
                continue
            del self._known[deployment_id]
            if record is None:
                # Deleted without an event: deregistered while a feed was down, or purged once stale.
                # NOTE: judged by this service's heartbeat_ttl, because a listing does not return each row's own TTL.
                age = known.record.heartbeat_age + (started - known.listed_at)
                kind: MeshEventKind = "expired" if age > self.service.heartbeat_ttl and not known.draining else "leave"
            elif record.state != "live":
                kind = "expired"
            else:
                # Registered again under the same id with another endpoint or other functions.
                kind = "leave"
            self._emit(known.event(kind))

        for deployment_id, record in listed.items():
            if record.state != "live" or deployment_id in self._known:
                continue
            gone_at = self._gone_at.get(deployment_id)
            if gone_at is not None and gone_at >= started:
                continue  # a feed reported it gone while this listing ran, so the row is older than that
            self._known[deployment_id] = _Known(record, started)
            if report_joins:
                self._emit(self._known[deployment_id].event("join"))

        # Only a listing that started after a leave can decide that the id is back.
        self._gone_at = {key: at for key, at in self._gone_at.items() if at >= started}

    def _emit(self, event: MeshEvent) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                logger.warning("watch of %r dropped %d events: the consumer is too slow", self.service, self._dropped)
        self._queue.put_nowait(event)
