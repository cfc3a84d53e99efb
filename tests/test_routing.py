"""Caller-side routing: the lookup cache, round-robin, failover, draining workers, and the public names."""

import asyncio
import collections
import contextlib
import inspect
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from _support_core import Mesh, closed_port, wait_until
from sqlalchemy import event

import pikku_mq
from pikku_mq import (
    RPC,
    AiohttpTransport,
    DeploymentConfig,
    FunctionNotFoundError,
    FunctionRegistry,
    PikkuMQError,
    PikkuWorker,
    RoutingError,
    SqliteDeploymentService,
    pikku_sessionless_func,
)
from pikku_mq import _errors as errors_module
from pikku_mq._types import CallRequest
from pikku_mq.transports.base import Reply
from pikku_mq.transports.memory import unserve_memory

REG = FunctionRegistry()

RUNS: collections.Counter[str] = collections.Counter()
"""How many times ``work`` started, by the ``services`` value of the worker that ran it."""


@pikku_sessionless_func(expose=True, registry=REG)
async def whoami(services: Any) -> str:
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def work(services: Any, data: float) -> str:
    RUNS[str(services)] += 1
    await asyncio.sleep(data)
    return str(services)


@pytest.fixture(autouse=True)
def _reset_runs() -> Iterator[None]:
    RUNS.clear()
    yield
    RUNS.clear()


@pytest.fixture
async def mesh() -> AsyncIterator[Mesh]:
    async with Mesh() as shared:
        yield shared


def _http_worker(mesh: Mesh, name: str, **options: Any) -> PikkuWorker:
    return PikkuWorker(
        endpoint="http://127.0.0.1:0",
        deployment_id=name,
        registry=REG,
        services=name,
        deployment_service=mesh.service(),
        **options,
    )


async def _register_dead(mesh: Mesh, deployment_id: str) -> str:
    """Register an instance whose endpoint refuses connections; return that endpoint."""
    endpoint = f"http://127.0.0.1:{closed_port()}"
    await mesh.service().start(DeploymentConfig(deployment_id, endpoint, functions=["whoami", "work"]))
    return endpoint


# -- lookup cache -------------------------------------------------------------------------------------


class SelectCounter:
    """Counts the SELECT statements on pikku tables that an engine sends."""

    def __init__(self) -> None:
        self.statements: list[str] = []

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "pikku_" in statement:
            self.statements.append(statement)


@contextlib.asynccontextmanager
async def _sqlite_mesh(path: Path, **caller_options: Any) -> AsyncIterator[tuple[RPC, SelectCounter]]:
    """Run an HTTP worker on an SQLite registry and yield a caller's RPC with its SELECT counter."""
    worker_service = SqliteDeploymentService(path)
    caller_service = SqliteDeploymentService(path, **caller_options)
    worker = PikkuWorker(
        endpoint="http://127.0.0.1:0", registry=REG, services="sqlite", deployment_service=worker_service
    )
    async with worker_service, caller_service, worker:
        selects = SelectCounter()
        event.listen(caller_service.engine.sync_engine, "before_cursor_execute", selects)
        yield RPC(registry=FunctionRegistry(), deployment_service=caller_service), selects


async def test_steady_calls_few_queries(tmp_path: Path) -> None:
    async with _sqlite_mesh(tmp_path / "registry.db") as (rpc, selects):
        # A burst shares one lookup, then a steady stream reuses the cached one.
        burst = await asyncio.gather(*(rpc.remote("whoami") for _ in range(50)))
        stream = [await rpc.remote("whoami") for _ in range(150)]

    assert burst == ["sqlite"] * 50
    assert stream == ["sqlite"] * 150
    assert 1 <= len(selects.statements) <= 2


async def test_cache_expires(tmp_path: Path) -> None:
    async with _sqlite_mesh(tmp_path / "registry.db", routing_cache_ttl=0.3) as (rpc, selects):
        for _ in range(5):
            await rpc.remote("whoami")
        await asyncio.sleep(0.4)
        for _ in range(5):
            await rpc.remote("whoami")

    assert len(selects.statements) == 2


