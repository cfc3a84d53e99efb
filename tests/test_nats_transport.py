"""The NATS transport beyond the transport contract, against real nats-server processes.

Most tests use the shared server at 127.0.0.1:4222, each on a subject prefix of its own. The restart
tests start a private nats-server on a free port and kill it at the end, so the shared one is never
restarted. A test fails, and does not skip, when a server cannot be reached.
"""

from __future__ import annotations

import asyncio
import enum
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import nats
import pytest
from _support_core import Mesh, closed_port, wait_until
from _support_servers import PrivateNats
from hypothesis import given, settings
from hypothesis import strategies as st
from nats.aio.client import Client as NatsClient
from nats.js.api import StorageType

from pikku_mq import (
    BadRequestError,
    ConfigurationError,
    DeadlineExceededError,
    DeploymentConfig,
    EndpointUnreachableError,
    FunctionRegistry,
    MemoryTransport,
    OutputValidationError,
    PayloadTooLargeError,
    PikkuMQError,
    PikkuWorker,
    ProtocolError,
    RoutingError,
    TransportError,
    TransportSet,
    pikku_sessionless_func,
)
from pikku_mq._types import HEADER_DEADLINE, CallRequest
from pikku_mq.transports import nats as nats_transport
from pikku_mq.transports._nats_wire import escape_name, parse_nats_endpoint, unescape_token
from pikku_mq.transports.nats import NatsServer, NatsTransport, _Client, _close_client

SHARED_URL = "nats://127.0.0.1:4222"

REG = FunctionRegistry()

ODD_NAMES = [
    "orders.create",
    "hello world",
    "a*b>c",
    "grüße",
    "100%",
    "rocket 🚀",
    "~tilde",
    "-dash_under-",
    "UPPER.lower.MiXeD",
    "quote'\"back`",
    "é" * 255,
]


@pikku_sessionless_func(expose=True, registry=REG)
async def echo(services: Any, data: Any) -> Any:
    return data


@pikku_sessionless_func(expose=True, registry=REG)
async def nap(services: Any, data: float) -> str:
    await asyncio.sleep(data)
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def blob(services: Any, data: int) -> str:
    return "x" * data


@pikku_sessionless_func(expose=True, registry=REG)
async def power_of_two(services: Any, data: int) -> int:
    return 2**data


def _register_odd(name: str) -> None:
    async def odd(services: Any, data: Any) -> str:
        return name

    pikku_sessionless_func(expose=True, registry=REG, name=name)(odd)


for _odd_name in ODD_NAMES:
    _register_odd(_odd_name)


def new_prefix() -> str:
    return f"pikku_t_{uuid.uuid4().hex[:12]}"


def shared_endpoint(prefix: str | None = None) -> str:
    return f"{SHARED_URL}/{prefix or new_prefix()}"


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


@pytest.fixture
async def raw_client() -> AsyncIterator[NatsClient]:
    """A plain nats-py client of the shared server, for requests that pikku_mq would never send."""
    client = await nats.connect(SHARED_URL, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
    yield client
    await client.close()


def make_worker(mesh: Mesh, endpoint: str, deployment_id: str = "n-1", **options: Any) -> PikkuWorker:
    return PikkuWorker(
        registry=REG,
        endpoint=endpoint,
        deployment_id=deployment_id,
        services=deployment_id,
        deployment_service=mesh.service(),
        **options,
    )


def request(name: str, data: Any = None, **headers: str) -> CallRequest:
    return CallRequest(name=name, data=data, headers={HEADER_DEADLINE: "5000", **headers})


def unpack(payload: bytes) -> Any:
    return msgpack.unpackb(payload, raw=False)


# -- subject escaping and endpoints ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "token"),
    [
        ("greet", "greet"),
        ("snake_case-and-dash", "snake_case-and-dash"),
        ("orders.create", "orders%2Ecreate"),
        ("hello world", "hello%20world"),
        ("a*b>c", "a%2Ab%3Ec"),
        ("grüße", "gr%C3%BC%C3%9Fe"),
        ("100%", "100%25"),
        ("~", "%7E"),
    ],
)
def test_escape_name_table(name: str, token: str) -> None:
    assert escape_name(name) == token
    assert unescape_token(token) == name


@pytest.mark.parametrize("token", ["a.b", "%2e", "ech%6F", "%zz", "%C3", "a%2", "*", ">", "a b"])
def test_unescape_rejects_non_canonical(token: str) -> None:
    with pytest.raises(ValueError, match=r"characters|escap"):
        unescape_token(token)


@pytest.mark.parametrize(
    ("endpoint", "message"),
    [
        ("nats://127.0.0.1:4222", "has no subject prefix"),
        ("nats://127.0.0.1:4222/", "has no subject prefix"),
        ("nats:///orders", "has no host"),
        ("nats://127.0.0.1:port/orders", "is not a valid URL"),
        ("nats://127.0.0.1:4222/orders..v1", "is not valid"),
        ("nats://127.0.0.1:4222/orders.*", "is not valid"),
        ("nats://127.0.0.1:4222/orders.>", "is not valid"),
        ("nats://127.0.0.1:4222/my orders", "is not valid"),
        ("nats://127.0.0.1:4222/orders/v1", "is not valid"),
        ("nats://127.0.0.1:4222/grüße", "is not valid"),
        ("nats://127.0.0.1:4222/_INBOX.x", "starts with _INBOX"),
        ("nats://127.0.0.1:4222/orders?queue=a", "has a query or fragment"),
        ("nats://127.0.0.1:4222/" + "a" * 129, "the limit is 128"),
    ],
)
def test_worker_rejects_bad_nats_endpoint(endpoint: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message.replace("?", r"\?")):
        PikkuWorker(registry=REG, endpoint=endpoint, discovery=False)


