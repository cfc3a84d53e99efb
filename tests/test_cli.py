"""The ``pikku-mq`` command, run as real subprocesses against worker processes on a temporary registry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from _support_core import closed_port

from pikku_mq import DeploymentRecord, cli

CLI_TIMEOUT = 30.0
"""Seconds one short command (call, ls) may take; starting Python and importing pikku_mq takes over a second."""
DEMO_TIMEOUT = 50.0
REGISTRATION_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0

# The console script next to this interpreter, so the test runs the entry point that pip installed.
CONSOLE_SCRIPT = shutil.which("pikku-mq", path=str(Path(sys.executable).parent))
MODULE_COMMAND = [sys.executable, "-m", "pikku_mq"]

CALC_MODULE = textwrap.dedent(
    """
    from pydantic import BaseModel

    from pikku_mq import PikkuWorker, pikku_sessionless_func

    import helpers  # registers an exposed function of its own, which this worker must not serve


    class AddIn(BaseModel):
        a: int
        b: int


    @pikku_sessionless_func(expose=True)
    async def add(services, data: AddIn) -> int:
        return data.a + data.b


    @pikku_sessionless_func
    async def hidden(services, data: int) -> int:
        return data


    def build() -> PikkuWorker:
        return PikkuWorker(deployment_id="calc-factory", functions=[add], heartbeat_interval=1, heartbeat_ttl=3)
    """
)

HELPERS_MODULE = textwrap.dedent(
    """
    from pikku_mq import pikku_sessionless_func


    @pikku_sessionless_func(expose=True)
    async def echo(services, data):
        return data
    """
)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder with an application module ``calc`` and a module ``helpers`` that it imports."""
    (tmp_path / "calc.py").write_text(CALC_MODULE)
    (tmp_path / "helpers.py").write_text(HELPERS_MODULE)
    return tmp_path


