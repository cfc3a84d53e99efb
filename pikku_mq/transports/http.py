"""HTTP transport, wire-compatible with Pikku: ``POST {endpoint}/remote/rpc/{name}`` with ``{"data": ...}``.

The serving side is a plain ASGI app (mount it in Starlette or FastAPI, or let :class:`PikkuWorker`
serve it with uvicorn). The calling side uses aiohttp's client by default, because on a 2-core VM with
64 calls in flight aiohttp's client carried about 11,500 calls/s to a uvicorn server and httpx 0.29
about 665, spending about 1.4 ms of CPU per call in its connection pool. :class:`HttpxTransport` takes
a user's own ``httpx.AsyncClient`` where custom TLS or proxies need it.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import io
import json
import logging
import math
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import SplitResult, quote, unquote, urlsplit, urlunsplit

import aiohttp
import msgpack
import pydantic_core
import uvicorn
import yarl

from .._dispatch import Dispatcher, _Deadline
from .._durable import HEADER_ONE_WAY, TRACE_HEADERS
from .._errors import (
    BadRequestError,
    ConfigurationError,
    DeadlineExceededError,
    EndpointUnreachableError,
    MethodNotAllowedError,
    NotFoundError,
    PayloadTooLargeError,
    PikkuMQError,
    ProtocolError,
    RequestTimeoutError,
    TransportError,
    UnsupportedMediaTypeError,
)
from .._security import AUTHORIZATION_HEADER
from .._types import HEADER_CALL_ID, HEADER_DEADLINE, HEADER_HOP, HEADER_REQUEST_ID, CallRequest
from .base import ClientTransport, Reply, ServerTransport

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_MAX_BODY_SIZE", "AiohttpTransport", "HttpServer", "HttpxTransport", "PikkuASGIApp", "rpc_path"]

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_SIZE = 1024 * 1024
"""Default limit of a request body, in bytes."""

DEFAULT_BODY_TIMEOUT = 10.0
"""Seconds a request body that arrives in several parts may take from its first part to its last."""

_MAX_CACHED_URLS = 10_000
"""Request URLs a client transport remembers; past that it starts over, so the cache stays bounded."""

_MAX_CACHED_NAMES = 1_000
"""Header names, and request paths with their function names, that the ASGI app remembers.

Past that it stops adding (header names) or starts over (paths). Only names and paths up to
``_MAX_CACHED_KEY_BYTES`` are kept, so a client that sends long new ones cannot make the caches large."""

_MAX_CACHED_KEY_BYTES = 256
"""Length of the longest header name or raw request path that the ASGI app's caches keep."""

_HEADER_NAMES: dict[bytes, str] = {}
"""The lower-case text of each request header name, by the name's bytes as received."""

_LARGE_BODY = 1024 * 1024
"""Request bodies over this many bytes are handed to aiohttp as a file object (its own threshold)."""

MAX_NESTING = 200
"""Levels of arrays and objects a request body may nest, the body object included. pydantic serialises
at most 255, so deeper data could reach a function but never come back in its result."""
_TOO_DEEP = f"it is nested too deeply; the limit is {MAX_NESTING} levels of arrays and objects"
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _json_shapes_table() -> bytes:
    """Build the ``bytes.translate`` table that maps digits to "0", "e" and "E" to "e", "[" and "{" to "[".

    Every other byte maps to a space.
    """
    table = bytearray(b" " * 256)
    table[ord("0") : ord("9") + 1] = b"0" * 10
    for byte in b"eE":
        table[byte] = ord("e")
    for byte in b"[{":
        table[byte] = ord("[")
    return bytes(table)


_JSON_SHAPES = _json_shapes_table()
"""The table of ``bytes.translate`` that keeps only the shapes of numbers and the openings of arrays and objects."""
_FLOAT_OVERFLOW_DIGITS = b"0" * 309
"""A number with this many digits before its point, and no exponent, is too large for a float (over 1.8e308)."""
_MSGPACK_NON_JSON_TYPES = bytes([*range(0xC4, 0xCC), *range(0xD4, 0xD9)])
"""The type bytes of msgpack's bin, ext, fixext and float formats. A value of those types cannot be
encoded without one of these bytes, so a body that contains none of them holds none of those values."""

