"""NATS transport: request-reply on ``<subject-prefix>.<escaped function name>``, msgpack bodies.

An endpoint is ``nats://host:port/<subject-prefix>``. Callers never connect to the address in it: each
side connects with its own configured URL (``url=``, else ``PIKKU_NATS_URL``, else
``nats://127.0.0.1:4222``), so credentials never travel through the registry, and a caller takes only
the subject prefix from an endpoint. docs/protocol.md ("NATS") records the wire header by header.

Presence: a worker publishes its join, heartbeat, draining and leave events on the subject
``PIKKU_NATS_PRESENCE_SUBJECT`` (default ``pikku.presence``), as JSON in the form the discovery change
feeds use. A caller whose deployment service listens for presence subscribes on its first connection.

The client keeps its own reply subscription (one wildcard inbox per connection) instead of using
nats-py's ``request()``, for three reasons. It tells "no responders" apart from a timeout and reports
it at once, so the router moves the call to another instance. It fails the calls in flight as soon as
the connection drops, instead of letting them wait out their deadline. And it checks the size of a
request, headers included, against the server's ``max_payload`` before sending it, because nats-py
checks only the body and the server drops the connection of a client that sends too much.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import msgpack
import nats.aio.client as nats_client
import nats.errors
import pydantic_core
from nats.aio.client import PING_PROTO
from nats.aio.client import Client as NatsClient
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

from .._errors import (
    BadRequestError,
    ConfigurationError,
    DeadlineExceededError,
    EndpointUnreachableError,
    OutputValidationError,
    PayloadTooLargeError,
    PikkuMQError,
    ProtocolError,
    TransportError,
)
from .._logs import RepeatedFailureLog
from .._presence import ChangeKind, decode_change, encode_change
from .._settings import default_nats_url
from .._types import CallRequest
from ._nats_wire import (
    HEADER_REJECTED,
    HEADER_SERVICE_ERROR,
    HEADER_SERVICE_ERROR_CODE,
    HEADER_STATUS,
    MAX_SUBJECT_LENGTH,
    NatsEndpoint,
    message_size,
    parse_nats_endpoint,
    server_addresses,
    split_server_urls,
    unescape_token,
)
from .base import ClientTransport, PresenceListener, PresencePublisher, Reply, ServerTransport
from .http import _decode_call_body

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

    from .._dispatch import Dispatcher

__all__ = [
    "DEFAULT_CONNECTIONS",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_PRESENCE_SUBJECT",
    "NatsServer",
    "NatsTransport",
    "presence_subject",
]

logger = logging.getLogger(__name__)

DEFAULT_CONNECT_TIMEOUT = 2.0
"""Seconds a first connection to NATS may take before the attempt fails."""

DEFAULT_CONNECTIONS = 1
"""Connections a caller spreads its NATS calls over, unless ``NatsTransport(connections=...)`` sets another number."""

_RECONNECT_WAIT = 1
"""Seconds between two attempts to reconnect to a server, after the first immediate one."""
_PING_INTERVAL = 20
_MAX_OUTSTANDING_PINGS = 3
"""A connection that gets no reply to its pings for about a minute counts as lost and is reconnected."""

_MAX_ERROR_HEADER = 1024
_MAX_CACHED_NAMES = 1024
"""Characters of an error message copied into ``Nats-Service-Error``. The reply body carries all of it."""

_MAX_REPLY_HEADER_BYTES = 8 * 1024
"""Max bytes of a reply's header block. With an error message of ``_MAX_ERROR_HEADER`` characters of 4
UTF-8 bytes each, the block is about 4.2 KiB, and a test checks the bound."""

_STOP_GRACE = 2.0
"""Seconds a stopping server gives its last replies and its unsubscription to reach the broker."""

_REVIVE_BACKOFF = (0.5, 5.0)
"""First and maximum wait, in seconds, between attempts to replace a server connection that nats-py closed."""

_STATUS_NO_RESPONDERS = "503"

_RECONNECT_PAUSE = 5.0
"""Seconds a caller fails fast after a failed connection attempt before it tries to connect again, so a
stalled broker does not cost every call the connect timeout before the call moves to a fallback."""

_LOG_EVERY = 60
"""While reconnecting fails, one failure in this many is logged as a warning."""

_MAX_ENDED_DEADLINES = 256
"""Entries of ended calls that a caller connection's heap of deadlines may contain beyond twice its calls in flight."""

ENV_PRESENCE_SUBJECT = "PIKKU_NATS_PRESENCE_SUBJECT"
DEFAULT_PRESENCE_SUBJECT = "pikku.presence"


def presence_subject() -> str:
    """Return the subject of presence events: ``PIKKU_NATS_PRESENCE_SUBJECT``, else ``pikku.presence``."""
    return os.environ.get(ENV_PRESENCE_SUBJECT, "").strip() or DEFAULT_PRESENCE_SUBJECT


# -- connecting --------------------------------------------------------------------------------------


class _MalformedHeaders(dict[str, str]):
    """The headers of a message whose header block nats-py failed to parse. A worker replies 400 to it."""


_CONTROL_LINE_WHITESPACE = bytes.maketrans(b"\x0b\x0c", b"\x00\x00")
"""Turns the vertical tab and form feed of a message line into NUL, which no valid subject contains."""

_CONTROL_CHARACTERS = frozenset(range(0x20)) | {0x7F}

Deliver = Callable[[str, str, bytes, "dict[str, str] | None"], None]
"""Callback of :meth:`_Client.subscribe_direct`, called with each message's subject, reply subject, body and headers."""

_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
"""The header names nats-py (2.16) sends as they are; it raises BadHeaderError for others."""

_NATS_USES_MAIL_PARSER = getattr(nats_client, "parse_email", None) is not None
"""nats-py parses header lines with fast_mail_parser where that package is installed; then its own code runs."""

_MAX_HEADER_PREFIXES = 256
"""Header names whose encoded ``name: `` prefix a client keeps."""

_COMMAND_LINE_BYTES = 4096
"""Max bytes of an HPUB line besides its headers and body: nats-server (2.9) rejects a longer protocol line."""

_MAX_HOLD = 0.001
"""Seconds a message waits in a client's buffer for others to join it before the client writes them out.

nats-py writes its buffer when the event loop comes round to its flusher task. A worker that takes 64
requests from one read serves them all in one pass of the loop, so every reply waits for the last one,
and the caller waits with nothing to do. Writing the buffer once its first message has waited this long
lets the caller start on those replies while the worker serves the rest. It costs at most one more
write per millisecond while the loop is busy.
"""


