"""Signed calls on every transport: sessions arrive, and a worker with a secret fails closed.

Each test runs real workers on the transport under test (see ``ENDPOINTS`` in test_transports) with a
secret of the test's own. Requests that a pikku_mq caller would never produce are built by hand. They
are sent with the transport's own client class, which sends the headers it is given. The HTTP path
cases go through aiohttp with the raw path.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote

import aiohttp
import jwt
import pytest
import yarl
from _support_core import Mesh, wait_until
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from pikku_mq import (
    RPC,
    ClientTransport,
    ConfigurationError,
    FunctionRegistry,
    MissingSessionError,
    PikkuMetrics,
    PikkuWorker,
    RemoteSecurity,
    Reply,
    UnauthorizedError,
    Wire,
    pikku_func,
    pikku_sessionless_func,
)
from pikku_mq._security import data_digest
from pikku_mq._types import CallRequest

from .test_transports import ENDPOINTS

SESSION = {"userId": "session-user-5521", "roles": ["auditor"], "note": "grüße"}

REG = FunctionRegistry()
RUNS: list[str] = []
"""Names of the functions that ran, so a test can check that a rejected call ran nothing."""


@pikku_func(expose=True, registry=REG)
async def whoami(services: Any, data: Any, wire: Wire) -> Any:
    RUNS.append("whoami")
    return wire.session


@pikku_sessionless_func(expose=True, registry=REG)
async def record(services: Any, data: Any, wire: Wire) -> dict[str, Any]:
    RUNS.append("record")
    return {"data": data, "session": wire.session}


@pikku_func(expose=True, registry=REG)
async def session_keys(services: Any, data: Any, wire: Wire) -> list[str]:
    """Says which session arrived without sending its values back, which a broker's debug log would show."""
    RUNS.append("session_keys")
    return sorted(wire.session)


# forward and where are idempotent, and the rotation test calls them so, because a stopping HTTP worker
# can reset a keep-alive connection under a call in transit. That race belongs to HTTP draining, not to
# the secrets, and the retry keeps it out of the count of failed calls.
@pikku_sessionless_func(expose=True, idempotent=True, registry=REG)
async def forward(services: Any, data: str | None, wire: Wire) -> Any:
    RUNS.append("forward")
    return await wire.rpc.remote(data or "whoami", None)


@pikku_sessionless_func(expose=True, idempotent=True, registry=REG)
async def where(services: Any, data: Any) -> str:
    return str(services)


def _secret() -> str:
    return f"contract-secret-{uuid.uuid4().hex}"


@pytest.fixture(params=sorted(ENDPOINTS))
def transport(request: pytest.FixtureRequest) -> str:
    if request.param == "amqp":
        request.getfixturevalue("amqp_vhost")
    return str(request.param)


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    RUNS.clear()
    async with Mesh() as shared:
        yield shared


def make_worker(
    mesh: Mesh,
    transport: str,
    security: RemoteSecurity | None,
    deployment_id: str = "s-1",
    functions: Iterable[str] | None = None,
) -> PikkuWorker:
    return PikkuWorker(
        registry=REG,
        endpoint=ENDPOINTS[transport](),
        deployment_id=deployment_id,
        services=deployment_id,
        deployment_service=mesh.service(security=False),
        functions=functions,
        security=security if security is not None else False,
    )


async def raw_call(
    mesh: Mesh, worker: PikkuWorker, name: str, data: Any, headers: dict[str, str]
) -> tuple[Reply, CallRequest]:
    """Send one call exactly as given, with the transport's client class and no router."""
    assert worker.endpoint is not None
    client = mesh.service(security=False).router.transports.for_endpoint(worker.endpoint)
    assert client is not None
    request = CallRequest(name=name, data=data, headers={"pikku-deadline-ms": "5000", **headers})
    return await client.call(worker.endpoint, request, 5.0), request


def _assert_unauthorized(reply: Reply) -> None:
    assert reply.status == 401, reply
    assert reply.body["name"] == "UnauthorizedError"
    assert reply.body["code"] == "unauthorized"
    assert not reply.rejected, "an auth failure must not invite the caller to try another instance"
    assert RUNS == [], "nothing may run for a rejected call"


# -- sessions arrive -------------------------------------------------------------------------------


