"""Hostile input on every remote surface: an HTTP endpoint, a NATS subject prefix and an AMQP queue.

Each test starts one worker process (tests/apps/fuzz_worker.py, with a remote secret) on one transport
and sends it ``INPUTS_PER_SURFACE`` inputs that hypothesis generates, straight at the raw surface: a
plain socket for HTTP and NATS, an aiormq channel for AMQP. After every ``VALID_CALL_EVERY`` inputs a
valid call must succeed. Every reply must meet the status rules of ``status_problem``: no 5xx for the
caller's mistake. At the end the worker process must be alive, serve a valid call, have logged no
traceback, and its resident memory must have grown less than ``RSS_GROWTH_LIMIT_KIB``. Each test
prints its counts; run ``python -m pytest -s tests/test_fuzz_surfaces.py`` to see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiormq
import aiormq.abc
import aiormq.exceptions
import msgpack
import pytest
from _support_amqp import (
    REPLY_TO,
    RawProperties,
    field_table,
    long_string_entry,
    nested_table,
    raw_properties,
    short_string,
)
from _support_fuzz import (
    INPUTS_PER_SURFACE,
    RSS_GROWTH_LIMIT_KIB,
    SECRET,
    VALID_CALL_EVERY,
    Metadata,
    Tally,
    authorizations,
    bodies,
    deadline_values,
    envelope_problem,
    function_names,
    hop_values,
    hostile_aspects,
    rss_kib,
    run_in_thread,
    status_problem,
    valid_token,
)
from _support_workers import WorkerProcess, WorkerProcesses
from aiormq.abc import DeliveredMessage
from hypothesis import strategies as st
from pamqp.commands import Basic

from pikku_mq.transports._nats_wire import escape_name

APP = Path(__file__).parent / "apps" / "fuzz_worker.py"

MAX_BODY_SIZE = 64 * 1024
"""The body limit of the fuzzed worker, in bytes: small, so that oversized bodies cost little to send."""

REPLY_TIMEOUT = 15.0
"""Seconds a reply to one input may take; generous, because the machine is shared."""

RUN_TIMEOUT = 900
"""Seconds one surface's run may take in all (about a minute is usual)."""

WORKER_LOG_PROBLEMS = (
    "Traceback",
    "Exception in ASGI application",
    "lost its connection",
    "closed the worker's connection",
    "failed to serve",
    "failed to send",
)
"""Lines in the worker's log that show it failed on an input instead of replying to it."""


