"""A rolling restart of three worker processes under a steady stream of calls loses none of them.

Callers send calls to a function that is not idempotent, so a call may move to another instance only
when it certainly did not run. Each worker in turn gets SIGTERM, exits, and is replaced by a new
process before the next one goes, under a new deployment id or under the same one. Every call must
succeed, the ledger that the function appends to must hold each call exactly once, and every
process must have served calls.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from _support_amqp import amqp_endpoint
from _support_core import Mesh, closed_port, wait_until

from pikku_mq import (
    DeploymentConfig,
    DeploymentService,
    FunctionRegistry,
    PikkuWorker,
    RoutingError,
    deployment_service_from_url,
    pikku_sessionless_func,
)

if TYPE_CHECKING:
    from _support_workers import WorkerProcess, WorkerProcesses

MESH_WORKER = Path(__file__).parent / "apps" / "mesh_worker.py"
CALLERS = 8
"""Caller tasks that each send one call after another."""
PAUSE = 0.005
"""Seconds a caller task waits between two calls."""
HOLD = 0.02
"""Seconds each call takes on the worker, so that calls are in flight when a worker gets SIGTERM."""
SETTLE = 1.0
"""Seconds the load runs before the first worker is stopped."""
ROLL_PAUSE = 2.0
"""Seconds between a replacement's start and the next SIGTERM. That is shorter than the caller's routing
cache (5 s), so the caller still has the stopped workers in its cached lookups while the next one stops."""
HEARTBEAT = ("--heartbeat-interval", "1", "--heartbeat-ttl", "3")

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def whoami(services: str) -> str:
    return services


def endpoint_for(transport: str) -> str:
    if transport == "http":
        return "http://127.0.0.1:0"
    if transport == "nats":
        return f"nats://127.0.0.1:4222/pikku_t_{uuid.uuid4().hex[:12]}"
    return amqp_endpoint()


@pytest.fixture
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The transport the workers serve on, each test with a presence subject or exchange of its own."""
    kind: str = request.param
    if kind == "nats":
        monkeypatch.setenv("PIKKU_NATS_PRESENCE_SUBJECT", f"pikku_t_{uuid.uuid4().hex[:12]}.presence")
    if kind == "amqp":
        request.getfixturevalue("amqp_vhost")
        monkeypatch.setenv("PIKKU_AMQP_PRESENCE_EXCHANGE", f"pikku_t_{uuid.uuid4().hex[:12]}.presence")
    return kind


async def launch(processes: WorkerProcesses, transport: str, deployment_id: str) -> WorkerProcess:
    endpoint = endpoint_for(transport)
    return await processes.start(
        MESH_WORKER, deployment_id, "--functions", "count,whoami", "--endpoint", endpoint, *HEARTBEAT
    )


def served_by(served: list[tuple[str, str]], worker: WorkerProcess) -> Callable[[], bool]:
    """Return a check that the process of ``worker`` served one of the last calls."""
    label = f"{worker.deployment_id}@{worker.process.pid}"
    return lambda: any(server == label for _, server in served[-200:])