async def test_fresh_store_not_found(tmp_path: Path) -> None:
    # The caller never called init() and nothing has created the file's tables yet.
    async with SqliteDeploymentService(tmp_path / "fresh.db") as caller_service:
        rpc = RPC(registry=FunctionRegistry(), deployment_service=caller_service)

        with pytest.raises(FunctionNotFoundError, match="'whoami'"):
            await rpc.remote("whoami")


async def test_fresh_store_without_init(tmp_path: Path) -> None:
    caller_service = SqliteDeploymentService(tmp_path / "fresh.db")
    try:
        with pytest.raises(FunctionNotFoundError):
            await RPC(deployment_service=caller_service).remote("whoami")
    finally:
        await caller_service.close()


# -- balancing and failover ---------------------------------------------------------------------------


async def test_round_robin_sequential(mesh: Mesh) -> None:
    workers = [_http_worker(mesh, f"w{i}") for i in range(3)]
    for worker in workers:
        await worker.start()
    try:
        rpc = RPC(registry=FunctionRegistry(), deployment_service=mesh.service())
        served = collections.Counter([await rpc.remote("whoami") for _ in range(30)])
        concurrent = collections.Counter(await asyncio.gather(*(rpc.remote("whoami") for _ in range(30))))
    finally:
        for worker in workers:
            await worker.stop()

    assert served == {"w0": 10, "w1": 10, "w2": 10}
    assert concurrent == {"w0": 10, "w1": 10, "w2": 10}


async def test_refused_endpoint_dropped(mesh: Mesh) -> None:
    dead_endpoint = await _register_dead(mesh, "dead")
    caller_service, transport = mesh.counting_service()
    rpc = RPC(registry=FunctionRegistry(), deployment_service=caller_service)

    async with _http_worker(mesh, "live") as live:
        results = [await rpc.remote("whoami") for _ in range(6)]

    assert results == ["live"] * 6
    assert transport.attempts.count(dead_endpoint) == 1
    assert transport.attempts.count(live.endpoint) == 6
    # The dead instance stays in the cached lookup but is out of routing until its interval ends.
    assert caller_service.router.is_ejected("dead")
    assert not caller_service.router.is_ejected("live")


async def test_refused_endpoint_skipped_elsewhere(mesh: Mesh) -> None:
    # An instance dropped for one function is not tried for its other functions either.
    dead_endpoint = await _register_dead(mesh, "dead")
    caller_service, transport = mesh.counting_service()
    rpc = RPC(registry=FunctionRegistry(), deployment_service=caller_service)

    async with _http_worker(mesh, "live"):
        for _ in range(2):
            await rpc.remote("whoami")
        for _ in range(4):
            await rpc.remote("work", 0)

    assert transport.attempts.count(dead_endpoint) == 1


async def test_fallback_endpoint_used(mesh: Mesh) -> None:
    caller_service, transport = mesh.counting_service()
    async with PikkuWorker(
        endpoint="http://127.0.0.1:0", registry=REG, services="fallback", discovery=False
    ) as unregistered:
        assert unregistered.endpoint is not None
        await mesh.service().start(
            DeploymentConfig(
                "multi",
                "unsupported://broker/pikku",
                functions=["whoami"],
                fallback_endpoints=[unregistered.endpoint],
            )
        )

        result = await RPC(deployment_service=caller_service).remote("whoami")

    assert result == "fallback"
    assert transport.attempts == [unregistered.endpoint]


async def test_unsupported_endpoint_ignored(mesh: Mesh) -> None:
    await mesh.service().start(DeploymentConfig("foreign", "unsupported://broker/pikku", functions=["whoami"]))

    with pytest.raises(FunctionNotFoundError):
        await RPC(deployment_service=mesh.service()).remote("whoami")


@dataclass
class _Drain:
    """Worker A draining around one slow call, worker B serving, and a caller that has routed to both."""

    rpc: RPC
    attempts: list[str]
    """The endpoints of the caller's HTTP attempts since A began draining."""
    endpoint: str
    """Worker A's endpoint."""
    first: PikkuWorker
    slow: asyncio.Task[Reply]
    stopping: asyncio.Task[None]


