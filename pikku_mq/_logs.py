"""Log helpers: the ``extra`` fields of a call's records, and a limit on repeated failure messages.

Every record that pikku_mq logs about one call carries the same ``extra`` fields, so a JSON formatter
(python-json-logger, structlog's stdlib bridge) prints them as keys. They are ``call_id``,
``trace_id`` (the ``x-request-id``, which stays the same across hops), ``function`` and
``deployment_id`` (the instance that serves the call, or the one a caller sends it to).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

__all__ = ["SUMMARY_INTERVAL", "RepeatedFailureLog", "call_extra"]

SUMMARY_INTERVAL = 60.0
"""Seconds between two summaries of a failure that keeps repeating."""


def call_extra(call_id: str, trace_id: str, function: str, deployment_id: str) -> dict[str, str]:
    """Return the ``extra`` fields of a log record about one call."""
    return {"call_id": call_id, "trace_id": trace_id, "function": function, "deployment_id": deployment_id}


class RepeatedFailureLog:
    """Log the first failure of a run in full, then at most one summary with a count per ``interval`` seconds.

    A dead discovery store, a broker that refuses reconnects or a stream of rejected calls would
    otherwise write one line per attempt. :meth:`failed` logs the first failure of a run at once.
    Later failures are counted, and the first one after ``interval`` seconds is logged with the count
    of failures since the last line. :meth:`recovered` ends the run and returns the failures it
    counted, so the caller can log the recovery.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = SUMMARY_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self.failures = 0
        """Failures in the current run, the first included; 0 while nothing fails."""
        self.started_at: float | None = None
        """The clock reading of the run's first failure, or None while nothing fails."""
        self._logged_at = 0.0
        self._unlogged = 0

    @property
    def failing(self) -> bool:
        return self.started_at is not None

    def failed(
        self,
        level: int,
        message: str,
        *args: object,
        extra: dict[str, str] | None = None,
        exc_info: BaseException | None = None,
    ) -> bool:
        """Count one failure and log it if it is the run's first or a summary is due; return whether it logged.

        ``message`` and ``args`` are formatted as for :meth:`logging.Logger.log`. A summary line adds
        how many failures came since the last line and how long the run has lasted.
        """
        now = self._clock()
        self.failures += 1
        if self.started_at is None:
            self.started_at = self._logged_at = now
            self.logger.log(level, message, *args, extra=extra, exc_info=exc_info)
            return True

        self._unlogged += 1
        if now - self._logged_at < self.interval:
            return False
        self.logger.log(
            level,
            "%s (%d more times in the last %.0f s, failing for %.0f s)",
            message % args if args else message,
            self._unlogged,
            now - self._logged_at,
            now - self.started_at,
            extra=extra,
            exc_info=exc_info,
        )
        self._logged_at = now
        self._unlogged = 0
        return True

    def recovered(self) -> int:
        """End the run of failures and return how many there were (0 if nothing failed)."""
        failures = self.failures
        self.failures = self._unlogged = 0
        self.started_at = None
        return failures
