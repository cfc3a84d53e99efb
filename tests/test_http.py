"""The HTTP wire, checked with a raw client against a real uvicorn worker, and the HTTP callers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import socket
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import httpx
import msgpack
import pydantic_core
import pytest
import uvicorn
from pydantic import BaseModel
from starlette.applications import Starlette
from starlette.routing import Mount

from pikku_mq import (
    AiohttpTransport,
    BadRequestError,
    DeadlineExceededError,
    DeploymentConfig,
    FunctionRegistry,
    HttpxTransport,
    MemoryDeploymentService,
    MemoryRegistry,
    PikkuWorker,
    ProtocolError,
    TransportError,
    TransportSet,
    deployment_service_from_url,
    pikku_sessionless_func,
)
from pikku_mq._dispatch import Dispatcher
from pikku_mq._types import CallRequest
from pikku_mq.transports import http as http_transport
from pikku_mq.transports.http import MAX_NESTING, PikkuASGIApp, _decode_call_body

MAX_BODY_SIZE = 4096
JSON = "application/json"
MSGPACK = "application/msgpack"
ENVELOPE_KEYS = {"name", "message", "payload", "errorId", "code", "retryable"}

functions = FunctionRegistry()
runs: dict[str, int] = {}
"""How many times each counting function ran, to check that a rejected call did not run."""


class GreetIn(BaseModel):
    name: str
    times: int = 1


class GreetOut(BaseModel):
    greeting: str


class TooManyGreetingsError(BadRequestError):
    status = 429
    code = "too_many_greetings"
    retryable = True


@pikku_sessionless_func(expose=True, registry=functions)
async def greet(services: Any, data: GreetIn) -> GreetOut:
    return GreetOut(greeting=" ".join([f"Hello, {data.name}!"] * data.times))


@pikku_sessionless_func(expose=True, registry=functions)
async def nothing(services: Any, data: Any) -> None:
    return None


@pikku_sessionless_func(expose=True, registry=functions)
async def data_type(services: Any, data: Any) -> str:
    return type(data).__name__


@pikku_sessionless_func(expose=True, registry=functions)
async def over_limit(services: Any, data: Any) -> None:
    raise TooManyGreetingsError("at most 10 greetings per minute are allowed", payload={"limit": 10})


@pikku_sessionless_func(expose=True, registry=functions)
async def crash(services: Any, data: Any) -> None:
    raise RuntimeError("connection to db://admin:hunter2@db failed")


@pikku_sessionless_func(expose=True, registry=functions)
async def wrong_output(services: Any, data: Any) -> int:
    return "not a number"  # type: ignore[return-value]


@pikku_sessionless_func(expose=True, registry=functions)
async def unserialisable(services: Any, data: Any) -> Any:
    return object()


@pikku_sessionless_func(expose=True, registry=functions)
async def counted(services: Any, data: Any) -> int:
    runs["counted"] = runs.get("counted", 0) + 1
    return runs["counted"]


@pikku_sessionless_func(expose=False, registry=functions)
async def hidden(services: Any, data: Any) -> str:
    return "secret"


@pikku_sessionless_func(name="billing/charge", expose=True, registry=functions)
async def billing_charge(services: Any, data: Any) -> str:
    return "charged"


@pikku_sessionless_func(name="say hello", expose=True, registry=functions)
async def say_hello(services: Any, data: Any) -> str:
    return "hello"


@pikku_sessionless_func(name="grüße", expose=True, registry=functions)
async def gruesse(services: Any, data: Any) -> str:
    return "grüße"


@pikku_sessionless_func(expose=True, registry=functions)
async def not_a_number(services: Any, data: Any) -> float:
    return math.nan


@pikku_sessionless_func(expose=True, registry=functions)
async def nested_infinity(services: Any, data: Any) -> dict[str, Any]:
    return {"values": [1.0, None, math.inf], "label": "NaN"}


@pikku_sessionless_func(expose=True, registry=functions)
async def stuck(services: Any, data: Any) -> None:
    await asyncio.sleep(60)


# -- fixtures and helpers ---------------------------------------------------------------------------


@pytest.fixture
async def worker() -> AsyncIterator[PikkuWorker]:
    async with PikkuWorker(
        endpoint="http://127.0.0.1:0", discovery=False, registry=functions, max_body_size=MAX_BODY_SIZE
    ) as running:
        yield running


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def post(
    client: aiohttp.ClientSession,
    worker: PikkuWorker,
    name: str,
    body: Any,
    *,
    content_type: str = JSON,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    """POST ``body`` (bytes as is, anything else as JSON) to ``name`` and return status, content type and body."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    url = f"{worker.endpoint}/remote/rpc/{quote(name, safe='')}"
    async with client.post(url, data=raw, headers={"content-type": content_type, **(headers or {})}) as response:
        return response.status, response.content_type, await response.read()


def envelope(raw: bytes) -> dict[str, Any]:
    body = json.loads(raw)
    assert isinstance(body, dict)
    assert set(body) == ENVELOPE_KEYS
    return body


