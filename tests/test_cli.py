"""The ``pikku-mq`` command, run as real subprocesses against worker processes on a temporary registry."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from _support_amqp import rabbitmqctl
from _support_core import closed_port

from pikku_mq import DeploymentConfig, DeploymentRecord, SqliteDeploymentService, cli
from pikku_mq import _errors as errors

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
    assert presence_exchange_of(stdout) not in amqp_exchanges()


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
    # The brokers accept connections on their standard ports, but the nats and amqp extras are not installed:
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


def test_demo_interrupt_deletes_presence_exchange(tmp_path: Path, spawned: list[subprocess.Popen[Any]]) -> None:
    demo = subprocess.Popen(
        [*MODULE_COMMAND, "demo"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    spawned.append(demo)
    lines: queue.Queue[str] = queue.Queue()
    assert demo.stdout is not None
    threading.Thread(target=lambda: [lines.put(line) for line in demo.stdout or ()], daemon=True).start()

    # The registry table, printed once every worker registered, names the AMQP queue of this run.
    output = ""
    deadline = time.monotonic() + REGISTRATION_TIMEOUT
    while "queue=pikku-demo-" not in output:
        assert time.monotonic() < deadline, f"the demo printed no AMQP endpoint within {REGISTRATION_TIMEOUT} s"
        with contextlib.suppress(queue.Empty):
            output += lines.get(timeout=1.0)
    exchange = presence_exchange_of(output)
    assert exchange in amqp_exchanges()

    os.killpg(demo.pid, signal.SIGINT)
    _, stderr = demo.communicate(timeout=DEMO_TIMEOUT)

    assert demo.returncode == 130, stderr
    assert exchange not in amqp_exchanges()


def presence_exchange_of(demo_output: str) -> str:
    """Return the presence exchange of a demo run, named after the tag of its AMQP queue."""
    match = re.search(r"queue=pikku-demo-([0-9a-f]+)\.greeter-2", demo_output)
    assert match is not None, demo_output
    return f"pikku_demo_{match.group(1)}.presence"


def amqp_exchanges() -> set[str]:
    return set(rabbitmqctl("--no-table-headers", "list_exchanges", "-p", "/", "name").split())


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
    assert invalid.returncode == cli.EXIT_REJECTED
    assert invalid.stdout == ""
    assert invalid.stderr.startswith("InputValidationError (422, invalid_input):")

    # helpers.echo is exposed and imported by calc, but it is not defined in calc, so it is not served.
    not_served = run_cli("call", "echo", '"hi"', cwd=project, env=cli_env)
    assert not_served.returncode == cli.EXIT_NOT_FOUND
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
        (["calc:build", "--durable-notify"], "--durable-notify cannot be combined with MODULE:ATTR"),
        (["calc:build", "--events", "nats://127.0.0.1:4222/ev"], "--events cannot be combined with MODULE:ATTR"),
        (["helpers", "--events", "redis://127.0.0.1/ev"], "the event bus URL must be nats://"),
    ],
)
def test_worker_rejects_bad_arguments(project: Path, cli_env: dict[str, str], args: list[str], message: str) -> None:
    completed = run_cli("worker", *args, cwd=project, env=cli_env)

    assert completed.returncode == 2
    assert message in completed.stderr


def test_call_missing_function(tmp_path: Path, cli_env: dict[str, str]) -> None:
    completed = run_cli("call", "no_such_function", "{}", cwd=tmp_path, env=cli_env)

    assert completed.returncode == cli.EXIT_NOT_FOUND
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


@pytest.mark.parametrize(
    ("session", "kind"),
    [("[1, 2]", "an array"), ('"alice"', "a string"), ("7", "a number"), ("true", "a boolean"), ("null", "null")],
)
def test_call_session_not_object(tmp_path: Path, cli_env: dict[str, str], session: str, kind: str) -> None:
    env = {**cli_env, "PIKKU_REMOTE_SECRET": SECRET}
    completed = run_cli("call", "whoami", "--session", session, cwd=tmp_path, env=env)

    assert completed.returncode == cli.EXIT_USAGE
    assert completed.stdout == ""
    assert f"--session must be a JSON object, e.g. '{{\"user_id\": 7}}', got {kind}" in completed.stderr
    assert "Traceback" not in completed.stderr


@pytest.mark.parametrize("command", [["worker", "helpers"], ["call", "echo", "1"]])
def test_invalid_metrics_env_exits_2(project: Path, cli_env: dict[str, str], command: list[str]) -> None:
    env = {**cli_env, "PIKKU_METRICS": "maybe"}
    completed = run_cli(*command, cwd=project, env=env)

    assert completed.returncode == cli.EXIT_USAGE
    assert "PIKKU_METRICS must be 1, true, yes or on" in completed.stderr
    assert "got 'maybe'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_ls_without_registry_file(tmp_path: Path, discovery: str, cli_env: dict[str, str]) -> None:
    table = run_cli("ls", cwd=tmp_path, env=cli_env)
    as_json = run_cli("ls", "--json", cwd=tmp_path, env=cli_env)
    call = run_cli("call", "add", cwd=tmp_path, env=cli_env)

    assert table.returncode == 0
    assert table.stdout.strip() == f"no deployments registered in {discovery}"
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == []
    assert call.returncode == cli.EXIT_NOT_FOUND
    # Reading commands must not create the registry file.
    assert not (tmp_path / "registry.db").exists()


def test_worker_events_flags_applied(project: Path, cli_env: dict[str, str]) -> None:
    script = textwrap.dedent(
        """
        import json
        from pikku_mq import cli

        args = cli.build_parser().parse_args(
            ["worker", "helpers", "--events", "nats://127.0.0.1:4222/app-events", "--durable-notify"]
        )
        worker = cli._worker_for_module(cli._import_module("helpers"), args)
        print(json.dumps([type(worker.events).__name__, worker.events.prefix, worker.durable_notify]))
        """
    )
    command = [sys.executable, "-c", script]
    completed = subprocess.run(
        command, cwd=project, env=cli_env, capture_output=True, text=True, timeout=60, check=False
    )

    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout) == ["JetStreamEventBus", "app-events", True]


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


# -- call: errors, sessions, transports -------------------------------------------------------------

TOOLS_MODULE = textwrap.dedent(
    """
    import asyncio

    from pikku_mq import pikku_func, pikku_sessionless_func


    @pikku_sessionless_func(expose=True)
    async def nap(services, data: float) -> str:
        await asyncio.sleep(data)
        return "awake"


    @pikku_func(expose=True)
    async def whoami(services, data, wire):
        return wire.session
    """
)

SECRET = "0123456789abcdef0123456789abcdef-cli"


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """A folder with a module ``tools`` whose functions sleep and return the caller's session."""
    (tmp_path / "tools.py").write_text(TOOLS_MODULE)
    return tmp_path