class _Parser(Parser):
    """nats-py's protocol parser, made to keep the connection when a subject contains ``\x0b`` or ``\x0c``.

    nats-server splits a protocol line on spaces and tabs only, so a subject may contain a vertical tab
    or a form feed. nats-py (2.16) splits the ``MSG`` line on any whitespace and fails to read it. With
    less than 4 KiB in its buffer it reconnects, which takes the worker off its subscription for about a
    second and loses the replies in flight. With more, for example a large header block, it waits for
    more data that can never help, and reads nothing until missed pings make it reconnect about 80 s
    later. Here such a line is read again with those bytes turned into NUL. A subject with a NUL names
    no function, so the worker replies 400, and a reply subject with one is dropped (see ``_Client``).
    """

    async def parse(self, data: bytes = b"") -> None:
        self.buf.extend(data)
        while True:
            try:
                await super().parse()
            except nats.errors.ProtocolError:
                if not self._mask_line_whitespace():
                    raise
                continue
            if not self._mask_line_whitespace():
                return

    def _mask_line_whitespace(self) -> bool:
        """Replace ``\x0b`` and ``\x0c`` in the message line at the start of the buffer; return whether any was."""
        if self.state != AWAITING_CONTROL_LINE or not self.buf.startswith((b"MSG", b"HMSG")):
            return False
        end = self.buf.find(b"\r\n")
        line = bytes(self.buf[: max(end, 0)])
        if b"\x0b" not in line and b"\x0c" not in line:
            return False
        self.buf[:end] = line.translate(_CONTROL_LINE_WHITESPACE)
        return True


class _Client(NatsClient):
    """nats-py's client, made to survive hostile messages from anyone who may publish on its subjects.

    nats-server passes subjects and header blocks on as bytes, and nats-py (2.16) reads them in its read
    loop, where an exception ends the loop. The connection then stays open but reads nothing more, until
    missed pings make nats-py reconnect about 80 seconds later. So this client:

    - decodes a subject that is not UTF-8 with U+FFFD for the bad bytes, which no escaped function name
      contains, so the worker replies 400;
    - drops a message whose reply subject is not UTF-8 or contains a control character, since it has no
      address to answer, as nats-py drops a message it builds no ``Msg`` for;
    - passes a message whose header block nats-py fails to parse (a status line that is not UTF-8, a block
      of only ``NATS/1.0``) with :class:`_MalformedHeaders`, so the worker replies 400;
    - reads a message line with a vertical tab or form feed in a subject (see :class:`_Parser`).
    """

    def __init__(self) -> None:
        super().__init__()
        self._ps = _Parser(self)
        self._header_prefixes: dict[str, bytes] = {}
        self._single_header_blocks: dict[tuple[Any, Any], bytes] = {}
        """Header blocks of one header, by name and value."""
        self._direct: dict[int, Deliver] = {}
        """The delivery functions of the subscriptions made with :meth:`subscribe_direct`, by subscription id."""
        self._held_since = 0.0
        """When the first message now in the buffer was put there, by ``time.perf_counter()``."""
        self._done: asyncio.Future[None] | None = None
        """A future with its result set, which wakes the flusher without a future per message."""
        self.write_at_once = False
        """Set around a publish that nothing will join soon, such as the only call in flight: the client
        writes it out at once, without waiting for nats-py's flusher to get its turn of the event loop."""

    async def subscribe_direct(self, subject: str, deliver: Deliver, queue: str = "") -> Subscription:
        """Subscribe, and hand each message to ``deliver`` in the read loop, without nats-py's queue and task.

        ``deliver`` gets the subject, the reply subject, the body and the headers of each message, with
        no ``Msg`` built for it. It runs within the read loop, so it must return at once. An exception
        it raises is logged, and the message is dropped. The header names are in lower case, as
        pikku_mq reads them. Of two names that differ only in case, the later one's value is kept.
        """

        async def through_queue(msg: Msg) -> None:
            # A message that arrives before the subscription is registered below.
            headers = msg.headers
            if headers and not isinstance(headers, _MalformedHeaders):
                headers = {key.lower(): value for key, value in headers.items()}
            deliver(msg.subject, msg.reply, msg.data, headers)

        sub = await self.subscribe(subject, queue=queue, cb=through_queue)
        self._direct[sub._id] = deliver
        return sub

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        deliver = self._direct.get(sid)
        if deliver is None or sid not in self._subs:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        subjects = self._decode_subjects(subject, reply)
        if subjects is not None:
            try:
                deliver(subjects[0], subjects[1], data, await self._direct_headers(headers))
            except Exception:
                logger.exception("NATS: handling a message on %r failed", subject[:200])

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        """Send PING after the commands still in the buffer, so that its PONG proves the server has read them.

        nats-py (2.16) writes PING straight to the socket, ahead of its buffer. A ``flush()`` right after
        ``subscribe()`` could then return before the server had the subscription.
        """
        if future is None:
            future = asyncio.get_running_loop().create_future()
        self._pongs.append(future)
        await self._send_command(PING_PROTO)
        await self._flush_pending()

    def _remove_sub(self, sid: int, max_msgs: int = 0) -> None:
        super()._remove_sub(sid, max_msgs)
        self._direct.pop(sid, None)

    async def _send_command(self, cmd: bytes, priority: bool = False) -> None:
        first = self._start_hold()
        await super()._send_command(cmd, priority)
        self._end_hold(first)

    def _start_hold(self) -> bool:
        """Note when the first message of the buffer arrives; return whether the one being added is that."""
        first = not self._pending
        if first:
            self._held_since = time.perf_counter()
        return first

    def _end_hold(self, first: bool) -> None:
        """Write the buffer after adding a message, if that message goes out at once or the first has waited enough."""
        if self.write_at_once or (not first and time.perf_counter() - self._held_since >= _MAX_HOLD):
            self._write_pending()

    def _write_pending(self) -> None:
        """Write the buffer to the socket now, unless the connection is not up or its socket is backed up.

        In those cases nats-py's flusher writes it later and waits for the socket to drain. Only the TCP
        transport is written this way, so over WebSocket the flusher does all the writing.
        """
        writer = getattr(self._transport, "_io_writer", None)
        if writer is None or not self.is_connected:
            return
        transport = writer.transport
        if transport.is_closing() or transport.get_write_buffer_size():
            return
        writer.writelines(self._pending)
        self._pending = []
        self._pending_data_size = 0

    async def _direct_headers(self, headers: bytes | None) -> dict[str, str] | None:
        """Parse a header block as :meth:`_process_headers` does, with the names in lower case."""
        if headers and headers.startswith(b"NATS/1.0\r\n") and len(headers) > 10 and not _NATS_USES_MAIL_PARSER:
            return _parse_header_lines(headers[10:], lower=True)
        parsed = await self._process_headers(headers)
        if parsed and not isinstance(parsed, _MalformedHeaders):
            return {key.lower(): value for key, value in parsed.items()}
        return parsed

    async def _process_headers(self, headers: bytes | None) -> dict[str, str] | None:
        if headers and headers.startswith(b"NATS/1.0\r\n") and len(headers) > 10 and not _NATS_USES_MAIL_PARSER:
            return _parse_header_lines(headers[10:])
        try:
            return await super()._process_headers(headers)
        except Exception:
            # Any exception here would end the read loop, whatever its type (IndexError and
            # UnicodeDecodeError in nats-py 2.16), so each one marks the message as malformed instead.
            logger.debug("NATS: a message has a header block that cannot be parsed: %r", (headers or b"")[:200])
            return _MalformedHeaders()

    async def _send_publish(
        self, subject: str, reply: str, payload: bytes, payload_size: int, headers: dict[str, Any] | None
    ) -> None:
        """Send HPUB with a header block built from cached name prefixes, else as nats-py does.

        The bytes are those of nats-py's ``_send_publish``. This path only takes names and values that
        nats-py would send unchanged (a valid name, a printable ASCII value without surrounding spaces),
        so it skips nats-py's per-header strip, regex match and newline translation.
        """
        block = self._header_block(headers) if headers and subject else None
        if block is None:
            await super()._send_publish(subject, reply, payload, payload_size, headers)
            return
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += payload_size
        await self._send_command(_hpub_command(subject, reply, block, payload))
        if self._pending and self._flush_queue is not None and self._flush_queue.empty():
            await self._flush_pending()

    def publish_now(self, subject: str, payload: bytes, headers: dict[str, str], reply: str = "") -> bool:
        """Put a message in the buffer as ``publish()`` would, without its coroutines, or return False.

        Only for subjects that pikku_mq built or that nats-server sent, which nats-py's subject check
        passes, so this method skips that check. It returns False, and leaves the message to
        ``publish()``, unless the connection is up, the message fits in ``max_payload`` and in the
        buffer, and its headers take the cached path of :meth:`_send_publish`.
        """
        flush_queue = self._flush_queue
        flusher = self._flusher_task
        if self._status != NatsClient.CONNECTED or flush_queue is None or flusher is None or flusher.done():
            return False
        if len(payload) > self._max_payload or not subject:
            return False
        block = self._header_block(headers)
        if block is None:
            return False
        command = _hpub_command(subject, reply, block, payload)
        if self._max_pending_size > 0 and self._pending_data_size + len(command) > self._max_pending_size:
            return False  # publish() makes room in the buffer first
        self.stats["out_msgs"] += 1
        self.stats["out_bytes"] += len(payload)
        first = self._start_hold()
        self._pending.append(command)
        self._pending_data_size += len(command)
        self._end_hold(first)
        if self._pending and flush_queue.empty():
            # Wakes nats-py's flusher, which only sets the result of a future that is not done yet.
            done = self._done
            if done is None:
                done = self._done = asyncio.get_running_loop().create_future()
                done.set_result(None)
            flush_queue.put_nowait(done)
        return True

    def _header_block(self, headers: dict[str, Any]) -> bytes | None:
        if len(headers) == 1:
            # A worker's reply to a call that succeeded has only its status header.
            ((name, value),) = headers.items()
            block = self._single_header_blocks.get((name, value))
            if block is None:
                block = self._build_header_block(headers)
                if block is not None:
                    if len(self._single_header_blocks) >= _MAX_HEADER_PREFIXES:
                        self._single_header_blocks.clear()
                    self._single_header_blocks[name, value] = block
            return block
        return self._build_header_block(headers)

    def _build_header_block(self, headers: dict[str, Any]) -> bytes | None:
        prefixes = self._header_prefixes
        parts = [b"NATS/1.0\r\n"]
        for name, value in headers.items():
            prefix = prefixes.get(name)
            if prefix is None:
                if not isinstance(name, str) or name.strip() != name or not _HEADER_NAME.fullmatch(name):
                    return None
                prefix = name.encode() + b": "
                if len(prefixes) < _MAX_HEADER_PREFIXES:
                    prefixes[name] = prefix
            if not (isinstance(value, str) and value.isascii() and value.isprintable()) or value.strip() != value:
                return None
            parts.append(prefix)
            parts.append(value.encode())
            parts.append(b"\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def _decode_subjects(self, subject: bytes, reply: bytes) -> tuple[str, str] | None:
        """Return the subject and the reply subject as text, or None for a message to drop, as nats-py drops it."""
        try:
            reply_text = reply.decode()
        except UnicodeDecodeError:
            logger.info("NATS: dropped a message on %r whose reply subject is not UTF-8", subject[:200])
            return None
        # A printable text has no control characters, so the exact check runs only on the others.
        if not reply_text.isprintable() and not _CONTROL_CHARACTERS.isdisjoint(reply):
            logger.info("NATS: dropped a message on %r whose reply subject has control characters", subject[:200])
            return None
        try:
            subject_text = subject.decode()
        except UnicodeDecodeError:
            subject_text = subject.decode(errors="replace")
        return subject_text, reply_text


def _hpub_command(subject: str, reply: str, block: bytes, payload: bytes) -> bytes:
    return b"HPUB %s %s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        reply.encode(),
        len(block),
        len(block) + len(payload),
        block,
        payload,
    )