class _QuietServer(uvicorn.Server):
    """uvicorn's server without its signal handlers, which belong to pytest here."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@contextlib.asynccontextmanager
async def serve_asgi(app: Any) -> AsyncIterator[str]:
    """Serve an ASGI app with uvicorn on a free port of 127.0.0.1 and yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    server = _QuietServer(uvicorn.Config(app, lifespan="off", log_level=logging.WARNING))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(10):
            while not server.started:
                assert not task.done(), "uvicorn exited during startup"
                await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


async def foreign_peer(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Reply as Pikku does to a None result (204), or as a server that is not a pikku peer."""
    assert scope["type"] == "http"
    while (await receive()).get("more_body"):
        pass
    replies = {
        "/remote/rpc/empty": (204, b"text/plain", b""),
        "/remote/rpc/html_page": (200, b"text/html", b"<html><body>Welcome</body></html>"),
        "/remote/rpc/html_error": (500, b"text/html", b"<html><body>Internal Server Error</body></html>"),
        "/remote/rpc/json_error": (500, JSON.encode(), b'{"detail": "boom"}'),
    }
    status, content_type, body = replies[scope["path"]]
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type)]})
    await send({"type": "http.response.body", "body": body})


# -- success ----------------------------------------------------------------------------------------


async def test_call_returns_bare_result(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, content_type, body = await post(client, worker, "greet", {"data": {"name": "Ada", "times": 2}})

    assert status == 200
    assert content_type == JSON
    assert json.loads(body) == {"greeting": "Hello, Ada! Hello, Ada!"}


async def test_reply_headers(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    url = f"{worker.endpoint}/remote/rpc/greet"
    async with client.post(url, json={"data": {"name": "Ada"}}) as response:
        body = await response.read()
        headers = response.headers

    assert headers["content-type"] == JSON
    assert headers["content-length"] == str(len(body))
    assert "date" in headers  # RFC 9110 requires it of an origin server with a clock
    assert "server" not in headers  # a caller has no use for it, and it costs the worker per reply


async def test_none_result_is_200_null(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, _, body = await post(client, worker, "nothing", {"data": 1})

    assert status == 200
    assert body == b"null"


async def test_empty_object_means_data_none(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, _, body = await post(client, worker, "data_type", {})

    assert status == 200
    assert json.loads(body) == "NoneType"


async def test_msgpack_request_gets_msgpack_reply(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    request = msgpack.packb({"data": {"name": "Ada"}})
    status, content_type, body = await post(client, worker, "greet", request, content_type=MSGPACK)

    assert status == 200
    assert content_type == MSGPACK
    assert msgpack.unpackb(body) == {"greeting": "Hello, Ada!"}


async def test_msgpack_error_reply(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    request = msgpack.packb({"data": {"name": 5}})
    status, content_type, body = await post(client, worker, "greet", request, content_type=MSGPACK)

    assert status == 422
    assert content_type == MSGPACK
    error = msgpack.unpackb(body)
    assert set(error) == ENVELOPE_KEYS
    assert error["name"] == "InputValidationError"


@pytest.mark.parametrize(
    ("name", "expected"), [("billing/charge", "charged"), ("say hello", "hello"), ("grüße", "grüße")]
)
async def test_percent_encoded_name(
    worker: PikkuWorker, client: aiohttp.ClientSession, name: str, expected: str
) -> None:
    status, _, body = await post(client, worker, name, {"data": None})

    assert status == 200
    assert json.loads(body) == expected


# -- errors -----------------------------------------------------------------------------------------


async def test_error_envelope(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, content_type, body = await post(client, worker, "over_limit", {"data": None})

    assert status == 429
    assert content_type == JSON
    error = envelope(body)
    assert error["name"] == "TooManyGreetingsError"
    assert error["message"] == "at most 10 greetings per minute are allowed"
    assert error["payload"] == {"limit": 10}
    assert error["code"] == "too_many_greetings"
    assert error["retryable"] is True
    assert isinstance(error["errorId"], str)
    assert error["errorId"]


async def test_body_over_limit_with_length(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    body = json.dumps({"data": {"name": "x" * MAX_BODY_SIZE}}).encode()
    status, _, raw = await post(client, worker, "greet", body)

    assert status == 413
    error = envelope(raw)
    assert error["name"] == "PayloadTooLargeError"
    assert error["payload"] == {"max_body_size": MAX_BODY_SIZE}


async def test_body_over_limit_chunked(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"data": {"name": "'
        for _ in range(3):
            yield b"x" * 2000
        yield b'"}}'

    url = f"{worker.endpoint}/remote/rpc/greet"
    async with client.post(url, data=chunks(), headers={"content-type": JSON}) as response:
        assert "content-length" not in response.request_info.headers
        assert response.request_info.headers["transfer-encoding"] == "chunked"
        assert response.status == 413
        assert envelope(await response.read())["name"] == "PayloadTooLargeError"


async def test_stalled_body_gets_408() -> None:
    app = PikkuASGIApp(Dispatcher(functions), body_timeout=0.5)
    async with serve_asgi(app) as url:
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            head = f"POST /remote/rpc/greet HTTP/1.1\r\nhost: x\r\ncontent-type: {JSON}\r\ncontent-length: 1000\r\n\r\n"
            writer.write(head.encode() + b'{"data": {"name": "' + b"x" * 100)
            await writer.drain()
            async with asyncio.timeout(5):
                reply_head = await reader.readuntil(b"\r\n\r\n")
                length = int(reply_head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
                reply_body = await reader.readexactly(length)
        finally:
            writer.close()
        async with (
            aiohttp.ClientSession() as client,
            client.post(f"{url}/remote/rpc/greet", json={"data": {"name": "Ada"}}) as response,
        ):
            served = response.status

    assert reply_head.startswith(b"HTTP/1.1 408 ")
    error = envelope(reply_body)
    assert error["name"] == "RequestTimeoutError"
    assert error["payload"] == {"body_timeout": 0.5}
    assert served == 200


async def test_body_at_limit_is_served(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    prefix = b'{"data": {"name": "'
    suffix = b'"}}'
    body = prefix + b"x" * (MAX_BODY_SIZE - len(prefix) - len(suffix)) + suffix
    status, _, _ = await post(client, worker, "greet", body)

    assert len(body) == MAX_BODY_SIZE
    assert status == 200


@pytest.mark.parametrize(
    "body",
    [b'{"data": ', b"", b"[1, 2]", b'"data"', b'{"data": 1, "session": {}}', b"\xff\xfe"],
    ids=["malformed", "empty", "array", "string", "unknown_key", "not_utf8"],
)
async def test_bad_body_is_400(worker: PikkuWorker, client: aiohttp.ClientSession, body: bytes) -> None:
    status, _, raw = await post(client, worker, "greet", body)

    assert status == 400
    assert envelope(raw)["name"] == "BadRequestError"


async def test_malformed_msgpack_is_400(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, content_type, raw = await post(client, worker, "greet", b"\xc1", content_type=MSGPACK)

    # The error comes back in the codec the caller used.
    assert status == 400
    assert content_type == MSGPACK
    error = msgpack.unpackb(raw)
    assert error["name"] == "BadRequestError"
    assert error["message"].startswith("request body is not valid msgpack: ")
    assert error["message"] != "request body is not valid msgpack: "


async def test_unknown_function_is_404(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, _, raw = await post(client, worker, "no_such_function", {"data": None})

    assert status == 404
    error = envelope(raw)
    assert error["name"] == "FunctionNotFoundError"
    assert error["code"] == "function_not_found"


async def test_hidden_function_same_as_unknown(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    hidden_status, _, hidden_raw = await post(client, worker, "hidden", {"data": None})
    unknown_status, _, unknown_raw = await post(client, worker, "hiddeN", {"data": None})
    hidden_error = envelope(hidden_raw)
    unknown_error = envelope(unknown_raw)

    assert hidden_status == unknown_status == 404
    assert hidden_error["name"] == unknown_error["name"]
    assert hidden_error["code"] == unknown_error["code"]
    assert hidden_error["message"].replace("'hidden'", "'hiddeN'") == unknown_error["message"]
    assert b"secret" not in hidden_raw


async def test_get_is_405(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{worker.endpoint}/remote/rpc/greet") as response:
        assert response.status == 405
        assert envelope(await response.read())["name"] == "MethodNotAllowedError"


async def call_app(
    app: PikkuASGIApp, method: str, path: str, raw_path: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, dict[str, Any]]:
    """Call the ASGI app directly with one request and return the status and the JSON body of its reply."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b'{"data": {"name": "Ada"}}', "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": raw_path,
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", JSON.encode()), *(headers or [])],
    }
    await app(scope, receive, send)
    return sent[0]["status"], json.loads(sent[1]["body"])