@contextlib.asynccontextmanager
async def _a_draining(mesh: Mesh, slow_seconds: float, **caller_options: Any) -> AsyncIterator[_Drain]:
    """Start workers A and B, route a call to each, then start A's drain around a direct call of ``slow_seconds``."""
    first = _http_worker(mesh, "A", drain_timeout=5)
    second = _http_worker(mesh, "B")
    await first.start()
    await second.start()
    assert first.endpoint is not None
    caller_service, transport = mesh.counting_service(**caller_options)
    rpc = RPC(registry=FunctionRegistry(), deployment_service=caller_service)
    direct = AiohttpTransport()
    try:
        assert {await rpc.remote("work", 0), await rpc.remote("work", 0)} == {"A", "B"}
        slow = asyncio.create_task(direct.call(first.endpoint, CallRequest("work", slow_seconds), 5))
        await wait_until(lambda: first.dispatcher.in_flight == 1, timeout=5)
        stopping = asyncio.create_task(first.stop())
        await wait_until(lambda: first.dispatcher.draining, timeout=5)

        transport.attempts.clear()
        yield _Drain(rpc, transport.attempts, first.endpoint, first, slow, stopping)
    finally:
        await first.stop()
        await second.stop()
        await direct.close()


async def test_draining_worker_fails_over(mesh: Mesh) -> None:
    async with _a_draining(mesh, 0.8) as drain:
        results = [await drain.rpc.remote("work", 0) for _ in range(4)]
        attempts_during_drain = list(drain.attempts)
        slow_reply = await drain.slow
        await drain.stopping

    assert results == ["B"] * 4
    assert drain.endpoint in attempts_during_drain
    assert slow_reply.status == 200
    assert slow_reply.body == "A"
    assert RUNS == {"A": 2, "B": 5}


async def test_draining_worker_not_probed(mesh: Mesh) -> None:
    # A draining worker closes its connections once no call has come for a while. A probe sent after
    # the ejection interval could reach it just then, and a plain call lost on a closing connection
    # fails, so the caller must not send it anything more until a lookup lists it again.
    async with _a_draining(mesh, 1.5, routing_cache_ttl=60) as drain:
        results = []
        for _ in range(12):  # 1.2 s: past the 0.5 s ejection, while A still drains
            results.append(await drain.rpc.remote("work", 0))
            await asyncio.sleep(0.1)
        attempts_during_drain = list(drain.attempts)
        assert drain.first.dispatcher.in_flight == 1
        await drain.slow
        await drain.stopping

    assert results == ["B"] * 12
    assert attempts_during_drain.count(drain.endpoint) == 1, attempts_during_drain


# -- no instance left ---------------------------------------------------------------------------------


async def test_never_registered_not_found(mesh: Mesh) -> None:
    with pytest.raises(FunctionNotFoundError) as caught:
        await RPC(deployment_service=mesh.service()).remote("whoami")

    assert caught.value.payload == {"function": "whoami"}


async def test_all_refused_routing_error(mesh: Mesh) -> None:
    await _register_dead(mesh, "dead-1")
    await _register_dead(mesh, "dead-2")

    with pytest.raises(RoutingError) as caught:
        await RPC(deployment_service=mesh.service()).remote("whoami")

    error = caught.value
    assert error.payload["function"] == "whoami"
    assert error.payload["tried"] == ["dead-1", "dead-2"]
    # Each refusal is reported with the transport's reason, so the message says what to fix.
    failures = error.payload["failures"]
    assert len(failures) == 2
    assert all("cannot connect to http://127.0.0.1:" in failure for failure in failures)
    assert "cannot connect to http://127.0.0.1:" in error.message
    assert error.status == 503
    assert error.retryable is True


async def test_worker_gone_after_cached(mesh: Mesh) -> None:
    caller_service = mesh.service()
    rpc = RPC(registry=FunctionRegistry(), deployment_service=caller_service)
    async with _http_worker(mesh, "only"):
        assert await rpc.remote("whoami") == "only"

    # The cached instance refuses the connection, and a fresh lookup finds no other.
    with pytest.raises(RoutingError, match="tried only"):
        await rpc.remote("whoami")
    with pytest.raises(FunctionNotFoundError):
        await rpc.remote("whoami")