_ALL_BUT_NON_JSON_TYPES = bytes(byte for byte in range(256) if byte not in _MSGPACK_NON_JSON_TYPES)
"""Deleting these bytes from a body leaves only its type bytes of non-JSON values. ``bytes.translate``
does that in one pass, 7 times faster than a regular expression search on a 64 KiB body."""

RPC_PREFIX = "/remote/rpc/"
METRICS_PATH = "/metrics"
"""The path of the Prometheus metrics of a worker with metrics on, after the endpoint's own path."""
HEADER_REJECTED = "pikku-rejected"
JSON = "application/json"
MSGPACK = "application/msgpack"
_CONTENT_TYPE_HEADERS = {JSON: (b"content-type", JSON.encode()), MSGPACK: (b"content-type", MSGPACK.encode())}
"""The encoded content-type header of each kind of call reply."""

_NO_TIMEOUT = aiohttp.ClientTimeout()
"""The client session's timeouts: none, because each call runs in a deadline scope of its own budget.

aiohttp (3.14) rounds a timeout of 5 s or more up to a whole second of the loop's clock. Building its
frozen ``ClientTimeout`` for each call also took about 9,000 instructions."""

_SESSION_HEADERS = {"User-Agent": "pikku-mq", "Content-Type": JSON}
"""Headers of every request. aiohttp copies a session's headers in C but loops over each call's in Python.

Without a User-Agent here aiohttp would add its own. Naming one costs less per call than asking aiohttp
to skip it, because skipping makes it build two more header dicts."""

_METADATA_HEADERS = frozenset(
    {HEADER_REQUEST_ID, HEADER_CALL_ID, HEADER_HOP, HEADER_DEADLINE, AUTHORIZATION_HEADER, HEADER_ONE_WAY}
).union(TRACE_HEADERS)
"""The headers that the router sends with a call. A call with only these has no content type of its own."""

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def rpc_path(name: str) -> str:
    """Return the request path of function ``name`` (percent-encoded, slashes included)."""
    return RPC_PREFIX + quote(name, safe="")


