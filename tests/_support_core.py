"""Helpers shared by the in-process test suites: a mesh on one memory registry and a counting transport."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, ClassVar, Self

from pikku_mq import (
    AiohttpTransport,
    ClientTransport,
    MemoryDeploymentService,
    MemoryRegistry,
    MemoryTransport,
    Reply,
    TransportSet,
)
from pikku_mq._types import CallRequest


class CountingTransport(ClientTransport):
    """An HTTP client transport that records the endpoint of every attempt, then sends it with aiohttp."""

    schemes: ClassVar[tuple[str, ...]] = ("http", "https")

    def __init__(self) -> None:
        self.inner = AiohttpTransport()
        self.attempts: list[str] = []

    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        self.attempts.append(endpoint)
        return await self.inner.call(endpoint, request, timeout)

    async def close(self) -> None:
        await self.inner.close()


class Mesh:
    """Deployment services that share one in-memory registry, closed together on exit."""

    def __init__(self) -> None:
        self.registry = MemoryRegistry()
        self._services: list[MemoryDeploymentService] = []

    def service(self, **options: Any) -> MemoryDeploymentService:
        service = MemoryDeploymentService(self.registry, **options)
        self._services.append(service)
        return service

    def counting_service(self, **options: Any) -> tuple[MemoryDeploymentService, CountingTransport]:
        """Return a caller's service whose HTTP attempts are recorded by the returned transport."""
        transport = CountingTransport()
        service = self.service(transports=TransportSet([transport, MemoryTransport()]), **options)
        return service, transport

    async def close(self) -> None:
        for service in self._services:
            await service.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


def closed_port() -> int:
    """Return a local TCP port that nothing listens on (bound once, then closed)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def wait_until(condition: Callable[[], Any], *, timeout: float, interval: float = 0.02) -> float:
    """Poll ``condition`` (a callable or a coroutine function) until it is true, and return the seconds waited.

    Raises AssertionError when it is still false after ``timeout`` seconds.
    """
    started = time.monotonic()
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition still false after {timeout} s")
        await asyncio.sleep(interval)
