"""Durable deliveries, shared by the brokers: one-way calls and events that a worker acknowledges.

A broker (NATS JetStream, or RabbitMQ queues) keeps each one-way call and each event until a worker
of the consuming group acknowledges it. The worker runs the function and then settles the delivery:

- acknowledge it after the function succeeded;
- deliver it again after a backoff when the function failed and attempts are left;
- move it to the group's dead-letter subject or queue, with the failure in its headers, when the
  function failed on the last attempt or failed in a way that no retry can fix (invalid input, an
  unknown function).

A worker that dies before it settles a delivery leaves it unacknowledged, so the broker hands it to
another worker of the group. Delivery is therefore at least once. Each worker keeps the outcome of
recent deliveries by call id (see :mod:`pikku_mq._dedup`), so a delivery that it already ran to the
end is acknowledged again without a second run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Literal

from ._errors import ConfigurationError, PikkuMQError

__all__ = [
    "DUPLICATE_WINDOW",
    "HEADER_ATTEMPTS",
    "HEADER_ERROR_CLASS",
    "HEADER_ERROR_MESSAGE",
    "HEADER_EVENT_ID",
    "HEADER_FAILED_BY",
    "HEADER_FUNCTION",
    "HEADER_ONE_WAY",
    "HEADER_SUBJECT",
    "MAX_DELIVERY_SECONDS",
    "TRACE_HEADERS",
    "DeliveryPolicy",
    "Settlement",
    "dead_letter_headers",
    "settle",
    "trace_headers",
]

HEADER_ONE_WAY = "pikku-one-way"
"""Request header, ``1`` on a one-way call: the worker replies ``202`` once it admitted the call."""

HEADER_FUNCTION = "pikku-function"
"""Header of a durable one-way call: the function to run."""

HEADER_EVENT_ID = "pikku-event-id"
"""Header of an event: its unique id, which de-duplicates redeliveries as a call id does."""

HEADER_SUBJECT = "pikku-subject"
"""Header of an event, and of a dead letter: the subject it was published on."""

HEADER_ATTEMPTS = "pikku-attempts"
"""Header of a dead letter, and of an AMQP delivery sent again: the attempts made so far."""

HEADER_ERROR_CLASS = "pikku-error-class"
"""Header of a dead letter: the class name of the error of the last attempt."""

HEADER_ERROR_MESSAGE = "pikku-error-message"
"""Header of a dead letter: the message of the error of the last attempt (at most 1,000 characters)."""

HEADER_FAILED_BY = "pikku-failed-by"
"""Header of a dead letter: the function that failed on it."""

TRACE_HEADERS = ("traceparent", "tracestate")
"""W3C Trace Context headers, which an event carries into the calls its handler makes."""

_MAX_ERROR_MESSAGE = 1000

MAX_DELIVERY_SECONDS = 24 * 3600.0
"""Upper bound of the seconds of a :class:`DeliveryPolicy`. A longer wait is most likely a unit mistake,
and JetStream sends durations as int64 nanoseconds, which a value such as 1e300 overflows."""

DUPLICATE_WINDOW = 120.0
"""Seconds in which a JetStream stream stores each message id once, so a sender's retry is stored once."""


@dataclass(frozen=True, slots=True)
class DeliveryPolicy:
    """How a worker retries a failed delivery, and when it gives up on it.

    ``max_attempts`` counts the runs of the function, the first included; after the last failed one
    the delivery goes to the dead letter. The wait before the n-th retry is ``backoff * 2**(n-1)``
    seconds, at most ``max_backoff``, times a random factor between 0.5 and 1. ``ack_wait`` (seconds)
    is how long JetStream waits for the acknowledgement of a delivery before it hands the delivery
    to another worker. A running function renews it every third of ``ack_wait``. RabbitMQ does not use
    it, because it returns the deliveries of a closed connection at once. ``backoff``, ``max_backoff``
    and ``ack_wait`` are at most :data:`MAX_DELIVERY_SECONDS` (one day).
    """

    max_attempts: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    ack_wait: float = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ConfigurationError(f"max_attempts must be an integer of at least 1, got {self.max_attempts!r}")
        for name in ("backoff", "max_backoff", "ack_wait"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= MAX_DELIVERY_SECONDS:
                raise ConfigurationError(
                    f"{name} must be a number of seconds from 0 to {MAX_DELIVERY_SECONDS:g}, got {value!r:.80}"
                )
        if self.backoff > self.max_backoff:
            raise ConfigurationError(
                f"backoff ({self.backoff!r} s) must not be greater than max_backoff ({self.max_backoff!r} s)"
            )
        if self.ack_wait < 0.5:
            raise ConfigurationError(f"ack_wait must be at least 0.5 seconds, got {self.ack_wait!r}")

    def delay(self, attempt: int) -> float:
        """Return the seconds to wait before delivering again after the failed ``attempt`` (1 for the first)."""
        base: float = min(self.backoff * 2.0 ** min(attempt - 1, 32), self.max_backoff)
        return base * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security


@dataclass(frozen=True, slots=True)
class Settlement:
    """The action on a delivery once the function ran: ``ack``, ``retry`` or ``dead``.

    ``delay`` is the seconds before the retry, ``error`` the failure that a retry or dead letter follows.
    """

    action: Literal["ack", "retry", "dead"]
    delay: float = 0.0
    error: PikkuMQError | None = None


def settle(error: PikkuMQError | None, attempt: int, policy: DeliveryPolicy) -> Settlement:
    """Decide what to do with a delivery whose ``attempt``-th run ended with ``error`` (None on success).

    An error that is the sender's fault (a 4xx status other than 408) goes to the dead letter at
    once, because no retry can fix it. Any other error, a worker that declined the delivery while
    draining included, is retried until ``policy.max_attempts`` runs have failed.
    """
    if error is None:
        return Settlement("ack")
    permanent = 400 <= error.http_status < 500 and error.http_status != 408
    if permanent or attempt >= policy.max_attempts:
        return Settlement("dead", 0.0, error)
    return Settlement("retry", policy.delay(attempt), error)


def dead_letter_headers(headers: dict[str, str], error: PikkuMQError, attempts: int, function: str) -> dict[str, str]:
    """Return the headers of a dead letter: the delivery's own, with the failure recorded."""
    message = error.message if len(error.message) <= _MAX_ERROR_MESSAGE else error.message[:_MAX_ERROR_MESSAGE] + "..."
    return {
        **headers,
        HEADER_ERROR_CLASS: type(error).__name__,
        HEADER_ERROR_MESSAGE: message.replace("\r", " ").replace("\n", " "),
        HEADER_ATTEMPTS: str(attempts),
        HEADER_FAILED_BY: function,
    }


def trace_headers(headers: dict[str, str] | Any) -> dict[str, str]:
    """Return the trace context headers among ``headers``, to carry into the calls a handler makes."""
    return {name: headers[name] for name in TRACE_HEADERS if isinstance(headers.get(name), str) and headers[name]}