class PikkuASGIApp:
    """ASGI app that serves ``POST /remote/rpc/{name}`` for a :class:`Dispatcher`.

    A body over ``max_body_size`` bytes gets 413 before it is read in full, and a body that arrives in
    several parts and is not complete ``body_timeout`` seconds after its first part gets 408; malformed JSON or msgpack,
    a body that is not ``{"data": ...}``, an unknown or hidden function each get their 4xx with the
    error envelope, and the app keeps serving.
    """

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        max_body_size: int = DEFAULT_MAX_BODY_SIZE,
        path_prefix: str = "",
        body_timeout: float = DEFAULT_BODY_TIMEOUT,
    ) -> None:
        if max_body_size <= 0:
            raise ValueError(f"max_body_size must be a positive number of bytes, got {max_body_size!r}")
        if not 0 < body_timeout < math.inf:
            raise ValueError(f"body_timeout must be a positive, finite number of seconds, got {body_timeout!r}")
        self.body_timeout = body_timeout
        self.dispatcher = dispatcher
        self.max_body_size = max_body_size
        self.rpc_prefix = path_prefix.rstrip("/") + RPC_PREFIX
        self.metrics_path = path_prefix.rstrip("/") + METRICS_PATH
        self._names: dict[bytes, tuple[str, str]] = {}
        """The path and the function name of each raw request path, for requests without a root path."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        telemetry = self.dispatcher.telemetry
        if telemetry is not None and telemetry.metrics is not None and scope["path"] == self.metrics_path:
            await _send_metrics(send, scope["method"], telemetry.metrics.render)
            return

        headers = _decode_headers(scope["headers"])
        content_type = _content_type(headers)
        binary = content_type == MSGPACK
        try:
            name = self._function_name(scope)
            data = await self._read_call(headers, content_type, receive)
        except PikkuMQError as exc:
            await _send_error(send, exc, binary=binary)
            return

        if headers.get(HEADER_ONE_WAY) == "1":
            rejection = self.dispatcher.accept_one_way(name, data, headers)
            if rejection is None:
                await _send(send, 202, b"", JSON, rejected=False)
                return
            outcome = rejection
        else:
            outcome = await self.dispatcher.handle(name, data, headers, "http")
        if binary:
            status, body = outcome.encode_python()
            await _send(send, status, msgpack.packb(body), MSGPACK, rejected=outcome.rejected)
        else:
            status, raw = outcome.encode_json()
            await _send(send, status, raw, JSON, rejected=outcome.rejected)

    def _function_name(self, scope: Scope) -> str:
        raw_path: bytes | None = scope.get("raw_path")
        root_path: str = scope.get("root_path", "")
        if not raw_path or root_path or len(raw_path) > _MAX_CACHED_KEY_BYTES:
            return self._name_from_paths(scope, root_path, raw_path)
        # Only paths under the RPC prefix are cached, each with the path it came with, in case a
        # middleware rewrote the path but not the raw path.
        path: str = scope["path"]
        cached = self._names.get(raw_path)
        if cached is None or cached[0] != path:
            name = self._name_from_paths(scope, root_path, raw_path)
            if len(self._names) >= _MAX_CACHED_NAMES:
                self._names.clear()
            self._names[raw_path] = (path, name)
            return name
        if scope["method"] != "POST":
            raise MethodNotAllowedError(f"{scope['method']} is not allowed; call functions with POST")
        return cached[1]

    def _name_from_paths(self, scope: Scope, root_path: str, raw_path: bytes | None) -> str:
        path: str = scope["path"]
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :]
        prefix = self.rpc_prefix
        if not path.startswith(prefix) or len(path) == len(prefix):
            raise NotFoundError(f"no route for {path[:200]!r}; functions are served at {prefix}<name>")
        if scope["method"] != "POST":
            raise MethodNotAllowedError(f"{scope['method']} is not allowed; call functions with POST")

        # Take the name from the raw path, so an encoded slash stays part of the name.
        if raw_path:
            encoded = raw_path.decode("latin-1").split("?", 1)[0]
            index = encoded.find(prefix)
            if index >= 0:
                return unquote(encoded[index + len(prefix) :])
        return path[len(prefix) :]

    async def _read_call(self, headers: dict[str, str], content_type: str, receive: Receive) -> Any:
        if content_type not in (JSON, MSGPACK, ""):
            raise UnsupportedMediaTypeError(
                f"content type {content_type[:100]!r} is not supported; send {JSON} or {MSGPACK}"
            )

        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_size:
            raise self._too_large()
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            body: bytes = message.get("body", b"")
            if len(body) > self.max_body_size:
                raise self._too_large()
        else:
            body = await self._read_parts_within_timeout(message, receive)
        return _decode_call_body(body, content_type == MSGPACK)

    async def _read_parts_within_timeout(self, message: Message, receive: Receive) -> bytes:
        # A body in several parts: limit the wait for the rest, so a client that stops sending cannot
        # keep the parts received so far in memory for as long as its connection stays open.
        try:
            async with asyncio.timeout(self.body_timeout):
                return await self._read_parts(message, receive)
        except TimeoutError:
            raise RequestTimeoutError(
                f"the client did not send the whole request body within {self.body_timeout} s",
                payload={"body_timeout": self.body_timeout},
            ) from None

    async def _read_parts(self, message: Message, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            if message["type"] == "http.disconnect":
                raise BadRequestError("the client disconnected before sending the whole body")
            chunk: bytes = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_size:
                raise self._too_large()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
            message = await receive()

    def _too_large(self) -> PayloadTooLargeError:
        return PayloadTooLargeError(
            f"request body is larger than the limit of {self.max_body_size} bytes",
            payload={"max_body_size": self.max_body_size},
        )


def _decode_headers(raw: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """Decode the ASGI headers of a request, with the names in lower case. Of repeated names, the last one counts."""
    names = _HEADER_NAMES
    if not isinstance(raw, (list, tuple)):
        raw = list(raw)  # read twice when a name is new
    try:
        # The common case, where every name is cached, in a comprehension: 30% fewer bytecodes per header.
        return {names[raw_name]: value.decode("latin-1") for raw_name, value in raw}
    except KeyError:
        pass
    headers = {}
    for raw_name, value in raw:
        name = names.get(raw_name)
        if name is None:
            name = raw_name.decode("latin-1").lower()
            if len(names) < _MAX_CACHED_NAMES and len(raw_name) <= _MAX_CACHED_KEY_BYTES:
                names[raw_name] = name
        headers[name] = value.decode("latin-1")
    return headers


def _decode_call_body(body: bytes, binary: bool) -> Any:
    if not body:
        raise BadRequestError('request body is empty; send a JSON object {"data": ...}')
    try:
        if binary:
            call = msgpack.unpackb(body, raw=False)
            # msgpack decodes strings as strict UTF-8 and map keys as strings or bytes only, and a body
            # shorter than MAX_NESTING bytes cannot nest that deep: without the type bytes above, the
            # walk would find nothing to reject.
            if len(body) >= MAX_NESTING or body.translate(None, _ALL_BUT_NON_JSON_TYPES):
                _reject_non_json(call)
        else:
            call = _decode_json(body)
    except (ValueError, RecursionError, msgpack.UnpackException) as exc:
        kind = "msgpack" if binary else "JSON"
        raise BadRequestError(f"request body is not valid {kind}: {_decode_failure(exc)}") from None

    if not isinstance(call, dict):
        raise BadRequestError(f'request body must be an object {{"data": ...}}, got {type(call).__name__}')
    # A body of {} or {"data": ...} has no other key, which the length and one lookup tell without a loop.
    if len(call) > 1 or (call and "data" not in call):
        unknown = sorted(str(key) for key in call if key != "data")
        raise BadRequestError(f"request body has unknown fields {unknown[:10]}; only 'data' is allowed")
    # Pikku sends {} when its data is undefined, so a missing field means None.
    return call.get("data")


def _decode_json(body: bytes) -> Any:
    """Decode a JSON request body, rejecting what :func:`_reject_non_json` rejects.

    pydantic_core's parser decodes a body the way ``json.loads`` does, about three times faster, but
    where a number is too large for a float it returns an infinity. An infinity needs either an
    exponent after a digit or a run of 309 digits, and a body with neither goes to that parser. The
    others, and every body it rejects, go to the standard library's decoder. That one gives the
    error message, or takes what pydantic_core refused but the old path took (a BOM, an escaped lone
    surrogate) and rejects it as before.
    """
    shapes = body.translate(_JSON_SHAPES)  # only the shapes of numbers and of array and object openings
    too_deep = shapes.count(b"[") > MAX_NESTING  # a body with fewer cannot be nested that deeply
    # find(), not "in": bytes.__contains__ first tries its operand as an int, and clearing that TypeError
    # costs more than the search of a short body.
    if shapes.find(b"0e") < 0 and shapes.find(_FLOAT_OVERFLOW_DIGITS) < 0:
        try:
            call = pydantic_core.from_json(body, allow_inf_nan=False)
        except ValueError:
            pass
        else:
            if too_deep:
                _reject_non_json(call)
            return call
    # json.loads on bytes would also take UTF-16 and UTF-32, and UTF-8 with encoded lone surrogates
    # ("\xed\xa0\x80"), which no reply can carry back: only UTF-8 is JSON on the wire. The decoder
    # is built once, with the same hooks that json.loads would take.
    # Strip a BOM as the utf-8-sig codec does, without that codec's Python-level call.
    text = (body[3:] if body.startswith(codecs.BOM_UTF8) else body).decode("utf-8")
    call = _JSON_DECODER.decode(text)
    if too_deep or _SURROGATE_ESCAPE.search(body):
        _reject_non_json(call)
    return call


def _decode_failure(exc: Exception) -> str:
    if isinstance(exc, RecursionError | msgpack.exceptions.StackError):
        # The same message as the nesting check's. Whether the parser's own limit (msgpack's stack, or
        # Python's recursion, which depends on the stack's depth) or the check ends first is of no use
        # to the caller.
        return _TOO_DEEP
    if isinstance(exc, UnicodeDecodeError):
        return f"a string is not UTF-8 ({exc.reason} at byte {exc.start})"
    return str(exc) or type(exc).__name__


def _content_type(headers: dict[str, str]) -> str:
    return media_type(headers.get("content-type", JSON))


def media_type(value: str) -> str:
    """Return the media type of a content-type header's value, in lower case and without parameters."""
    if value in (JSON, MSGPACK):
        return value
    return value.split(";", 1)[0].strip().lower()


