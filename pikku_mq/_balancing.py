"""Balancing strategies: which live instance of a function takes the next call.

- ``round_robin`` (the default): each usable instance in turn, per function.
- ``random``: a usable instance chosen uniformly at random.
- ``least_loaded``: the less loaded of two usable instances chosen at random ("power of two
  choices"). An instance's load is the count of calls in flight that it last reported (with its
  registry heartbeat, or with a presence heartbeat on NATS and AMQP) plus the calls that this caller
  has in flight to it now. Without reports, the caller's own counts decide.
- ``prefer_local``: round-robin over the usable instances on this caller's host, and over all usable
  instances when none of them can take the call.

An instance is usable for a call unless it is out of routing (see :mod:`pikku_mq._outliers`) or the
call already failed on it. The router requests a pick that ignores ejection when every instance of a
function is out of routing.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Collection, Mapping
from ipaddress import ip_address
from typing import Literal
from urllib.parse import urlsplit

from ._errors import ConfigurationError
from ._outliers import OutlierDetector
from ._types import DeploymentInfo

__all__ = ["BALANCING_STRATEGIES", "Balancer", "Balancing", "check_balancing", "check_function_balancing", "is_local"]

Balancing = Literal["least_loaded", "prefer_local", "random", "round_robin"]

BALANCING_STRATEGIES: tuple[Balancing, ...] = ("least_loaded", "prefer_local", "random", "round_robin")

_SPELLINGS: dict[str, Balancing] = {
    **{name: name for name in BALANCING_STRATEGIES},
    **{name.replace("_", "-"): name for name in BALANCING_STRATEGIES},
}
"""Every accepted name of a strategy: ``least_loaded`` and ``least-loaded`` are the same."""

_MAX_REPORTS = 10_000
"""Load reports kept at most; past it they are dropped and gathered again from the next heartbeats."""


def check_balancing(value: object) -> Balancing:
    """Return the strategy that ``value`` names, or raise :class:`ConfigurationError` listing the valid names."""
    strategy = _SPELLINGS.get(value) if isinstance(value, str) else None
    if strategy is None:
        raise ConfigurationError(
            f"unknown balancing strategy {value!r:.80}; use one of {', '.join(BALANCING_STRATEGIES)}",
            payload={"balancing": repr(value)[:80], "valid": list(BALANCING_STRATEGIES)},
        )
    return strategy


def check_function_balancing(mapping: Mapping[str, str] | None) -> dict[str, Balancing]:
    """Validate a mapping of function names to strategies and return it with the names made canonical."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise ConfigurationError(
            f"function_balancing must map function names to strategies, got {type(mapping).__name__}"
        )
    checked: dict[str, Balancing] = {}
    for name, value in mapping.items():
        if not isinstance(name, str):
            raise ConfigurationError(f"function_balancing keys must be function names, got {name!r:.80}")
        checked[name] = check_balancing(value)
    return checked


