"""Plain data shared by the backends, transports and the worker."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_TIMEOUT",
    "HEADER_CALL_ID",
    "HEADER_DEADLINE",
    "HEADER_HOP",
    "HEADER_REQUEST_ID",
    "MAX_DEADLINE_DIGITS",
    "MAX_HOPS",
    "MAX_HOP_DIGITS",
    "CallRequest",
    "DeploymentConfig",
    "DeploymentInfo",
    "DeploymentRecord",
]

# Metadata headers, named the same on every transport.
HEADER_REQUEST_ID = "x-request-id"
HEADER_CALL_ID = "pikku-call-id"
HEADER_DEADLINE = "pikku-deadline-ms"
HEADER_HOP = "pikku-hop"

DEFAULT_TIMEOUT = 30.0
"""Default deadline of a remote call, in seconds."""

MAX_HOPS = 16
"""A call that has been forwarded this many times is rejected as a loop."""

MAX_DEADLINE_DIGITS = 18
"""Maximum number of digits in a ``pikku-deadline-ms`` header, so that every valid value fits in a signed
64-bit integer."""

MAX_HOP_DIGITS = 6
"""Maximum number of digits in a ``pikku-hop`` header. A worker rejects any value above ``MAX_HOPS`` as a
loop anyway."""


@dataclass(frozen=True, slots=True)
class DeploymentConfig:
    """The registration of an instance: its id, its preferred endpoint, fallbacks and functions.

    ``functions=None`` lets the worker register its exposed functions. ``hostname`` names the host the
    instance runs on, for callers that prefer local instances; None lets the deployment service fill in
    its own ``hostname``. ``idempotent_functions`` names the functions among ``functions`` that are
    safe to run twice, so that callers without their definitions retry them after an uncertain
    failure; PikkuWorker fills it from ``idempotent=True``.
    """

    deployment_id: str
    endpoint: str
    functions: Sequence[str] | None = None
    fallback_endpoints: Sequence[str] = ()
    hostname: str | None = None
    idempotent_functions: Sequence[str] = ()

    def __post_init__(self) -> None:
        if not self.deployment_id:
            raise ValueError("deployment_id must not be empty")
        if not self.endpoint:
            raise ValueError("endpoint must not be empty")
        if isinstance(self.functions, str):
            raise TypeError("functions must be a sequence of function names, not a string")
        if isinstance(self.fallback_endpoints, str):
            raise TypeError("fallback_endpoints must be a sequence of URLs, not a string")
        if self.hostname is not None and not self.hostname:
            raise ValueError("hostname must not be empty; pass None to use the deployment service's hostname")
        if isinstance(self.idempotent_functions, str):
            raise TypeError("idempotent_functions must be a sequence of function names, not a string")


@dataclass(frozen=True, slots=True)
class DeploymentInfo:
    """A live instance that hosts a function, as ``find_function`` returns it.

    ``in_flight`` and ``hostname`` are None where the registry row has none, as in rows that Pikku
    writes. They are left out of comparisons, because the load changes with every heartbeat.
    ``idempotent`` is whether the instance registered the function that was looked up as idempotent
    (False for rows without that information).
    """

    deployment_id: str
    endpoint: str
    fallback_endpoints: tuple[str, ...] = ()
    in_flight: int | None = field(default=None, compare=False)
    """Calls in flight that the instance reported with its last heartbeat."""
    hostname: str | None = field(default=None, compare=False)
    """The host name the instance registered with."""
    idempotent: bool = field(default=False, compare=False)


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    """One row of the registry, as ``list_deployments`` returns it (for ``pikku-mq ls``)."""

    deployment_id: str
    endpoint: str
    functions: tuple[str, ...]
    heartbeat_age: float
    """Seconds since the last heartbeat, by the registry's clock."""
    state: str
    """``live`` or ``stale`` (no heartbeat within the TTL)."""
    fallback_endpoints: tuple[str, ...] = ()
    in_flight: int | None = None
    """Calls in flight that the instance reported with its last heartbeat, or None if it reports none."""
    hostname: str | None = None
    """The host name the instance registered with, or None if the row has none."""
    idempotent_functions: tuple[str, ...] = ()
    """The functions the instance registered as idempotent."""


@dataclass(slots=True)
class CallRequest:
    """One call as the transports carry it: the function name, ``data`` and the metadata headers."""

    name: str
    data: Any
    headers: dict[str, str] = field(default_factory=dict)