def _parse_header_lines(block: bytes, *, lower: bool = False) -> dict[str, str] | None:
    """Parse the header lines after ``NATS/1.0\\r\\n`` as nats-py (2.16) does, without its per-character loop.

    nats-py skips lines without a colon, names that are not ASCII or contain whitespace, and keeps
    the last of repeated names. It decodes values as UTF-8 with U+FFFD for bad bytes, and returns
    None for a block without headers. A test compares both parsers line by line. With ``lower``
    the names are in lower case, and the last of the names that differ only in case is kept.
    """
    parsed: dict[str, str] = {}
    names = _LOWER_HEADER_NAMES if lower else _HEADER_NAMES
    for line in block.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            continue
        try:
            key = names[name]
        except KeyError:
            key = _header_key(name)
            if key is not None and lower:
                key = key.lower()
            if len(names) >= _MAX_HEADER_NAMES:
                names.clear()
            names[name] = key
        if key is not None:
            parsed[key] = value.strip().decode("utf-8", "replace")
    return parsed or None


_HEADER_NAMES: dict[bytes, str | None] = {}
"""The key of each header name as read, None for a name that nats-py skips; most messages repeat a few names."""

_LOWER_HEADER_NAMES: dict[bytes, str | None] = {}
"""As ``_HEADER_NAMES``, with the keys in lower case."""

_MAX_HEADER_NAMES = 256


def _header_key(name: bytes) -> str | None:
    """Return the key under which nats-py (2.16) stores a header name, or None if it skips the line."""
    name = name.strip()
    if not name.isascii():
        return None
    key = name.decode("ascii")
    if key and key.split() != [key]:
        return None
    return key


Callback = Callable[[], Awaitable[None]]


