"""A testing kit: several deployments in one process, with faults injected on demand.

:class:`Mesh` runs each deployment as a real :class:`~pikku_mq.PikkuWorker` on a ``memory://``
endpoint, registered in an in-memory registry that the mesh shares, so calls go through the same
routing, balancing, retries, de-duplication and error envelopes as over a network::

    from pikku_mq.testing import Mesh

    async def test_failover() -> None:
        async with Mesh() as mesh:
            a = await mesh.add("a", functions=[greet])
            b = await mesh.add("b", functions=[greet])
            await a.kill()
            assert await mesh.caller().remote("greet", {"name": "Ada"}) == {"greeting": "Hello, Ada!"}

Each fault raises on the caller what the same fault raises over HTTP, NATS or AMQP:

========================  =====================================================================
``await d.kill()``        connection refused (:class:`EndpointUnreachableError`): the call moves to
                          another instance, else :class:`RoutingError`. The registration stays until
                          its TTL passes, as after SIGKILL. Calls in flight fail with
                          :class:`TransportError`, since the function may have run.
``d.freeze()``            the deployment takes calls and never replies until ``d.thaw()``, as under
                          SIGSTOP: each attempt ends in :class:`DeadlineExceededError` at its timeout,
                          and only idempotent calls are retried. Held calls run after the thaw, as a
                          resumed process reads its socket. Heartbeats stop meanwhile.
``d.make_busy()``         every call gets :class:`BusyError` before it runs, so the caller moves to
                          another instance, else raises it.
``d.payload_limit = n``   a request body of more than ``n`` bytes of JSON gets
                          :class:`PayloadTooLargeError` (status 413), as a worker's ``max_body_size``.
``mesh.drop_registry()``  the registry is unreachable: lookups fail with :class:`DiscoveryError` unless
                          a caller still has a lookup cached, and heartbeats fail until
                          ``mesh.restore_registry()``.
========================  =====================================================================
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, ClassVar, Literal, Self
from urllib.parse import urlsplit

from ._errors import (
    BusyError,
    ConfigurationError,
    DeadlineExceededError,
    EndpointUnreachableError,
    PayloadTooLargeError,
    TransportError,
)
from ._functions import FunctionDefinition, FunctionRegistry
from ._rpc import RPC
from ._security import RemoteSecurity, _check_secret
from ._types import CallRequest, DeploymentConfig, DeploymentInfo, DeploymentRecord
from ._worker import PikkuWorker
from .backends.base import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TTL, DeploymentService
from .backends.memory import MemoryDeploymentService, MemoryRegistry
from .transports.base import Reply, TransportSet
from .transports.http import encode_request
from .transports.memory import MemoryTransport

__all__ = ["Deployment", "DeploymentState", "Mesh"]

DeploymentState = Literal["running", "frozen", "killed", "stopped"]

_mesh_ids = itertools.count(1)
"""Numbers the meshes of this process, so that their ``memory://`` endpoints never collide."""


