"""In-process discovery: every service built on the same :class:`MemoryRegistry` finds the others."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from .._types import DeploymentConfig, DeploymentInfo, DeploymentRecord
from .base import DeploymentService, conflict_error

__all__ = ["MemoryDeploymentService", "MemoryRegistry"]


@dataclass(slots=True)
class _Row:
    endpoint: str
    fallback_endpoints: tuple[str, ...]
    functions: tuple[str, ...]
    last_heartbeat: float
    heartbeat_ttl: float
    hostname: str | None = None
    in_flight: int | None = None
    idempotent_functions: tuple[str, ...] = ()

    def age(self) -> float:
        return time.monotonic() - self.last_heartbeat

    def is_live(self) -> bool:
        return self.age() <= self.heartbeat_ttl


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
        holder = self.registry.rows.get(config.deployment_id)
        if holder is not None and holder.endpoint != config.endpoint and holder.is_live():
            raise conflict_error(config.deployment_id, holder.endpoint, holder.age(), holder.heartbeat_ttl)
        self.registry.rows[config.deployment_id] = _Row(
            endpoint=config.endpoint,
            fallback_endpoints=tuple(config.fallback_endpoints),
            functions=tuple(functions),
            last_heartbeat=time.monotonic(),
            heartbeat_ttl=self.heartbeat_ttl,
            hostname=config.hostname,
            in_flight=self._in_flight(),
            idempotent_functions=tuple(config.idempotent_functions),
        )

    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        row = self.registry.rows.get(config.deployment_id)
        if row is None or row.endpoint != config.endpoint:
            return False
        row.last_heartbeat = time.monotonic()
        row.in_flight = self._in_flight()
        return True

    async def _deregister(self, config: DeploymentConfig) -> None:
        row = self.registry.rows.get(config.deployment_id)
        if row is not None and row.endpoint == config.endpoint:
            del self.registry.rows[config.deployment_id]

    async def _purge_stale(self) -> int:
        stale = [i for i, row in self.registry.rows.items() if not row.is_live()]
        for deployment_id in stale:
            del self.registry.rows[deployment_id]
        return len(stale)

    async def find_function(self, name: str) -> list[DeploymentInfo]:
        self.registry.lookups += 1
        return [
            DeploymentInfo(
                deployment_id,
                row.endpoint,
                row.fallback_endpoints,
                row.in_flight,
                row.hostname,
                name in row.idempotent_functions,
            )
            for deployment_id, row in self.registry.rows.items()
            if name in row.functions and row.is_live()
        ]

    async def list_deployments(self) -> list[DeploymentRecord]:
        return [
            DeploymentRecord(
                deployment_id=deployment_id,
                endpoint=row.endpoint,
                functions=row.functions,
                heartbeat_age=row.age(),
                state="live" if row.is_live() else "stale",
                fallback_endpoints=row.fallback_endpoints,
                in_flight=row.in_flight,
                hostname=row.hostname,
                idempotent_functions=row.idempotent_functions,
            )
            for deployment_id, row in sorted(self.registry.rows.items())
        ]