def run_console(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Run the installed ``pikku-mq`` console script, as a user's shell does."""
    assert CONSOLE_SCRIPT is not None, "pikku-mq is not installed next to this interpreter"
    return subprocess.run(
        [CONSOLE_SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False
    )


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errors.DiscoveryError("down"), cli.EXIT_DISCOVERY),
        (errors.FunctionNotFoundError("missing"), cli.EXIT_NOT_FOUND),
        (errors.NotFoundError("missing"), cli.EXIT_NOT_FOUND),
        (errors.DeadlineExceededError("late"), cli.EXIT_DEADLINE),
        (errors.RoutingError("none"), cli.EXIT_UNAVAILABLE),
        (errors.BusyError("busy"), cli.EXIT_UNAVAILABLE),
        (errors.ServiceUnavailableError("draining"), cli.EXIT_UNAVAILABLE),
        (errors.EndpointUnreachableError("refused"), cli.EXIT_UNAVAILABLE),
        (errors.TransportError("lost"), cli.EXIT_IN_TRANSIT),
        (errors.ProtocolError("garbled"), cli.EXIT_IN_TRANSIT),
        (errors.CallInterruptedError("stopped"), cli.EXIT_IN_TRANSIT),
        (errors.InputValidationError("bad"), cli.EXIT_REJECTED),
        (errors.BadRequestError("bad"), cli.EXIT_REJECTED),
        (errors.PayloadTooLargeError("big"), cli.EXIT_REJECTED),
        (errors.UnauthorizedError("who"), cli.EXIT_REJECTED),
        (errors.ForbiddenError("no"), cli.EXIT_REJECTED),
        (errors.InternalServerError("boom"), cli.EXIT_FAILURE),
        (errors.LoopDetectedError("loop"), cli.EXIT_FAILURE),
        (errors.RemoteError("AppError", "app failed"), cli.EXIT_FAILURE),
    ],
)
def test_call_exit_code_by_kind(error: errors.PikkuMQError, status: int) -> None:
    assert cli.call_exit_code(error) == status


