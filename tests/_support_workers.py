"""Worker subprocesses of a test: started from a script, found in the registry, killed at the end."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from pikku_mq import deployment_service_from_url

REGISTRATION_TIMEOUT = 20.0
"""Seconds a worker process gets to start and register (imports are slow on a loaded 2-core host)."""


class WorkerProcess:
    """A worker subprocess, its deployment id and the file that receives its stderr."""

    def __init__(self, deployment_id: str, process: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.deployment_id = deployment_id
        self.process = process
        self.stderr_path = stderr_path
        self.endpoint = ""
        """The advertised endpoint, set once the worker is seen in the registry."""

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        """Send SIGKILL and reap the process, so its port refuses connections from now on."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)


class WorkerProcesses:
    """Starts worker scripts as subprocesses of this test and kills the survivors at its end.

    A script is run as ``python SCRIPT --id ID --discovery URL ARGS...`` and must serve until a signal,
    typically by calling ``PikkuWorker(...).run()``.
    """

    def __init__(self, tmp_path: Path, discovery_url: str) -> None:
        self.tmp_path = tmp_path
        self.discovery_url = discovery_url
        self.workers: list[WorkerProcess] = []
        self._files: list[IO[bytes]] = []
        self._registry = deployment_service_from_url(discovery_url)

    def launch(self, script: Path, deployment_id: str, *args: str) -> WorkerProcess:
        """Start ``script`` without waiting for it to register."""
        stderr_path = self.tmp_path / f"{deployment_id}.stderr"
        stderr_file = stderr_path.open("wb")
        self._files.append(stderr_file)
        command = [sys.executable, str(script), "--id", deployment_id, "--discovery", self.discovery_url, *args]
        process = subprocess.Popen(
            command, cwd=self.tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr_file
        )
        worker = WorkerProcess(deployment_id, process, stderr_path)
        self.workers.append(worker)
        return worker

    async def start(self, script: Path, deployment_id: str, *args: str) -> WorkerProcess:
        """Start ``script`` and return once its deployment id is in the registry."""
        worker = self.launch(script, deployment_id, *args)
        await self.wait_registered(worker)
        return worker

    async def wait_registered(self, worker: WorkerProcess, timeout: float = REGISTRATION_TIMEOUT) -> None:
        await self._registry.init()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if worker.process.poll() is not None:
                raise AssertionError(
                    f"worker {worker.deployment_id} exited with {worker.process.returncode} before it registered:\n"
                    f"{worker.stderr()}"
                )
            for record in await self._registry.list_deployments():
                if record.deployment_id == worker.deployment_id:
                    worker.endpoint = record.endpoint
                    return
            await asyncio.sleep(0.05)
        raise AssertionError(f"worker {worker.deployment_id} did not register within {timeout} s:\n{worker.stderr()}")

    async def close(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.process.kill()
            worker.process.wait(timeout=10)
        for file in self._files:
            file.close()
        await self._registry.close()