async def _open_client(
    url: str,
    *,
    name: str,
    connect_timeout: float,
    on_disconnected: Callback,
    on_reconnected: Callback,
    on_closed: Callback,
    client_class: type[_Client] = _Client,
) -> _Client:
    """Connect to the NATS servers listed in ``url``, failing fast instead of retrying for minutes.

    nats-py retries a first connection for up to about two minutes (and forever with unlimited
    reconnects). Here the attempt fails as soon as every server listed has refused once, or after
    ``connect_timeout`` seconds per server. Once connected, the client reconnects without limit. The
    callbacks only run once the first connection is made.
    """
    servers = split_server_urls(url)
    addresses = server_addresses(url)
    loop = asyncio.get_running_loop()
    failed: asyncio.Future[BaseException] = loop.create_future()
    attempts: list[BaseException] = []
    live = False
    failures = 0  # errors since the connection was last up: nats-py reports each failed reconnect attempt

    async def error_cb(exc: Exception) -> None:
        nonlocal failures
        if not live:
            attempts.append(exc)
            if len(attempts) >= len(servers) and not failed.done():
                failed.set_result(exc)
            return
        if isinstance(exc, nats.errors.SlowConsumerError):
            logger.warning("NATS at %s: slow consumer on %s, a message was dropped", addresses, exc.subject)
            return
        failures += 1
        # One attempt a second while a server is down: log the first failure, then one in _LOG_EVERY.
        level = logging.WARNING if failures == 1 or failures % _LOG_EVERY == 0 else logging.DEBUG
        logger.log(
            level, "NATS at %s: %s: %s (error %d since last connected)", addresses, type(exc).__name__, exc, failures
        )

    def forward(callback: Callback, *, connected: bool = False) -> Callback:
        async def wrapper() -> None:
            nonlocal failures
            if connected:
                failures = 0
            if live:
                await callback()

        return wrapper

    nc = client_class()
    task = loop.create_task(
        nc.connect(
            servers,
            name=name,
            error_cb=error_cb,
            disconnected_cb=forward(on_disconnected),
            reconnected_cb=forward(on_reconnected, connected=True),
            closed_cb=forward(on_closed),
            connect_timeout=max(1, round(connect_timeout)),
            reconnect_time_wait=_RECONNECT_WAIT,
            max_reconnect_attempts=-1,
            ping_interval=_PING_INTERVAL,
            max_outstanding_pings=_MAX_OUTSTANDING_PINGS,
        ),
        name=f"pikku-nats-connect-{addresses}",
    )
    try:
        waiting: set[asyncio.Future[Any]] = {task, failed}
        done, _ = await asyncio.wait(
            waiting, timeout=connect_timeout * len(servers), return_when=asyncio.FIRST_COMPLETED
        )
    except BaseException:
        await _abandon(nc, task)
        raise
    if task in done and task.exception() is None:
        live = True
        return nc

    # Read the attempt's own failure before _abandon cancels it: a cancelled task has no exception to read.
    attempt_error = task.exception() if task.done() and not task.cancelled() else None
    await _abandon(nc, task)
    if failed.done():
        reason = _describe(failed.result())
    elif attempt_error is not None:
        reason = _describe(attempt_error)
    else:
        # The server accepted the connection but never completed the NATS handshake.
        reason = f"no answer within {connect_timeout * len(servers):g} s"
    raise EndpointUnreachableError(f"cannot connect to NATS at {addresses}: {reason}")


async def _abandon(nc: NatsClient, task: asyncio.Task[None]) -> None:
    """Stop a connection attempt and release whatever it opened."""
    if not task.done():
        task.cancel()
    # The task's own outcome (cancelled or failed) is of no interest; a cancellation of this task is.
    await asyncio.gather(task, return_exceptions=True)
    await _close_client(nc)


async def _close_client(nc: NatsClient) -> None:
    """Close a nats-py client, whether it is connected, reconnecting or half set up."""
    if nc.is_closed:
        return
    if not nc.is_connected:
        # NOTE: nats-py (2.16) writes out its buffer of unsent messages in close(), which raises on a
        # connection that is down. Nothing in that buffer can be delivered any more, so drop it first.
        nc._pending = []
        nc._pending_data_size = 0
    try:
        await nc.close()
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        # nats-py (2.16) lets a CancelledError out of close() when the client was reconnecting: the
        # stream it waits on belonged to the reconnect attempt that close() cancelled. This task was
        # not cancelled, so the client is closed and the error is not ours to pass on.
        logger.debug("closing a NATS client that was reconnecting raised CancelledError inside nats-py")
    except Exception as exc:
        # Closing is cleanup: a client that failed half-way through connecting can fail to close too.
        logger.debug("closing a NATS client failed: %s: %s", type(exc).__name__, _describe(exc))


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, asyncio.TimeoutError) and not text:
        return "the connection timed out"
    return text or type(exc).__name__


# -- calling -----------------------------------------------------------------------------------------

_MAX_CHECKED_SUBJECTS = 10_000
"""Subjects a caller's client remembers as checked."""

_SUCCESS_HEADERS = b"NATS/1.0\r\n" + HEADER_STATUS.encode() + b": 200\r\n\r\n"
"""The header block of a worker's reply to a call that succeeded, the same for every such reply."""

Replied = tuple[bytes, dict[str, str] | None]
"""The body and the parsed headers of a reply, as a caller connection passes them on."""