def test_call_exit_codes_distinct_and_documented() -> None:
    codes = [code for code, _ in cli.CALL_EXIT_CODES]
    assert len(codes) == len(set(codes))
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["call"].format_help()  # type: ignore[union-attr]
    for code, meaning in cli.CALL_EXIT_CODES:
        assert f"{code:>3}  {meaning}" in help_text


async def test_call_refused_prints_attempts(tmp_path: Path, discovery: str, cli_env: dict[str, str]) -> None:
    registrar = SqliteDeploymentService(str(tmp_path / "registry.db"))
    await registrar.start(DeploymentConfig("dead-1", f"http://127.0.0.1:{closed_port()}", functions=["add"]))
    try:
        completed = await asyncio.to_thread(run_console, "call", "add", "{}", cwd=tmp_path, env=cli_env)
    finally:
        await registrar.close()

    assert completed.returncode == cli.EXIT_UNAVAILABLE, completed.stderr
    assert completed.stdout == ""
    first_line, attempts_line, payload_line = completed.stderr.splitlines()
    assert first_line.startswith("RoutingError (503, no_instance): no instance could take the call to 'add'")
    assert attempts_line == "attempts: 1 on dead-1"
    assert json.loads(payload_line.removeprefix("payload: "))["tried"] == ["dead-1"]


def test_call_timeout_and_session(tools: Path, cli_env: dict[str, str], spawned: list[subprocess.Popen[Any]]) -> None:
    env = {**cli_env, "PIKKU_REMOTE_SECRET": SECRET}
    worker = start_worker(spawned, "tools", "--id", "tools-1", cwd=tools, env=env)
    wait_registered("tools-1", worker, tools, env)

    late = run_console("call", "nap", "5", "--timeout", "0.5", cwd=tools, env=env)
    assert late.returncode == cli.EXIT_DEADLINE, late.stderr
    assert late.stderr.startswith("DeadlineExceededError (504, deadline_exceeded):")
    assert "attempts: 1 on tools-1" in late.stderr.splitlines()

    session = run_console("call", "whoami", "--session", '{"user": 7}', cwd=tools, env=env)
    assert session.returncode == 0, session.stderr
    assert json.loads(session.stdout) == {"user": 7}

    # Without a session, the function that needs one is refused before it runs.
    missing = run_console("call", "whoami", cwd=tools, env=env)
    assert missing.returncode == cli.EXIT_REJECTED
    assert missing.stderr.startswith("MissingSessionError (401, missing_session):")

    unsigned = run_console("call", "whoami", "--session", '{"user": 7}', cwd=tools, env=cli_env)
    assert unsigned.returncode == cli.EXIT_USAGE
    assert "--session needs $PIKKU_REMOTE_SECRET" in unsigned.stderr

    bad = run_console("call", "whoami", "--session", "{user: 7}", cwd=tools, env=env)
    assert bad.returncode == cli.EXIT_USAGE
    assert "invalid JSON --session" in bad.stderr
    assert stop_worker(worker) == 0