def _reject_constant(constant: str) -> Any:
    raise ValueError(f"{constant} is not valid JSON; send finite numbers only")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of the range of a 64-bit float; send finite numbers only")
    return value


_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)


def _reject_non_json(value: Any) -> None:
    """Raise ValueError if a decoded value holds what JSON peers could not read or pikku_mq could not answer.

    That is NaN, infinities, bytes, extension types, timestamps, map keys that are not strings, strings
    with lone surrogates (JSON's ``"\\ud800"``), and nesting deeper than ``MAX_NESTING``. A function
    would fail on such data with a server error instead of the caller's bad request: pydantic cannot
    serialise more than 255 levels, nor a lone surrogate, so even an echo of the data would be a 500.
    """
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    raise ValueError("strings must not contain lone surrogates ('\\ud800' to '\\udfff')") from None
        elif isinstance(item, int | bool) or item is None:
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise ValueError("NaN and infinities are not accepted; send finite numbers only")
        elif depth >= MAX_NESTING:
            raise ValueError(_TOO_DEEP)
        elif isinstance(item, dict):
            if not all(isinstance(key, str) for key in item):
                raise ValueError("map keys must be strings, as in JSON")
            pending.extend((key, depth) for key in item)
            pending.extend((child, depth + 1) for child in item.values())
        elif isinstance(item, list):
            pending.extend((child, depth + 1) for child in item)
        else:
            raise ValueError(f"msgpack {type(item).__name__} values are not accepted; send JSON-compatible data")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _send_metrics(send: Send, method: str, render: Callable[[], tuple[bytes, str]]) -> None:
    """Reply to a scrape of ``/metrics`` with the registry in Prometheus's text format."""
    if method not in ("GET", "HEAD"):
        await _send_error(
            send, MethodNotAllowedError(f"{METRICS_PATH} accepts GET and HEAD, not {method[:20]}"), binary=False
        )
        return
    body, content_type = render()
    await _send(send, 200, b"" if method == "HEAD" else body, content_type, rejected=False)


