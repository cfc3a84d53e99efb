"""The serving side, shared by every transport: admit a call, run the function, account for it."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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
    function_not_found,
)
from ._functions import FunctionDefinition, FunctionRegistry
from ._rpc import RPC, Wire, run_function
from ._security import AUTHORIZATION_HEADER, RemoteSecurity
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


class Admitted:
    """A call that passed admission: its function and the wire it runs with."""

    __slots__ = ("definition", "wire")

    def __init__(self, definition: FunctionDefinition, wire: Wire) -> None:
        self.definition = definition
        self.wire = wire


class Outcome:
    """The result of serving one call, ready for a transport to encode.

    Either ``error`` is set, or ``definition`` and ``result`` are. ``rejected`` marks a call that was
    declined before its function started.
    """

    __slots__ = ("definition", "error", "rejected", "result")

    def __init__(
        self,
        *,
        definition: FunctionDefinition | None = None,
        result: Any = None,
        error: PikkuMQError | None = None,
        rejected: bool = False,
    ) -> None:
        self.definition = definition
        self.result = result
        self.error = error
        self.rejected = rejected

    def encode_json(self) -> tuple[int, bytes]:
        """Return the HTTP status and JSON body; a result that cannot be serialised becomes a 500."""
        if self.error is None:
            assert self.definition is not None
            try:
                return 200, self.definition.dump_json(self.result)
            except OutputValidationError as exc:
                self.error = exc
        return self.error.http_status, json.dumps(self.error.to_envelope()).encode()

    def encode_python(self) -> tuple[int, Any]:
        """Return the status and a JSON-compatible body (for msgpack and the in-memory transport)."""
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
    ) -> None:
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
        self._slots = asyncio.Semaphore(max_concurrency)
        self._idle = asyncio.Event()
        self._idle.set()
        self.last_rejection = 0.0
        """:func:`time.monotonic` of the last call rejected while draining."""
        self._running: set[asyncio.Task[Any]] = set()
        self._aborting = False

    async def handle(self, name: str, data: Any, headers: Mapping[str, str]) -> Outcome:
        """Admit and run one call; every failure becomes an error outcome, none is raised."""
        try:
            admitted = self.admit(name, headers, data)
        except PikkuMQError as exc:
            return Outcome(error=exc, rejected=isinstance(exc, ServiceUnavailableError))
        try:
            result = await self.execute(admitted, data)
        except PikkuMQError as exc:
            return Outcome(error=exc)
        return Outcome(definition=admitted.definition, result=result)

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
                logger.info("rejected a call to %r: %s", name[:200], exc.message)
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
        deadline = time.monotonic() + budget
        rpc = RPC(
            registry=self.registry,
            services=self.services,
            deployment_service=self.deployment_service,
            session=session,
            trace_id=trace_id,
            deadline=deadline,
            hop=hop,
            default_timeout=self.default_timeout,
        )
        wire = Wire(rpc=rpc, session=session, trace_id=trace_id, call_id=call_id, deadline=deadline, hop=hop)
        return Admitted(definition, wire)

    async def execute(self, admitted: Admitted, data: Any) -> Any:
        """Run an admitted call within its deadline and return the validated result."""
        definition, wire = admitted.definition, admitted.wire
        task = self._enter()
        try:
            async with asyncio.timeout(wire.remaining), self._slots:
                return await run_function(definition, self.services, data, wire)
        except asyncio.CancelledError:
            if not self._aborting or task is None:
                raise
            # The worker is stopping, so reply with an error instead of letting the server drop the request.
            task.uncancel()
            raise CallInterruptedError(
                f"instance '{self.deployment_id}' stopped before function '{definition.name}' finished; "
                "it may have partly run",
                payload={"deployment_id": self.deployment_id},
            ) from None
        except TimeoutError as exc:
            if isinstance(exc, PikkuMQError):
                raise
            raise DeadlineExceededError(
                f"function '{definition.name}' did not finish before the call's deadline"
            ) from None
        except PikkuMQError:
            raise
        except Exception as exc:
            error = InternalServerError(f"function '{definition.name}' raised {type(exc).__name__}")
            logger.exception(
                "function %s raised %s (errorId=%s, trace_id=%s)",
                definition.name,
                type(exc).__name__,
                error.error_id,
                wire.trace_id,
            )
            raise error from exc
        finally:
            self._leave()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no call is in flight; return False if some still are after ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def wait_quiet(self, quiet: float, limit: float) -> None:
        """Wait until no call has been rejected for ``quiet`` seconds, or at most ``limit`` seconds.

        Callers that still route here learn from the rejection and stop. The wait lets them do so
        before the listener closes their keep-alive connections under a request in transit.
        """
        end = time.monotonic() + limit
        # Polls because the condition is the absence of an event; at most limit / quiet wake-ups.
        while (now := time.monotonic()) < end and now - self.last_rejection < quiet:  # noqa: ASYNC110
            await asyncio.sleep(min(self.last_rejection + quiet, end) - now)

    def abort(self) -> None:
        """Cancel the calls still running, so each replies :class:`CallInterruptedError` to its caller."""
        self._aborting = True
        for task in list(self._running):
            task.cancel()

    def _enter(self) -> asyncio.Task[Any] | None:
        self.in_flight += 1
        self._idle.clear()
        task = asyncio.current_task()
        if task is not None:
            self._running.add(task)
        return task

    def _leave(self) -> None:
        self.in_flight -= 1
        task = asyncio.current_task()
        if task is not None:
            self._running.discard(task)
        if self.in_flight == 0:
            self._idle.set()


def header_count(headers: Mapping[str, str], name: str, max_digits: int) -> int | None:
    """Return the positive integer in header ``name``, or None when it is absent or empty.

    Raise :class:`BadRequestError` for anything but 1 to ``max_digits`` ASCII digits with a value of at
    least 1: a sign, a fraction, an exponent, spaces, other scripts' digits and zero are all rejected.
    """
    raw = headers.get(name)
    if raw is None or raw == "":
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= max_digits) or not int(raw):
        raise BadRequestError(
            f"header {name} must be a positive integer of at most {max_digits} digits, got {raw[:40]!r}"
        )
    return int(raw)
