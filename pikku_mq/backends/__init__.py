"""Discovery backends, and :func:`deployment_service_from_url` to build one from a URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .._errors import ConfigurationError
from .base import DeploymentService
from .memory import MemoryDeploymentService, MemoryRegistry, named_registry

__all__ = [
    "DeploymentService",
    "MemoryDeploymentService",
    "MemoryRegistry",
    "deployment_service_from_url",
]

_SQLALCHEMY_ASYNC_DRIVERS = ("+asyncpg", "+aiosqlite", "+aiomysql", "+asyncmy", "+psycopg")


def deployment_service_from_url(url: str, **options: Any) -> DeploymentService:
    """Build the deployment service a URL names; ``options`` go to its constructor.

    - ``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``: the embedded SQLite file;
    - ``memory://`` (a registry of its own) or ``memory://name`` (shared by that name in this process);
    - ``redis://host:6379/0`` or ``rediss://...`` (TLS): Redis (:class:`RedisDeploymentService`), with
      options such as ``key_prefix``;
    - ``postgresql://...`` or ``postgres://...``: PostgreSQL through asyncpg (:class:`PgDeploymentService`);
    - an SQLAlchemy async URL such as ``postgresql+asyncpg://...`` or ``mysql+aiomysql://...``.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()

    if scheme == "memory":
        registry = named_registry(parts.netloc) if parts.netloc else MemoryRegistry()
        return MemoryDeploymentService(registry, **options)

    if scheme in ("redis", "rediss"):
        from .redis import RedisDeploymentService

        return RedisDeploymentService(url, **options)

    if scheme == "sqlite":
        from .sqlite import SqliteDeploymentService

        path = url[len("sqlite:///") :] if url.lower().startswith("sqlite:///") else ""
        if not path:
            raise ConfigurationError(f"discovery URL {url!r} names no file; use sqlite:///path/to/pikku.db")
        return SqliteDeploymentService(path, **options)

    if scheme in ("postgresql", "postgres"):
        from .postgres import PgDeploymentService

        return PgDeploymentService(url, **options)

    if any(driver in scheme for driver in _SQLALCHEMY_ASYNC_DRIVERS):
        from .sqlalchemy import SqlAlchemyDeploymentService

        return SqlAlchemyDeploymentService(url, **options)

    raise ConfigurationError(
        f"unsupported discovery URL {_redact(url)!r}; use sqlite:///path, memory://, postgresql://host/db, "
        "redis://host or an SQLAlchemy async URL such as mysql+aiomysql://host/db"
    )


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@", 1)
    return url
