"""Prometheus metrics: scraped from running worker processes, and counted on the caller's side."""

from __future__ import annotations

import asyncio
import logging
import re
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from _support_core import wait_until
from _support_workers import WorkerProcess, WorkerProcesses
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pikku_mq import (
    ConfigurationError,
    DeploymentConfig,
    FunctionRegistry,
    InputValidationError,
    MemoryDeploymentService,
    MemoryRegistry,
    PikkuMetrics,
    PikkuWorker,
    deployment_service_from_url,
    pikku_sessionless_func,
)
from pikku_mq._telemetry import make_telemetry

pytestmark = pytest.mark.timeout(120)

OBSERVED_WORKER = Path(__file__).parent / "apps" / "observed_worker.py"
CALLS = 7


def sample(text: str, name: str, **labels: str) -> float:
    """Return the value of the sample ``name`` with exactly ``labels`` in a scrape, or 0 if it is absent."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    return 0.0


async def scrape(url: str) -> str:
    async with httpx.AsyncClient() as client:
        response = await client.get(url, timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


async def metrics_port(worker: WorkerProcess) -> int:
    """Return the port that the worker logged it serves its metrics on."""
    found: list[int] = []

    def logged() -> bool:
        match = re.search(r"serving metrics on http://127\.0\.0\.1:(\d+)/metrics", worker.stderr())
        if match:
            found.append(int(match.group(1)))
        return bool(match)

    await wait_until(logged, timeout=20)
    return found[0]


@pytest.mark.parametrize("transport", ["http", "nats"])
async def test_worker_counts_scraped_calls(
    transport: str, worker_processes: WorkerProcesses, discovery_url: str
) -> None:
    if transport == "http":
        worker = await worker_processes.start(OBSERVED_WORKER, "metrics-w", "--functions", "leaf")
        url = f"{worker.endpoint}/metrics"
    else:
        endpoint = f"nats://127.0.0.1:4222/pikku_t_{uuid.uuid4().hex[:12]}"
        worker = await worker_processes.start(
            OBSERVED_WORKER, "metrics-w", "--functions", "leaf", "--endpoint", endpoint, "--metrics-port", "0"
        )
        url = f"http://127.0.0.1:{await metrics_port(worker)}/metrics"
    registry = CollectorRegistry()
    caller = deployment_service_from_url(discovery_url, metrics=PikkuMetrics(registry))
    labels = {"function": "leaf", "transport": transport}
    try:
        before = await scrape(url)
        for index in range(CALLS):
            assert await caller.invoke("leaf", {"text": str(index)}, timeout=10) == f"metrics-w:{index}"
        with pytest.raises(InputValidationError):
            await caller.invoke("leaf", {"wrong": "field"}, timeout=10)
        after = await scrape(url)
    finally:
        await caller.close()

    # The worker: seven calls and one error, each counted once.
    moved = sample(after, "pikku_mq_server_calls_total", **labels) - sample(
        before, "pikku_mq_server_calls_total", **labels
    )
    assert moved == CALLS + 1
    error = {**labels, "code": InputValidationError.code}
    errors = sample(after, "pikku_mq_server_errors_total", **error) - sample(
        before, "pikku_mq_server_errors_total", **error
    )
    assert errors == 1
    durations = sample(after, "pikku_mq_server_call_duration_seconds_count", **labels) - sample(
        before, "pikku_mq_server_call_duration_seconds_count", **labels
    )
    assert durations == CALLS + 1
    assert sample(after, "pikku_mq_server_calls_in_flight", **labels) == 0

    # The caller, in this process: the same calls.
    text = _render(registry)
    assert sample(text, "pikku_mq_client_calls_total", **labels) == CALLS + 1
    assert sample(text, "pikku_mq_client_errors_total", **error) == 1
    assert sample(text, "pikku_mq_client_call_duration_seconds_count", **labels) == CALLS + 1
    assert sample(text, "pikku_mq_client_attempts_total", **labels, outcome="ok") == CALLS
    assert sample(text, "pikku_mq_client_attempts_total", **labels, outcome="error") == 1
    assert sample(text, "pikku_mq_client_calls_in_flight", function="leaf") == 0
    # Each call reads the cache once. On NATS the presence subscription's first event expires the cache,
    # so one more call there may look the function up again.
    misses = sample(text, "pikku_mq_routing_cache_misses_total", function="leaf")
    hits = sample(text, "pikku_mq_routing_cache_hits_total", function="leaf")
    assert hits + misses == CALLS + 1
    if transport == "http":
        assert misses == 1
    else:
        assert 1 <= misses <= 2


def _render(registry: CollectorRegistry) -> str:
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()


# -- in one process ------------------------------------------------------------------------------

REG = FunctionRegistry()


@pikku_sessionless_func(expose=True, registry=REG)
async def hold(services: Any, data: float) -> None:
    await asyncio.sleep(data)


async def test_in_flight_gauge_during_call() -> None:
    registry = CollectorRegistry()
    metrics = PikkuMetrics(registry)
    memory = MemoryRegistry()
    worker = PikkuWorker(
        endpoint="memory://held", deployment_service=MemoryDeploymentService(memory), registry=REG, metrics=metrics
    )
    caller = MemoryDeploymentService(memory, metrics=metrics)
    async with worker:
        call = asyncio.create_task(caller.invoke("hold", 5.0, timeout=10))
        labels = {"function": "hold", "transport": "memory"}
        await wait_until(lambda: registry.get_sample_value("pikku_mq_server_calls_in_flight", labels) == 1, timeout=5)
        assert registry.get_sample_value("pikku_mq_client_calls_in_flight", {"function": "hold"}) == 1
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_until(lambda: registry.get_sample_value("pikku_mq_server_calls_in_flight", labels) == 0, timeout=5)
    await caller.close()
    assert registry.get_sample_value("pikku_mq_client_calls_in_flight", {"function": "hold"}) == 0


async def test_unknown_function_label_bounded() -> None:
    registry = CollectorRegistry()
    worker = PikkuWorker(endpoint="memory://bounded", discovery=False, registry=REG, metrics=PikkuMetrics(registry))
    async with worker:
        for index in range(5):
            await worker.dispatcher.handle(f"made_up_{index}", None, {}, "memory")

    text = _render(registry)
    assert "made_up" not in text
    labels = {"function": "(unknown)", "transport": "memory"}
    assert registry.get_sample_value("pikku_mq_server_calls_total", labels) == 5


class _FailingHeartbeats(MemoryDeploymentService):
    """A memory service whose heartbeats fail, as against a store that went away."""

    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        raise ConnectionRefusedError("the store refuses connections")


async def test_heartbeat_failures_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    service = _FailingHeartbeats(
        MemoryRegistry(), heartbeat_interval=0.05, heartbeat_ttl=1.0, metrics=PikkuMetrics(registry)
    )
    caplog.set_level(logging.WARNING, logger="pikku_mq.backends.base")
    await service.start(DeploymentConfig("beating", "memory://beating", functions=["hold"]))
    try:
        await wait_until(lambda: (registry.get_sample_value("pikku_mq_heartbeat_failures_total") or 0) >= 5, timeout=10)
    finally:
        await service.stop()
        await service.close()

    # Many failures, one WARNING: the next one is a summary, at most one a minute.
    warnings = [r for r in caplog.records if "heartbeat of beating failed" in r.getMessage()]
    assert len(warnings) == 1


async def test_metrics_port_env_invalid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PIKKU_METRICS_PORT", "nine")
    with pytest.raises(ConfigurationError, match="PIKKU_METRICS_PORT must be a port number"):
        PikkuWorker(endpoint="memory://x", discovery=False, registry=REG)


@pytest.mark.parametrize(("value", "on"), [("1", True), (" Yes ", True), ("on", True), ("off", False), ("", False)])
def test_metrics_env_values(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    monkeypatch.setenv("PIKKU_METRICS", value)
    telemetry = make_telemetry(False, None)

    if on:
        assert telemetry is not None
        assert telemetry.metrics is not None
    else:
        assert telemetry is None


@pytest.mark.parametrize("value", ["maybe", "2", "enabled"])
async def test_metrics_env_invalid(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PIKKU_METRICS", value)
    with pytest.raises(ConfigurationError, match=f"PIKKU_METRICS must be 1, true, yes or on .* got '{value}'"):
        PikkuWorker(endpoint="memory://x", discovery=False, registry=REG)
    with pytest.raises(ConfigurationError, match="PIKKU_METRICS must be"):
        deployment_service_from_url("memory://")


async def test_metrics_path_rejects_post(discovery_url: str) -> None:
    registry = CollectorRegistry()
    worker = PikkuWorker(discovery=False, registry=REG, metrics=PikkuMetrics(registry))
    async with worker:
        assert worker.endpoint is not None
        async with httpx.AsyncClient() as client:
            response = await client.post(f"{worker.endpoint}/metrics", timeout=10)
            head = await client.head(f"{worker.endpoint}/metrics", timeout=10)
    assert response.status_code == 405
    assert head.status_code == 200
    assert head.content == b""


async def test_metrics_off_serves_no_path() -> None:
    worker = PikkuWorker(discovery=False, registry=REG, metrics=False)
    async with worker:
        assert worker.endpoint is not None
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{worker.endpoint}/metrics", timeout=10)
    assert response.status_code == 404


async def test_separate_metrics_port(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    worker = PikkuWorker(
        endpoint="memory://ported", discovery=False, registry=REG, metrics=PikkuMetrics(registry), metrics_port=0
    )
    async with worker:
        assert worker.metrics_port
        await worker.dispatcher.handle("hold", 0.0, {}, "memory")
        text = await scrape(f"http://127.0.0.1:{worker.metrics_port}/metrics")
    assert sample(text, "pikku_mq_server_calls_total", function="hold", transport="memory") == 1
    with pytest.raises(httpx.ConnectError):
        await scrape(f"http://127.0.0.1:{worker.metrics_port}/metrics")


def test_second_registration_in_registry_fails() -> None:
    registry = CollectorRegistry()
    PikkuMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        PikkuMetrics(registry)


def test_default_metrics_once_per_registry() -> None:
    registry = CollectorRegistry()
    assert PikkuMetrics.default(registry) is PikkuMetrics.default(registry)


def _launch_cli_worker(tmp_path: Path, deployment_id: str, *args: str) -> WorkerProcess:
    """Start ``pikku-mq worker ARGS --id DEPLOYMENT_ID`` with its stderr in a file."""
    stderr_path = tmp_path / "worker.stderr"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "pikku_mq", "worker", *args, "--id", deployment_id],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    return WorkerProcess(deployment_id, process, stderr_path)


async def test_cli_worker_metrics_port(tmp_path: Path, discovery_url: str) -> None:
    endpoint = f"nats://127.0.0.1:4222/pikku_t_{uuid.uuid4().hex[:12]}"
    worker = _launch_cli_worker(
        tmp_path,
        "cli-metrics",
        "pikku_mq.demo.greeter",
        "--endpoint",
        endpoint,
        "--discovery",
        discovery_url,
        "--metrics-port",
        "0",
    )
    process = worker.process
    caller = deployment_service_from_url(discovery_url)
    try:
        url = f"http://127.0.0.1:{await metrics_port(worker)}/metrics"
        await wait_until(lambda: process.poll() is not None or "serving at" in worker.stderr(), timeout=20)
        for _ in range(3):
            await caller.invoke("greet", {"name": "Ada"}, timeout=10)
        text = await scrape(url)
    finally:
        await caller.close()
        process.terminate()
        process.wait(timeout=20)
    assert sample(text, "pikku_mq_server_calls_total", function="greet", transport="nats") == 3
    assert process.returncode == 0
