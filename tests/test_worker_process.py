"""Worker processes under failure and shutdown: SIGKILL, SIGTERM draining, start order and stale entries."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
import pytest

from pikku_mq import DeploymentService, deployment_service_from_url

if TYPE_CHECKING:
    from _support_workers import WorkerProcess, WorkerProcesses

MESH_WORKER = Path(__file__).parent / "apps" / "mesh_worker.py"
WHOAMI = ("--functions", "whoami,whoami_once")
FAST_HEARTBEAT = ("--heartbeat-interval", "0.3", "--heartbeat-ttl", "1")


async def poll(description: str, check: Callable[[], Awaitable[bool] | bool], timeout: float) -> None:
    """Run ``check`` (awaiting it if it is async) every 20 ms until it returns true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{description} did not happen within {timeout} s")


async def start_pair(
    worker_processes: WorkerProcesses, first: str, second: str, *args: str
) -> tuple[WorkerProcess, WorkerProcess]:
    """Start two workers that both host whoami and whoami_once, in parallel."""
    a = worker_processes.launch(MESH_WORKER, first, *WHOAMI, *args)
    b = worker_processes.launch(MESH_WORKER, second, *WHOAMI, *args)
    await worker_processes.wait_registered(a)
    await worker_processes.wait_registered(b)
    return a, b


async def test_sigkill_mid_stream_fails_over(worker_processes: WorkerProcesses, caller: DeploymentService) -> None:
    a, _ = await start_pair(worker_processes, "instance-a", "instance-b")

    # Four callers run idempotent calls back to back while instance-a is killed. Calls in flight
    # there fail on the way, and the caller retries them on instance-b.
    results: list[tuple[float, str]] = []
    killed_at = float("inf")
    stop = asyncio.Event()

    async def call_in_a_loop() -> None:
        while not stop.is_set():
            started = time.monotonic()
            served_by = await caller.invoke("whoami", timeout=10, idempotent=True)
            results.append((started, served_by))

    callers = [asyncio.create_task(call_in_a_loop()) for _ in range(4)]
    try:
        await poll("40 calls", lambda: len(results) >= 40, timeout=20)
        a.kill()
        killed_at = time.monotonic()
        await poll("60 calls after the kill", lambda: sum(t > killed_at for t, _ in results) >= 60, timeout=20)
    finally:
        stop.set()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)

    assert [o for o in outcomes if o is not None] == []
    before = {served_by for started, served_by in results if started < killed_at}
    after = {served_by for started, served_by in results if started > killed_at}
    assert before == {"instance-a", "instance-b"}
    assert after == {"instance-b"}


async def test_sigkill_non_idempotent_fails_over(
    worker_processes: WorkerProcesses, discovery_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, _ = await start_pair(worker_processes, "instance-a", "instance-b")
    caplog.set_level(logging.INFO, logger="pikku_mq._routing")
    # One caller has keep-alive connections to both instances when instance-a dies, the other none.
    # The registry still lists instance-a until its TTL passes, so both callers send calls there.
    # Each such call gets connection refused, so it certainly did not run and moves to instance-b.
    warm = deployment_service_from_url(discovery_url)
    cold = deployment_service_from_url(discovery_url)
    try:
        warm_before = {await warm.invoke("whoami_once", timeout=10) for _ in range(4)}
        a.kill()
        # An idle keep-alive connection to instance-a closes once this event loop reads its EOF. A call
        # written on it before that fails with "server disconnected", which is an uncertain failure.
        await asyncio.sleep(0.2)
        warm_after = [await warm.invoke("whoami_once", timeout=10) for _ in range(6)]
        listed = {i.deployment_id for i in await cold.find_function("whoami_once")}
        cold_after = [await cold.invoke("whoami_once", timeout=10) for _ in range(6)]
    finally:
        await warm.close()
        await cold.close()

    assert warm_before == {"instance-a", "instance-b"}
    assert warm_after == ["instance-b"] * 6
    assert listed == {"instance-a", "instance-b"}
    assert cold_after == ["instance-b"] * 6
    assert any("instance-a" in r.getMessage() and "unreachable" in r.getMessage() for r in caplog.records)


async def test_sigterm_drains_in_flight_call(
    worker_processes: WorkerProcesses, caller: DeploymentService, tmp_path: Path
) -> None:
    worker = await worker_processes.start(MESH_WORKER, "draining-worker", "--functions", "slow,whoami")
    marker = tmp_path / "slow-started"

    call = asyncio.create_task(caller.invoke("slow", {"seconds": 1.5, "started_marker": str(marker)}, timeout=20))
    await poll("the slow call to start", marker.exists, timeout=10)
    worker.terminate()

    async def deregistered() -> bool:
        return all(r.deployment_id != worker.deployment_id for r in await caller.list_deployments())

    await poll("deregistration", deregistered, timeout=5)
    assert worker.process.poll() is None, "the worker exited before its in-flight call finished"
    assert not call.done()

    # While it drains, the worker rejects new calls as not started, so a caller may send them elsewhere.
    probe_replies: list[tuple[int, str | None, dict[str, object]]] = []

    async def new_call_rejected() -> bool:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client,
            client.post(f"{worker.endpoint}/remote/rpc/whoami", json={"data": None}) as response,
        ):
            probe_replies.append((response.status, response.headers.get("pikku-rejected"), await response.json()))
        return response.status == 503

    await poll("rejection of a new call", new_call_rejected, timeout=2)
    _, rejected_header, error = probe_replies[-1]
    assert rejected_header == "1"
    assert error["name"] == "ServiceUnavailableError"
    assert error["retryable"] is True
    assert not call.done()

    assert await asyncio.wait_for(call, timeout=10) == "draining-worker"
    assert await asyncio.to_thread(worker.process.wait, 10) == 0
    assert await caller.list_deployments() == []

    info_lines = [line for line in worker.stderr().splitlines() if " INFO " in line and "draining-worker" in line]
    for step in ("starting", "registered deployment", "draining", "deregistered deployment", "stopped"):
        assert any(step in line for line in info_lines), f"no INFO line about {step!r} in {info_lines}"


