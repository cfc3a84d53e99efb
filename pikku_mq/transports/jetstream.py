"""Durable one-way calls and events on NATS JetStream.

One-way calls: a worker that serves ``nats://host:port/<prefix>`` with durable one-way calls on keeps
the stream ``PIKKU_NOTIFY_<prefix>`` (dots become ``_``) on the subjects ``pikku-notify.<prefix>.>``.
``rpc.notify("f", data)`` publishes to ``pikku-notify.<prefix>.call.<escaped f>`` and returns once
the stream stored the call. Every worker of the prefix that hosts ``f`` pulls from the durable
consumer ``notify-<escaped f>``, so each call runs on one of them. A call that fails for good is
moved to ``pikku-notify.<prefix>.dead.<escaped f>`` in the same stream.

Events: an event bus ``nats://host:port/<prefix>`` keeps the stream ``PIKKU_EVENTS_<prefix>`` on
``<prefix>.>`` and ``<prefix>-dead.>``. ``rpc.publish("orders.created", data)`` publishes to
``<prefix>.orders.created``. A function with ``events=["orders.created"]`` is one group: its
workers pull from the durable consumer ``<escaped function>--<subject>`` with that filter, so each
event runs once per group. Dead letters go to ``<prefix>-dead.<escaped function>``.

Both streams keep messages by limits (``max_age``, 7 days by default), not by interest: an event
published before any group exists stays there, and a group created later starts with the events
published after it. A worker acknowledges after the function ran and naks with a delay after a
failure; JetStream redelivers a delivery that stays unacknowledged for ``ack_wait`` seconds, which
is how the delivery that a killed worker held reaches another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from urllib.parse import urlsplit, urlunsplit

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, RetentionPolicy, StorageType, StreamConfig

from .._durable import (
    DUPLICATE_WINDOW,
    HEADER_EVENT_ID,
    HEADER_SUBJECT,
    DeliveryPolicy,
    Settlement,
    dead_letter_headers,
)
from .._errors import (
    BadRequestError,
    ConfigurationError,
    DeadlineExceededError,
    EndpointUnreachableError,
    PayloadTooLargeError,
    PikkuMQError,
    TransportError,
)
from .._functions import check_subject
from .._types import HEADER_REQUEST_ID, CallRequest
from ._durable_body import encode_data
from ._nats_wire import check_prefix, escape_name, message_size, server_addresses, unescape_token

__all__ = [
    "DEFAULT_MAX_AGE",
    "JetStreamConsumer",
    "events_stream",
    "notify_stream",
    "parse_events_url",
    "publish_notify",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_AGE = 7 * 24 * 3600.0
"""Seconds a stream keeps a message, delivered or not, by default."""

_FETCH_WAIT = 1.0
"""Seconds one pull request waits for messages; the loop checks for a stop between requests."""

_RETRY_PAUSE = 1.0
"""Seconds between pull requests while the connection is down or JetStream fails them."""

_MAX_NAME = 200
"""Maximum length of a stream or consumer name made here, in characters."""


# -- names -------------------------------------------------------------------------------------------


def notify_stream(prefix: str) -> str:
    """Return the stream of the one-way calls to workers of ``prefix``."""
    return _bounded("PIKKU_NOTIFY_" + prefix.replace(".", "_"))


def notify_subject(prefix: str, name: str) -> str:
    return f"pikku-notify.{prefix}.call.{escape_name(name)}"


def notify_dead_subject(prefix: str, name: str) -> str:
    return f"pikku-notify.{prefix}.dead.{escape_name(name)}"


def events_stream(prefix: str) -> str:
    """Return the stream of the events under ``prefix``."""
    return _bounded("PIKKU_EVENTS_" + prefix.replace(".", "_"))


def _bounded(name: str) -> str:
    """Return ``name``, or a prefix of it and a digest of the whole when it is too long to be a JetStream name."""
    if len(name) <= _MAX_NAME:
        return name
    return name[: _MAX_NAME - 17] + "_" + hashlib.sha256(name.encode()).hexdigest()[:16]


def consumer_name(*parts: str) -> str:
    """Return the durable consumer name made of ``parts``, with the characters JetStream forbids replaced."""
    # JetStream names may not contain '.', '*', '>' or path separators; escaped names have none but '%'.
    return _bounded("--".join(parts).replace(".", "_").replace("*", "+").replace(">", "="))


def parse_events_url(url: str) -> tuple[str, str]:
    """Split ``nats://[user:password@]host:port/<prefix>`` into the server URL and the subject prefix."""
    parts = urlsplit(url)
    prefix = parts.path.strip("/")
    check_prefix(prefix, url)
    if parts.query or parts.fragment:
        raise ConfigurationError(f"the NATS event bus URL {server_addresses(url)!r} has a query or fragment")
    return urlunsplit((parts.scheme, parts.netloc, "", "", "")), prefix


# -- streams and publishing --------------------------------------------------------------------------


