"""RPC as Pikku defines it: ``invoke`` (local first), ``remote`` (always remote) and ``exposed``."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ._balancing import check_balancing
from ._errors import (
    ConfigurationError,
    DeadlineExceededError,
    LoopDetectedError,
    MissingSessionError,
    check_flag,
    check_seconds,
    function_not_found,
)
from ._functions import FunctionDefinition, FunctionRegistry, default_registry
from ._logs import call_extra
from ._types import DEFAULT_TIMEOUT, MAX_HOPS

if TYPE_CHECKING:
    from .backends.base import DeploymentService

__all__ = ["RPC", "TracedDeploymentService", "Wire", "run_function", "start_function"]

_function_logger = logging.getLogger("pikku_mq.function")


class Wire:
    """The call context a function gets besides its services and data: RPC, session, trace id and deadline.

    ``deadline`` is a :func:`time.monotonic` instant, or None when the call has no deadline (a local
    call from application code without a timeout).
    """

    __slots__ = ("_rpc", "_scope", "call_id", "deadline", "deployment_id", "function", "hop", "session", "trace_id")

    def __init__(
        self,
        *,
        rpc: RPC,
        session: Any,
        trace_id: str,
        call_id: str,
        deadline: float | None,
        hop: int = 0,
        function: str = "",
        deployment_id: str = "",
    ) -> None:
        self._rpc: RPC | None = rpc
        self._scope: tuple[FunctionRegistry, Any, Any, float] | None = None
        self.session = session
        self.trace_id = trace_id
        self.call_id = call_id
        self.deadline = deadline
        self.hop = hop
        self.function = function
        """The name of the function the call runs."""
        self.deployment_id = deployment_id
        """The instance that serves the call; empty for a local call outside a worker."""

    @classmethod
    def bound(
        cls,
        scope: tuple[FunctionRegistry, Any, Any, float],
        *,
        session: Any,
        trace_id: str,
        call_id: str,
        deadline: float,
        hop: int,
        function: str,
        deployment_id: str,
    ) -> Wire:
        """Return a wire whose RPC is built on first use, from ``scope`` and the wire's own fields.

        ``scope`` is the registry, services, deployment service and default timeout of the nested
        calls. A worker builds each call's wire this way, so a function that makes no nested call
        costs no RPC. The values must be valid for :class:`RPC`, as a worker's are.
        """
        wire = cls.__new__(cls)
        wire._rpc = None
        wire._scope = scope
        wire.session = session
        wire.trace_id = trace_id
        wire.call_id = call_id
        wire.deadline = deadline
        wire.hop = hop
        wire.function = function
        wire.deployment_id = deployment_id
        return wire

    @property
    def rpc(self) -> RPC:
        """The RPC of the call's nested calls, which keep its trace id, session and deadline and its hop count."""
        rpc = self._rpc
        if rpc is None:
            assert self._scope is not None
            registry, services, deployment_service, default_timeout = self._scope
            rpc = self._rpc = RPC(
                registry=registry,
                services=services,
                deployment_service=deployment_service,
                session=self.session,
                trace_id=self.trace_id,
                deadline=self.deadline,
                hop=self.hop,
                default_timeout=default_timeout,
            )
        return rpc

    @property
    def remaining(self) -> float | None:
        """Seconds left before the call's deadline (never negative), or None without a deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic())

    @property
    def logger(self) -> logging.LoggerAdapter[logging.Logger]:
        """A logger that adds the call id, trace id, function name and deployment id to each record's ``extra``."""
        return logging.LoggerAdapter(
            _function_logger, call_extra(self.call_id, self.trace_id, self.function, self.deployment_id)
        )