class Mesh:
    """Deployments and callers that share one in-memory registry and one set of fault switches.

    ``heartbeat_interval`` and ``heartbeat_ttl`` (seconds) are the defaults of every deployment and
    caller of the mesh. ``secret`` (at least 32 characters) turns on signed calls and session
    forwarding for all of them, as ``PIKKU_REMOTE_SECRET`` does. Without it the mesh ignores that
    variable, so a test behaves the same whatever the environment contains.
    """

    def __init__(
        self,
        *,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        heartbeat_ttl: float = DEFAULT_HEARTBEAT_TTL,
        secret: str | None = None,
    ) -> None:
        self.registry = MemoryRegistry()
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl = heartbeat_ttl
        if secret is not None:
            # Checked here so that the error names this argument, not the environment variable.
            _check_secret(secret, "the secret argument of Mesh")
        self.security: RemoteSecurity | None = RemoteSecurity(secret) if secret is not None else None
        self.registry_available = True
        """False between :meth:`drop_registry` and :meth:`restore_registry`."""
        self._id = next(_mesh_ids)
        self._deployments: dict[str, Deployment] = {}
        self._by_address: dict[str, Deployment] = {}
        self._callers: list[DeploymentService] = []
        self._closed = False

    # -- building ----------------------------------------------------------------------------------

    async def add(
        self,
        deployment_id: str,
        *,
        functions: Iterable[Callable[..., Any] | FunctionDefinition | str] | None = None,
        services: Any = None,
        registry: FunctionRegistry | None = None,
        payload_limit: int | None = None,
        worker_options: dict[str, Any] | None = None,
        **service_options: Any,
    ) -> Deployment:
        """Start a deployment that serves ``functions`` and register it; return its handle.

        ``functions``, ``services`` and ``registry`` are as for :class:`~pikku_mq.PikkuWorker`: by
        default the deployment serves every exposed function of ``registry``. ``payload_limit`` is in
        bytes (see :attr:`Deployment.payload_limit`). ``worker_options`` go to the worker (for example
        ``max_in_flight`` or ``drain_timeout`` in seconds), and the other keyword arguments to its
        deployment service, which also makes the deployment's own calls (for example ``retry``,
        ``balancing`` or ``routing_cache_ttl``).
        """
        self._check_open()
        if not isinstance(deployment_id, str) or not deployment_id:
            raise ConfigurationError(f"deployment_id must be a non-empty string, got {deployment_id!r}")
        if deployment_id in self._deployments:
            raise ConfigurationError(f"the mesh already has a deployment '{deployment_id}'; give each a unique id")
        endpoint = f"memory://pikku-mesh-{self._id}-{len(self._deployments) + 1}"
        deployment = Deployment(
            self,
            deployment_id,
            endpoint,
            functions=list(functions) if functions is not None else None,
            services=services,
            registry=registry,
            worker_options=dict(worker_options or {}),
            service_options=service_options,
        )
        deployment.payload_limit = payload_limit
        await deployment.start()
        self._deployments[deployment_id] = deployment
        self._by_address[urlsplit(endpoint).netloc] = deployment
        return deployment

    def service(self, **service_options: Any) -> DeploymentService:
        """Return a deployment service on the mesh's registry that never registers, for calls from a test.

        The keyword arguments are those of :class:`~pikku_mq.DeploymentService`. The mesh closes it on exit.
        """
        self._check_open()
        service = self._new_service(service_options)
        self._callers.append(service)
        return service

    def caller(self, **service_options: Any) -> RPC:
        """Return an :class:`~pikku_mq.RPC` that calls the mesh's deployments from outside any of them.

        The keyword arguments configure its deployment service, as for :meth:`service`.
        """
        service = self.service(**service_options)
        return RPC(registry=FunctionRegistry(), deployment_service=service, default_timeout=service.default_timeout)

    def __getitem__(self, deployment_id: str) -> Deployment:
        return self._deployments[deployment_id]

    @property
    def deployments(self) -> list[Deployment]:
        """The deployments in the order they were added."""
        return list(self._deployments.values())

    # -- registry faults ---------------------------------------------------------------------------

    def drop_registry(self) -> None:
        """Make the registry unreachable until :meth:`restore_registry`; it keeps its rows meanwhile."""
        self.registry_available = False

    def restore_registry(self) -> None:
        """Make the registry reachable again after :meth:`drop_registry`."""
        self.registry_available = True

    def wipe_registry(self) -> None:
        """Delete every registration, as a store that restarts empty does.

        Each running deployment registers again with its next heartbeat.
        """
        self.registry.rows.clear()

    # -- lifecycle ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Stop every deployment and close every caller.

        Calls still held by a fault fail on their callers with :class:`TransportError`.
        """
        if self._closed:
            return
        self._closed = True
        self.registry_available = True
        for deployment in self._deployments.values():
            await deployment._shut_down()
        callers, self._callers = self._callers, []
        for service in callers:
            await service.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # -- internals ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError("the mesh is closed; create a new Mesh")

    def _new_service(self, options: dict[str, Any]) -> _MeshDeploymentService:
        settings: dict[str, Any] = {
            "heartbeat_interval": self.heartbeat_interval,
            "heartbeat_ttl": self.heartbeat_ttl,
            "security": self.security or False,
        }
        settings.update(options)
        if "transports" in settings:
            raise ConfigurationError("a mesh service uses the mesh's own transport; remove the transports option")
        settings["transports"] = TransportSet([_MeshTransport(self)])
        return _MeshDeploymentService(self, **settings)


class Deployment:
    """One deployment of a :class:`Mesh`: a worker, its deployment service and the faults it has.

    ``deployment_id`` and ``endpoint`` stay the same across restarts, as for a process restarted on
    a fixed port.
    """

    def __init__(
        self,
        mesh: Mesh,
        deployment_id: str,
        endpoint: str,
        *,
        functions: list[Callable[..., Any] | FunctionDefinition | str] | None,
        services: Any,
        registry: FunctionRegistry | None,
        worker_options: dict[str, Any],
        service_options: dict[str, Any],
    ) -> None:
        self.mesh = mesh
        self.deployment_id = deployment_id
        self.endpoint = endpoint
        self.state: DeploymentState = "stopped"
        self.busy = False
        """Whether every call gets :class:`BusyError` before it runs; set by :meth:`make_busy`."""
        self.calls_received = 0
        """Calls that reached the deployment, across restarts, rejected ones included; refused ones are not counted."""
        self._payload_limit: int | None = None
        self._functions = functions
        self._services = services
        self._registry = registry
        self._worker_options = worker_options
        self._service_options = service_options
        self._worker: PikkuWorker | None = None
        self._service: _MeshDeploymentService | None = None
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._held: set[asyncio.Task[Reply]] = set()
        """Calls taken by this process and not yet replied to, so that a kill can break them off."""

    def __repr__(self) -> str:
        return f"<Deployment {self.deployment_id!r} {self.state} at {self.endpoint}>"

    # -- what a test uses --------------------------------------------------------------------------

    @property
    def rpc(self) -> RPC:
        """The RPC of code running in this deployment: ``invoke`` runs its own functions here, ``remote`` routes."""
        worker, service = self._worker, self._service
        if worker is None or service is None or self.state in ("killed", "stopped"):
            raise ConfigurationError(
                f"deployment '{self.deployment_id}' is {self.state} and makes no calls; start it again with "
                "await deployment.start(), or call through mesh.caller()"
            )
        return RPC(
            registry=worker.registry,
            services=self._services,
            deployment_service=service,
            default_timeout=service.default_timeout,
        )

    @property
    def service(self) -> DeploymentService:
        """The deployment service of the running process (its router shows ejections and loads)."""
        if self._service is None:
            raise ConfigurationError(f"deployment '{self.deployment_id}' is {self.state} and has no service")
        return self._service

    @property
    def worker(self) -> PikkuWorker:
        """The worker of the running process."""
        if self._worker is None:
            raise ConfigurationError(f"deployment '{self.deployment_id}' is {self.state} and has no worker")
        return self._worker

    @property
    def payload_limit(self) -> int | None:
        """The largest request body that this deployment takes, in bytes of JSON ``{"data": ...}``, or None."""
        return self._payload_limit

    @payload_limit.setter
    def payload_limit(self, limit: int | None) -> None:
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigurationError(f"payload_limit must be a positive number of bytes or None, got {limit!r}")
        self._payload_limit = limit

    # -- faults ------------------------------------------------------------------------------------

    async def kill(self) -> None:
        """Stop at once, as after SIGKILL: no deregistration, no draining, no leave announcement.

        Later calls are refused. Calls in flight, and calls held by :meth:`freeze`, fail on their
        callers with :class:`TransportError`.
        """
        self._require("kill", "running", "frozen")
        self.state = "killed"
        self._thawed.set()
        await self._halt()

    def freeze(self) -> None:
        """Take calls and hold their replies until :meth:`thaw`, as a process stopped with SIGSTOP.

        Held calls start after the thaw. Functions that already run go on, but their replies wait
        for the thaw. The registration gets no heartbeat meanwhile, so it expires after its TTL.
        """
        self._require("freeze", "running")
        self.state = "frozen"
        self._thawed.clear()

    def thaw(self) -> None:
        """Resume after :meth:`freeze`: held calls run, replies go out and heartbeats resume."""
        self._require("thaw", "frozen")
        self.state = "running"
        self._thawed.set()

    def make_busy(self, busy: bool = True) -> None:
        """Reply :class:`BusyError` to every call before it runs, or stop doing so with ``busy=False``.

        Raises :class:`ConfigurationError` unless the deployment is running or frozen. A restart starts it
        not busy, as a new process.
        """
        self._require("call make_busy() on", "running", "frozen")
        self.busy = busy

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the deployment, or start it again after :meth:`stop` or :meth:`kill`, as a new process."""
        self._require("start", "stopped", "killed")
        service = self.mesh._new_service(self._service_options)
        options: dict[str, Any] = {"security": self.mesh.security or False}
        options.update(self._worker_options)
        worker = PikkuWorker(
            endpoint=self.endpoint,
            deployment_id=self.deployment_id,
            functions=self._functions,
            services=self._services,
            registry=self._registry,
            deployment_service=service,
            **options,
        )
        try:
            await worker.start()
        except BaseException:
            await service.close()
            raise
        self._worker, self._service = worker, service
        self.state = "running"
        self.busy = False

    async def stop(self) -> None:
        """Stop gracefully, as after SIGTERM: deregister, finish the calls in flight, then stop listening."""
        self._require("stop", "running", "frozen")
        self._thawed.set()
        self.state = "stopped"
        worker, service = self._worker, self._service
        self._worker = self._service = None
        if worker is not None:
            await worker.stop()
        if service is not None:
            await service.close()

    async def _shut_down(self) -> None:
        """Stop whatever is left of this deployment when the mesh closes."""
        if self.state in ("running", "frozen"):
            self._break_held()
            await self.stop()

    async def _halt(self) -> None:
        """Stop serving and heartbeating without any of the goodbyes of :meth:`stop`."""
        self._break_held()
        worker, service = self._worker, self._service
        self._worker = self._service = None
        if worker is not None:
            # A killed process sends nothing more: no presence, no drain, no leave.
            worker._started = False
            await worker._stop_presence()
            await worker._close_listener()
        if service is not None:
            await service._stop_heartbeats()
            service._config = None  # so that closing it does not deregister
            await service.close()

    def _break_held(self) -> None:
        for task in list(self._held):
            task.cancel()

    def _require(self, action: str, *states: DeploymentState) -> None:
        if self.state not in states:
            raise ConfigurationError(
                f"cannot {action} deployment '{self.deployment_id}' while it is {self.state}; "
                f"it must be {' or '.join(states)}"
            )

    # -- the server side of the mesh transport -----------------------------------------------------

    async def _receive(
        self,
        endpoint: str,
        request: CallRequest,
        timeout: float,
        deliver: Callable[[str, CallRequest, float], Awaitable[Reply]],
    ) -> Reply:
        """Take one call at this deployment's endpoint, with the faults that are switched on."""
        if self.state in ("killed", "stopped"):
            raise EndpointUnreachableError(
                f"cannot connect to {endpoint}: deployment '{self.deployment_id}' is {self.state}"
            )
        self.calls_received += 1

        # The body is serialised once, as a network transport does before it sends, so that a held
        # call is not affected by later changes to the caller's data or to the request's headers.
        body = encode_request(request)
        if self._payload_limit is not None and len(body) > self._payload_limit:
            error = PayloadTooLargeError(
                f"request body is larger than the limit of {self._payload_limit} bytes",
                payload={"max_body_size": self._payload_limit},
            )
            return Reply(error.status, error.to_envelope())
        if self.busy:
            max_in_flight = self._worker.dispatcher.max_in_flight if self._worker is not None else 0
            busy = BusyError(
                f"instance '{self.deployment_id}' is busy: the test mesh made it reply busy to every call",
                payload={"deployment_id": self.deployment_id, "max_in_flight": max_in_flight},
            )
            return Reply(busy.status, busy.to_envelope(), rejected=True)

        sent = CallRequest(request.name, json.loads(body)["data"], dict(request.headers))
        task = asyncio.get_running_loop().create_task(self._serve(endpoint, sent, timeout, deliver))
        self._held.add(task)
        task.add_done_callback(self._held.discard)
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            # The caller gives up; the call goes on here, as on a worker whose caller disconnected.
            raise DeadlineExceededError(
                f"no reply from {endpoint} to '{request.name}' within {timeout:.3f} s"
            ) from None
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and current is not None and not current.cancelling():
                raise TransportError(
                    f"call to '{request.name}' at {endpoint} failed: the connection was lost because "
                    f"deployment '{self.deployment_id}' was killed or the mesh closed"
                ) from None
            raise

    async def _serve(
        self,
        endpoint: str,
        request: CallRequest,
        timeout: float,
        deliver: Callable[[str, CallRequest, float], Awaitable[Reply]],
    ) -> Reply:
        await self._thawed.wait()
        reply = await deliver(endpoint, request, timeout)
        await self._thawed.wait()  # a reply finished while frozen goes out after the thaw
        return reply


