"""Measure what the discovery registry costs per backend: heartbeat load, cold lookups and the routing cache.

Backends: an SQLite file (SqliteDeploymentService), PostgreSQL through asyncpg (PgDeploymentService),
Redis (RedisDeploymentService) and PostgreSQL through SQLAlchemy (``postgresql+asyncpg://``). Each
PostgreSQL backend gets its own schema ``pikku_bench_<random hex>`` and Redis its own key prefix
``pikku_bench_<random hex>:``. The schemas are dropped and the prefix's keys deleted (SCAN + DEL of
that prefix only) when the script ends, also on an error, Ctrl-C or SIGTERM.

Method. 500 instances are simulated without 500 processes: one service object per backend, with the
library's own connection pool, registers 500 configs with its ``_register``. A scheduler then runs
one heartbeat cycle per instance per interval, spread evenly over the interval, for a fixed time,
with a bounded number of cycles in flight. A cycle is what the library's heartbeat loop does on each
tick: ``_heartbeat`` (and ``_register`` again if it returns False), then ``_purge_stale``. So the
store receives the statements of 500 instances at a 1 s heartbeat, but over the few connections of one
pool instead of 500 processes with a connection each. Instances are grouped into services of
``--replicas`` instances that host the same functions, so a lookup returns ``--replicas`` rows.
The whole run is done with 2 and with 20 functions per instance, to show whether a heartbeat's cost
grows with its functions.

What reaches the store is counted where the driver sends it:

- SQLite: sqlite3's trace callback on every connection, which sees every statement the library runs
  (PRAGMAs, BEGIN IMMEDIATE and COMMIT included), and the connections opened;
- PgDeploymentService: an asyncpg query logger on every pool connection;
- SQLAlchemy on PostgreSQL: SQLAlchemy's ``before_cursor_execute`` event for the statements, plus an
  asyncpg query logger on each connection for the BEGIN, COMMIT and ROLLBACK that asyncpg sends
  itself. Prepare round trips on a statement-cache miss are not counted (none after the warm-up);
- Redis: a client subclass that counts ``execute_command``, so a Lua script is one command (one round
  trip) however many commands it runs inside the server.

The load table also gives the CPU share of this one process (100% is one core), which does the work
of all 500 instances: when it nears 100%, the figure reached is the simulator's limit, not the store's.

Then, with 20 functions per instance: cold ``find_function`` latency (sequential lookups of random
function names, straight to the store), and the cached routing lookup (the Router's ``_instances``
and ``_pick`` on a warm cache, timed over batches of calls) against a raw floor measured in the same
run: an asyncpg prepared ``SELECT 1`` on a dedicated connection, a Redis PING, or an sqlite3
``SELECT 1`` on an open connection. Runs on uvloop. Run from the repository root:

    python benchmarks/registry.py [--instances 500] [--functions 20] [--seconds 5] [--backends sqlite,...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import platform
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomysql
import asyncpg
import redis
import redis.asyncio as redis_asyncio
import sqlalchemy as sa
import uvloop
from sqlalchemy import event
from sqlalchemy.util import await_only

from pikku_mq import DeploymentConfig
from pikku_mq.backends.base import DeploymentService
from pikku_mq.backends.postgres import PgDeploymentService
from pikku_mq.backends.redis import RedisDeploymentService
from pikku_mq.backends.sqlalchemy import SqlAlchemyDeploymentService
from pikku_mq.backends.sqlite import SqliteDeploymentService

BACKEND_NAMES = ("sqlite", "postgres", "redis", "sqlalchemy", "mariadb")

# A drained run gets this long to finish the cycles still in flight before they are cancelled.
DRAIN_TIMEOUT_S = 30.0


class StatementCounter:
    """Counts the statements (or Redis commands) that reach a store, and the connections it opens.

    Thread-safe, because SQLite's trace callback runs in aiosqlite's worker threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.statements = 0
        self.connections = 0
        self.recent: deque[str] = deque(maxlen=40)

    def add_statement(self, text: object) -> None:
        with self._lock:
            self.statements += 1
            self.recent.append(" ".join(str(text).split())[:100])

    def add_connection(self) -> None:
        with self._lock:
            self.connections += 1

    async def snapshot(self) -> tuple[int, int]:
        """Return (statements, connections) once pending query-logger callbacks have run."""
        # asyncpg calls query loggers through loop.call_soon, so give those callbacks a few turns.
        for _ in range(3):
            await asyncio.sleep(0)
        with self._lock:
            return self.statements, self.connections