async def test_cached_route_keeps_checks() -> None:
    app = PikkuASGIApp(Dispatcher(functions))
    rpc = "/remote/rpc/greet"

    status, body = await call_app(app, "POST", rpc, rpc.encode())
    assert status == 200
    assert body == {"greeting": "Hello, Ada!"}
    # The same raw path again, as a GET and after a middleware rewrote the path without the raw path.
    status, body = await call_app(app, "GET", rpc, rpc.encode())
    assert status == 405
    assert body["name"] == "MethodNotAllowedError"
    status, body = await call_app(app, "POST", "/elsewhere", rpc.encode())
    assert status == 404
    assert body["name"] == "NotFoundError"


async def test_route_and_header_caches_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_transport, "_HEADER_NAMES", {})
    app = PikkuASGIApp(Dispatcher(functions))
    long_path = "/remote/rpc/" + "x" * 300
    status, _ = await call_app(app, "POST", long_path, long_path.encode(), [(b"x-" + b"y" * 300, b"1")])
    assert status == 404
    # Long names and paths are decoded for each request, not kept.
    assert app._names == {}
    assert http_transport._HEADER_NAMES == {b"content-type": "content-type"}

    for number in range(http_transport._MAX_CACHED_NAMES + 200):
        path = f"/remote/rpc/missing-{number}"
        headers = [(f"X-Custom-{number}".encode(), b"1")]
        status, body = await call_app(app, "POST", path, path.encode(), headers)
        assert status == 404
        assert body["name"] == "FunctionNotFoundError"

    assert len(app._names) <= http_transport._MAX_CACHED_NAMES
    assert len(http_transport._HEADER_NAMES) <= http_transport._MAX_CACHED_NAMES
    assert "x-custom-0" in http_transport._HEADER_NAMES.values()


