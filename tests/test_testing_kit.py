"""pikku_mq.testing: the in-process mesh, each fault it injects, and parity of its errors with real HTTP faults.

The parity tests provoke each fault once in the kit and once with real parts, then compare what the
caller raises. The real parts are an HTTP worker, a closed port, a TCP server that hangs or drops the
connection, and a Redis URL on a closed port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from _support_core import Mesh as PlainMesh
from _support_core import closed_port, wait_until
from _support_faults import FaultyInstance

from pikku_mq import (
    BusyError,
    ConfigurationError,
    DeadlineExceededError,
    DeploymentConfig,
    DiscoveryError,
    FunctionRegistry,
    PayloadTooLargeError,
    PikkuMQError,
    PikkuWorker,
    RedisDeploymentService,
    RetryPolicy,
    RoutingError,
    TransportError,
    Wire,
    pikku_func,
    pikku_sessionless_func,
)
from pikku_mq.testing import Mesh

REG = FunctionRegistry()

RUNS: list[tuple[str, str]] = []
"""Every run of ``tally`` or ``hold``: the instance that ran it and the call id."""

RELEASE = asyncio.Event()
"""Set to let every ``hold`` call return; each test gets a new one, since an event binds to its first loop."""


@pikku_sessionless_func(expose=True, registry=REG)
async def tally(services: Any, data: Any, wire: Wire) -> str:
    RUNS.append((str(services), wire.call_id))
    return str(services)


@pikku_sessionless_func(expose=True, idempotent=True, registry=REG)
async def tally_idempotent(services: Any, data: Any, wire: Wire) -> str:
    RUNS.append((str(services), wire.call_id))
    return str(services)


@pikku_sessionless_func(expose=True, registry=REG)
async def hold(services: Any, data: Any, wire: Wire) -> str:
    RUNS.append((str(services), wire.call_id))
    await RELEASE.wait()
    return str(services)


@pikku_func(expose=True, registry=REG)
async def whose_session(services: Any, data: Any, wire: Wire) -> Any:
    return wire.session


def _clear_runs() -> None:
    global RELEASE
    RUNS.clear()
    RELEASE = asyncio.Event()


@pytest.fixture(autouse=True)
def _reset() -> None:
    _clear_runs()


async def _add(mesh: Mesh, deployment_id: str, **options: Any) -> Any:
    return await mesh.add(deployment_id, registry=REG, services=deployment_id, **options)


# -- a healthy mesh ----------------------------------------------------------------------------------


async def test_calls_balance_across_deployments() -> None:
    async with Mesh() as mesh:
        await _add(mesh, "a")
        await _add(mesh, "b")
        caller = mesh.caller()

        served = [await caller.remote("tally", timeout=5) for _ in range(6)]

    assert sorted(served) == ["a"] * 3 + ["b"] * 3


async def test_deployment_rpc_runs_own_functions_locally() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a", functions=[tally])
        await _add(mesh, "b", functions=[tally_idempotent])

        assert await a.rpc.invoke("tally") == "a"
        assert await a.rpc.invoke("tally_idempotent") == "b"
        assert a.calls_received == 0  # the local call did not go through the transport


async def test_session_travels_with_secret() -> None:
    async with Mesh(secret="s" * 32) as mesh:
        await _add(mesh, "a")
        caller = mesh.caller()

        assert await caller.remote("whose_session", session={"user": "ada"}, timeout=5) == {"user": "ada"}


async def test_mesh_close_leaves_registry_empty() -> None:
    mesh = Mesh()
    async with mesh:
        await _add(mesh, "a")
        await _add(mesh, "b")
        assert set(mesh.registry.rows) == {"a", "b"}

    assert mesh.registry.rows == {}
    with pytest.raises(ConfigurationError, match="the mesh is closed"):
        await _add(mesh, "c")


# -- kill -----------------------------------------------------------------------------------------------


async def test_killed_deployment_refuses_and_fails_over() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        await _add(mesh, "b")
        caller = mesh.caller()

        await a.kill()
        served = [await caller.remote("tally", timeout=5) for _ in range(4)]

        assert served == ["b"] * 4
        assert mesh.registry.rows["a"].is_live(), "a killed process does not deregister"
        assert a.state == "killed"


async def test_killed_only_instance_raises_routing_error() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        await a.kill()

        with pytest.raises(RoutingError) as raised:
            await mesh.caller().remote("tally", timeout=5)

    assert raised.value.payload["tried"] == ["a"]
    assert "deployment 'a' is killed" in raised.value.message


async def test_kill_breaks_call_in_flight() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        caller = mesh.caller()

        call = asyncio.create_task(caller.remote("hold", timeout=5))
        await wait_until(lambda: len(RUNS) == 1, timeout=5)
        await a.kill()

        with pytest.raises(TransportError) as raised:
            await call

    assert type(raised.value) is TransportError
    assert "not retried, because instance a did not register 'hold' as idempotent" in raised.value.message


async def test_killed_deployment_starts_again() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a", heartbeat_interval=0.1, heartbeat_ttl=5)
        caller = mesh.caller()
        assert await caller.remote("tally", timeout=5) == "a"

        await a.kill()
        with pytest.raises(RoutingError):
            await caller.remote("tally", timeout=5)

        await a.start()
        assert await caller.remote("tally", timeout=5) == "a"
        assert a.state == "running"


async def test_killed_registration_expires_at_ttl() -> None:
    async with Mesh(heartbeat_interval=0.05, heartbeat_ttl=0.3) as mesh:
        a = await _add(mesh, "a")
        await _add(mesh, "b")

        await a.kill()
        await wait_until(lambda: not mesh.registry.rows.get("a") or not mesh.registry.rows["a"].is_live(), timeout=5)


# -- freeze ---------------------------------------------------------------------------------------------


async def test_frozen_call_times_out_at_deadline() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        caller = mesh.caller()

        a.freeze()
        started = time.monotonic()
        with pytest.raises(DeadlineExceededError) as raised:
            await caller.remote("tally", timeout=0.3)
        elapsed = time.monotonic() - started

    assert 0.3 <= elapsed < 1.5
    assert raised.value.payload["attempts"] == 1


async def test_frozen_call_runs_after_thaw() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        caller = mesh.caller()

        a.freeze()
        with pytest.raises(DeadlineExceededError):
            await caller.remote("tally", timeout=0.2)
        assert RUNS == []

        a.thaw()
        # A stopped process reads the request it took once it resumes, although its caller gave up.
        await wait_until(lambda: len(RUNS) == 1, timeout=5)
        assert await caller.remote("tally", timeout=5) == "a"


async def test_idempotent_call_retried_past_frozen() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        await _add(mesh, "b")
        caller = mesh.caller(retry=RetryPolicy(attempt_timeout=0.2))

        a.freeze()
        served = [await caller.remote("tally_idempotent", timeout=5, idempotent=True) for _ in range(4)]

    assert served == ["b"] * 4


async def test_reply_of_running_call_waits_for_thaw() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        caller = mesh.caller()

        call = asyncio.create_task(caller.remote("hold", timeout=5))
        await wait_until(lambda: len(RUNS) == 1, timeout=5)
        a.freeze()
        RELEASE.set()
        await asyncio.sleep(0.1)
        assert not call.done()

        a.thaw()
        assert await call == "a"


async def test_frozen_deployment_stops_heartbeats() -> None:
    async with Mesh(heartbeat_interval=0.05, heartbeat_ttl=0.3) as mesh:
        a = await _add(mesh, "a")
        a.freeze()
        await wait_until(lambda: not mesh.registry.rows.get("a") or not mesh.registry.rows["a"].is_live(), timeout=5)

        a.thaw()
        await wait_until(lambda: "a" in mesh.registry.rows and mesh.registry.rows["a"].is_live(), timeout=5)


async def test_held_call_fails_when_mesh_closes() -> None:
    mesh = Mesh()
    async with mesh:
        a = await _add(mesh, "a")
        call = asyncio.create_task(mesh.caller().remote("tally", timeout=30))
        a.freeze()
        await asyncio.sleep(0.05)
        await mesh.close()

        with pytest.raises(TransportError, match="was killed or the mesh closed"):
            await call


# -- busy -----------------------------------------------------------------------------------------------


async def test_busy_deployment_rejects_before_running() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        a.make_busy()

        with pytest.raises(BusyError) as raised:
            await mesh.caller().remote("tally", timeout=5)

        assert raised.value.payload["deployment_id"] == "a"
        assert RUNS == []

        a.make_busy(False)
        assert await mesh.caller().remote("tally", timeout=5) == "a"


async def test_busy_call_moves_to_other() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        await _add(mesh, "b")
        caller = mesh.caller()

        a.make_busy()
        served = [await caller.remote("tally", timeout=5) for _ in range(4)]

    assert served == ["b"] * 4
    assert a.calls_received >= 1


# -- payload limit ----------------------------------------------------------------------------------------


async def test_payload_limit_rejects_larger_body() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a", payload_limit=100)
        caller = mesh.caller()

        # {"data":"xxx..."} is 11 bytes more than the string.
        assert await caller.remote("tally", "x" * 89, timeout=5) == "a"
        with pytest.raises(PayloadTooLargeError) as raised:
            await caller.remote("tally", "x" * 90, timeout=5)

        assert raised.value.payload == {"max_body_size": 100}
        assert len(RUNS) == 1

        a.payload_limit = None
        assert await caller.remote("tally", "x" * 1000, timeout=5) == "a"


@pytest.mark.parametrize("limit", [0, -1, 1.5, True, "100"])
async def test_invalid_payload_limit_rejected(limit: Any) -> None:
    async with Mesh() as mesh:
        with pytest.raises(ConfigurationError, match="payload_limit must be a positive number of bytes"):
            await _add(mesh, "a", payload_limit=limit)


# -- the registry -----------------------------------------------------------------------------------------


async def test_dropped_registry_fails_discovery(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pikku_mq")
    async with Mesh(heartbeat_interval=0.05, heartbeat_ttl=1) as mesh:
        await _add(mesh, "a")
        warm = mesh.caller()
        assert await warm.remote("tally", timeout=5) == "a"

        mesh.drop_registry()
        assert await warm.remote("tally", timeout=5) == "a"
        with pytest.raises(DiscoveryError, match="registry of the test mesh was dropped") as raised:
            await mesh.caller().remote("tally", timeout=5)
        assert "<registry of test Mesh " in str(raised.value)
        assert " object at 0x" not in str(raised.value)
        with pytest.raises(DiscoveryError):
            await _add(mesh, "b")
        await wait_until(lambda: any("heartbeat of a failed" in r.getMessage() for r in caplog.records), timeout=5)

        mesh.restore_registry()
        assert await mesh.caller().remote("tally", timeout=5) == "a"


async def test_wiped_registry_filled_by_heartbeats() -> None:
    async with Mesh(heartbeat_interval=0.05, heartbeat_ttl=1) as mesh:
        await _add(mesh, "a")
        mesh.wipe_registry()
        assert mesh.registry.rows == {}

        await wait_until(lambda: "a" in mesh.registry.rows, timeout=5)


# -- misuse -----------------------------------------------------------------------------------------------


async def test_state_changes_checked() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        with pytest.raises(ConfigurationError, match="cannot thaw deployment 'a' while it is running"):
            a.thaw()
        with pytest.raises(ConfigurationError, match="cannot start deployment 'a' while it is running"):
            await a.start()
        with pytest.raises(ConfigurationError, match="already has a deployment 'a'"):
            await _add(mesh, "a")

        await a.kill()
        with pytest.raises(ConfigurationError, match="cannot freeze deployment 'a' while it is killed"):
            a.freeze()
        with pytest.raises(ConfigurationError, match=r"cannot call make_busy\(\) on deployment 'a' while it is killed"):
            a.make_busy()
        with pytest.raises(ConfigurationError, match=r"cannot call make_busy\(\) on deployment 'a' while it is killed"):
            a.make_busy(False)
        with pytest.raises(ConfigurationError, match="is killed and makes no calls"):
            _ = a.rpc
        with pytest.raises(ConfigurationError, match="transports"):
            mesh.service(transports=None)


async def test_busy_ends_with_restart() -> None:
    async with Mesh() as mesh:
        a = await _add(mesh, "a")
        a.make_busy()
        await a.kill()
        await a.start()

        assert a.busy is False
        assert await mesh.caller().remote("tally", timeout=5) == "a"


@pytest.mark.parametrize("deployment_id", ["", None, 7])
async def test_add_rejects_invalid_id(deployment_id: Any) -> None:
    async with Mesh() as mesh:
        with pytest.raises(ConfigurationError, match="deployment_id must be a non-empty string"):
            await mesh.add(deployment_id, registry=REG)

        assert mesh.deployments == []


@pytest.mark.parametrize("secret", ["x", "s" * 31, b"s" * 32])
def test_mesh_secret_error_names_argument(monkeypatch: pytest.MonkeyPatch, secret: Any) -> None:
    monkeypatch.delenv("PIKKU_REMOTE_SECRET", raising=False)
    with pytest.raises(ConfigurationError, match="the secret argument of Mesh") as raised:
        Mesh(secret=secret)

    assert "PIKKU_REMOTE_SECRET" not in str(raised.value)


# -- parity with real faults ------------------------------------------------------------------------------


def _shape(error: PikkuMQError) -> tuple[type[PikkuMQError], str, int, list[str]]:
    keys = sorted(error.payload) if isinstance(error.payload, dict) else []
    return type(error), error.code, error.http_status, keys


async def _raised(call: Awaitable[Any]) -> PikkuMQError:
    with pytest.raises(PikkuMQError) as raised:
        await call
    return raised.value


async def _kit_error(fault: str) -> PikkuMQError:
    async with Mesh() as mesh:
        a = await _add(mesh, "a", payload_limit=64 if fault == "payload" else None)
        caller = mesh.caller()
        if fault == "kill":
            await a.kill()
        elif fault == "freeze":
            a.freeze()
        elif fault == "busy":
            a.make_busy()
        elif fault == "registry":
            mesh.drop_registry()
        elif fault == "kill_in_flight":
            call = asyncio.create_task(caller.remote("hold", timeout=5))
            await wait_until(lambda: len(RUNS) == 1, timeout=5)
            await a.kill()
            return await _raised(call)
        return await _raised(caller.remote("tally", "x" * 100, timeout=0.5))


async def _real_error(fault: str) -> PikkuMQError:
    if fault == "registry":
        store = RedisDeploymentService(f"redis://127.0.0.1:{closed_port()}/0", change_feed=False)
        try:
            return await _raised(store.invoke("tally", "x" * 100, timeout=0.5))
        finally:
            await store.close()

    async with PlainMesh() as mesh:
        caller = mesh.service()
        if fault in ("kill", "freeze", "kill_in_flight"):
            mode = {"kill": None, "freeze": "hang", "kill_in_flight": "drop"}[fault]
            async with FaultyInstance(mode or "drop") as faulty:
                endpoint = f"http://127.0.0.1:{closed_port()}" if mode is None else faulty.endpoint
                await mesh.service().start(DeploymentConfig("a", endpoint, functions=["tally"]))
                return await _raised(caller.invoke("tally", "x" * 100, timeout=0.5))

        options: dict[str, Any] = {"max_body_size": 64} if fault == "payload" else {}
        if fault == "busy":
            options = {"max_concurrency": 1, "max_in_flight": 1}
        worker = PikkuWorker(
            endpoint="http://127.0.0.1:0",
            deployment_id="a",
            registry=REG,
            services="a",
            deployment_service=mesh.service(),
            **options,
        )
        async with worker:
            if fault == "busy":
                holding = asyncio.create_task(caller.invoke("hold", timeout=5))
                await wait_until(lambda: worker.dispatcher.in_flight == 1, timeout=5)
                error = await _raised(caller.invoke("tally", timeout=0.5))
                RELEASE.set()
                await holding
                return error
            return await _raised(caller.invoke("tally", "x" * 100, timeout=0.5))


@pytest.mark.parametrize("fault", ["kill", "kill_in_flight", "freeze", "busy", "payload", "registry"])
async def test_kit_errors_match_real_faults(fault: str) -> None:
    real = await _real_error(fault)
    _clear_runs()
    kit = await _kit_error(fault)

    assert _shape(kit) == _shape(real), f"kit: {kit!r}; real: {real!r}"


def test_parity_covers_every_fault() -> None:
    faults: Callable[..., Any] = test_kit_errors_match_real_faults
    marks = [mark for mark in getattr(faults, "pytestmark", []) if mark.name == "parametrize"]
    assert set(marks[0].args[1]) == {"kill", "kill_in_flight", "freeze", "busy", "payload", "registry"}