@dataclass
class Backend:
    name: str
    service: DeploymentService
    counter: StatementCounter
    floor_name: str
    floor_call: Callable[[], Awaitable[object]]
    counts_connections: bool = True


@dataclass
class Instance:
    config: DeploymentConfig
    functions: list[str]


@dataclass
class HeartbeatRow:
    functions_per_instance: int
    statements_per_heartbeat: float
    statements_per_purge: float
    heartbeat_p50_us: float
    purge_p50_us: float
    target_cycles_per_s: float
    achieved_cycles_per_s: float
    statements_per_s: float
    connections_per_cycle: float
    missed: int
    failed: int
    max_lag_s: float
    client_cpu_percent: float


@dataclass
class BackendResult:
    name: str
    counts_connections: bool
    heartbeats: list[HeartbeatRow] = field(default_factory=list)
    cycle_statements: list[str] = field(default_factory=list)
    lookup_p50_us: float = 0.0
    lookup_p99_us: float = 0.0
    statements_per_lookup: float = 0.0
    wrong_lookups: int = 0
    instances_us: float = 0.0
    pick_us: float = 0.0
    statements_in_cached_loop: int = 0
    floor_name: str = ""
    floor_p50_us: float = 0.0


# -- the simulated instances ---------------------------------------------------------------------


def build_instances(count: int, functions_per_instance: int, replicas: int) -> list[Instance]:
    """Build ``count`` instances; each run of ``replicas`` consecutive instances hosts the same functions."""
    instances = []
    for index in range(count):
        service_index = index // replicas
        functions = [f"svc{service_index:03d}_fn{k:02d}" for k in range(functions_per_instance)]
        config = DeploymentConfig(
            deployment_id=f"bench-{index:04d}",
            endpoint=f"http://127.0.0.1:{20000 + index}",
            functions=functions,
        )
        instances.append(Instance(config, functions))
    return instances


async def run_bounded(
    call: Callable[[Instance], Awaitable[object]], instances: list[Instance], concurrency: int
) -> None:
    """Run ``call`` for every instance, at most ``concurrency`` at once."""
    semaphore = asyncio.Semaphore(concurrency)

    async def run_one(instance: Instance) -> None:
        async with semaphore:
            await call(instance)

    await asyncio.gather(*(run_one(instance) for instance in instances))


def percentile(sorted_values: list[float], fraction: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * fraction))]


async def sample_calls(
    counter: StatementCounter, call: Callable[[], Awaitable[object]], count: int
) -> tuple[float, float, float]:
    """Run ``call`` ``count`` times in sequence; return statements per call, connections per call, p50 µs."""
    statements_before, connections_before = await counter.snapshot()
    latencies = []
    for _ in range(count):
        start = time.perf_counter()
        await call()
        latencies.append(time.perf_counter() - start)
    statements_after, connections_after = await counter.snapshot()
    return (
        (statements_after - statements_before) / count,
        (connections_after - connections_before) / count,
        statistics.median(latencies) * 1e6,
    )


# -- heartbeat load --------------------------------------------------------------------------------


@dataclass
class DriveResult:
    cycles: int
    elapsed_s: float
    missed: int
    failed: int
    max_lag_s: float