async def test_session_arrives(mesh: Mesh, transport: str) -> None:
    secret = _secret()
    caller = mesh.service(security=RemoteSecurity(secret))
    async with make_worker(mesh, transport, RemoteSecurity(secret)):
        assert await caller.invoke("whoami", None, SESSION, timeout=5) == SESSION
        assert await RPC(deployment_service=caller).remote("whoami", session=SESSION, timeout=5) == SESSION
        assert await RPC(deployment_service=caller, session=SESSION).remote("whoami", timeout=5) == SESSION
        sent = {"text": "ü✓", "n": 1.5, "list": [1, None]}
        assert await caller.invoke("record", sent, timeout=5) == {"data": sent, "session": None}


async def test_session_in_old_pikku_format_arrives(mesh: Mesh, transport: str) -> None:
    secret = _secret()
    caller = mesh.service(security=RemoteSecurity(secret, session_format="sha256"))
    async with make_worker(mesh, transport, RemoteSecurity(secret)):
        assert await caller.invoke("whoami", None, SESSION, timeout=5) == SESSION


async def test_session_through_nested_call(mesh: Mesh, transport: str) -> None:
    secret = _secret()
    caller = mesh.service(security=RemoteSecurity(secret))
    front = make_worker(mesh, transport, RemoteSecurity(secret), "front", functions=["forward"])
    back = make_worker(mesh, transport, RemoteSecurity(secret), "back", functions=["whoami"])
    async with front, back:
        assert await caller.invoke("forward", None, SESSION, timeout=5) == SESSION
    assert RUNS == ["forward", "whoami"]


async def test_session_required_by_pikku_func(mesh: Mesh, transport: str) -> None:
    secret = _secret()
    caller = mesh.service(security=RemoteSecurity(secret))
    async with make_worker(mesh, transport, RemoteSecurity(secret)):
        with pytest.raises(MissingSessionError) as missing:
            await caller.invoke("whoami", None, timeout=5)
        assert missing.value.status == 401
        assert await caller.invoke("record", 1, timeout=5) == {"data": 1, "session": None}


async def test_no_secret_sends_no_session(mesh: Mesh, transport: str) -> None:
    caller = mesh.service(security=False)
    async with make_worker(mesh, transport, None):
        assert await caller.invoke("record", 1, SESSION, timeout=5) == {"data": 1, "session": None}


async def test_unsigned_caller_does_not_fail_over(mesh: Mesh, transport: str) -> None:
    secret = _secret()
    caller = mesh.service(security=False)
    counting = _CountingTransport(caller.router.transports.for_endpoint(ENDPOINTS[transport]()))
    caller.router.transports.replace(counting)
    async with (
        make_worker(mesh, transport, RemoteSecurity(secret), "s-1"),
        make_worker(mesh, transport, RemoteSecurity(secret), "s-2"),
    ):
        with pytest.raises(UnauthorizedError) as rejected:
            await caller.invoke("record", 1, SESSION, timeout=5)
    assert rejected.value.status == 401
    assert counting.attempts == 1
    assert RUNS == []


class _CountingTransport(ClientTransport):
    schemes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, inner: ClientTransport | None) -> None:
        assert inner is not None
        self.inner = inner
        self.schemes = inner.schemes  # type: ignore[misc]
        self.attempts = 0

    async def call(self, endpoint: str, request: CallRequest, timeout: float) -> Reply:
        self.attempts += 1
        return await self.inner.call(endpoint, request, timeout)

    async def close(self) -> None:
        await self.inner.close()


# -- fail closed: each rejection case on each transport ---------------------------------------------


def _claims(name: str, **changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "aud": "pikku-remote",
        "fn": name,
        "iat": now,
        "exp": now + 300,
        "jti": uuid.uuid4().hex,
    }
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(secret: str, claims: dict[str, Any]) -> str:
    return "Bearer " + jwt.encode(claims, secret.encode(), algorithm="HS256")


def _tampered_blob(security: RemoteSecurity) -> str:
    blob = security.seal_session(SESSION)
    middle = len(blob) // 2
    return blob[:middle] + ("A" if blob[middle] != "A" else "B") + blob[middle + 1 :]


Case = Callable[[str], tuple[str, Any, dict[str, str]]]
"""Given the worker's secret, return the name, data and headers of a call the worker must reject."""