def test_endpoint_parsed_and_advertised() -> None:
    parsed = parse_nats_endpoint("nats://user:secret@broker.example:4300/orders.v1-eu_2/")

    assert parsed.prefix == "orders.v1-eu_2"
    assert parsed.advertised == "nats://broker.example:4300/orders.v1-eu_2"
    assert parsed.server_url == "nats://user:secret@broker.example:4300"
    assert parse_nats_endpoint("nats://[::1]/p").advertised == "nats://[::1]:4222/p"


def test_missing_nats_py_named(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry in sys.modules makes the import fail as if nats-py were not installed.
    monkeypatch.setitem(sys.modules, "pikku_mq.transports.nats", None)
    worker = PikkuWorker(registry=REG, endpoint=shared_endpoint(), discovery=False)

    with pytest.raises(ConfigurationError, match=r"pip install 'pikku-mq\[nats\]'"):
        worker._server_for(shared_endpoint())
    assert all(not isinstance(t, NatsTransport) for t in TransportSet.default()._by_scheme.values())


# -- publishing ----------------------------------------------------------------------------------------


class Tenant(str, enum.Enum):  # noqa: UP042 - str() of such a member is "Tenant.ACME", unlike StrEnum
    ACME = "acme"


class Disguised(str):
    """A str whose str() is not its text."""

    def __str__(self) -> str:
        return "ok\r\nPikku-Status: 200\r\nx"


HEADER_CASES: dict[str, dict[str, Any]] = {
    "pikku call": {
        "x-request-id": "0123456789abcdef0123456789abcdef",
        "pikku-call-id": "fedcba9876543210fedcba9876543210",
        "pikku-hop": "1",
        "pikku-deadline-ms": "5000",
        "authorization": "Bearer a.b.c",
    },
    "reply": {"pikku-status": "500", "Nats-Service-Error": "boom: it failed", "Nats-Service-Error-Code": "500"},
    "success reply": {"pikku-status": "200"},
    "empty": {},
    "space inside value": {"a": "x y"},
    "leading space": {"a": " x"},
    "trailing tab": {"a": "x\t"},
    "newline in value": {"a": "x\r\ny: z"},
    "non-ASCII value": {"a": "Zoë"},
    "padded name": {" a ": "x", "b\r\n": "y"},
    "empty name": {"": "x", "b": "y"},
    "empty value": {"a": ""},
    "percent signs": {"x%y": "50%", "b": "%s %d %%", "%s": "v"},
    "str enum value": {"x-tenant": Tenant.ACME, "b": "1"},
    "str subclass value": {"x-a": Disguised("ok"), "b": "1"},
}


def _recording_client() -> Any:
    """pikku_mq's nats-py client, unconnected, with every protocol command it sends kept in ``sent``."""
    client: Any = _Client()
    client.sent = []

    async def record(command: bytes, priority: bool = False) -> None:
        client.sent.append(command)

    client._send_command = record
    return client


@pytest.mark.parametrize("case", list(HEADER_CASES))
@pytest.mark.parametrize("reply", ["_INBOX.x.1", ""])
async def test_publish_bytes_match_nats_py(case: str, reply: str) -> None:
    headers = HEADER_CASES[case]
    ours, theirs = _recording_client(), _recording_client()
    await ours._send_publish("p.echo", reply, b"\x81\xa4data\x01", 7, dict(headers))
    await NatsClient._send_publish(theirs, "p.echo", reply, b"\x81\xa4data\x01", 7, dict(headers))

    assert ours.sent == theirs.sent
    assert ours.stats["out_msgs"] == theirs.stats["out_msgs"] == 1


@pytest.mark.parametrize("case", list(HEADER_CASES))
async def test_publish_repeated_matches_nats_py(case: str) -> None:
    """A block sent again, from the client's cache where it has one, has the same bytes as nats-py's."""
    headers = HEADER_CASES[case]
    ours, theirs = _recording_client(), _recording_client()
    for _ in range(2):
        await ours._send_publish("p.echo", "r", b"\x01", 1, dict(headers))
    await NatsClient._send_publish(theirs, "p.echo", "r", b"\x01", 1, dict(headers))

    assert ours.sent == theirs.sent * 2


@pytest.mark.parametrize("name", ["bad name", "a:b", "é"])
async def test_publish_bad_header_name_raises(name: str) -> None:
    client = _recording_client()
    for _ in range(2):  # a name that nats-py rejects is not cached
        with pytest.raises(nats.errors.BadHeaderError):
            await client._send_publish("p.echo", "r", b"", 0, {name: "x"})


# -- reading headers -------------------------------------------------------------------------------

HEADER_BLOCKS = [
    b"NATS/1.0\r\nx-request-id: abc\r\npikku-hop: 1\r\n\r\n",
    b"NATS/1.0\r\npikku-status: 200\r\n\r\n",
    b"NATS/1.0\r\na:b\r\nc:\tvalue \r\n\r\n",
    b"NATS/1.0\r\nno colon here\r\n\r\n",
    b"NATS/1.0\r\nbad name: x\r\nbad\x1cname: y\r\n\x0bpadded\x0c: z\r\n\r\n",
    b"NATS/1.0\r\nn\xc3\xa4me: x\r\nvalue: Zo\xc3\xab \xff\r\n\r\n",
    b"NATS/1.0\r\nrepeated: 1\r\nrepeated: 2\r\n\r\n",
    b"NATS/1.0\r\n: empty name\r\n\r\n",
    b"NATS/1.0\r\n\r\n\r\n",
    b"NATS/1.0\r\na: b",
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 1\r\n\r\n",
    b"NATS/1.0",
]


async def _nats_py_headers(block: bytes) -> Any:
    client = NatsClient()
    errors: list[Exception] = []

    async def error_cb(exc: Exception) -> None:
        errors.append(exc)

    client._error_cb = error_cb
    try:
        return await NatsClient._process_headers(client, block)
    except Exception as exc:
        return type(exc)


@pytest.mark.parametrize("block", HEADER_BLOCKS)
async def test_header_parse_matches_nats_py(block: bytes) -> None:
    expected = await _nats_py_headers(block)
    parsed = await _Client()._process_headers(block)
    # The second parse reads the header names from the cache that the first one filled.
    parsed_again = await _Client()._process_headers(block)
    if isinstance(expected, type):
        # nats-py raises on this block; pikku_mq's client marks it as malformed instead.
        assert parsed == {}
    else:
        assert parsed == expected
    assert parsed_again == parsed


def _lowered(parsed: Any) -> Any:
    return {key.lower(): value for key, value in parsed.items()} if isinstance(parsed, dict) else parsed


@pytest.mark.parametrize("block", [*HEADER_BLOCKS, b"NATS/1.0\r\nPikku-Status: 200\r\npikku-status: 500\r\n\r\n"])
async def test_direct_header_parse_matches_nats_py_lowered(block: bytes) -> None:
    # Messages of subscribe_direct() carry the names in lower case; the last of a name in any case wins.
    expected = await _nats_py_headers(block)
    parsed = await _Client()._direct_headers(block)
    if isinstance(expected, type):
        assert parsed == {}
    else:
        assert parsed == _lowered(expected)
    assert await _Client()._direct_headers(block) == parsed


async def test_direct_headers_last_line_wins() -> None:
    # nats-py keeps the first position of a repeated name, so lowering its dict would give "500".
    block = b"NATS/1.0\r\nPikku-Status: 200\r\npikku-status: 500\r\nPikku-Status: 404\r\n\r\n"
    assert await _Client()._direct_headers(block) == {"pikku-status": "404"}


HEADER_PIECES = st.binary(max_size=12) | st.sampled_from([b":", b" ", b"\t", b"\x0b", b"\xc3\xa4", b"a", b"\r\n"])


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(st.lists(HEADER_PIECES, max_size=12))
async def test_header_parse_matches_nats_py_random(pieces: list[bytes]) -> None:
    block = b"NATS/1.0\r\n" + b"".join(pieces) + b"\r\n\r\n"
    expected = await _nats_py_headers(block)
    assert await _Client()._process_headers(block) == expected
    lowered = _lowered(expected)
    if not isinstance(expected, dict) or len(lowered) == len(expected):
        # With names that differ only in case, nats-py's dict no longer shows which line came last.
        assert await _Client()._direct_headers(block) == lowered


# -- routing failures --------------------------------------------------------------------------------


async def test_no_responders_reported_at_once() -> None:
    transport = NatsTransport(SHARED_URL)
    with pytest.raises(EndpointUnreachableError, match="no responders"):
        await transport.call(shared_endpoint(), request("echo", 1), 5.0)  # the first call also connects
    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match="no responders"):
        await transport.call(shared_endpoint(), request("echo", 1), 5.0)
    elapsed = time.monotonic() - started
    await transport.close()

    assert elapsed < 0.5


