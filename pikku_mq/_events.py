"""Event buses and durable delivery sources: what a worker consumes besides its request-reply endpoints.

An event bus is named by a URL, ``PIKKU_EVENTS_URL`` by default:

- ``nats://[user:password@]host:port/<subject-prefix>``: NATS JetStream (see
  :mod:`pikku_mq.transports.jetstream`);
- ``amqp://user:password@host:port/<vhost>?exchange=<name>``: a RabbitMQ topic exchange (see
  :mod:`pikku_mq.transports.amqp_durable`); ``exchange`` defaults to ``pikku.events``.
"""

from __future__ import annotations

import logging
import os
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._dispatch import Outcome
from ._durable import DUPLICATE_WINDOW, HEADER_EVENT_ID, DeliveryPolicy, Settlement, settle
from ._errors import ConfigurationError, PikkuMQError, check_seconds, function_not_found
from ._telemetry import UNKNOWN_FUNCTION

if TYPE_CHECKING:
    from ._dispatch import Dispatcher
    from ._functions import FunctionDefinition

__all__ = [
    "ENV_EVENTS_URL",
    "DeliverySource",
    "EventBus",
    "check_max_age",
    "event_bus_from_env",
    "event_bus_from_url",
    "run_delivery",
]

logger = logging.getLogger(__name__)

ENV_EVENTS_URL = "PIKKU_EVENTS_URL"