def test_call_transport_restricts_routing(
    project: Path, cli_env: dict[str, str], spawned: list[subprocess.Popen[Any]]
) -> None:
    # The shared nats-server of the test machine, on a subject prefix of this test's own; HTTP as fallback.
    endpoint = f"nats://127.0.0.1:4222/pikku_t_cli_{uuid.uuid4().hex[:12]}"
    env = {**cli_env, "PIKKU_NATS_URL": "nats://127.0.0.1:4222"}
    worker = start_worker(
        spawned,
        "calc",
        "--id",
        "calc-both",
        "--endpoint",
        endpoint,
        "--fallback-endpoint",
        "http://127.0.0.1:0",
        cwd=project,
        env=env,
    )
    wait_registered("calc-both", worker, project, env)

    for transport in ("nats", "http"):
        added = run_console("call", "add", '{"a": 1, "b": 2}', "--transport", transport, cwd=project, env=env)
        assert added.returncode == 0, f"{transport}: {added.stderr}"
        assert json.loads(added.stdout) == 3

    nowhere = run_console("call", "add", '{"a": 1, "b": 2}', "--transport", "amqp", cwd=project, env=env)
    assert nowhere.returncode == cli.EXIT_UNAVAILABLE
    assert "no instance of 'add' has an endpoint of scheme amqp or amqps, as --transport requires" in nowhere.stderr
    assert f"calc-both ({endpoint}, http://127.0.0.1:" in nowhere.stderr

    missing = run_console("call", "nothing_here", "--transport", "http", cwd=project, env=env)
    assert missing.returncode == cli.EXIT_NOT_FOUND

    wrong = run_console("call", "add", "--transport", "smtp", cwd=project, env=env)
    assert wrong.returncode == cli.EXIT_USAGE
    assert "invalid choice: 'smtp'" in wrong.stderr
    assert stop_worker(worker) == 0


def test_call_error_escapes_control_characters(capsys: pytest.CaptureFixture[str]) -> None:
    cli._print_error(errors.RemoteError("Evil\x1b[2J", "line\nbreak\x07", payload={"note": "\x1b]0;title\x07"}))

    stderr = capsys.readouterr().err
    assert "\x1b" not in stderr
    assert "\x07" not in stderr
    assert stderr.startswith("Evil\\x1b[2J (500, remote): line\\nbreak\\x07\n")


# -- help and completion ---------------------------------------------------------------------------