async def test_invalid_endpoint_is_transport_error() -> None:
    transport = AiohttpTransport()
    try:
        with pytest.raises(TransportError, match="the URL is invalid"):
            await transport.call("http://127.0.0.1:99999", CallRequest(name="greet", data=None), 5.0)
    finally:
        await transport.close()


async def test_path_outside_rpc_is_404(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    async with client.post(f"{worker.endpoint}/rpc/greet", json={"data": None}) as response:
        assert response.status == 404
        assert envelope(await response.read())["name"] == "NotFoundError"


async def test_wrong_content_type_is_415(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, _, raw = await post(client, worker, "greet", {"data": {"name": "Ada"}}, content_type="text/plain")

    assert status == 415
    assert envelope(raw)["name"] == "UnsupportedMediaTypeError"


async def test_invalid_input_names_fields(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, _, raw = await post(client, worker, "greet", {"data": {"times": "many"}})

    assert status == 422
    error = envelope(raw)
    assert error["name"] == "InputValidationError"
    assert "name" in error["message"]
    assert "times" in error["message"]
    locations = sorted(tuple(item["loc"]) for item in error["payload"])
    assert locations == [("name",), ("times",)]


async def test_output_mismatch_is_500(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, _, raw = await post(client, worker, "wrong_output", {"data": None})

    assert status == 500
    error = envelope(raw)
    assert error["name"] == "OutputValidationError"
    assert "wrong_output" in error["message"]
    assert "return type" in error["message"]


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
async def test_unserialisable_output_is_500(
    worker: PikkuWorker, client: aiohttp.ClientSession, content_type: str
) -> None:
    body = msgpack.packb({"data": None}) if content_type == MSGPACK else b'{"data": null}'
    status, reply_type, raw = await post(client, worker, "unserialisable", body, content_type=content_type)

    assert status == 500
    error = msgpack.unpackb(raw) if reply_type == MSGPACK else json.loads(raw)
    assert error["name"] == "OutputValidationError"
    assert "cannot be serialised" in error["message"]


async def test_exception_is_500_without_details(
    worker: PikkuWorker, client: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="pikku_mq")
    status, _, raw = await post(client, worker, "crash", {"data": None})

    assert status == 500
    error = envelope(raw)
    assert error["name"] == "InternalServerError"
    assert "hunter2" not in raw.decode()
    assert "db://" not in raw.decode()
    logged = [r for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], RuntimeError)]
    assert len(logged) == 1
    assert error["errorId"] in logged[0].getMessage()


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("pikku-deadline-ms", "abc"),
        ("pikku-deadline-ms", "nan"),
        ("pikku-deadline-ms", "0"),
        ("pikku-deadline-ms", "-5"),
        ("pikku-deadline-ms", "1500.5"),
        ("pikku-deadline-ms", "1e3"),
        ("pikku-deadline-ms", "+100"),
        ("pikku-deadline-ms", "\u00b2"),
        ("pikku-deadline-ms", "1" * 19),
        ("pikku-hop", "two"),
        ("pikku-hop", "0"),
    ],
)
async def test_invalid_header_is_400(
    worker: PikkuWorker, client: aiohttp.ClientSession, header: str, value: str
) -> None:
    before = runs.get("counted", 0)
    status, _, raw = await post(client, worker, "counted", {"data": None}, headers={header: value})

    assert status == 400
    assert header in envelope(raw)["message"]
    assert runs.get("counted", 0) == before


