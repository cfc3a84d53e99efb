"""The driver of ``pikku-mq demo``: a mesh of worker processes on a temporary SQLite registry.

It starts two greeters, a shouter and a concierge as ``pikku-mq worker`` processes and calls their
functions. When a NATS server or a RabbitMQ broker answers (``PIKKU_NATS_URL``, ``PIKKU_AMQP_URL``, else
their local defaults), the shouter serves over NATS and the second greeter over AMQP, each with an HTTP
fallback. Otherwise the demo prints why, and they serve over HTTP. Then it kills one greeter with SIGKILL
while a stream of calls goes on, checks that the later calls reach the other greeter, and stops the
rest with SIGTERM. Worker logs go to files in the temporary
folder and are printed only when the demo fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from .._errors import PikkuMQError
from .._settings import default_amqp_url, default_nats_url
from ..backends.sqlite import SqliteDeploymentService
from ..cli import format_deployments

__all__ = ["DemoError", "run_demo"]

HEARTBEAT_INTERVAL = 1.0
HEARTBEAT_TTL = 3.0
STARTUP_TIMEOUT = 20.0
"""Seconds for every worker to register. The workers start at once and each spends over a second of CPU
importing the library, so a machine with few cores needs a few seconds."""
STOP_TIMEOUT = 5.0
"""Seconds a worker gets to exit after SIGTERM or SIGKILL."""
CALL_TIMEOUT = 5.0
DEMO_TIMEOUT = 28.0
"""Seconds the demo may run before it gives up."""

STREAM_CALLS = 16
STREAM_LANES = 2
"""Calls in flight at once during the stream."""
KILL_AFTER = 5
"""Number of stream calls to finish before a greeter is killed. Calls of the other lane go on meanwhile,
so more calls may finish before the kill."""
STREAM_PAUSE = 0.05
"""Seconds between two calls of one lane, so the kill lands while calls go on."""

NAMES = ("Ada", "Grace", "Alan", "Barbara", "Edsger", "Margaret", "Donald", "Frances")

# (deployment id, module) of each worker process.
WORKERS = (
    ("greeter-1", "pikku_mq.demo.greeter"),
    ("greeter-2", "pikku_mq.demo.greeter"),
    ("shouter-1", "pikku_mq.demo.shouter"),
    ("concierge-1", "pikku_mq.demo.concierge"),
)
VICTIM = "greeter-1"
SURVIVOR = "greeter-2"

CLEANUP_TIMEOUT = 5.0
"""Seconds to delete the broker objects of the run when it ends."""

BROKER_PROBE_TIMEOUT = 1.0
"""Seconds to wait for a broker to accept a TCP connection before the demo leaves it out."""


class DemoError(Exception):
    """A step of the demo did not give the expected result."""


@dataclass(slots=True)
class _Worker:
    name: str
    module: str
    process: subprocess.Popen[bytes]
    log_path: Path


@dataclass(slots=True)
class _Endpoints:
    """The endpoint and fallbacks of a worker, by default one HTTP endpoint on a free port."""

    endpoint: str = "http://127.0.0.1:0"
    fallbacks: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _StreamCall:
    index: int
    started: float
    result: dict[str, Any] | None
    error: PikkuMQError | None


def run_demo() -> int:
    """Run the demo in a temporary folder and return the exit status.

    The status is 0 if every check passed, 1 if one failed, and 128 plus the signal number after SIGINT or
    SIGTERM. Every exit stops the workers and removes the folder.
    """
    # The default handlers raise KeyboardInterrupt or end the process wherever the signal lands, which
    # can be before the folder is guarded or in the middle of the cleanup. This handler only records the
    # signal and cancels the demo task, so the cleanup always runs to its end.
    stop = _StopSignal()
    previous_handlers = {signum: signal.signal(signum, stop.handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        status = _run_in_folder(stop)
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
    return status if stop.signum is None else 128 + stop.signum


def _run_in_folder(stop: _StopSignal) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="pikku-mq-demo-"))
    mesh = _Mesh(workdir)
    try:
        asyncio.run(_demo(mesh, stop))
    except DemoError as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        mesh.print_logs()
        return 1
    except asyncio.CancelledError:
        # Only the handler of SIGINT and SIGTERM cancels the demo task, and it records the signal.
        pass
    finally:
        if stop.signum is not None:
            print("\ndemo interrupted; stopping the workers", file=sys.stderr)
        mesh.kill_all()
        mesh.delete_broker_objects()
        try:
            shutil.rmtree(workdir)
        except OSError as exc:
            print(f"could not remove the temporary folder {workdir}: {exc}", file=sys.stderr)
    return 0


async def _demo(mesh: _Mesh, stop: _StopSignal) -> None:
    stop.task = asyncio.current_task()
    if stop.signum is not None:
        return

    service = SqliteDeploymentService(
        mesh.workdir / "registry.db", heartbeat_interval=HEARTBEAT_INTERVAL, heartbeat_ttl=HEARTBEAT_TTL
    )
    try:
        async with asyncio.timeout(DEMO_TIMEOUT), service:
            await _choose_transports(mesh)
            await _start(mesh, service)
            await _single_calls(mesh, service)
            await _failover(mesh, service)
            await _stop(mesh, service)
    except TimeoutError:
        raise DemoError(f"the demo did not finish within {DEMO_TIMEOUT:g} s") from None


# -- steps -----------------------------------------------------------------------------------------


async def _choose_transports(mesh: _Mesh) -> None:
    """Serve the shouter over NATS and the second greeter over AMQP where those brokers accept connections."""
    print(f"pikku-mq demo: {len(WORKERS)} worker processes sharing the SQLite registry {mesh.workdir / 'registry.db'}")
    # Presence names of this run only, so another demo on the same brokers cannot touch its routing.
    tag = uuid.uuid4().hex[:8]
    os.environ["PIKKU_NATS_PRESENCE_SUBJECT"] = f"pikku_demo_{tag}.presence"
    os.environ["PIKKU_AMQP_PRESENCE_EXCHANGE"] = f"pikku_demo_{tag}.presence"

    nats = urlsplit(default_nats_url().split(",")[0])
    nats_address = f"{nats.hostname or '127.0.0.1'}:{nats.port or 4222}"
    failure = await _probe(nats.hostname or "127.0.0.1", nats.port or 4222)
    missing = _missing("nats", "nats-py", "nats")
    if failure is None and missing is not None:
        print(f"NATS at {nats_address} answers, but {missing}: shouter-1 serves over HTTP.")
    elif failure is None:
        mesh.endpoints["shouter-1"] = _Endpoints(f"nats://{nats_address}/pikku_demo_{tag}", ["http://127.0.0.1:0"])
        print(f"NATS at {nats_address} answers: shouter-1 serves over NATS, with an HTTP fallback.")
    else:
        print(f"NATS at {nats_address} is not reachable ({failure}): shouter-1 serves over HTTP. Start nats-server")
        print("  or set PIKKU_NATS_URL to see a call over NATS.")

    amqp = urlsplit(default_amqp_url())
    amqp_address = f"{amqp.hostname or '127.0.0.1'}:{amqp.port or 5672}"
    failure = await _probe(amqp.hostname or "127.0.0.1", amqp.port or 5672)
    missing = _missing("aio_pika", "aio-pika", "amqp")
    if failure is None and missing is not None:
        print(f"RabbitMQ at {amqp_address} answers, but {missing}: greeter-2 serves over HTTP.")
    elif failure is None:
        # The workers declare the presence exchange, which outlives their connections, so the demo deletes it.
        mesh.amqp_presence_exchange = os.environ["PIKKU_AMQP_PRESENCE_EXCHANGE"]
        endpoint = f"amqp://{amqp_address}/%2F?queue=pikku-demo-{tag}.greeter-2"
        mesh.endpoints["greeter-2"] = _Endpoints(endpoint, ["http://127.0.0.1:0"])
        print(f"RabbitMQ at {amqp_address} answers: greeter-2 serves over AMQP, with an HTTP fallback.")
    else:
        print(f"RabbitMQ at {amqp_address} is not reachable ({failure}): greeter-2 serves over HTTP. Start")
        print("  RabbitMQ or set PIKKU_AMQP_URL to see a call over AMQP.")
    print()


def _missing(module: str, package: str, extra: str) -> str | None:
    """Return why the workers cannot use a broker's client library, or None if it can be imported."""
    try:
        importlib.import_module(module)
    except ImportError:
        return f"{package} is not installed (pip install 'pikku-mq[{extra}]')"
    return None