async def drive_heartbeats(
    service: DeploymentService, instances: list[Instance], interval: float, seconds: float, concurrency: int
) -> DriveResult:
    """Run one heartbeat cycle per instance per ``interval`` for ``seconds``, at most ``concurrency`` at once.

    Ticks are spread evenly over the interval. When the store cannot keep up, the scheduler waits for
    a free slot, so it falls behind (``max_lag_s``) instead of piling up cycles.
    """
    semaphore = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    cycles = missed = failed = 0
    max_lag = 0.0

    async def cycle(instance: Instance) -> None:
        nonlocal cycles, missed, failed
        try:
            if not await service._heartbeat(instance.config, instance.functions):
                missed += 1
                await service._register(instance.config, instance.functions)
            await service._purge_stale()
            cycles += 1
        except Exception as exc:
            if not failed:
                print(f"a heartbeat cycle of {instance.config.deployment_id} failed: {type(exc).__name__}: {exc}")
            failed += 1
        finally:
            semaphore.release()

    step = interval / len(instances)
    start = time.monotonic()
    tick = 0
    try:
        while True:
            due = start + tick * step
            now = time.monotonic()
            if due - start >= seconds or now - start >= seconds:
                break
            if due > now:
                await asyncio.sleep(due - now)
            await semaphore.acquire()
            max_lag = max(max_lag, time.monotonic() - due)
            task = asyncio.create_task(cycle(instances[tick % len(instances)]))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            tick += 1
        if tasks:
            await asyncio.wait(set(tasks), timeout=DRAIN_TIMEOUT_S)
        elapsed = time.monotonic() - start
    finally:
        for task in list(tasks):
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    return DriveResult(cycles, elapsed, missed, failed, max_lag)


async def measure_heartbeats(
    backend: Backend, args: argparse.Namespace, functions_per_instance: int, rng: random.Random
) -> tuple[HeartbeatRow, list[str]]:
    service, counter = backend.service, backend.counter
    instances = build_instances(args.instances, functions_per_instance, args.replicas)
    await run_bounded(lambda i: service._register(i.config, i.functions), instances, args.concurrency)

    # The counted heartbeats go to a few instances refreshed just before, because on a slow store the
    # first registrations can be stale (and purged) by the time the last one is written.
    sampled = rng.sample(instances, min(10, len(instances)))

    async def heartbeat_sampled() -> None:
        instance = rng.choice(sampled)
        if not await service._heartbeat(instance.config, instance.functions):
            raise RuntimeError(f"heartbeat of {instance.config.deployment_id} found no registration")

    # Warm-up: prepared-statement caches, pool connections, Lua script cache, and purging the stale rows.
    for instance in sampled:
        if not await service._heartbeat(instance.config, instance.functions):
            await service._register(instance.config, instance.functions)
    for _ in range(20):
        await heartbeat_sampled()
        await service._purge_stale()

    heartbeat_statements, heartbeat_connections, heartbeat_p50 = await sample_calls(
        counter, heartbeat_sampled, args.samples
    )
    purge_statements, purge_connections, purge_p50 = await sample_calls(counter, service._purge_stale, args.samples)

    # The statements of one cycle, as the store saw them.
    await counter.snapshot()
    counter.recent.clear()
    await heartbeat_sampled()
    await service._purge_stale()
    await counter.snapshot()
    cycle_statements = list(counter.recent)

    statements_before, connections_before = await counter.snapshot()
    cpu_before = time.process_time()
    driven = await drive_heartbeats(service, instances, args.interval, args.seconds, args.concurrency)
    cpu_used = time.process_time() - cpu_before
    statements_after, connections_after = await counter.snapshot()

    row = HeartbeatRow(
        functions_per_instance=functions_per_instance,
        statements_per_heartbeat=heartbeat_statements,
        statements_per_purge=purge_statements,
        heartbeat_p50_us=heartbeat_p50,
        purge_p50_us=purge_p50,
        target_cycles_per_s=args.instances / args.interval,
        achieved_cycles_per_s=driven.cycles / driven.elapsed_s,
        statements_per_s=(statements_after - statements_before) / driven.elapsed_s,
        connections_per_cycle=(connections_after - connections_before) / max(driven.cycles, 1),
        missed=driven.missed,
        failed=driven.failed,
        max_lag_s=driven.max_lag_s,
        client_cpu_percent=cpu_used / driven.elapsed_s * 100,
    )
    del heartbeat_connections, purge_connections  # the timed run gives the same figure over many cycles
    return row, cycle_statements