async def _send_error(send: Send, error: PikkuMQError, *, binary: bool) -> None:
    if binary:
        await _send(send, error.http_status, msgpack.packb(error.to_envelope()), MSGPACK, rejected=False)
    else:
        await _send(send, error.http_status, json.dumps(error.to_envelope()).encode(), JSON, rejected=False)


async def _send(send: Send, status: int, body: bytes, content_type: str, *, rejected: bool) -> None:
    type_header = _CONTENT_TYPE_HEADERS.get(content_type) or (b"content-type", content_type.encode())
    headers = [type_header, (b"content-length", str(len(body)).encode())]
    if rejected:
        # A rejection means this worker is draining: close the connection so the caller's pool drops it.
        headers.append((HEADER_REJECTED.encode(), b"1"))
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def encode_request(request: CallRequest) -> bytes:
    """Serialise ``{"data": ...}`` to JSON; pydantic models, dataclasses and the like are accepted."""
    try:
        body = pydantic_core.to_json({"data": request.data})
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
        raise BadRequestError(f"data for function '{request.name}' cannot be serialised to JSON: {exc}") from None
    if has_non_finite_number(body):
        raise BadRequestError(f"data for function '{request.name}' contains NaN or Infinity, which JSON cannot carry")
    return body


def has_non_finite_number(body: bytes) -> bool:
    """Return whether JSON text written with NaN/Infinity constants contains one outside a string."""
    if body.find(b"NaN") < 0 and body.find(b"Infinity") < 0:  # find(), cheaper than "in" here
        return False
    try:
        json.loads(body, parse_constant=_reject_constant)
    except ValueError:
        return True
    return False