async def test_endpoint_answers_once_registered(worker_processes: WorkerProcesses, caller: DeploymentService) -> None:
    worker = worker_processes.launch(MESH_WORKER, "eager-worker", *WHOAMI)

    async def registered() -> bool:
        return bool(await caller.find_function("whoami"))

    await poll("registration", registered, timeout=20)
    [instance] = await caller.find_function("whoami")
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as client,
        client.post(f"{instance.endpoint}/remote/rpc/whoami", json={"data": None}) as response,
    ):
        status, body = response.status, await response.json()

    assert worker.process.poll() is None
    assert status == 200
    assert body == "eager-worker"


async def test_stale_instance_excluded_after_ttl(worker_processes: WorkerProcesses, discovery_url: str) -> None:
    a, _ = await start_pair(worker_processes, "stale-a", "live-b", *FAST_HEARTBEAT)
    # Liveness is judged with the caller's TTL, so the caller uses the workers' settings.
    caller = deployment_service_from_url(discovery_url, heartbeat_interval=0.3, heartbeat_ttl=1)
    try:
        a.kill()
        rows_at_kill = {r.deployment_id for r in await caller.list_deployments()}

        async def excluded() -> bool:
            return [i.deployment_id for i in await caller.find_function("whoami")] == ["live-b"]

        async def purged() -> bool:
            return [r.deployment_id for r in await caller.list_deployments()] == ["live-b"]

        await poll("exclusion of the killed instance", excluded, timeout=5)
        await poll("removal of the killed instance by live-b's heartbeat", purged, timeout=5)
        served = [await caller.invoke("whoami_once", timeout=5) for _ in range(4)]
    finally:
        await caller.close()

    assert rows_at_kill == {"stale-a", "live-b"}
    assert served == ["live-b"] * 4


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_second_signal_keeps_drain(tmp_path: Path, signum: signal.Signals) -> None:
    # `pikku-mq worker --reload` gets a second SIGINT on each Ctrl-C: the terminal sends it to the
    # whole process group, and watchfiles sends it to the worker again. Supervisors repeat SIGTERM.
    (tmp_path / "slowapp.py").write_text(
        textwrap.dedent(
            """
            import asyncio
            from pathlib import Path
            from pikku_mq import pikku_sessionless_func

            @pikku_sessionless_func(expose=True)
            async def slow(services, data: float) -> float:
                Path("started").touch()
                await asyncio.sleep(data)
                return data
            """
        )
    )
    environment = {**os.environ, "PIKKU_DISCOVERY_URL": f"sqlite:///{tmp_path / 'registry.db'}"}
    command = [sys.executable, "-m", "pikku_mq"]
    worker = subprocess.Popen(
        [*command, "worker", "slowapp", "--id", "w1"], cwd=tmp_path, env=environment, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            listing = subprocess.run([*command, "ls"], cwd=tmp_path, env=environment, capture_output=True, text=True)
            if "w1" in listing.stdout:
                break
            time.sleep(0.2)
        call = subprocess.Popen(
            [*command, "call", "slow", "2", "--timeout", "10"],
            cwd=tmp_path,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # The signals must come while the call runs. If the call's process starts slowly, the drain
        # must still not begin first.
        started = tmp_path / "started"
        deadline = time.monotonic() + 20
        while not started.exists() and call.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert started.exists(), "the call did not reach the worker"
        worker.send_signal(signum)
        time.sleep(0.3)
        worker.send_signal(signum)
        output, errors = call.communicate(timeout=20)
        _, worker_log = worker.communicate(timeout=20)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.communicate(timeout=10)

    assert call.returncode == 0, errors
    assert output.strip() == "2.0"
    assert worker.returncode == 0, worker_log
    assert "again while stopping; it still finishes its calls in flight" in worker_log
