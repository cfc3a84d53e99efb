"""Measure pikku_mq's ``rpc.remote`` over HTTP, NATS and AMQP against the raw transports and the peers.

One command starts its own echo servers, runs every case in a fresh client process, repeats the
whole sweep ``--repeats`` times (interleaved: each sweep runs every case once), and writes the
medians, the spread and the ratios as JSON, a Markdown report and a PNG plot. Run from the
repository root:

    python benchmarks/rpc_bench.py            # the full run, about 10-15 minutes on 2 cores
    python benchmarks/rpc_bench.py --quick    # a smoke run of well under a minute

Cases, each with a 100-byte and a 64 KiB JSON payload:

- ``pikku-http``, ``pikku-nats``, ``pikku-amqp``: ``RPC(...).remote("echo", payload)`` with discovery
  in Redis (the routing cache and its change feed on), to a PikkuWorker whose ``echo`` validates a
  pydantic model on the way in and out;
- ``raw-http`` (aiohttp client to a bare ASGI app on uvicorn), ``raw-nats`` (nats-py request-reply),
  ``raw-amqp`` (aio-pika with direct reply-to): the same call written by hand with the same client
  library, the floor of each transport; ``raw-nats-2conn`` is ``raw-nats`` with its calls spread
  over two connections, as ``NatsTransport(connections=2)`` spreads them;
- the peers: ``faststream-nats``, ``faststream-rabbit``, ``aiopika-rpc`` (aio-pika's RPC pattern)
  and ``nameko``;
- ``pikku-*-secret``: pikku_mq with ``PIKKU_REMOTE_SECRET`` set on both sides, so every call is
  signed and carries the caller's session (100-byte payload).

Then a memory run (a fresh NATS worker's resident memory over ``--memory-calls`` calls) and a scale
run (1, 2 and 4 worker processes behind one function). Everything lives under names of its own: a
RabbitMQ vhost ``pikku_bench_<hex>`` (created with rabbitmqctl and deleted at the end), NATS
subjects ``pikku_bench_<hex>.*`` and the Redis key prefix ``pikku_bench_<hex>:``, whose keys are
deleted at the end. It needs Redis on 127.0.0.1:6379, NATS on 4222 and RabbitMQ on 5672.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PYTHONPATH = f"{HERE}{os.pathsep}{ROOT}"
"""The servers and clients import pikku_mq from this checkout, whatever version is installed."""
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"
AMQP_BASE = "amqp://guest:guest@127.0.0.1:5672/"
SECRET = "pikku-bench-secret-" + "0123456789abcdef" * 2
"""A throwaway remote secret for the signed cases (at least 32 characters, as pikku_mq requires)."""

SMALL, LARGE = 100, 64 * 1024
TRANSPORTS = ("http", "nats", "amqp")
RAW_VARIANTS = {"nats": ("raw-nats-2conn",)}
"""Further floors reported beside ``raw-<transport>``; the targets stay against ``raw-<transport>``."""
PEERS = {"nats": ("faststream-nats",), "amqp": ("faststream-rabbit", "aiopika-rpc", "nameko")}
PEER_MODULES = {
    "faststream-nats": ("faststream", "nats"),
    "faststream-rabbit": ("faststream", "aio_pika"),
    "aiopika-rpc": ("aio_pika",),
    "nameko": ("nameko", "eventlet"),
}
"""The modules each peer's server and client import; a peer without them is left out of the run."""
LIBRARIES = (
    "pydantic",
    "msgpack",
    "aiohttp",
    "uvicorn",
    "httptools",
    "uvloop",
    "nats-py",
    "aio-pika",
    "aiormq",
    "pamqp",
    "redis",
    "hiredis",
    "PyJWT",
    "cryptography",
    "faststream",
    "nameko",
    "eventlet",
    "kombu",
)


@dataclass
class Settings:
    repeats: int
    warmup: float
    sequential: int
    sequential_seconds: float
    seconds: float
    concurrency: int
    sizes: tuple[int, ...]
    memory_calls: int
    memory_every: int
    scale_workers: tuple[int, ...]


FULL = Settings(3, 0.5, 2000, 2.0, 3.0, 64, (SMALL, LARGE), 100_000, 10_000, (1, 2, 4))
QUICK = Settings(1, 0.2, 100, 0.3, 0.5, 64, (SMALL,), 2_000, 1_000, (1, 2))