async def test_no_responders_fails_over(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    ghost = mesh.service()
    await ghost.start(DeploymentConfig("ghost", shared_endpoint(), functions=["nap"]))
    try:
        async with make_worker(mesh, shared_endpoint(), "n-live"):
            started = time.monotonic()
            answers = [await caller.invoke("nap", 0.0, timeout=5) for _ in range(6)]
            elapsed = time.monotonic() - started
    finally:
        await ghost.stop()

    assert answers == ["n-live"] * 6
    # The ghost costs one no-responders round trip, then it is skipped: nothing waits for a timeout.
    assert elapsed < 1.0


async def test_wrong_nats_url_fails_fast(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    port = closed_port()
    transport = NatsTransport(f"nats://nobody:secret@127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError) as unreachable:
        await transport.call(shared_endpoint(), request("echo", 1), 10.0)
    elapsed = time.monotonic() - started
    await transport.close()

    assert elapsed < 2.0
    assert f"127.0.0.1:{port}" in unreachable.value.message
    assert "secret" not in unreachable.value.message

    # Through the router, with the URL from the environment: a prompt routing error, never a hang.
    monkeypatch.setenv("PIKKU_NATS_URL", f"nats://127.0.0.1:{port}")
    caller = mesh.service(routing_cache_ttl=60)
    async with make_worker(mesh, shared_endpoint(), nats_url=SHARED_URL):
        started = time.monotonic()
        with pytest.raises(RoutingError):
            await caller.invoke("echo", 1, timeout=10)
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize(
    "url", ["nats://pikku:secret@127.0.0.1:99999", "nats://pikku:secret@:abc", "http://127.0.0.1:4222", " , "]
)
async def test_invalid_nats_url_rejected(url: str) -> None:
    transport = NatsTransport(url)
    try:
        with pytest.raises(ConfigurationError, match="NATS URL") as invalid:
            await transport.call(shared_endpoint(), request("echo", 1), 5.0)
    finally:
        await transport.close()

    assert "secret" not in invalid.value.message


async def test_worker_with_wrong_nats_url_fails_to_start(mesh: Mesh) -> None:
    port = closed_port()
    worker = make_worker(mesh, shared_endpoint(), nats_url=f"nats://127.0.0.1:{port}")

    started = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match=f"127.0.0.1:{port}"):
        await worker.start()
    assert time.monotonic() - started < 2.0


async def test_jetstream_ack_is_protocol_error(raw_client: NatsClient) -> None:
    prefix = new_prefix()
    stream = f"PIKKU_T_{prefix.upper()}"
    jsm = raw_client.jsm()
    await jsm.add_stream(name=stream, subjects=[f"{prefix}.>"], storage=StorageType.MEMORY)
    transport = NatsTransport(SHARED_URL)
    try:
        with pytest.raises(ProtocolError, match="no pikku-status header") as protocol:
            await transport.call(shared_endpoint(prefix), request("echo", "x"), 5.0)
    finally:
        await transport.close()
        assert await jsm.delete_stream(stream)

    assert "stream" in protocol.value.message


async def test_non_msgpack_reply_is_protocol_error(raw_client: NatsClient) -> None:
    prefix = new_prefix()

    async def impostor(msg: Any) -> None:
        await msg.respond(b"plain text, not msgpack")

    async def wrong_status(msg: Any) -> None:
        await raw_client.publish(msg.reply, msgpack.packb(1), headers={"pikku-status": "OK"})

    transport = NatsTransport(SHARED_URL)
    first = await raw_client.subscribe(f"{prefix}.plain", cb=impostor)
    second = await raw_client.subscribe(f"{prefix}.status", cb=wrong_status)
    await raw_client.flush()
    try:
        with pytest.raises(ProtocolError, match="no pikku-status header"):
            await transport.call(shared_endpoint(prefix), request("plain"), 5.0)
        with pytest.raises(ProtocolError, match="invalid pikku-status"):
            await transport.call(shared_endpoint(prefix), request("status"), 5.0)
    finally:
        await first.unsubscribe()
        await second.unsubscribe()
        await transport.close()


async def test_each_call_times_out_by_its_own_deadline(raw_client: NatsClient) -> None:
    """One timer serves every call of a connection: a short call times out on time behind a long one."""
    prefix = new_prefix()

    async def silent(msg: Any) -> None:
        pass

    async def answer(msg: Any) -> None:
        await raw_client.publish(msg.reply, msgpack.packb(1), headers={"pikku-status": "200"})

    transport = NatsTransport(SHARED_URL)
    subscriptions = [
        await raw_client.subscribe(f"{prefix}.silent", cb=silent),
        await raw_client.subscribe(f"{prefix}.answer", cb=answer),
    ]
    await raw_client.flush()
    assert (await transport.call(shared_endpoint(prefix), request("answer"), 5.0)).body == 1  # connects
    long_call = asyncio.create_task(transport.call(shared_endpoint(prefix), request("silent"), 30.0))
    await asyncio.sleep(0.05)
    try:
        for timeout in (0.4, 0.2):
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError, match=rf"no reply to 'silent' on .* within {timeout:.3f} s"):
                await transport.call(shared_endpoint(prefix), request("silent"), timeout)
            assert timeout <= time.monotonic() - started < timeout + 0.5
        assert not long_call.done()

        # Calls that ended leave no more than a bounded number of deadlines behind.
        for _ in range(3):
            await asyncio.gather(
                *(transport.call(shared_endpoint(prefix), request("answer"), 30.0) for _ in range(300))
            )
        (connection,) = [c for c in transport._slots if c is not None]
        assert len(connection._deadlines) <= 2 * 300 + 256 + 1
    finally:
        long_call.cancel()
        await asyncio.gather(long_call, return_exceptions=True)
        for subscription in subscriptions:
            await subscription.unsubscribe()
        await transport.close()


# -- payload limits ----------------------------------------------------------------------------------


async def test_request_over_max_payload(mesh: Mesh) -> None:
    caller = mesh.service()
    async with make_worker(mesh, shared_endpoint()):
        assert await caller.invoke("echo", "warm", timeout=5) == "warm"

        started = time.monotonic()
        with pytest.raises(PayloadTooLargeError) as too_large:
            await caller.invoke("echo", "x" * (2 * 1024 * 1024), timeout=10)
        assert time.monotonic() - started < 0.5
        assert too_large.value.payload["max_payload"] == 1024 * 1024

        # The connection survived: the server never saw the request.
        assert await caller.invoke("echo", "after", timeout=5) == "after"


async def test_request_over_max_payload_by_its_headers(raw_client: NatsClient) -> None:
    transport = NatsTransport(SHARED_URL)
    prefix = new_prefix()
    seen: list[int] = []

    async def count(msg: Any) -> None:
        seen.append(len(msg.data))

    sub = await raw_client.subscribe(f"{prefix}.>", cb=count)
    await raw_client.flush()
    try:
        # The body alone fits within max_payload; with the headers, it does not.
        body_overhead = len(msgpack.packb({"data": ""}))
        data = "x" * (raw_client.max_payload - body_overhead - 8)
        assert len(msgpack.packb({"data": data})) <= raw_client.max_payload
        with pytest.raises(PayloadTooLargeError, match="with its headers"):
            await transport.call(shared_endpoint(prefix), request("echo", data), 5.0)
        with pytest.raises(EndpointUnreachableError):
            await transport.call(shared_endpoint(), request("echo", 1), 5.0)
    finally:
        await sub.unsubscribe()
        await transport.close()
    assert seen == []


async def test_data_without_msgpack_form_rejected() -> None:
    transport = NatsTransport(SHARED_URL)
    try:
        # msgpack has no integers beyond 64 bits; JSON-only values are caught before anything is sent.
        with pytest.raises(BadRequestError, match="cannot be serialised to msgpack"):
            await transport.call(shared_endpoint(), request("echo", 2**70), 5.0)
        with pytest.raises(BadRequestError, match="function name is empty"):
            await transport.call(shared_endpoint(), request("", 1), 5.0)
    finally:
        await transport.close()


async def test_reply_over_max_payload_is_error(mesh: Mesh) -> None:
    caller = mesh.service()
    async with make_worker(mesh, shared_endpoint()):
        started = time.monotonic()
        with pytest.raises(PayloadTooLargeError, match="reply of function 'blob'") as too_large:
            await caller.invoke("blob", 2 * 1024 * 1024, timeout=10)
        assert time.monotonic() - started < 2.0
        assert too_large.value.status == 413
        assert await caller.invoke("blob", 3, timeout=5) == "xxx"


async def test_reply_without_msgpack_form_is_error(mesh: Mesh) -> None:
    # JSON takes an integer of any size and msgpack one of at most 64 bits. The worker packs its
    # replies with one packer, which a failure must leave empty for the next reply.
    caller = mesh.service()
    async with make_worker(mesh, shared_endpoint()):
        with pytest.raises(OutputValidationError, match="cannot be serialised to msgpack") as failed:
            await caller.invoke("power_of_two", 70, timeout=5)
        after = await caller.invoke("power_of_two", 3, timeout=5)

    assert failed.value.status == 500
    assert after == 8


def test_packer_renewed_after_large_message() -> None:
    # A msgpack packer keeps its buffer at the largest size it packed, so a large message renews it.
    first = nats_transport._packer.packer
    nats_transport._encode_request(CallRequest(name="f", data="x" * 1000))
    after_small = nats_transport._packer.packer
    nats_transport._encode_request(CallRequest(name="f", data="x" * (2 * 1024 * 1024)))
    renewed = nats_transport._packer.packer
    with pytest.raises(BadRequestError, match="cannot be serialised to msgpack"):
        nats_transport._encode_request(CallRequest(name="f", data=2**70))

    assert after_small is first
    assert renewed is not first
    assert nats_transport._packer.packer is not renewed, "a failed pack renews the packer too"


def test_reply_header_bound_holds() -> None:
    """The largest header block a worker sends stays within the bound under which it skips the size count."""
    from pikku_mq import InternalServerError
    from pikku_mq.transports._nats_wire import header_block_size
    from pikku_mq.transports.nats import _MAX_ERROR_HEADER, _MAX_REPLY_HEADER_BYTES, _reply_headers

    error = InternalServerError("\U0001f600" * (2 * _MAX_ERROR_HEADER))  # 4 UTF-8 bytes per character
    headers = _reply_headers(599, error, rejected=True)

    assert len(headers) == 4
    assert header_block_size(headers) <= _MAX_REPLY_HEADER_BYTES


# -- the serving side --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("token", "payload", "headers", "status", "message"),
    [
        ("echo", b"\xc1", {}, 400, "not valid msgpack"),
        ("echo", msgpack.packb([1, 2]), {}, 400, "must be an object"),
        ("echo", msgpack.packb({"data": 1, "extra": 2}), {}, 400, "unknown fields"),
        ("echo", msgpack.packb({1: "int key"}), {}, 400, "not valid msgpack"),
        ("echo", msgpack.packb({"data": float("nan")}), {}, 400, "NaN"),
        ("echo", msgpack.packb({"data": {"a": b"\xff"}}), {}, 400, "bytes values are not accepted"),
        ("echo", msgpack.packb({"data": [msgpack.ExtType(5, b"x")]}), {}, 400, "ExtType values are not accepted"),
        ("echo", msgpack.packb({"data": msgpack.Timestamp(1, 0)}), {}, 400, "Timestamp values are not accepted"),
        ("echo", msgpack.packb({"data": {"nested": {2: "int key"}}}), {}, 400, "not allowed for map key"),
        ("echo", msgpack.packb({"data": 1}), {"pikku-hop": "many"}, 400, "pikku-hop"),
        ("echo", msgpack.packb({"data": 1}), {"pikku-deadline-ms": "soon"}, 400, "pikku-deadline-ms"),
        ("echo", msgpack.packb({"data": 1}), {"pikku-deadline-ms": "0"}, 400, "pikku-deadline-ms"),
        ("echo", msgpack.packb({"data": 1}), {"pikku-deadline-ms": "2.5"}, 400, "pikku-deadline-ms"),
        ("echo", msgpack.packb({"data": 1}), {"pikku-hop": "0"}, 400, "pikku-hop"),
        ("echo", msgpack.packb({"data": 1}), {"pikku-hop": "17"}, 508, "forwarded 17 times"),
        ("ech%6F", msgpack.packb({"data": 1}), {}, 400, "not the canonical escaping"),
        ("%zz", msgpack.packb({"data": 1}), {}, 400, "does not name a function"),
        ("echo.more", msgpack.packb({"data": 1}), {}, 400, "does not name a function"),
        ("no_such_function", msgpack.packb({"data": 1}), {}, 404, "was not found"),
    ],
)
async def test_malformed_request_gets_error_reply(
    mesh: Mesh,
    raw_client: NatsClient,
    token: str,
    payload: bytes,
    headers: dict[str, str],
    status: int,
    message: str,
) -> None:
    prefix = new_prefix()
    async with make_worker(mesh, shared_endpoint(prefix)):
        reply = await raw_client.request(f"{prefix}.{token}", payload, timeout=5, headers=headers or None)
        envelope = unpack(reply.data)
        assert reply.headers is not None
        assert reply.headers["pikku-status"] == str(status)
        assert reply.headers["Nats-Service-Error-Code"] == str(status)
        assert message in reply.headers["Nats-Service-Error"]
        assert message in envelope["message"]
        assert "pikku-rejected" not in reply.headers

        # The worker keeps serving.
        good = await raw_client.request(f"{prefix}.echo", msgpack.packb({"data": "still here"}), timeout=5)
        assert good.headers == {"pikku-status": "200"}
        assert unpack(good.data) == "still here"


