"""Outlier ejection: a caller takes an instance that keeps failing out of routing for a growing interval.

A failure of an instance is an attempt that ended without the function's result or error: every
endpoint refused or was unreachable, the connection was lost, no reply came in time, the reply was
not pikku_mq's (such as a proxy's 502 page), or the worker stopped mid-call or gave up at the call's
deadline. An error that the function raised (a 4xx, a 500 ``InternalServerError``) counts as a reply
of the instance, and so does a ``BusyError``. An instance that certainly cannot take calls now
(unreachable, or draining) is ejected at once; any other instance is ejected after
``consecutive_failures`` failures in a row.

An ejected instance gets no calls until its interval ends. The interval starts at ``base_interval``
and doubles with each ejection in a row, up to ``max_interval``. Then one call is let through as a
probe: a reply puts the instance back in routing, a failure ejects it for the next interval. Each
caller logs one line when an instance is ejected and one when it is back, never one per call.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

from ._errors import ConfigurationError, check_seconds

__all__ = ["EjectionPolicy", "OutlierDetector"]

logger = logging.getLogger(__name__)

_MAX_TRACKED = 10_000
"""Instances whose failures are tracked at most; past it, those that are not out of routing are forgotten."""


@dataclass(frozen=True, slots=True)
class EjectionPolicy:
    """When a caller takes a failing instance out of routing, and for how long.

    ``consecutive_failures`` is the count of failures in a row that ejects an instance whose failures
    leave it unclear whether it can take calls. ``base_interval`` and ``max_interval`` are in seconds.
    ``max_interval=None`` uses the deployment service's heartbeat TTL, after which an instance that
    stopped heartbeating has left the registry anyway.
    """

    consecutive_failures: int = 5
    base_interval: float = 0.5
    max_interval: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.consecutive_failures, bool) or not isinstance(self.consecutive_failures, int):
            raise ConfigurationError(
                f"consecutive_failures must be an integer, got {type(self.consecutive_failures).__name__}"
            )
        if self.consecutive_failures < 1:
            raise ConfigurationError(f"consecutive_failures must be at least 1, got {self.consecutive_failures}")
        check_seconds(self.base_interval, "base_interval")
        if self.max_interval is not None:
            check_seconds(self.max_interval, "max_interval")
        if self.max_interval is not None and not (self.base_interval <= self.max_interval < math.inf):
            raise ConfigurationError(
                f"max_interval ({self.max_interval!r} s) must be finite and at least base_interval "
                f"({self.base_interval!r} s)"
            )


class _Health:
    """The failures of one instance, from this caller's point of view."""

    __slots__ = ("ejected_at", "ejections", "failures", "probing", "until")

    def __init__(self) -> None:
        self.failures = 0
        """Failures in a row."""
        self.ejections = 0
        """Ejections in a row; 0 while the instance is in routing."""
        self.until = 0.0
        """The :func:`time.monotonic` at which the current ejection interval ends."""
        self.ejected_at = 0.0
        self.probing = False
        """Whether the probe call of an ended interval is in flight."""


class OutlierDetector:
    """Tracks the failures of the instances one caller calls and decides which are out of routing.

    The router reports every attempt: :meth:`begin` before sending, then :meth:`succeeded` or
    :meth:`failed` with the verdict, and :meth:`release` when the attempt ends in any way.
    """

    def __init__(self, policy: EjectionPolicy, max_interval: float) -> None:
        self.policy = policy
        self.max_interval = policy.max_interval if policy.max_interval is not None else max_interval
        self._health: dict[str, _Health] = {}

    @property
    def active(self) -> bool:
        """Whether any instance has failed since it last replied; if not, every instance is in routing."""
        return bool(self._health)

    def admits(self, deployment_id: str, now: float) -> bool:
        """Return whether the next attempt may go to the instance: it is in routing, or its probe is due."""
        health = self._health.get(deployment_id)
        if health is None or health.ejections == 0:
            return True
        return not health.probing and health.until <= now

    def is_ejected(self, deployment_id: str) -> bool:
        """Return whether the instance is out of routing, waiting for its interval to end or for its probe."""
        health = self._health.get(deployment_id)
        return health is not None and health.ejections > 0

    def begin(self, deployment_id: str, now: float) -> None:
        """Mark the attempt about to go to an ejected instance whose interval ended as its probe."""
        if not self._health:
            return
        health = self._health.get(deployment_id)
        if health is not None and health.ejections > 0 and health.until <= now:
            health.probing = True

    def release(self, deployment_id: str) -> None:
        """End an attempt; a probe that ended without a verdict lets the next call probe instead."""
        if not self._health:
            return
        health = self._health.get(deployment_id)
        if health is not None:
            health.probing = False

    def succeeded(self, deployment_id: str) -> None:
        """Record a reply from the instance, which puts it back in routing."""
        if not self._health:
            return
        health = self._health.pop(deployment_id, None)
        if health is not None and health.ejections > 0:
            logger.info(
                "instance %s responds again and is back in routing after %.1f s out",
                deployment_id,
                time.monotonic() - health.ejected_at,
            )

    def failed(self, deployment_id: str, reason: str, *, eject_now: bool = False, level: int = logging.WARNING) -> None:
        """Record a failure of the instance and eject it if it failed often enough.

        ``eject_now`` ejects at the first failure, for an instance that certainly cannot take calls
        now. ``level`` is the level of the log line of a first ejection.
        """
        health = self._health.get(deployment_id)
        if health is None:
            if len(self._health) >= _MAX_TRACKED:
                self._prune()
            health = self._health[deployment_id] = _Health()
        health.failures += 1

        if health.ejections > 0 and not health.probing:
            return  # already out: a call sent before the ejection failed as well
        if health.probing or eject_now or health.failures >= self.policy.consecutive_failures:
            if not eject_now:
                reason = f"{health.failures} failures in a row, the last: {reason}"
            self._eject(deployment_id, health, reason, level)

    def forget(self, deployment_id: str, *, registered_again: bool = False) -> None:
        """Drop what is known of an instance: it left, or ``registered_again`` after a restart."""
        health = self._health.pop(deployment_id, None)
        if registered_again and health is not None and health.ejections > 0:
            logger.info("instance %s registered again and is back in routing", deployment_id)

    def forget_all(self) -> None:
        """Drop what is known of every instance and put the ejected ones back in routing."""
        ejected = sorted(i for i, health in self._health.items() if health.ejections > 0)
        self._health.clear()
        if ejected:
            shown = ", ".join(ejected[:10]) + (f" and {len(ejected) - 10} more" if len(ejected) > 10 else "")
            logger.info("instances back in routing now that this caller's connection is back: %s", shown)

    def _eject(self, deployment_id: str, health: _Health, reason: str, level: int) -> None:
        now = time.monotonic()
        health.ejections += 1
        health.probing = False
        interval = min(self.policy.base_interval * 2.0 ** min(health.ejections - 1, 32), self.max_interval)
        health.until = now + interval
        if health.ejections == 1:
            health.ejected_at = now
            logger.log(
                level,
                "taking instance %s out of routing for %.1f s, then one call probes it: %s",
                deployment_id,
                interval,
                reason,
            )
        else:
            logger.debug("instance %s failed its probe; out of routing for %.1f s: %s", deployment_id, interval, reason)

    def _prune(self) -> None:
        now = time.monotonic()
        self._health = {i: h for i, h in self._health.items() if h.ejections > 0 and h.until > now}