async def _probe(host: str, port: int) -> str | None:
    """Return None if ``host:port`` accepts a TCP connection, else the reason it did not."""
    try:
        async with asyncio.timeout(BROKER_PROBE_TIMEOUT):
            _, writer = await asyncio.open_connection(host, port)
    except TimeoutError:
        return f"no answer within {BROKER_PROBE_TIMEOUT:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return str(exc) or type(exc).__name__
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


async def _start(mesh: _Mesh, service: SqliteDeploymentService) -> None:
    await service.init()
    for name, module in WORKERS:
        mesh.spawn(name, module)
    await mesh.wait_registered(service)

    records = sorted(await service.list_deployments(), key=lambda record: record.deployment_id)
    print("Registered deployments, as `pikku-mq ls` shows them:")
    print(format_deployments(records))


async def _single_calls(mesh: _Mesh, service: SqliteDeploymentService) -> None:
    print("\nCalls from this process, one line per call, with the instance that served each hop:")
    for name in NAMES[:2]:
        result = await _invoke(service, "greet", {"name": name})
        _print_call(f"greet {name}", result["greeting"], f"greet on {mesh.name_of(result['pid'])}")

    result = await _invoke(service, "shout", {"text": "pikku"})
    _print_call("shout pikku", result["text"], f"shout on {mesh.name_of(result['pid'])}")

    for name in NAMES[2:4]:
        result = await _invoke(service, "welcome", {"name": name})
        _print_call(f"welcome {name}", result["message"], _route(mesh, result))