CASES: dict[str, Case] = {
    "no_token": lambda secret: ("record", 1, {}),
    "basic_scheme": lambda secret: ("record", 1, {"authorization": "Basic " + _sign(secret, _claims("record"))[7:]}),
    "token_without_scheme": lambda secret: ("record", 1, {"authorization": _sign(secret, _claims("record"))[7:]}),
    "empty_token": lambda secret: ("record", 1, {"authorization": "Bearer "}),
    "bad_signature": lambda secret: (
        "record",
        1,
        {"authorization": _sign(secret, _claims("record"))[:-4] + "AAAA"},
    ),
    "other_secret": lambda secret: ("record", 1, {"authorization": _sign(_secret(), _claims("record"))}),
    "expired": lambda secret: (
        "record",
        1,
        {"authorization": _sign(secret, _claims("record", iat=int(time.time()) - 400, exp=int(time.time()) - 100))},
    ),
    "wrong_aud": lambda secret: ("record", 1, {"authorization": _sign(secret, _claims("record", aud="pikku-local"))}),
    "missing_aud": lambda secret: ("record", 1, {"authorization": _sign(secret, _claims("record", aud=None))}),
    "fn_other_function": lambda secret: ("record", 1, {"authorization": _sign(secret, _claims("where"))}),
    "fn_case_varied": lambda secret: ("record", 1, {"authorization": _sign(secret, _claims("Record"))}),
    "name_case_varied": lambda secret: ("RECORD", 1, {"authorization": _sign(secret, _claims("record"))}),
    "fn_percent_encoded": lambda secret: ("record", 1, {"authorization": _sign(secret, _claims("rec%6Frd"))}),
    "tampered_session": lambda secret: (
        "record",
        1,
        {"authorization": _sign(secret, _claims("record", session=_tampered_blob(RemoteSecurity(secret))))},
    ),
    "truncated_session": lambda secret: (
        "record",
        1,
        {"authorization": _sign(secret, _claims("record", session=RemoteSecurity(secret).seal_session(SESSION)[:-6]))},
    ),
    "digest_mismatch": lambda secret: (
        "record",
        {"amount": 10_000},
        {"authorization": _sign(secret, _claims("record", data_sha256=data_digest({"amount": 10})))},
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_rejected(mesh: Mesh, transport: str, case: str) -> None:
    secret = _secret()
    async with make_worker(mesh, transport, RemoteSecurity(secret)) as worker:
        name, data, headers = CASES[case](secret)
        reply, _ = await raw_call(mesh, worker, name, data, headers)
        _assert_unauthorized(reply)


async def test_rejected_replay(mesh: Mesh, transport: str) -> None:
    secret = _secret()
    security = RemoteSecurity(secret)
    async with make_worker(mesh, transport, RemoteSecurity(secret)) as worker:
        header = security.signer("record", {"n": 1}, SESSION)()
        first, _ = await raw_call(mesh, worker, "record", {"n": 1}, {"authorization": header})
        assert first.status == 200
        assert first.body == {"data": {"n": 1}, "session": SESSION}
        RUNS.clear()
        again, _ = await raw_call(mesh, worker, "record", {"n": 1}, {"authorization": header})
        _assert_unauthorized(again)
        assert "already used" in again.body["message"]


async def test_signed_raw_call_accepted(mesh: Mesh, transport: str) -> None:
    """The hand-built calls above fail for their one defect, not for the way they are sent."""
    secret = _secret()
    async with make_worker(mesh, transport, RemoteSecurity(secret)) as worker:
        claims = _claims("record", data_sha256=data_digest(1), session=RemoteSecurity(secret).seal_session(SESSION))
        reply, _ = await raw_call(mesh, worker, "record", 1, {"authorization": _sign(secret, claims)})
        assert reply.status == 200
        assert reply.body == {"data": 1, "session": SESSION}
        # A token from Pikku has no jti and no digest, and is accepted.
        pikku = _claims("record", jti=None)
        reply, _ = await raw_call(mesh, worker, "record", 2, {"authorization": _sign(secret, pikku)})
        assert reply.status == 200


@pytest.mark.parametrize(
    ("path", "fn", "accepted"),
    [
        ("record", "record", True),
        ("rec%6Frd", "record", True),  # the same name, encoded: decoded before comparing
        ("RECORD", "record", False),
        ("Record", "Record", False),  # signed for the name sent, but no such function: 404 after the check
        ("rec%6Frd", "rec%6Frd", False),
        ("rec%256Frd", "record", False),
        ("rec%256Frd", "rec%6Frd", False),  # double-encoded: the name is rec%6Frd (404), not record
        ("record%20", "record", False),
        ("record%2F", "record", False),
    ],
)
async def test_http_path_must_match_fn(mesh: Mesh, path: str, fn: str, accepted: bool) -> None:
    secret = _secret()
    async with make_worker(mesh, "http", RemoteSecurity(secret)) as worker:
        assert worker.endpoint is not None
        url = yarl.URL(f"{worker.endpoint}/remote/rpc/{path}", encoded=True)
        headers = {"authorization": _sign(secret, _claims(fn)), "content-type": "application/json"}
        async with aiohttp.ClientSession() as client, client.post(url, data=b'{"data": 1}', headers=headers) as reply:
            body = await reply.json()
    if accepted:
        assert reply.status == 200
        assert RUNS == ["record"]
    else:
        assert reply.status in (401, 404), body
        # Only a token for exactly the decoded name passes the check, and then no such function exists.
        assert reply.status == 401 or (fn == unquote(path) and body["name"] == "FunctionNotFoundError")
        assert RUNS == []


# -- key rotation ----------------------------------------------------------------------------------


async def test_key_rotation_without_failed_calls(mesh: Mesh, transport: str) -> None:
    old, new = _secret(), _secret()
    caller = mesh.service(security=RemoteSecurity(old), routing_cache_ttl=0.2)
    results: list[str] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()

    async def keep_calling() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                results.append(await caller.invoke("where", None, timeout=5, idempotent=True))
                # A nested call, signed by the worker with its own current secret.
                results.append(await caller.invoke("forward", "where", timeout=5, idempotent=True))
            except Exception as exc:
                failures.append(exc)
            await asyncio.sleep(0.005)

    async def calls_continue() -> None:
        seen, settled = len(results), time.monotonic() + 0.5
        await wait_until(lambda: len(results) >= seen + 20 and time.monotonic() > settled, timeout=10)

    def worker(deployment_id: str, security: RemoteSecurity) -> PikkuWorker:
        return make_worker(mesh, transport, security, deployment_id, functions=["forward", "where"])

    workers = {"a": worker("a", RemoteSecurity(old)), "b": worker("b", RemoteSecurity(old))}
    for each in workers.values():
        await each.start()
    loop = asyncio.create_task(keep_calling())

    generations = iter(range(1, 100))

    async def restart_each(security: Callable[[], RemoteSecurity]) -> None:
        # Each restart is a new process with a new deployment id, as PikkuWorker's default id is.
        for slot in ("a", "b"):
            await workers[slot].stop()
            workers[slot] = worker(f"{slot}-{next(generations)}", security())
            await workers[slot].start()
            await calls_continue()

    try:
        await calls_continue()
        # Step 1: every worker accepts the new secret too, and still signs with the old one.
        await restart_each(lambda: RemoteSecurity(old, previous=new))
        # Step 2: the caller, then each worker, signs with the new secret and accepts both.
        caller.security = RemoteSecurity(new)
        await calls_continue()
        await restart_each(lambda: RemoteSecurity(new, previous=old))
        # Step 3: each worker drops the old secret.
        await restart_each(lambda: RemoteSecurity(new))
        # The old secret no longer opens anything.
        with pytest.raises(UnauthorizedError):
            await mesh.service(security=RemoteSecurity(old)).invoke("where", None, timeout=5)
    finally:
        stop.set()
        await loop
        for each in workers.values():
            await each.stop()
    assert [f for f in failures if isinstance(f, UnauthorizedError)] == [], "rotation made calls fail"
    assert failures == []
    assert {result.split("-")[0] for result in results} == {"a", "b"}


# -- configuration and logs ------------------------------------------------------------------------


def test_short_secret_stops_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    short = "q" * 31
    monkeypatch.setenv("PIKKU_REMOTE_SECRET", short)
    with pytest.raises(ConfigurationError) as caught:
        PikkuWorker(registry=REG, endpoint="memory://short-secret", discovery=False)
    message = str(caught.value)
    assert "PIKKU_REMOTE_SECRET" in message
    assert "32" in message
    assert short not in message
    assert "q" * 8 not in message


def test_short_secret_stops_worker_process(tmp_path: Path) -> None:
    short = "w" * 31
    env = {**os.environ, "PIKKU_REMOTE_SECRET": short, "PIKKU_DISCOVERY_URL": f"sqlite:///{tmp_path / 'r.db'}"}
    command = [sys.executable, "-m", "pikku_mq", "worker", "pikku_mq.demo.greeter", "--endpoint", "http://127.0.0.1:0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
    assert "PIKKU_REMOTE_SECRET" in done.stderr
    assert "32" in done.stderr
    assert short not in done.stderr + done.stdout
    assert not (tmp_path / "r.db").exists() or "registered" not in done.stderr


async def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch, mesh: Mesh, transport: str) -> None:
    secret = _secret()
    monkeypatch.setenv("PIKKU_REMOTE_SECRET", secret)
    caller = mesh.service()
    worker = PikkuWorker(
        registry=REG, endpoint=ENDPOINTS[transport](), deployment_id="env", deployment_service=mesh.service()
    )
    async with worker:
        assert await caller.invoke("whoami", None, SESSION, timeout=5) == SESSION
        RUNS.clear()
        reply, _ = await raw_call(mesh, worker, "record", 1, {})
        _assert_unauthorized(reply)


async def test_logs_hide_secret_and_session(
    mesh: Mesh, transport: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = _secret()
    monkeypatch.setenv("PIKKU_REMOTE_SECRET", secret)
    caplog.set_level(logging.DEBUG)
    # With tracing and metrics on, so that their records, span attributes and samples are scanned too.
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    metrics = PikkuMetrics(CollectorRegistry())
    observed = {"tracing": provider, "metrics": metrics}
    caller = mesh.service(**observed)
    messages: list[str] = []
    front = PikkuWorker(
        registry=REG,
        endpoint=ENDPOINTS[transport](),
        deployment_id="front",
        deployment_service=mesh.service(**observed),
        functions=["forward", "record"],
        **observed,
    )
    back = PikkuWorker(
        registry=REG,
        endpoint=ENDPOINTS[transport](),
        deployment_id="back",
        deployment_service=mesh.service(**observed),
        functions=["session_keys", "whoami"],
        **observed,
    )
    async with front, back:
        keys = ["note", "roles", "userId"]
        assert await caller.invoke("forward", "session_keys", SESSION, timeout=5) == keys
        assert await caller.invoke("session_keys", {"x": 1}, SESSION, timeout=5) == keys
        for case in ("bad_signature", "tampered_session", "digest_mismatch", "fn_case_varied", "expired"):
            name, data, headers = CASES[case](secret)
            reply, _ = await raw_call(mesh, front, name, data, headers)
            assert reply.status == 401
            messages.append(reply.body["message"])
        for failing in (caller.invoke("whoami", None, timeout=5), mesh.service(security=False).invoke("record", 1)):
            with pytest.raises(UnauthorizedError) as caught:
                await failing
            messages.append(str(caught.value))
            messages.append(repr(caught.value))
    messages.extend([repr(front), repr(front.security), repr(caller), repr(caller.security)])
    spans = exporter.get_finished_spans()
    assert spans
    messages.extend(span.to_json() for span in spans)
    messages.append(metrics.render()[0].decode())

    logged = caplog.text + "\n".join(repr(record.__dict__) for record in caplog.records)
    assert "rejected a call" in logged  # the rejections are logged, without what they carried
    for text in (logged, "\n".join(messages)):
        assert secret not in text
        for value in ("session-user-5521", "auditor", "grüße"):
            assert value not in text


async def test_amqp_debug_log_hides_token(mesh: Mesh, amqp_vhost: str, caplog: pytest.LogCaptureFixture) -> None:
    # aiormq logs every frame it sends at DEBUG, with the call's authorization header in it.
    caplog.set_level(logging.DEBUG, logger="aiormq")
    secret = _secret()
    caller = mesh.service(security=RemoteSecurity(secret))
    async with make_worker(mesh, "amqp", RemoteSecurity(secret)):
        assert await caller.invoke("whoami", None, SESSION, timeout=5) == SESSION

    frames = [r.getMessage() for r in caplog.records if r.name.startswith("aiormq")]
    assert any("Bearer ***" in message for message in frames), "no frame with the header was logged"
    assert not [message for message in frames if "Bearer ey" in message]
