"""In-process discovery: every service built on the same :class:`MemoryRegistry` sees the others."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .._types import DeploymentConfig, DeploymentInfo, DeploymentRecord
from .base import DeploymentService

__all__ = ["MemoryDeploymentService", "MemoryRegistry"]


@dataclass(slots=True)
class _Row:
    endpoint: str
    fallback_endpoints: tuple[str, ...]
    functions: tuple[str, ...]
    last_heartbeat: float


class MemoryRegistry:
    """The shared table of a set of :class:`MemoryDeploymentService` instances in one process.

    ``lookups`` counts ``find_function`` calls, which tests use to check the routing cache.
    """

    def __init__(self) -> None:
        self.rows: dict[str, _Row] = {}
        self.lookups = 0


_NAMED: dict[str, MemoryRegistry] = {}


def named_registry(name: str) -> MemoryRegistry:
    """Return the process-wide registry called ``name`` (what ``memory://name`` URLs share)."""
    return _NAMED.setdefault(name, MemoryRegistry())


class MemoryDeploymentService(DeploymentService):
    """Discovery in this process's memory, for tests and single-process applications.

    Services given the same ``registry`` see each other's registrations; by default each service
    gets a registry of its own.
    """

    def __init__(self, registry: MemoryRegistry | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.registry = registry if registry is not None else MemoryRegistry()

    async def _create_schema(self) -> None:
        return None

    async def _register(self, config: DeploymentConfig, functions: list[str]) -> None:
        self.registry.rows[config.deployment_id] = _Row(
            endpoint=config.endpoint,
            fallback_endpoints=tuple(config.fallback_endpoints),
            functions=tuple(functions),
            last_heartbeat=time.monotonic(),
        )

    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        row = self.registry.rows.get(config.deployment_id)
        if row is None:
            return False
        row.last_heartbeat = time.monotonic()
        return True

    async def _deregister(self, deployment_id: str) -> None:
        self.registry.rows.pop(deployment_id, None)

    async def _purge_stale(self) -> int:
        cutoff = time.monotonic() - self.heartbeat_ttl
        stale = [i for i, row in self.registry.rows.items() if row.last_heartbeat < cutoff]
        for deployment_id in stale:
            del self.registry.rows[deployment_id]
        return len(stale)

    async def find_function(self, name: str) -> list[DeploymentInfo]:
        self.registry.lookups += 1
        cutoff = time.monotonic() - self.heartbeat_ttl
        return [
            DeploymentInfo(deployment_id, row.endpoint, row.fallback_endpoints)
            for deployment_id, row in self.registry.rows.items()
            if name in row.functions and row.last_heartbeat >= cutoff
        ]

    async def list_deployments(self) -> list[DeploymentRecord]:
        now = time.monotonic()
        return [
            DeploymentRecord(
                deployment_id=deployment_id,
                endpoint=row.endpoint,
                functions=row.functions,
                heartbeat_age=now - row.last_heartbeat,
                state="live" if now - row.last_heartbeat <= self.heartbeat_ttl else "stale",
                fallback_endpoints=row.fallback_endpoints,
            )
            for deployment_id, row in sorted(self.registry.rows.items())
        ]