async def test_huge_deadline_is_served(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    # The largest deadline the header takes, about 32 million years, is still a deadline.
    status, _, raw = await post(client, worker, "counted", {"data": None}, headers={"pikku-deadline-ms": "9" * 18})

    assert status == 200
    assert json.loads(raw) is not None


async def test_worker_serves_after_bad_requests(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    bad_calls: list[tuple[str, bytes, str, dict[str, str]]] = [
        ("greet", b"{", JSON, {}),
        ("greet", b"x" * (MAX_BODY_SIZE + 1), JSON, {}),
        ("greet", b"[]", JSON, {}),
        ("greet", b"\xc1", MSGPACK, {}),
        ("greet", b'{"data": {}}', JSON, {}),
        ("greet", b'{"data": {"name": "Ada"}}', "text/plain", {}),
        ("greet", b'{"data": {"name": "Ada"}}', JSON, {"pikku-deadline-ms": "abc"}),
        ("greet", b'{"data": {"name": "Ada"}}', JSON, {"pikku-hop": "999"}),
        ("crash", b"{}", JSON, {}),
        ("unserialisable", b"{}", JSON, {}),
        ("hidden", b"{}", JSON, {}),
    ]
    statuses = []
    for name, body, content_type, headers in bad_calls:
        status, _, _ = await post(client, worker, name, body, content_type=content_type, headers=headers)
        statuses.append(status)

    assert statuses == [400, 413, 400, 400, 422, 415, 400, 508, 500, 500, 404]
    status, _, body = await post(client, worker, "greet", {"data": {"name": "Ada"}})
    assert status == 200
    assert json.loads(body) == {"greeting": "Hello, Ada!"}


# -- callers ----------------------------------------------------------------------------------------


async def test_aiohttp_transport_call(worker: PikkuWorker) -> None:
    transport = AiohttpTransport()
    try:
        assert worker.endpoint is not None
        reply = await transport.call(worker.endpoint, CallRequest("billing/charge", None), timeout=5)
        error_reply = await transport.call(worker.endpoint, CallRequest("over_limit", None), timeout=5)
    finally:
        await transport.close()

    assert reply.status == 200
    assert reply.body == "charged"
    assert error_reply.status == 429
    assert error_reply.body["name"] == "TooManyGreetingsError"


async def test_aiohttp_user_agent_and_media_type() -> None:
    seen: list[dict[bytes, bytes]] = []

    async def peer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(dict(scope["headers"]))
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", b"Application/MsgPack; charset=binary")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": msgpack.packb({"ok": [1, 2]})})

    transport = AiohttpTransport()
    try:
        async with serve_asgi(peer) as endpoint:
            reply = await transport.call(endpoint, CallRequest("echo", {"a": 1}, {"x-request-id": "r1"}), timeout=5)
    finally:
        await transport.close()

    assert reply.body == {"ok": [1, 2]}
    assert seen[0][b"user-agent"] == b"pikku-mq"
    assert seen[0][b"x-request-id"] == b"r1"
    assert seen[0][b"content-type"] == JSON.encode()


@pytest.mark.parametrize("name", ["content-type", "Content-Type", "CONTENT-TYPE"])
async def test_caller_content_type_header_ignored(name: str) -> None:
    # The body is always JSON, so a content type among a call's own headers must not replace it.
    shared = MemoryRegistry()
    caller = MemoryDeploymentService(shared)
    try:
        async with PikkuWorker(deployment_service=MemoryDeploymentService(shared), registry=functions):
            result = await caller.call(
                "greet",
                {"name": "Ada"},
                session=None,
                trace_id=None,
                deadline=time.monotonic() + 5,
                hop=1,
                idempotent=None,
                headers={name: "application/msgpack", "x-extra": "kept"},
            )
    finally:
        await caller.close()

    assert result == {"greeting": "Hello, Ada!"}


async def test_aiohttp_deadline_of_over_five_seconds_is_kept() -> None:
    # aiohttp rounds its own timeouts of 5 s or more up to a whole second of the loop's clock, so a call
    # could end up to a second after its deadline. The transport's own deadline scope ends it on time.
    disconnected = asyncio.Event()

    async def silent_peer(scope: dict[str, Any], receive: Any, send: Any) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        disconnected.set()

    transport = AiohttpTransport()
    try:
        async with serve_asgi(silent_peer) as endpoint:
            # Start just after a whole second of the loop's clock, where rounding up would add 0.65 s.
            loop = asyncio.get_running_loop()
            await asyncio.sleep(math.ceil(loop.time()) - loop.time() + 0.05)
            started = time.monotonic()
            with pytest.raises(DeadlineExceededError):
                await transport.call(endpoint, CallRequest("slow", None), timeout=5.3)
            elapsed = time.monotonic() - started
            async with asyncio.timeout(5):
                await disconnected.wait()
    finally:
        await transport.close()

    assert 5.3 <= elapsed < 5.6


async def test_httpx_transport_user_client() -> None:
    shared = MemoryRegistry()
    async with httpx.AsyncClient() as user_client:
        caller = MemoryDeploymentService(shared, transports=TransportSet([HttpxTransport(user_client)]))
        async with PikkuWorker(deployment_service=MemoryDeploymentService(shared), registry=functions):
            result = await caller.invoke("greet", {"name": "Ada"})
            empty = await caller.invoke("nothing")
            with pytest.raises(TooManyGreetingsError) as raised:
                await caller.invoke("over_limit")
        await caller.close()

        assert not user_client.is_closed

    assert result == {"greeting": "Hello, Ada!"}
    assert empty is None
    assert raised.value.payload == {"limit": 10}


async def test_caller_accepts_204_as_none(discovery_url: str) -> None:
    async with serve_asgi(foreign_peer) as endpoint:
        peer = deployment_service_from_url(discovery_url)
        caller = deployment_service_from_url(discovery_url)
        try:
            await peer.start(DeploymentConfig("pikku-ts", endpoint, functions=["empty"]))
            result = await caller.invoke("empty", {"name": "Ada"})
        finally:
            await caller.close()
            await peer.close()

    assert result is None