# -- lookups ---------------------------------------------------------------------------------------


async def measure_lookups(
    backend: Backend, args: argparse.Namespace, rng: random.Random, result: BackendResult
) -> None:
    """Measure cold lookups, the cached routing lookup and the raw floor, with 20 functions per instance."""
    service, counter = backend.service, backend.counter
    instances = build_instances(args.instances, args.functions, args.replicas)
    names = sorted({name for instance in instances for name in instance.functions})

    # Refresh every instance, and register again those that a purge removed while the store lagged.
    async def refresh(instance: Instance) -> None:
        if not await service._heartbeat(instance.config, instance.functions):
            await service._register(instance.config, instance.functions)

    await run_bounded(refresh, instances, args.concurrency)

    for name in names[:20]:
        await service.find_function(name)
    statements_before, _ = await counter.snapshot()
    latencies = []
    wrong = 0
    for _ in range(args.lookups):
        name = rng.choice(names)
        start = time.perf_counter()
        found = await service.find_function(name)
        latencies.append(time.perf_counter() - start)
        if len(found) != args.replicas:
            wrong += 1
    statements_after, _ = await counter.snapshot()
    latencies.sort()
    result.lookup_p50_us = statistics.median(latencies) * 1e6
    result.lookup_p99_us = percentile(latencies, 0.99) * 1e6
    result.statements_per_lookup = (statements_after - statements_before) / args.lookups
    result.wrong_lookups = wrong

    await measure_router(backend, args, rng, names, result)

    for _ in range(200):
        await backend.floor_call()
    floor_latencies = []
    for _ in range(args.floor_calls):
        start = time.perf_counter()
        await backend.floor_call()
        floor_latencies.append(time.perf_counter() - start)
    result.floor_name = backend.floor_name
    result.floor_p50_us = statistics.median(floor_latencies) * 1e6


async def measure_router(
    backend: Backend, args: argparse.Namespace, rng: random.Random, names: list[str], result: BackendResult
) -> None:
    """Time the Router's cached ``_instances`` and ``_pick``: the median over rounds of µs per call.

    The cache of each name is refreshed before every round, so a round of ``--router-calls`` calls
    (a few tens of ms) runs on a warm cache. Store statements during the timed calls are counted.
    """
    router = backend.service.router
    warm_names = rng.sample(names, min(100, len(names)))
    no_tried: set[str] = set()
    per_call: dict[str, list[float]] = {"instances": [], "pick": []}
    statements_in_loop = 0

    for _ in range(args.router_rounds):
        for kind in per_call:
            router.invalidate()
            for name in warm_names:
                await router._instances(name)
            statements_before, _ = await backend.counter.snapshot()
            start = time.perf_counter()
            if kind == "instances":
                for index in range(args.router_calls):
                    await router._instances(warm_names[index % len(warm_names)])
            else:
                for index in range(args.router_calls):
                    await router._pick(warm_names[index % len(warm_names)], no_tried)
            per_call[kind].append((time.perf_counter() - start) / args.router_calls * 1e6)
            statements_after, _ = await backend.counter.snapshot()
            statements_in_loop += statements_after - statements_before

    result.instances_us = statistics.median(per_call["instances"])
    result.pick_us = statistics.median(per_call["pick"])
    result.statements_in_cached_loop = statements_in_loop