async def _raw_publish(subject: bytes, reply: bytes, headers: bytes, payload: bytes) -> None:
    """Publish bytes that nats-py would refuse to send, on a plain socket speaking the NATS protocol."""
    await _raw_publish_block(subject, reply, b"NATS/1.0\r\n" + headers + b"\r\n", payload)


async def _raw_publish_block(subject: bytes, reply: bytes, block: bytes, payload: bytes) -> None:
    """Publish a message with ``block`` as its whole header block, whatever it holds."""
    reader, writer = await asyncio.open_connection("127.0.0.1", 4222)
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        writer.write(
            b"HPUB %s %s %d %d\r\n%s%s\r\nPING\r\n"
            % (subject, reply, len(block), len(block) + len(payload), block, payload)
        )
        await writer.drain()
        assert await reader.readline() == b"PONG\r\n"
    finally:
        writer.close()
        await writer.wait_closed()


async def test_caller_reads_each_kind_of_reply(raw_client: NatsClient) -> None:
    """The caller's client reads a success reply without parsing it, and every other reply as nats-py does."""
    prefix = new_prefix()

    async def respond(msg: Any) -> None:
        kind = msg.subject.rsplit(".", 1)[1]
        if kind == "ok":
            await raw_client.publish(msg.reply, msgpack.packb(1), headers={"pikku-status": "200"})
        elif kind == "upper":
            await raw_client.publish(msg.reply, msgpack.packb(2), headers={"Pikku-Status": "200", "X-Other": "a"})
        elif kind == "answerable":
            await raw_client.publish(msg.reply, msgpack.packb(3), reply="somewhere", headers={"pikku-status": "200"})
        elif kind == "spaced":
            await _raw_publish(msg.reply.encode(), b"", b"pikku-status:  200 \r\n", msgpack.packb(4))
        elif kind == "malformed":
            await _raw_publish_block(msg.reply.encode(), b"", b"NATS/1.0\r\n\r\n", msgpack.packb(5))
        elif kind in ("repeated", "repeated_answerable"):
            # The last line of a name wins, in any case, whichever way the reply takes into the caller.
            reply = b"somewhere" if kind == "repeated_answerable" else b""
            lines = b"Pikku-Status: 500\r\npikku-status: 200\r\nPikku-Status: 404\r\n"
            await _raw_publish(msg.reply.encode(), reply, lines, msgpack.packb({"name": "x", "message": "gone"}))

    transport = NatsTransport(SHARED_URL)
    subscription = await raw_client.subscribe(f"{prefix}.*", cb=respond)
    await raw_client.flush()
    try:
        call = transport.call
        assert (await call(shared_endpoint(prefix), request("ok"), 5.0)).body == 1
        assert (await call(shared_endpoint(prefix), request("upper"), 5.0)).body == 2
        assert (await call(shared_endpoint(prefix), request("answerable"), 5.0)).body == 3
        assert (await call(shared_endpoint(prefix), request("spaced"), 5.0)).body == 4
        with pytest.raises(ProtocolError, match="no pikku-status header"):
            await call(shared_endpoint(prefix), request("malformed"), 5.0)
        assert (await call(shared_endpoint(prefix), request("ok"), 5.0)).body == 1
        assert (await call(shared_endpoint(prefix), request("repeated"), 5.0)).status == 404
        assert (await call(shared_endpoint(prefix), request("repeated_answerable"), 5.0)).status == 404
    finally:
        await subscription.unsubscribe()
        await transport.close()


