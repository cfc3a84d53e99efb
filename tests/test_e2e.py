"""Two worker processes on one SQLite registry call each other over HTTP, with the test as a third party."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from pikku_mq import DeploymentService

if TYPE_CHECKING:
    from conftest import WorkerProcesses

# Importing the workers' module registers GreetingRefusedError here, so the caller re-raises that class.
sys.path.insert(0, str(Path(__file__).parent / "apps"))
from mesh_worker import GreetingRefusedError

MESH_WORKER = Path(__file__).parent / "apps" / "mesh_worker.py"


@pytest.fixture
async def mesh(worker_processes: WorkerProcesses) -> WorkerProcesses:
    """Start process A with greet and remote_farewell, and process B with farewell and remote_greet."""
    a = worker_processes.launch(MESH_WORKER, "process-a", "--functions", "greet,remote_farewell")
    b = worker_processes.launch(MESH_WORKER, "process-b", "--functions", "farewell,remote_greet")
    await worker_processes.wait_registered(a)
    await worker_processes.wait_registered(b)
    return worker_processes


async def test_calls_both_directions(mesh: WorkerProcesses, caller: DeploymentService) -> None:
    b_to_a = await caller.invoke("remote_greet", {"name": "Ada"}, timeout=10)
    a_to_b = await caller.invoke("remote_farewell", {"name": "Ada"}, timeout=10)

    assert b_to_a == {"greeting": "Hello, Ada!", "served_by": "process-a"}
    assert a_to_b == {"greeting": "Goodbye, Ada!", "served_by": "process-b"}
    assert [i.deployment_id for i in await caller.find_function("greet")] == ["process-a"]
    assert [i.deployment_id for i in await caller.find_function("remote_greet")] == ["process-b"]


async def test_typed_error_crosses_two_hops(mesh: WorkerProcesses, caller: DeploymentService) -> None:
    with pytest.raises(GreetingRefusedError) as raised:
        await caller.invoke("remote_greet", {"name": "nobody"}, timeout=10)

    assert raised.value.message == "greet refuses to greet 'nobody'"
    assert raised.value.payload == {"name": "nobody"}
    assert raised.value.code == "greeting_refused"