async def measure_backend(backend: Backend, args: argparse.Namespace) -> BackendResult:
    rng = random.Random(args.seed)
    result = BackendResult(backend.name, backend.counts_connections)
    await backend.service.init()
    for functions_per_instance in (args.few_functions, args.functions):
        row, cycle_statements = await measure_heartbeats(backend, args, functions_per_instance, rng)
        result.heartbeats.append(row)
        result.cycle_statements = cycle_statements
    await measure_lookups(backend, args, rng, result)
    return result


# -- backends --------------------------------------------------------------------------------------


def service_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"heartbeat_interval": args.interval, "heartbeat_ttl": args.ttl}


def trace_sqlite_connection(counter: StatementCounter, dbapi_connection: Any, _record: Any) -> None:
    counter.add_connection()
    # aiosqlite runs the sqlite3 connection in its own thread; this sets the callback there.
    await_only(dbapi_connection.driver_connection.set_trace_callback(counter.add_statement))


@contextlib.asynccontextmanager
async def sqlite_backend(args: argparse.Namespace, workdir: Path) -> AsyncIterator[Backend]:
    path = workdir / "registry.db"
    counter = StatementCounter()
    service = SqliteDeploymentService(path, **service_options(args))
    # insert=True puts the trace ahead of the library's own connect listener, so its PRAGMAs are counted.
    listener = functools.partial(trace_sqlite_connection, counter)
    event.listen(service.engine.sync_engine, "connect", listener, insert=True)
    raw = sqlite3.connect(path)

    async def select_one() -> object:
        return raw.execute("SELECT 1").fetchone()

    try:
        yield Backend("SQLite file", service, counter, "sqlite3 SELECT 1", select_one)
    finally:
        try:
            await service.close()
        finally:
            raw.close()


async def drop_schema(dsn: str, schema: str) -> None:
    """Drop a schema that this script created; ``schema`` is always ``pikku_bench_<hex>``."""
    connection = await asyncpg.connect(dsn)
    try:
        await connection.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def prepared_select_one(dsn: str) -> AsyncIterator[Callable[[], Awaitable[object]]]:
    connection = await asyncpg.connect(dsn)
    try:
        statement = await connection.prepare("SELECT 1")
        yield statement.fetchval
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def postgres_backend(args: argparse.Namespace, _workdir: Path) -> AsyncIterator[Backend]:
    schema = f"pikku_bench_{uuid.uuid4().hex[:12]}"
    counter = StatementCounter()

    def log_query(record: Any) -> None:
        counter.add_statement(record.query)

    async def init_connection(connection: Any) -> None:
        counter.add_connection()
        connection.add_query_logger(log_query)

    service = PgDeploymentService(
        args.pg_dsn, schema=schema, pool_options={"init": init_connection}, **service_options(args)
    )
    try:
        async with prepared_select_one(args.pg_dsn) as floor_call:
            yield Backend("PostgreSQL (asyncpg)", service, counter, "asyncpg prepared SELECT 1", floor_call)
    finally:
        try:
            await service.close()
        finally:
            await drop_schema(args.pg_dsn, schema)


@contextlib.asynccontextmanager
async def sqlalchemy_backend(args: argparse.Namespace, _workdir: Path) -> AsyncIterator[Backend]:
    schema = f"pikku_bench_{uuid.uuid4().hex[:12]}"
    counter = StatementCounter()
    url = args.pg_dsn.replace("postgresql://", "postgresql+asyncpg://", 1)
    service = SqlAlchemyDeploymentService(url, schema=schema, **service_options(args))

    def log_query(record: Any) -> None:
        counter.add_statement(record.query)

    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        counter.add_connection()
        dbapi_connection.driver_connection.add_query_logger(log_query)

    def before_cursor_execute(*event_args: Any) -> None:
        counter.add_statement(event_args[2])

    event.listen(service.engine.sync_engine, "connect", on_connect)
    event.listen(service.engine.sync_engine, "before_cursor_execute", before_cursor_execute)
    try:
        async with prepared_select_one(args.pg_dsn) as floor_call:
            # SQLAlchemy's create_all does not create the schema itself.
            async with service.engine.begin() as connection:
                await connection.execute(sa.schema.CreateSchema(schema))
            yield Backend("SQLAlchemy on PostgreSQL", service, counter, "asyncpg prepared SELECT 1", floor_call)
    finally:
        try:
            await service.close()
        finally:
            await drop_schema(args.pg_dsn, schema)