async def _failover(mesh: _Mesh, service: SqliteDeploymentService) -> None:
    print(
        f"\n{STREAM_CALLS} welcome calls, {STREAM_LANES} at a time; {VICTIM} is killed with SIGKILL "
        f"once {KILL_AFTER} of them have completed:"
    )
    calls, killed_at = await _stream_with_kill(mesh, service)
    later = _check_failover(mesh, calls, killed_at)
    print(f"All {len(calls)} calls succeeded; the {len(later)} sent after the kill were served by {SURVIVOR}.")


def _check_failover(mesh: _Mesh, calls: list[_StreamCall], killed_at: float) -> list[_StreamCall]:
    """Raise :class:`DemoError` unless every call succeeded and those after the kill reached the survivor.

    Return the calls sent after the kill.
    """
    failed = [call for call in calls if call.error is not None]
    if failed:
        first = failed[0]
        raise DemoError(f"{len(failed)} of {len(calls)} calls failed; call {first.index}: {first.error!r}")

    victim_pid = mesh.workers[VICTIM].process.pid
    survivor_pid = mesh.workers[SURVIVOR].process.pid
    served_by_victim = [call for call in calls if _greeter_pid(call) == victim_pid]
    if not served_by_victim:
        raise DemoError(f"no call reached {VICTIM} before the kill, so the calls were not balanced")
    later = [call for call in calls if call.started > killed_at]
    if not later:
        raise DemoError(f"no call was sent after {VICTIM} was killed, so failover was not shown")
    wrong = [call for call in later if _greeter_pid(call) != survivor_pid]
    if wrong:
        raise DemoError(f"call {wrong[0].index} was sent after the kill but not served by {SURVIVOR}")
    return later