class RPC:
    """Calls pikku functions by name, locally or through a deployment service.

    Inside a function, ``wire.rpc`` is bound to the running call, so nested calls keep its trace id,
    session and deadline and count one more hop. Application code can build its own::

        rpc = RPC(deployment_service=SqliteDeploymentService("pikku.db"))
        await rpc.remote("greet", {"name": "Ada"})

    ``balancing`` names the strategy of this RPC's remote calls (see :class:`DeploymentService`); None
    leaves the choice to the deployment service.
    """

    def __init__(
        self,
        *,
        registry: FunctionRegistry | None = None,
        services: Any = None,
        deployment_service: DeploymentService | None = None,
        session: Any = None,
        trace_id: str | None = None,
        deadline: float | None = None,
        hop: int = 0,
        default_timeout: float = DEFAULT_TIMEOUT,
        balancing: str | None = None,
    ) -> None:
        default_timeout = check_seconds(default_timeout, "default_timeout")
        if isinstance(hop, bool) or not isinstance(hop, int) or not 0 <= hop <= MAX_HOPS:
            raise ConfigurationError(f"hop must be an integer from 0 to {MAX_HOPS}, got {hop!r:.80}")
        self._registry = registry if registry is not None else default_registry
        self._services = services
        self._deployment_service = deployment_service
        self._session = session
        self._trace_id = trace_id
        self._deadline = deadline
        self._hop = hop
        self._default_timeout = default_timeout
        self._balancing = check_balancing(balancing) if balancing is not None else None

    async def invoke(self, name: str, data: Any = None, *, timeout: float | None = None) -> Any:
        """Run ``name`` here if this process has it, else remotely.

        Only the registry decides where the call goes: an error raised while the local function runs,
        not-found included, is raised to the caller and never re-sent to another instance.
        """
        _check_name(name)
        definition = self._registry.get(name)
        if definition is not None:
            return await self._run_local(definition, data, timeout)
        return await self.remote(name, data, timeout=timeout)

    async def exposed(self, name: str, data: Any = None, *, timeout: float | None = None) -> Any:
        """Run ``name`` only if it is exposed: here if this process has it, else remotely.

        A hidden function raises the same :class:`FunctionNotFoundError` as a missing one.
        """
        _check_name(name)
        definition = self._registry.get(name)
        if definition is None and self._deployment_service is None:
            raise function_not_found(name)
        if definition is None:
            return await self.remote(name, data, timeout=timeout)
        if not definition.expose:
            raise function_not_found(name)
        return await self._run_local(definition, data, timeout)

    async def remote(
        self,
        name: str,
        data: Any = None,
        *,
        timeout: float | None = None,
        idempotent: bool | None = None,
        session: Any = None,
        balancing: str | None = None,
    ) -> Any:
        """Call ``name`` on an instance found through the deployment service, even if it is local.

        ``timeout`` (seconds) shortens the deadline for this call; it never extends the deadline of
        the call this one is part of. ``idempotent`` allows a retry after an uncertain failure. It
        defaults to the flag of the local definition of ``name``, if this process has one, and else
        to the flag that the instance which failed the call registered.
        ``session`` replaces the session this RPC forwards (``wire.session`` inside a function); it
        travels only when the deployment service has a remote secret. ``balancing`` names the
        strategy that picks the instance of this call, in place of this RPC's or the deployment
        service's.

        A call whose deadline, inherited from the call this one is part of, has passed is not started:
        it raises :class:`DeadlineExceededError` without a lookup.
        """
        _check_name(name)
        if idempotent is not None:
            check_flag(idempotent, "idempotent")
        service = self._deployment_service
        if service is None:
            raise ConfigurationError(
                f"rpc.remote('{name}') needs a deployment service: pass deployment_service= to RPC, or run "
                "the function in a PikkuWorker, which reads PIKKU_DISCOVERY_URL (for example sqlite:///pikku.db)"
            )
        hop = self._hop + 1
        if hop > MAX_HOPS:
            raise LoopDetectedError(f"call to '{name}' would exceed the hop limit of {MAX_HOPS}")

        if timeout is None:
            # The default timeout was checked when this RPC was built.
            deadline = time.monotonic() + self._default_timeout
            if self._deadline is not None and self._deadline < deadline:
                deadline = self._deadline
        else:
            deadline = self._child_deadline(timeout)
        if idempotent is None:
            definition = self._registry.get(name)
            if definition is not None:
                idempotent = definition.idempotent
        return await service.call(
            name,
            data,
            session=self._session if session is None else session,
            trace_id=self._trace_id,
            deadline=deadline,
            hop=hop,
            idempotent=idempotent,
            balancing=balancing if balancing is not None else self._balancing,
        )

    async def notify(self, name: str, data: Any = None, *, timeout: float | None = None, session: Any = None) -> None:
        """Run ``name`` remotely without waiting for its result, and return once a worker or broker took it.

        The call is routed as :meth:`remote` routes it, and the endpoint's transport decides what is
        promised. On a NATS or AMQP endpoint whose worker takes durable one-way calls, the broker has
        stored the call when this returns. On HTTP the worker has admitted it and runs it in the
        background. docs/events.md lists the promises of each transport. ``timeout`` (seconds) bounds
        the wait for that acknowledgement, not the run of the function.
        """
        service = self._remote_service(name)
        await service.notify(
            name,
            data,
            session=self._session if session is None else session,
            trace_id=self._trace_id,
            deadline=self._child_deadline(timeout if timeout is not None else self._default_timeout),
            hop=self._hop + 1,
        )

    async def publish(self, subject: str, data: Any = None, *, timeout: float | None = None) -> str:
        """Publish an event on ``subject`` through the deployment service's event bus; return the event id.

        It returns once the broker stored the event. Every group of workers whose functions listen on
        the subject runs it once (at least once, across failures).
        """
        service = self._remote_service(f"publish {subject}")
        return await service.publish(
            subject,
            data,
            trace_id=self._trace_id,
            deadline=self._child_deadline(timeout if timeout is not None else self._default_timeout),
        )

    def _remote_service(self, what: str) -> DeploymentService:
        if self._deployment_service is None:
            raise ConfigurationError(
                f"rpc '{what}' needs a deployment service: pass deployment_service= to RPC, or run "
                "the function in a PikkuWorker, which reads PIKKU_DISCOVERY_URL (for example sqlite:///pikku.db)"
            )
        if self._hop + 1 > MAX_HOPS:
            raise LoopDetectedError(f"'{what}' would exceed the hop limit of {MAX_HOPS}")
        return self._deployment_service

    async def _run_local(self, definition: FunctionDefinition, data: Any, timeout: float | None) -> Any:
        deadline = self._child_deadline(timeout) if timeout is not None else self._deadline
        trace_id = self._trace_id or uuid.uuid4().hex
        rpc = RPC(
            registry=self._registry,
            services=self._services,
            deployment_service=self._deployment_service,
            session=self._session,
            trace_id=trace_id,
            deadline=deadline,
            hop=self._hop,
            default_timeout=self._default_timeout,
            balancing=self._balancing,
        )
        wire = Wire(
            rpc=rpc,
            session=self._session,
            trace_id=trace_id,
            call_id=uuid.uuid4().hex,
            deadline=deadline,
            hop=self._hop,
            function=definition.name,
        )
        if deadline is None:
            return await run_function(definition, self._services, data, wire)
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                return await run_function(definition, self._services, data, wire)
        except DeadlineExceededError:
            raise
        except TimeoutError:
            raise DeadlineExceededError(f"function '{definition.name}' did not finish before its deadline") from None

    def _child_deadline(self, timeout: float) -> float:
        deadline = time.monotonic() + check_seconds(timeout, "timeout")
        if self._deadline is not None:
            deadline = min(deadline, self._deadline)
        return deadline


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name:
        raise ConfigurationError(f"a function name must be a non-empty string, got {name!r:.80}")