async def test_subject_not_utf8_gets_error_reply(mesh: Mesh, raw_client: NatsClient) -> None:
    # nats-py's read loop once stopped for good on such a subject, and the worker went deaf for a minute.
    prefix = new_prefix()
    async with make_worker(mesh, shared_endpoint(prefix)):
        inbox = raw_client.new_inbox()
        replies = await raw_client.subscribe(inbox)
        bad_header = b"pikku-hop: \xff\xfe\r\n"
        await _raw_publish(f"{prefix}.e\xff".encode("latin-1"), inbox.encode(), bad_header, msgpack.packb({"data": 1}))
        reply = await replies.next_msg(timeout=5)
        assert reply.headers is not None
        assert reply.headers["pikku-status"] == "400"
        assert "does not name a function" in unpack(reply.data)["message"]

        # A reply subject that is not UTF-8 cannot be answered: the request is dropped, and the worker serves on.
        await _raw_publish(f"{prefix}.echo".encode(), b"_INBOX.\xff", b"", msgpack.packb({"data": 1}))
        good = await raw_client.request(f"{prefix}.echo", msgpack.packb({"data": "still here"}), timeout=5)
        assert unpack(good.data) == "still here"
        await replies.unsubscribe()


@pytest.mark.parametrize(
    "block",
    [b"NATS/1.0", b"NATS/1.0 \xff\xfe\xfd\r\n\r\n", b"NATS/1.0 200 \xff\r\npikku-hop: 1\r\n\r\n"],
    ids=["no-line-end", "status-not-utf8", "description-not-utf8"],
)
async def test_malformed_header_block_gets_error_reply(mesh: Mesh, raw_client: NatsClient, block: bytes) -> None:
    # nats-py raised on these inside its read loop, and the worker read nothing more for about 80 s.
    prefix = new_prefix()
    async with make_worker(mesh, shared_endpoint(prefix)) as worker:
        inbox = raw_client.new_inbox()
        replies = await raw_client.subscribe(inbox)
        await _raw_publish_block(f"{prefix}.echo".encode(), inbox.encode(), block, msgpack.packb({"data": 1}))

        reply = await replies.next_msg(timeout=5)
        assert reply.headers is not None
        assert reply.headers["pikku-status"] == "400"
        assert "header block" in unpack(reply.data)["message"]
        good = await raw_client.request(f"{prefix}.echo", msgpack.packb({"data": "still here"}), timeout=5)
        assert unpack(good.data) == "still here"
        assert _server_reconnects(worker) == 0
        await replies.unsubscribe()


