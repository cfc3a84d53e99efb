"""RPC semantics: invoke, remote and exposed, typed errors across the wire, deadlines and the hop limit."""

import ast
import asyncio
import collections
import datetime
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from _support_core import Mesh

import pikku_mq
from pikku_mq import (
    RPC,
    AiohttpTransport,
    ConfigurationError,
    DeadlineExceededError,
    ForbiddenError,
    FunctionNotFoundError,
    FunctionRegistry,
    InternalServerError,
    LoopDetectedError,
    MissingSessionError,
    PikkuMQError,
    PikkuWorker,
    RemoteError,
    Wire,
    pikku_func,
    pikku_sessionless_func,
)
from pikku_mq import _errors as errors_module
from pikku_mq._types import MAX_HOPS, CallRequest

REG = FunctionRegistry()
"""Functions the worker serves (and that a local caller may also have)."""

LOCAL_REG = FunctionRegistry()
"""Functions only a local caller has."""

RUNS: collections.Counter[str] = collections.Counter()
"""How many times each function started, across local and remote runs."""


class RpcQuotaExceededError(PikkuMQError):
    status = 429
    code = "quota_exceeded"
    retryable = True


class RpcVanishingError(PikkuMQError):
    """An error class that a test unregisters, so the caller has no class registered under its name."""

    status = 418
    code = "vanishing"


@pikku_sessionless_func(expose=True, registry=REG)
async def where(services: Any) -> str:
    RUNS["where"] += 1
    return str(services)


@pikku_sessionless_func(registry=REG)
async def secret(services: Any) -> str:
    RUNS["secret"] += 1
    return "hidden"


@pikku_sessionless_func(expose=True, name="relay", registry=REG)
async def remote_relay(services: Any) -> str:
    RUNS["remote_relay"] += 1
    return "remote relay"


@pikku_sessionless_func(expose=True, name="relay", registry=LOCAL_REG)
async def local_relay(services: Any, data: Any, wire: Wire) -> Any:
    RUNS["local_relay"] += 1
    return await wire.rpc.invoke("absent_function")


@pikku_sessionless_func(expose=True, registry=LOCAL_REG)
async def local_value_error(services: Any) -> None:
    raise ValueError("broken locally")


@pikku_sessionless_func(expose=True, registry=REG)
async def raise_forbidden(services: Any) -> None:
    raise ForbiddenError("not yours", payload={"owner": "ada"})


@pikku_sessionless_func(expose=True, registry=REG)
async def raise_quota(services: Any) -> None:
    raise RpcQuotaExceededError("quota of 5 calls exceeded", payload={"limit": 5, "window_s": 60})


@pikku_sessionless_func(expose=True, registry=REG)
async def raise_vanishing(services: Any) -> None:
    raise RpcVanishingError("gone missing", payload=["a", 1])


@pikku_sessionless_func(expose=True, registry=REG)
async def raise_value_error(services: Any) -> None:
    raise ValueError("internal detail that must not leak")


@pikku_sessionless_func(expose=True, registry=REG)
async def raise_dated(services: Any) -> None:
    raise ForbiddenError("expired", payload={"at": datetime.datetime(2024, 5, 1, 12, 0, tzinfo=datetime.UTC)})


@pikku_func(expose=True, registry=REG)
async def needs_session(services: Any, data: Any, wire: Wire) -> Any:
    return wire.session


@pikku_sessionless_func(expose=True, registry=REG)
async def remaining(services: Any, data: Any, wire: Wire) -> float | None:
    return wire.remaining


@pikku_sessionless_func(expose=True, registry=REG)
async def hop_of(services: Any, data: Any, wire: Wire) -> int:
    return wire.hop


@pikku_sessionless_func(expose=True, registry=REG)
async def forward(services: Any, data: str, wire: Wire) -> Any:
    return await wire.rpc.remote(data)


@pikku_sessionless_func(expose=True, registry=REG)
async def recurse(services: Any, data: Any, wire: Wire) -> Any:
    RUNS["recurse"] += 1
    return await wire.rpc.remote("recurse")


@pikku_sessionless_func(expose=True, registry=REG)
async def slow(services: Any, data: float) -> str:
    RUNS["slow"] += 1
    await asyncio.sleep(data)
    RUNS["slow_done"] += 1
    return "done"


@pytest.fixture(autouse=True)
def _reset_runs() -> Iterator[None]:
    RUNS.clear()
    yield
    RUNS.clear()


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


@pytest.fixture
async def worker(mesh: Mesh) -> AsyncIterator[PikkuWorker]:
    """An HTTP worker serving ``REG`` with ``services="worker"``, registered on the mesh."""
    async with PikkuWorker(
        endpoint="http://127.0.0.1:0", registry=REG, services="worker", deployment_service=mesh.service()
    ) as running:
        yield running