@pytest.mark.parametrize("name", ["html_page", "html_error", "json_error"])
async def test_non_pikku_reply_is_protocol_error(discovery_url: str, name: str) -> None:
    async with serve_asgi(foreign_peer) as endpoint:
        peer = deployment_service_from_url(discovery_url)
        caller = deployment_service_from_url(discovery_url)
        try:
            await peer.start(DeploymentConfig("not-pikku", endpoint, functions=[name]))
            with pytest.raises(ProtocolError) as raised:
                await caller.invoke(name)
        finally:
            await caller.close()
            await peer.close()

    assert "status" in str(raised.value)


async def test_starlette_mount_at_prefix(client: aiohttp.ClientSession) -> None:
    worker = PikkuWorker(discovery=False, registry=functions)
    app = Starlette(routes=[Mount("/services/pikku", app=worker.asgi_app())])
    transport = AiohttpTransport()
    try:
        async with serve_asgi(app) as base_url:
            endpoint = f"{base_url}/services/pikku"
            url = f"{endpoint}/remote/rpc/{quote('billing/charge', safe='')}"
            async with client.post(url, json={"data": None}) as response:
                raw_status, raw_body = response.status, await response.read()
            reply = await transport.call(endpoint, CallRequest("greet", {"name": "Ada"}), timeout=5)
            missing = await transport.call(endpoint, CallRequest("hidden", None), timeout=5)
    finally:
        await transport.close()

    assert raw_status == 200
    assert json.loads(raw_body) == "charged"
    assert reply.status == 200
    assert reply.body == {"greeting": "Hello, Ada!"}
    assert missing.status == 404


@pytest.mark.parametrize("body", [b'{"data": NaN}', b'{"data": [Infinity]}', b'{"data": -Infinity}'])
async def test_non_finite_input_is_400(worker: PikkuWorker, client: aiohttp.ClientSession, body: bytes) -> None:
    status, _, raw = await post(client, worker, "data_type", body)

    assert status == 400
    assert "not valid JSON" in envelope(raw)["message"]


async def test_deep_nesting_is_400(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    body = b'{"data": ' + b"[" * 2_000 + b"]" * 2_000 + b"}"

    status, _, raw = await post(client, worker, "data_type", body)

    assert status == 400
    assert "nested too deeply" in envelope(raw)["message"]


@pytest.mark.parametrize("content_type", [JSON, MSGPACK])
async def test_nesting_limit(worker: PikkuWorker, client: aiohttp.ClientSession, content_type: str) -> None:
    # 199 levels of data fit, with the body object 200; 300 once reached the function and its result
    # failed to serialise (pydantic stops at 255), a 500 for the caller's input.
    def nested(depth: int) -> Any:
        value: Any = None
        for _ in range(depth):
            value = [value]
        return value

    def encode(depth: int) -> bytes:
        call = {"data": nested(depth)}
        return msgpack.packb(call) if content_type == MSGPACK else json.dumps(call).encode()

    status, _, _ = await post(client, worker, "data_type", encode(199), content_type=content_type)
    assert status == 200
    for depth in (200, 300):
        status, _, raw = await post(client, worker, "data_type", encode(depth), content_type=content_type)
        assert status == 400
        body = msgpack.unpackb(raw) if content_type == MSGPACK else json.loads(raw)
        assert "nested too deeply" in body["message"]


async def test_lone_surrogate_is_400(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    # Valid JSON, but no UTF-8 string holds it: the echoed result once failed to serialise with a 500.
    status, _, raw = await post(client, worker, "data_type", b'{"data": ["\\udc80"]}')
    assert status == 400
    assert "lone surrogates" in envelope(raw)["message"]

    status, _, raw = await post(client, worker, "data_type", b'{"data": "\\ud83d\\ude00"}')
    assert (status, json.loads(raw)) == (200, "str")


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b'{"data": "\xed\xa0\x80"}', JSON),
        (b'{"data": ["a\xed\xbf\xbf"]}', JSON),
        (b'{"data": "\xff"}', JSON),
        ('{"data": "utf-16"}'.encode("utf-16"), JSON),
        (b"\x81\xa4data\xa3\xed\xa0\x80", MSGPACK),
    ],
    ids=["surrogate-bytes", "nested-surrogate-bytes", "invalid-byte", "utf-16", "msgpack-surrogate-bytes"],
)
async def test_body_not_utf8_is_400(
    worker: PikkuWorker, client: aiohttp.ClientSession, body: bytes, content_type: str
) -> None:
    # JSON with a lone surrogate written as UTF-8 bytes once reached the function, and its echo was a 500.
    status, _, raw = await post(client, worker, "data_type", body, content_type=content_type)

    assert status == 400
    reply = msgpack.unpackb(raw) if content_type == MSGPACK else envelope(raw)
    assert "not valid" in reply["message"]


