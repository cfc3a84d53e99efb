"""De-duplication of retried idempotent calls by call id, on the real HTTP, NATS and AMQP transports.

Each test serves functions that count their runs from an in-process worker, and sends attempts with
a chosen ``pikku-call-id`` straight through a client transport. That makes an attempt whose reply is
lost: the caller's timeout fires while the function still runs, and the function finishes anyway.
The last test goes through the caller's router instead, with a proxy that loses the first reply.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from _support_amqp import AMQP_URL, amqp_endpoint
from _support_core import Mesh, wait_until
from pydantic import BaseModel

from pikku_mq import (
    AiohttpTransport,
    BadRequestError,
    ClientTransport,
    DeadlineExceededError,
    DeploymentConfig,
    FunctionRegistry,
    PikkuWorker,
    Reply,
    pikku_sessionless_func,
)
from pikku_mq._dispatch import Dispatcher
from pikku_mq._types import HEADER_CALL_ID, HEADER_DEADLINE, CallRequest
from pikku_mq.transports.amqp import AmqpTransport
from pikku_mq.transports.memory import MemoryTransport, serve_memory, unserve_memory
from pikku_mq.transports.nats import NatsTransport

NATS_URL = "nats://127.0.0.1:4222"

REG = FunctionRegistry()


@dataclass
class Ledger:
    """What the functions did: runs per account, and how many runs finished."""

    runs: Counter[str] = field(default_factory=Counter)
    finished: int = 0


class ChargeIn(BaseModel):
    account: str
    hold: float = 0.0
    """Seconds the function sleeps after counting its run, so a caller's timeout can fire first."""


class OverdrawnError(BadRequestError):
    code = "overdrawn"


@pikku_sessionless_func(expose=True, idempotent=True, registry=REG)
async def charge(services: Ledger, data: ChargeIn) -> dict[str, Any]:
    services.runs[data.account] += 1
    runs = services.runs[data.account]
    await asyncio.sleep(data.hold)
    services.finished += 1
    return {"account": data.account, "runs": runs}


@pikku_sessionless_func(expose=True, registry=REG)
async def charge_unsafe(services: Ledger, data: ChargeIn) -> dict[str, Any]:
    """Like ``charge``, but not declared idempotent, so every attempt runs it."""
    services.runs[data.account] += 1
    runs = services.runs[data.account]
    await asyncio.sleep(data.hold)
    services.finished += 1
    return {"account": data.account, "runs": runs}


@pikku_sessionless_func(expose=True, idempotent=True, registry=REG)
async def overdraw(services: Ledger, data: ChargeIn) -> None:
    services.runs[data.account] += 1
    await asyncio.sleep(data.hold)
    services.finished += 1
    raise OverdrawnError(f"account {data.account} is overdrawn", payload={"runs": services.runs[data.account]})


@dataclass
class Served:
    """A worker that serves ``REG`` at ``endpoint`` and a client transport that reaches it."""

    endpoint: str
    client: ClientTransport
    ledger: Ledger


def _endpoint(kind: str) -> str:
    if kind == "http":
        return "http://127.0.0.1:0"
    if kind == "nats":
        return f"nats://127.0.0.1:4222/pikku_t_dedup_{uuid.uuid4().hex[:10]}"
    return amqp_endpoint()


def _client(kind: str) -> ClientTransport:
    if kind == "http":
        return AiohttpTransport()
    if kind == "nats":
        return NatsTransport(NATS_URL)
    return AmqpTransport(url=AMQP_URL)


@pytest.fixture(params=["http", "nats", "amqp"])
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    kind: str = request.param
    if kind == "amqp":
        request.getfixturevalue("amqp_vhost")
    ledger = Ledger()
    worker = PikkuWorker(
        endpoint=_endpoint(kind),
        registry=REG,
        services=ledger,
        discovery=False,
        nats_url=NATS_URL,
        amqp_url=AMQP_URL,
        security=False,
    )
    client = _client(kind)
    await worker.start()
    try:
        assert worker.endpoint is not None
        yield Served(worker.endpoint, client, ledger)
    finally:
        await client.close()
        await worker.stop()


def attempt(name: str, data: dict[str, Any], call_id: str, budget: float = 10.0) -> CallRequest:
    """Return one attempt of a logical call with ``budget`` seconds left, as a caller's router sends it."""
    headers = {HEADER_CALL_ID: call_id, HEADER_DEADLINE: str(int(budget * 1000))}
    return CallRequest(name=name, data=data, headers=headers)