class DeliverySource(ABC):
    """Durable deliveries that a worker consumes: the one-way calls of an endpoint, or the events of a bus."""

    @abstractmethod
    async def start(self, dispatcher: Dispatcher, policy: DeliveryPolicy, concurrency: int) -> None:
        """Declare what is missing on the broker (streams, queues, consumers) and start consuming.

        It returns once the broker has the consumer groups, so that a caller that finds the worker
        in the registry afterwards can deliver to them.
        """

    @abstractmethod
    async def stop_taking(self) -> None:
        """Stop taking new deliveries; the running ones go on and are settled."""

    @abstractmethod
    async def wait_settled(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds until every delivery taken is settled."""

    @abstractmethod
    async def close(self) -> None:
        """Close the connections. A delivery not yet settled goes back to the broker for another worker."""


class EventBus(DeliverySource):
    """Publishes events, and consumes them for the functions declared with ``events=[...]``."""

    @abstractmethod
    async def publish(
        self,
        subject: str,
        data: Any = None,
        *,
        trace_id: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> str:
        """Publish an event and return its id once the broker stored it.

        Raise :class:`~pikku_mq.ConfigurationError` for an invalid subject,
        :class:`~pikku_mq.BadRequestError` when ``data`` cannot be serialised to msgpack, and
        :class:`~pikku_mq.PayloadTooLargeError` when the event is over the NATS server's
        ``max_payload``; the event was not sent. Raise :class:`~pikku_mq.EndpointUnreachableError`
        when the broker cannot be reached (the event was not sent),
        :class:`~pikku_mq.DeadlineExceededError` when it did not confirm in time, and
        :class:`~pikku_mq.TransportError` when the connection failed during the publish or the broker
        rejected the event. After the last two the event may have been stored.
        """

    def handlers(self, dispatcher: Dispatcher) -> list[FunctionDefinition]:
        """Return the functions of the worker that listen to events."""
        return [definition for definition in dispatcher.registry if definition.events]


def event_bus_from_url(url: str, *, max_age: float | None = None) -> EventBus:
    """Build the event bus that ``url`` names (see the module's documentation). Nothing connects yet.

    ``max_age`` (seconds) is how long a NATS stream keeps an event. It must be at least the
    stream's duplicate window of 120 seconds, and it does not apply to AMQP. Raise
    :class:`ConfigurationError` for an invalid URL or ``max_age``, or when the client library of
    the broker (the ``nats`` or ``amqp`` extra) is not installed.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"the event bus URL must be a string, got {url!r:.80}")
    if max_age is not None:
        check_max_age(max_age)
    scheme = urlsplit(url).scheme.lower()
    if scheme == "nats":
        try:
            from .transports.jetstream_events import JetStreamEventBus
        except ImportError as exc:
            raise ConfigurationError(
                f"a nats:// event bus needs nats-py, which is not installed ({exc}); "
                "install it with pip install 'pikku-mq[nats]'"
            ) from None
        return JetStreamEventBus(url, max_age=max_age)
    if scheme in ("amqp", "amqps"):
        try:
            from .transports.amqp_durable import AmqpEventBus
        except ImportError as exc:
            raise ConfigurationError(
                f"an amqp:// event bus needs aio-pika, which is not installed ({exc}); "
                "install it with pip install 'pikku-mq[amqp]'"
            ) from None
        return AmqpEventBus(url)
    raise ConfigurationError(
        f"the event bus URL must be nats://host:port/<subject-prefix> or "
        f"amqp://user:password@host:port/<vhost>?exchange=<name>, got scheme {scheme!r}"
    )


def check_max_age(max_age: object) -> float:
    """Return ``max_age`` as seconds, or raise :class:`ConfigurationError` unless it is a valid stream age.

    It must be a finite number of seconds, at least the duplicate window, because JetStream rejects
    a stream whose duplicate window is longer than its ``max_age``.
    """
    seconds = check_seconds(max_age, "max_age")
    if seconds < DUPLICATE_WINDOW:
        raise ConfigurationError(
            f"max_age must be at least the duplicate window of the event stream, {DUPLICATE_WINDOW:g} seconds, "
            f"got {seconds!r}"
        )
    return seconds


def event_bus_from_env() -> EventBus:
    """Build the event bus of ``PIKKU_EVENTS_URL``, or raise ConfigurationError if it is not set."""
    url = os.environ.get(ENV_EVENTS_URL, "").strip()
    if not url:
        raise ConfigurationError(
            f"publishing events needs an event bus: set {ENV_EVENTS_URL} (for example nats://127.0.0.1:4222/events) "
            "or assign deployment_service.events"
        )
    return event_bus_from_url(url)


async def run_delivery(
    dispatcher: Dispatcher,
    name: str,
    data: Any,
    headers: dict[str, str],
    attempt: int,
    policy: DeliveryPolicy,
    *,
    event: bool,
    transport: str,
) -> Settlement:
    """Run one durable delivery of function ``name`` and return how to settle it.

    ``data`` is the decoded data, or the :class:`PikkuMQError` that decoding raised. A one-way call
    (``event=False``) must name an exposed function and is checked against the remote secret. An
    event runs any function of the worker that listens to it. With telemetry on, the run gets a
    server span that continues the trace of the delivery's ``traceparent``, labelled ``transport``.
    """
    definition = dispatcher.registry.get(name)
    known = definition is not None and bool(definition.events if event else definition.expose)

    async def run(name: str, data: Any, headers: Mapping[str, str]) -> Outcome:
        try:
            if isinstance(data, PikkuMQError):
                raise data
            if definition is None or not known:
                raise function_not_found(name)
            admitted = dispatcher.admit_delivery(definition, data, headers, signed=not event)
        except PikkuMQError as exc:
            return Outcome(error=exc)
        return await dispatcher.run_admitted_once(admitted, data)

    telemetry = dispatcher.telemetry
    if telemetry is not None and telemetry.recording():
        function = name if known else UNKNOWN_FUNCTION
        outcome = await telemetry.serve(run, name, data, headers, transport, function, dispatcher.deployment_id)
    else:
        outcome = await run(name, data, headers)

    settlement = settle(outcome.error, attempt, policy)
    _log(settlement, name, headers, attempt, event=event)
    return settlement


def _log(settlement: Settlement, name: str, headers: Mapping[str, str], attempt: int, *, event: bool) -> None:
    if settlement.error is None:
        return
    kind = "event" if event else "one-way call"
    delivery_id = headers.get(HEADER_EVENT_ID) or headers.get("pikku-call-id") or "?"
    error = settlement.error
    if settlement.action == "retry":
        logger.info(
            "%s %s to %s failed on attempt %d: %s: %s; delivering it again in %.2f s",
            kind,
            delivery_id,
            name,
            attempt,
            type(error).__name__,
            error.message,
            settlement.delay,
        )
    else:
        logger.warning(
            "%s %s to %s failed on attempt %d: %s: %s; moving it to the dead letter",
            kind,
            delivery_id,
            name,
            attempt,
            type(error).__name__,
            error.message,
        )