async def ensure_stream(js: JetStreamContext, name: str, subjects: list[str], max_age: float) -> None:
    """Create the stream ``name`` on ``subjects`` if it does not exist; an existing one is left as it is.

    Raise :class:`EndpointUnreachableError` when the server has no JetStream, and
    :class:`TransportError` when JetStream rejects the stream (for example subjects that overlap
    another stream's).
    """
    try:
        await _create_stream(js, name, subjects, max_age)
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError):
        raise EndpointUnreachableError(
            f"JetStream did not respond, so stream {name} cannot be used; start nats-server with JetStream "
            "on (nats-server -js, or a jetstream block in its configuration)"
        ) from None
    except nats.js.errors.APIError as exc:
        raise TransportError(f"JetStream rejected stream {name} on {subjects}: {exc}") from None


async def _create_stream(js: JetStreamContext, name: str, subjects: list[str], max_age: float) -> None:
    try:
        await js.stream_info(name)
    except nats.js.errors.NotFoundError:
        config = StreamConfig(
            name=name,
            subjects=subjects,
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=max_age,
            # A sender that retries with the same message id within the window is stored once.
            duplicate_window=DUPLICATE_WINDOW,
        )
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            # Another worker created it meanwhile: JetStream reports "stream name already in use".
            if exc.err_code != 10058:
                raise


async def publish_stored(
    nc: NatsClient, subject: str, payload: bytes, headers: dict[str, str], timeout: float, what: str
) -> None:
    """Publish to a stream and wait for its acknowledgement, translating the failures to pikku_mq errors.

    Raise :class:`PayloadTooLargeError` before sending when the message, headers included, is over
    the server's ``max_payload``, because the server closes a connection that sends one.
    """
    size = message_size(headers, payload, nc.max_payload)
    if size > nc.max_payload:
        raise PayloadTooLargeError(
            f"{what} on {subject} is {size} bytes with its headers, over the max_payload of "
            f"{nc.max_payload} bytes of the NATS server",
            payload={"size": size, "max_payload": nc.max_payload},
        )
    try:
        await nc.jetstream().publish(subject, payload, timeout=timeout, headers=headers)
    except nats.errors.MaxPayloadError:
        raise PayloadTooLargeError(
            f"{what} on {subject} is over the max_payload of {nc.max_payload} bytes of the NATS server",
            payload={"size": size, "max_payload": nc.max_payload},
        ) from None
    except nats.js.errors.NoStreamResponseError:
        raise EndpointUnreachableError(f"no JetStream stream stores {subject} ({what})") from None
    except nats.errors.NoRespondersError:
        raise EndpointUnreachableError(f"no JetStream stream stores {subject} ({what})") from None
    except (nats.errors.TimeoutError, TimeoutError):
        raise DeadlineExceededError(
            f"JetStream did not acknowledge {what} on {subject} within {timeout:.3f} s; it may have been stored"
        ) from None
    except nats.js.errors.APIError as exc:
        raise TransportError(f"JetStream rejected {what} on {subject}: {exc}") from None
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError, OSError) as exc:
        raise EndpointUnreachableError(f"the NATS connection is down, so {what} was not sent: {exc}") from None


async def publish_notify(nc: NatsClient, prefix: str, request: CallRequest, timeout: float) -> None:
    """Store a one-way call in the notify stream of ``prefix``.

    The call id is the JetStream message id, so a retry of the same call within two minutes is
    stored once. Raise :class:`EndpointUnreachableError` when no stream takes the subject: no
    worker of the prefix takes durable one-way calls.
    """
    payload = encode_data(request.data, request.name)
    headers = {**request.headers, "Nats-Msg-Id": request.headers.get("pikku-call-id") or uuid.uuid4().hex}
    try:
        subject = notify_subject(prefix, request.name)
        await publish_stored(nc, subject, payload, headers, timeout, f"a call to '{request.name}'")
    except EndpointUnreachableError as exc:
        raise EndpointUnreachableError(
            f"{exc}: the workers at prefix {prefix!r} do not take durable one-way calls "
            "(start them with PikkuWorker(durable_notify=True))"
        ) from None


# -- consuming ---------------------------------------------------------------------------------------

Handle = Callable[[bytes, dict[str, str], str, int], Awaitable[Settlement]]
"""Runs one delivery: ``(payload, headers, subject, attempt)`` to its settlement."""