@pytest.fixture
def discovery(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
def cli_env(discovery: str) -> dict[str, str]:
    """The environment of every command: the test's registry, whatever the developer's shell sets."""
    return {**os.environ, "PIKKU_DISCOVERY_URL": discovery}


@pytest.fixture
def spawned() -> Iterator[list[subprocess.Popen[Any]]]:
    """Long-running subprocesses of a test, each in a session of its own.

    One still running at the end is killed with its process group, which holds the workers it started.
    """
    processes: list[subprocess.Popen[Any]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(STOP_TIMEOUT)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def run_cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*MODULE_COMMAND, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT
    )


def start_worker(
    spawned: list[subprocess.Popen[Any]], *args: str, cwd: Path, env: dict[str, str]
) -> subprocess.Popen[bytes]:
    command = [CONSOLE_SCRIPT] if CONSOLE_SCRIPT else MODULE_COMMAND
    with (cwd / "worker.log").open("ab") as log:
        # A session of its own, so the fixture can kill the worker with everything it started.
        process = subprocess.Popen(
            [*command, "worker", *args],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    spawned.append(process)
    return process


def list_deployments(cwd: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    completed = run_cli("ls", "--json", "--heartbeat-ttl", "3", cwd=cwd, env=env)
    assert completed.returncode == 0, completed.stderr
    records: list[dict[str, Any]] = json.loads(completed.stdout)
    return records


def wait_registered(
    deployment_id: str, process: subprocess.Popen[bytes], cwd: Path, env: dict[str, str]
) -> dict[str, Any]:
    """Poll ``pikku-mq ls --json`` until ``deployment_id`` is live; return its record."""
    deadline = time.monotonic() + REGISTRATION_TIMEOUT
    while time.monotonic() < deadline:
        assert process.poll() is None, f"worker exited with {process.returncode}: {(cwd / 'worker.log').read_text()}"
        for record in list_deployments(cwd, env):
            if record["deployment_id"] == deployment_id and record["state"] == "live":
                return record
        time.sleep(0.2)
    pytest.fail(f"{deployment_id} did not register within {REGISTRATION_TIMEOUT} s: {(cwd / 'worker.log').read_text()}")


def stop_worker(process: subprocess.Popen[bytes]) -> int:
    process.send_signal(signal.SIGTERM)
    return process.wait(STOP_TIMEOUT)


# -- demo ------------------------------------------------------------------------------------------


def test_demo_shows_failover(tmp_path: Path, spawned: list[subprocess.Popen[Any]]) -> None:
    demo = subprocess.Popen(
        [*MODULE_COMMAND, "demo"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    spawned.append(demo)
    stdout, stderr = demo.communicate(timeout=DEMO_TIMEOUT)
    lines = stdout.splitlines()

    assert demo.returncode == 0, stdout + stderr
    # The test machine runs NATS and RabbitMQ, so the demo routes over both.
    assert "NATS at 127.0.0.1:4222 answers: shouter-1 serves over NATS" in stdout
    assert "RabbitMQ at 127.0.0.1:5672 answers: greeter-2 serves over AMQP" in stdout
    assert "welcome on concierge-1, greet on greeter-1, shout on shouter-1" in stdout
    assert "welcome on concierge-1, greet on greeter-2, shout on shouter-1" in stdout

    kill_lines = [i for i, line in enumerate(lines) if "killed greeter-1" in line and "SIGKILL" in line]
    assert len(kill_lines) == 1, stdout
    assert "greeter-1 is killed with SIGKILL once 5 of them have completed" in stdout
    calls_before_kill = [line for line in lines[: kill_lines[0]] if line.startswith("  call ")]
    assert len(calls_before_kill) >= 5, stdout
    calls_after_kill = [line for line in lines[kill_lines[0] + 1 :] if line.startswith("  call ")]
    assert calls_after_kill, stdout
    # A call in flight during the kill may finish after this line, but only by failing over to greeter-2.
    assert all("greet on greeter-2" in line for line in calls_after_kill), stdout
    assert "FAILED" not in stdout

    for name in ("greeter-2", "shouter-1", "concierge-1"):
        assert f"{name} exited with status 0" in stdout
    assert "every check passed" in stdout

    # The first line names the registry file in the demo's temporary folder, which must be gone.
    registry = Path(lines[0].rsplit(" ", 1)[-1])
    assert registry.name == "registry.db"
    assert not registry.parent.exists()


def test_demo_without_brokers_uses_http(tmp_path: Path, spawned: list[subprocess.Popen[Any]]) -> None:
    nats_port, amqp_port = closed_port(), closed_port()
    env = {
        **os.environ,
        "PIKKU_NATS_URL": f"nats://127.0.0.1:{nats_port}",
        "PIKKU_AMQP_URL": f"amqp://guest:guest@127.0.0.1:{amqp_port}/",
    }
    demo = subprocess.Popen(
        [*MODULE_COMMAND, "demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    spawned.append(demo)
    stdout, stderr = demo.communicate(timeout=DEMO_TIMEOUT)

    assert demo.returncode == 0, stdout + stderr
    assert f"NATS at 127.0.0.1:{nats_port} is not reachable (connection refused): shouter-1 serves over HTTP" in stdout
    assert f"RabbitMQ at 127.0.0.1:{amqp_port} is not reachable (connection refused)" in stdout
    assert "nats://" not in stdout
    assert "amqp://" not in stdout
    assert "every check passed" in stdout


def test_demo_without_broker_libraries(tmp_path: Path, spawned: list[subprocess.Popen[Any]]) -> None:
    # The brokers answer on their standard ports, but the nats and amqp extras are not installed:
    # importing their client libraries fails, as in a plain `pip install pikku-mq`.
    hide = "import sys; sys.modules['nats'] = None; sys.modules['aio_pika'] = None; "
    demo = subprocess.Popen(
        [sys.executable, "-c", hide + "from pikku_mq.cli import main; main(['demo'])"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    spawned.append(demo)
    stdout, stderr = demo.communicate(timeout=DEMO_TIMEOUT)

    assert demo.returncode == 0, stdout + stderr
    assert "but nats-py is not installed (pip install 'pikku-mq[nats]'): shouter-1 serves over HTTP" in stdout
    assert "but aio-pika is not installed (pip install 'pikku-mq[amqp]'): greeter-2 serves over HTTP" in stdout
    assert "every check passed" in stdout


def test_demo_interrupt_cleans_up(tmp_path: Path, spawned: list[subprocess.Popen[Any]]) -> None:
    # TMPDIR points the demo's temporary folder here, so the test finds only the folders of its own run.
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    demo = subprocess.Popen(
        [*MODULE_COMMAND, "demo"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    spawned.append(demo)
    started = time.monotonic()

    # A signal during the imports only ends the process, so wait until the demo has made its folder.
    deadline = started + REGISTRATION_TIMEOUT
    while not list(tmp_path.glob("pikku-mq-demo-*")):
        assert demo.poll() is None, f"the demo exited with {demo.returncode} before it made its folder"
        assert time.monotonic() < deadline, f"the demo made no folder within {REGISTRATION_TIMEOUT} s"
        time.sleep(0.05)
    time.sleep(max(0.0, started + 1.5 - time.monotonic()))

    # As a Ctrl-C in a terminal does, send SIGINT to the whole process group, workers included.
    os.killpg(demo.pid, signal.SIGINT)
    stdout, stderr = demo.communicate(timeout=DEMO_TIMEOUT)

    assert demo.returncode == 130, stdout + stderr
    assert list(tmp_path.glob("pikku-mq-demo-*")) == [], stdout + stderr
    # The workers are in the demo's process group, which is empty once they have all exited.
    with pytest.raises(ProcessLookupError):
        os.killpg(demo.pid, 0)


# -- worker, call and ls ---------------------------------------------------------------------------


def test_worker_call_and_ls(
    project: Path, discovery: str, cli_env: dict[str, str], spawned: list[subprocess.Popen[Any]]
) -> None:
    worker = start_worker(
        spawned,
        "calc",
        "--id",
        "calc-1",
        "--endpoint",
        "http://127.0.0.1:0",
        "--discovery",
        discovery,
        "--heartbeat-interval",
        "1",
        "--heartbeat-ttl",
        "3",
        cwd=project,
        env=cli_env,
    )
    record = wait_registered("calc-1", worker, project, cli_env)

    assert record["functions"] == ["add"]
    assert urlsplit(record["endpoint"]).hostname == "127.0.0.1"
    assert (urlsplit(record["endpoint"]).port or 0) > 0
    assert 0 <= record["heartbeat_age"] < 3

    added = run_cli("call", "add", '{"a": 2, "b": 3}', "--discovery", discovery, cwd=project, env=cli_env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == 5

    invalid = run_cli("call", "add", '{"a": "two", "b": 3}', cwd=project, env=cli_env)
    assert invalid.returncode == 1
    assert invalid.stdout == ""
    assert invalid.stderr.startswith("InputValidationError (422, invalid_input):")

    # helpers.echo is exposed and imported by calc, but it is not defined in calc, so it is not served.
    not_served = run_cli("call", "echo", '"hi"', cwd=project, env=cli_env)
    assert not_served.returncode == 1
    assert not_served.stderr.startswith("FunctionNotFoundError (404, function_not_found):")

    table = run_cli("ls", "--heartbeat-ttl", "3", cwd=project, env=cli_env)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["ID", "STATE", "HEARTBEAT", "ENDPOINT", "FUNCTIONS"]
    assert row.split()[:2] == ["calc-1", "live"]
    assert row.split()[-2:] == [record["endpoint"], "add"]

    assert stop_worker(worker) == 0
    assert list_deployments(project, cli_env) == []


def test_worker_duplicate_id_rejected(
    project: Path, discovery: str, cli_env: dict[str, str], spawned: list[subprocess.Popen[Any]]
) -> None:
    holder = start_worker(spawned, "calc", "--id", "calc-dup", "--discovery", discovery, cwd=project, env=cli_env)
    record = wait_registered("calc-dup", holder, project, cli_env)

    second = run_cli("worker", "calc", "--id", "calc-dup", "--discovery", discovery, cwd=project, env=cli_env)

    assert second.returncode == 2
    assert "deployment id 'calc-dup' is held by a live instance" in second.stderr
    assert "draining" not in second.stderr
    [still] = list_deployments(project, cli_env)
    assert still["endpoint"] == record["endpoint"]
    assert stop_worker(holder) == 0


def test_worker_from_factory(project: Path, cli_env: dict[str, str], spawned: list[subprocess.Popen[Any]]) -> None:
    worker = start_worker(spawned, "calc:build", cwd=project, env=cli_env)
    record = wait_registered("calc-factory", worker, project, cli_env)

    assert record["functions"] == ["add"]
    added = run_cli("call", "add", '{"a": 40, "b": 2}', cwd=project, env=cli_env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == 42
    assert stop_worker(worker) == 0


def test_worker_on_nats_endpoint(
    project: Path, discovery: str, cli_env: dict[str, str], spawned: list[subprocess.Popen[Any]]
) -> None:
    # The shared nats-server of the test machine, on a subject prefix of this test's own.
    endpoint = f"nats://127.0.0.1:4222/pikku_t_cli_{uuid.uuid4().hex[:12]}"
    env = {**cli_env, "PIKKU_NATS_URL": "nats://127.0.0.1:4222"}
    worker = start_worker(
        spawned,
        "calc",
        "--id",
        "calc-nats",
        "--endpoint",
        endpoint,
        "--nats-url",
        "nats://pikku:secret@127.0.0.1:4222",
        "--heartbeat-interval",
        "1",
        "--heartbeat-ttl",
        "3",
        cwd=project,
        env=env,
    )
    record = wait_registered("calc-nats", worker, project, env)

    assert record["endpoint"] == endpoint
    added = run_cli("call", "add", '{"a": 20, "b": 22}', cwd=project, env=env)
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout) == 42
    assert stop_worker(worker) == 0
    assert list_deployments(project, env) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["calc:build", "--id", "x"], "--id cannot be combined with MODULE:ATTR"),
        (["calc:add"], "calc:add is a pikku function, not a worker"),
        (["calc:missing"], "module 'calc' has no attribute 'missing'"),
        (["no_such_module"], "module 'no_such_module' was not found"),
        (["helpers", "--heartbeat-interval", "0"], "must be a positive, finite number of seconds"),
        (["helpers", "--max-in-flight", "0"], "expected a positive whole number, got '0'"),
        (["helpers", "--max-concurrency", "many"], "expected a positive whole number, got 'many'"),
        (["helpers", "--max-concurrency", "20", "--max-in-flight", "10"], "must be at least max_concurrency"),
        (["calc:build", "--bind-host", "0.0.0.0"], "--bind-host cannot be combined with MODULE:ATTR"),
        (["helpers", "--endpoint", "nats://127.0.0.1:4222"], "has no subject prefix"),
        (["calc:build", "--nats-url", "nats://127.0.0.1:4222"], "--nats-url cannot be combined with MODULE:ATTR"),
        (["helpers", "--dedup-window", "-1"], "must be a finite number of seconds, 0 or more, got '-1'"),
        (["calc:build", "--dedup-window", "5"], "--dedup-window cannot be combined with MODULE:ATTR"),
    ],
)
def test_worker_rejects_bad_arguments(project: Path, cli_env: dict[str, str], args: list[str], message: str) -> None:
    completed = run_cli("worker", *args, cwd=project, env=cli_env)

    assert completed.returncode == 2
    assert message in completed.stderr


def test_call_missing_function(tmp_path: Path, cli_env: dict[str, str]) -> None:
    completed = run_cli("call", "no_such_function", "{}", cwd=tmp_path, env=cli_env)

    assert completed.returncode == 1
    assert completed.stdout == ""
    first_line, payload_line = completed.stderr.splitlines()
    assert first_line.startswith("FunctionNotFoundError (404, function_not_found):")
    assert "no_such_function" in first_line
    assert json.loads(payload_line.removeprefix("payload: ")) == {"function": "no_such_function"}


def test_call_invalid_json(tmp_path: Path, cli_env: dict[str, str]) -> None:
    completed = run_cli("call", "add", "{a: 1}", cwd=tmp_path, env=cli_env)

    assert completed.returncode == 2
    assert completed.stdout == ""
    assert "invalid JSON input data" in completed.stderr


def test_ls_without_registry_file(tmp_path: Path, discovery: str, cli_env: dict[str, str]) -> None:
    table = run_cli("ls", cwd=tmp_path, env=cli_env)
    as_json = run_cli("ls", "--json", cwd=tmp_path, env=cli_env)
    call = run_cli("call", "add", cwd=tmp_path, env=cli_env)

    assert table.returncode == 0
    assert table.stdout.strip() == f"no deployments registered in {discovery}"
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == []
    assert call.returncode == 1
    # Reading commands must not create the registry file.
    assert not (tmp_path / "registry.db").exists()


def test_worker_limits_and_bind_host_applied(project: Path, cli_env: dict[str, str]) -> None:
    # A child process builds the worker, so importing the project's module leaves this process's registry alone.
    script = textwrap.dedent(
        """
        import json
        from pikku_mq import cli

        args = cli.build_parser().parse_args(
            [
                "worker", "helpers", "--bind-host", "0.0.0.0", "--max-concurrency", "7", "--max-in-flight", "70",
                "--dedup-window", "5",
            ]
        )
        worker = cli._worker_for_module(cli._import_module("helpers"), args)
        limits = [
            worker.bind_host,
            worker.dispatcher.max_concurrency,
            worker.dispatcher.max_in_flight,
            worker.dispatcher.records.window,
        ]
        print(json.dumps(limits))
        """
    )
    command = [sys.executable, "-c", script]
    completed = subprocess.run(
        command, cwd=project, env=cli_env, capture_output=True, text=True, timeout=60, check=False
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == ["0.0.0.0", 7, 70, 5.0]


def test_ls_never_prints_password(tmp_path: Path, cli_env: dict[str, str]) -> None:
    # redis-py 8.2 logs in to a server without a password and goes on, so this lists the shared server
    # (where the tests' own keys use other prefixes) and names it in its output.
    url = "redis://:S3cr3tPW@127.0.0.1:6379/0?password=S3cr3tPW"
    completed = run_cli("ls", "--discovery", url, cwd=tmp_path, env=cli_env)

    output = completed.stdout + completed.stderr
    assert completed.returncode in (0, 1), output
    assert "S3cr3tPW" not in output
    assert "127.0.0.1:6379" in output


def test_ls_escapes_control_characters() -> None:
    record = DeploymentRecord(
        deployment_id="evil\nadmin-1  live",
        endpoint="http://x\x1b[31m",
        functions=("ok", "bell\x07"),
        heartbeat_age=0.0,
        state="live",
    )
    table = cli.format_deployments([record])

    assert len(table.splitlines()) == 2
    assert "evil\\nadmin-1  live" in table
    assert "http://x\\x1b[31m" in table
    assert "ok, bell\\x07" in table
    assert "\x1b" not in table
