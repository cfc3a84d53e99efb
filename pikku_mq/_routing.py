"""Caller-side routing: a cache of lookups, round-robin balancing and failover."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ._errors import (
    BusyError,
    DeadlineExceededError,
    DiscoveryError,
    EndpointUnreachableError,
    PayloadTooLargeError,
    PikkuMQError,
    RoutingError,
    TransportError,
    error_from_envelope,
    function_not_found,
)
from ._security import AUTHORIZATION_HEADER, RemoteSecurity
from ._types import HEADER_CALL_ID, HEADER_DEADLINE, HEADER_HOP, HEADER_REQUEST_ID, CallRequest, DeploymentInfo
from .transports.base import Reply, TransportSet

__all__ = ["Router"]

logger = logging.getLogger(__name__)

Lookup = Callable[[str], Awaitable[list[DeploymentInfo]]]

_FIRST_BACKOFF = 0.5
"""Seconds an instance that refused a call is skipped the first time; it doubles on each repeat."""

_STALE_RETRY = 1.0
"""Seconds between lookups while discovery fails and calls route from the last lookup."""

_EMPTY_RESULT_TTL = 1.0
"""Seconds to remember that no instance hosts a function, so a stream of such calls stays cheap."""


@dataclass(slots=True)
class _Entry:
    instances: list[DeploymentInfo]
    expires: float


@dataclass(slots=True)
class _Suspect:
    until: float
    backoff: float


class Router:
    """Sends calls to live instances, looking them up through ``lookup`` at most once per ``cache_ttl``.

    An instance that refuses a connection or rejects a call while draining is skipped, and the call
    goes to the next instance. The skipped instance is tried again after a backoff that starts at
    ``_FIRST_BACKOFF`` and doubles up to ``suspect_ttl`` while it keeps failing, so an instance that
    restarts under the same id is back in use within one backoff.
    """

    def __init__(self, lookup: Lookup, transports: TransportSet, *, cache_ttl: float, suspect_ttl: float) -> None:
        self._lookup = lookup
        self.transports = transports
        self._cache_ttl = cache_ttl
        self._suspect_ttl = max(suspect_ttl, _FIRST_BACKOFF)
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, asyncio.Task[list[DeploymentInfo]]] = {}
        self._suspects: dict[str, _Suspect] = {}
        self._counters: dict[str, itertools.count[int]] = {}
        self._discovery_failing = False
        self._departed: dict[str, tuple[float, str]] = {}
        """Deployment ids that the change feed reported draining or gone, with when to stop filtering them out."""
        self.security: RemoteSecurity | None = None
        """With a remote secret, every attempt carries a token of its own, with the caller's session."""

    def invalidate(self, name: str | None = None) -> None:
        """Forget cached lookups, of one function or of all."""
        if name is None:
            self._entries.clear()
        else:
            self._entries.pop(name, None)

    def cached_instances(self, name: str) -> tuple[str, ...]:
        """Return the deployment ids that calls to ``name`` would route to now without a lookup, expired or not."""
        entry = self._entries.get(name)
        return tuple(i.deployment_id for i in entry.instances) if entry is not None else ()

    # -- change feed events ------------------------------------------------------------------------

    def instance_left(self, deployment_id: str, endpoint: str = "") -> None:
        """Stop routing to an instance that is draining or deregistered, without a lookup.

        A lookup that was already running when the event came could still return the instance, so it
        is kept out of lookups too, until it joins again or ``suspect_ttl`` passes. ``endpoint``, when
        the event names one, limits this to the instance that serves it: presence travels on a broker
        that several meshes may share, and their deployment ids may collide.
        """
        now = time.monotonic()
        self._departed = {i: gone for i, gone in self._departed.items() if gone[0] > now}
        self._departed[deployment_id] = (now + self._suspect_ttl, endpoint)
        for entry in self._entries.values():
            remaining = [i for i in entry.instances if not _same_instance(i, deployment_id, endpoint)]
            if len(remaining) != len(entry.instances):
                entry.instances = remaining
                if not remaining:
                    entry.expires = 0.0  # look again on the next call rather than report nothing
        logger.debug("change feed: %s left", deployment_id)

    def instance_joined(self, deployment_id: str) -> None:
        """Look every function up again on its next call, since the new instance may host it."""
        self._departed.pop(deployment_id, None)
        self._suspects.pop(deployment_id, None)
        self._expire_all()
        logger.debug("change feed: %s joined", deployment_id)

    def instance_alive(self, deployment_id: str) -> None:
        """Take back an instance that announced it is alive after a leave, which heals a stale or forged leave."""
        if self._departed.pop(deployment_id, None) is not None:
            self._expire_all()
            logger.debug("change feed: %s is alive again", deployment_id)

    def resync(self) -> None:
        """Look every function up again, after a gap in the change feed in which events were lost."""
        self._departed.clear()
        self._expire_all()

    def _expire_all(self) -> None:
        # Expired entries stay, so calls can still route from them while discovery is down.
        for entry in self._entries.values():
            entry.expires = 0.0

    def drop_instance(self, deployment_id: str) -> None:
        """Skip an instance until its backoff passes; each repeated failure doubles the backoff."""
        previous = self._suspects.get(deployment_id)
        backoff = _FIRST_BACKOFF if previous is None else min(previous.backoff * 2, self._suspect_ttl)
        self._suspects[deployment_id] = _Suspect(time.monotonic() + backoff, backoff)

    def _is_suspect(self, deployment_id: str, now: float) -> bool:
        suspect = self._suspects.get(deployment_id)
        return suspect is not None and suspect.until > now

    async def call(
        self,
        name: str,
        data: Any,
        *,
        deadline: float,
        trace_id: str | None,
        hop: int,
        idempotent: bool,
        session: Any = None,
    ) -> Any:
        """Call ``name`` on a live instance and return its result, or raise the error it returned.

        The call moves to another instance when the first certainly did not run it (refused,
        draining). After a failure that leaves this unknown, it moves on only if ``idempotent``.
        ``session`` travels only when a remote secret is set, sealed in each attempt's token.
        """
        signer = self.security.signer(name, data, session) if self.security is not None else None
        request = CallRequest(
            name=name,
            data=data,
            headers={
                HEADER_REQUEST_ID: trace_id or uuid.uuid4().hex,
                HEADER_CALL_ID: uuid.uuid4().hex,
                HEADER_HOP: str(hop),
            },
        )
        tried: set[str] = set()
        failures: list[str] = []
        busy: Reply | None = None
        too_large: PayloadTooLargeError | None = None
        refreshed = False
        while True:
            instance = await self._pick(name, tried, deadline)
            if instance is None and not refreshed and tried:
                # Every cached instance failed; the registry may know of newer ones.
                refreshed = True
                self.invalidate(name)
                instance = await self._pick(name, tried, deadline)
            if instance is None:
                if too_large is not None:
                    raise too_large
                if busy is not None:
                    _result(busy)  # every instance that was tried is busy: raise its BusyError
                raise self._no_instance(name, tried, failures)

            tried.add(instance.deployment_id)
            try:
                reply = await self._attempt(instance, request, deadline, idempotent, failures, signer)
            except PayloadTooLargeError as exc:
                too_large = exc  # another instance may have an endpoint that carries it
                continue
            if reply is None:
                continue
            if reply.rejected:
                busy = reply if _is_busy(reply) else busy
                continue
            return _result(reply)

    async def _attempt(
        self,
        instance: DeploymentInfo,
        request: CallRequest,
        deadline: float,
        idempotent: bool,
        failures: list[str],
        signer: Callable[[], str] | None = None,
    ) -> Reply | None:
        """Send one attempt; return None, or a rejected reply, if the call should move to another instance.

        The instance's endpoints are tried in order: a fallback takes the call when the preferred
        endpoint is unreachable (broker down, no responders, unroutable) or cannot carry a payload
        this large. The instance is dropped only when none of its endpoints was reachable.
        """
        too_large: PayloadTooLargeError | None = None
        for endpoint in self._endpoints_for(instance):
            transport = self.transports.for_endpoint(endpoint)
            assert transport is not None  # _endpoints_for only returns endpoints with a transport

            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceededError(f"call to '{request.name}' ran out of time before it could be sent")
            # At least 1: a worker rejects a deadline of 0 ms as malformed.
            request.headers[HEADER_DEADLINE] = str(max(1, int(remaining * 1000)))
            if signer is not None:
                request.headers[AUTHORIZATION_HEADER] = signer()  # a fresh token id for each attempt

            try:
                reply = await transport.call(endpoint, request, remaining)
            except EndpointUnreachableError as exc:
                logger.info("instance %s is unreachable at %s: %s", instance.deployment_id, endpoint, exc)
                failures.append(f"{instance.deployment_id}: {exc}")
                continue
            except PayloadTooLargeError as exc:
                logger.info("%s cannot carry the call to %s: %s", endpoint, request.name, exc)
                too_large = exc
                continue
            except DeadlineExceededError:
                raise
            except TransportError as exc:
                if not idempotent:
                    raise
                logger.info(
                    "call to %s on %s failed, retrying (idempotent): %s", request.name, instance.deployment_id, exc
                )
                failures.append(f"{instance.deployment_id}: {exc}")
                return None

            if reply.rejected:
                logger.debug(
                    "instance %s rejected %s before running it; trying another", instance.deployment_id, request.name
                )
                # A busy instance is tried again on the next call; a draining one is skipped for a while.
                # Workers that share a NATS queue group share a subject, so the rejection may come from
                # another one: only the instance that rejected is skipped.
                if not _is_busy(reply) and _rejected_by(reply) in (None, instance.deployment_id):
                    self.drop_instance(instance.deployment_id)
                return reply
            self._suspects.pop(instance.deployment_id, None)
            return reply

        if too_large is not None:
            # The instance is up, but no endpoint of it can carry this payload.
            raise too_large
        logger.info("dropping instance %s: none of its endpoints is reachable", instance.deployment_id)
        self.drop_instance(instance.deployment_id)
        return None

    async def _pick(self, name: str, tried: set[str], deadline: float | None = None) -> DeploymentInfo | None:
        instances = await self._instances(name, deadline)
        now = time.monotonic()
        candidates = [
            i for i in instances if i.deployment_id not in tried and not self._is_suspect(i.deployment_id, now)
        ]
        if not candidates:
            return None
        counter = self._counters.setdefault(name, itertools.count())
        return candidates[next(counter) % len(candidates)]

    async def _instances(self, name: str, deadline: float | None = None) -> list[DeploymentInfo]:
        entry = self._entries.get(name)
        if entry is not None and entry.expires > time.monotonic():
            return entry.instances

        # One lookup per function at a time, in a task of its own: concurrent callers share its result,
        # and each waits no longer than its own deadline, however long the store takes to respond.
        task = self._pending.get(name)
        if task is None:
            task = asyncio.get_running_loop().create_task(
                self._fresh_or_stale(name, entry), name=f"pikku-lookup-{name[:64]}"
            )
            self._pending[name] = task
            task.add_done_callback(lambda done: self._lookup_done(name, done))
        if deadline is None:
            return await asyncio.shield(task)
        try:
            async with asyncio.timeout_at(_loop_time(deadline)):
                return await asyncio.shield(task)
        except TimeoutError:
            raise DeadlineExceededError(
                f"looking up the instances of '{name}' took longer than the call's deadline",
                payload={"function": name},
            ) from None

    def _lookup_done(self, name: str, task: asyncio.Task[list[DeploymentInfo]]) -> None:
        if self._pending.get(name) is task:
            del self._pending[name]
        if not task.cancelled():
            task.exception()  # retrieved here: every waiter may have given up on it

    async def close(self) -> None:
        """Cancel the lookups still running, so none outlives the store it queries."""
        tasks = list(self._pending.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fresh_or_stale(self, name: str, entry: _Entry | None) -> list[DeploymentInfo]:
        """Look ``name`` up again; while the store fails, keep routing with the last lookup, if any.

        Refused connections still drop dead instances from a stale lookup, so keeping it is safer
        than failing every call while discovery is away.
        """
        try:
            found = [i for i in await self._lookup_translated(name) if self._usable(i)]
        except DiscoveryError as exc:
            if entry is None or not entry.instances:
                raise
            if not self._discovery_failing:
                logger.warning("discovery failed, routing from the last lookups until it is back: %s", exc)
                self._discovery_failing = True
            entry.expires = time.monotonic() + min(self._cache_ttl, _STALE_RETRY)
            return entry.instances

        if self._discovery_failing:
            logger.info("discovery is back")
            self._discovery_failing = False
        ttl = self._cache_ttl if found else min(self._cache_ttl, _EMPTY_RESULT_TTL)
        self._entries[name] = _Entry(found, time.monotonic() + ttl)
        return found

    async def _lookup_translated(self, name: str) -> list[DeploymentInfo]:
        try:
            return await self._lookup(name)
        except PikkuMQError:
            raise
        except Exception as exc:
            raise DiscoveryError(
                f"looking up instances of '{name}' failed: {type(exc).__name__}: {exc}", payload={"function": name}
            ) from exc

    def _usable(self, instance: DeploymentInfo) -> bool:
        gone = self._departed.get(instance.deployment_id)
        if gone is not None:
            until, endpoint = gone
            if until > time.monotonic() and _same_instance(instance, instance.deployment_id, endpoint):
                return False
        return any(self.transports.supports(e) for e in (instance.endpoint, *instance.fallback_endpoints))

    def _endpoints_for(self, instance: DeploymentInfo) -> list[str]:
        endpoints = [e for e in (instance.endpoint, *instance.fallback_endpoints) if self.transports.supports(e)]
        if not endpoints:
            raise RoutingError(f"no transport for any endpoint of instance '{instance.deployment_id}'")
        return endpoints

    def _no_instance(self, name: str, tried: set[str], failures: list[str]) -> PikkuMQError:
        if tried:
            # The transports' reasons show what to fix, for example a broker URL that refuses connections.
            reasons = f": {'; '.join(failures[-3:])}" if failures else ""
            return RoutingError(
                f"no instance could take the call to '{name}'; tried {', '.join(sorted(tried))}{reasons}",
                payload={"function": name, "tried": sorted(tried), "failures": failures[-3:]},
            )
        entry = self._entries.get(name)
        if entry is not None and entry.instances:
            skipped = sorted(i.deployment_id for i in entry.instances)
            return RoutingError(
                f"every instance of '{name}' failed a call moments ago ({', '.join(skipped)}); "
                "each is tried again after a short backoff",
                payload={"function": name, "skipped": skipped},
            )
        # Nothing hosts it: the same not-found error as for a hidden function, which rpc.exposed relies on.
        return function_not_found(name)


def _same_instance(instance: DeploymentInfo, deployment_id: str, endpoint: str) -> bool:
    """Return whether an event about ``deployment_id`` (at ``endpoint``, when known) is about ``instance``."""
    if instance.deployment_id != deployment_id:
        return False
    return not endpoint or endpoint in (instance.endpoint, *instance.fallback_endpoints)


def _loop_time(deadline: float) -> float:
    """Convert a :func:`time.monotonic` deadline to the event loop's clock."""
    return asyncio.get_running_loop().time() + (deadline - time.monotonic())


def _rejected_by(reply: Reply) -> str | None:
    """Return the deployment id that a rejection names in its payload, if any."""
    payload = reply.body.get("payload") if isinstance(reply.body, dict) else None
    deployment_id = payload.get("deployment_id") if isinstance(payload, dict) else None
    return deployment_id if isinstance(deployment_id, str) else None


def _is_busy(reply: Reply) -> bool:
    return isinstance(reply.body, dict) and reply.body.get("code") == BusyError.code


def _result(reply: Reply) -> Any:
    if 200 <= reply.status < 300:
        return reply.body
    error: PikkuMQError = error_from_envelope(reply.status, reply.body)
    raise error