@pytest.mark.parametrize("character", [b"\x0b", b"\x0c"], ids=["vertical-tab", "form-feed"])
@pytest.mark.parametrize("header_size", [0, 6000], ids=["small", "large-headers"])
async def test_subject_with_line_whitespace_keeps_connection(
    mesh: Mesh, raw_client: NatsClient, character: bytes, header_size: int
) -> None:
    # nats-py splits a message line on these and failed to read it: it reconnected, dropping the
    # subscription, or with 4 KiB behind the line it waited for more data and read nothing for 80 s.
    prefix = new_prefix()
    async with make_worker(mesh, shared_endpoint(prefix)) as worker:
        inbox = raw_client.new_inbox()
        replies = await raw_client.subscribe(inbox)
        subject = prefix.encode() + b".ec" + character + b"ho"
        headers = b"x-filler: " + b"f" * header_size + b"\r\n" if header_size else b""
        await _raw_publish(subject, inbox.encode(), headers, msgpack.packb({"data": 1}))

        reply = await replies.next_msg(timeout=5)
        assert reply.headers is not None
        assert reply.headers["pikku-status"] == "400"
        assert "does not name a function" in unpack(reply.data)["message"]

        # A reply subject with one has no address to answer: dropped, and the connection stays.
        await _raw_publish(
            f"{prefix}.echo".encode(), inbox.encode() + character + b"x", b"", msgpack.packb({"data": 2})
        )
        good = await raw_client.request(f"{prefix}.echo", msgpack.packb({"data": "still here"}), timeout=5)
        assert unpack(good.data) == "still here"
        assert _server_reconnects(worker) == 0
        await replies.unsubscribe()


