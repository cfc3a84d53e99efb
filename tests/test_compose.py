"""compose/: what can be checked without a Docker engine.

The file must be valid YAML with health checks on every server, and every pikku-mq command in it must
parse. Then the rehearsal runs the mesh's own commands on this machine: each service name becomes
127.0.0.1, each HTTP port a free one, and the subject prefix, vhost and discovery store become the
test's own. The caller's command must then print the result of a call that crossed HTTP, NATS and AMQP.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import yaml
from _support_core import closed_port

from pikku_mq import cli, deployment_service_from_url

ROOT = Path(__file__).parent.parent
COMPOSE = ROOT / "compose" / "docker-compose.yml"
DOCKERFILE = ROOT / "compose" / "Dockerfile"
SERVERS = ("postgres", "redis", "nats", "rabbitmq")
WORKERS = ("greeter-nats", "shouter-amqp", "concierge-http")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def pikku_commands(compose: dict[str, Any]) -> dict[str, list[str]]:
    """Return the pikku-mq argument list of each service, the caller's taken out of its shell loop."""
    commands = {}
    for name, service in compose["services"].items():
        command = service.get("command")
        if not command:
            continue
        if command[0] == "pikku-mq":
            commands[name] = list(command[1:])
        elif command[:2] == ["sh", "-c"]:
            words = shlex.split(command[2])
            start = words.index("pikku-mq")
            end = next((i for i in range(start, len(words)) if words[i].endswith(";")), len(words) - 1)
            commands[name] = [*words[start + 1 : end], words[end].rstrip(";")]
    return commands


# -- the file -------------------------------------------------------------------------------------


def test_servers_have_health_checks(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in SERVERS:
        assert services[name]["healthcheck"]["test"], name


def test_workers_wait_for_healthy_servers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in (*WORKERS, "caller"):
        depends = services[name]["depends_on"]
        for server in SERVERS:
            assert depends[server]["condition"] == "service_healthy", (name, server)


def test_commands_parse(compose: dict[str, Any]) -> None:
    commands = pikku_commands(compose)
    assert set(commands) == {*WORKERS, "caller"}
    parser = cli.build_parser()
    for name, args in commands.items():
        parsed = parser.parse_args(args)
        assert parsed.handler in (cli._run_worker, cli._run_call), name


def test_endpoints_carry_no_credentials(compose: dict[str, Any]) -> None:
    for name, args in pikku_commands(compose).items():
        for arg in args:
            if arg.startswith(("--endpoint=", "--fallback-endpoint=")):
                assert "@" not in arg, (name, arg)


def test_dockerfile_copies_what_exists() -> None:
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            for source in line.split()[1:-1]:
                assert (ROOT / source).exists(), source


# -- the rehearsal ------------------------------------------------------------------------------------


def rewrite(args: list[str], ports: dict[str, int], prefix: str, vhost: str) -> list[str]:
    """Point a compose command at this machine: hosts, ports, subject prefix and vhost of the test."""
    rewritten = []
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag in ("--endpoint", "--fallback-endpoint") and value:
            parts = urlsplit(value)
            if parts.scheme == "http":
                value = f"http://127.0.0.1:{ports[parts.hostname or '']}"
            elif parts.scheme == "nats":
                value = f"nats://127.0.0.1:4222/{prefix}.{parts.path.strip('/')}"
            elif parts.scheme == "amqp":
                value = urlunsplit(("amqp", "127.0.0.1:5672", f"/{vhost}", f"{parts.query}-{prefix}", ""))
            arg = f"{flag}={value}"
        elif flag == "--bind-host":
            arg = "--bind-host=127.0.0.1"
        rewritten.append(arg)
    return rewritten


@pytest.fixture
def rehearsal_env(tmp_path: Path, amqp_vhost: str) -> dict[str, str]:
    tag = uuid.uuid4().hex[:12]
    return {
        **os.environ,
        "PIKKU_DISCOVERY_URL": f"sqlite:///{tmp_path / 'registry.db'}",
        "PIKKU_NATS_URL": "nats://127.0.0.1:4222",
        "PIKKU_AMQP_URL": "amqp://guest:guest@127.0.0.1:5672/",
        "PIKKU_NATS_PRESENCE_SUBJECT": f"pikku_t_{tag}.presence",
        "PIKKU_AMQP_PRESENCE_EXCHANGE": f"pikku_t_{tag}.presence",
    }


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


async def wait_registered(url: str, deployment_ids: set[str], started: list[subprocess.Popen[bytes]]) -> bool:
    """Return True once every id is in the registry at ``url``, or False after 30 s or a worker's exit."""
    registry = deployment_service_from_url(url)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and all(p.poll() is None for p in started):
            await registry.init()
            if {record.deployment_id for record in await registry.list_deployments()} >= deployment_ids:
                return True
            await asyncio.sleep(0.1)
        return False
    finally:
        await registry.close()


def test_mesh_commands_run_here(
    compose: dict[str, Any],
    rehearsal_env: dict[str, str],
    amqp_vhost: str,
    tmp_path: Path,
    started: list[subprocess.Popen[bytes]],
) -> None:
    commands = pikku_commands(compose)
    ports = {name: closed_port() for name in WORKERS}
    prefix = f"pikku_t_{uuid.uuid4().hex[:12]}"
    for name in WORKERS:
        args = rewrite(commands[name], ports, prefix, amqp_vhost)
        with (tmp_path / f"{name}.log").open("wb") as log:
            command = [sys.executable, "-m", "pikku_mq", *args]
            started.append(subprocess.Popen(command, cwd=tmp_path, env=rehearsal_env, stdout=log, stderr=log))

    registered = asyncio.run(wait_registered(rehearsal_env["PIKKU_DISCOVERY_URL"], set(WORKERS), started))
    assert registered, f"the workers did not register within 30 s:\n{_logs(tmp_path)}"

    called = subprocess.run(
        [sys.executable, "-m", "pikku_mq", *commands["caller"]],
        cwd=tmp_path,
        env=rehearsal_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert called.returncode == 0, called.stderr + _logs(tmp_path)
    result = json.loads(called.stdout)
    assert result["message"] == "Hello, compose! HELLO, COMPOSE!"
    assert set(result["pids"]) == {"welcome", "greet", "shout"}

    for process in started:
        process.send_signal(signal.SIGTERM)
    for process in started:
        assert process.wait(timeout=30) == 0, _logs(tmp_path)


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"--- {path.name}\n{path.read_text(errors='replace')}" for path in sorted(tmp_path.glob("*.log")))