async def send(served: Served, name: str, data: dict[str, Any], call_id: str, wait: float = 10.0) -> Reply:
    """Send one attempt with a budget of 10 s, and wait ``wait`` seconds for its reply.

    A shorter wait loses the reply of a call that keeps running on the worker, as a reply lost on the
    way back would be.
    """
    return await served.client.call(served.endpoint, attempt(name, data, call_id), wait)


async def test_retry_while_running_waits(served: Served) -> None:
    call_id = uuid.uuid4().hex
    data = {"account": "a", "hold": 1.0}

    with pytest.raises(DeadlineExceededError):
        await send(served, "charge", data, call_id, wait=0.3)
    runs_when_lost = served.ledger.runs["a"]
    finished_when_lost = served.ledger.finished
    retry = await send(served, "charge", data, call_id)

    assert runs_when_lost == 1
    assert finished_when_lost == 0, "the first attempt finished before the retry was sent"
    assert retry.status == 200
    assert retry.body == {"account": "a", "runs": 1}
    assert served.ledger.runs["a"] == 1


async def test_retry_after_finish_replays(served: Served) -> None:
    call_id = uuid.uuid4().hex
    data = {"account": "b", "hold": 0.6}

    with pytest.raises(DeadlineExceededError):
        await send(served, "charge", data, call_id, wait=0.2)
    await wait_until(lambda: served.ledger.finished == 1, timeout=10)
    retries = [await send(served, "charge", data, call_id) for _ in range(3)]
    other_call = await send(served, "charge", {"account": "b"}, uuid.uuid4().hex)

    assert [r.body for r in retries] == [{"account": "b", "runs": 1}] * 3
    assert served.ledger.runs["b"] == 2
    assert other_call.body == {"account": "b", "runs": 2}


async def test_non_idempotent_retry_runs_again(served: Served) -> None:
    call_id = uuid.uuid4().hex
    data = {"account": "c", "hold": 0.5}

    with pytest.raises(DeadlineExceededError):
        await send(served, "charge_unsafe", data, call_id, wait=0.2)
    retry = await send(served, "charge_unsafe", data, call_id)

    assert retry.body == {"account": "c", "runs": 2}
    assert served.ledger.runs["c"] == 2


async def test_typed_error_replayed(served: Served) -> None:
    call_id = uuid.uuid4().hex
    data = {"account": "d", "hold": 0.5}

    with pytest.raises(DeadlineExceededError):
        await send(served, "overdraw", data, call_id, wait=0.2)
    await wait_until(lambda: served.ledger.finished == 1, timeout=10)
    first, second = [await send(served, "overdraw", data, call_id) for _ in range(2)]

    assert first.status == 400
    assert first.body["name"] == "OverdrawnError"
    assert first.body["payload"] == {"runs": 1}
    assert second.body == first.body
    assert served.ledger.runs["d"] == 1


async def test_reused_call_id_other_data_rejected(served: Served) -> None:
    call_id = uuid.uuid4().hex

    first = await send(served, "charge", {"account": "e"}, call_id)
    reused = await send(served, "charge", {"account": "f"}, call_id)

    assert first.body == {"account": "e", "runs": 1}
    assert reused.status == 400
    assert reused.body["name"] == "BadRequestError"
    assert call_id in reused.body["message"]
    assert served.ledger.runs == Counter({"e": 1})


# -- limits, on the in-memory transport ----------------------------------------------------------


@pytest.fixture
async def memory_dispatcher() -> AsyncIterator[tuple[str, Dispatcher, Ledger]]:
    """A dispatcher that keeps at most 3 replies for 0.5 s, served at a memory:// endpoint."""
    ledger = Ledger()
    dispatcher = Dispatcher(REG, services=ledger, dedup_window=0.5, dedup_max_entries=3)
    endpoint = f"memory://dedup-{uuid.uuid4().hex[:8]}"
    serve_memory(endpoint, dispatcher)
    yield endpoint, dispatcher, ledger
    unserve_memory(endpoint)