@contextlib.asynccontextmanager
async def mariadb_select_one(args: argparse.Namespace) -> AsyncIterator[Callable[[], Awaitable[object]]]:
    """``SELECT 1`` on a dedicated aiomysql connection: the floor of the MariaDB backend."""
    connection = await aiomysql.connect(host=args.mariadb_host, port=args.mariadb_port, user=args.mariadb_user)
    try:

        async def select_one() -> object:
            async with connection.cursor() as cursor:
                await cursor.execute("SELECT 1")
                return await cursor.fetchone()

        yield select_one
    finally:
        connection.close()


@contextlib.asynccontextmanager
async def mariadb_backend(args: argparse.Namespace, _workdir: Path) -> AsyncIterator[Backend]:
    database = f"pikku_bench_{uuid.uuid4().hex[:12]}"
    counter = StatementCounter()
    async with mariadb_select_one(args) as floor_call:
        admin = await aiomysql.connect(
            host=args.mariadb_host, port=args.mariadb_port, user=args.mariadb_user, autocommit=True
        )
        try:
            async with admin.cursor() as cursor:
                await cursor.execute(f"CREATE DATABASE {database}")
            url = f"mysql+aiomysql://{args.mariadb_user}@{args.mariadb_host}:{args.mariadb_port}/{database}"
            service = SqlAlchemyDeploymentService(url, **service_options(args))

            def on_connect(*_event_args: Any) -> None:
                counter.add_connection()

            def before_cursor_execute(*event_args: Any) -> None:
                counter.add_statement(event_args[2])

            event.listen(service.engine.sync_engine, "connect", on_connect)
            event.listen(service.engine.sync_engine, "before_cursor_execute", before_cursor_execute)
            try:
                yield Backend("SQLAlchemy on MariaDB", service, counter, "aiomysql SELECT 1", floor_call)
            finally:
                await service.close()
        finally:
            try:
                async with admin.cursor() as cursor:
                    await cursor.execute(f"DROP DATABASE IF EXISTS {database}")
            finally:
                admin.close()


class CountingRedis(redis_asyncio.Redis):
    """A redis-py asyncio client that counts the commands it sends (a Lua script call is one)."""

    counter: StatementCounter

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.counter.add_statement(" ".join(str(a) for a in args[:2]))
        return await super().execute_command(*args, **options)


async def delete_prefix(client: redis_asyncio.Redis, prefix: str) -> None:
    """Delete the keys under ``prefix``, which this script created (``pikku_bench_<hex>:``)."""
    batch: list[Any] = []
    async for key in client.scan_iter(match=f"{prefix}*", count=500):
        batch.append(key)
        if len(batch) >= 500:
            await client.delete(*batch)
            batch.clear()
    if batch:
        await client.delete(*batch)


@contextlib.asynccontextmanager
async def redis_backend(args: argparse.Namespace, _workdir: Path) -> AsyncIterator[Backend]:
    prefix = f"pikku_bench_{uuid.uuid4().hex[:12]}:"
    counter = StatementCounter()
    # The same pool settings as RedisDeploymentService builds from a URL.
    pool = redis_asyncio.BlockingConnectionPool.from_url(args.redis_url, max_connections=50, timeout=10)
    client = CountingRedis.from_pool(pool)
    client.counter = counter
    plain = redis_asyncio.Redis.from_url(args.redis_url)
    service = RedisDeploymentService(client, key_prefix=prefix, **service_options(args))
    try:
        yield Backend("Redis", service, counter, "redis PING", plain.ping, counts_connections=False)
    finally:
        try:
            await service.close()
            await client.aclose()
        finally:
            try:
                await delete_prefix(plain, prefix)
            finally:
                await plain.aclose()


