"""In-memory transport: endpoints ``memory://<name>`` served by dispatchers in this process.

It carries calls through the same admission, validation and error envelopes as the network
transports, with the data converted to JSON-compatible values on the way, so tests that use it see
what a remote caller would see.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, ClassVar
from urllib.parse import urlsplit

import pydantic_core

from .._durable import HEADER_ONE_WAY
from .._errors import BadRequestError, EndpointUnreachableError
from .._presence import ChangeEvent, ChangeKind
from .._types import CallRequest
from .base import ClientTransport, PresenceListener, Reply, ServerTransport

if TYPE_CHECKING:
    from .._dispatch import Dispatcher

__all__ = ["MemoryServer", "MemoryTransport", "serve_memory", "unserve_memory"]

_SERVED: dict[str, Dispatcher] = {}

_CLIENTS: weakref.WeakSet[MemoryTransport] = weakref.WeakSet()
"""The client transports of this process, which receive the presence events of memory workers."""


def serve_memory(endpoint: str, dispatcher: Dispatcher) -> None:
    """Serve calls to ``endpoint`` (``memory://<name>``) in this process with ``dispatcher``."""
    _SERVED[_address(endpoint)] = dispatcher


def unserve_memory(endpoint: str) -> None:
    """Stop serving ``endpoint``; later calls to it fail as unreachable."""
    _SERVED.pop(_address(endpoint), None)


class MemoryServer(ServerTransport):
    """Serves a ``memory://<name>`` endpoint to callers in this process."""

    def __init__(self) -> None:
        self._endpoint: str | None = None

    async def start(self, endpoint: str, dispatcher: Dispatcher) -> str:
        serve_memory(endpoint, dispatcher)
        self._endpoint = endpoint
        return endpoint

    async def stop(self) -> None:
        if self._endpoint is not None:
            unserve_memory(self._endpoint)
            self._endpoint = None

    async def announce(self, kind: ChangeKind, deployment_id: str, in_flight: int | None = None) -> None:
        event = ChangeEvent(kind, deployment_id, self._endpoint or "", in_flight)
        for client in list(_CLIENTS):
            if client.presence_listener is not None:
                client.presence_listener(event)


class MemoryTransport(ClientTransport):
    schemes: ClassVar[tuple[str, ...]] = ("memory",)

    def __init__(self) -> None:
        self.presence_listener: PresenceListener | None = None
        _CLIENTS.add(self)

    def set_presence_listener(self, listener: PresenceListener | None) -> None:
        self.presence_listener = listener

    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        dispatcher = _SERVED.get(_address(endpoint))
        if dispatcher is None:
            raise EndpointUnreachableError(f"nothing serves {endpoint} in this process")
        try:
            data = pydantic_core.to_jsonable_python(request.data)
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            raise BadRequestError(f"data for function '{request.name}' cannot be serialised: {exc}") from None

        if request.headers.get(HEADER_ONE_WAY) == "1":
            rejection = dispatcher.accept_one_way(request.name, data, request.headers)
            if rejection is None:
                return Reply(status=202, body=None)
            outcome = rejection
        else:
            outcome = await dispatcher.handle(request.name, data, request.headers, "memory")
        status, body = outcome.encode_python()
        return Reply(status=status, body=body, rejected=outcome.rejected)


def _address(endpoint: str) -> str:
    return urlsplit(endpoint).netloc
