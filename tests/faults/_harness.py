"""The fault drills' harness: real worker processes, a steady load of calls, and the figures of a drill.

A drill starts worker processes of ``tests/apps/drill_worker.py`` on a real registry and transport,
drives a steady load of calls with per-call deadlines from the test process, injects a fault, and
counts what became of every call:

- succeeded, or failed with a typed error (counted by class), or **hung**: not finished when its
  deadline plus ``GRACE`` had passed (the harness then cancels it);
- **run twice**: the worker functions append the caller's token of each logical call to a runs file
  before they do their work, so a token found more than once ran more than once. A plain call that
  failed although its token is there **failed but ran**;
- **lost**: an idempotent call that failed at a moment when an instance could serve it. In a drill where
  another instance keeps serving, that is every idempotent call that failed. Where the fault takes
  every instance of the function away, calls that fail until ``LOSS_MARGIN`` seconds after the first
  success that follows the fault are not lost;
- **time to recover**: seconds from the end of the fault (the process resumed or started again, the
  server back) until the restored instance served a call.

Each drill prints one line of figures (``pytest -s`` shows it) and appends them as a JSON object to
``PIKKU_DRILL_REPORT``, by default ``build/drills.jsonl``, which ``scripts/drill-table`` turns into
the table of docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlsplit

from _support_core import closed_port

from pikku_mq import (
    AiohttpTransport,
    DeploymentService,
    PikkuMQError,
    RetryPolicy,
    TransportSet,
    deployment_service_from_url,
)
from pikku_mq.transports.amqp import AmqpTransport
from pikku_mq.transports.nats import NatsTransport

DRILL_WORKER = Path(__file__).parent.parent / "apps" / "drill_worker.py"
REPO_ROOT = Path(__file__).parent.parent.parent

SHARED_NATS_URL = "nats://127.0.0.1:4222"
SHARED_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"

TRANSPORTS = ("http", "nats", "amqp")

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TTL = 2.0
"""Seconds between heartbeats, and until a silent instance is stale. Both are short, so an instance that
stopped heartbeating leaves the lookups within a drill."""

ATTEMPT_TIMEOUT = 0.5
"""Seconds each attempt of an idempotent call may take, a quarter of the usual deadline, unless a drill
runs with the default RetryPolicy. Without it, an attempt stuck on a stopped worker takes the whole
deadline and leaves no time for a retry on another instance."""

GRACE = 1.0
"""Seconds past its deadline after which a call that has not finished counts as hung."""

LOSS_MARGIN = 0.5
"""Seconds after the end of an outage of every instance during which a failed idempotent call is not lost."""

FAILURE_PAUSE = 0.1
"""Seconds a loop of the load waits after a failed call before its next call."""

CLOSE_TIMEOUT = 15.0
"""Seconds the load and the caller get to stop at the end of a drill."""

START_TIMEOUT = 30.0
"""Seconds a worker process gets to start and register, or to serve its first call (imports are slow on a
loaded 2-core host)."""

PLAIN = "drill_plain"
IDEMPOTENT = "drill_idempotent"


# -- where the workers serve ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Wiring:
    """The transport of a drill, and the brokers its workers and its caller connect to."""

    transport: str
    nats_url: str = SHARED_NATS_URL
    amqp_url: str = SHARED_AMQP_URL
    amqp_vhost: str = "/"
    http_fallback: bool = False
    """Whether each worker also serves an HTTP endpoint, which callers move to when the broker is away."""
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    """Makes subject prefixes and queue names unique to this drill, since the brokers may be shared."""

    def endpoint(self, worker_id: str) -> str:
        """Return a fixed endpoint for ``worker_id``, so a restarted worker advertises the same one."""
        if self.transport == "http":
            return f"http://127.0.0.1:{closed_port()}"
        if self.transport == "nats":
            server = urlsplit(self.nats_url)
            return f"nats://{server.hostname}:{server.port}/drill_{self.tag}_{worker_id}"
        if self.transport == "amqp":
            broker = urlsplit(self.amqp_url)
            vhost = quote(self.amqp_vhost, safe="")
            return f"amqp://{broker.hostname}:{broker.port}/{vhost}?queue=drill-{self.tag}-{worker_id}"
        raise ValueError(f"unknown drill transport {self.transport!r}; expected one of {TRANSPORTS}")

    @property
    def label(self) -> str:
        """The transport as the figures name it."""
        return f"{self.transport}, http fallback" if self.http_fallback else self.transport

    def worker_args(self) -> list[str]:
        args = ["--nats-url", self.nats_url, "--amqp-url", self.amqp_url]
        if self.http_fallback:
            args += ["--fallback-endpoint", f"http://127.0.0.1:{closed_port()}"]
        return args

    def client_transports(self) -> TransportSet:
        return TransportSet([AiohttpTransport(), NatsTransport(self.nats_url), AmqpTransport(self.amqp_url)])


# -- worker processes ----------------------------------------------------------------------------------


class DrillWorker:
    """One worker of a drill under its deployment id, through its successive processes."""

    def __init__(self, deployment_id: str, endpoint: str, command: list[str], log_path: Path, runs_path: Path) -> None:
        self.deployment_id = deployment_id
        self.endpoint = endpoint
        self.command = command
        self.log_path = log_path
        self.runs_path = runs_path
        """The file in which the worker's processes record the token of every call they run."""
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def served_by(self) -> str:
        """The value the drill functions return when the current process serves the call."""
        assert self.process is not None
        return f"{self.deployment_id}:{self.process.pid}"

    def launch(self) -> float:
        """Start a process for this worker, reaping the previous one; return the time.monotonic() of the start."""
        if self.process is not None:
            assert self.process.poll() is not None, f"worker {self.deployment_id} still runs"
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            self.command, cwd=self.log_path.parent, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log
        )
        return time.monotonic()

    def signal(self, signum: signal.Signals) -> float:
        """Send ``signum`` to the current process and return the time.monotonic() at which it was sent."""
        assert self.process is not None
        self.process.send_signal(signum)
        return time.monotonic()

    async def wait_exit(self, timeout: float) -> int:
        assert self.process is not None
        return await asyncio.to_thread(self.process.wait, timeout)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        """Kill the current process if it still runs (resuming it first if it is stopped)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGCONT)
                self.process.kill()
            self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None


# -- the load ------------------------------------------------------------------------------------------


@dataclass(slots=True)
class CallRecord:
    """What became of one logical call of the load."""

    kind: str
    """The function called: ``PLAIN`` or ``IDEMPOTENT``."""
    token: str
    started: float
    finished: float
    outcome: str
    """``"ok"``, the class name of the typed error, ``"hung"``, or ``"untyped:<class>"``."""
    served_by: str = ""
    message: str = ""


class Load:
    """Calls the two drill functions in ``lanes`` concurrent loops each, with a deadline per call.

    Each call carries ``work`` seconds of work and each loop pauses ``pause`` seconds between calls,
    which keeps a few calls in flight at any moment without loading a 2-core machine much. After a
    failed call a loop pauses ``FAILURE_PAUSE`` seconds, as a client that backs off would.
    """

    def __init__(
        self,
        caller: DeploymentService,
        *,
        deadline: float,
        lanes: int = 2,
        work: float = 0.05,
        pause: float = 0.01,
    ) -> None:
        self.caller = caller
        self.deadline = deadline
        self.lanes = lanes
        self.work = work
        self.pause = pause
        self.records: list[CallRecord] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        for kind in (PLAIN, IDEMPOTENT):
            for lane in range(self.lanes):
                self._tasks.append(asyncio.create_task(self._lane(kind), name=f"drill-load-{kind}-{lane}"))

    async def stop(self) -> None:
        """Stop sending calls and wait for those in flight; each one ends by its deadline plus ``GRACE``."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _lane(self, kind: str) -> None:
        prefix = "p" if kind == PLAIN else "i"
        while not self._stop.is_set():
            record = await self._one_call(kind, f"{prefix}-{uuid.uuid4().hex}")
            self.records.append(record)
            await asyncio.sleep(self.pause if record.outcome == "ok" else FAILURE_PAUSE)

    async def _one_call(self, kind: str, token: str) -> CallRecord:
        data = {"token": token, "work": self.work}
        started = time.monotonic()
        call = asyncio.ensure_future(
            self.caller.invoke(kind, data, timeout=self.deadline, idempotent=kind == IDEMPOTENT)
        )
        done, _ = await asyncio.wait({call}, timeout=self.deadline + GRACE)
        finished = time.monotonic()
        if not done:
            # A call that ignores its cancellation too is left behind, so the loop goes on either way.
            call.cancel()
            await asyncio.wait({call}, timeout=GRACE)
            message = f"not finished {self.deadline + GRACE:g} s after it started"
            return CallRecord(kind, token, started, finished, "hung", message=message)

        error = call.exception()
        if error is None:
            return CallRecord(kind, token, started, finished, "ok", served_by=str(call.result()))
        typed = isinstance(error, PikkuMQError)
        outcome = type(error).__name__ if typed else f"untyped:{type(error).__name__}"
        return CallRecord(kind, token, started, finished, outcome, message=str(error)[:300])

    def succeeded_since(self, since: float, served_by: Callable[[str], bool] = lambda _: True) -> CallRecord | None:
        """Return the first call that succeeded after ``since`` on an instance that ``served_by`` accepts."""
        for record in sorted(self.records, key=lambda r: r.finished):
            if record.finished > since and record.outcome == "ok" and served_by(record.served_by):
                return record
        return None

    async def wait_success(
        self, since: float, served_by: Callable[[str], bool] = lambda _: True, *, timeout: float = START_TIMEOUT
    ) -> float:
        """Wait for a call that succeeds after ``since`` on an accepted instance; return its time.monotonic() finish."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            record = self.succeeded_since(since, served_by)
            if record is not None:
                return record.finished
            await asyncio.sleep(0.02)
        raise AssertionError(f"no call succeeded on the expected instance within {timeout} s after the fault")


# -- the drill -----------------------------------------------------------------------------------------


@dataclass
class Figures:
    """The figures of one drill run, as printed and as recorded in the report file."""

    drill: str
    transport: str
    sent: int
    succeeded: int
    failed: dict[str, int]
    hung: int
    run_twice_plain: int
    run_twice_idempotent: int
    failed_but_ran_plain: int
    """Plain calls that failed with an error although the function ran: the caller cannot tell them apart."""
    lost: int
    recover_s: float | None
    """The maximum time to recover, when the drill has several faults."""
    fault_s: float
    """The time the faults lasted, summed."""
    deadline_s: float
    duration_s: float
    store: str

    def line(self) -> str:
        failed = ", ".join(f"{name} {count}" for name, count in sorted(self.failed.items())) or "none"
        recover = f"{self.recover_s:.2f} s" if self.recover_s is not None else "n/a"
        return (
            f"DRILL {self.drill}[{self.transport}] sent={self.sent} succeeded={self.succeeded} failed={failed} "
            f"hung={self.hung} run_twice={self.run_twice_plain} plain/{self.run_twice_idempotent} idempotent "
            f"failed_but_ran={self.failed_but_ran_plain} plain lost={self.lost} recover={recover} "
            f"(fault {self.fault_s:.2f} s, deadline {self.deadline_s:g} s, store {self.store})"
        )


class Drill:
    """One fault drill: its worker processes, its caller, its load, and the figures it reports."""

    def __init__(
        self,
        name: str,
        wiring: Wiring,
        folder: Path,
        discovery_url: str,
        *,
        store: str = "sqlite",
        deadline: float = 2.0,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        heartbeat_ttl: float = HEARTBEAT_TTL,
        attempt_timeout: float | None = ATTEMPT_TIMEOUT,
        work: float = 0.05,
    ) -> None:
        self.name = name
        self.attempt_timeout = attempt_timeout
        """The callers' RetryPolicy.attempt_timeout; None runs them with the default policy."""
        self.wiring = wiring
        self.folder = folder
        self.discovery_url = discovery_url
        self.store = store
        self.deadline = deadline
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_ttl = heartbeat_ttl
        self.workers: list[DrillWorker] = []
        self.caller = self.new_caller()
        self.load = Load(self.caller, deadline=deadline, work=work)
        self.started = time.monotonic()
        self.faults: list[tuple[float, float]] = []
        """The (start, end) time.monotonic() of each fault, once it is over."""
        self.recoveries: list[float] = []
        """Seconds from the end of each fault until the restored instance served a call."""
        self._fault_began: float | None = None

    def new_caller(self, **options: Any) -> DeploymentService:
        """Return a caller on the drill's registry and brokers, with the workers' liveness settings."""
        return deployment_service_from_url(
            self.discovery_url,
            heartbeat_interval=self.heartbeat_interval,
            heartbeat_ttl=self.heartbeat_ttl,
            transports=self.wiring.client_transports(),
            retry=RetryPolicy(attempt_timeout=min(self.attempt_timeout, self.deadline))
            if self.attempt_timeout is not None
            else RetryPolicy(),
            **options,
        )

    # -- workers

    def add_worker(self, letter: str) -> DrillWorker:
        deployment_id = f"drill-{self.wiring.tag}-{letter}"
        endpoint = self.wiring.endpoint(letter)
        runs_path = self.folder / f"runs-{letter}.log"
        command = [
            sys.executable,
            str(DRILL_WORKER),
            "--id",
            deployment_id,
            "--discovery",
            self.discovery_url,
            "--endpoint",
            endpoint,
            "--runs-file",
            str(runs_path),
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            "--heartbeat-ttl",
            str(self.heartbeat_ttl),
            *self.wiring.worker_args(),
        ]
        worker = DrillWorker(deployment_id, endpoint, command, self.folder / f"worker-{letter}.log", runs_path)
        self.workers.append(worker)
        return worker

    async def start_workers(self, count: int) -> list[DrillWorker]:
        """Start ``count`` workers at once and wait until each one is registered."""
        workers = [self.add_worker("abcdefgh"[len(self.workers)]) for _ in range(count)]
        for worker in workers:
            worker.launch()
        await self.caller.init()
        end = time.monotonic() + START_TIMEOUT
        waiting = {w.deployment_id for w in workers}
        while waiting:
            for worker in workers:
                if worker.process is not None and worker.process.poll() is not None:
                    raise AssertionError(
                        f"worker {worker.deployment_id} exited with {worker.process.returncode}:\n{worker.log_tail()}"
                    )
            if time.monotonic() > end:
                raise AssertionError(f"workers {sorted(waiting)} did not register within {START_TIMEOUT} s")
            waiting -= {r.deployment_id for r in await self.caller.list_deployments()}
            await asyncio.sleep(0.05)
        return workers

    async def warm_up(self) -> None:
        """Start the load and wait until every worker has served a call, so each is in the caller's routing."""
        self.load.start()
        for worker in self.workers:
            served = worker.served_by
            await self.load.wait_success(self.started, lambda s, served=served: s == served)
        await asyncio.sleep(0.3)

    async def wait_busy(self, *workers: DrillWorker, timeout: float = 10.0) -> None:
        """Wait until calls of both functions run on one of ``workers``, so that a fault hits them mid-call.

        A call runs when its token is in the worker's runs file and the load has not seen it finish.
        """
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            finished = {r.token for r in self.load.records}
            for worker in workers:
                text = worker.runs_path.read_text() if worker.runs_path.exists() else ""
                running = {token[0] for token in text.split() if token not in finished}
                if running >= {"p", "i"}:
                    return
            await asyncio.sleep(0.002)
        raise AssertionError(f"no worker ran calls of both functions at once within {timeout} s")

    # -- the fault

    def fault(self) -> float:
        """Mark the start of a fault and return its time.monotonic()."""
        self._fault_began = time.monotonic()
        return self._fault_began

    def fault_over(self) -> float:
        """Mark the end of the fault: the process resumed or started again, or the server is back."""
        assert self._fault_began is not None, "fault_over() without fault()"
        ended = time.monotonic()
        self.faults.append((self._fault_began, ended))
        self._fault_began = None
        return ended

    async def wait_recovered(self, served_by: Callable[[str], bool] = lambda _: True) -> float:
        """Wait until a call succeeds after the last fault ended, on an instance ``served_by`` accepts.

        Return the time.monotonic() at which that call finished.
        """
        ended = self.faults[-1][1]
        recovered = await self.load.wait_success(ended, served_by)
        self.recoveries.append(recovered - ended)
        return recovered

    def recovered_after(self, seconds: float) -> None:
        """Record a recovery measured otherwise, ``seconds`` after the last fault ended."""
        self.recoveries.append(seconds)

    async def run_on(self, seconds: float) -> None:
        """Let the load go on for ``seconds``."""
        await asyncio.sleep(seconds)

    # -- results

    def runs(self) -> collections.Counter[str]:
        """Count the runs of each token, over the runs files of every worker process."""
        counts: collections.Counter[str] = collections.Counter()
        for path in self.folder.glob("runs-*.log"):
            counts.update(line for line in path.read_text().splitlines() if line)
        return counts

    def lost(self, available_from: float | None) -> list[CallRecord]:
        """Return the idempotent calls that failed at a moment when an instance could serve them.

        ``available_from`` is when the function could be served again after an outage of all its
        instances, or None when another instance served throughout. A call that failed during the
        outage, or less than ``LOSS_MARGIN`` seconds after its end, is not lost, because the caller got a
        typed error that no instance could take it.
        """
        return [
            record
            for record in self.load.records
            if record.kind == IDEMPOTENT
            and record.outcome != "ok"
            and (available_from is None or record.finished >= available_from + LOSS_MARGIN)
        ]

    def figures(self, *, available_from: float | None = None) -> Figures:
        records = self.load.records
        runs = self.runs()
        twice = [token for token, count in runs.items() if count > 1]
        return Figures(
            drill=self.name,
            transport=self.wiring.label,
            sent=len(records),
            succeeded=sum(r.outcome == "ok" for r in records),
            failed=dict(collections.Counter(r.outcome for r in records if r.outcome not in ("ok", "hung"))),
            hung=sum(r.outcome == "hung" for r in records),
            run_twice_plain=sum(t.startswith("p-") for t in twice),
            run_twice_idempotent=sum(t.startswith("i-") for t in twice),
            failed_but_ran_plain=sum(r.kind == PLAIN and r.outcome != "ok" and runs[r.token] > 0 for r in records),
            lost=len(self.lost(available_from)),
            recover_s=max(self.recoveries) if self.recoveries else None,
            fault_s=sum(ended - began for began, ended in self.faults),
            deadline_s=self.deadline,
            duration_s=time.monotonic() - self.started,
            store=self.store,
        )

    def report(self, figures: Figures) -> None:
        """Print the figures' line and append them to the report file."""
        print(f"\n{figures.line()}")
        path = Path(os.environ.get("PIKKU_DRILL_REPORT") or REPO_ROOT / "build" / "drills.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = {
            **figures.__dict__,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        }
        with path.open("a") as file:
            file.write(json.dumps(entry) + "\n")

    def check(self, figures: Figures, *, available_from: float | None = None) -> None:
        """Assert what every drill must show: no hung call, no plain call run twice, no idempotent call lost."""
        records = self.load.records
        assert figures.sent > 0, "the load sent no calls"
        untyped = [r for r in records if r.outcome.startswith("untyped:")]
        assert untyped == [], f"calls failed with errors that are not PikkuMQError: {_summary(untyped)}"
        assert figures.hung == 0, f"{figures.hung} calls hung past their deadline: {self.diagnosis()}"
        assert figures.run_twice_plain == 0, f"{figures.run_twice_plain} plain calls ran twice: {self.diagnosis()}"
        assert figures.lost == 0, f"idempotent calls lost: {_summary(self.lost(available_from))}; {self.diagnosis()}"
        runs = self.runs()
        unrecorded = [r for r in records if r.outcome == "ok" and runs[r.token] == 0]
        assert unrecorded == [], f"calls succeeded without a recorded run: {_summary(unrecorded)}"

    def diagnosis(self) -> str:
        """Describe the failed calls and the workers' last log lines, for assertion messages."""
        failed = [r for r in self.load.records if r.outcome != "ok"]
        logs = "\n".join(f"--- {w.deployment_id}\n{w.log_tail(15)}" for w in self.workers)
        return f"{_summary(failed)}\n{logs}"

    async def close(self) -> None:
        """Stop the load, close the caller and kill the workers; fail if the load or the caller does not stop."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                if self.load._tasks:
                    await self.load.stop()
                await self.caller.close()
        except TimeoutError:
            raise AssertionError(
                f"the drill's load and caller did not stop within {CLOSE_TIMEOUT} s; tasks still running:\n"
                + _task_stacks()
            ) from None
        finally:
            for worker in self.workers:
                worker.close()


MakeDrill = Callable[..., Drill]
"""The ``make_drill`` fixture: ``make_drill(name, wiring, discovery_url=None, **options)``."""


def _task_stacks() -> str:
    """Return the stack of every task of the running event loop but the current one."""
    stacks = io.StringIO()
    for task in asyncio.all_tasks():
        if task is not asyncio.current_task():
            task.print_stack(file=stacks)
    return stacks.getvalue()


def _summary(records: Iterable[CallRecord], limit: int = 8) -> str:
    """Describe up to ``limit`` calls by outcome, message and timing, for assertion messages."""
    records = list(records)
    shown = [f"{r.kind} {r.outcome} after {r.finished - r.started:.2f} s: {r.message[:160]}" for r in records[:limit]]
    more = f" (and {len(records) - limit} more)" if len(records) > limit else ""
    return "; ".join(shown) + more