# -- public names -------------------------------------------------------------------------------------


def test_all_sorted_unique() -> None:
    names = pikku_mq.__all__

    assert names == sorted(names)
    assert len(names) == len(set(names))


def test_all_importable() -> None:
    missing = [name for name in pikku_mq.__all__ if not hasattr(pikku_mq, name)]

    assert missing == []


def test_all_exports_errors() -> None:
    error_classes = {
        name
        for name, value in vars(errors_module).items()
        if inspect.isclass(value) and issubclass(value, PikkuMQError) and not name.startswith("_")
    }

    assert error_classes <= set(pikku_mq.__all__)
    assert "RemoteError" in error_classes


def test_all_exports_subpackages() -> None:
    exported = set(pikku_mq.__all__)

    assert set(pikku_mq.backends.__all__) <= exported
    assert set(pikku_mq.transports.__all__) <= exported


def test_all_public_names_exported() -> None:
    # Every public class or function that the package namespace holds is listed in __all__.
    public = {
        name
        for name, value in vars(pikku_mq).items()
        if not name.startswith("_") and (inspect.isclass(value) or inspect.isfunction(value))
    }

    assert public <= set(pikku_mq.__all__)


# -- fallback endpoints -------------------------------------------------------------------------------


async def test_worker_serves_fallback_endpoints(mesh: Mesh) -> None:
    caller = mesh.service()
    worker = PikkuWorker(
        registry=REG,
        endpoint=f"memory://fallback-{uuid.uuid4().hex[:8]}",
        fallback_endpoints=["http://127.0.0.1:0"],
        deployment_id="fb-1",
        services="fb-1",
        deployment_service=mesh.service(),
    )
    async with worker:
        [found] = await caller.find_function("whoami")
        [fallback] = found.fallback_endpoints
        assert fallback.startswith("http://127.0.0.1:")
        assert not fallback.endswith(":0")

        # The preferred endpoint goes away, as when a broker is down: calls take the fallback.
        assert worker.endpoint is not None
        unserve_memory(worker.endpoint)
        answers = [await caller.invoke("whoami", timeout=5) for _ in range(3)]
        assert answers == ["fb-1"] * 3
        assert not caller.router.is_ejected("fb-1")


async def test_instance_dropped_when_no_endpoint_reachable(mesh: Mesh) -> None:
    caller = mesh.service(routing_cache_ttl=60)
    registrar = mesh.service()
    await registrar.start(
        DeploymentConfig(
            "fb-dead",
            f"http://127.0.0.1:{closed_port()}",
            functions=["whoami"],
            fallback_endpoints=[f"http://127.0.0.1:{closed_port()}"],
        )
    )
    worker = PikkuWorker(registry=REG, deployment_id="fb-live", services="fb-live", deployment_service=mesh.service())
    async with worker:
        answers = [await caller.invoke("whoami", timeout=5) for _ in range(4)]
    assert answers == ["fb-live"] * 4
    assert caller.router.is_ejected("fb-dead")


def test_random_ids_unique_and_hex() -> None:
    from pikku_mq._routing import _RANDOM_BYTES, _random_ids

    ids = [one for _ in range(3 * _RANDOM_BYTES // 32) for one in _random_ids()]  # several refills

    assert len(set(ids)) == len(ids)
    assert all(len(one) == 32 and int(one, 16) >= 0 for one in ids)


def test_random_ids_differ_between_threads() -> None:
    import threading

    from pikku_mq._routing import _random_ids

    _random_ids()  # this thread's buffer is filled
    drawn: list[tuple[str, str]] = []
    thread = threading.Thread(target=lambda: drawn.extend(_random_ids() for _ in range(100)))
    thread.start()
    thread.join()
    here = [_random_ids() for _ in range(100)]

    assert not set(drawn) & set(here)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_random_ids_differ_after_fork() -> None:
    from pikku_mq._routing import _random_ids

    _random_ids()  # the parent's buffer now contains ids not yet sent
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, "".join(_random_ids()).encode())
        os._exit(0)
    os.close(write_end)
    child_ids = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)

    assert child_ids != "".join(_random_ids())
