"""Caller-side routing: a cache of lookups, balancing, failover, retries and outlier ejection.

How one call moves between instances:

- The balancing strategy picks an instance (see :mod:`pikku_mq._balancing`).
- When the call certainly did not run, it moves to another instance at once. That is when every
  endpoint of the instance refused or was unreachable, NATS reported no responders, an AMQP message
  came back unroutable, or the worker replied that it is draining or busy.
- After an uncertain failure (no reply within the attempt's time, a connection lost after the request
  was sent, a reply that is not pikku_mq's, a worker that stopped mid-call or gave up at the call's
  deadline), only a function marked ``idempotent=True`` is sent again, after a backoff, within the
  deadline and at most :attr:`RetryPolicy.max_attempts` times: to an instance it has not tried when
  there is one, else to the same one. Every attempt carries the same ``pikku-call-id``, so a worker
  can tell a retry from a new call.
- When an attempt finds an instance unreachable (refused, no responders, unroutable), its process is
  gone, so the attempts that other calls have in flight to it will get no reply. They end at once
  as uncertain failures, and idempotent ones are retried, instead of waiting for their deadline.
- Failures count toward the ejection of the instance (see :mod:`pikku_mq._outliers`). When every
  instance of a function is out of routing, calls still go to them, so that a call to a silent
  instance fails by its deadline and an instance that replies again gets calls at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ._balancing import Balancer, Balancing, check_balancing, check_function_balancing, is_local
from ._durable import HEADER_ONE_WAY
from ._errors import (
    BusyError,
    CallInterruptedError,
    ConfigurationError,
    DeadlineExceededError,
    DiscoveryError,
    EndpointUnreachableError,
    PayloadTooLargeError,
    PikkuMQError,
    ProtocolError,
    RoutingError,
    TransportError,
    check_seconds,
    error_from_envelope,
    function_not_found,
)
from ._logs import RepeatedFailureLog, call_extra
from ._outliers import EjectionPolicy, OutlierDetector
from ._security import AUTHORIZATION_HEADER, RemoteSecurity
from ._telemetry import CallObservation, Telemetry
from ._types import (
    HEADER_CALL_ID,
    HEADER_DEADLINE,
    HEADER_HOP,
    HEADER_REQUEST_ID,
    MAX_DEADLINE_DIGITS,
    CallRequest,
    DeploymentInfo,
)
from .transports.base import Reply, TransportSet

__all__ = ["RetryPolicy", "Router"]

_MAX_DEADLINE_MS = 10**MAX_DEADLINE_DIGITS - 1
"""The largest budget that fits in the deadline header; a longer timeout is sent as this."""

logger = logging.getLogger(__name__)

Lookup = Callable[[str], Awaitable[list[DeploymentInfo]]]

_STALE_RETRY = 1.0
"""Seconds between lookups while discovery fails and calls route from the last lookup."""

_EMPTY_RESULT_TTL = 1.0
"""Seconds to remember that no instance hosts a function, so a stream of such calls stays cheap."""

_ABORT_GRACE = 0.05
"""Seconds between finding an instance unreachable and ending the attempts in flight to it."""

_UNCERTAIN_REPLY_CODES = frozenset({CallInterruptedError.code, DeadlineExceededError.code})
"""Error codes of replies in which the worker reports that it gave up on the function, which may have partly run."""


_RANDOM_BYTES = 4096
"""Bytes read from ``os.urandom`` at a time for the ids of calls: the two ids of each of 128 calls."""


class _RandomIds(threading.local):
    """Pairs of ids cut from ``os.urandom`` and not yet used, per thread so that two threads never share them."""

    pairs: Iterator[tuple[str, str]] = iter(())


_random_pairs = _RandomIds()


def _random_ids() -> tuple[str, str]:
    """Return two ids of 32 random hex digits each, as ``uuid4().hex`` gives, mostly without a system call."""
    try:
        return next(_random_pairs.pairs)
    except StopIteration:
        text = os.urandom(_RANDOM_BYTES).hex()
        pairs = _random_pairs.pairs = iter([(text[i : i + 32], text[i + 32 : i + 64]) for i in range(0, len(text), 64)])
        return next(pairs)


def _forget_random_ids() -> None:
    # A forked child must not send the ids that its parent sends next.
    global _random_pairs
    _random_pairs = _RandomIds()


os.register_at_fork(after_in_child=_forget_random_ids)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a caller sends an idempotent call again after an uncertain failure.

    ``max_attempts`` bounds the attempts that may reach the function, the first included. Moving to
    another instance after a failure that certainly did not run the function does not count.
    ``attempt_timeout`` (seconds) limits each attempt of an idempotent call, so that a retry fits in
    the deadline, and is the budget that the worker sees; None gives each attempt all the time that
    is left. The wait before the n-th retry is ``backoff * 2**(n-1)`` seconds, at most
    ``max_backoff``, times a random factor between 0.5 and 1, and a retry that could not start before
    the deadline is not made.
    """

    max_attempts: int = 3
    attempt_timeout: float | None = None
    backoff: float = 0.05
    max_backoff: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be an integer of at least 1, got {self.max_attempts!r}")
        if self.attempt_timeout is not None:
            check_seconds(self.attempt_timeout, "attempt_timeout")
        for name in ("backoff", "max_backoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigurationError(f"{name} must be a number of seconds, got {value!r:.80}")
        if not (0 <= self.backoff <= self.max_backoff < math.inf):
            raise ConfigurationError(
                f"backoff ({self.backoff!r} s) and max_backoff ({self.max_backoff!r} s) must be finite, "
                "with 0 <= backoff <= max_backoff"
            )

    def delay(self, retry: int) -> float:
        """Return the seconds to wait before the ``retry``-th retry (1 for the first)."""
        base: float = min(self.backoff * 2.0 ** min(retry - 1, 32), self.max_backoff)
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security


@dataclass(slots=True)
class _Entry:
    """The cached lookup of one function."""

    instances: list[DeploymentInfo]
    local: list[DeploymentInfo]
    """The instances on this caller's host, for ``prefer_local``."""
    expires: float
    vanished_at: float | None = None
    """The time.monotonic() at which lookups began to return none of ``instances``. Calls still go to them."""


class _Call:
    """One logical call across its attempts."""

    __slots__ = (
        "attempted",
        "attempts",
        "busy",
        "deadline",
        "endpoints",
        "excluded",
        "failures",
        "idempotent",
        "instances",
        "last_uncertain",
        "observation",
        "refreshed",
        "request",
        "signer",
        "strategy",
        "too_large",
        "uncertain",
    )

    def __init__(
        self,
        request: CallRequest,
        deadline: float,
        idempotent: bool | None,
        strategy: Balancing,
        signer: Callable[[], str] | None,
    ) -> None:
        self.request = request
        self.deadline = deadline
        self.idempotent = idempotent
        """Whether the caller marked the call idempotent; None takes what each instance registered."""
        self.strategy = strategy
        self.signer = signer
        self.attempts = 0
        """Attempts sent, or begun, to an instance."""
        self.instances: list[DeploymentInfo] = []
        """The instances of the lookup the last pick was made from. A concurrent call may have dropped
        that lookup from the cache since, so an error that names them reads them here."""
        self.uncertain = 0
        """Attempts that ended in an uncertain failure."""
        self.last_uncertain: PikkuMQError | None = None
        # Created on the first failure, so that a call that succeeds at once allocates none of them.
        self.attempted: set[str] | None = None
        """Instances that failed this call; the next attempt prefers the others."""
        self.excluded: set[str] | None = None
        """Instances that certainly cannot take this call; a retry never goes to them."""
        self.endpoints: dict[str, str] | None = None
        """The endpoint of each instance that failed this call, by deployment id."""
        self.failures: list[str] | None = None
        self.busy: Reply | None = None
        self.too_large: PayloadTooLargeError | None = None
        self.refreshed = False
        self.observation: CallObservation | None = None
        """The call's span and metrics, or None when neither tracing nor metrics record it."""

    def failed_on(self, instance: DeploymentInfo, reason: str | None, *, exclude: bool) -> None:
        """Record a failure of this call on an instance; ``exclude`` keeps retries away from it."""
        deployment_id = instance.deployment_id
        if self.attempted is None:
            self.attempted = set()
            self.endpoints = {}
        self.attempted.add(deployment_id)
        assert self.endpoints is not None
        self.endpoints[deployment_id] = instance.endpoint
        if exclude:
            if self.excluded is None:
                self.excluded = set()
            self.excluded.add(deployment_id)
        if reason is not None:
            if self.failures is None:
                self.failures = []
            self.failures.append(f"{deployment_id}: {reason}")

    def forget_replaced(self, instances: list[DeploymentInfo]) -> None:
        """Let the call try an id that failed it again where ``instances`` show it at another endpoint.

        Another endpoint under the id is another process, which registered after the one that failed.
        """
        if not self.endpoints or self.attempted is None:
            return
        for instance in instances:
            failed_at = self.endpoints.get(instance.deployment_id)
            if failed_at is not None and failed_at != instance.endpoint:
                self.attempted.discard(instance.deployment_id)
                if self.excluded is not None:
                    self.excluded.discard(instance.deployment_id)

    def is_idempotent_on(self, instance: DeploymentInfo) -> bool:
        """Return whether the call may run twice on ``instance``: the caller's flag, else the instance's."""
        return self.idempotent if self.idempotent is not None else instance.idempotent


class _UncertainFailure(Exception):
    """An attempt that may have run the function and produced no result; ``error`` is the cause."""

    def __init__(self, error: PikkuMQError) -> None:
        super().__init__(error.message)
        self.error = error


class _OutOfTime(Exception):
    """The call's deadline passed before the next attempt could be sent."""


class Router:
    """Sends calls to live instances, looking them up through ``lookup`` at most once per ``cache_ttl``.

    ``balancing`` is the strategy of every call, unless ``function_balancing`` maps the function's
    name to another one or the call names its own. ``retry`` sets how idempotent calls are retried and
    ``ejection`` when failing instances are taken out of routing. ``hostname`` is this caller's host
    name, which ``prefer_local`` compares with the host names that instances registered.
    ``suspect_ttl`` (seconds) is the longest an instance stays out of routing after failures, and how
    long a draining or departed instance is kept out of lookups.
    """

    def __init__(
        self,
        lookup: Lookup,
        transports: TransportSet,
        *,
        cache_ttl: float,
        suspect_ttl: float,
        balancing: str = "round_robin",
        function_balancing: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
        ejection: EjectionPolicy | None = None,
        hostname: str = "",
    ) -> None:
        self._lookup = lookup
        self.transports = transports
        self._cache_ttl = cache_ttl
        self.balancing: Balancing = check_balancing(balancing)
        self.function_balancing = check_function_balancing(function_balancing)
        self.retry = retry if retry is not None else RetryPolicy()
        ejection = ejection if ejection is not None else EjectionPolicy()
        self._suspect_ttl = max(suspect_ttl, ejection.base_interval)
        self.hostname = hostname
        self._outliers = OutlierDetector(ejection, self._suspect_ttl)
        self._balancer = Balancer(self._outliers)
        self._entries: dict[str, _Entry] = {}
        self._pending: dict[str, asyncio.Task[_Entry]] = {}
        self._discovery_failures = RepeatedFailureLog(logger)
        self._departed: dict[str, tuple[float, str]] = {}
        """Deployment ids that the change feed reported draining or gone, with when to stop filtering them out."""
        self._in_flight: dict[str, dict[asyncio.Task[Any], float]] = {}
        """The tasks with an attempt in flight, by deployment id, with the time.monotonic() each attempt began."""
        self._aborted: dict[asyncio.Task[Any], str] = {}
        """Tasks whose attempt :meth:`_abort_in_flight` cancelled, with the reason, until the attempt ends."""
        self._busy: dict[str, float] = {}
        """Deployment ids whose presence heartbeat reported a blocked event loop, with when to forget it."""
        self.security: RemoteSecurity | None = None
        """With a remote secret, every attempt carries a token of its own, with the caller's session."""
        self.telemetry: Telemetry | None = None
        """Traces and counts calls when tracing or metrics are on; None costs nothing per call."""

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

    def is_ejected(self, deployment_id: str) -> bool:
        """Return whether this caller has taken the instance out of routing after failures."""
        return self._outliers.is_ejected(deployment_id)

    def load(self, deployment_id: str) -> int:
        """Return the load that ``least_loaded`` compares: the reported calls in flight plus this caller's own."""
        return self._balancer.load(deployment_id)

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
        self._drop_cached(deployment_id, endpoint)
        self._balancer.forget(deployment_id)
        logger.debug("change feed: %s left", deployment_id)

    def _drop_cached(self, deployment_id: str, endpoint: str = "") -> None:
        """Remove an instance from the cached lookups, so calls reach it again only if a lookup returns it."""
        for entry in self._entries.values():
            remaining = [i for i in entry.instances if not _same_instance(i, deployment_id, endpoint)]
            if len(remaining) != len(entry.instances):
                entry.instances = remaining
                entry.local = [i for i in entry.local if not _same_instance(i, deployment_id, endpoint)]
                if not remaining:
                    entry.expires = 0.0  # look again on the next call rather than report nothing

    def instance_joined(self, deployment_id: str) -> None:
        """Look every function up again on its next call, since the new instance may host it."""
        self._departed.pop(deployment_id, None)
        self._outliers.forget(deployment_id, registered_again=True)
        self._expire_all()
        logger.debug("change feed: %s joined", deployment_id)

    def instance_alive(self, deployment_id: str, in_flight: int | None = None) -> None:
        """Record a presence heartbeat: the instance's load, and that it is alive after a leave.

        Taking the instance back after a leave heals a stale or forged leave.
        """
        if in_flight is not None:
            self._balancer.report_load(deployment_id, in_flight)
        if self._departed.pop(deployment_id, None) is not None:
            self._expire_all()
            logger.debug("change feed: %s is alive again", deployment_id)

    def instance_busy(self, deployment_id: str, busy: bool) -> None:
        """Record whether an instance reported a blocked event loop in its latest presence heartbeat.

        Calls go to the other instances while any of them can take the call, since a call to a blocked
        instance waits until its loop is free. The mark lasts until a heartbeat without it, or
        ``suspect_ttl`` at most.
        """
        if busy:
            self._busy[deployment_id] = time.monotonic() + self._suspect_ttl
        else:
            self._busy.pop(deployment_id, None)

    def resync(self) -> None:
        """Look every function up again and put every instance back in routing, after a gap in the change feed.

        The feed comes back when this caller's connection to the broker or the store does. Instances
        ejected while that connection was down failed because of it, and after a long outage their
        ejection interval has grown to its maximum, so they would stay out of routing long after the
        broker is back.
        """
        self._departed.clear()
        self._outliers.forget_all()
        self._expire_all()

    def _expire_all(self) -> None:
        # Expired entries stay, so calls can still route from them while discovery is down.
        for entry in self._entries.values():
            entry.expires = 0.0

    # -- calling -----------------------------------------------------------------------------------

    async def call(
        self,
        name: str,
        data: Any,
        *,
        deadline: float,
        trace_id: str | None,
        hop: int,
        idempotent: bool | None,
        session: Any = None,
        balancing: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Call ``name`` on a live instance and return its result, or raise the error it returned.

        ``idempotent=None`` retries the call after an uncertain failure when the instance that failed
        registered the function as idempotent. A call whose deadline has already passed is not
        started. ``balancing`` overrides the strategy for this call. ``session`` travels only when a
        remote secret is set, sealed in each attempt's token. ``headers`` travel with every attempt,
        under the metadata headers.
        """
        if deadline <= time.monotonic():
            raise DeadlineExceededError(
                f"call to '{name}' was not started because its deadline had already passed",
                payload={"function": name, "attempts": 0},
            )
        call_id, random_trace_id = _random_ids()
        observation = self.telemetry.observe_call(name, call_id) if self.telemetry is not None else None
        if trace_id is None and observation is not None:
            trace_id = observation.trace_id  # log records then name the trace of the spans
        request = CallRequest(
            name=name,
            data=data,
            headers={
                HEADER_REQUEST_ID: trace_id or random_trace_id,
                HEADER_CALL_ID: call_id,
                HEADER_HOP: str(hop),
            },
        )
        if headers:
            request.headers = {**headers, **request.headers}
        signer = self.security.signer(name, data, session) if self.security is not None else None
        call = _Call(request, deadline, idempotent, self._strategy(name, balancing), signer)
        if observation is None:
            return await self._run(call)
        call.observation = observation
        return await observation.run(lambda: self._run(call))

    async def _run(self, call: _Call) -> Any:
        """Send the attempts of ``call`` until one returns a result or the call fails."""
        name = call.request.name
        while True:
            entry = self._cached_entry(name)
            if entry is not None and call.attempted is None:
                # The common case, as _choose picks it, without a coroutine: a fresh lookup and no failure yet.
                call.instances = entry.instances
                instance = self._pick_not_busy(name, entry, call.strategy, None)
                if instance is None:
                    instance = self._pick_ejected(name, entry, call, None)
            else:
                instance = await self._choose(call, entry)
            if instance is None:
                raise self._no_instance(call)

            uncertain: PikkuMQError | None = None
            try:
                if call.observation is None:
                    reply = await self._attempt(instance, call)
                else:
                    reply = await call.observation.attempt(self._attempt, instance, call, call.attempts + 1)
            except EndpointUnreachableError as exc:
                call.failed_on(instance, str(exc), exclude=True)
                continue
            except PayloadTooLargeError as exc:
                call.too_large = exc  # another instance may have an endpoint that carries it
                call.failed_on(instance, None, exclude=True)
                continue
            except _UncertainFailure as failure:
                uncertain = failure.error
            except _OutOfTime:
                call.attempts -= 1  # nothing was sent
                if call.last_uncertain is not None:
                    # The backoff before this retry ended at the deadline: the failure that needed it is the cause.
                    raise _with_attempts(
                        call.last_uncertain, call, "no time left for another attempt before the deadline"
                    ) from None
                raise _with_attempts(
                    DeadlineExceededError(f"call to '{name}' ran out of time before it could be sent"), call
                ) from None

            if uncertain is not None:
                # Outside the except block, so that the error raised here does not chain the internal one.
                call.failed_on(instance, f"{type(uncertain).__name__}: {uncertain}", exclude=False)
                await self._wait_for_retry(call, uncertain, instance)
                continue
            if reply.rejected:
                # The worker declined the call before running it: draining, or busy.
                call.busy = reply if _is_busy(reply) else call.busy
                call.failed_on(instance, None, exclude=True)
                continue
            if 200 <= reply.status < 300:
                return reply.body
            raise _error(reply)

    async def notify(
        self,
        name: str,
        data: Any,
        *,
        deadline: float,
        trace_id: str | None,
        hop: int,
        session: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Hand a one-way call of ``name`` to a live instance's endpoint, and return once it took the call.

        An instance that certainly did not take it (unreachable, no durable one-way calls on its
        broker, draining) is skipped for the next one, as for :meth:`call`. A failure after which
        the call may have been taken (no acknowledgement in time, a connection lost) is raised and
        not retried, because the call might then run twice.
        """
        if deadline <= time.monotonic():
            raise DeadlineExceededError(f"one-way call to '{name}' was not started because its deadline had passed")
        request = CallRequest(
            name=name,
            data=data,
            headers={
                **(headers or {}),
                HEADER_REQUEST_ID: trace_id or os.urandom(16).hex(),
                HEADER_CALL_ID: os.urandom(16).hex(),
                HEADER_HOP: str(hop),
                HEADER_ONE_WAY: "1",
            },
        )
        signer = self.security.signer(name, data, session) if self.security is not None else None
        call = _Call(request, deadline, False, self._strategy(name, None), signer)
        while True:
            instance = await self._choose(call)
            if instance is None:
                raise self._no_instance(call)
            call.attempts += 1
            try:
                reply = await self._notify_once(instance, call)
            except EndpointUnreachableError as exc:
                call.failed_on(instance, str(exc), exclude=True)
                continue
            except PayloadTooLargeError as exc:
                call.too_large = exc
                call.failed_on(instance, None, exclude=True)
                continue
            if reply.rejected:
                call.busy = reply if _is_busy(reply) else call.busy
                call.failed_on(instance, None, exclude=True)
                continue
            if not 200 <= reply.status < 300:
                raise _error(reply)
            return

    async def _notify_once(self, instance: DeploymentInfo, call: _Call) -> Reply:
        """Offer a one-way call to the endpoints of ``instance`` in order, and return the first acceptance."""
        request = call.request
        failure: EndpointUnreachableError | PayloadTooLargeError | None = None
        for endpoint in self._endpoints_for(instance):
            transport = self.transports.for_endpoint(endpoint)
            assert transport is not None  # _endpoints_for only returns endpoints with a transport
            budget = call.deadline - time.monotonic()
            if budget <= 0:
                raise DeadlineExceededError(f"one-way call to '{request.name}' ran out of time before it was taken")
            if call.signer is not None:
                request.headers[AUTHORIZATION_HEADER] = call.signer()
            try:
                return await transport.notify(endpoint, request, budget)
            except (EndpointUnreachableError, PayloadTooLargeError) as exc:
                logger.debug("%s did not take the one-way call to %s: %s", endpoint, request.name, exc)
                failure = exc
        assert failure is not None
        raise failure

    def _strategy(self, name: str, balancing: str | None) -> Balancing:
        if balancing is not None:
            return check_balancing(balancing)
        if self.function_balancing:
            return self.function_balancing.get(name, self.balancing)
        return self.balancing

    async def _choose(self, call: _Call, cached: _Entry | None = None) -> DeploymentInfo | None:
        """Pick the instance for the next attempt of ``call``, or return None if none is left.

        ``cached`` is the lookup that :meth:`_cached_entry` has just returned for the call's function, if any.
        """
        name = call.request.name
        entry = cached if cached is not None else await self._entry(name, call.deadline)
        call.instances = entry.instances
        instance = self._pick_not_busy(name, entry, call.strategy, call.attempted)
        if instance is not None:
            return instance
        if call.attempted is None:
            # Every instance is out of routing, so the call goes to one of them anyway. An instance that
            # refuses fails the call at once, and a silent one fails it by its deadline, as without
            # ejection. One that replies again is used at once.
            return self._pick_ejected(name, entry, call, None)

        if not call.refreshed:
            # Every cached instance failed this call; the registry may know of newer ones.
            call.refreshed = True
            entry.expires = 0.0
            entry = await self._entry(name, call.deadline)
            call.forget_replaced(entry.instances)
            call.instances = entry.instances
            instance = self._pick_not_busy(name, entry, call.strategy, call.attempted)
            if instance is not None:
                return instance
        if call.uncertain:
            # A retry after an uncertain failure may go to an instance that was tried, even the only one.
            # It also goes to one out of routing when no other can take it, because the worker's
            # de-duplication makes the retry safe there. The first attempt may have failed only because
            # the instance is slow.
            instance = self._pick_not_busy(name, entry, call.strategy, call.excluded)
            if instance is None:
                instance = self._pick_ejected(name, entry, call, call.excluded)
            return instance
        return None

    def _pick_not_busy(
        self, name: str, entry: _Entry, strategy: Balancing, exclude: set[str] | None
    ) -> DeploymentInfo | None:
        """Pick an instance that did not report a blocked event loop, or any instance if none of those can take it."""
        if self._busy:
            now = time.monotonic()
            self._busy = {i: until for i, until in self._busy.items() if until > now}
            if self._busy:
                avoid = self._busy.keys() | exclude if exclude else set(self._busy)
                instance = self._balancer.pick(name, entry.instances, entry.local, strategy, avoid)
                if instance is not None:
                    return instance
        return self._balancer.pick(name, entry.instances, entry.local, strategy, exclude)

    def _pick_ejected(self, name: str, entry: _Entry, call: _Call, exclude: set[str] | None) -> DeploymentInfo | None:
        """Pick among the instances that are out of routing, for a call that no usable instance can take."""
        if not entry.instances:
            return None
        instance = self._balancer.pick(name, entry.instances, entry.local, call.strategy, exclude, ignore_ejection=True)
        if instance is not None:
            logger.debug(
                "every instance of %s is out of routing; sending the call to %s anyway",
                name[:200],
                instance.deployment_id,
            )
        return instance

    async def _attempt(self, instance: DeploymentInfo, call: _Call) -> Reply:
        """Send one attempt to ``instance``, record its outcome for balancing and ejection, and return the reply.

        Raise :class:`EndpointUnreachableError` or :class:`PayloadTooLargeError` when the instance
        could not take the call, and :class:`_UncertainFailure` when the function may have run without a result.
        """
        call.attempts += 1
        deployment_id = instance.deployment_id
        now = time.monotonic()
        self._outliers.begin(deployment_id, now)
        self._balancer.started(deployment_id)
        task = asyncio.current_task()
        assert task is not None
        flights = self._in_flight.get(deployment_id)
        if flights is None:
            flights = self._in_flight[deployment_id] = {}
        flights[task] = now
        try:
            try:
                reply = await self._send(instance, call)
            except asyncio.CancelledError:
                reason = self._aborted.pop(task, None)
                if reason is None or task.uncancel() > 0:
                    raise  # cancelled by the application, perhaps as well
                raise _UncertainFailure(
                    TransportError(
                        f"instance {deployment_id} became unreachable while the call was in flight: {reason}"
                    )
                ) from None
            self._judge(deployment_id, reply)
            return reply
        except EndpointUnreachableError as exc:
            self._outliers.failed(deployment_id, f"unreachable: {exc}", eject_now=True)
            if deployment_id in self._in_flight:
                asyncio.get_running_loop().call_later(_ABORT_GRACE, self._abort_in_flight, deployment_id, str(exc), now)
            raise
        except _UncertainFailure as failure:
            self._outliers.failed(deployment_id, f"{type(failure.error).__name__}: {failure.error}")
            raise
        except (TransportError, ProtocolError, DeadlineExceededError) as exc:
            self._outliers.failed(deployment_id, f"{type(exc).__name__}: {exc}")
            raise _UncertainFailure(exc) from exc
        finally:
            del flights[task]
            if not flights and self._in_flight.get(deployment_id) is flights:
                del self._in_flight[deployment_id]
            if self._aborted:
                self._aborted.pop(task, None)
            self._balancer.finished(deployment_id)
            self._outliers.release(deployment_id)

    def _abort_in_flight(self, deployment_id: str, reason: str, before: float) -> None:
        """End the attempts to an instance that began before ``before``, once another found it unreachable.

        Its process is gone (or its queue or subscription is), and the broker drops the requests it
        held for it, so those attempts would wait for their deadline. Each one's task is cancelled, and
        the attempt ends as an uncertain failure. A draining NATS worker also leaves its subscription,
        and finishes the calls it has: the router waits ``_ABORT_GRACE`` for the draining event, which
        travels on another connection, and keeps the attempts to an instance that announced it.
        """
        flights = self._in_flight.get(deployment_id)
        if not flights or deployment_id in self._departed:
            return
        for task, began in list(flights.items()):
            if began < before and task not in self._aborted and not task.done():
                self._aborted[task] = reason
                task.cancel()
        logger.debug("ended the attempts in flight to %s, which is unreachable: %s", deployment_id, reason)

    def _judge(self, deployment_id: str, reply: Reply) -> None:
        """Record a reply for ejection, or raise :class:`_UncertainFailure` for a reply without the function's result.

        A draining worker is taken out of routing, and any other reply counts as the instance responding.
        """
        if reply.status < 500 and not reply.rejected:
            self._outliers.succeeded(deployment_id)  # the common case, which _uncertain_reply would pass
            return
        failure = _uncertain_reply(reply)
        if failure is not None:
            raise _UncertainFailure(failure)
        if not reply.rejected or _is_busy(reply):
            self._outliers.succeeded(deployment_id)
        elif _rejected_by(reply) in (None, deployment_id):
            # Workers that share a NATS queue group share a subject, so the rejection may come from
            # another one: only the instance that rejected is taken out.
            self._outliers.failed(deployment_id, "it is draining", eject_now=True, level=logging.INFO)
            # A draining worker deregistered before it rejected anything, so only a lookup made before
            # that still lists it. Dropping it from the cache also stops the probe that would follow
            # the ejection: it could reach the worker just as it closes its connections, and a plain
            # call lost there may or may not have run. A restart under the same id is routed to again
            # once a lookup returns it.
            self._drop_cached(deployment_id)

    async def _send(self, instance: DeploymentInfo, call: _Call) -> Reply:
        """Send the call to the endpoints of ``instance`` in order until one carries it, and return the reply.

        A fallback endpoint takes the call when the preferred one is unreachable (broker down, no
        responders, unroutable) or cannot carry a payload this large.
        """
        request = call.request
        unreachable: EndpointUnreachableError | None = None
        too_large: PayloadTooLargeError | None = None
        for endpoint in self._endpoints_for(instance):
            transport = self.transports.for_endpoint(endpoint)
            assert transport is not None  # _endpoints_for only returns endpoints with a transport

            # The seconds this attempt may take, zero or less once the deadline has passed.
            budget = call.deadline - time.monotonic()
            attempt_timeout = self.retry.attempt_timeout
            if attempt_timeout is not None and attempt_timeout < budget and call.is_idempotent_on(instance):
                budget = attempt_timeout
            if budget <= 0:
                raise _OutOfTime
            # A worker rejects 0 ms and values of more than MAX_DEADLINE_DIGITS digits as malformed.
            milliseconds = int(budget * 1000)
            if not 0 < milliseconds <= _MAX_DEADLINE_MS:
                milliseconds = min(_MAX_DEADLINE_MS, max(1, milliseconds))
            request.headers[HEADER_DEADLINE] = str(milliseconds)
            if call.signer is not None:
                request.headers[AUTHORIZATION_HEADER] = call.signer()  # a fresh token id for each attempt
            if call.observation is not None:
                call.observation.sending(endpoint, request.headers)

            try:
                return await transport.call(endpoint, request, budget)
            except EndpointUnreachableError as exc:
                extra = _log_extra(call, instance.deployment_id)
                logger.debug("instance %s is unreachable at %s: %s", instance.deployment_id, endpoint, exc, extra=extra)
                unreachable = exc
            except PayloadTooLargeError as exc:
                extra = _log_extra(call, instance.deployment_id)
                logger.debug("%s cannot carry the call to %s: %s", endpoint, request.name, exc, extra=extra)
                too_large = exc

        if too_large is not None:
            raise too_large  # the instance may be up, but no endpoint of it can carry this payload
        assert unreachable is not None  # every endpoint raised one of the two
        raise unreachable

    async def _wait_for_retry(self, call: _Call, error: PikkuMQError, instance: DeploymentInfo) -> None:
        """Wait before the next attempt after an uncertain failure on ``instance``, or raise if no retry is allowed."""
        call.uncertain += 1
        call.last_uncertain = error
        name = call.request.name
        if time.monotonic() >= call.deadline:
            raise _with_attempts(error, call)
        if not call.is_idempotent_on(instance):
            if call.idempotent is None:
                reason = (
                    f"not retried, because instance {instance.deployment_id} did not register '{name}' as idempotent"
                )
            else:
                reason = f"not retried, because '{name}' is not marked idempotent=True"
            raise _with_attempts(error, call, reason)
        if call.uncertain >= self.retry.max_attempts:
            raise _with_attempts(error, call, f"the limit of {self.retry.max_attempts} attempts")

        delay = self.retry.delay(call.uncertain)
        if time.monotonic() + delay >= call.deadline:
            raise _with_attempts(error, call, "no time left for another attempt before the deadline")
        logger.debug(
            "call to %s failed after it may have run, retrying in %.3f s (idempotent): %s",
            name,
            delay,
            error,
            extra=_log_extra(call, instance.deployment_id),
        )
        await asyncio.sleep(delay)

    # -- lookups -----------------------------------------------------------------------------------

    async def _pick(self, name: str, tried: set[str], deadline: float | None = None) -> DeploymentInfo | None:
        """Return the instance the default strategy picks for ``name``, skipping ``tried``."""
        entry = await self._entry(name, deadline)
        return self._balancer.pick(name, entry.instances, entry.local, self.balancing, tried)

    async def _instances(self, name: str, deadline: float | None = None) -> list[DeploymentInfo]:
        return (await self._entry(name, deadline)).instances

    def _cached_entry(self, name: str) -> _Entry | None:
        """Return the cached lookup of ``name`` and count the cache hit, or None if there is none or it has expired."""
        entry = self._entries.get(name)
        if entry is None or entry.expires <= time.monotonic():
            return None
        telemetry = self.telemetry
        if telemetry is not None and telemetry.metrics is not None:
            telemetry.metrics.cache_hits.labels(name).inc()
        return entry

    async def _entry(self, name: str, deadline: float | None = None) -> _Entry:
        cached = self._cached_entry(name)
        if cached is not None:
            return cached
        entry = self._entries.get(name)
        telemetry = self.telemetry
        if telemetry is not None and telemetry.metrics is not None:
            telemetry.metrics.cache_misses.labels(name).inc()

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

    def _lookup_done(self, name: str, task: asyncio.Task[_Entry]) -> None:
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

    async def _fresh_or_stale(self, name: str, entry: _Entry | None) -> _Entry:
        """Look ``name`` up again; while the store fails, keep routing with the last lookup, if any.

        Refused connections still drop dead instances from a stale lookup, so keeping it is safer
        than failing every call while discovery is away.
        """
        try:
            found = [i for i in await self._lookup_translated(name) if self._usable(i)]
        except DiscoveryError as exc:
            if entry is None or not entry.instances:
                raise
            self._discovery_failures.failed(
                logging.WARNING, "discovery failed, routing from the last lookups until it is back: %s", exc
            )
            entry.expires = time.monotonic() + min(self._cache_ttl, _STALE_RETRY)
            return entry

        if self._discovery_failures.failing:
            logger.info("discovery is back after %d failed lookups", self._discovery_failures.recovered())
        if not found and entry is not None and entry.instances and self._keep_vanished(name, entry):
            return entry
        for instance in found:
            if instance.in_flight is not None:
                self._balancer.report_load(instance.deployment_id, instance.in_flight)
        if entry is not None:
            self._forget_replaced(entry.instances, found)
        ttl = self._cache_ttl if found else min(self._cache_ttl, _EMPTY_RESULT_TTL)
        local = [i for i in found if is_local(i, self.hostname)]
        fresh = self._entries[name] = _Entry(found, local, time.monotonic() + ttl)
        return fresh

    def _forget_replaced(self, before: list[DeploymentInfo], found: list[DeploymentInfo]) -> None:
        """Put back in routing the instances that a lookup finds under a known id at another endpoint.

        Another endpoint means another process, which registered after the one that failed, so it counts
        as a join where the store has no change feed to announce it.
        """
        endpoints = {i.deployment_id: i.endpoint for i in before}
        for instance in found:
            endpoint = endpoints.get(instance.deployment_id)
            if endpoint is not None and endpoint != instance.endpoint:
                self._outliers.forget(instance.deployment_id, registered_again=True)

    def _keep_vanished(self, name: str, entry: _Entry) -> bool:
        """Keep routing to instances that vanished from the registry all at once without leaving or failing.

        A store that restarts empty or loses its rows drops every registration at once, and each
        worker writes its own again with its next heartbeat. Until then the empty lookup is wrong, and
        trusting it would fail calls with not-found while the instances serve. An instance that really
        left announces it where a change feed or presence carries events, and otherwise rejects or
        refuses the next call, which takes it out of routing. Return whether to keep routing with
        ``entry``: False when each of its instances is out of routing, or once they have been absent
        for ``suspect_ttl`` seconds.
        """
        if all(self._outliers.is_ejected(i.deployment_id) for i in entry.instances):
            return False
        now = time.monotonic()
        if entry.vanished_at is None:
            entry.vanished_at = now
            logger.info(
                "every instance of %s vanished from the registry without leaving; routing to them for up to "
                "%.1f s while they register again",
                name[:200],
                self._suspect_ttl,
            )
        if now - entry.vanished_at >= self._suspect_ttl:
            return False
        entry.expires = now + min(self._cache_ttl, _STALE_RETRY)
        return True

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

    def _endpoints_for(self, instance: DeploymentInfo) -> Sequence[str]:
        if not instance.fallback_endpoints and self.transports.supports(instance.endpoint):
            return (instance.endpoint,)  # the common case, without building the candidates
        endpoints = [e for e in (instance.endpoint, *instance.fallback_endpoints) if self.transports.supports(e)]
        if not endpoints:
            raise RoutingError(f"no transport for any endpoint of instance '{instance.deployment_id}'")
        return endpoints

    def _no_instance(self, call: _Call) -> PikkuMQError:
        if call.too_large is not None:
            return call.too_large
        if call.busy is not None:
            return _error(call.busy)  # every instance that was tried is busy: its BusyError
        if call.last_uncertain is not None:
            # A retry found no instance left to take it, so the failure that needed the retry is the cause.
            return _with_attempts(call.last_uncertain, call, "no instance left to retry on")
        name = call.request.name
        if call.attempted:
            # The transports' reasons show what to fix, for example a broker URL that refuses connections.
            tried = sorted(call.attempted)
            failures = (call.failures or [])[-3:]
            reasons = f": {'; '.join(failures)}" if failures else ""
            return RoutingError(
                f"no instance could take the call to '{name}'; tried {', '.join(tried)}{reasons}",
                payload={"function": name, "tried": tried, "failures": failures, "attempts": call.attempts},
            )
        # Nothing hosts it: the same not-found error as for a hidden function, which rpc.exposed relies on.
        return function_not_found(name)


def _with_attempts(error: PikkuMQError, call: _Call, note: str = "") -> PikkuMQError:
    """Add the attempts of ``call`` to the message and payload of the error that ends it, and return the error."""
    instances = sorted(call.attempted) if call.attempted else []
    count = call.attempts
    summary = f"{count} attempt{'s' if count != 1 else ''}"
    if instances:
        summary += f" on {', '.join(instances)}"
    if note:
        summary += f"; {note}"
    error.message = f"{error.message} ({summary})"
    error.args = (error.message,)

    details = {"function": call.request.name, "attempts": count, "instances": instances}
    error.payload = {**error.payload, **details} if isinstance(error.payload, dict) else details
    return error


def _log_extra(call: _Call, deployment_id: str) -> dict[str, str]:
    """Return the ``extra`` fields of a log record about an attempt of ``call`` to ``deployment_id``."""
    headers = call.request.headers
    return call_extra(headers[HEADER_CALL_ID], headers[HEADER_REQUEST_ID], call.request.name, deployment_id)


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


def _uncertain_reply(reply: Reply) -> PikkuMQError | None:
    """Return the error of a reply that gives no result of the function although it may have run, else None.

    That is a 5xx reply without a pikku_mq error envelope, from a proxy or gateway in front of the
    worker. It is also the worker's own report that it gave up on the function, because it stopped
    mid-call (``CallInterruptedError``) or the deadline it was given passed (``DeadlineExceededError``),
    which names the worker in the payload. The same errors without that name come from the function,
    which let a nested call's error through: it ran and failed, so they are its result.
    """
    if reply.status < 500 or reply.rejected:
        return None
    body = reply.body
    if not (isinstance(body, dict) and isinstance(body.get("name"), str)):
        return error_from_envelope(reply.status, body)  # a ProtocolError
    if body.get("code") in _UNCERTAIN_REPLY_CODES:
        payload = body.get("payload")
        if isinstance(payload, dict) and "deployment_id" in payload:
            return error_from_envelope(reply.status, body)
    return None


def _error(reply: Reply) -> PikkuMQError:
    return error_from_envelope(reply.status, reply.body)
