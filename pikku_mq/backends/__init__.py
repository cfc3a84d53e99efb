"""Discovery backends, and :func:`deployment_service_from_url` to build one from a URL."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

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


_PASSWORD_PARAMETERS = frozenset({"password", "passwd"})
"""Query parameters that carry a password: redis-py, asyncpg and the MySQL drivers take them from a URL."""


def _redact(url: str) -> str:
    """Return ``url`` with its password replaced by ``***``, whether in the user info or the query."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password:
        userinfo, _, host = netloc.rpartition("@")
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(key.lower() in _PASSWORD_PARAMETERS for key, _ in pairs):
        query = urlencode(
            [(key, "***" if key.lower() in _PASSWORD_PARAMETERS else value) for key, value in pairs], safe="*"
        )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