async def run_function(definition: FunctionDefinition, services: Any, data: Any, wire: Wire) -> Any:
    """Validate ``data``, check the session, run the function and return its validated result."""
    return definition.validate_output(await start_function(definition, services, data, wire))


def start_function(definition: FunctionDefinition, services: Any, data: Any, wire: Wire) -> Awaitable[Any]:
    """Validate ``data``, check the session and return the function's awaitable, as :func:`run_function` does first.

    The dispatcher awaits it itself, which spares the coroutine of :func:`run_function`.
    """
    value = definition.validate_input(data)
    if definition.auth and wire.session is None:
        raise MissingSessionError(
            f"function '{definition.name}' needs a session and the call carried none; declare it with "
            "pikku_sessionless_func (or auth=False) if it needs none"
        )
    return definition.func(*(services, value, wire)[: definition.arity])


class TracedDeploymentService:
    """A deployment service that adds an event's trace context headers to every call routed through it.

    A worker hands it to the RPC of an event handler, so the handler's ``rpc.remote``, ``rpc.notify``
    and ``rpc.publish`` carry the event's ``traceparent`` and ``tracestate`` unchanged. Everything
    else is the wrapped service's.
    """

    def __init__(self, inner: DeploymentService, headers: dict[str, str]) -> None:
        self._inner = inner
        self._headers = headers

    async def call(self, name: str, data: Any, **options: Any) -> Any:
        return await self._inner.call(name, data, headers=self._headers, **options)

    async def notify(self, name: str, data: Any, **options: Any) -> None:
        await self._inner.notify(name, data, headers=self._headers, **options)

    async def publish(self, subject: str, data: Any, **options: Any) -> str:
        return await self._inner.publish(subject, data, headers=self._headers, **options)

    def __getattr__(self, attribute: str) -> Any:
        return getattr(self._inner, attribute)