async def test_records_capped_oldest_dropped(memory_dispatcher: tuple[str, Dispatcher, Ledger]) -> None:
    endpoint, dispatcher, ledger = memory_dispatcher
    client = MemoryTransport()
    ids = [uuid.uuid4().hex for _ in range(4)]

    for call_id in ids:
        await client.call(endpoint, attempt("charge", {"account": "g"}, call_id), 10)
    newest = await client.call(endpoint, attempt("charge", {"account": "g"}, ids[-1]), 10)
    oldest = await client.call(endpoint, attempt("charge", {"account": "g"}, ids[0]), 10)

    assert dispatcher.records is not None
    assert len(dispatcher.records) == 3
    assert newest.body == {"account": "g", "runs": 4}
    assert oldest.body == {"account": "g", "runs": 5}, "the oldest record should have been dropped"
    assert ledger.runs["g"] == 5


async def test_records_expire_after_window(memory_dispatcher: tuple[str, Dispatcher, Ledger]) -> None:
    endpoint, _, ledger = memory_dispatcher
    client = MemoryTransport()
    call_id = uuid.uuid4().hex

    first = await client.call(endpoint, attempt("charge", {"account": "h"}, call_id), 10)
    within = await client.call(endpoint, attempt("charge", {"account": "h"}, call_id), 10)
    await asyncio.sleep(0.7)
    after = await client.call(endpoint, attempt("charge", {"account": "h"}, call_id), 10)

    assert first.body == within.body == {"account": "h", "runs": 1}
    assert after.body == {"account": "h", "runs": 2}
    assert ledger.runs["h"] == 2


async def test_records_expire_after_dropping_for_room() -> None:
    """Records dropped for room leave the expiry bound behind. The records left still expire on time."""
    from pikku_mq._dedup import CallRecords
    from pikku_mq._dispatch import Outcome

    records = CallRecords(window=0.3, max_entries=2)
    outcome = Outcome(encoded=b"{}")
    for call_id in ("a", "b", "c"):
        records.settle(records.claim(("f", call_id), b"fp"), outcome)
    await asyncio.sleep(0.15)
    records.settle(records.claim(("f", "d"), b"fp"), outcome)

    first_dropped, second_dropped = records.find(("f", "a"), b"fp"), records.find(("f", "b"), b"fp")
    await asyncio.sleep(0.2)  # b and c are past the window, d is not
    expired, fresh = records.find(("f", "c"), b"fp"), records.find(("f", "d"), b"fp")

    assert first_dropped is None
    assert second_dropped is None, "b was dropped for room when d came"
    assert expired is None
    assert fresh is outcome
    assert len(records) == 1
    assert records.size == 200 + len(b"fp") + len(b"{}")


def test_fingerprint_keeps_small_data_and_digests_large() -> None:
    from pikku_mq._dedup import fingerprint

    small = fingerprint({"a": 1}, None)
    medium = fingerprint({"a": "x" * 500}, None)
    large = fingerprint({"a": "x" * 5000}, None)

    assert small == b'[{"a":1},null]'
    assert fingerprint({"a": 2}, None) != small
    assert fingerprint({"a": 1}, {"user": "u"}) != small
    assert len(medium) == 16
    assert len(large) == 32
    assert fingerprint({"a": "x" * 500}, None) == medium
    assert fingerprint({"a": "x" * 500 + "y"}, None) != medium


async def test_dedup_window_zero_turns_off() -> None:
    ledger = Ledger()
    dispatcher = Dispatcher(REG, services=ledger, dedup_window=0)
    headers = {HEADER_CALL_ID: "same-id"}

    outcomes = [await dispatcher.handle("charge", {"account": "i"}, headers) for _ in range(2)]

    assert dispatcher.records is None
    assert [o.result for o in outcomes] == [{"account": "i", "runs": 1}, {"account": "i", "runs": 2}]


async def test_call_id_too_long_rejected() -> None:
    dispatcher = Dispatcher(REG, services=Ledger())

    outcome = await dispatcher.handle("charge", {"account": "j"}, {HEADER_CALL_ID: "x" * 201})

    assert isinstance(outcome.error, BadRequestError)
    assert "at most 200 characters" in outcome.error.message