COMMANDS = ["worker", "call", "ls", "demo", "completion"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_command(tmp_path: Path, cli_env: dict[str, str], command: str) -> None:
    completed = run_console(command, "--help", cwd=tmp_path, env=cli_env)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(f"usage: pikku-mq {command}")


def test_help_gives_units() -> None:
    parser = cli.build_parser()
    subparsers = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    units = {"SECONDS": "seconds", "BYTES": "bytes"}
    checked = 0
    for command, subparser in subparsers.items():
        for action in subparser._actions:
            unit = units.get(str(action.metavar))
            if unit is not None:
                assert unit in (action.help or ""), f"{command} {action.option_strings}: no unit in {action.help!r}"
                checked += 1
    # call --timeout, ls --heartbeat-ttl, worker --heartbeat-interval, --heartbeat-ttl and --dedup-window.
    assert checked >= 5


def test_completion_bash_script(tmp_path: Path, cli_env: dict[str, str]) -> None:
    completed = run_console("completion", "bash", cwd=tmp_path, env=cli_env)
    assert completed.returncode == 0, completed.stderr
    script = tmp_path / "pikku-mq.bash"
    script.write_text(completed.stdout)

    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert syntax.returncode == 0, syntax.stderr

    # Complete as bash does on Tab: the script runs pikku-mq, found on PATH, with the line typed so far.
    env = {**cli_env, "PATH": f"{Path(CONSOLE_SCRIPT or '').parent}{os.pathsep}{cli_env.get('PATH', '')}"}
    cases = {
        "pikku-mq wo": "worker",
        "pikku-mq call --tr": "--transport",
        "pikku-mq call --transport ": "amqp http nats",
    }
    for line, expected in cases.items():
        words = line.split(" ")
        program = textwrap.dedent(
            f"""
            source {shlex.quote(str(script))}
            COMP_WORDS=({" ".join(shlex.quote(word) for word in words)})
            COMP_CWORD={len(words) - 1}
            COMP_LINE={shlex.quote(line)}
            COMP_POINT=${{#COMP_LINE}}
            _python_argcomplete pikku-mq
            echo "${{COMPREPLY[@]}}"
            """
        )
        completion = subprocess.run(
            ["bash", "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT
        )
        assert completion.returncode == 0, completion.stderr
        assert " ".join(completion.stdout.split()) == expected, line


@pytest.mark.parametrize("shell", ["zsh", "fish"])
def test_completion_script_parses(tmp_path: Path, cli_env: dict[str, str], shell: str) -> None:
    if shutil.which(shell) is None:
        pytest.skip(f"{shell} is not installed")
    completed = run_console("completion", shell, cwd=tmp_path, env=cli_env)
    assert completed.returncode == 0, completed.stderr
    script = tmp_path / f"pikku-mq.{shell}"
    script.write_text(completed.stdout)

    syntax = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True, timeout=CLI_TIMEOUT)
    assert syntax.returncode == 0, syntax.stderr
    assert "pikku-mq" in completed.stdout


# -- worker --reload --------------------------------------------------------------------------------

RELOAD_TIMEOUT = 30.0
"""Seconds a change may take to reach a new worker: watchfiles waits 1.6 s for changes to settle, then the
old worker drains and the new one imports pikku_mq."""


def test_worker_reload_restarts_on_change(
    project: Path, cli_env: dict[str, str], spawned: list[subprocess.Popen[Any]]
) -> None:
    watcher = start_worker(
        spawned,
        "calc",
        "--reload",
        "--id",
        "calc-reload",
        "--heartbeat-interval",
        "1",
        "--heartbeat-ttl",
        "3",
        cwd=project,
        env=cli_env,
    )
    first = wait_registered("calc-reload", watcher, project, cli_env)
    added = run_console("call", "add", '{"a": 1, "b": 2}', cwd=project, env=cli_env)
    assert json.loads(added.stdout) == 3

    calc = project / "calc.py"
    calc.write_text(calc.read_text().replace("return data.a + data.b", "return data.a + data.b + 100"))
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while True:
        added = run_console("call", "add", '{"a": 1, "b": 2}', cwd=project, env=cli_env)
        if added.returncode == 0 and json.loads(added.stdout) == 103:
            break
        assert time.monotonic() < deadline, (
            f"no reload within {RELOAD_TIMEOUT} s: {(project / 'worker.log').read_text()}"
        )
        time.sleep(0.3)

    # The watcher stops its worker as SIGINT does, which deregisters it before the new one registers.
    log = (project / "worker.log").read_text()
    assert "restarting the worker, because these files changed:" in log
    assert str(calc) in log
    assert log.count("deregistered deployment calc-reload") == 1
    assert log.count("worker calc-reload stopped") == 1
    second = wait_registered("calc-reload", watcher, project, cli_env)
    assert second["endpoint"] != first["endpoint"]

    assert stop_worker(watcher) == 0
    assert list_deployments(project, cli_env) == []
    assert (project / "worker.log").read_text().count("deregistered deployment calc-reload") == 2


def test_reload_dir_needs_reload(project: Path, cli_env: dict[str, str]) -> None:
    completed = run_cli("worker", "calc", "--reload-dir", ".", cwd=project, env=cli_env)

    assert completed.returncode == cli.EXIT_USAGE
    assert "--reload-dir only applies with --reload" in completed.stderr


def test_reload_dir_must_exist(project: Path, cli_env: dict[str, str]) -> None:
    completed = run_cli("worker", "calc", "--reload", "--reload-dir", "no-such-dir", cwd=project, env=cli_env)

    assert completed.returncode == cli.EXIT_USAGE
    assert "--reload-dir 'no-such-dir' is not a folder" in completed.stderr


@pytest.mark.parametrize(
    ("package", "args", "message"),
    [
        ("watchfiles", ["worker", "calc", "--reload"], "--reload needs the watchfiles package"),
        ("argcomplete", ["completion", "bash"], "shell completion needs the argcomplete package"),
    ],
)
def test_missing_optional_package_explained(
    project: Path, cli_env: dict[str, str], package: str, args: list[str], message: str
) -> None:
    # Setting a module to None in sys.modules makes its import fail, as when it is not installed.
    script = f"import sys; sys.modules[{package!r}] = None; from pikku_mq.cli import main; main()"
    completed = subprocess.run(
        [sys.executable, "-c", script, *args], cwd=project, env=cli_env, capture_output=True, text=True, timeout=60
    )

    assert completed.returncode == cli.EXIT_USAGE
    assert message in completed.stderr
    assert f"pip install 'pikku-mq[{'reload' if package == 'watchfiles' else 'completion'}]'" in completed.stderr