async def test_utf8_bom_is_accepted(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, _, raw = await post(client, worker, "data_type", b'\xef\xbb\xbf{"data": "x"}')

    assert (status, json.loads(raw)) == (200, "str")


@pytest.mark.parametrize("name", ["not_a_number", "nested_infinity"])
async def test_non_finite_output_is_500(worker: PikkuWorker, client: aiohttp.ClientSession, name: str) -> None:
    status, _, raw = await post(client, worker, name, {"data": None})

    # Never a silent null in place of the number.
    assert status == 500
    error = envelope(raw)
    assert error["name"] == "OutputValidationError"
    assert "NaN or Infinity" in error["message"]


async def test_string_nan_output_kept(worker: PikkuWorker, client: aiohttp.ClientSession) -> None:
    status, _, raw = await post(client, worker, "data_type", {"data": "NaN"})

    assert status == 200
    assert json.loads(raw) == "str"


@pytest.mark.parametrize("hop", ["-1", "1.5", "abc", "9999999"])
async def test_bad_hop_header_is_400(worker: PikkuWorker, client: aiohttp.ClientSession, hop: str) -> None:
    status, _, raw = await post(client, worker, "counted", {"data": None}, headers={"pikku-hop": hop})

    assert status == 400
    assert "pikku-hop" in envelope(raw)["message"]


async def test_caller_rejects_non_finite_data(worker: PikkuWorker) -> None:
    registry = MemoryRegistry()
    caller, registrar = MemoryDeploymentService(registry), MemoryDeploymentService(registry)
    await registrar.start(DeploymentConfig("nan-target", worker.endpoint or "", functions=["data_type"]))
    try:
        with pytest.raises(BadRequestError, match="NaN or Infinity"):
            await caller.invoke("data_type", {"x": math.nan})
        assert await caller.invoke("data_type", {"x": "NaN"}) == "dict"
    finally:
        await caller.close()
        await registrar.close()


async def test_stop_interrupts_stuck_call(client: aiohttp.ClientSession) -> None:
    running = PikkuWorker(endpoint="http://127.0.0.1:0", discovery=False, registry=functions, drain_timeout=0.2)
    await running.start()
    call = asyncio.create_task(post(client, running, "stuck", {"data": None}))
    await asyncio.sleep(0.2)

    await running.stop()
    status, headers_content_type, raw = await call

    # An envelope, not uvicorn's plain-text 500, and not marked as rejected: the function had started.
    assert status == 503
    assert headers_content_type == JSON
    error = envelope(raw)
    assert error["name"] == "CallInterruptedError"
    assert error["retryable"] is False


def _nested_lists(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (msgpack.packb({"data": b""}), "bytes values are not accepted"),
        (msgpack.packb({"data": {b"key": 1}}), "map keys must be strings"),
        (msgpack.packb({"data": math.nan}), "NaN"),
        (msgpack.packb({"data": math.inf}, use_single_float=True), "NaN"),
        (msgpack.packb({"data": msgpack.ExtType(1, b"")}), "ExtType values are not accepted"),
        (msgpack.packb({"data": msgpack.ExtType(1, b"1234")}), "ExtType values are not accepted"),
        (msgpack.packb({"data": msgpack.Timestamp(0, 0)}), "Timestamp values are not accepted"),
        (msgpack.packb({"data": _nested_lists(MAX_NESTING)}), "nested too deeply"),
    ],
)
def test_msgpack_body_rejects_non_json(body: bytes, reason: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        _decode_call_body(body, binary=True)
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    "data",
    [
        {"note": "\xca\xcb\xc4 in a string"},
        {"n": 1, "s": "x" * 300},
        _nested_lists(MAX_NESTING - 2),
        [1, -1, 2**63, None, True, "ü"],
    ],
)
def test_msgpack_body_accepts_json_values(data: Any) -> None:
    assert _decode_call_body(msgpack.packb({"data": data}), binary=True) == data


@pytest.mark.parametrize(
    "raw",
    [
        b'{"data": {"pi": 3.141592653589793, "tiny": 5e-324, "big": 1.7976931348623157e308}}',
        b'{"data": [0.1000000000000000055511151231257827021181583404541015625, 2.5e-8, -0.0, 1E5]}',
        b'{"data": [123456789012345678901234567890, -1, 0]}',
        b'{"data": "\\ud83d\\ude00 \\u00e9 \\n \\" \\\\ \\/"}',
        b'{"data": {"a": 1, "a": 2}}',
        b'\xef\xbb\xbf{"data": "after a byte order mark"}',
        b'{"data": "' + b"x" * 70000 + b'"}',
        b'{"data": [' + b"9" * 308 + b".5, " + b"1" * 309 + b".0, " + b"7" * 400 + b"]}",
        b'{"data": {"note": "1e400 in a string", "n": 2.5e-3}}',
    ],
)
def test_json_body_decodes_as_json_module(raw: bytes) -> None:
    assert repr(_decode_call_body(raw, binary=False)) == repr(json.loads(raw)["data"])


