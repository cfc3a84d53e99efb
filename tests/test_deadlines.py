"""Deadlines and the hop limit across worker processes: A calls B calls C, each a process of its own.

The processes share an SQLite registry and call each other over HTTP. Each hop that runs creates a
file named after its deployment id and hop count, so the test can tell which hops ran.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from _support_core import Mesh

from pikku_mq import RPC, DeadlineExceededError, DeploymentService, LoopDetectedError
from pikku_mq._types import MAX_HOPS

if TYPE_CHECKING:
    from conftest import WorkerProcesses

MESH_WORKER = Path(__file__).parent / "apps" / "mesh_worker.py"


@pytest.fixture
async def chain(worker_processes: WorkerProcesses) -> WorkerProcesses:
    """Start processes a, b and c, hosting chain_a, chain_b and chain_c."""
    started = [worker_processes.launch(MESH_WORKER, name, "--functions", f"chain_{name}") for name in "abc"]
    for worker in started:
        await worker_processes.wait_registered(worker)
    return worker_processes


def _arrivals(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


async def test_last_hop_sees_budget_left(chain: WorkerProcesses, caller: DeploymentService, tmp_path: Path) -> None:
    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()
    data = {"route": ["chain_b", "chain_c"], "pause": 0.4, "arrivals_dir": str(arrivals)}

    started = time.monotonic()
    result = await caller.invoke("chain_a", data, timeout=4.0)
    elapsed = time.monotonic() - started

    assert result["path"] == ["a", "b", "c"]
    assert result["hop"] == 3
    # c got what was left of the caller's 4 s after a and b waited 0.4 s each, and then waited itself.
    assert 4.0 - elapsed <= result["remaining"] <= 4.0 - 0.8 - 0.4
    assert result["remaining"] > 1.0
    assert _arrivals(arrivals) == ["a-1", "b-2", "c-3"]


async def test_spent_budget_not_forwarded(chain: WorkerProcesses, caller: DeploymentService, tmp_path: Path) -> None:
    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()
    # Each hop blocks its event loop for 1.8 s: a calls b with 1.2 s left, and b blocks past the
    # deadline, so its worker cannot cancel it before its nested call.
    data = {"route": ["chain_b", "chain_c"], "pause": 1.8, "blocking": True, "arrivals_dir": str(arrivals)}

    with pytest.raises(DeadlineExceededError):
        await caller.invoke("chain_a", data, timeout=3.0)

    # c is never called: b's nested call finds its budget spent and is not started. The wait gives
    # b time to finish blocking, and a c that was called time to leave its file.
    await asyncio.sleep(1.5)
    assert _arrivals(arrivals) == ["a-1", "b-2"]


async def test_hop_limit_stops_loop(chain: WorkerProcesses, caller: DeploymentService, tmp_path: Path) -> None:
    arrivals = tmp_path / "arrivals"
    arrivals.mkdir()
    # a and b call each other back and forth, more times than the hop limit allows.
    route = ["chain_b", "chain_a"] * MAX_HOPS

    with pytest.raises(LoopDetectedError) as caught:
        await caller.invoke("chain_a", {"route": route, "arrivals_dir": str(arrivals)}, timeout=20)

    assert caught.value.status == 508
    # a runs the odd hops and b the even ones, up to the limit and no further.
    expected = sorted(f"{'a' if hop % 2 else 'b'}-{hop}" for hop in range(1, MAX_HOPS + 1))
    assert _arrivals(arrivals) == expected


async def test_spent_budget_skips_lookup() -> None:
    async with Mesh() as mesh:
        rpc = RPC(deployment_service=mesh.service(), deadline=time.monotonic() - 0.1, hop=1)

        with pytest.raises(DeadlineExceededError, match="'anything' was not started") as caught:
            await rpc.remote("anything")

    assert caught.value.payload == {"function": "anything", "attempts": 0}
    assert mesh.registry.lookups == 0