class _CallerClient(_Client):
    """The client of a caller connection, which hands the replies on the connection's inbox straight to it.

    For those it builds no ``Msg``, and it reads the header block of a reply to a call that succeeded
    without parsing it. Any other message, and a message on the inbox that has a reply subject, takes
    :class:`_Client`'s way.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reply_sid = -1
        """The subscription id of the connection's inbox, once it has subscribed."""
        self.on_reply: Callable[[bytes, Replied], None] | None = None
        """The function that receives the subject of each reply on the inbox, with its body and parsed headers."""
        self._checked_subjects: set[str] = set()
        """Subjects that passed nats-py's check in :meth:`publish_request`, so that it checks each one once."""

    async def publish_request(
        self, subject: str, inbox: str, token: str, payload: bytes, headers: dict[str, str]
    ) -> None:
        """Publish a request with the reply subject ``inbox + token``, as nats-py's ``publish()`` (2.16) does.

        ``token`` contains only digits. The subject and the inbox get the same checks as in ``publish()``,
        in the same order, but once each instead of on every request.
        """
        if not self._skip_subject_validation:
            checked = self._checked_subjects
            for name in (subject, inbox):
                if name not in checked:
                    nats_client._validate_subject(name)
                    if len(checked) >= _MAX_CHECKED_SUBJECTS:
                        checked.clear()
                    checked.add(name)
        if self.is_closed:
            raise nats.errors.ConnectionClosedError
        if self.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        payload_size = len(payload)
        if not self.is_connected and (
            self._max_pending_size <= 0 or payload_size + self._pending_data_size > self._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        if payload_size > self._max_payload:
            raise nats.errors.MaxPayloadError
        if not self.publish_now(subject, payload, headers, reply=inbox + token):
            await self._send_publish(subject, inbox + token, payload, payload_size, headers)

    async def _process_msg(self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes) -> None:
        deliver = self.on_reply
        if sid != self.reply_sid or reply or deliver is None or sid not in self._subs:
            await super()._process_msg(sid, subject, reply, data, headers)
            return
        self.stats["in_msgs"] += 1
        self.stats["in_bytes"] += len(data)
        # Lower-cased as for the inbox's other messages, so a name repeated in any case reads the same on both ways.
        parsed = {HEADER_STATUS: "200"} if headers == _SUCCESS_HEADERS else await self._direct_headers(headers)
        try:
            deliver(subject, (data, parsed))
        except Exception:
            logger.exception("NATS: handling a message on %r failed", subject[:200])


class _CallerConnection:
    """One connection of a caller: the NATS client and a wildcard inbox that collects every reply."""

    def __init__(self, url: str, addresses: str, presence: tuple[str, PresenceListener] | None = None) -> None:
        self.url = url
        self.addresses = addresses
        self.presence = presence
        """The presence subject and the listener of its events, if this connection subscribes to them."""
        self.nc: _CallerClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbox = ""
        self._pending: dict[str, tuple[asyncio.Future[Replied], str]] = {}
        self._tokens = itertools.count(1)
        self._deadlines: list[tuple[float, int, str, str, float]] = []
        """A heap of the calls' deadlines (event loop time), with each call's token, subject and timeout.

        One timer, set for the earliest deadline, fails the calls that are late. A call that ends leaves
        its entry behind, so the heap is rebuilt from the calls in flight once it contains many more."""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        """The deadline that ``_timer`` is set for."""

    @property
    def usable(self) -> bool:
        return self.nc is not None and not self.nc.is_closed

    async def open(self, connect_timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        nc = await _open_client(
            self.url,
            name="pikku-mq caller",
            connect_timeout=connect_timeout,
            on_disconnected=self._on_disconnected,
            on_reconnected=self._on_reconnected,
            on_closed=self._on_closed,
            client_class=_CallerClient,
        )
        assert isinstance(nc, _CallerClient)
        self.nc = nc
        try:
            self._inbox = nc.new_inbox() + "."
            # Sent before any request on the same connection, so the broker has it before the first reply.
            inbox = await nc.subscribe_direct(self._inbox + "*", self._on_reply)
            nc.on_reply = self._on_replied
            nc.reply_sid = inbox._id
            if self.presence is not None:
                await self.nc.subscribe(self.presence[0], cb=self._on_presence)
        except BaseException:
            await _close_client(self.nc)
            self.nc = None
            raise
        if self.presence is not None:
            # Lookups made before this subscription may miss events: the listener expires them.
            self.presence[1](None)

    async def request(
        self, subject: str, payload: bytes, headers: Mapping[str, str], timeout: float, name: str
    ) -> Replied:
        """Send a request on ``subject`` and return the body and the parsed headers of its reply."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            state = "reconnecting" if nc is not None and nc.is_reconnecting else "not connected"
            raise EndpointUnreachableError(f"the call to '{name}' was not sent: NATS at {self.addresses} is {state}")

        size = message_size(headers, payload, nc.max_payload)
        if size > nc.max_payload:
            raise PayloadTooLargeError(
                f"the request to '{name}' is {size} bytes with its headers, over the max_payload of "
                f"{nc.max_payload} bytes of the NATS server at {self.addresses}",
                payload={"size": size, "max_payload": nc.max_payload},
            )

        number = next(self._tokens)
        token = str(number)
        loop = self._loop
        assert loop is not None  # set by open(), which made self.nc
        ends = loop.time() + timeout
        future: asyncio.Future[Replied] = loop.create_future()
        self._pending[token] = (future, name)
        try:
            try:
                # nats-py (2.16) encodes the headers within publish() and keeps no reference to the dict.
                nc.write_at_once = len(self._pending) == 1
                try:
                    sending = nc.publish_request(
                        subject, self._inbox, token, payload, headers if isinstance(headers, dict) else dict(headers)
                    )
                    if nc._pending_data_size + size + _COMMAND_LINE_BYTES <= nc._max_pending_size:
                        await sending
                    else:
                        await self._publish_full(sending, ends, name, subject, timeout)
                finally:
                    nc.write_at_once = False
            except DeadlineExceededError:
                raise  # a TimeoutError, so an OSError, but not a failure of the connection
            except nats.errors.MaxPayloadError:
                raise PayloadTooLargeError(
                    f"the request to '{name}' is over the max_payload of {nc.max_payload} bytes of the NATS "
                    f"server at {self.addresses}",
                    payload={"size": size, "max_payload": nc.max_payload},
                ) from None
            except (nats.errors.BadSubjectError, nats.errors.BadHeaderError) as exc:
                raise BadRequestError(f"the call to '{name}' cannot be sent over NATS: {_describe(exc)}") from None
            except (nats.errors.Error, OSError) as exc:
                raise EndpointUnreachableError(
                    f"the call to '{name}' was not sent to NATS at {self.addresses}: {_describe(exc)}"
                ) from exc
            # One timer for all the calls costs less per call than a timer or an asyncio.timeout() scope each.
            deadlines = self._deadlines
            if len(deadlines) > 2 * len(self._pending) + _MAX_ENDED_DEADLINES:
                self._deadlines = deadlines = [entry for entry in deadlines if entry[2] in self._pending]
                heapq.heapify(deadlines)
            heapq.heappush(deadlines, (ends, number, token, subject, timeout))
            if self._timer is None or ends < self._timer_at:
                self._set_timer(ends)
            return await future
        finally:
            self._pending.pop(token, None)

    async def _publish_full(
        self, sending: Awaitable[None], ends: float, name: str, subject: str, timeout: float
    ) -> None:
        """Await a publish that fills nats-py's buffer, which makes it wait for the socket without a limit.

        Raise :class:`DeadlineExceededError` when the deadline ``ends`` (event loop time) passes first.
        """
        loop = self._loop
        assert loop is not None
        try:
            async with asyncio.timeout_at(ends):
                await sending
        except TimeoutError as exc:
            if isinstance(exc, nats.errors.Error):
                raise
        else:
            # nats-py (2.16) swallows the cancellation of its wait, so publish() returns at the deadline.
            if loop.time() < ends:
                return
        # The request is in the buffer, and is sent if the server reads again.
        raise DeadlineExceededError(
            f"the request to '{name}' on {subject} was not written within {timeout:.3f} s: the buffer of the "
            f"connection to NATS at {self.addresses} is full and the server is not reading, so the function "
            "may still run"
        ) from None

    def _set_timer(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None
        self._timer = self._loop.call_at(when, self._time_out)
        self._timer_at = when

    def _time_out(self) -> None:
        """Fail the calls whose deadline the timer was set for, or an earlier one, and set it for the next deadline."""
        self._timer = None
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= self._timer_at:
            _, _, token, subject, timeout = heapq.heappop(deadlines)
            entry = self._pending.get(token)
            if entry is not None and not entry[0].done():
                future, name = entry
                future.set_exception(
                    DeadlineExceededError(
                        f"no reply to '{name}' on {subject} within {timeout:.3f} s (NATS at {self.addresses})"
                    )
                )
        if deadlines:
            self._set_timer(deadlines[0][0])

    async def _on_presence(self, msg: Msg) -> None:
        event = decode_change(msg.data)
        if event is not None and self.presence is not None:
            self.presence[1](event)

    def _on_reply(self, subject: str, reply: str, data: bytes, headers: dict[str, str] | None) -> None:
        entry = self._pending.get(subject[len(self._inbox) :])
        if entry is not None and not entry[0].done():
            entry[0].set_result((data, headers))

    def _on_replied(self, subject: bytes, replied: Replied) -> None:
        # The inbox is ASCII, so the token starts where it ends in the bytes as in the decoded subject.
        entry = self._pending.get(subject[len(self._inbox) :].decode(errors="replace"))
        if entry is not None and not entry[0].done():
            entry[0].set_result(replied)

    def _fail_pending(self, reason: str) -> None:
        pending, self._pending = self._pending, {}
        for future, name in pending.values():
            if not future.done():
                future.set_exception(
                    TransportError(
                        f"the call to '{name}' was sent, then the connection to NATS at {self.addresses} {reason}"
                    )
                )

    async def _on_disconnected(self) -> None:
        if self._pending:
            logger.warning(
                "lost the connection to NATS at %s with %d calls in flight", self.addresses, len(self._pending)
            )
        self._fail_pending("was lost; the function may have run")

    async def _on_reconnected(self) -> None:
        logger.info("reconnected to NATS at %s", self.addresses)
        if self.presence is not None:
            # nats-py subscribes again by itself, but the events sent while it was away are lost.
            self.presence[1](None)

    async def _on_closed(self) -> None:
        self._fail_pending("was closed; the function may have run")

    async def close(self) -> None:
        nc, self.nc = self.nc, None
        if nc is not None:
            await _close_client(nc)
        self._fail_pending("was closed; the function may have run")
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadlines = []


class NatsTransport(ClientTransport):
    """Calls ``nats://host:port/<subject-prefix>`` endpoints over the caller's own NATS connection.

    ``url`` is the NATS server (or a comma-separated list of servers) to connect to, with credentials
    if it needs them; by default ``PIKKU_NATS_URL``, else ``nats://127.0.0.1:4222``. The host and port
    in an endpoint only tell operators where the worker is: the call goes through ``url``.

    Nothing connects until the first call. The connection then reconnects without limit after a
    broker restart; while it is down, calls fail at once with :class:`EndpointUnreachableError`. A
    client that nats-py closed for good (for example after an authorization error) is replaced on the
    next call. ``connections`` spreads calls round-robin over that many connections, each opened on
    its first call, and only the first one subscribes to presence. A second connection raised calls
    per second only where a core was idle. On busy cores it cost more CPU per call on the caller, the
    worker and nats-server, because each connection sends and receives smaller batches (see
    docs/benchmarks.md). So the default is one.
    """

    schemes: ClassVar[tuple[str, ...]] = ("nats",)

    def __init__(
        self,
        url: str | None = None,
        *,
        connections: int = DEFAULT_CONNECTIONS,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        if connections < 1:
            raise ConfigurationError(f"connections must be at least 1, got {connections!r}")
        if not connect_timeout > 0:
            raise ConfigurationError(f"connect_timeout must be positive seconds, got {connect_timeout!r}")
        self._url = url
        self._connect_timeout = connect_timeout
        self._slots: list[_CallerConnection | None] = [None] * connections
        self._opening: dict[int, asyncio.Task[_CallerConnection]] = {}
        self._next = itertools.count()
        self._endpoints: dict[str, NatsEndpoint] = {}
        self._subjects: dict[tuple[str, str], str] = {}
        """Request subjects by endpoint and function name, so a call does not escape its name again."""
        self._presence_listener: PresenceListener | None = None
        self._last_failure: tuple[float, EndpointUnreachableError] | None = None

    def set_presence_listener(self, listener: PresenceListener | None) -> None:
        """Pass presence events to ``listener``; takes effect on the connection opened next."""
        self._presence_listener = listener

    @property
    def url(self) -> str:
        """The NATS URL this transport connects to."""
        return self._url or default_nats_url()

    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        subject = self._subject(endpoint, request.name)
        payload = _encode_request(request)
        index = next(self._next) % len(self._slots) if len(self._slots) > 1 else 0
        connection = self._slots[index]
        if connection is None or not connection.usable:
            started = time.monotonic()
            connection = await self._slot_connection(index, request.name, timeout)
            timeout -= time.monotonic() - started
        data, headers = await connection.request(subject, payload, request.headers, timeout, request.name)
        return _decode_reply(data, headers, request.name, subject, connection.addresses)

    async def notify(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        """Store a one-way call in the JetStream stream of the endpoint's subject prefix (see :mod:`.jetstream`)."""
        from .jetstream import publish_notify

        try:
            prefix = parse_nats_endpoint(endpoint).prefix
        except ConfigurationError as exc:
            raise EndpointUnreachableError(str(exc)) from None
        connection = await self._connection(request.name, timeout)
        assert connection.nc is not None
        await publish_notify(connection.nc, prefix, request, timeout)
        return Reply(status=202, body=None)

    def _subject(self, endpoint: str, name: str) -> str:
        subject = self._subjects.get((endpoint, name))
        if subject is not None:
            return subject
        parsed = self._endpoints.get(endpoint)
        if parsed is None:
            try:
                parsed = parse_nats_endpoint(endpoint)
            except ConfigurationError as exc:
                # A broken registration: the call certainly cannot reach that instance.
                raise EndpointUnreachableError(str(exc)) from None
            if len(self._endpoints) < 10_000:
                self._endpoints[endpoint] = parsed
        if not name:
            raise BadRequestError("the function name is empty")
        subject = parsed.subject(name)
        if len(subject.encode()) > MAX_SUBJECT_LENGTH:
            raise BadRequestError(
                f"the subject of function '{name[:80]}...' is over {MAX_SUBJECT_LENGTH} bytes, "
                "the limit of a NATS subject here"
            )
        if len(self._subjects) >= 10_000:
            self._subjects.clear()
        self._subjects[endpoint, name] = subject
        return subject

    async def open_presence(self, timeout: float) -> None:
        """Open the connection that subscribes to presence, if a listener is set and it is not open yet."""
        if self._presence_listener is not None:
            await self._slot_connection(0, "presence", timeout)

    async def _connection(self, name: str, timeout: float) -> _CallerConnection:
        return await self._slot_connection(next(self._next) % len(self._slots), name, timeout)

    async def _slot_connection(self, index: int, name: str, timeout: float) -> _CallerConnection:
        connection = self._slots[index]
        if connection is not None and connection.usable:
            return connection
        failure = self._last_failure
        if failure is not None and time.monotonic() - failure[0] < _RECONNECT_PAUSE:
            raise EndpointUnreachableError(f"{failure[1]} (a moment ago; trying again within {_RECONNECT_PAUSE:g} s)")
        task = self._opening.get(index)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._open(index), name="pikku-nats-caller-connect")
            # Retrieved here so that an attempt every caller gave up on is not reported as unhandled.
            task.add_done_callback(lambda done: done.cancelled() or done.exception())
            self._opening[index] = task
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(task)
        except TimeoutError:
            raise DeadlineExceededError(
                f"the call to '{name}' ran out of time while connecting to NATS at {server_addresses(self.url)}"
            ) from None

    async def _open(self, index: int) -> _CallerConnection:
        try:
            stale = self._slots[index]
            if stale is not None:
                await stale.close()
            url = self.url
            # One connection subscribes to presence, so each event reaches the listener once.
            listener = self._presence_listener
            presence = (presence_subject(), listener) if index == 0 and listener is not None else None
            connection = _CallerConnection(url, server_addresses(url), presence)
            try:
                await connection.open(self._connect_timeout)
            except EndpointUnreachableError as exc:
                self._last_failure = (time.monotonic(), exc)
                raise
            self._last_failure = None
            self._slots[index] = connection
            return connection
        finally:
            self._opening.pop(index, None)

    async def close(self) -> None:
        tasks = list(self._opening.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._opening.clear()
        slots, self._slots = self._slots, [None] * len(self._slots)
        for connection in slots:
            if connection is not None:
                await connection.close()


class _Packer(threading.local):
    """A msgpack packer per thread, since ``msgpack.packb`` builds one for each call.

    A packer's buffer keeps the largest size it has grown to (msgpack 1.2.4), so :func:`_pack` gives
    the thread a new packer after a message of over ``_PACKER_KEPT_BYTES`` and after a failure.
    """

    def __init__(self) -> None:
        self.packer = msgpack.Packer()


_packer = _Packer()

_PACKER_KEPT_BYTES = 1024 * 1024
"""Bytes of a message up to which the thread's packer is kept, so no kept packer uses more than about 1 MiB.

A new packer starts with a buffer of 256 KiB (msgpack 1.2.4, ``buf_size``).
"""


def _pack(value: Any) -> bytes:
    """Pack ``value`` with this thread's packer, which is replaced after a failure or a large message."""
    try:
        packed: bytes = _packer.packer.pack(value)
    except BaseException:
        _packer.packer = msgpack.Packer()
        raise
    if len(packed) > _PACKER_KEPT_BYTES:
        _packer.packer = msgpack.Packer()  # frees the grown buffer of the old one
    return packed


def _encode_request(request: CallRequest) -> bytes:
    try:
        return _pack({"data": pydantic_core.to_jsonable_python(request.data)})
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError, OverflowError) as exc:
        raise BadRequestError(f"data for function '{request.name}' cannot be serialised to msgpack: {exc}") from None


def _decode_reply(data: bytes, headers: dict[str, str] | None, name: str, subject: str, addresses: str) -> Reply:
    if headers is None or len(headers) != 1 or HEADER_STATUS not in headers:
        headers = {key.lower(): value for key, value in (headers or {}).items()}
    # Else it contains only the status, the reply to a call that succeeded, under a name in lower case already.
    status_text = headers.get(HEADER_STATUS)
    if status_text is None:
        if headers.get("status") == _STATUS_NO_RESPONDERS and not data:
            raise EndpointUnreachableError(f"no worker subscribes to {subject} on NATS at {addresses} (no responders)")
        raise ProtocolError(
            f"the reply to '{name}' on {subject} is not a pikku_mq reply: it has no {HEADER_STATUS} header "
            f"(a JetStream stream capturing the subject answers with its own acknowledgement); "
            f"body {bytes(data[:120])!r}"
        )
    if status_text != "200" and (
        not (len(status_text) == 3 and status_text.isascii() and status_text.isdigit()) or status_text[0] == "0"
    ):
        raise ProtocolError(f"the reply to '{name}' on {subject} has an invalid {HEADER_STATUS} {status_text[:20]!r}")
    try:
        body = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(
            f"the reply to '{name}' on {subject} (status {status_text}) is not valid msgpack: {exc}"
        ) from None
    return Reply(status=int(status_text), body=body, rejected=headers.get(HEADER_REJECTED) == "1")


# -- serving -----------------------------------------------------------------------------------------


class NatsServer(ServerTransport):
    """Serves the functions of a worker on ``<subject-prefix>.>`` of a NATS server.

    ``url`` is the NATS server (or servers) to connect to, with credentials if needed. It defaults to
    ``PIKKU_NATS_URL``, else to the address and credentials in the endpoint itself. The worker
    advertises ``nats://host:port/<prefix>`` from its endpoint, without credentials.

    The subscription is in the queue group ``queue_group`` (by default the prefix), so workers that
    share a prefix share its calls. Each request runs in a task of its own, within the dispatcher's
    limits. A request that is not valid (a subject that is not a canonical escaped name, a body that
    is not msgpack of ``{"data": ...}``, a bad metadata header) gets a 4xx error reply. If nats-py
    closes the connection for good, the server connects and subscribes again with a backoff.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        queue_group: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    ) -> None:
        self._url = url
        self._queue_group = queue_group
        self._connect_timeout = connect_timeout
        self._endpoint: NatsEndpoint | None = None
        self._dispatcher: Dispatcher | None = None
        self._nc: _Client | None = None
        self._sub: Subscription | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        """The event loop of the connection, which runs the request callbacks."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._names: dict[str, str] = {}
        """The function name of each request subject seen lately; most workers serve a few functions."""
        self._revive_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._addresses = ""
        self._presence_subject = presence_subject()

    async def start(self, endpoint: str, dispatcher: Dispatcher) -> str:
        parsed = parse_nats_endpoint(endpoint)
        self._endpoint = parsed
        self._dispatcher = dispatcher
        self._stopping = False
        await self._connect()
        logger.info("serving %s on NATS at %s", parsed.subscription, self._addresses)
        return parsed.advertised

    async def _connect(self) -> None:
        endpoint = self._endpoint
        assert endpoint is not None
        url = self._url or default_nats_url(fallback=endpoint.server_url)
        self._addresses = server_addresses(url)
        self._loop = asyncio.get_running_loop()
        nc = await _open_client(
            url,
            name=f"pikku-mq worker {endpoint.prefix}",
            connect_timeout=self._connect_timeout,
            on_disconnected=self._on_disconnected,
            on_reconnected=self._on_reconnected,
            on_closed=self._on_closed,
        )
        try:
            self._sub = await nc.subscribe_direct(
                endpoint.subscription, self._on_request, queue=self._queue_group or endpoint.prefix
            )
            # Once the broker has the subscription, a caller that finds this worker can reach it.
            await nc.flush(timeout=max(1, round(self._connect_timeout)))
        except BaseException as exc:
            await _close_client(nc)
            if isinstance(exc, nats.errors.Error | asyncio.TimeoutError):
                raise EndpointUnreachableError(
                    f"cannot subscribe to {endpoint.subscription} on NATS at {self._addresses}: {_describe(exc)}"
                ) from exc
            raise
        self._nc = nc

    async def stop(self) -> None:
        self._stopping = True
        revive, self._revive_task = self._revive_task, None
        if revive is not None:
            revive.cancel()
            await asyncio.gather(revive, return_exceptions=True)
        nc, sub = self._nc, self._sub
        if nc is None:
            return
        try:
            if sub is not None and nc.is_connected:
                # Unsubscribe, then hand over the requests that had already arrived.
                async with asyncio.timeout(_STOP_GRACE):
                    await sub.drain()  # type: ignore[no-untyped-call]
        except Exception as exc:
            logger.warning("NATS at %s: unsubscribing failed: %s", self._addresses, _describe(exc))
        if self._tasks:
            _, late = await asyncio.wait(set(self._tasks), timeout=_STOP_GRACE)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=_STOP_GRACE)
        try:
            if nc.is_connected:
                await nc.flush(timeout=max(1, round(_STOP_GRACE)))
        except Exception as exc:
            logger.warning("NATS at %s: sending the last replies failed: %s", self._addresses, _describe(exc))
        self._nc = self._sub = None
        await _close_client(nc)
        logger.info("stopped serving on NATS at %s", self._addresses)

    async def begin_drain(self) -> None:
        """Leave the queue group, so NATS hands new calls to the other workers on this prefix.

        Without this, a draining worker keeps receiving its share of the group's calls and rejects
        them, although another member could serve them. Calls already received still get replies.
        """
        nc, sub, self._sub = self._nc, self._sub, None
        if nc is None or sub is None or not nc.is_connected:
            return
        try:
            async with asyncio.timeout(_STOP_GRACE):
                await sub.drain()  # type: ignore[no-untyped-call]
        except Exception as exc:
            logger.warning("NATS at %s: leaving the queue group failed: %s", self._addresses, _describe(exc))

    async def announce(self, kind: ChangeKind, deployment_id: str, in_flight: int | None = None) -> None:
        nc = self._nc
        if nc is None or not nc.is_connected:
            return  # callers learn of the change from discovery
        endpoint = self._endpoint.advertised if self._endpoint is not None else ""
        await nc.publish(self._presence_subject, encode_change(kind, deployment_id, endpoint, in_flight).encode())
        if kind in ("draining", "leave"):
            # Callers should stop routing here before the next call leaves them.
            await nc.flush(timeout=1)

    def presence_publisher(self) -> PresencePublisher | None:
        endpoint = self._endpoint
        if endpoint is None:
            return None
        url = self._url or default_nats_url(fallback=endpoint.server_url)
        return _NatsPresencePublisher(url, self._presence_subject, endpoint.advertised, self._connect_timeout)

    # -- requests ----------------------------------------------------------------------------------

    def _on_request(self, subject: str, reply: str, body: bytes, headers: dict[str, str] | None) -> None:
        # Called in nats-py's read loop: each request gets a task of its own, which _serve() takes
        # out of _tasks when it ends. A done callback would cost a turn of the event loop per request.
        assert self._loop is not None
        self._tasks.add(self._loop.create_task(self._serve(subject, reply, body, headers)))

    async def _serve(self, subject: str, reply: str, body: bytes, headers: dict[str, str] | None) -> None:
        # With its loop given, current_task() makes no getpid() system call (Python 3.11).
        task = asyncio.current_task(self._loop)
        assert task is not None
        assert self._dispatcher is not None
        try:
            if not reply:
                logger.debug("NATS: ignored a message on %s without a reply subject", subject[:200])
                return
            try:
                if isinstance(headers, _MalformedHeaders):
                    raise BadRequestError("the header block of the request cannot be parsed; send NATS/1.0 headers")
                name = self._function_name(subject)
                data = None if not body else _decode_call_body(body, True)
            except PikkuMQError as exc:
                await self._reply(reply, exc.http_status, exc.to_envelope(), error=exc, rejected=False, name="")
                return
            # The names are in lower case, from subscribe_direct().
            outcome = await self._dispatcher.handle(name, data, headers or {}, "nats", task=task)
            status, result = outcome.encode_python()
            await self._reply(reply, status, result, error=outcome.error, rejected=outcome.rejected, name=name)
        finally:
            self._tasks.discard(task)

    def _function_name(self, subject: str) -> str:
        name = self._names.get(subject)
        if name is not None:
            return name
        assert self._endpoint is not None
        token = subject[len(self._endpoint.prefix) + 1 :]
        try:
            name = unescape_token(token)
        except ValueError as exc:
            raise BadRequestError(
                f"subject {subject[:200]!r} does not name a function as <prefix>.<escaped name>: {exc}",
                payload={"subject": subject[:200]},
            ) from None
        if len(self._names) >= _MAX_CACHED_NAMES:
            self._names.clear()
        self._names[subject] = name
        return name

    async def _reply(
        self, reply_to: str, status: int, body: Any, *, error: PikkuMQError | None, rejected: bool, name: str
    ) -> None:
        nc = self._nc
        if nc is None:
            return
        try:
            payload = _pack(body)
        except (ValueError, TypeError, OverflowError) as exc:
            error = OutputValidationError(f"the result of function '{name}' cannot be serialised to msgpack: {exc}")
            status, payload = error.http_status, msgpack.packb(error.to_envelope())
        headers = _reply_headers(status, error, rejected)
        # The header block of a reply takes at most _MAX_REPLY_HEADER_BYTES, so only a large body needs a count.
        if len(payload) + _MAX_REPLY_HEADER_BYTES > nc.max_payload and (
            (size := message_size(headers, payload, nc.max_payload)) > nc.max_payload
        ):
            error = PayloadTooLargeError(
                f"the reply of function '{name}' is {size} bytes with its headers, over the max_payload of "
                f"{nc.max_payload} bytes of the NATS server",
                payload={"size": size, "max_payload": nc.max_payload},
            )
            status, payload = error.http_status, msgpack.packb(error.to_envelope())
            headers = _reply_headers(status, error, rejected=False)
        # The only call in flight: no other reply will join this one, so it goes out at once.
        nc.write_at_once = len(self._tasks) <= 1
        try:
            if not nc.publish_now(reply_to, payload, headers):
                await nc.publish(reply_to, payload, headers=headers)
        except (nats.errors.Error, OSError) as exc:
            logger.warning("NATS at %s: the reply to %s was not sent: %s", self._addresses, reply_to, _describe(exc))
        finally:
            nc.write_at_once = False

    # -- connection events -------------------------------------------------------------------------

    async def _on_disconnected(self) -> None:
        if not self._stopping:
            logger.warning("worker lost its connection to NATS at %s; reconnecting", self._addresses)

    async def _on_reconnected(self) -> None:
        logger.info("worker reconnected to NATS at %s", self._addresses)

    async def _on_closed(self) -> None:
        # Only the client that serves now counts: not one that failed to subscribe, nor one being stopped.
        if self._stopping or self._revive_task is not None or self._nc is None or not self._nc.is_closed:
            return
        logger.error("NATS at %s closed the worker's connection; connecting again", self._addresses)
        self._nc = self._sub = None
        self._revive_task = asyncio.get_running_loop().create_task(self._revive(), name="pikku-nats-revive")

    async def _revive(self) -> None:
        wait, longest = _REVIVE_BACKOFF
        failures = RepeatedFailureLog(logger)
        try:
            while not self._stopping:
                try:
                    await self._connect()
                except (EndpointUnreachableError, ConfigurationError) as exc:
                    failures.failed(logging.WARNING, "%s; trying again with backoff up to every %.1f s", exc, longest)
                    await asyncio.sleep(wait)
                    wait = min(wait * 2, longest)
                else:
                    logger.info("worker serves on NATS at %s again", self._addresses)
                    return
        finally:
            self._revive_task = None


