"""The serving side, shared by every transport: admit a call, run the function, account for it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any

import pydantic_core

from ._dedup import (
    DEFAULT_DEDUP_MAX_BYTES,
    DEFAULT_DEDUP_MAX_ENTRIES,
    DEFAULT_DEDUP_WINDOW,
    MAX_CALL_ID_LENGTH,
    CallRecords,
    Claim,
    fingerprint,
    is_final,
)
from ._durable import HEADER_EVENT_ID, trace_headers
from ._errors import (
    BadRequestError,
    BusyError,
    CallInterruptedError,
    ConfigurationError,
    DeadlineExceededError,
    InternalServerError,
    LoopDetectedError,
    OutputValidationError,
    PikkuMQError,
    ServiceUnavailableError,
    UnauthorizedError,
    check_seconds,
    function_not_found,
)
from ._functions import FunctionDefinition, FunctionRegistry
from ._logs import RepeatedFailureLog, call_extra
from ._rpc import TracedDeploymentService, Wire, start_function
from ._security import AUTHORIZATION_HEADER, RemoteSecurity
from ._telemetry import UNKNOWN_FUNCTION, Telemetry
from ._types import (
    DEFAULT_TIMEOUT,
    HEADER_CALL_ID,
    HEADER_DEADLINE,
    HEADER_HOP,
    HEADER_REQUEST_ID,
    MAX_DEADLINE_DIGITS,
    MAX_HOP_DIGITS,
    MAX_HOPS,
)

if TYPE_CHECKING:
    from .backends.base import DeploymentService

__all__ = ["DEFAULT_MAX_CONCURRENCY", "DEFAULT_MAX_IN_FLIGHT", "Admitted", "Dispatcher", "Outcome", "header_count"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_CONCURRENCY = 100
"""Functions a worker runs at once by default; further admitted calls wait for a free slot."""

DEFAULT_MAX_IN_FLIGHT = 1000
"""Calls a worker accepts at once by default, running or waiting; past it, it replies busy."""

_GAVE_UP_CODES = frozenset({CallInterruptedError.code, DeadlineExceededError.code})
"""Codes of the errors with which a worker reports that it gave up on a call, naming itself in the payload."""


class Admitted:
    """A call that passed admission: its function and the wire it runs with."""

    __slots__ = ("definition", "wire")

    def __init__(self, definition: FunctionDefinition, wire: Wire) -> None:
        self.definition = definition
        self.wire = wire


class Outcome:
    """The result of serving one call, ready for a transport to encode.

    Either ``error`` is set, or ``definition`` and ``result`` are. ``rejected`` marks a call that was
    declined before its function started. ``encoded`` is the result already serialised to JSON, as
    kept for the retries of an idempotent call.
    """

    __slots__ = ("definition", "encoded", "error", "rejected", "result")

    def __init__(
        self,
        *,
        definition: FunctionDefinition | None = None,
        result: Any = None,
        error: PikkuMQError | None = None,
        rejected: bool = False,
        encoded: bytes | None = None,
    ) -> None:
        self.definition = definition
        self.result = result
        self.error = error
        self.rejected = rejected
        self.encoded = encoded

    def encode_json(self) -> tuple[int, bytes]:
        """Return the HTTP status and JSON body; a result that cannot be serialised becomes a 500."""
        if self.encoded is not None:
            return 200, self.encoded
        if self.error is None:
            assert self.definition is not None
            try:
                return 200, self.definition.dump_json(self.result)
            except OutputValidationError as exc:
                self.error = exc
        return self.error.http_status, json.dumps(self.error.to_envelope()).encode()

    def encode_python(self) -> tuple[int, Any]:
        """Return the status and a JSON-compatible body (for msgpack and the in-memory transport)."""
        if self.encoded is not None:
            # The same parser as dump_python, so a recorded result reads back as a fresh one does.
            return 200, pydantic_core.from_json(self.encoded)
        if self.error is None:
            assert self.definition is not None
            try:
                return 200, self.definition.dump_python(self.result)
            except OutputValidationError as exc:
                self.error = exc
        return self.error.http_status, self.error.to_envelope()


class Dispatcher:
    """Runs exposed functions for the transports and tracks the calls in flight for draining.

    At most ``max_concurrency`` functions run at once, and admitted calls beyond that wait for a slot
    (within their deadline), so one slow function never holds up the calls behind it on a connection.
    At most ``max_in_flight`` calls are held at once, running or waiting. A call past that limit is
    declined at once with :class:`BusyError`, which the caller's router takes as a cue to try another
    instance.

    Calls to functions declared ``idempotent=True`` are de-duplicated by their ``pikku-call-id``
    (see :mod:`pikku_mq._dedup`): a retry of a call that runs or ran here lately gets that call's
    reply instead of running the function again. Replies are kept for ``dedup_window`` seconds, at
    most ``dedup_max_entries`` of them and ``dedup_max_bytes`` of encoded replies, the oldest dropped
    first. ``dedup_window=0`` turns de-duplication off.
    """

    def __init__(
        self,
        registry: FunctionRegistry,
        *,
        services: Any = None,
        deployment_service: DeploymentService | None = None,
        deployment_id: str = "",
        default_timeout: float = DEFAULT_TIMEOUT,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        security: RemoteSecurity | None = None,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        dedup_max_entries: int = DEFAULT_DEDUP_MAX_ENTRIES,
        dedup_max_bytes: int = DEFAULT_DEDUP_MAX_BYTES,
    ) -> None:
        if not 0 <= dedup_window < float("inf"):
            raise ConfigurationError(
                f"dedup_window must be a finite number of seconds, 0 or more, got {dedup_window!r}"
            )
        if dedup_max_entries < 1 or dedup_max_bytes < 1:
            raise ConfigurationError(
                f"dedup_max_entries ({dedup_max_entries!r}) and dedup_max_bytes ({dedup_max_bytes!r}) "
                "must be at least 1"
            )
        # Checked here because a call's wire builds its RPC, which checks it, only when the function uses it.
        default_timeout = check_seconds(default_timeout, "default_timeout")
        if max_concurrency < 1:
            raise ConfigurationError(f"max_concurrency must be at least 1, got {max_concurrency!r}")
        if max_in_flight < max_concurrency:
            raise ConfigurationError(
                f"max_in_flight ({max_in_flight!r}) must be at least max_concurrency ({max_concurrency!r})"
            )
        self.registry = registry
        self.services = services
        self.deployment_service = deployment_service
        self.deployment_id = deployment_id
        self.default_timeout = default_timeout
        self.draining = False
        self.max_concurrency = max_concurrency
        self.max_in_flight = max_in_flight
        self.security = security
        """With a remote secret, only calls signed with it are admitted, and they bring their session."""
        self.in_flight = 0
        """Calls admitted and not finished: running, or waiting for one of the ``max_concurrency`` slots."""
        self._slots = _Slots(max_concurrency)
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_rejection = 0.0
        """:func:`time.monotonic` of the last call rejected while draining."""
        self._running: set[asyncio.Task[Any]] = set()
        self._background: set[asyncio.Task[Any]] = set()
        """Tasks of the one-way calls running here, kept so that they are not garbage-collected."""
        self._aborting = False
        self.records = (
            CallRecords(window=dedup_window, max_entries=dedup_max_entries, max_bytes=dedup_max_bytes)
            if dedup_window > 0
            else None
        )
        """Replies of the recent calls to idempotent functions, by call id, or None with de-duplication off."""
        self.telemetry: Telemetry | None = None
        """Traces and counts the calls served when tracing or metrics are on; None costs nothing per call."""
        self._unauthorized_log = RepeatedFailureLog(logger)
        self._raised_logs: dict[str, RepeatedFailureLog] = {}
        """The log of exceptions raised by each function, by name; only registered names are keys."""

    def handle(
        self,
        name: str,
        data: Any,
        headers: Mapping[str, str],
        transport: str = "",
        *,
        task: asyncio.Task[Any] | None = None,
    ) -> Coroutine[Any, Any, Outcome]:
        """Admit and run one call. Every failure becomes an error outcome, and none is raised.

        ``transport`` (http, nats, amqp or memory) labels the call's span and metrics. ``task`` is
        the task that will await the result, if the transport has it at hand. Passing it spares a
        lookup, because ``asyncio.current_task()`` calls ``getpid()`` on Python 3.11 (seen with strace).
        Await the result as that of a coroutine function. This method returns the coroutine that
        serves the call, without a coroutine of its own around it.
        """
        if self.telemetry is not None and self.telemetry.recording():
            definition = self.registry.get(name)
            function = name if definition is not None and definition.expose else UNKNOWN_FUNCTION
            return self.telemetry.serve(self._handle, name, data, headers, transport, function, self.deployment_id)
        return self._handle(name, data, headers, task)

    async def _handle(
        self, name: str, data: Any, headers: Mapping[str, str], task: asyncio.Task[Any] | None = None
    ) -> Outcome:
        try:
            admitted = self.admit(name, headers, data)
        except PikkuMQError as exc:
            return Outcome(error=exc, rejected=isinstance(exc, ServiceUnavailableError))
        if self.records is not None and admitted.definition.idempotent and headers.get(HEADER_CALL_ID):
            return await self._handle_once(admitted, data, self.records, task)
        try:
            result = await self.execute(admitted, data, task=task)
        except PikkuMQError as exc:
            return Outcome(error=exc)
        return Outcome(definition=admitted.definition, result=result)

    async def _handle_once(
        self, admitted: Admitted, data: Any, records: CallRecords, task: asyncio.Task[Any] | None = None
    ) -> Outcome:
        """Run an idempotent call, unless an attempt with the same call id runs here or ran here lately."""
        key = (admitted.definition.name, admitted.wire.call_id)
        digest = fingerprint(data, admitted.wire.session)
        while True:
            try:
                found = records.find(key, digest)
            except BadRequestError as exc:
                return Outcome(error=exc)
            if found is None:
                break
            if isinstance(found, Outcome):
                logger.debug("replaying the reply of call %s to %s", key[1], key[0], extra=_extra(admitted))
                return found
            outcome = await self._wait_for(found, admitted, task)
            if outcome is not None:
                return outcome
            # The earlier attempt did not finish, so this one runs the function, unless another waiter already does.

        claim = records.claim(key, digest)
        outcome = None
        try:
            # The outcome keeps only the JSON text of the result, whose size the records count.
            try:
                result = await self.execute(admitted, data, task=task)
                encoded = admitted.definition.dump_json(result)
            except PikkuMQError as exc:
                outcome = Outcome(error=exc)
            else:
                outcome = Outcome(definition=admitted.definition, encoded=encoded)
        finally:
            records.settle(claim, outcome)
        return outcome

    async def _wait_for(
        self, claim: Claim, admitted: Admitted, task: asyncio.Task[Any] | None = None
    ) -> Outcome | None:
        """Wait, within this attempt's deadline, for the reply of the attempt that runs the call.

        Return None if that attempt did not finish, so this one should run the call itself.
        """
        definition, wire = admitted.definition, admitted.wire
        task = self._enter(task)
        try:
            async with asyncio.timeout(wire.remaining):
                await asyncio.wait({claim.future})
        except asyncio.CancelledError:
            if not self._aborting or task is None:
                raise
            task.uncancel()
            return Outcome(error=self._interrupted(definition))
        except TimeoutError:
            return Outcome(
                error=DeadlineExceededError(
                    f"an earlier attempt of this call to '{definition.name}' is still running on instance "
                    f"'{self.deployment_id}' and did not finish before this attempt's deadline",
                    payload={"deployment_id": self.deployment_id},
                )
            )
        finally:
            self._leave(task)
        if claim.future.cancelled():
            return None
        outcome = claim.future.result()
        return outcome if is_final(outcome) else None

    def admit(self, name: str, headers: Mapping[str, str], data: Any = None) -> Admitted:
        """Check a call before it runs; raise the error to send back if it cannot run.

        A :class:`ServiceUnavailableError` raised here means the function did not start, so the
        transport marks the reply as rejected and the caller may try another instance. With a remote
        secret, a call without a valid token for ``name`` and ``data`` raises :class:`UnauthorizedError`
        before the function is looked up, and is not marked rejected, so a caller cannot get around
        the check by moving to another instance.
        """
        if self.draining:
            self.last_rejection = time.monotonic()
            raise ServiceUnavailableError(
                f"instance '{self.deployment_id}' is draining and takes no new calls",
                payload={"deployment_id": self.deployment_id},
            )

        if self.in_flight >= self.max_in_flight:
            raise BusyError(
                f"instance '{self.deployment_id}' already has its maximum of {self.max_in_flight} calls in flight",
                payload={"deployment_id": self.deployment_id, "max_in_flight": self.max_in_flight},
            )

        session = None
        if self.security is not None:
            try:
                session = self.security.verify(headers.get(AUTHORIZATION_HEADER), name, data)
            except UnauthorizedError as exc:
                # Per call at DEBUG; a stream of them (a caller with a wrong secret) also at INFO, rate-limited.
                logger.debug("rejected a call to %r: %s", name[:200], exc.message)
                self._unauthorized_log.failed(logging.INFO, "rejected a call to %r: %s", name[:200], exc.message)
                raise

        definition = self.registry.get(name)
        if definition is None or not definition.expose:
            raise function_not_found(name)

        deadline_ms = header_count(headers, HEADER_DEADLINE, MAX_DEADLINE_DIGITS)
        budget = self.default_timeout if deadline_ms is None else deadline_ms / 1000.0
        hop = header_count(headers, HEADER_HOP, MAX_HOP_DIGITS) or 0
        if hop > MAX_HOPS:
            raise LoopDetectedError(f"call to '{name}' was forwarded {hop} times; the limit is {MAX_HOPS}")

        trace_id = headers.get(HEADER_REQUEST_ID) or uuid.uuid4().hex
        call_id = headers.get(HEADER_CALL_ID) or uuid.uuid4().hex
        if len(call_id) > MAX_CALL_ID_LENGTH:
            raise BadRequestError(
                f"header {HEADER_CALL_ID} must be at most {MAX_CALL_ID_LENGTH} characters, got {len(call_id)}"
            )
        wire = self._wire(name, self.deployment_service, session, trace_id, call_id, budget, hop)
        return Admitted(definition, wire)

    async def execute(self, admitted: Admitted, data: Any, *, task: asyncio.Task[Any] | None = None) -> Any:
        """Run an admitted call within its deadline and return the validated result.

        ``task`` is the current task, if the caller has it at hand.
        """
        definition, wire = admitted.definition, admitted.wire
        task = self._enter(task)
        try:
            deadline = _Deadline(task, wire.remaining)
            slots = self._slots
            try:
                # A free slot is taken without the coroutines of ``async with``, as acquire() would take it.
                if not slots.take():
                    await slots.acquire()
                try:
                    result = definition.validate_output(await start_function(definition, self.services, data, wire))
                finally:
                    slots.release()
            except BaseException as exc:
                deadline.leave(exc)
                raise
            deadline.leave(None)
            return result
        except asyncio.CancelledError:
            if not self._aborting or task is None:
                raise
            # The worker is stopping, so reply with an error instead of letting the server drop the request.
            task.uncancel()
            raise self._interrupted(definition) from None
        except TimeoutError as exc:
            if isinstance(exc, PikkuMQError):
                raise _raised_by_function(exc) from None
            if not deadline.expired:
                # The function's own TimeoutError, such as that of its own asyncio.timeout(), is its failure.
                raise self._function_raised(definition, wire, exc) from exc
            raise DeadlineExceededError(
                f"function '{definition.name}' did not finish before the call's deadline",
                payload={"deployment_id": self.deployment_id},
            ) from None
        except PikkuMQError as exc:
            raise _raised_by_function(exc) from None
        except Exception as exc:
            raise self._function_raised(definition, wire, exc) from exc
        finally:
            self._leave(task)

    def _function_raised(self, definition: FunctionDefinition, wire: Wire, exc: Exception) -> PikkuMQError:
        error = InternalServerError(f"function '{definition.name}' raised {type(exc).__name__}")
        self._log_raised(definition, wire, exc, error)
        return error

    def _log_raised(self, definition: FunctionDefinition, wire: Wire, exc: Exception, error: PikkuMQError) -> None:
        """Log a function's exception with its traceback: each at DEBUG, and a rate-limited line at ERROR.

        Every record carries the errorId that the caller's error shows, so one failure can be found
        in the DEBUG log. The ERROR line shows a run of failures without writing one line per call.
        """
        extra = _extra_of(wire)
        message = "function %s raised %s (errorId=%s, trace_id=%s)"
        args = (definition.name, type(exc).__name__, error.error_id, wire.trace_id)
        logger.debug(message, *args, exc_info=exc, extra=extra)
        raised_log = self._raised_logs.get(definition.name)
        if raised_log is None:
            raised_log = self._raised_logs[definition.name] = RepeatedFailureLog(logger)
        raised_log.failed(logging.ERROR, message, *args, extra=extra, exc_info=exc)

    def accept_one_way(self, name: str, data: Any, headers: Mapping[str, str]) -> Outcome | None:
        """Admit a one-way call and start it in the background; return None once it started, else the error.

        The function runs within the worker's default timeout, not the caller's deadline, since the
        caller does not wait. Its failure is logged, because no caller receives it. A retry of the
        call with the same ``pikku-call-id`` that arrives while the first runs, or within the
        de-duplication window after it ended, does not run the function again.
        """
        try:
            admitted = self.admit(name, {k: v for k, v in headers.items() if k != HEADER_DEADLINE}, data)
        except PikkuMQError as exc:
            return Outcome(error=exc, rejected=isinstance(exc, ServiceUnavailableError))
        # Counted now, so a drain that begins before the task runs waits for it.
        self.in_flight += 1
        self._idle.clear()
        task = asyncio.create_task(self._run_one_way(admitted, data), name=f"pikku-one-way-{name[:60]}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return None

    async def _run_one_way(self, admitted: Admitted, data: Any) -> None:
        try:
            outcome = await self.run_admitted_once(admitted, data)
        finally:
            self._leave()
        if outcome.error is not None:
            logger.warning(
                "one-way call %s to %s failed: %s: %s",
                admitted.wire.call_id,
                admitted.definition.name,
                type(outcome.error).__name__,
                outcome.error.message,
            )

    async def run_admitted_once(self, admitted: Admitted, data: Any) -> Outcome:
        """Run an admitted call, de-duplicated by its call id whatever the function's idempotent flag.

        Only a success is kept for replay: a delivery that failed runs again when the broker redelivers it.
        """
        if self.records is not None:
            outcome = await self._handle_once(admitted, data, self.records)
            if outcome.error is not None:
                self.records.forget((admitted.definition.name, admitted.wire.call_id))
            return outcome
        try:
            result = await self.execute(admitted, data)
        except PikkuMQError as exc:
            return Outcome(error=exc)
        return Outcome(definition=admitted.definition, result=result)

    def admit_delivery(
        self, definition: FunctionDefinition, data: Any, headers: Mapping[str, str], *, signed: bool
    ) -> Admitted:
        """Check a durable one-way call or an event before it runs; raise the error that settles it.

        ``signed`` applies the remote secret, as for any call, except that a token seen before is
        accepted, because the broker redelivers. Events are not signed, so any client that may publish
        on the subject may run its handlers, and broker permissions must restrict publishing.
        """
        if self.draining:
            raise ServiceUnavailableError(f"instance '{self.deployment_id}' is draining and takes no new deliveries")
        session = None
        if signed and self.security is not None:
            session = self.security.verify(headers.get(AUTHORIZATION_HEADER), definition.name, data, check_replay=False)

        hop = header_count(headers, HEADER_HOP, MAX_HOP_DIGITS) or 0
        if hop > MAX_HOPS:
            raise LoopDetectedError(f"call to '{definition.name}' was forwarded {hop} times; the limit is {MAX_HOPS}")
        trace_id = headers.get(HEADER_REQUEST_ID) or uuid.uuid4().hex
        call_id = headers.get(HEADER_CALL_ID) or headers.get(HEADER_EVENT_ID) or uuid.uuid4().hex
        if len(call_id) > MAX_CALL_ID_LENGTH:
            raise BadRequestError(f"the call id or event id must be at most {MAX_CALL_ID_LENGTH} characters")

        deployment_service: Any = self.deployment_service
        trace = trace_headers(headers)
        if trace and deployment_service is not None:
            deployment_service = TracedDeploymentService(deployment_service, trace)
        wire = self._wire(definition.name, deployment_service, session, trace_id, call_id, self.default_timeout, hop)
        return Admitted(definition, wire)

    def _wire(
        self,
        name: str,
        deployment_service: Any,
        session: Any,
        trace_id: str,
        call_id: str,
        budget: float,
        hop: int,
    ) -> Wire:
        """Build the wire of an admitted call, with an RPC for its nested calls, due ``budget`` seconds from now."""
        deadline = time.monotonic() + budget
        return Wire.bound(
            (self.registry, self.services, deployment_service, self.default_timeout),
            session=session,
            trace_id=trace_id,
            call_id=call_id,
            deadline=deadline,
            hop=hop,
            function=name,
            deployment_id=self.deployment_id,
        )

    def _interrupted(self, definition: FunctionDefinition) -> CallInterruptedError:
        return CallInterruptedError(
            f"instance '{self.deployment_id}' stopped before function '{definition.name}' finished; "
            "it may have partly run",
            payload={"deployment_id": self.deployment_id},
        )

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; return False if some still are after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def wait_quiet(self, quiet: float, limit: float, since: float = 0.0) -> None:
        """Wait until no call has been rejected for ``quiet`` seconds, or at most ``limit`` seconds.

        Callers that still route here learn from the rejection and stop. The wait lets them do so
        before the listener closes their keep-alive connections under a request in transit. The
        quiet time counts from ``since`` (a :func:`time.monotonic` instant, such as the start of a
        drain) at the earliest, so a caller that picked this instance just before it began draining
        gets a rejection rather than a closed connection.
        """
        end = time.monotonic() + limit
        # Polls because the condition is the absence of an event; at most limit / quiet wake-ups.
        while (now := time.monotonic()) < end and now - (last := max(self.last_rejection, since)) < quiet:  # noqa: ASYNC110
            await asyncio.sleep(min(last + quiet, end) - now)

    def abort(self) -> None:
        """Cancel the calls still running, so each replies :class:`CallInterruptedError` to its caller."""
        self._aborting = True
        for task in list(self._running):
            task.cancel()

    def _enter(self, task: asyncio.Task[Any] | None = None) -> asyncio.Task[Any] | None:
        """Count a call in and return its task: ``task`` if given, which must be the current one."""
        self.in_flight += 1
        self._idle.clear()
        if task is None:
            task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        return task

    def _leave(self, task: asyncio.Task[Any] | None = None) -> None:
        """Count a call out. ``task`` is what :meth:`_enter` returned for it, or None for a call counted in without."""
        self.in_flight -= 1
        if task is not None:
            self._running.discard(task)
        if self.in_flight == 0:
            self._idle.set()


class _Slots(asyncio.Semaphore):
    """``asyncio.Semaphore``, whose ``locked()`` makes no generator while nothing waits.

    Python 3.11 to 3.13 check for waiters with ``any()`` over a generator on every ``acquire()``, and
    the generator is half of the cost of an ``async with`` on a free semaphore. It returns the same result.
    """

    def locked(self) -> bool:
        if not self._waiters:
            return self._value == 0
        return super().locked()

    def take(self) -> bool:
        """Take a slot if ``acquire()`` would take one without waiting, and return whether it did."""
        if self.locked():
            return False
        self._value -= 1
        return True


class _Deadline:
    """The deadline of a function run or an HTTP call: ``asyncio.timeout()`` without its coroutines and state object.

    It follows ``asyncio.timeout()`` of Python 3.11 step by step, for less CPU per call. At the
    deadline it cancels the task. On leaving, it cancels its timer, and after the deadline it takes
    back its own cancellation (``Task.uncancel()``) and turns the CancelledError into TimeoutError.
    If another cancellation of the task arrived since the run began, the CancelledError propagates.
    tests/test_deadline_scope.py runs both on the same cases.
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_task")

    def __init__(self, task: asyncio.Task[Any] | None, delay: float | None) -> None:
        if task is None:
            raise RuntimeError("Timeout should be used inside a task")  # asyncio.timeout() raises the same
        self._task = task
        self._cancelling = task.cancelling()
        self._expired = False
        self._handle: asyncio.Handle | None = None
        if delay is not None:
            loop = task.get_loop()
            self._handle = loop.call_soon(self._expire) if delay <= 0 else loop.call_later(delay, self._expire)

    @property
    def expired(self) -> bool:
        """Whether the deadline passed while the function ran."""
        return self._expired

    def _expire(self) -> None:
        self._task.cancel()
        self._expired = True
        self._handle = None

    def leave(self, exc: BaseException | None) -> None:
        """End the scope that ``exc`` (None after a return) left; raise TimeoutError if the deadline ended it."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired and self._task.uncancel() <= self._cancelling and isinstance(exc, asyncio.CancelledError):
            raise TimeoutError from exc


def _raised_by_function(error: PikkuMQError) -> PikkuMQError:
    """Return ``error``, which the function raised, without the mark of a worker that gave up on a call.

    A worker that stops a function at its deadline, or stops mid-call, names itself in the payload
    (``deployment_id``), and callers retry such a reply as an uncertain failure. The same errors from
    a nested call that the function let through name the nested call's worker, or no worker: this
    worker ran its function, which failed, so the mark is removed.
    """
    payload = error.payload
    if isinstance(payload, dict) and "deployment_id" in payload and error.code in _GAVE_UP_CODES:
        error.payload = {key: value for key, value in payload.items() if key != "deployment_id"}
    return error


def header_count(headers: Mapping[str, str], name: str, max_digits: int) -> int | None:
    """Return the positive integer in header ``name``, or None when it is absent or empty.

    Raise :class:`BadRequestError` for anything but 1 to ``max_digits`` ASCII digits with a value of at
    least 1: a sign, a fraction, an exponent, spaces, other scripts' digits and zero are all rejected.
    """
    raw = headers.get(name)
    if raw is None or raw == "":
        return None
    if raw.isascii() and raw.isdigit() and len(raw) <= max_digits:
        value = int(raw)
        if value:
            return value
    raise BadRequestError(f"header {name} must be a positive integer of at most {max_digits} digits, got {raw[:40]!r}")


def _extra(admitted: Admitted) -> dict[str, str]:
    return _extra_of(admitted.wire)


def _extra_of(wire: Wire) -> dict[str, str]:
    return call_extra(wire.call_id, wire.trace_id, wire.function, wire.deployment_id)