class _MeshTransport(MemoryTransport):
    """The client transport of a mesh: ``memory://`` calls, passed through the faults of the deployment they reach."""

    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self, mesh: Mesh) -> None:
        super().__init__()
        self._mesh = mesh

    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        deployment = self._mesh._by_address.get(urlsplit(endpoint).netloc)
        if deployment is None:
            return await super().call(endpoint, request, timeout)
        return await deployment._receive(endpoint, request, timeout, super().call)


class _MeshDeploymentService(MemoryDeploymentService):
    """The in-memory deployment service, failing as an unreachable store while the mesh's registry is dropped.

    A frozen deployment's heartbeats leave its registration as it was, so it expires after its TTL.
    """

    def __init__(self, mesh: Mesh, **options: Any) -> None:
        super().__init__(mesh.registry, **options)
        self._mesh = mesh

    def __repr__(self) -> str:
        return f"<registry of test Mesh {self._mesh._id}>"

    def _check_reachable(self) -> None:
        if not self._mesh.registry_available:
            raise ConnectionRefusedError("the registry of the test mesh was dropped (Mesh.drop_registry)")

    def _frozen(self, config: DeploymentConfig) -> bool:
        deployment = self._mesh._deployments.get(config.deployment_id)
        return deployment is not None and deployment.state == "frozen" and deployment.endpoint == config.endpoint

    async def _create_schema(self) -> None:
        self._check_reachable()

    async def _register(self, config: DeploymentConfig, functions: list[str]) -> None:
        self._check_reachable()
        await super()._register(config, functions)

    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        self._check_reachable()
        if self._frozen(config):
            return True
        return await super()._heartbeat(config, functions)

    async def _deregister(self, config: DeploymentConfig) -> None:
        self._check_reachable()
        await super()._deregister(config)

    async def _purge_stale(self) -> int:
        self._check_reachable()
        return await super()._purge_stale()

    async def find_function(self, name: str) -> list[DeploymentInfo]:
        self._check_reachable()
        return await super().find_function(name)

    async def list_deployments(self) -> list[DeploymentRecord]:
        self._check_reachable()
        return await super().list_deployments()