def _server_reconnects(worker: PikkuWorker) -> int:
    [server] = worker._servers
    assert isinstance(server, NatsServer)
    assert server._nc is not None
    reconnects: int = server._nc.stats["reconnects"]
    return reconnects


async def test_plain_client_calls(mesh: Mesh, raw_client: NatsClient) -> None:
    prefix = new_prefix()
    async with make_worker(mesh, shared_endpoint(prefix)):
        # No headers at all, and an empty body for a None input.
        empty = await raw_client.request(f"{prefix}.echo", b"", timeout=5)
        assert empty.headers == {"pikku-status": "200"}
        assert unpack(empty.data) is None

        # A message without a reply subject is dropped, and later requests are served.
        await raw_client.publish(f"{prefix}.echo", msgpack.packb({"data": 1}))
        answer = await raw_client.request(f"{prefix}.echo", msgpack.packb({"data": {"a": [1]}}), timeout=5)
        assert unpack(answer.data) == {"a": [1]}


async def test_odd_function_names(mesh: Mesh, raw_client: NatsClient) -> None:
    prefix = new_prefix()
    caller = mesh.service()
    async with make_worker(mesh, shared_endpoint(prefix)):
        for name in ODD_NAMES:
            assert await caller.invoke(name, None, timeout=5) == name, name

        # A plain client reaches an odd name through its escaped subject.
        reply = await raw_client.request(f"{prefix}.orders%2Ecreate", b"", timeout=5)
        assert unpack(reply.data) == "orders.create"


async def test_two_connections_share_calls(mesh: Mesh) -> None:
    prefix = new_prefix()
    transport = NatsTransport(SHARED_URL, connections=2)
    events: list[Any] = []
    transport.set_presence_listener(events.append)
    async with make_worker(mesh, shared_endpoint(prefix)):
        replies = [await transport.call(shared_endpoint(prefix), request("echo", i), 5.0) for i in range(6)]
        first, second = transport._slots
        assert first is not None
        assert second is not None
        assert first.nc is not None
        assert second.nc is not None
        sent = (first.nc.stats["out_msgs"], second.nc.stats["out_msgs"])
        subscriptions = (len(first.nc._subs), len(second.nc._subs))
        distinct = first.nc.client_id != second.nc.client_id
    await transport.close()

    assert [reply.body for reply in replies] == list(range(6))
    assert sent == (3, 3)
    assert distinct
    # The reply inbox on both, and presence on the first only, so each event reaches the listener once.
    assert subscriptions == (2, 1)


async def test_queue_group_shares_prefix(mesh: Mesh) -> None:
    prefix = new_prefix()
    transport = NatsTransport(SHARED_URL, connections=2)
    served: set[str] = set()
    async with make_worker(mesh, shared_endpoint(prefix), "n-a"), make_worker(mesh, shared_endpoint(prefix), "n-b"):
        for _ in range(40):
            reply = await transport.call(shared_endpoint(prefix), request("nap", 0.0), 5.0)
            served.add(reply.body)
    await transport.close()

    assert served == {"n-a", "n-b"}