BACKENDS = {
    "sqlite": sqlite_backend,
    "postgres": postgres_backend,
    "redis": redis_backend,
    "sqlalchemy": sqlalchemy_backend,
    "mariadb": mariadb_backend,
}


# -- report ----------------------------------------------------------------------------------------


def print_report(results: list[BackendResult], args: argparse.Namespace) -> None:
    print(
        f"\n{datetime.date.today().isoformat()}, Python {platform.python_version()}, asyncpg {asyncpg.__version__}, "
        f"SQLAlchemy {sa.__version__}, redis-py {redis.__version__}; {args.instances} instances, "
        f"{args.interval:g} s heartbeat, {args.ttl:g} s TTL, {args.replicas} instances per function, "
        f"{args.seconds:g} s per load run, {args.concurrency} cycles in flight at most\n"
    )

    print("### Heartbeats (a cycle is one heartbeat and one purge, as the heartbeat loop runs them)\n")
    print(
        "| backend | functions | statements per heartbeat | statements per purge | heartbeat p50 µs | "
        "purge p50 µs | cycles/s target | cycles/s reached | statements/s | connections opened per cycle | "
        "missed heartbeats | failed cycles | max scheduler lag s | benchmark process CPU % |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        for row in result.heartbeats:
            connections = f"{row.connections_per_cycle:.2f}" if result.counts_connections else "n/a"
            print(
                f"| {result.name} | {row.functions_per_instance} | {row.statements_per_heartbeat:.2f} | "
                f"{row.statements_per_purge:.2f} | {row.heartbeat_p50_us:,.0f} | {row.purge_p50_us:,.0f} | "
                f"{row.target_cycles_per_s:,.0f} | {row.achieved_cycles_per_s:,.0f} | {row.statements_per_s:,.0f} | "
                f"{connections} | {row.missed} | {row.failed} | {row.max_lag_s:.2f} | "
                f"{row.client_cpu_percent:.0f} |"
            )

    print("\n### Is a heartbeat's statement count constant in the number of functions?\n")
    print(
        f"| backend | statements per heartbeat, {args.few_functions} functions | "
        f"statements per heartbeat, {args.functions} functions | constant |"
    )
    print("|---|---:|---:|---|")
    for result in results:
        few, many = result.heartbeats[0], result.heartbeats[-1]
        constant = "yes" if abs(few.statements_per_heartbeat - many.statements_per_heartbeat) < 0.01 else "no"
        print(
            f"| {result.name} | {few.statements_per_heartbeat:.2f} | {many.statements_per_heartbeat:.2f} | {constant} |"
        )

    print(f"\n### Lookups ({args.functions} functions per instance)\n")
    print(
        "| backend | cold find_function p50 µs | p99 µs | statements per lookup | raw floor | floor p50 µs | "
        "cold p50 ÷ floor | cached `_instances` µs | cached `_pick` µs | floor ÷ `_instances` | floor ÷ `_pick` |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for result in results:
        print(
            f"| {result.name} | {result.lookup_p50_us:,.0f} | {result.lookup_p99_us:,.0f} | "
            f"{result.statements_per_lookup:.2f} | {result.floor_name} | {result.floor_p50_us:,.1f} | "
            f"{result.lookup_p50_us / result.floor_p50_us:,.1f} | {result.instances_us:.2f} | {result.pick_us:.2f} | "
            f"{result.floor_p50_us / result.instances_us:,.1f} | {result.floor_p50_us / result.pick_us:,.1f} |"
        )

    problems = [
        f"{r.name}: {r.wrong_lookups} lookups did not return {args.replicas} instances"
        for r in results
        if r.wrong_lookups
    ]
    problems += [
        f"{r.name}: {r.statements_in_cached_loop} store statements ran during the cached-lookup loops"
        for r in results
        if r.statements_in_cached_loop
    ]
    for problem in problems:
        print(f"\nWARNING: {problem}")

    if args.show_statements:
        for result in results:
            print(f"\nStatements of one cycle, {result.name}, {args.functions} functions:")
            for statement in result.cycle_statements:
                print(f"    {statement}")


async def run(args: argparse.Namespace) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    # SIGTERM cancels the run like Ctrl-C does, so every backend's cleanup still runs.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)

    results = []
    with tempfile.TemporaryDirectory(prefix="pikku-bench-") as workdir:
        for name in args.backends:
            async with BACKENDS[name](args, Path(workdir)) as backend:
                started = time.monotonic()
                results.append(await measure_backend(backend, args))
                print(f"{backend.name}: measured in {time.monotonic() - started:.0f} s", flush=True)
    print_report(results, args)


def backend_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown backend in {text!r}; choose from {', '.join(BACKEND_NAMES)}")
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", type=backend_list, default=list(BACKEND_NAMES), help="comma-separated backends")
    parser.add_argument("--instances", type=int, default=500, help="simulated instances")
    parser.add_argument("--functions", type=int, default=20, help="functions per instance in the main run")
    parser.add_argument("--few-functions", type=int, default=2, help="functions per instance in the comparison run")
    parser.add_argument("--replicas", type=int, default=10, help="instances that host the same functions")
    parser.add_argument("--interval", type=float, default=1.0, help="heartbeat interval, in seconds")
    parser.add_argument("--ttl", type=float, default=3.0, help="heartbeat TTL, in seconds")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each heartbeat load run, in seconds")
    parser.add_argument("--concurrency", type=int, default=16, help="maximum heartbeat cycles in flight")
    parser.add_argument("--samples", type=int, default=50, help="sequential heartbeats and purges that are counted")
    parser.add_argument("--lookups", type=int, default=500, help="cold find_function calls")
    parser.add_argument("--router-calls", type=int, default=20_000, help="cached lookups per timed round")
    parser.add_argument("--router-rounds", type=int, default=5, help="timed rounds of cached lookups")
    parser.add_argument("--floor-calls", type=int, default=2000, help="sequential raw round trips for the floor")
    parser.add_argument("--seed", type=int, default=1, help="seed for the random choice of instances and names")
    parser.add_argument("--pg-dsn", default="postgresql://root@127.0.0.1:5432/test", help="PostgreSQL DSN")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="Redis URL")
    parser.add_argument("--mariadb-host", default="127.0.0.1", help="MariaDB host")
    parser.add_argument("--mariadb-port", type=int, default=3306, help="MariaDB port")
    parser.add_argument("--mariadb-user", default="root", help="MariaDB user, without a password")
    parser.add_argument("--show-statements", action="store_true", help="print the statements of one cycle")
    args = parser.parse_args()

    positive = ("instances", "functions", "few_functions", "replicas", "concurrency", "samples", "lookups")
    for name in (*positive, "router_calls", "router_rounds", "floor_calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not 0 < args.interval < args.ttl:
        parser.error(f"--interval must be positive and less than --ttl, got {args.interval} and {args.ttl}")
    if not 0 < args.seconds <= 60:
        parser.error(f"--seconds must be in (0, 60], got {args.seconds}")

    try:
        uvloop.run(run(args))
    except asyncio.CancelledError:
        sys.exit("stopped by SIGTERM before the report")
    except KeyboardInterrupt:
        sys.exit("interrupted before the report")


if __name__ == "__main__":
    main()