@pytest.mark.parametrize(
    ("transport", "same_id"),
    [("http", False), ("nats", False), ("amqp", False), ("http", True)],
    ids=["http", "nats", "amqp", "http-same-ids"],
    indirect=["transport"],
)
async def test_rolling_restart_loses_no_call(
    worker_processes: WorkerProcesses, discovery_url: str, transport: str, same_id: bool, tmp_path: Path
) -> None:
    ledger = tmp_path / "ledger.txt"
    ledger.touch()
    caller: DeploymentService = deployment_service_from_url(discovery_url)
    workers = [await launch(worker_processes, transport, f"w{n}") for n in (1, 2, 3)]

    served: list[tuple[str, str]] = []
    failures: list[tuple[str, BaseException]] = []
    stop = asyncio.Event()

    async def call_in_a_loop(number: int) -> None:
        sent = 0
        while not stop.is_set():
            tag = f"c{number}-{sent}"
            sent += 1
            data = {"ledger": str(ledger), "tag": tag, "hold": HOLD}
            try:
                served.append((tag, await caller.invoke("count", data, timeout=10)))
            except Exception as exc:
                failures.append((tag, exc))
            await asyncio.sleep(PAUSE)

    callers = [asyncio.create_task(call_in_a_loop(n)) for n in range(CALLERS)]
    exit_codes: list[int] = []
    replacements: list[WorkerProcess] = []
    try:
        await asyncio.sleep(SETTLE)
        for old in workers:
            old.terminate()
            exit_codes.append(await asyncio.to_thread(old.process.wait, 30))
            new = await launch(worker_processes, transport, old.deployment_id if same_id else f"{old.deployment_id}b")
            replacements.append(new)
            await asyncio.sleep(ROLL_PAUSE)
        # Without a change feed, the caller finds a new worker once its routing cache expires.
        await wait_until(served_by(served, replacements[-1]), timeout=15)
    finally:
        stop.set()
        await asyncio.gather(*callers)
        await caller.close()

    runs = Counter(ledger.read_text().split())
    processes = Counter(server for _, server in served)
    assert failures == [], f"{len(failures)} of {len(served) + len(failures)} calls failed: {failures[:5]}"
    assert exit_codes == [0, 0, 0]
    assert len(served) >= 100
    assert set(runs) == {tag for tag, _ in served}
    assert max(runs.values()) == 1, [tag for tag, n in runs.items() if n > 1]
    for worker in (*workers, *replacements):
        assert processes[f"{worker.deployment_id}@{worker.process.pid}"] > 0, processes


async def test_restarted_instance_back_after_one_backoff() -> None:
    # Calls that failed together on a stopped instance count as one failure, so an instance that comes
    # back under the same id and endpoint is used again once the first backoff (0.5 s) has passed.
    port = closed_port()
    async with Mesh() as mesh:
        caller = mesh.service(routing_cache_ttl=0)
        stopped = mesh.service()
        await stopped.start(DeploymentConfig("w", f"http://127.0.0.1:{port}", functions=["whoami"]))
        failed = await asyncio.gather(*(caller.invoke("whoami", timeout=5) for _ in range(16)), return_exceptions=True)
        await stopped.stop()
        await asyncio.sleep(0.6)
        worker = PikkuWorker(
            endpoint=f"http://127.0.0.1:{port}",
            deployment_id="w",
            registry=REG,
            deployment_service=mesh.service(),
            services="w, restarted",
        )
        async with worker:
            answer = await caller.invoke("whoami", timeout=5)

    assert all(isinstance(result, RoutingError) for result in failed), failed
    assert answer == "w, restarted"


async def test_replacement_at_new_endpoint_used_at_once() -> None:
    # A stopped instance is skipped for a backoff, but one that registers under its id at another
    # endpoint is another process, and takes calls at once.
    async with Mesh() as mesh:
        caller = mesh.service(routing_cache_ttl=0)
        stopped = mesh.service()
        await stopped.start(DeploymentConfig("w", f"http://127.0.0.1:{closed_port()}", functions=["whoami"]))
        with pytest.raises(RoutingError):
            await caller.invoke("whoami", timeout=5)
        await stopped.stop()
        async with PikkuWorker(deployment_id="w", registry=REG, deployment_service=mesh.service(), services="new"):
            answer = await caller.invoke("whoami", timeout=5)

    assert answer == "new"


async def test_cached_endpoint_replaced_within_call() -> None:
    # The caller has the stopped process's endpoint cached. The call that finds it refused looks the
    # function up again and goes to the process that now has the id, instead of failing.
    async with Mesh() as mesh:
        caller = mesh.service(routing_cache_ttl=60)
        async with PikkuWorker(deployment_id="w", registry=REG, deployment_service=mesh.service(), services="old"):
            first = await caller.invoke("whoami", timeout=5)
        async with PikkuWorker(deployment_id="w", registry=REG, deployment_service=mesh.service(), services="new"):
            second = await caller.invoke("whoami", timeout=5)

    assert first == "old"
    assert second == "new"