async def test_retry_deadline_shorter_than_first_run() -> None:
    ledger = Ledger()
    dispatcher = Dispatcher(REG, services=ledger)
    headers = {HEADER_CALL_ID: uuid.uuid4().hex, HEADER_DEADLINE: "5000"}
    retry_headers = {**headers, HEADER_DEADLINE: "200"}

    first = asyncio.create_task(dispatcher.handle("charge", {"account": "k", "hold": 1.0}, headers))
    await wait_until(lambda: ledger.runs["k"] == 1, timeout=5)
    retry = await dispatcher.handle("charge", {"account": "k", "hold": 1.0}, retry_headers)
    first_outcome = await first

    assert isinstance(retry.error, DeadlineExceededError)
    assert "still running" in retry.error.message
    assert first_outcome.encode_python() == (200, {"account": "k", "runs": 1})
    assert ledger.runs["k"] == 1


async def test_claim_future_made_lazily() -> None:
    """A claim makes its future only for an attempt that waits, and gives a late one the outcome at once."""
    from pikku_mq._dedup import Claim
    from pikku_mq._dispatch import Outcome

    early, late, cancelled = (Claim(("charge", call_id), b"digest") for call_id in ("a", "b", "c"))
    waiting = early.future
    outcome = Outcome(result={"runs": 1})

    early.settle(outcome)
    late.settle(outcome)
    late.settle(Outcome(result={"runs": 2}))  # only the first settling counts
    cancelled.settle(None)

    assert waiting.done()
    assert waiting.result() is outcome
    assert early.future is waiting
    assert late.future.result() is outcome
    assert cancelled.future.cancelled()


async def test_retries_while_running_share_outcome() -> None:
    ledger = Ledger()
    dispatcher = Dispatcher(REG, services=ledger)
    headers = {HEADER_CALL_ID: uuid.uuid4().hex}

    data = {"account": "m", "hold": 0.2}
    first = asyncio.create_task(dispatcher.handle("charge", data, headers))
    await wait_until(lambda: ledger.runs["m"] == 1, timeout=5)
    retries = [asyncio.create_task(dispatcher.handle("charge", data, headers)) for _ in range(2)]
    outcomes = [await first, *[await retry for retry in retries]]

    assert [outcome.encode_python() for outcome in outcomes] == [(200, {"account": "m", "runs": 1})] * 3
    assert ledger.runs["m"] == 1


# -- through the router, with a reply lost on the way back ---------------------------------------


class ReplyDroppingProxy:
    """A TCP proxy in front of an HTTP worker that loses the first ``drops`` replies.

    Each request goes to the worker, so the function runs. For a dropped reply the proxy reads the
    worker's whole response, then closes the caller's connection without sending it: the reply of a
    call that ran is lost on the way back.
    """

    def __init__(self, target: str, drops: int) -> None:
        self.target = urlsplit(target)
        self.drops = drops
        self.call_ids: list[str] = []
        self._server: asyncio.Server | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aenter__(self) -> ReplyDroppingProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        assert self.target.hostname is not None
        worker_reader, worker_writer = await asyncio.open_connection(self.target.hostname, self.target.port)
        try:
            while True:
                request = await _read_message(client_reader)
                if request is None:
                    return
                self.call_ids.append(_header(request, HEADER_CALL_ID))
                worker_writer.write(request)
                await worker_writer.drain()
                response = await _read_message(worker_reader)
                if response is None:
                    return
                if self.drops > 0:
                    self.drops -= 1
                    return
                client_writer.write(response)
                await client_writer.drain()
        finally:
            worker_writer.close()
            client_writer.close()


async def _read_message(reader: asyncio.StreamReader) -> bytes | None:
    """Read one HTTP/1.1 message with a content-length body, or return None at the end of the stream."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    length = int(_header(head, "content-length") or "0")
    return head + await reader.readexactly(length)


def _header(message: bytes, name: str) -> str:
    for line in message.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return ""


async def test_router_retry_after_lost_reply_runs_once() -> None:
    ledger = Ledger()
    worker = PikkuWorker(registry=REG, services=ledger, discovery=False, security=False)
    async with worker, Mesh() as mesh:
        assert worker.endpoint is not None
        async with ReplyDroppingProxy(worker.endpoint, drops=1) as proxy:
            registration = mesh.service()
            await registration.start(DeploymentConfig("proxied", proxy.endpoint, functions=["charge"]))
            caller = mesh.service(security=False)
            result = await caller.invoke("charge", {"account": "m"}, timeout=10, idempotent=True)

    assert result == {"account": "m", "runs": 1}
    assert ledger.runs["m"] == 1
    assert len(proxy.call_ids) == 2, "the router did not retry after the lost reply"
    assert proxy.call_ids[0] == proxy.call_ids[1] != ""