def _random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.random()
    if depth > 5 or kind < 0.5:
        leaf = rng.random()
        if leaf < 0.2:
            return rng.randint(-(10 ** rng.randint(0, 30)), 10 ** rng.randint(0, 30))
        if leaf < 0.45:
            return rng.uniform(-1e6, 1e6) * rng.choice([1, 1e-3, 1e12, 1e-12, 0])
        if leaf < 0.8:
            return "".join(
                chr(rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xD7FF), rng.randint(0x10000, 0x10FFFF)]))
                for _ in range(rng.randint(0, 8))
            )
        return rng.choice([True, False, None])
    if kind < 0.75:
        return [_random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {str(rng.random())[: rng.randint(0, 6)]: _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def test_json_bodies_match_json_module(monkeypatch: pytest.MonkeyPatch) -> None:
    # Bodies without an exponent go to pydantic_core's parser, the others to the json module's: both
    # must give what json.loads gives, types and key order included.
    parsed = []
    from_json = pydantic_core.from_json

    def counted(*args: Any, **kwargs: Any) -> Any:
        parsed.append(1)
        return from_json(*args, **kwargs)

    monkeypatch.setattr(pydantic_core, "from_json", counted)
    rng = random.Random(7)
    for _ in range(3000):
        raw = json.dumps({"data": _random_json(rng)}, ensure_ascii=rng.random() < 0.5).encode()
        assert repr(_decode_call_body(raw, binary=False)) == repr(json.loads(raw)["data"]), raw

    assert 1000 < len(parsed) < 3000  # both paths were taken


@pytest.mark.parametrize("depth", [MAX_NESTING, 2_000, 100_000])
@pytest.mark.parametrize("binary", [False, True])
def test_too_deep_body_names_limit(depth: int, binary: bool) -> None:
    # Python's recursion limit or the nesting check may stop a body first; the message is the same.
    raw = b'{"data": ' + b"[" * depth + b"]" * depth + b"}"
    if binary:
        raw = b"\x81\xa4data" + b"\x91" * depth + b"\x90"
    with pytest.raises(BadRequestError) as caught:
        _decode_call_body(raw, binary=binary)

    assert f"nested too deeply; the limit is {MAX_NESTING} levels" in str(caught.value)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"data": "\xff"}',
        b'\xef\xbb\xbf{"data": "\xff"}',
        b'\xef\xbb\xbf\xef\xbb\xbf{"data": 1}',
        b'\xef\xbb{"data": 1}',
        b'{"data": "\xed\xa0\x80"}',
    ],
)
def test_json_body_utf8_errors_match_codec(raw: bytes) -> None:
    # The body is decoded as the utf-8-sig codec decodes it, error positions included.
    try:
        json.JSONDecoder().decode(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        expected = f"a string is not UTF-8 ({exc.reason} at byte {exc.start})"
    except ValueError as exc:
        expected = str(exc)
    else:
        pytest.fail(f"{raw!r} should not decode")

    with pytest.raises(BadRequestError) as caught:
        _decode_call_body(raw, binary=False)

    assert expected in str(caught.value)


@pytest.mark.parametrize(
    ("raw", "unknown"),
    [
        (b'{"x": 1}', "['x']"),
        (b'{"data": 1, "x": 2}', "['x']"),
        (b'{"b": 1, "data": 2, "a": 3}', "['a', 'b']"),
    ],
)
def test_json_body_unknown_fields_listed(raw: bytes, unknown: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        _decode_call_body(raw, binary=False)

    assert f"unknown fields {unknown}" in str(caught.value)


@pytest.mark.parametrize(("raw", "data"), [(b"{}", None), (b'{"data": null}', None), (b'{"data": 7}', 7)])
def test_json_body_without_unknown_fields(raw: bytes, data: Any) -> None:
    assert _decode_call_body(raw, binary=False) == data


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"data": 1e400}', "out of the range of a 64-bit float"),
        (b'{"data": [1, -1.5E+999]}', "out of the range of a 64-bit float"),
        (b'{"data": 1' + b"0" * 400 + b".5}", "out of the range of a 64-bit float"),
        (b'{"data": NaN}', "NaN is not valid JSON"),
        (b'{"data": [Infinity]}', "Infinity is not valid JSON"),
        (b'{"data": "\\ud800"}', "lone surrogates"),
        (b'{"data": "\\ude00\\ud83d"}', "lone surrogates"),
        (b'{"data": {"\\udfff": 1}}', "lone surrogates"),
        (b'{"data": [1, ' + b"9" * 309 + b".0]}", "out of the range of a 64-bit float"),
        (b'{"data": 1e400, "n": "no exponent elsewhere"}', "out of the range of a 64-bit float"),
        (b'{"data": ' + b"[" * MAX_NESTING + b"]" * MAX_NESTING + b"}", "nested too deeply"),
    ],
)
def test_json_body_rejects_non_finite_and_odd(raw: bytes, reason: str) -> None:
    with pytest.raises(BadRequestError) as caught:
        _decode_call_body(raw, binary=False)
    assert reason in str(caught.value)