def is_local(instance: DeploymentInfo, hostname: str) -> bool:
    """Return whether ``instance`` runs on the host named ``hostname``.

    An instance that registered a host name is local when that name equals ``hostname``. A row without
    one (written by Pikku or an older pikku_mq) is local when its preferred endpoint is an HTTP URL on a
    loopback address, such as ``http://127.0.0.1:8001`` or ``http://localhost:8001``.
    """
    if instance.hostname is not None:
        return instance.hostname == hostname
    parts = urlsplit(instance.endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


class Balancer:
    """Picks an instance for each attempt of a call, by strategy, and keeps the loads that least-loaded uses.

    ``outliers`` decides which instances are out of routing. Picking allocates nothing: it counts
    the usable instances, then walks to the chosen one.
    """

    def __init__(self, outliers: OutlierDetector) -> None:
        self._outliers = outliers
        self._counters: dict[str, itertools.count[int]] = {}
        self._reported: dict[str, int] = {}
        """Calls in flight by deployment id, as each instance last reported them."""
        self._outstanding: dict[str, int] = {}
        """Calls in flight from this caller, by deployment id; ids with none are removed."""
        self._random = random.Random()  # noqa: S311 - balancing, not security
        self._ignore_ejection = False
        """Set while :meth:`pick` runs with ``ignore_ejection``. Picking never awaits, so no other call reads it."""

    # -- loads -------------------------------------------------------------------------------------

    def report_load(self, deployment_id: str, in_flight: int) -> None:
        """Record the calls in flight that an instance reported.

        NOTE: reports are keyed by deployment id alone, so a presence heartbeat from another mesh on a
        shared broker, under a colliding id, changes the load that least-loaded compares for this one.
        """
        if len(self._reported) >= _MAX_REPORTS and deployment_id not in self._reported:
            self._reported.clear()
        self._reported[deployment_id] = in_flight

    def forget(self, deployment_id: str) -> None:
        """Drop the load an instance reported, once it has left."""
        self._reported.pop(deployment_id, None)

    def load(self, deployment_id: str) -> int:
        """Return the load that least-loaded compares: the reported calls plus this caller's own."""
        return self._reported.get(deployment_id, 0) + self._outstanding.get(deployment_id, 0)

    def started(self, deployment_id: str) -> None:
        """Count an attempt that this caller sends to the instance."""
        self._outstanding[deployment_id] = self._outstanding.get(deployment_id, 0) + 1

    def finished(self, deployment_id: str) -> None:
        """Count an attempt to the instance as finished, whatever its outcome."""
        left = self._outstanding.get(deployment_id, 0) - 1
        if left > 0:
            self._outstanding[deployment_id] = left
        else:
            self._outstanding.pop(deployment_id, None)

    # -- picking -----------------------------------------------------------------------------------

    def pick(
        self,
        name: str,
        instances: list[DeploymentInfo],
        local: list[DeploymentInfo],
        strategy: Balancing,
        exclude: Collection[str] | None,
        *,
        ignore_ejection: bool = False,
    ) -> DeploymentInfo | None:
        """Return the instance of ``name`` for the next attempt, or None if no instance is usable.

        ``local`` contains the instances on this caller's host, and ``exclude`` the deployment ids
        that this call must not use again. ``ignore_ejection`` counts the instances that are out of
        routing as usable.
        """
        if strategy == "round_robin" and not exclude and not ignore_ejection and not self._outliers.active:
            # Every instance is usable, so the next one in turn is picked without reading the clock.
            if not instances:
                return None
            counter = self._counters.get(name)
            if counter is None:
                counter = self._counters[name] = itertools.count()
            return instances[next(counter) % len(instances)]
        if ignore_ejection:
            self._ignore_ejection = True
            try:
                return self._pick(name, instances, local, strategy, exclude)
            finally:
                self._ignore_ejection = False
        return self._pick(name, instances, local, strategy, exclude)

    def _pick(
        self,
        name: str,
        instances: list[DeploymentInfo],
        local: list[DeploymentInfo],
        strategy: Balancing,
        exclude: Collection[str] | None,
    ) -> DeploymentInfo | None:
        now = time.monotonic()
        if strategy == "round_robin":
            return self._round_robin(name, instances, exclude, now)
        if strategy == "least_loaded":
            return self._least_loaded(instances, exclude, now)
        if strategy == "random":
            count = self._count_usable(instances, exclude, now)
            return self._nth_usable(instances, self._random.randrange(count), exclude, now) if count else None
        # prefer_local
        chosen = self._round_robin(name, local, exclude, now) if local else None
        return chosen if chosen is not None else self._round_robin(name, instances, exclude, now)

    def _round_robin(
        self, name: str, instances: list[DeploymentInfo], exclude: Collection[str] | None, now: float
    ) -> DeploymentInfo | None:
        count = self._count_usable(instances, exclude, now)
        if not count:
            return None
        counter = self._counters.get(name)
        if counter is None:
            counter = self._counters[name] = itertools.count()
        return self._nth_usable(instances, next(counter) % count, exclude, now)

    def _least_loaded(
        self, instances: list[DeploymentInfo], exclude: Collection[str] | None, now: float
    ) -> DeploymentInfo | None:
        count = self._count_usable(instances, exclude, now)
        if count <= 1:
            return self._nth_usable(instances, 0, exclude, now) if count else None

        # Two distinct usable instances, uniformly at random; the second index skips the first.
        first = self._random.randrange(count)
        second = self._random.randrange(count - 1)
        if second >= first:
            second += 1
        a = self._nth_usable(instances, first, exclude, now)
        b = self._nth_usable(instances, second, exclude, now)
        # Both indexes are below the count of usable instances.
        assert a is not None
        assert b is not None
        return b if self.load(b.deployment_id) < self.load(a.deployment_id) else a

    def _usable(self, instance: DeploymentInfo, exclude: Collection[str] | None, now: float) -> bool:
        deployment_id = instance.deployment_id
        if exclude and deployment_id in exclude:
            return False
        return self._ignore_ejection or self._outliers.admits(deployment_id, now)

    def _count_usable(self, instances: list[DeploymentInfo], exclude: Collection[str] | None, now: float) -> int:
        if not exclude and (self._ignore_ejection or not self._outliers.active):
            return len(instances)
        return sum(1 for instance in instances if self._usable(instance, exclude, now))

    def _nth_usable(
        self, instances: list[DeploymentInfo], index: int, exclude: Collection[str] | None, now: float
    ) -> DeploymentInfo | None:
        """Return the usable instance at ``index`` among the usable ones, in list order."""
        if not exclude and (self._ignore_ejection or not self._outliers.active):
            return instances[index]
        for instance in instances:
            if self._usable(instance, exclude, now):
                if index == 0:
                    return instance
                index -= 1
        return None