def _without_content_type(headers: dict[str, str]) -> dict[str, str]:
    """Return a call's headers without any content type of the caller's, since the body is always JSON."""
    return {name: value for name, value in headers.items() if name.lower() != "content-type"}


def decode_reply(status: int, raw: bytes, content_type: str, *, rejected: bool = False) -> Reply:
    """Decode a reply body by its content-type header's value; Pikku's ``204`` with no body is a ``None`` result."""
    if status == 204 or (not raw and 200 <= status < 300):
        return Reply(200, None, rejected)
    try:
        body = msgpack.unpackb(raw, raw=False) if media_type(content_type) == MSGPACK else _decode_reply_json(raw)
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"peer returned status {status} with a body that cannot be decoded: {exc}") from None
    return Reply(status, body, rejected)


def _decode_reply_json(raw: bytes) -> Any:
    """Decode a JSON reply as json.loads does, with pydantic_core's faster parser where it reads the body alike.

    What pydantic_core rejects (a BOM, lone surrogates) goes to json.loads, for its result or its error.
    """
    try:
        return pydantic_core.from_json(raw)
    except ValueError:
        return json.loads(raw)


class AiohttpTransport(ClientTransport):
    """HTTP client transport on one shared aiohttp keep-alive connection pool."""

    schemes: ClassVar[tuple[str, ...]] = ("http", "https")

    def __init__(self, *, limit: int = 100, keepalive_timeout: float = 30.0) -> None:
        self._limit = limit
        self._keepalive_timeout = keepalive_timeout
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[tuple[str, str], yarl.URL] = {}
        """Parsed request URLs by endpoint and function name, so a call neither percent-encodes its name
        again nor has aiohttp parse the URL's text."""

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._limit, keepalive_timeout=self._keepalive_timeout)
            self._session = aiohttp.ClientSession(connector=connector, timeout=_NO_TIMEOUT, headers=_SESSION_HEADERS)
        return self._session

    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        url = self._urls.get((endpoint, request.name))
        if url is None:
            try:
                url = yarl.URL(endpoint.rstrip("/") + rpc_path(request.name))
            except ValueError as exc:
                # As aiohttp's InvalidURL would be, had it parsed the text.
                raise TransportError(
                    f"call to '{request.name}' at {endpoint} failed: the URL is invalid: {exc}"
                ) from exc
            if len(self._urls) >= _MAX_CACHED_URLS:
                self._urls.clear()
            self._urls[endpoint, request.name] = url
        body = encode_request(request)
        headers = request.headers
        if not headers.keys() <= _METADATA_HEADERS:  # the common case, checked in C, has only these
            headers = _without_content_type(headers)
        # aiohttp warns that writing a body over 1 MiB from bytes blocks the loop; a file object is
        # written in chunks instead.
        data: bytes | io.BytesIO = io.BytesIO(body) if len(body) > _LARGE_BODY else body
        # The same scope as asyncio.timeout(), with less work per call (see _Deadline).
        deadline = _Deadline(asyncio.current_task(), timeout)
        try:
            try:
                async with self._client().post(url, data=data, headers=headers) as response:
                    raw = await response.read()
                    response_headers = response.headers
                    reply = decode_reply(
                        response.status,
                        raw,
                        response_headers.get("Content-Type", JSON),
                        rejected=response_headers.get(HEADER_REJECTED) == "1",
                    )
            except BaseException as exc:
                deadline.leave(exc)  # raises TimeoutError when the deadline ended the call
                raise
            deadline.leave(None)
        except aiohttp.ClientConnectorError as exc:
            raise EndpointUnreachableError(f"cannot connect to {endpoint}: {exc.os_error}") from exc
        except TimeoutError:
            raise DeadlineExceededError(
                f"no reply from {endpoint} to '{request.name}' within {timeout:.3f} s"
            ) from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"call to '{request.name}' at {endpoint} failed: {type(exc).__name__}: {exc}") from exc
        return reply

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpxTransport(ClientTransport):
    """HTTP client transport on a caller's own ``httpx.AsyncClient`` (custom TLS, proxies).

    The client stays the caller's: :meth:`close` does not close it.
    """

    schemes: ClassVar[tuple[str, ...]] = ("http", "https")

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client

    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        import httpx

        url = endpoint.rstrip("/") + rpc_path(request.name)
        body = encode_request(request)
        headers = {**request.headers, "content-type": JSON}
        try:
            response = await self._client.post(url, content=body, headers=headers, timeout=timeout)
        except httpx.ConnectError as exc:
            raise EndpointUnreachableError(f"cannot connect to {endpoint}: {exc}") from exc
        except httpx.TimeoutException:
            raise DeadlineExceededError(
                f"no reply from {endpoint} to '{request.name}' within {timeout:.3f} s"
            ) from None
        except httpx.TransportError as exc:
            raise TransportError(f"call to '{request.name}' at {endpoint} failed: {type(exc).__name__}: {exc}") from exc

        content_type = response.headers.get("content-type", JSON)
        rejected = response.headers.get(HEADER_REJECTED) == "1"
        return decode_reply(response.status_code, response.content, content_type, rejected=rejected)