# -- processes -----------------------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass
class Fixture:
    """The names this run uses on the shared servers, and the servers it started."""

    tag: str
    vhost: str
    servers: dict[str, Server] = field(default_factory=dict)
    broker_pids: list[int] = field(default_factory=list)

    @property
    def amqp_url(self) -> str:
        return AMQP_BASE + self.vhost

    def prefix(self, group: str) -> str:
        return f"{self.tag}:{group}:"


def python() -> str:
    return sys.executable


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(fixture: Fixture, name: str, argv: list[str], env: dict[str, str] | None = None) -> Server:
    """Start a server process and wait until it prints READY (at most 60 s)."""
    process = subprocess.Popen(
        argv, cwd=HERE, env={**os.environ, "PYTHONPATH": PYTHONPATH, **(env or {})}, stdout=subprocess.PIPE
    )
    server = fixture.servers[name] = Server(name, process)
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    output = b""
    while b"READY" not in output:
        if process.poll() is not None:
            raise RuntimeError(f"server {name} exited with status {process.returncode} before it was ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server {name} was not ready within 60 s")
        readable, _, _ = select.select([process.stdout], [], [], 0.1)
        if readable:
            output += os.read(process.stdout.fileno(), 4096)
    return server


def stop_servers(fixture: Fixture, names: list[str] | None = None) -> None:
    """Send SIGTERM to the named servers (all by default) and wait for them, killing any that hang."""
    chosen = [fixture.servers.pop(n) for n in (names or list(fixture.servers)) if n in fixture.servers]
    for server in chosen:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    for server in chosen:
        try:
            server.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def broker_pids() -> list[int]:
    """Return the process ids of the shared brokers, whose CPU time is reported: nats-server on port 4222
    and RabbitMQ's beam.smp. Other helpers' private nats-servers on other ports are left out."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            command = (entry / "cmdline").read_bytes().split(b"\0")
            name = (entry / "comm").read_text().strip()
            if (name == "nats-server" and b"4222" in command) or (
                name == "beam.smp" and b"rabbit" in b" ".join(command)
            ):
                pids.append(int(entry.name))
    return pids


def rabbitmqctl(*arguments: str) -> None:
    subprocess.run(["rabbitmqctl", *arguments], check=True, capture_output=True, timeout=60)


@contextlib.contextmanager
def fixture_names(amqp: bool) -> Iterator[Fixture]:
    """Create the run's vhost if ``amqp``, and on exit stop every server, delete the vhost and the run's Redis keys."""
    import redis

    tag = f"pikku_bench_{uuid.uuid4().hex[:10]}"
    fixture = Fixture(tag=tag, vhost=tag, broker_pids=broker_pids())
    # Presence of its own: the default subject is shared by every mesh on the broker, and each join
    # announced there (other helpers' test workers, say) expires every cached lookup of this run's callers.
    os.environ["PIKKU_NATS_PRESENCE_SUBJECT"] = f"{tag}.presence"
    os.environ["PIKKU_AMQP_PRESENCE_EXCHANGE"] = f"{tag}.presence"
    if amqp:
        rabbitmqctl("add_vhost", fixture.vhost)
    try:
        if amqp:
            rabbitmqctl("set_permissions", "-p", fixture.vhost, "guest", ".*", ".*", ".*")
        yield fixture
    finally:
        try:
            stop_servers(fixture)
        finally:
            if amqp:
                rabbitmqctl("delete_vhost", fixture.vhost)
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=f"{tag}:*", count=500))
            if keys:
                client.delete(*keys)
            client.close()


# -- cases ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    transport: str
    kind: str  # "pikku", "raw" or "peer"
    argv: tuple[str, ...]
    servers: tuple[str, ...]
    sizes: tuple[int, ...]
    env: tuple[tuple[str, str], ...] = ()


def start_pikku(fixture: Fixture, name: str, transport: str, group: str, *, secret: bool = False) -> Server:
    if transport == "http":
        endpoint = f"http://127.0.0.1:{free_port()}"
    elif transport == "nats":
        endpoint = f"nats://127.0.0.1:4222/{fixture.tag}.{group.replace(':', '_')}"
    else:
        endpoint = f"amqp://127.0.0.1:5672/{fixture.vhost}?queue={group}"
    argv = [python(), "rpc_servers.py", "pikku", "--endpoint", endpoint, "--id", f"{fixture.tag}-{group}"]
    argv += ["--redis-url", REDIS_URL, "--key-prefix", fixture.prefix(group)]
    env = {"PIKKU_AMQP_URL": AMQP_BASE, "PIKKU_NATS_URL": NATS_URL}
    if secret:
        env["PIKKU_REMOTE_SECRET"] = SECRET
    return start_server(fixture, name, argv, env)


def pikku_client(fixture: Fixture, group: str) -> tuple[str, ...]:
    return ("pikku", "--redis-url", REDIS_URL, "--key-prefix", fixture.prefix(group))


def start_cases(fixture: Fixture, transports: tuple[str, ...], peers: bool, sizes: tuple[int, ...]) -> list[Case]:
    """Start the servers of every case and return the cases, in the order each sweep runs them."""
    client = [python(), "rpc_client.py"]
    nameko = [python(), "nameko_echo.py"]
    cases: list[Case] = []
    for transport in transports:
        start_pikku(fixture, f"pikku-{transport}", transport, transport)
        cases.append(
            Case(
                f"pikku-{transport}",
                transport,
                "pikku",
                (*client, *pikku_client(fixture, transport)),
                (f"pikku-{transport}",),
                sizes,
            )
        )
        if transport == "http":
            port = free_port()
            start_server(fixture, "raw-http", [python(), "rpc_servers.py", "raw-http", "--port", str(port)])
            raw = (*client, "raw-http", "--url", f"http://127.0.0.1:{port}/remote/rpc/echo")
        elif transport == "nats":
            subject = f"{fixture.tag}.raw"
            start_server(fixture, "raw-nats", [python(), "rpc_servers.py", "raw-nats", "--subject", subject])
            raw = (*client, "raw-nats", "--subject", subject)
        else:
            start_server(
                fixture,
                "raw-amqp",
                [python(), "rpc_servers.py", "raw-amqp", "--amqp-url", fixture.amqp_url, "--queue", "raw"],
            )
            raw = (*client, "raw-amqp", "--amqp-url", fixture.amqp_url, "--queue", "raw")
        cases.append(Case(f"raw-{transport}", transport, "raw", raw, (f"raw-{transport}",), sizes))
        if transport == "nats":
            # What a second connection is worth to nats-py itself, as NatsTransport(connections=2) uses it.
            two_connections = (*client, "raw-nats-2conn", "--subject", subject)
            cases.append(Case("raw-nats-2conn", transport, "raw", two_connections, ("raw-nats",), sizes))

        for peer in PEERS.get(transport, ()) if peers else ():
            missing = [module for module in PEER_MODULES[peer] if importlib.util.find_spec(module) is None]
            if missing:
                print(
                    f"leaving out {peer}: {', '.join(missing)} not installed (pip install -e '.[bench]')",
                    file=sys.stderr,
                )
                continue
            if peer == "faststream-nats":
                subject = f"{fixture.tag}.faststream"
                start_server(fixture, peer, [python(), "rpc_servers.py", peer, "--subject", subject])
                argv = (*client, peer, "--subject", subject)
            elif peer == "nameko":
                start_server(fixture, peer, [*nameko, "serve", "--amqp-url", fixture.amqp_url])
                argv = (*nameko, "call", "--amqp-url", fixture.amqp_url)
            else:
                queue = peer.replace("-", "_")
                start_server(
                    fixture, peer, [python(), "rpc_servers.py", peer, "--amqp-url", fixture.amqp_url, "--queue", queue]
                )
                argv = (*client, peer, "--amqp-url", fixture.amqp_url, "--queue", queue)
            cases.append(Case(peer, transport, "peer", argv, (peer,), sizes))

    for transport in transports:
        group = f"{transport}-secret"
        start_pikku(fixture, f"pikku-{group}", transport, group, secret=True)
        cases.append(
            Case(
                f"pikku-{group}",
                transport,
                "pikku-secret",
                (*client, *pikku_client(fixture, group)),
                (f"pikku-{group}",),
                (SMALL,),
                (("PIKKU_REMOTE_SECRET", SECRET),),
            )
        )
    return cases


def run_client(argv: tuple[str, ...], settings: Settings, extra: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run one client process and return the JSON it prints."""
    command = [*argv, "--warmup", str(settings.warmup), "--sequential", str(settings.sequential)]
    command += ["--sequential-seconds", str(settings.sequential_seconds), "--seconds", str(settings.seconds)]
    command += ["--concurrency", str(settings.concurrency), *extra]
    # The client must not inherit a secret meant for another case.
    base = {k: v for k, v in os.environ.items() if k != "PIKKU_REMOTE_SECRET"}
    completed = subprocess.run(
        command,
        cwd=HERE,
        env={**base, "PYTHONPATH": PYTHONPATH, "PIKKU_AMQP_URL": AMQP_BASE, "PIKKU_NATS_URL": NATS_URL, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"client {' '.join(argv[1:3])} failed ({completed.returncode}): {completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_case(fixture: Fixture, case: Case, size: int, settings: Settings) -> dict[str, Any]:
    pids = ",".join(str(fixture.servers[s].pid) for s in case.servers)
    extra = ["--payload-size", str(size), "--pids", pids, "--broker-pids", ",".join(map(str, fixture.broker_pids))]
    return run_client(case.argv, settings, extra, dict(case.env))


# -- memory and scale ----------------------------------------------------------------------------------


def measure_memory(fixture: Fixture, transport: str, settings: Settings) -> dict[str, Any]:
    """Serve ``--memory-calls`` calls from a fresh worker and sample its resident memory."""
    group = f"memory-{transport}"
    server = start_pikku(fixture, group, transport, group)
    try:
        argv = (python(), "rpc_client.py", *pikku_client(fixture, group))
        extra = ["--payload-size", str(SMALL), "--memory-pid", str(server.pid)]
        extra += ["--total-calls", str(settings.memory_calls), "--memory-every", str(settings.memory_every)]
        report = run_client(argv, settings, extra, {})["memory"]
    finally:
        stop_servers(fixture, [group])
    samples = report["samples"]
    first = next((s for s in samples if s["calls"] >= settings.memory_every), samples[0])
    last = samples[-1]
    report["transport"] = transport
    report["growth"] = last["rss_bytes"] / first["rss_bytes"] - 1
    return report


def measure_scale(fixture: Fixture, transport: str, settings: Settings, log: Any) -> list[dict[str, Any]]:
    """Run the 64-in-flight phase against 1, 2 and 4 workers behind one function, interleaved."""
    groups: dict[int, list[str]] = {}
    for count in settings.scale_workers:
        group = f"scale-{transport}-{count}"
        names = []
        for index in range(count):
            # Each worker its own endpoint, all registered under one discovery namespace: the caller balances.
            name = f"{group}-{index}"
            endpoint_group = f"{group}-w{index}"
            if transport == "http":
                endpoint = f"http://127.0.0.1:{free_port()}"
            elif transport == "nats":
                endpoint = f"nats://127.0.0.1:4222/{fixture.tag}.{endpoint_group}"
            else:
                endpoint = f"amqp://127.0.0.1:5672/{fixture.vhost}?queue={endpoint_group}"
            argv = [python(), "rpc_servers.py", "pikku", "--endpoint", endpoint, "--id", f"{fixture.tag}-{name}"]
            argv += ["--redis-url", REDIS_URL, "--key-prefix", fixture.prefix(group)]
            start_server(fixture, name, argv, {"PIKKU_AMQP_URL": AMQP_BASE, "PIKKU_NATS_URL": NATS_URL})
            names.append(name)
        groups[count] = names

    rows: list[dict[str, Any]] = []
    try:
        for repeat in range(settings.repeats):
            for count, names in groups.items():
                argv = (python(), "rpc_client.py", *pikku_client(fixture, f"scale-{transport}-{count}"))
                pids = ",".join(str(fixture.servers[n].pid) for n in names)
                extra = ["--payload-size", str(SMALL), "--pids", pids]
                extra += ["--broker-pids", ",".join(map(str, fixture.broker_pids))]
                report = run_client(argv, settings, extra, {})
                rows.append({"transport": transport, "workers": count, "repeat": repeat, **report["concurrent"]})
                log(f"scale {transport} x{count} #{repeat + 1}: {report['concurrent']['calls_per_s']:,.0f} calls/s")
    finally:
        stop_servers(fixture, [n for names in groups.values() for n in names])
    return rows


# -- statistics ----------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    median = statistics.median(values)
    return {
        "median": median,
        "min": min(values),
        "max": max(values),
        "spread": (max(values) - min(values)) / median if median else 0.0,
        "n": len(values),
    }


METRICS = {
    "seq_p50_us": ("sequential", "p50_us"),
    "seq_p99_us": ("sequential", "p99_us"),
    "calls_per_s_1": ("sequential", "calls_per_s"),
    "calls_per_s_64": ("concurrent", "calls_per_s"),
    "p50_us_64": ("concurrent", "p50_us"),
    "p99_us_64": ("concurrent", "p99_us"),
    "client_cpu_us_64": ("concurrent", "client_cpu_us"),
    "server_cpu_us_64": ("concurrent", "server_cpu_us"),
    "broker_cpu_us_64": ("concurrent", "broker_cpu_us"),
    "client_cpu_share_64": ("concurrent", "client_cpu_share"),
    "machine_busy_share_64": ("concurrent", "machine_busy_share"),
    "others_cpu_share_64": ("concurrent", "others_cpu_share"),
}


def aggregate(cases: list[Case], raw: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Return medians and spread per case and payload size, from the runs of every sweep."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for case in cases:
        for size in case.sizes:
            runs = [r for r in raw if r["case"] == case.name and r["size"] == size]
            if not runs:
                continue
            row: dict[str, Any] = {"transport": case.transport, "kind": case.kind}
            for metric, (phase, key) in METRICS.items():
                row[metric] = summary([r["result"][phase][key] for r in runs])
            row["discovery_lookups"] = sum(r["result"].get("discovery_lookups", 0) for r in runs)
            row["measured_calls"] = sum(
                r["result"]["sequential"]["calls"] + r["result"]["concurrent"]["calls"] for r in runs
            )
            table.setdefault(case.name, {})[str(size)] = row
    return table


def paired_ratios(
    raw: list[dict[str, Any]], numerator: str, denominator: str, size: int, metric: str
) -> dict[str, float]:
    """Return the ratio of two cases' metric in each sweep (measured minutes apart), summarised."""
    phase, key = METRICS[metric]
    ratios = []
    for repeat in sorted({r["repeat"] for r in raw}):
        top = [r for r in raw if r["repeat"] == repeat and r["case"] == numerator and r["size"] == size]
        bottom = [r for r in raw if r["repeat"] == repeat and r["case"] == denominator and r["size"] == size]
        if top and bottom:
            ratios.append(top[0]["result"][phase][key] / bottom[0]["result"][phase][key])
    return summary(ratios) if ratios else {}


def compute_ratios(cases: list[Case], raw: list[dict[str, Any]]) -> list[dict[str, Any]]:
    names = {c.name for c in cases}
    rows = []
    for transport in TRANSPORTS:
        pikku = f"pikku-{transport}"
        if pikku not in names:
            continue
        others = [f"raw-{transport}", *RAW_VARIANTS.get(transport, ()), *PEERS.get(transport, ())]
        for other in (o for o in others if o in names):
            for size in (SMALL, LARGE):
                throughput = paired_ratios(raw, pikku, other, size, "calls_per_s_64")
                if not throughput:
                    continue
                rows.append(
                    {
                        "transport": transport,
                        "pikku": pikku,
                        "versus": other,
                        "size": size,
                        "throughput_64": throughput,
                        "throughput_1": paired_ratios(raw, pikku, other, size, "calls_per_s_1"),
                        "seq_p50": paired_ratios(raw, pikku, other, size, "seq_p50_us"),
                    }
                )
        secret = f"pikku-{transport}-secret"
        if secret in names:
            rows.append(
                {
                    "transport": transport,
                    "pikku": secret,
                    "versus": pikku,
                    "size": SMALL,
                    "throughput_64": paired_ratios(raw, secret, pikku, SMALL, "calls_per_s_64"),
                    "throughput_1": paired_ratios(raw, secret, pikku, SMALL, "calls_per_s_1"),
                    "seq_p50": paired_ratios(raw, secret, pikku, SMALL, "seq_p50_us"),
                    "client_cpu_64": paired_ratios(raw, secret, pikku, SMALL, "client_cpu_us_64"),
                }
            )
    return rows


def check_targets(
    table: dict[str, Any], ratios: list[dict[str, Any]], memory: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Return each target of the issue with the figure this run measured and whether it is met."""
    targets = []

    def ratio(pikku: str, versus: str, size: int, metric: str) -> float | None:
        for row in ratios:
            if row["pikku"] == pikku and row["versus"] == versus and row["size"] == size and row[metric]:
                return float(row[metric]["median"])
        return None

    for transport in TRANSPORTS:
        for size in (SMALL, LARGE):
            value = ratio(f"pikku-{transport}", f"raw-{transport}", size, "throughput_64")
            if value is not None:
                targets.append(
                    {"target": f"{transport} {size} B: calls/s @64 ÷ raw >= 0.7", "value": value, "met": value >= 0.7}
                )
            value = ratio(f"pikku-{transport}", f"raw-{transport}", size, "seq_p50")
            if value is not None:
                targets.append(
                    {"target": f"{transport} {size} B: seq p50 ÷ raw <= 1.4", "value": value, "met": value <= 1.4}
                )
    for pikku, versus, bound in (("pikku-nats", "faststream-nats", 2.0), ("pikku-amqp", "aiopika-rpc", 1.2)):
        for size in (SMALL, LARGE):
            value = ratio(pikku, versus, size, "throughput_64")
            if value is not None:
                targets.append(
                    {
                        "target": f"{pikku} {size} B: calls/s @64 ÷ {versus} >= {bound}",
                        "value": value,
                        "met": value >= bound,
                    }
                )
    # The routing cache lives routing_cache_ttl (5 s by default) and then looks the function up once,
    # so a run of about 5.5 s of measuring may see up to 2 lookups, and none per call.
    for name, row in table.items():
        if name.startswith("pikku"):
            for size, cell in row.items():
                runs = cell["calls_per_s_64"]["n"]
                per_call = cell["discovery_lookups"] / max(cell["measured_calls"], 1)
                targets.append(
                    {
                        "target": (
                            f"{name} {size} B: discovery lookups <= 2 per run (one per 5 s cache period), "
                            f"{per_call:.1e} per call"
                        ),
                        "value": cell["discovery_lookups"] / runs,
                        "met": cell["discovery_lookups"] <= 2 * runs,
                    }
                )
    for report in memory:
        targets.append(
            {
                "target": (
                    f"{report['transport']} worker RSS growth from {report['samples'][0]['calls']:,} "
                    f"to {report['calls']:,} calls <= 10%"
                ),
                "value": report["growth"],
                "met": report["growth"] <= 0.10,
            }
        )
    return targets


# -- report --------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    def version(command: list[str]) -> str:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[-1]
        except (OSError, IndexError, subprocess.SubprocessError):
            return "unknown"

    import redis

    client = redis.Redis.from_url(REDIS_URL)
    redis_version = client.info("server")["redis_version"]
    client.close()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    libraries = {}
    for name in LIBRARIES:
        try:
            libraries[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            libraries[name] = "not installed"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "load_average_at_start": os.getloadavg(),
        "nats_server": version(["nats-server", "--version"]),
        "rabbitmq": version(["rabbitmqctl", "version"]),
        "redis": redis_version,
        "libraries": libraries,
    }


def fmt(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def cell(stat: dict[str, float], digits: int = 0) -> str:
    return f"{fmt(stat['median'], digits)} ({fmt(stat['min'], digits)}-{fmt(stat['max'], digits)})"


def markdown(result: dict[str, Any]) -> str:
    lines = []
    env = result["environment"]
    s = result["settings"]
    lines.append(
        f"Run of {env['date']}: {env['cores']} cores ({env['cpu']}), Python {env['python']}, "
        f"nats-server {env['nats_server'].split()[-1]}, RabbitMQ {env['rabbitmq']}, Redis {env['redis']}; "
        f"{s['repeats']} interleaved sweeps, {s['seconds']:g} s at {s['concurrency']} in flight, "
        f"up to {s['sequential']:,} sequential calls or {s['sequential_seconds']:g} s per case. "
        f"Cells show the median and, in brackets, the lowest and highest sweep."
    )
    lines.append("")
    lines.append(
        "| case | payload | seq p50 µs | seq p99 µs | calls/s @1 | calls/s @64 | p99 µs @64 | "
        "client CPU µs/call @64 | server CPU µs/call | broker CPU µs/call | machine busy @64 |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, sizes in result["cases"].items():
        for size, row in sizes.items():
            lines.append(
                f"| {name} | {int(size):,} B | {cell(row['seq_p50_us'])} | {fmt(row['seq_p99_us']['median'])} | "
                f"{fmt(row['calls_per_s_1']['median'])} | {cell(row['calls_per_s_64'])} | "
                f"{fmt(row['p99_us_64']['median'])} | {fmt(row['client_cpu_us_64']['median'])} | "
                f"{fmt(row['server_cpu_us_64']['median'])} | {fmt(row['broker_cpu_us_64']['median'])} | "
                f"{row['machine_busy_share_64']['median']:.0%} |"
            )
    lines.append("")
    lines.append("Ratios, taken within each sweep and then the median (lowest-highest sweep in brackets):")
    lines.append("")
    lines.append("| pikku_mq case | versus | payload | calls/s @64 ratio | calls/s @1 ratio | seq p50 ratio |")
    lines.append("|---|---|---:|---:|---:|---:|")
    for row in result["ratios"]:
        lines.append(
            f"| {row['pikku']} | {row['versus']} | {row['size']:,} B | {cell(row['throughput_64'], 2)} | "
            f"{cell(row['throughput_1'], 2)} | {cell(row['seq_p50'], 2)} |"
        )
    if result["memory"]:
        lines.append("")
        lines.append("| memory run | calls | RSS after first sample MiB | RSS at end MiB | growth |")
        lines.append("|---|---:|---:|---:|---:|")
        for report in result["memory"]:
            first = report["samples"][0]
            lines.append(
                f"| {report['transport']} worker | {report['calls']:,} | {first['rss_bytes'] / 2**20:.1f} "
                f"(after {first['calls']:,}) | {report['samples'][-1]['rss_bytes'] / 2**20:.1f} | "
                f"{report['growth']:+.2%} |"
            )
    if result["scale"]:
        lines.append("")
        lines.append(
            "| scale | workers | calls/s @64 | client CPU share | server CPU µs/call (all workers) | "
            "broker CPU µs/call | machine busy |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for row in result["scale_summary"]:
            lines.append(
                f"| {row['transport']} | {row['workers']} | {cell(row['calls_per_s'])} | "
                f"{row['client_cpu_share']:.0%} | {fmt(row['server_cpu_us'])} | {fmt(row['broker_cpu_us'])} | "
                f"{row['machine_busy_share']:.0%} |"
            )
    lines.append("")
    lines.append("| target | this run | met |")
    lines.append("|---|---:|---|")
    for target in result["targets"]:
        value = target["value"]
        shown = f"{value:+.2%}" if "RSS growth" in target["target"] else f"{value:.2f}"
        lines.append(f"| {target['target']} | {shown} | {'yes' if target['met'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def summarise_scale(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    summaries = []
    for key in sorted({(r["transport"], r["workers"]) for r in rows}):
        chosen = [r for r in rows if (r["transport"], r["workers"]) == key]
        summaries.append(
            {
                "transport": key[0],
                "workers": key[1],
                "calls_per_s": summary([r["calls_per_s"] for r in chosen]),
                "client_cpu_share": statistics.median(r["client_cpu_share"] for r in chosen),
                "server_cpu_us": statistics.median(r["server_cpu_us"] for r in chosen),
                "broker_cpu_us": statistics.median(r["broker_cpu_us"] for r in chosen),
                "machine_busy_share": statistics.median(r["machine_busy_share"] for r in chosen),
            }
        )
    return summaries


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"pikku": "#1f77b4", "raw": "#7f7f7f", "peer": "#ff7f0e", "pikku-secret": "#aec7e8"}
    sizes = sorted({int(size) for sizes in result["cases"].values() for size in sizes})
    figure, axes = plt.subplots(2, len(sizes), figsize=(6.5 * len(sizes), 8.5), squeeze=False)
    for column, size in enumerate(sizes):
        names = [n for n, s in result["cases"].items() if str(size) in s]
        rows = [result["cases"][n][str(size)] for n in names]
        for line, (metric, label) in enumerate(
            (("calls_per_s_64", "calls/s at 64 in flight"), ("seq_p50_us", "sequential p50 latency, µs"))
        ):
            axis = axes[line][column]
            medians = [r[metric]["median"] for r in rows]
            low = [m - r[metric]["min"] for m, r in zip(medians, rows, strict=True)]
            high = [r[metric]["max"] - m for m, r in zip(medians, rows, strict=True)]
            axis.bar(range(len(names)), medians, yerr=[low, high], capsize=3, color=[colours[r["kind"]] for r in rows])
            axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
            axis.set_yscale("log")
            axis.set_title(f"{label}, {size:,} B payload", fontsize=10)
            axis.grid(axis="y", which="both", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()]
    figure.legend(handles, ["pikku_mq", "raw floor", "peer", "pikku_mq, signed"], loc="upper center", ncol=4)
    figure.suptitle(
        f"Median of {result['settings']['repeats']} sweeps, bars span lowest to highest", y=0.955, fontsize=9
    )
    figure.tight_layout(rect=(0, 0, 1, 0.94))
    figure.savefig(path, dpi=90)
    plt.close(figure)


# -- main ----------------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    settings = QUICK if args.quick else FULL
    if args.repeats:
        settings.repeats = args.repeats
    transports = tuple(args.transports)
    result: dict[str, Any] = {
        "environment": environment(),
        "settings": settings.__dict__ | {"sizes": list(settings.sizes)},
    }
    raw: list[dict[str, Any]] = []
    memory: list[dict[str, Any]] = []
    scale: list[dict[str, Any]] = []
    started = time.monotonic()
    amqp = "amqp" in (*transports, *args.memory_transports, *args.scale_transports)
    with fixture_names(amqp) as fixture:
        cases = start_cases(fixture, transports, not args.no_peers, settings.sizes)
        log(f"{len(fixture.servers)} servers ready in {time.monotonic() - started:.0f} s")
        for repeat in range(settings.repeats):
            for case in cases:
                for size in case.sizes:
                    report = run_case(fixture, case, size, settings)
                    raw.append({"repeat": repeat, "case": case.name, "size": size, "result": report})
                    log(
                        f"#{repeat + 1} {case.name} {size} B: p50 {report['sequential']['p50_us']:,.0f} µs, "
                        f"{report['concurrent']['calls_per_s']:,.0f} calls/s @64"
                    )
        stop_servers(fixture)
        for transport in args.memory_transports:
            memory.append(measure_memory(fixture, transport, settings))
            log(f"memory {transport}: {memory[-1]['growth']:+.1%} from the first sample to the last")
        for transport in args.scale_transports:
            scale.extend(measure_scale(fixture, transport, settings, log))

    result["cases"] = aggregate(cases, raw)
    result["ratios"] = compute_ratios(cases, raw)
    result["memory"] = memory
    result["scale"] = scale
    result["scale_summary"] = summarise_scale(scale)
    result["targets"] = check_targets(result["cases"], result["ratios"], memory)
    result["runs"] = raw
    result["environment"]["load_average_at_end"] = os.getloadavg()
    result["environment"]["seconds"] = round(time.monotonic() - started)
    return result


def transport_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in TRANSPORTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown transport {unknown}; choose from {', '.join(TRANSPORTS)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 sweep, 100-byte payloads, short phases")
    parser.add_argument("--repeats", type=int, default=0, help="number of interleaved sweeps (default 3, quick 1)")
    parser.add_argument(
        "--transports", type=transport_list, default=list(TRANSPORTS), help="comma-separated transports"
    )
    parser.add_argument("--no-peers", action="store_true", help="leave out FastStream, aio-pika RPC and nameko")
    parser.add_argument(
        "--memory-transports",
        type=transport_list,
        default=["nats", "http"],
        help="workers of the memory run ('' for none)",
    )
    parser.add_argument(
        "--scale-transports",
        type=transport_list,
        default=["nats", "amqp"],
        help="transports of the scale run ('' for none)",
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "results" / "rpc_bench.json", help="JSON result file"
    )
    parser.add_argument("--markdown", type=Path, help="also write the Markdown report to this file")
    parser.add_argument("--plot", type=Path, help="PNG plot file (default: beside the JSON file)")
    parser.add_argument("--no-plot", action="store_true", help="write no plot (matplotlib is not needed then)")
    args = parser.parse_args()
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        # Said before the run, not as a traceback after it, which would also lose the report.
        print("leaving out the plot: matplotlib not installed (pip install -e '.[bench]')", file=sys.stderr)
        args.no_plot = True

    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    report = markdown(result)
    if args.markdown:
        args.markdown.write_text(report)
    if not args.no_plot:
        plot(result, args.plot or args.out.with_suffix(".png"))
    print(report)


if __name__ == "__main__":
    main()