class JetStreamConsumer:
    """Pulls the deliveries of one durable consumer and settles each after ``handle`` ran it.

    ``handle(payload, headers, subject, attempt)`` returns the :class:`Settlement` of a delivery;
    ``attempt`` is JetStream's delivery count. At most ``concurrency`` deliveries run at once. A
    dead letter is published to ``dead_subject`` before the delivery is acknowledged, so a
    failure between the two leaves the delivery to be run again, not lost.
    """

    def __init__(
        self,
        nc: NatsClient,
        *,
        stream: str,
        durable: str,
        filter_subject: str,
        dead_subject: str,
        function: str,
        policy: DeliveryPolicy,
        handle: Handle,
        deliver_policy: DeliverPolicy,
        concurrency: int,
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._durable = durable
        self._filter = filter_subject
        self._dead_subject = dead_subject
        self._function = function
        self._policy = policy
        self._handle = handle
        self._deliver_policy = deliver_policy
        self._concurrency = concurrency
        self._free = concurrency
        """Deliveries this consumer may still take before one of those it runs is settled."""
        self._freed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._subscription: JetStreamContext.PullSubscription | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._stopping = False

    async def bind(self) -> None:
        """Create the durable consumer, or bind to the existing one; raise if JetStream refuses."""
        config = ConsumerConfig(
            durable_name=self._durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self._policy.ack_wait,
            # pikku_mq counts the attempts itself, so JetStream never drops a delivery on its own.
            max_deliver=-1,
            max_ack_pending=max(1000, self._concurrency),
            deliver_policy=self._deliver_policy,
            filter_subject=self._filter,
        )
        try:
            self._subscription = await self._nc.jetstream().pull_subscribe(
                self._filter, durable=self._durable, stream=self._stream, config=config
            )
        except (nats.errors.Error, nats.js.errors.APIError) as exc:
            raise EndpointUnreachableError(
                f"cannot set up JetStream consumer {self._durable} on stream {self._stream}: "
                f"{type(exc).__name__}: {exc}"
            ) from None

    def start(self) -> None:
        """Start pulling deliveries, once :meth:`bind` succeeded."""
        self._task = asyncio.create_task(self._pull_loop(), name=f"pikku-jetstream-{self._durable}")

    async def stop_taking(self) -> None:
        """Stop pulling new deliveries; the ones running go on and are settled."""
        self._stopping = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait_settled(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the running deliveries to be settled."""
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)

    async def _pull_loop(self) -> None:
        subscription = self._subscription
        assert subscription is not None, "bind() first"
        while not self._stopping:
            if self._free == 0:
                self._freed.clear()
                await self._freed.wait()
                continue
            try:
                messages = await subscription.fetch(batch=self._free, timeout=_FETCH_WAIT)
            except (nats.errors.TimeoutError, TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError, OSError) as exc:
                logger.debug("pulling from %s paused: %s: %s", self._durable, type(exc).__name__, exc)
                await asyncio.sleep(_RETRY_PAUSE)
                continue
            except (nats.errors.Error, nats.js.errors.APIError) as exc:
                logger.warning("pulling from consumer %s failed: %s: %s", self._durable, type(exc).__name__, exc)
                await asyncio.sleep(_RETRY_PAUSE)
                continue
            self._free -= len(messages)
            for msg in messages:
                task = asyncio.create_task(self._process(msg), name=f"pikku-delivery-{self._durable}")
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _process(self, msg: Msg) -> None:
        try:
            keepalive = asyncio.create_task(self._keep_alive(msg))
            try:
                headers = dict(msg.headers or {})
                settlement = await self._handle(msg.data, headers, msg.subject, msg.metadata.num_delivered)
            finally:
                keepalive.cancel()
            await self._settle(msg, settlement)
        except (nats.errors.Error, nats.js.errors.APIError, OSError, PikkuMQError) as exc:
            # Unsettled, so JetStream delivers it again after ack_wait.
            logger.warning(
                "settling a delivery of consumer %s failed, it will be delivered again: %s: %s",
                self._durable,
                type(exc).__name__,
                exc,
            )
        except Exception:
            logger.exception("a delivery of consumer %s failed unexpectedly; it will be delivered again", self._durable)
        finally:
            self._free += 1
            self._freed.set()

    async def _keep_alive(self, msg: Msg) -> None:
        """Tell JetStream every third of ``ack_wait`` that the delivery is still running, so it is not redelivered."""
        while True:
            await asyncio.sleep(self._policy.ack_wait / 3)
            with contextlib.suppress(nats.errors.Error, OSError):
                await msg.in_progress()

    async def _settle(self, msg: Msg, settlement: Settlement) -> None:
        if settlement.action == "ack":
            await msg.ack()
        elif settlement.action == "retry":
            await msg.nak(delay=settlement.delay)
        else:
            assert settlement.error is not None
            attempts = msg.metadata.num_delivered
            headers = dead_letter_headers(dict(msg.headers or {}), settlement.error, attempts, self._function)
            headers.pop("Nats-Msg-Id", None)
            headers[HEADER_SUBJECT] = headers.get(HEADER_SUBJECT) or msg.subject
            await publish_stored(self._nc, self._dead_subject, msg.data, headers, 10.0, "a dead letter")
            await msg.ack()


def function_of_notify_subject(prefix: str, subject: str) -> str:
    """Return the function name of a one-way call's subject, or raise BadRequestError."""
    token = subject.removeprefix(f"pikku-notify.{prefix}.call.")
    try:
        return unescape_token(token)
    except ValueError as exc:
        raise BadRequestError(f"the subject {subject[:200]!r} names no function: {exc}") from None


def event_headers(subject: str, trace_id: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
    """Return the headers of a new event on ``subject``: a fresh event id, the trace id and ``extra``."""
    check_subject(subject, wildcards=False)
    event_id = uuid.uuid4().hex
    headers = {**(extra or {}), HEADER_EVENT_ID: event_id, HEADER_SUBJECT: subject, "Nats-Msg-Id": event_id}
    headers[HEADER_REQUEST_ID] = trace_id or uuid.uuid4().hex
    return headers