# -- serving -------------------------------------------------------------------------------------------


class _EmbeddedServer(uvicorn.Server):
    """uvicorn's server without its signal handling: the worker owns SIGTERM and SIGINT.

    ``Server.serve`` otherwise captures the signals and re-raises them after shutdown, so the code
    that should run after it (deregistration, the exit status) would not.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer(ServerTransport):
    """Serves :class:`PikkuASGIApp` with an embedded uvicorn server at an ``http://host:port`` endpoint.

    ``bind_host`` is the address to listen on when it differs from the advertised host, for example
    ``0.0.0.0`` behind ``http://10.0.0.5:8001``.
    """

    def __init__(self, *, bind_host: str | None = None, max_body_size: int = DEFAULT_MAX_BODY_SIZE) -> None:
        self.bind_host = bind_host
        self.max_body_size = max_body_size
        self._server: _EmbeddedServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, endpoint: str, dispatcher: Dispatcher) -> str:
        parts = urlsplit(endpoint)
        if not parts.hostname:
            raise ConfigurationError(f"endpoint {endpoint!r} has no host; use http://host:port")
        app = PikkuASGIApp(dispatcher, max_body_size=self.max_body_size, path_prefix=parts.path)
        sock = _bind(self.bind_host or parts.hostname, parts.port or 0)
        config = uvicorn.Config(
            app,
            lifespan="off",
            access_log=False,
            log_level=logging.WARNING,
            timeout_graceful_shutdown=1,
            timeout_keep_alive=30,
            # The app never reads the client's address, so uvicorn need not rewrite it from
            # X-Forwarded-For on every request.
            proxy_headers=False,
            # Callers have no use for "server: uvicorn", and each response header costs uvicorn two regular
            # expression searches.
            server_header=False,
        )
        server = self._server = _EmbeddedServer(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]), name=f"pikku-http-{endpoint}")
        while not server.started:
            if self._task.done():
                self._task.result()
                raise RuntimeError(f"the HTTP server for {endpoint} exited during startup")
            await asyncio.sleep(0.005)
        return _with_port(parts, sock.getsockname()[1])

    async def stop(self) -> None:
        server, task = self._server, self._task
        self._server = self._task = None
        if server is not None and task is not None:
            server.should_exit = True
            await task


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the listening socket
    # is declared as TCP, and without it every response waits for the peer's delayed ACK (about 40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigurationError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    sock.setblocking(False)
    return sock


def _with_port(endpoint: SplitResult, port: int) -> str:
    host = endpoint.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return urlunsplit((endpoint.scheme, f"{host}:{port}", endpoint.path.rstrip("/"), "", ""))