async def test_draining_group_member_hands_calls_over(mesh: Mesh) -> None:
    # Two workers share a prefix, so NATS spreads the calls of one subject over both. While one of
    # them drains its slow calls, the other takes every new call.
    prefix = new_prefix()
    caller = mesh.service(routing_cache_ttl=60)
    draining = make_worker(mesh, shared_endpoint(prefix), "n-a")
    async with make_worker(mesh, shared_endpoint(prefix), "n-b") as serving:
        await draining.start()
        try:
            # NATS picks a member at random for each message, so a few calls can all land on n-b.
            # Send slow calls in fours until n-a is running one. The chance that it never gets one is 2**-40.
            slow: list[asyncio.Task[Any]] = []

            def all_arrived() -> bool:
                running = sum(not task.done() for task in slow)
                return draining.dispatcher.in_flight + serving.dispatcher.in_flight == running

            for _ in range(10):
                slow += [asyncio.create_task(caller.invoke("nap", 1.5, timeout=10)) for _ in range(4)]
                await wait_until(all_arrived, timeout=5)
                if draining.dispatcher.in_flight:
                    break
            assert draining.dispatcher.in_flight > 0
            stopping = asyncio.create_task(draining.stop())
            await wait_until(lambda: draining.dispatcher.draining, timeout=5)

            answers = []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                answers.append(await caller.invoke("nap", 0.0, timeout=5))
            await stopping
            assert set(await asyncio.gather(*slow)) <= {"n-a", "n-b"}
        finally:
            await draining.stop()

    assert len(answers) > 20
    assert set(answers) == {"n-b"}


async def test_credentials_never_advertised(mesh: Mesh, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PIKKU_NATS_URL", raising=False)
    prefix = new_prefix()
    caller = mesh.service()

    # Without nats_url, the worker connects to the endpoint's own address with its credentials.
    async with make_worker(mesh, f"nats://pikku:secret@127.0.0.1:4222/{prefix}", "n-cred") as worker:
        assert worker.endpoint == f"nats://127.0.0.1:4222/{prefix}"
        [record] = await mesh.service().list_deployments()
        assert record.endpoint == f"nats://127.0.0.1:4222/{prefix}"
        assert await caller.invoke("echo", "hi", timeout=5) == "hi"

    other = new_prefix()
    async with make_worker(mesh, f"nats://localhost/{other}", "n-url", nats_url="nats://pikku:secret@127.0.0.1:4222"):
        [record] = await mesh.service().list_deployments()
        assert record.endpoint == f"nats://localhost:4222/{other}"


async def test_server_replaces_closed_connection(mesh: Mesh) -> None:
    caller = mesh.service()
    async with make_worker(mesh, shared_endpoint()) as worker:
        assert await caller.invoke("echo", 1, timeout=5) == 1
        [server] = worker._servers
        assert isinstance(server, NatsServer)
        client = server._nc
        assert client is not None

        # As nats-py does after some protocol errors: the client is closed for good.
        await client.close()

        async def served() -> bool:
            try:
                return await caller.invoke("echo", 2, timeout=1) == 2
            except PikkuMQError:
                return False

        await wait_until(served, timeout=10, interval=0.2)


# -- a private nats-server, restarted --------------------------------------------------------------


async def test_broker_restart_recovers(mesh: Mesh, private_nats: PrivateNats) -> None:
    prefix = new_prefix()
    endpoint = f"{private_nats.url}/{prefix}"
    caller = mesh.service(
        transports=TransportSet([NatsTransport(private_nats.url), MemoryTransport()]),
        heartbeat_interval=1,
        heartbeat_ttl=2,
    )
    async with make_worker(mesh, endpoint, nats_url=private_nats.url):
        assert await caller.invoke("nap", 0.0, timeout=5) == "n-1"

        # A call in flight when the broker dies fails as a transport error, well before its deadline.
        in_flight = asyncio.create_task(caller.invoke("nap", 3.0, timeout=20))
        await asyncio.sleep(0.3)
        private_nats.stop()
        started = time.monotonic()
        with pytest.raises(TransportError):
            await in_flight
        assert time.monotonic() - started < 2.0

        # During the outage, calls fail at once with a typed error.
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises((EndpointUnreachableError, RoutingError)):
                await caller.invoke("nap", 0.0, timeout=5)
            assert time.monotonic() - started < 1.0

        # Same port, same processes: worker and caller reconnect and serve again.
        private_nats.start()

        async def served() -> bool:
            try:
                return await caller.invoke("nap", 0.0, timeout=1) == "n-1"
            except PikkuMQError:
                return False

        waited = await wait_until(served, timeout=15, interval=0.2)
        assert waited < 15
        assert await caller.invoke("echo", {"after": "restart"}, timeout=5) == {"after": "restart"}


class _ClientClosingWithCancel:
    """A stand-in for a nats-py client whose close() raises CancelledError, as nats-py 2.16 does when
    it is closed while reconnecting, or waits in close() until the test cancels it."""

    is_closed = False
    is_connected = True

    def __init__(self, wait: bool = False) -> None:
        self.wait = wait
        self.entered = asyncio.Event()

    async def close(self) -> None:
        self.entered.set()
        if self.wait:
            await asyncio.sleep(30)
        raise asyncio.CancelledError


async def test_close_client_swallows_inner_cancel() -> None:
    await _close_client(_ClientClosingWithCancel())  # type: ignore[arg-type]


async def test_close_client_passes_own_cancel() -> None:
    client = _ClientClosingWithCancel(wait=True)
    closing = asyncio.create_task(_close_client(client))  # type: ignore[arg-type]
    await asyncio.wait_for(client.entered.wait(), 5)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing


async def test_stop_while_broker_down(mesh: Mesh, private_nats: PrivateNats) -> None:
    prefix = new_prefix()
    transport = NatsTransport(private_nats.url)
    worker = make_worker(mesh, f"{private_nats.url}/{prefix}", nats_url=private_nats.url, drain_timeout=1)
    await worker.start()
    try:
        reply = await transport.call(worker.endpoint or "", request("nap", 0.0), 5.0)
        assert reply.body == "n-1"
        private_nats.stop()
        # Sent before the client noticed (TransportError) or refused after (EndpointUnreachableError).
        with pytest.raises(TransportError):
            await transport.call(worker.endpoint or "", request("nap", 0.0), 5.0)
    finally:
        started = time.monotonic()
        await worker.stop()
        await transport.close()
    assert time.monotonic() - started < 5.0
