"""``pikku-mq ls --watch`` in a subprocess, on an SQLite registry that the test changes."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import sys
from pathlib import Path

import pytest

from pikku_mq import DeploymentConfig, SqliteDeploymentService

INTERVAL = 0.2
TTL = 0.6
LINE_TIMEOUT = 10.0
"""Seconds to wait for one line: the subprocess imports pikku_mq first, which takes a second or two."""


def _config(deployment_id: str) -> DeploymentConfig:
    return DeploymentConfig(
        deployment_id=deployment_id,
        endpoint=f"http://127.0.0.1:1/{deployment_id}",
        functions=["greet", "add"],
        fallback_endpoints=(f"http://127.0.0.1:2/{deployment_id}",),
    )


def _watch_args(registry: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pikku_mq",
        "ls",
        "--watch",
        "--discovery",
        f"sqlite:///{registry}",
        "--poll-interval",
        "0.2",
        "--heartbeat-ttl",
        str(TTL),
        *extra,
    ]


@pytest.fixture
async def registry(tmp_path: Path) -> Path:
    path = tmp_path / "registry.db"
    service = SqliteDeploymentService(path, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    await service.init()
    await service.close()
    return path


async def _read_line(process: asyncio.subprocess.Process) -> str:
    assert process.stdout is not None
    async with asyncio.timeout(LINE_TIMEOUT):
        line = await process.stdout.readline()
    assert line, "ls --watch exited before printing the expected line"
    return line.decode().rstrip("\n")


async def _stop(process: asyncio.subprocess.Process) -> int:
    process.send_signal(signal.SIGTERM)
    async with asyncio.timeout(LINE_TIMEOUT):
        return await process.wait()


async def test_watch_prints_line_per_event(registry: Path) -> None:
    service = SqliteDeploymentService(registry, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    await service.start(_config("cli-a"))
    process = await asyncio.create_subprocess_exec(*_watch_args(registry), stdout=asyncio.subprocess.PIPE)
    try:
        existing = await _read_line(process)
        assert existing == "join\tcli-a\thttp://127.0.0.1:1/cli-a http://127.0.0.1:2/cli-a\tadd,greet"

        other = SqliteDeploymentService(registry, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
        await other.start(_config("cli-b"))
        assert (await _read_line(process)).split("\t")[:2] == ["join", "cli-b"]
        await other.stop()
        await other.close()
        assert (await _read_line(process)).split("\t")[:2] == ["leave", "cli-b"]

        await service._stop_heartbeats()  # as if killed
        assert (await _read_line(process)).split("\t")[:2] == ["expired", "cli-a"]
        assert await _stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await service.close()


async def test_watch_json_lines(registry: Path) -> None:
    process = await asyncio.create_subprocess_exec(*_watch_args(registry, "--json"), stdout=asyncio.subprocess.PIPE)
    service = SqliteDeploymentService(registry, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    try:
        await asyncio.sleep(0.5)
        await service.start(_config("cli-json"))
        event = json.loads(await _read_line(process))
        assert event == {
            "kind": "join",
            "deployment_id": "cli-json",
            "endpoint": "http://127.0.0.1:1/cli-json",
            "fallback_endpoints": ["http://127.0.0.1:2/cli-json"],
            "functions": ["add", "greet"],
            "hostname": service.hostname,
        }
        assert await _stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await service.close()


async def test_watch_redraws_table_on_terminal(registry: Path) -> None:
    controller, terminal = pty.openpty()
    process = await asyncio.create_subprocess_exec(
        *_watch_args(registry), stdout=terminal, stderr=terminal, env={**os.environ, "COLUMNS": "160", "TERM": "xterm"}
    )
    os.close(terminal)
    service = SqliteDeploymentService(registry, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    output = b""

    async def read_until(text: bytes) -> None:
        nonlocal output
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(LINE_TIMEOUT):
            while text not in output:
                output += await loop.run_in_executor(None, os.read, controller, 65536)

    try:
        await read_until(b"deployments in")
        await service.start(_config("cli-tty"))
        await read_until(b"last event: join cli-tty")
        assert b"cli-tty" in output
        assert b"add, greet" in output
        assert await _stop(process) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        os.close(controller)
        await service.close()


def test_poll_interval_needs_watch(tmp_path: Path) -> None:
    from pikku_mq.cli import run

    with pytest.raises(SystemExit) as raised:
        run(["ls", "--discovery", f"sqlite:///{tmp_path / 'r.db'}", "--poll-interval", "1"])
    assert raised.value.code == 2