async def _stream_with_kill(mesh: _Mesh, service: SqliteDeploymentService) -> tuple[list[_StreamCall], float]:
    """Run the stream of calls and kill the victim once ``KILL_AFTER`` of them have completed.

    Return the calls and the :func:`time.monotonic` instant at which the victim was reaped.
    """
    calls: list[_StreamCall] = []
    enough_calls = asyncio.Event()
    killed_at = 0.0

    async def call_welcome(index: int) -> None:
        call = await _timed_welcome(service, index)
        calls.append(call)
        print(f"  call {index:>2}: {_describe(mesh, call)}")
        if len(calls) >= KILL_AFTER:
            enough_calls.set()

    async def lane(first: int) -> None:
        for index in range(first, STREAM_CALLS + 1, STREAM_LANES):
            await call_welcome(index)
            await asyncio.sleep(STREAM_PAUSE)

    async def kill_victim() -> None:
        nonlocal killed_at
        await enough_calls.wait()
        victim = mesh.workers[VICTIM]
        await mesh.signal_and_wait(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        print(f"  -- killed {VICTIM} (pid {victim.process.pid}) with SIGKILL --")

    await asyncio.gather(*(lane(first) for first in range(1, STREAM_LANES + 1)), kill_victim())
    return calls, killed_at


async def _timed_welcome(service: SqliteDeploymentService, index: int) -> _StreamCall:
    started = time.monotonic()
    try:
        result = await _invoke(service, "welcome", {"name": NAMES[index % len(NAMES)]})
    except PikkuMQError as exc:
        return _StreamCall(index, started, None, exc)
    return _StreamCall(index, started, result, None)


async def _stop(mesh: _Mesh, service: SqliteDeploymentService) -> None:
    print("\nStopping the workers with SIGTERM: each one deregisters, finishes its calls and exits.")
    running = [worker for worker in mesh.workers.values() if worker.process.poll() is None]
    statuses = await asyncio.gather(*(mesh.signal_and_wait(worker, signal.SIGTERM) for worker in running))
    for worker, status in zip(running, statuses, strict=True):
        print(f"  {worker.name} exited with status {status}")

    failed = [worker.name for worker, status in zip(running, statuses, strict=True) if status != 0]
    if failed:
        raise DemoError(f"{', '.join(failed)} exited with a non-zero status after SIGTERM")

    # A killed worker never deregisters. Its row stays until a heartbeat of another worker purges it
    # after the TTL, and no worker is left to do that here.
    left = [record.deployment_id for record in await service.list_deployments()]
    if left:
        print(f"Still in the registry: {', '.join(left)} (killed, so never deregistered; stale after the TTL).")
    print("\nDemo finished: every check passed.")


# -- helpers ---------------------------------------------------------------------------------------


async def _invoke(service: SqliteDeploymentService, name: str, data: dict[str, Any]) -> dict[str, Any]:
    result = await service.invoke(name, data, timeout=CALL_TIMEOUT)
    if not isinstance(result, dict):
        raise DemoError(f"{name} returned {result!r}, expected a JSON object")
    return result


def _print_call(call: str, result: str, route: str) -> None:
    print(f"  {call:<15} -> {json.dumps(result):<33} {route}")


def _route(mesh: _Mesh, result: dict[str, Any]) -> str:
    pids: dict[str, int] = result["pids"]
    return ", ".join(f"{function} on {mesh.name_of(pid)}" for function, pid in pids.items())


def _greeter_pid(call: _StreamCall) -> int | None:
    return None if call.result is None else int(call.result["pids"]["greet"])


def _describe(mesh: _Mesh, call: _StreamCall) -> str:
    if call.result is None:
        return f"FAILED: {call.error!r}"
    return _route(mesh, call.result)


class _StopSignal:
    """The first SIGINT or SIGTERM that the demo received, and the demo task that it cancels."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.task: asyncio.Task[Any] | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        """Record the first signal and cancel the demo task if it runs; ignore later signals.

        A later signal, such as a second Ctrl-C, must not cancel the cleanup that the first one started.
        """
        if self.signum is not None:
            return
        self.signum = signum
        # Python runs this handler in the main thread, which runs the event loop, so the loop is open
        # while the task is not done. call_soon_threadsafe wakes the loop if it waits in select().
        if self.task is not None and not self.task.done():
            self.task.get_loop().call_soon_threadsafe(self.task.cancel)


class _Mesh:
    """The worker processes of the demo, started with ``python -m pikku_mq worker``."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.url = f"sqlite:///{workdir / 'registry.db'}"
        self.workers: dict[str, _Worker] = {}
        self.endpoints: dict[str, _Endpoints] = {}
        """Each worker's endpoints, for the workers that do not serve over HTTP alone."""
        self.amqp_presence_exchange: str | None = None
        """The presence exchange of this run on the RabbitMQ vhost ``/``, when a worker serves over AMQP."""

    def spawn(self, name: str, module: str) -> None:
        endpoints = self.endpoints.get(name, _Endpoints())
        command = [
            sys.executable,
            "-m",
            "pikku_mq",
            "worker",
            module,
            "--id",
            name,
            "--endpoint",
            endpoints.endpoint,
            *(f"--fallback-endpoint={url}" for url in endpoints.fallbacks),
            "--discovery",
            self.url,
            "--heartbeat-interval",
            str(HEARTBEAT_INTERVAL),
            "--heartbeat-ttl",
            str(HEARTBEAT_TTL),
        ]
        log_path = self.workdir / f"{name}.log"
        # The workers stay in this process group, so a Ctrl-C in the terminal reaches them too.
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                command, cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        self.workers[name] = _Worker(name, module, process, log_path)

    def name_of(self, pid: int) -> str:
        for worker in self.workers.values():
            if worker.process.pid == pid:
                return worker.name
        return f"pid {pid}"

    async def wait_registered(self, service: SqliteDeploymentService) -> None:
        """Wait until every worker is registered and live, or raise :class:`DemoError`."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            for worker in self.workers.values():
                status = worker.process.poll()
                if status is not None:
                    raise DemoError(f"{worker.name} exited with status {status} during startup")
            live = {record.deployment_id for record in await service.list_deployments() if record.state == "live"}
            if live >= self.workers.keys():
                return
            await asyncio.sleep(0.1)
        raise DemoError(f"the workers did not all register within {STARTUP_TIMEOUT:g} s")

    async def signal_and_wait(self, worker: _Worker, signum: signal.Signals) -> int:
        """Send ``signum`` to a worker and return its exit status; negative means killed by a signal."""
        worker.process.send_signal(signum)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            status = worker.process.poll()
            if status is not None:
                return status
            await asyncio.sleep(0.02)
        raise DemoError(f"{worker.name} did not exit within {STOP_TIMEOUT:g} s of {signum.name}")

    def kill_all(self) -> None:
        """Stop every worker still running: SIGTERM, then SIGKILL after ``STOP_TIMEOUT``."""
        running = [worker for worker in self.workers.values() if worker.process.poll() is None]
        for worker in running:
            worker.process.terminate()
        for worker in running:
            try:
                worker.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait(STOP_TIMEOUT)

    def delete_broker_objects(self) -> None:
        """Delete the presence exchange that the workers declared on RabbitMQ; print why if that fails.

        The workers' queues are exclusive, so the broker deletes them when the workers' connections close.
        """
        exchange = self.amqp_presence_exchange
        if exchange is None:
            return
        # aio-pika, and so aiormq, is installed: the demo sets the exchange only when the workers can use AMQP.
        import aiormq.exceptions

        try:
            asyncio.run(_delete_exchange(exchange))
        except (OSError, TimeoutError, aiormq.exceptions.AMQPError) as exc:
            print(
                f"could not delete the RabbitMQ exchange {exchange} on vhost /: {type(exc).__name__}: {exc}; "
                f"delete it with rabbitmqadmin delete exchange name={exchange}",
                file=sys.stderr,
            )
        else:
            self.amqp_presence_exchange = None

    def print_logs(self, lines: int = 15) -> None:
        """Print the end of each worker's log to stderr."""
        for worker in self.workers.values():
            with contextlib.suppress(OSError):
                tail = worker.log_path.read_text(errors="replace").splitlines()[-lines:]
                if not tail:
                    continue
                print(f"\n--- last lines of the log of {worker.name} ---", file=sys.stderr)
                print("\n".join(tail), file=sys.stderr)


async def _delete_exchange(exchange: str) -> None:
    """Delete ``exchange`` on the vhost ``/`` of the broker of ``PIKKU_AMQP_URL``; a missing one is no error."""
    import aiormq

    from ..transports.amqp_durable import _vhost_url

    async with asyncio.timeout(CLEANUP_TIMEOUT):
        connection = await aiormq.connect(_vhost_url(default_amqp_url(), "/"))
        try:
            channel = await connection.channel()
            await channel.exchange_delete(exchange)
        finally:
            await connection.close()