class _NatsPresencePublisher(PresencePublisher):
    """Publishes a worker's presence heartbeats on a NATS connection of the heartbeat thread."""

    def __init__(self, url: str, subject: str, endpoint: str, connect_timeout: float) -> None:
        self._url = url
        self._subject = subject
        self._endpoint = endpoint
        self._connect_timeout = connect_timeout
        self._nc: NatsClient | None = None

    async def publish(self, kind: ChangeKind, deployment_id: str, in_flight: int | None, *, busy: bool) -> None:
        nc = self._nc
        if nc is None or nc.is_closed:
            self._nc = nc = await _open_client(
                self._url,
                name=f"pikku-mq presence {deployment_id}",
                connect_timeout=self._connect_timeout,
                on_disconnected=_ignore,
                on_reconnected=_ignore,
                on_closed=_ignore,
            )
        event = encode_change(kind, deployment_id, self._endpoint, in_flight, busy=busy)
        await nc.publish(self._subject, event.encode())

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            await _close_client(nc)


async def _ignore() -> None:
    """A connection callback with nothing to do: the next heartbeat finds out whether the connection works."""


def _reply_headers(status: int, error: PikkuMQError | None, rejected: bool) -> dict[str, str]:
    if status == 200 and error is None and not rejected:
        return _OK_HEADERS  # nats-py only reads the headers it sends
    headers = {HEADER_STATUS: str(status)}
    if error is not None:
        message = error.message
        if len(message) > _MAX_ERROR_HEADER:
            message = message[:_MAX_ERROR_HEADER] + "..."
        headers[HEADER_SERVICE_ERROR] = message or error.wire_name
        headers[HEADER_SERVICE_ERROR_CODE] = str(status)
    if rejected:
        headers[HEADER_REJECTED] = "1"
    return headers


_OK_HEADERS = {HEADER_STATUS: "200"}