class Fuzzer:
    """Sends the generated inputs of one surface, judges each reply and interleaves valid calls."""

    surface = ""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.tally = Tally(self.surface)

    async def exchange(self, case: Any) -> None:
        outcome = await self.send(case)
        self.tally.record(outcome, case.kind)
        if self.tally.sent % VALID_CALL_EVERY == 0:
            await self.check_valid_call()
        if self.tally.sent % (INPUTS_PER_SURFACE // 4) == 0:
            self.tally.rss_kib.append((f"after {self.tally.sent}", rss_kib(self.worker.process.pid)))

    async def send(self, case: Any) -> str:
        """Send one input, check its reply, and return the outcome to count (a status, or what happened)."""
        raise NotImplementedError

    async def valid_call(self, marker: str) -> Any:
        """Call ``echo`` with ``{"marker": marker}`` the way a correct client does, and return the result."""
        raise NotImplementedError

    async def check_valid_call(self) -> None:
        marker = uuid.uuid4().hex
        assert await self.valid_call(marker) == {"marker": marker}, "a valid call failed after hostile inputs"
        self.tally.valid_calls += 1

    async def close(self) -> None:
        """Release the fuzzer's connections."""


async def run_surface(fuzzer: Fuzzer, cases: st.SearchStrategy[Any]) -> Tally:
    """Run one surface's inputs against its worker and check the worker after them."""
    worker, tally = fuzzer.worker, fuzzer.tally
    for _ in range(3):
        await fuzzer.check_valid_call()
    tally.rss_kib.append(("before", rss_kib(worker.process.pid)))

    await run_in_thread(cases, fuzzer.exchange, INPUTS_PER_SURFACE, timeout=REPLY_TIMEOUT * 4)

    await fuzzer.check_valid_call()
    tally.rss_kib.append(("after", rss_kib(worker.process.pid)))
    await fuzzer.close()
    print("\n" + tally.report())

    assert worker.process.poll() is None, f"the worker exited with {worker.process.returncode}"
    assert tally.sent >= INPUTS_PER_SURFACE
    growth = tally.rss_kib[-1][1] - tally.rss_kib[0][1]
    assert growth < RSS_GROWTH_LIMIT_KIB, f"the worker's RSS grew by {growth} KiB"
    log = worker.stderr()
    for problem in WORKER_LOG_PROBLEMS:
        assert problem not in log, f"the worker logged {problem!r}:\n{_excerpt(log, problem)}"
    return tally


def _excerpt(log: str, needle: str) -> str:
    index = log.index(needle)
    return log[max(0, index - 2000) : index + 2000]


def _short(value: bytes, limit: int = 300) -> str:
    text = repr(value[:limit])
    return text + (f"... ({len(value)} bytes)" if len(value) > limit else "")


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> str:
    """Give the worker processes this test starts the remote secret that the fuzzer signs with."""
    monkeypatch.setenv("PIKKU_REMOTE_SECRET", SECRET)
    return SECRET


# -- HTTP ------------------------------------------------------------------------------------------

JSON = b"application/json"
MSGPACK = b"application/msgpack"


@dataclass(frozen=True)
class HttpCase:
    """One raw HTTP request. ``complete`` is false when its framing promises bytes it does not send."""

    kind: str
    request: bytes
    complete: bool
    head: bool
    metadata: Metadata

    def __repr__(self) -> str:
        return f"HttpCase(kind={self.kind!r}, complete={self.complete}, request={_short(self.request, 2000)})"


def _header_text(value: str | None) -> st.SearchStrategy[bytes | None]:
    """Encode a header value as a client might: UTF-8, Latin-1 where it fits, or not at all."""
    if value is None:
        return st.none()
    encodings = [st.just(value.encode("utf-8", "surrogatepass"))]
    with contextlib.suppress(UnicodeEncodeError):
        encodings.append(st.just(value.encode("latin-1")))
    return st.one_of(encodings)


header_bytes = st.binary(max_size=60).map(lambda raw: raw.replace(b"\r", b"").replace(b"\n", b""))
"""Any header bytes but a line end, which would end the header instead of being part of it."""


@st.composite
def http_targets(draw: st.DrawFn, name: str, hostile: bool) -> bytes:
    escaped = b"/remote/rpc/" + quote(name, safe="").encode()
    if not hostile:
        return escaped
    return draw(
        st.one_of(
            st.just(escaped + b"?" + quote(name).encode()),
            st.just(b"/remote/rpc/" + name.encode("utf-8", "surrogatepass")),
            st.binary(max_size=12).map(lambda raw: b"/remote/rpc/" + b"".join(b"%%%02X" % byte for byte in raw)),
            st.sampled_from(
                [
                    b"/",
                    b"*",
                    b"/remote/rpc/",
                    b"/remote/rpc",
                    b"/remote/rpcx/echo",
                    b"//remote/rpc/echo",
                    b"/remote/rpc/../rpc/echo",
                    b"http://127.0.0.1/remote/rpc/echo",
                    b"/remote/rpc/%",
                    b"/remote/rpc/%zz",
                    b"/remote/rpc/echo%00",
                    b"/remote/rpc/" + b"e" * 70_000,
                ]
            ),
            header_bytes.map(lambda raw: b"/remote/rpc/" + raw.replace(b" ", b"")),
        )
    )


def content_types(binary: bool, hostile: bool) -> st.SearchStrategy[bytes | None]:
    if not hostile:
        return st.sampled_from([MSGPACK if binary else JSON, (MSGPACK if binary else JSON) + b"; charset=utf-8"])
    odd = [None, MSGPACK.upper(), b"application/x-msgpack", b"text/plain", b"multipart/form-data; boundary=x"]
    return st.sampled_from([*odd, b"application/json\xff", b"", b";", JSON if binary else MSGPACK]) | header_bytes


HTTP_ASPECTS = st.sampled_from(
    [
        "body",
        "name",
        "deadline",
        "hop",
        "authorization",
        "content-type",
        "method",
        "version",
        "target",
        "framing",
        "headers",
        "garbage",
    ]
)
"""The parts of an HTTP request that a case may make hostile."""

Headers = list[tuple[bytes, bytes | None]]


@st.composite
def http_cases(draw: st.DrawFn) -> HttpCase:
    hostile = draw(hostile_aspects(HTTP_ASPECTS))
    name = draw(function_names("name" in hostile))
    binary = draw(st.booleans())
    body = draw(bodies(name, binary, MAX_BODY_SIZE, "body" in hostile))
    deadline = draw(deadline_values("deadline" in hostile))
    hop = draw(hop_values("hop" in hostile))
    authorization = draw(authorizations(name, body, "authorization" in hostile))

    method = b"POST"
    if "method" in hostile:
        method = draw(st.sampled_from([b"GET", b"PUT", b"HEAD", b"OPTIONS", b"post", b"P\xffST", b""]))
    version = b"HTTP/1.1"
    if "version" in hostile:
        version = draw(st.sampled_from([b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/9", b""]))
    headers: Headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", draw(content_types(binary, "content-type" in hostile))),
    ]
    for header, value in (("pikku-deadline-ms", deadline), ("pikku-hop", hop), ("authorization", authorization)):
        headers.append((header.encode(), draw(_header_text(value))))
    if "headers" in hostile:
        headers.extend(draw(_hostile_headers()))

    framing = "length"
    if "framing" in hostile:
        framing = draw(st.sampled_from(["none", "short", "long", "chunked", "broken-chunks", "both"]))
    payload, complete = _framed(draw, framing, body.raw, headers)
    head = b"".join(key + b": " + value + b"\r\n" for key, value in headers if value is not None)
    target = draw(http_targets(name, "target" in hostile))
    request = method + b" " + target + b" " + version + b"\r\n" + head + b"\r\n" + payload
    if "garbage" in hostile:
        request, complete = draw(st.binary(max_size=200)) + draw(st.sampled_from([b"", b"\r\n\r\n"])), False

    kind = f"{'msgpack' if binary else 'json'} {body.kind}"
    metadata = Metadata(
        deadlines=tuple(value for key, value in headers if key.lower() == b"pikku-deadline-ms"),
        hops=tuple(value for key, value in headers if key.lower() == b"pikku-hop"),
    )
    return HttpCase(kind, request, complete, method == b"HEAD", _latin1(metadata))


@st.composite
def _hostile_headers(draw: st.DrawFn) -> Headers:
    """Header lines a well-behaved client does not send: copies, odd bytes, huge values, upgrades."""
    kind = draw(st.sampled_from(["copies", "random", "long", "expect", "upgrade", "ids"]))
    if kind == "copies":
        name = draw(st.sampled_from([b"pikku-deadline-ms", b"PIKKU-HOP", b"Authorization", b"content-type"]))
        return [(name, draw(header_bytes)) for _ in range(draw(st.integers(1, 3)))]
    if kind == "random":
        names = st.lists(header_bytes.map(lambda raw: raw.replace(b":", b"")).filter(bool), min_size=1, max_size=3)
        return [(name, draw(header_bytes)) for name in draw(names)]
    if kind == "long":
        return [(b"x-long", b"v" * draw(st.integers(1000, 100_000)))]
    if kind == "expect":
        return [(b"expect", b"100-continue")]
    if kind == "upgrade":
        return [(b"connection", b"upgrade"), (b"upgrade", draw(st.sampled_from([b"websocket", b"h2c", b"\xff"])))]
    return [(b"x-request-id", draw(header_bytes)), (b"pikku-call-id", draw(header_bytes))]


def _framed(draw: st.DrawFn, framing: str, body: bytes, headers: Headers) -> tuple[bytes, bool]:
    """Frame ``body`` with the given ``framing``; return the bytes and whether the request is complete."""
    if framing == "length":
        headers.append((b"content-length", str(len(body)).encode()))
        return body, True
    if framing == "none":
        return body, True
    if framing == "short":
        headers.append((b"content-length", str(max(0, len(body) - draw(st.integers(1, 10)))).encode()))
        return body, True
    if framing == "long":
        headers.append((b"content-length", str(len(body) + draw(st.integers(1, 10**6))).encode()))
        return body, False
    headers.append((b"transfer-encoding", b"chunked"))
    if framing == "both":
        headers.append((b"content-length", str(len(body)).encode()))
    pieces = [body[start : start + 997] for start in range(0, len(body), 997)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces)
    if framing == "broken-chunks":
        cut = chunks[: draw(st.integers(0, len(chunks)))]
        return cut + draw(st.sampled_from([b"", b"zz\r\n", b"ffffffffff\r\n"])), False
    return chunks + b"0\r\n\r\n", framing == "chunked"


def _latin1(metadata: Metadata) -> Metadata:
    """Decode header values as the worker does: HTTP header bytes as Latin-1."""
    return Metadata(
        deadlines=tuple(value.decode("latin-1") for value in metadata.deadlines if value is not None),
        hops=tuple(value.decode("latin-1") for value in metadata.hops if value is not None),
    )


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


class HttpFuzzer(Fuzzer):
    """Sends each request on a connection of its own, on a plain socket, so any bytes can be sent."""

    surface = "HTTP"

    def __init__(self, worker: WorkerProcess) -> None:
        super().__init__(worker)
        self.port = urlsplit(worker.endpoint).port or 80

    async def send(self, case: HttpCase) -> str:
        started = time.monotonic()
        response = await self.exchange_raw(case.request, complete=case.complete, head=case.head)
        elapsed = time.monotonic() - started
        if response is None:
            assert not case.complete, f"no response to a complete request: {case!r}"
            return "closed without a response (incomplete request)"

        problem = status_problem(response.status, case.metadata, elapsed)
        content_type = response.headers.get(b"content-type", b"")
        if problem is None and response.status >= 400 and content_type in (JSON, MSGPACK) and not case.head:
            problem = envelope_problem(_decode(response.body, content_type))
        assert problem is None, f"{problem}; response {response}; input {case!r}"
        return str(response.status)

    async def exchange_raw(self, request: bytes, *, complete: bool, head: bool = False) -> HttpResponse | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1024 * 1024)
        try:
            try:
                writer.write(request)
                if not complete:
                    writer.write_eof()
                await writer.drain()
            except ConnectionError:
                pass  # the server may reply and close before it has read the whole request
            async with asyncio.timeout(REPLY_TIMEOUT):
                return await _read_response(reader, head)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def valid_call(self, marker: str) -> Any:
        data = {"marker": marker}
        body = json.dumps({"data": data}).encode()
        request = (
            b"POST /remote/rpc/echo HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\nauthorization: %s\r\n\r\n%s" % (len(body), valid_token("echo", data).encode(), body)
        )
        response = await self.exchange_raw(request, complete=True)
        assert response is not None, "no response to a valid call"
        assert response.status == 200, response
        return json.loads(response.body)


async def _read_response(reader: asyncio.StreamReader, head: bool) -> HttpResponse | None:
    """Read one response, skipping interim (1xx) ones; return None if the server closed without one."""
    while True:
        try:
            block = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            return _no_response(exc.partial)
        except ConnectionError:
            return None
        status_line, *lines = block[:-4].split(b"\r\n")
        version, status, *_ = status_line.split(b" ", 2)
        assert version.startswith(b"HTTP/1."), f"not an HTTP/1 response: {block[:300]!r}"
        headers = {}
        for line in lines:
            key, _, value = line.partition(b":")
            headers[key.strip().lower()] = value.strip()
        if 100 <= int(status) < 200:
            continue
        if head or int(status) in (204, 304):
            body = b""
        elif b"content-length" in headers:
            body = await reader.readexactly(int(headers[b"content-length"]))
        else:
            body = await reader.read()
        return HttpResponse(int(status), headers, body)


def _no_response(partial: bytes) -> None:
    assert not partial, f"the server sent a partial response: {partial[:300]!r}"


def _decode(body: bytes, content_type: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False) if content_type == MSGPACK else json.loads(body)
    except ValueError as exc:
        return f"undecodable body ({exc}): {body[:200]!r}"


@pytest.mark.timeout(RUN_TIMEOUT)
async def test_http_surface(worker_processes: WorkerProcesses, secret: str) -> None:
    worker = await worker_processes.start(
        APP, "fuzz-http", "--endpoint", "http://127.0.0.1:0", "--max-body-size", str(MAX_BODY_SIZE)
    )
    tally = await run_surface(HttpFuzzer(worker), http_cases())

    assert tally.outcomes["200"] > INPUTS_PER_SURFACE // 20, "too few inputs passed every check to reach a function"


# -- NATS ------------------------------------------------------------------------------------------

NATS_PORT = 4222
NATS_MAX_PAYLOAD = 1024 * 1024
"""nats-server's default ``max_payload``: a bigger message is rejected by the broker, not the worker."""

NATS_ASPECTS = st.sampled_from(
    ["body", "subject", "name", "reply", "header-block", "headers", "deadline", "hop", "authorization", "no-headers"]
)
"""The parts of a NATS message that a case may make hostile."""

NATS_REPLY_KINDS = st.sampled_from(["control", "long", "none", "not-utf8", "elsewhere", "wildcard"])
"""Odd reply subjects. Of these, a worker replies to the fuzzer's inbox only for ``long`` ones. A reply
subject with a control character or one that is not UTF-8 cannot be used, and the others lead elsewhere
or nowhere."""

ANSWERED_REPLY_KINDS = ("ours", "long")

_SUBJECT_BYTES = st.binary(min_size=1, max_size=30).map(
    lambda raw: raw.translate(None, b" \t\r\n") or b"x"
)  # a space, tab or line end would end the subject in the protocol line
_ODD_SUBJECT_TOKENS = st.sampled_from(
    [b"ec\x0bho", b"ec\x0cho", b"\x0b", b"echo\xff", b"ech%6F", b"%zz", b"echo.more", b"*", b">", b"echo.*", b""]
)
_HOSTILE_BLOCKS = st.sampled_from(
    [
        b"NATS/1.0",
        b"NATS/1.0\r\n",
        b"NATS/1.0 \xff\xfe\xfd\r\n\r\n",
        b"NATS/1.0 503\r\n\r\n",
        b"NATS/1.0 200 \xff\r\npikku-hop: 1\r\n\r\n",
        b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1\r\n\r\n",
        b"NATS/2.0\r\nx: y\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"NATS/1.0\r\nno colon here\r\n\r\n",
        b"NATS/1.0\r\n\xff\xfe: \xff\r\n\r\n",
        b"NATS/1.0\r\n: empty name\r\n\r\n",
    ]
)


@dataclass(frozen=True)
class NatsCase:
    """One NATS message, before the fuzzer adds its own inbox to the reply subject."""

    kind: str
    subject: bytes
    reply_kind: str
    """``ours`` (reply to the fuzzer's inbox), or one of ``NATS_REPLY_KINDS``."""
    reply_suffix: bytes
    block: bytes | None
    """The header block, or None to publish without headers (``PUB``)."""
    payload: bytes
    metadata: Metadata

    def __repr__(self) -> str:
        return (
            f"NatsCase(kind={self.kind!r}, subject={_short(self.subject)}, reply={self.reply_kind}"
            f"+{_short(self.reply_suffix, 40)}, block={_short(self.block or b'', 1000)}, "
            f"payload={_short(self.payload)})"
        )


def _nats_block(headers: list[tuple[bytes, bytes]]) -> bytes:
    return b"NATS/1.0\r\n" + b"".join(key + b": " + value + b"\r\n" for key, value in headers) + b"\r\n"


@st.composite
def nats_cases(draw: st.DrawFn, prefix: str) -> NatsCase:
    hostile = draw(hostile_aspects(NATS_ASPECTS))
    name = draw(function_names("name" in hostile))
    body = draw(bodies(name, True, NATS_MAX_PAYLOAD, "body" in hostile))
    payload = b"" if body.valid and body.data is None and draw(st.booleans()) else body.raw
    deadline = draw(deadline_values("deadline" in hostile))
    hop = draw(hop_values("hop" in hostile))
    authorization = draw(authorizations(name, body, "authorization" in hostile))

    token = escape_name(name).encode()
    if "subject" in hostile:
        token = draw(_ODD_SUBJECT_TOKENS | _SUBJECT_BYTES)
    subject = prefix.encode() + b"." + token if token else prefix.encode()

    reply_kind, reply_suffix = "ours", b""
    if "reply" in hostile:
        reply_kind = draw(NATS_REPLY_KINDS)
        reply_suffix = draw(_reply_suffixes(reply_kind))

    headers = [
        (key.encode(), value.encode("utf-8", "surrogatepass"))
        for key, value in (("pikku-deadline-ms", deadline), ("pikku-hop", hop), ("authorization", authorization))
        if value is not None
    ]
    if "headers" in hostile:
        headers += draw(_nats_hostile_headers())
    block: bytes | None = _nats_block(headers)
    if "header-block" in hostile:
        block = draw(_HOSTILE_BLOCKS)
    elif "no-headers" in hostile or (not headers and draw(st.booleans())):
        block = None

    metadata = Metadata(
        deadlines=tuple(
            value.decode(errors="replace") for key, value in headers if key.lower() == b"pikku-deadline-ms"
        ),
        hops=tuple(value.decode(errors="replace") for key, value in headers if key.lower() == b"pikku-hop"),
    )
    return NatsCase(body.kind, subject, reply_kind, reply_suffix, block, payload, metadata)


@st.composite
def _reply_suffixes(draw: st.DrawFn, kind: str) -> bytes:
    if kind == "control":
        return draw(st.sampled_from([b"\x0b", b"\x0c", b"\x00", b"\x7f", b"\x1b[0m"]))
    if kind == "long":
        return b"." + b"r" * draw(st.integers(3000, 4100))
    if kind == "not-utf8":
        return draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"]))
    if kind == "wildcard":
        return draw(st.sampled_from([b".*", b".>", b"*"]))
    return b""


@st.composite
def _nats_hostile_headers(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    kind = draw(st.sampled_from(["copies", "not-utf8", "random", "long", "status-lookalike"]))
    if kind == "copies":
        name = draw(st.sampled_from([b"PIKKU-HOP", b"Pikku-Deadline-Ms", b"Authorization", b"pikku-status"]))
        return [(name, draw(_SUBJECT_BYTES)) for _ in range(draw(st.integers(1, 3)))]
    if kind == "not-utf8":
        return [(draw(st.sampled_from([b"pikku-hop", b"x-\xff", b"authorization"])), b"\xff\xfe\x80")]
    if kind == "random":
        return [(draw(_SUBJECT_BYTES).replace(b":", b""), draw(_SUBJECT_BYTES))]
    if kind == "long":
        return [(b"x-long", b"v" * draw(st.integers(1000, 200_000)))]
    return [(b"status", b"503"), (b"pikku-status", b"200")]


@dataclass(frozen=True)
class NatsMessage:
    sid: bytes
    subject: bytes
    block: bytes
    payload: bytes

    def header(self, name: bytes) -> bytes | None:
        for line in self.block.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip()
        return None


class NatsFuzzer(Fuzzer):
    """Publishes raw protocol lines on a plain socket, and reads the messages as nats-server frames them.

    The connection subscribes to the worker's whole prefix too, so the fuzzer receives a copy of each
    message that the broker delivered to the worker, and can tell whether a reply must come.
    """

    surface = "NATS"

    def __init__(self, worker: WorkerProcess, prefix: str) -> None:
        super().__init__(worker)
        self.prefix = prefix.encode()
        self.inbox = b"_INBOX.fuzz" + uuid.uuid4().hex.encode()
        self.replies: dict[bytes, NatsMessage] = {}
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.number = 0

    async def connect(self) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", NATS_PORT, limit=8 * 1024 * 1024)
        self.reader, self.writer = reader, writer
        await reader.readuntil(b"\r\n")  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"echo":true}\r\n')
        writer.write(b"SUB %s.> 1\r\nSUB %s.> 2\r\nPING\r\n" % (self.inbox, self.prefix))
        frames = await self.until_pong()
        assert "closed" not in frames, frames
        assert not frames["errors"], frames

    async def send(self, case: NatsCase) -> str:
        if self.writer is None:
            await self.connect()
        self.number += 1
        reply = self.reply_subject(case.reply_kind, case.reply_suffix)
        started = time.monotonic()
        await self.publish(case.subject, reply, case.block, case.payload)
        frames = await self.until_pong(case.subject)
        if frames["errors"] or "closed" in frames:
            await self.disconnect()
            error = b" ".join(frames["errors"])[:60].decode(errors="replace") or "the connection closed"
            return f"rejected by the broker: {error}"
        if not frames["delivered"]:
            return "not delivered by the broker"
        if case.reply_kind not in ANSWERED_REPLY_KINDS:
            return f"delivered, reply subject {case.reply_kind}: no reply expected"

        message = await self.reply(reply)
        elapsed = time.monotonic() - started
        status = message.header(b"pikku-status")
        assert status is not None, f"a reply without a status: {message}; input {case!r}"
        assert status.isdigit(), f"a reply with an invalid status: {message}; input {case!r}"
        problem = status_problem(int(status), case.metadata, elapsed)
        if problem is None and int(status) >= 400:
            problem = envelope_problem(msgpack.unpackb(message.payload, raw=False))
        assert problem is None, f"{problem}; reply {message}; input {case!r}"
        return status.decode()

    def reply_subject(self, kind: str, suffix: bytes) -> bytes:
        if kind == "none":
            return b""
        if kind == "elsewhere":
            return b"fuzz.elsewhere.%d" % self.number
        return self.inbox + b".%d" % self.number + suffix

    async def publish(self, subject: bytes, reply: bytes, block: bytes | None, payload: bytes) -> None:
        assert self.writer is not None
        reply_part = b" " + reply if reply else b""
        if block is None:
            line = b"PUB %s%s %d\r\n" % (subject, reply_part, len(payload))
        else:
            line = b"HPUB %s%s %d %d\r\n%s" % (subject, reply_part, len(block), len(block) + len(payload), block)
        self.writer.write(line + payload + b"\r\nPING\r\n")
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def until_pong(self, subject: bytes | None = None) -> dict[str, Any]:
        """Read frames up to the next PONG: whether ``subject`` was delivered, and the broker's errors."""
        frames: dict[str, Any] = {"delivered": False, "errors": []}
        async with asyncio.timeout(REPLY_TIMEOUT):
            while True:
                frame = await self.read_frame()
                if frame is None:
                    frames["closed"] = True
                    return frames
                if frame == b"PONG":
                    return frames
                if isinstance(frame, bytes):
                    frames["errors"].append(frame)
                elif frame.sid == b"2" and frame.subject == subject:
                    frames["delivered"] = True

    async def reply(self, subject: bytes) -> NatsMessage:
        async with asyncio.timeout(REPLY_TIMEOUT):
            while subject not in self.replies:
                frame = await self.read_frame()
                assert frame is not None, "the broker closed the fuzzer's connection while it waited for a reply"
        return self.replies.pop(subject)

    async def read_frame(self) -> NatsMessage | bytes | None:
        """Return the next message (replies are also kept), ``PONG``, an ``-ERR`` line, or None at the end."""
        assert self.reader is not None
        assert self.writer is not None
        try:
            while True:
                line = (await self.reader.readuntil(b"\r\n"))[:-2]
                # nats-server splits protocol lines on spaces and tabs only, so read them the same way.
                op, *args = [part for part in line.replace(b"\t", b" ").split(b" ") if part]
                if op == b"PING":
                    self.writer.write(b"PONG\r\n")
                elif op in (b"PONG", b"-ERR"):
                    return line if op == b"-ERR" else b"PONG"
                elif op in (b"MSG", b"HMSG"):
                    return await self._read_message(op, args)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def _read_message(self, op: bytes, args: list[bytes]) -> NatsMessage:
        assert self.reader is not None
        total = int(args[-1])
        header_size = int(args[-2]) if op == b"HMSG" else 0
        data = (await self.reader.readexactly(total + 2))[:-2]
        message = NatsMessage(args[1], args[0], data[:header_size], data[header_size:])
        if message.sid == b"1":
            self.replies[message.subject] = message
        return message

    async def disconnect(self) -> None:
        writer, self.writer, self.reader = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def valid_call(self, marker: str) -> Any:
        if self.writer is None:
            await self.connect()
        data = {"marker": marker}
        self.number += 1
        reply = self.inbox + b".%d" % self.number
        block = _nats_block([(b"authorization", valid_token("echo", data).encode()), (b"pikku-hop", b"1")])
        await self.publish(self.prefix + b".echo", reply, block, msgpack.packb({"data": data}))
        message = await self.reply(reply)
        assert message.header(b"pikku-status") == b"200", message
        return msgpack.unpackb(message.payload, raw=False)

    async def close(self) -> None:
        await self.disconnect()


@pytest.mark.timeout(RUN_TIMEOUT)
async def test_nats_surface(worker_processes: WorkerProcesses, secret: str) -> None:
    prefix = f"pikku_t_fuzz_{uuid.uuid4().hex[:12]}"
    worker = await worker_processes.start(APP, "fuzz-nats", "--endpoint", f"nats://127.0.0.1:{NATS_PORT}/{prefix}")
    fuzzer = NatsFuzzer(worker, prefix)
    await fuzzer.connect()
    tally = await run_surface(fuzzer, nats_cases(prefix))

    assert tally.outcomes["200"] > INPUTS_PER_SURFACE // 20, "too few inputs passed every check to reach a function"


# -- AMQP ------------------------------------------------------------------------------------------

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
Properties = Basic.Properties

AMQP_ASPECTS = st.sampled_from(
    [
        "body",
        "function-header",
        "name",
        "header-types",
        "raw-properties",
        "deadline",
        "hop",
        "authorization",
        "headers",
        "content-type",
        "reply-to",
        "correlation-id",
        "expiration",
    ]
)
"""The parts of an AMQP message that a case may make hostile."""

_TABLE_SCALARS = st.one_of(
    st.text(max_size=20),
    st.binary(max_size=20).map(bytearray),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(width=32),
    st.decimals(allow_nan=False, allow_infinity=False, places=2, min_value=-(10**6), max_value=10**6),
    st.booleans(),
    st.none(),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
)
TABLE_VALUES = st.recursive(
    _TABLE_SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=6,
)
"""Any value that pamqp encodes in an AMQP field table: it sends floats in 32 bits, and no time before 1970."""

_AMQP_REPLY_TO = st.sampled_from(["none", "elsewhere", "bogus-direct", "worker-queue", "long"])
_CONTENT_TYPES = st.sampled_from(
    ["application/json", "text/plain", "application/msgpack; charset=x", "APPLICATION/MSGPACK", "\u00ff", "x" * 255]
)
_EXPIRATIONS = st.sampled_from(["0", "-1", "abc", "1.5", "99999999999999999999", "", " 5", "4294967296"])


@dataclass(frozen=True)
class AmqpCase:
    """One AMQP message: its body and properties, or the raw bytes of its properties."""

    kind: str
    body: bytes
    properties: dict[str, Any]
    raw_properties: bytes | None
    reply_kind: str
    """``ours`` (direct reply-to of the fuzzer's channel), or one of the odd kinds that get no reply to it."""
    metadata: Metadata

    def __repr__(self) -> str:
        raw = "" if self.raw_properties is None else f", raw_properties={_short(self.raw_properties)}"
        return (
            f"AmqpCase(kind={self.kind!r}, reply={self.reply_kind}, properties={self.properties!r:.3000}{raw}, "
            f"body={_short(self.body)})"
        )


@st.composite
def amqp_cases(draw: st.DrawFn, queue: str) -> AmqpCase:
    hostile = draw(hostile_aspects(AMQP_ASPECTS))
    name = draw(function_names("name" in hostile))
    body = draw(bodies(name, True, MAX_BODY_SIZE, "body" in hostile))
    deadline = draw(deadline_values("deadline" in hostile))
    hop = draw(hop_values("hop" in hostile))
    authorization = draw(authorizations(name, body, "authorization" in hostile))

    metadata_headers = {"pikku-deadline-ms": deadline, "pikku-hop": hop, "authorization": authorization}
    headers: dict[str, Any] = {"pikku-function": name}
    headers.update((key, value) for key, value in metadata_headers.items() if value is not None)
    if "header-types" in hostile:
        key = draw(st.sampled_from(["pikku-deadline-ms", "pikku-hop", "authorization", "x-request-id"]))
        headers[key] = draw(TABLE_VALUES | st.integers(min_value=-(2**63), max_value=2**63 - 1))
    if "function-header" in hostile:
        odd_bytes = st.sampled_from([name.encode(), b"\xff\xfe", b"echo\xff"]).map(bytearray)
        headers["pikku-function"] = draw(TABLE_VALUES | odd_bytes)
        if draw(st.booleans()):
            del headers["pikku-function"]
    if "headers" in hostile:
        headers.update(draw(st.dictionaries(st.text(min_size=1, max_size=40), TABLE_VALUES, max_size=4)))

    reply_kind = draw(_AMQP_REPLY_TO) if "reply-to" in hostile else "ours"
    properties: dict[str, Any] = {
        "content_type": draw(_CONTENT_TYPES) if "content-type" in hostile else "application/msgpack",
        "delivery_mode": 1,
        "correlation_id": uuid.uuid4().hex if "correlation-id" not in hostile else draw(st.text(max_size=60)),
        "reply_to": _reply_to(reply_kind, queue),
        "headers": headers,
    }
    if "expiration" in hostile:
        properties["expiration"] = draw(_EXPIRATIONS)
    raw_properties = draw(_raw_properties()) if "raw-properties" in hostile else None
    metadata = Metadata(
        deadlines=(headers["pikku-deadline-ms"],) if "pikku-deadline-ms" in headers else (),
        hops=(headers["pikku-hop"],) if "pikku-hop" in headers else (),
    )
    return AmqpCase(body.kind, body.raw, properties, raw_properties, reply_kind, metadata)


def _reply_to(kind: str, queue: str) -> str | None:
    return {
        "ours": REPLY_TO,
        "none": None,
        "elsewhere": "pikku-fuzz-nobody-" + uuid.uuid4().hex,
        "bogus-direct": REPLY_TO + ".not-a-channel",
        "worker-queue": queue,
        "long": "r" * 255,
    }[kind]


_RAW_VARIANTS = st.sampled_from(
    [
        "content-type-not-utf8",
        "key-not-utf8",
        "unknown-field-type",
        "huge-timestamp",
        "table-too-long",
        "string-too-long",
        "deep-table",
        "function-not-utf8",
        "correlation-not-utf8",
    ]
)
_UNKNOWN_FIELD_TYPES = st.sampled_from([b"Q", b"\x00", b"z", b"U"])


@st.composite
def _raw_properties(draw: st.DrawFn) -> bytes:
    """Property bytes that pamqp would not encode: strings that are not UTF-8, odd field types, bad lengths.

    Every variant sets ``reply_to`` to direct reply-to, so a worker that reads the message can reply.
    """
    function = long_string_entry(b"pikku-function", b"echo")
    content_type, table = b"application/msgpack", field_table([function])
    correlation_id = uuid.uuid4().hex.encode()
    variant = draw(_RAW_VARIANTS)
    if variant == "content-type-not-utf8":
        content_type = b"\xff\xfe"
    elif variant == "key-not-utf8":
        table = field_table([function, long_string_entry(b"\xff\xfe", b"x")])
    elif variant == "unknown-field-type":
        table = field_table([function, short_string(b"x-odd") + draw(_UNKNOWN_FIELD_TYPES) + b"\x01" * 8])
    elif variant == "huge-timestamp":
        when = struct.pack(">Q", draw(st.integers(2**40, 2**64 - 1)))
        table = field_table([function, short_string(b"x-when") + b"T" + when])
    elif variant == "table-too-long":
        table = struct.pack(">I", 10_000) + function
    elif variant == "string-too-long":
        table = field_table([short_string(b"pikku-function") + b"S" + struct.pack(">I", 2**31) + b"echo"])
    elif variant == "deep-table":
        table = field_table([function, short_string(b"x-deep") + nested_table(draw(st.integers(100, 3000)))])
    elif variant == "function-not-utf8":
        table = field_table([long_string_entry(b"pikku-function", b"e\xffo")])
    else:
        correlation_id = b"\xff" + correlation_id
    return raw_properties(content_type=content_type, table=table, correlation_id=correlation_id)


class AmqpFuzzer(Fuzzer):
    """Publishes each message on an aiormq channel with publisher confirms and waits for its direct reply.

    The broker closes the channel of a publisher that sends what it rejects (an invalid expiration, an
    invalid field table), and the connection for a malformed frame. The fuzzer then opens a new
    channel, or connection, and counts the input as rejected by the broker: it never reached the worker.
    """

    surface = "AMQP"

    def __init__(self, worker: WorkerProcess, vhost: str, queue: str) -> None:
        super().__init__(worker)
        self.url = AMQP_URL + vhost
        self.queue = queue
        self.connection: aiormq.abc.AbstractConnection | None = None
        self.channel: aiormq.abc.AbstractChannel | None = None
        self.replies: dict[str, DeliveredMessage] = {}
        self.reply_arrived = asyncio.Event()
        self.reopened = Counter[str]()

    async def open(self) -> aiormq.abc.AbstractChannel:
        async with asyncio.timeout(REPLY_TIMEOUT):
            if self.connection is None or self.connection.is_closed:
                self.connection = await aiormq.connect(self.url)
                self.reopened["connection"] += 1
            channel = await self.connection.channel(publisher_confirms=True, on_return_raises=True)
            await channel.basic_consume(REPLY_TO, self.on_reply, no_ack=True)
        self.reopened["channel"] += 1
        self.channel = channel
        return channel

    async def on_reply(self, message: DeliveredMessage) -> None:
        self.replies[message.header.properties.correlation_id or ""] = message
        self.reply_arrived.set()

    async def send(self, case: AmqpCase) -> str:
        channel = self.channel if self.channel is not None and not self.channel.is_closed else await self.open()
        properties = (
            RawProperties(case.raw_properties) if case.raw_properties is not None else Properties(**case.properties)
        )
        correlation_id = case.properties["correlation_id"] if case.raw_properties is None else None
        self.replies.clear()
        started = time.monotonic()
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                await channel.basic_publish(case.body, routing_key=self.queue, properties=properties, mandatory=True)
        except aiormq.exceptions.PublishError:
            raise AssertionError(
                f"the broker returned a message to the worker's queue as unroutable: {case!r}"
            ) from None
        except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
            # The broker closed the channel, or the connection, because of what this message contains.
            self.channel = None
            return f"rejected by the broker: {type(exc).__name__}"

        if case.reply_kind != "ours":
            return f"delivered, reply-to {case.reply_kind}: no reply expected"
        message = await self.reply(correlation_id, case)
        elapsed = time.monotonic() - started
        headers = message.header.properties.headers or {}
        status = headers.get("pikku-status")
        assert isinstance(status, int), f"a reply without a status: {message!r}; input {case!r}"
        problem = status_problem(status, case.metadata, elapsed)
        if problem is None and status >= 400:
            problem = envelope_problem(msgpack.unpackb(message.body, raw=False))
        assert problem is None, f"{problem}; reply {message.body[:300]!r}; input {case!r}"
        return str(status)

    async def reply(self, correlation_id: str | None, case: Any) -> DeliveredMessage:
        """Wait for the reply with ``correlation_id``, or for any reply when the id was not readable."""
        try:
            async with asyncio.timeout(REPLY_TIMEOUT):
                while True:
                    if correlation_id is None and self.replies:
                        return next(iter(self.replies.values()))
                    if correlation_id in self.replies:
                        return self.replies.pop(correlation_id)
                    self.reply_arrived.clear()
                    await self.reply_arrived.wait()
        except TimeoutError:
            raise AssertionError(f"no reply within {REPLY_TIMEOUT} s to {case!r}") from None

    async def valid_call(self, marker: str) -> Any:
        data = {"marker": marker}
        channel = self.channel if self.channel is not None and not self.channel.is_closed else await self.open()
        correlation_id = uuid.uuid4().hex
        properties = Properties(
            content_type="application/msgpack",
            correlation_id=correlation_id,
            reply_to=REPLY_TO,
            headers={"pikku-function": "echo", "authorization": valid_token("echo", data), "pikku-hop": "1"},
        )
        async with asyncio.timeout(REPLY_TIMEOUT):
            await channel.basic_publish(msgpack.packb({"data": data}), routing_key=self.queue, properties=properties)
        message = await self.reply(correlation_id, "a valid call")
        assert (message.header.properties.headers or {}).get("pikku-status") == 200, message
        return msgpack.unpackb(message.body, raw=False)

    async def close(self) -> None:
        self.tally.notes["fuzzer channels opened"] = self.reopened["channel"]
        self.tally.notes["fuzzer connections opened"] = self.reopened["connection"]
        if self.connection is not None:
            await self.connection.close()


@pytest.mark.timeout(RUN_TIMEOUT)
async def test_amqp_surface(worker_processes: WorkerProcesses, secret: str, amqp_vhost: str) -> None:
    queue = f"pikku-fuzz-{uuid.uuid4().hex[:12]}"
    endpoint = f"amqp://127.0.0.1:5672/{amqp_vhost}?queue={queue}"
    worker = await worker_processes.start(
        APP, "fuzz-amqp", "--endpoint", endpoint, "--max-body-size", str(MAX_BODY_SIZE)
    )
    tally = await run_surface(AmqpFuzzer(worker, amqp_vhost, queue), amqp_cases(queue))

    assert tally.outcomes["200"] > INPUTS_PER_SURFACE // 20, "too few inputs passed every check to reach a function"
    rejected = sum(count for outcome, count in tally.outcomes.items() if outcome.startswith("rejected by the broker"))
    assert rejected < INPUTS_PER_SURFACE // 10, "the broker rejected so many inputs that few reached the worker"