@pytest.fixture
def caller(mesh: Mesh, worker: PikkuWorker) -> RPC:
    """An RPC that has no functions of its own and reaches the worker through the mesh."""
    return RPC(registry=FunctionRegistry(), deployment_service=mesh.service())


async def _post(endpoint: str, name: str, data: Any, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    """POST one call with a plain HTTP client, and return the status, the content type and the decoded body."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{endpoint}/remote/rpc/{name}", json={"data": data}, headers=headers or {}) as response,
    ):
        return response.status, response.content_type, json.loads(await response.read())


# -- invoke, remote and exposed ---------------------------------------------------------------------------


async def test_invoke_runs_locally() -> None:
    # No deployment service and no worker: a remote attempt would raise ConfigurationError.
    rpc = RPC(registry=REG, services="local")

    assert await rpc.invoke("where") == "local"
    assert RUNS["where"] == 1


async def test_invoke_missing_goes_remote() -> None:
    with pytest.raises(ConfigurationError, match="needs a deployment service"):
        await RPC(registry=REG).invoke("not_here")


async def test_invoke_remote_when_absent(caller: RPC) -> None:
    assert await caller.invoke("where") == "worker"


async def test_remote_even_when_local(mesh: Mesh, worker: PikkuWorker) -> None:
    rpc = RPC(registry=REG, services="local", deployment_service=mesh.service())

    assert await rpc.remote("where") == "worker"
    assert await rpc.invoke("where") == "local"
    assert RUNS["where"] == 2


async def test_remote_without_service() -> None:
    with pytest.raises(ConfigurationError) as caught:
        await RPC(registry=REG).remote("where")

    message = str(caught.value)
    assert "rpc.remote('where') needs a deployment service" in message
    assert "deployment_service=" in message
    assert "PIKKU_DISCOVERY_URL" in message
    assert isinstance(caught.value, ValueError)


async def test_exposed_missing_without_service() -> None:
    with pytest.raises(FunctionNotFoundError) as hidden:
        await RPC(registry=REG).exposed("secret")
    with pytest.raises(FunctionNotFoundError) as missing:
        await RPC(registry=FunctionRegistry()).exposed("secret")

    assert str(hidden.value) == str(missing.value)


async def test_service_invoke(mesh: Mesh, worker: PikkuWorker) -> None:
    service = mesh.service()

    assert await service.invoke("where", None, session=None, trace_id="t-1", timeout=5) == "worker"


async def test_exposed_runs_exposed() -> None:
    assert await RPC(registry=REG, services="local").exposed("where") == "local"


async def test_exposed_remote_when_absent(caller: RPC) -> None:
    assert await caller.exposed("where") == "worker"


async def test_exposed_hidden_same_as_missing(mesh: Mesh) -> None:
    with pytest.raises(FunctionNotFoundError) as hidden:
        await RPC(registry=REG).exposed("secret")
    with pytest.raises(FunctionNotFoundError) as missing:
        await RPC(registry=FunctionRegistry(), deployment_service=mesh.service()).exposed("secret")

    assert type(hidden.value) is type(missing.value)
    assert str(hidden.value) == str(missing.value)
    assert hidden.value.payload == missing.value.payload
    assert hidden.value.status == missing.value.status == 404
    assert RUNS["secret"] == 0


async def test_hidden_same_over_wire(worker: PikkuWorker) -> None:
    assert worker.endpoint is not None
    async with PikkuWorker(endpoint="http://127.0.0.1:0", registry=FunctionRegistry(), discovery=False) as empty:
        assert empty.endpoint is not None
        transport = AiohttpTransport()
        try:
            hidden = await transport.call(worker.endpoint, CallRequest("secret", None), 5)
            missing = await transport.call(empty.endpoint, CallRequest("secret", None), 5)
        finally:
            await transport.close()

    assert hidden.status == missing.status == 404
    assert {**hidden.body, "errorId": None} == {**missing.body, "errorId": None}
    assert RUNS["secret"] == 0


async def test_hidden_not_registered(mesh: Mesh, worker: PikkuWorker) -> None:
    assert await mesh.service().find_function("secret") == []
    assert [i.deployment_id for i in await mesh.service().find_function("where")] == [worker.deployment_id]


async def test_inner_not_found_not_resent(mesh: Mesh, worker: PikkuWorker) -> None:
    rpc = RPC(registry=LOCAL_REG, deployment_service=mesh.service())

    with pytest.raises(FunctionNotFoundError, match="'absent_function'"):
        await rpc.invoke("relay")

    assert RUNS["local_relay"] == 1
    assert RUNS["remote_relay"] == 0


async def test_inner_error_not_resent(mesh: Mesh, worker: PikkuWorker) -> None:
    rpc = RPC(registry=LOCAL_REG, deployment_service=mesh.service())

    with pytest.raises(ValueError, match="broken locally"):
        await rpc.invoke("local_value_error")
    with pytest.raises(ValueError, match="broken locally"):
        await rpc.exposed("local_value_error")


async def test_relay_reachable_remotely(mesh: Mesh, worker: PikkuWorker) -> None:
    # The same name is served remotely, so the test above would have seen a re-sent call.
    assert await RPC(registry=LOCAL_REG, deployment_service=mesh.service()).remote("relay") == "remote relay"
    assert RUNS["remote_relay"] == 1


async def test_session_not_forwarded(mesh: Mesh, worker: PikkuWorker) -> None:
    # Without a remote secret a session cannot travel, so an auth function rejects the call.
    rpc = RPC(registry=FunctionRegistry(), deployment_service=mesh.service(), session={"user": "ada"})

    with pytest.raises(MissingSessionError) as caught:
        await rpc.remote("needs_session")

    assert caught.value.status == 401


# -- errors across the wire -------------------------------------------------------------------------


async def test_registered_error_reraised(caller: RPC) -> None:
    with pytest.raises(ForbiddenError) as caught:
        await caller.remote("raise_forbidden")

    assert type(caught.value) is ForbiddenError
    assert caught.value.message == "not yours"
    assert caught.value.payload == {"owner": "ada"}
    assert caught.value.status == 403


async def test_user_error_reraised(caller: RPC) -> None:
    with pytest.raises(RpcQuotaExceededError) as caught:
        await caller.remote("raise_quota")

    assert type(caught.value) is RpcQuotaExceededError
    assert str(caught.value) == "quota of 5 calls exceeded"
    assert caught.value.payload == {"limit": 5, "window_s": 60}
    assert caught.value.status == 429
    assert caught.value.retryable is True


async def test_unknown_error_is_remote(caller: RPC, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(errors_module._REGISTRY, "RpcVanishingError")

    with pytest.raises(RemoteError) as caught:
        await caller.remote("raise_vanishing")

    error = caught.value
    assert error.name == "RpcVanishingError"
    assert error.message == "gone missing"
    assert error.payload == ["a", 1]
    assert error.remote_status == 418
    assert error.remote_code == "vanishing"
    assert str(error) == "RpcVanishingError: gone missing"
    assert error.to_envelope()["name"] == "RpcVanishingError"


async def test_error_two_hops(caller: RPC) -> None:
    # The worker calls itself and does not catch: the typed error crosses both hops.
    with pytest.raises(RpcQuotaExceededError) as caught:
        await caller.remote("forward", "raise_quota")

    assert caught.value.payload == {"limit": 5, "window_s": 60}


async def test_unexpected_error_hidden(caller: RPC) -> None:
    with pytest.raises(InternalServerError) as caught:
        await caller.remote("raise_value_error")

    assert type(caught.value) is InternalServerError
    assert "ValueError" in caught.value.message
    assert "internal detail" not in caught.value.message


async def test_error_payload_not_json(caller: RPC) -> None:
    with pytest.raises(ForbiddenError) as caught:
        await caller.remote("raise_dated")

    assert caught.value.message == "expired"
    assert caught.value.payload == {"at": "2024-05-01T12:00:00Z"}


async def test_error_envelope_is_json(worker: PikkuWorker) -> None:
    assert worker.endpoint is not None

    status, content_type, body = await _post(worker.endpoint, "raise_quota", None)

    assert status == 429
    assert content_type == "application/json"
    assert set(body) == {"name", "message", "payload", "errorId", "code", "retryable"}
    assert body["name"] == "RpcQuotaExceededError"
    assert body["code"] == "quota_exceeded"
    assert body["retryable"] is True
    assert body["payload"] == {"limit": 5, "window_s": 60}


def test_no_pickle_in_package() -> None:
    unsafe = {"pickle", "cloudpickle", "dill", "marshal", "shelve"}
    imports: list[str] = []
    for path in Path(pikku_mq.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                imports += [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imports.append(node.module.split(".")[0])

    assert "pydantic_core" in imports
    assert unsafe.isdisjoint(imports)


# -- deadlines ----------------------------------------------------------------------------------------


async def test_default_deadline_travels(caller: RPC) -> None:
    left = await caller.remote("remaining")

    assert 25.0 < left <= 30.0


async def test_timeout_deadline_travels(caller: RPC) -> None:
    left = await caller.remote("remaining", timeout=2.0)

    assert 1.0 < left < 2.0


async def test_huge_timeout_capped_in_header(caller: RPC) -> None:
    left = await caller.remote("remaining", timeout=1e15)

    assert 1e14 < left <= 1e15


async def test_deadline_travels_nested(caller: RPC) -> None:
    left = await caller.remote("forward", "remaining", timeout=2.0)

    assert 1.0 < left < 2.0


async def test_local_call_no_deadline() -> None:
    assert await RPC(registry=REG).invoke("remaining") is None


async def test_slow_remote_times_out(caller: RPC) -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as caught:
        await caller.remote("slow", 1.5, timeout=0.3)
    elapsed = time.monotonic() - started

    assert isinstance(caught.value, TimeoutError)
    assert 0.25 < elapsed < 1.2
    assert RUNS["slow"] == 1

    # The worker cancels the function at the deadline instead of letting it finish.
    await asyncio.sleep(started + 1.8 - time.monotonic())
    assert RUNS["slow_done"] == 0


async def test_slow_local_times_out() -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError, match="'slow' did not finish"):
        await RPC(registry=REG).invoke("slow", 5.0, timeout=0.2)

    assert time.monotonic() - started < 1.0
    assert RUNS["slow_done"] == 0


@pytest.mark.parametrize("timeout", [0.0, -1.0])
async def test_timeout_must_be_positive(caller: RPC, timeout: float) -> None:
    with pytest.raises(ValueError, match="timeout must be a positive, finite number"):
        await caller.remote("where", timeout=timeout)


async def test_zero_deadline_rejected(worker: PikkuWorker) -> None:
    assert worker.endpoint is not None

    status, _, body = await _post(worker.endpoint, "slow", 0.0, {"pikku-deadline-ms": "0"})

    assert status == 400
    assert body["name"] == "BadRequestError"
    assert RUNS["slow"] == 0


# -- hop limit ------------------------------------------------------------------------------------------


async def test_hop_limit_local(mesh: Mesh) -> None:
    service = mesh.service()

    with pytest.raises(LoopDetectedError, match=f"hop limit of {MAX_HOPS}") as caught:
        await RPC(deployment_service=service, hop=MAX_HOPS).remote("where")

    assert caught.value.status == 508
    assert mesh.registry.lookups == 0


async def test_hop_counted(caller: RPC) -> None:
    assert await caller.remote("hop_of") == 1
    assert await caller.remote("forward", "hop_of") == 2


async def test_recursion_stopped(caller: RPC) -> None:
    with pytest.raises(LoopDetectedError):
        await caller.remote("recurse", timeout=20)

    assert RUNS["recurse"] == MAX_HOPS


async def test_hop_header_rejected(worker: PikkuWorker) -> None:
    assert worker.endpoint is not None

    status, _, body = await _post(worker.endpoint, "where", None, {"pikku-hop": str(MAX_HOPS + 1)})

    assert status == 508
    assert body["name"] == "LoopDetectedError"
    assert RUNS["where"] == 0


def test_error_name_clash_warns() -> None:
    original = errors_module.registered_error("RpcQuotaExceededError")
    assert original is RpcQuotaExceededError
    try:
        with pytest.warns(RuntimeWarning, match="wire name 'RpcQuotaExceededError'"):
            clash = type("RpcQuotaExceededError", (PikkuMQError,), {"__module__": "elsewhere"})
        assert errors_module.registered_error("RpcQuotaExceededError") is clash
    finally:
        errors_module._REGISTRY["RpcQuotaExceededError"] = original


async def test_served_wire_rpc_built_lazily() -> None:
    """A worker's wire makes the RPC of nested calls only when the function reads it, with the call's context."""
    from pikku_mq._dispatch import Dispatcher
    from pikku_mq._types import HEADER_DEADLINE, HEADER_HOP, HEADER_REQUEST_ID

    registry = FunctionRegistry()

    @pikku_sessionless_func(expose=True, registry=registry)
    async def nested(services: Any, data: Any, wire: Wire) -> None:
        return None

    services = object()
    dispatcher = Dispatcher(registry, services=services, deployment_id="w-1", default_timeout=7.0)
    headers = {HEADER_REQUEST_ID: "trace-9", HEADER_HOP: "3", HEADER_DEADLINE: "5000"}
    wire = dispatcher.admit("nested", headers).wire

    assert wire._rpc is None
    rpc = wire.rpc
    assert wire.rpc is rpc
    assert rpc._registry is registry
    assert rpc._services is services
    assert rpc._deployment_service is None
    assert (rpc._trace_id, rpc._hop, rpc._deadline, rpc._default_timeout) == ("trace-9", 3, wire.deadline, 7.0)
    assert wire.deadline is not None
    assert 4.5 < wire.deadline - time.monotonic() <= 5.0


def test_dispatcher_rejects_bad_default_timeout() -> None:
    from pikku_mq._dispatch import Dispatcher

    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ConfigurationError, match="default_timeout"):
            Dispatcher(FunctionRegistry(), default_timeout=bad)
