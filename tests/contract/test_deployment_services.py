"""Contract suite for deployment services, run against every discovery backend.

To add a backend, write a ``Backend`` (how to build a service on a shared store, and how to delete a
registration behind the service's back) and append it to ``BACKENDS``.
"""

import asyncio
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from _support_core import wait_until
from _support_redis import REDIS_URL, drop_redis_prefixes, redis_prefix, sync_client
from _support_sql import (
    create_mariadb_database,
    drop_mariadb_database,
    drop_postgres_schema,
    mariadb_execute,
    mariadb_url,
    postgres_execute,
    postgres_url,
    unique_name,
)

from pikku_mq import (
    ConfigurationError,
    DeploymentConfig,
    DeploymentConflictError,
    DeploymentInfo,
    DeploymentService,
    DiscoveryError,
    MemoryDeploymentService,
    MemoryRegistry,
    PgDeploymentService,
    RedisDeploymentService,
    SqlAlchemyDeploymentService,
    SqliteDeploymentService,
    deployment_service_from_url,
)
from pikku_mq.backends.memory import named_registry

INTERVAL = 0.2
TTL = 0.6


@dataclass(frozen=True)
class Backend:
    """How the contract suite drives one discovery backend.

    ``make(tmp_path, heartbeat_interval, heartbeat_ttl)`` returns a new service, and every service made
    with the same ``tmp_path`` shares one store. ``delete_registration(tmp_path, deployment_id)`` removes a
    registration directly in the store, as if the store had lost it. ``delete_function_row``, where the
    store keeps one row per function, removes one of them.
    ``drop_store(tmp_path)``, where the store lives on a shared server, deletes it after the test.
    """

    name: str
    make: Callable[[Path, float, float], DeploymentService]
    delete_registration: Callable[[Path, str], None]
    delete_function_row: Callable[[Path, str, str], None] | None = None
    drop_store: Callable[[Path], None] | None = None


def _make_memory(tmp_path: Path, interval: float, ttl: float) -> DeploymentService:
    return MemoryDeploymentService(named_registry(str(tmp_path)), heartbeat_interval=interval, heartbeat_ttl=ttl)


def _delete_memory(tmp_path: Path, deployment_id: str) -> None:
    named_registry(str(tmp_path)).rows.pop(deployment_id)


def _sqlite_file(tmp_path: Path) -> Path:
    return tmp_path / "registry.db"


def _make_sqlite(tmp_path: Path, interval: float, ttl: float) -> DeploymentService:
    return SqliteDeploymentService(_sqlite_file(tmp_path), heartbeat_interval=interval, heartbeat_ttl=ttl)


def _delete_sqlite(tmp_path: Path, deployment_id: str) -> None:
    with sqlite3.connect(_sqlite_file(tmp_path), timeout=15) as conn:
        conn.execute("DELETE FROM pikku_deployment_functions WHERE deployment_id = ?", (deployment_id,))
        deleted = conn.execute("DELETE FROM pikku_deployments WHERE deployment_id = ?", (deployment_id,)).rowcount
    assert deleted == 1


def _delete_sqlite_function(tmp_path: Path, deployment_id: str, function: str) -> None:
    with sqlite3.connect(_sqlite_file(tmp_path), timeout=15) as conn:
        deleted = conn.execute(
            "DELETE FROM pikku_deployment_functions WHERE deployment_id = ? AND function_name = ?",
            (deployment_id, function),
        ).rowcount
    assert deleted == 1


def _make_redis(tmp_path: Path, interval: float, ttl: float) -> DeploymentService:
    prefix = redis_prefix(tmp_path)
    return RedisDeploymentService(REDIS_URL, key_prefix=prefix, heartbeat_interval=interval, heartbeat_ttl=ttl)


def _delete_redis(tmp_path: Path, deployment_id: str) -> None:
    with sync_client() as client:
        assert client.delete(f"{redis_prefix(tmp_path)}deployment:{deployment_id}") == 1


def _delete_redis_function(tmp_path: Path, deployment_id: str, function: str) -> None:
    with sync_client() as client:
        assert client.zrem(f"{redis_prefix(tmp_path)}fn:{function}", deployment_id) == 1


def _drop_redis(tmp_path: Path) -> None:
    drop_redis_prefixes()


# The servers' stores are named per test: a PostgreSQL schema or a MariaDB database of the test's own.
_STORE_NAMES: dict[Path, str] = {}


def _store_name(tmp_path: Path) -> str:
    if tmp_path not in _STORE_NAMES:
        _STORE_NAMES[tmp_path] = unique_name()
    return _STORE_NAMES[tmp_path]


def _make_postgres(tmp_path: Path, interval: float, ttl: float) -> DeploymentService:
    return PgDeploymentService(
        postgres_url(), schema=_store_name(tmp_path), heartbeat_interval=interval, heartbeat_ttl=ttl
    )


def _delete_postgres(tmp_path: Path, deployment_id: str) -> None:
    table = f"{_store_name(tmp_path)}.pikku_deployments"
    assert postgres_execute(f"DELETE FROM {table} WHERE deployment_id = $1", deployment_id) == "DELETE 1"


def _drop_postgres(tmp_path: Path) -> None:
    if tmp_path in _STORE_NAMES:
        drop_postgres_schema(_STORE_NAMES.pop(tmp_path))


def _make_sqlalchemy_postgres(tmp_path: Path, interval: float, ttl: float) -> DeploymentService:
    # SQLAlchemy creates tables in an existing schema, but not the schema itself.
    new = tmp_path not in _STORE_NAMES
    schema = _store_name(tmp_path)
    if new:
        postgres_execute(f"CREATE SCHEMA {schema}")
    return SqlAlchemyDeploymentService(
        postgres_url("asyncpg"), schema=schema, heartbeat_interval=interval, heartbeat_ttl=ttl
    )


def _delete_sqlalchemy_postgres(tmp_path: Path, deployment_id: str) -> None:
    schema = _store_name(tmp_path)
    postgres_execute(f"DELETE FROM {schema}.pikku_deployment_functions WHERE deployment_id = $1", deployment_id)
    deleted = postgres_execute(f"DELETE FROM {schema}.pikku_deployments WHERE deployment_id = $1", deployment_id)
    assert deleted == "DELETE 1"


def _delete_sqlalchemy_postgres_function(tmp_path: Path, deployment_id: str, function: str) -> None:
    table = f"{_store_name(tmp_path)}.pikku_deployment_functions"
    deleted = postgres_execute(
        f"DELETE FROM {table} WHERE deployment_id = $1 AND function_name = $2", deployment_id, function
    )
    assert deleted == "DELETE 1"


def _make_mariadb(tmp_path: Path, interval: float, ttl: float) -> DeploymentService:
    new = tmp_path not in _STORE_NAMES
    database = _store_name(tmp_path)
    if new:
        create_mariadb_database(database)
    return SqlAlchemyDeploymentService(mariadb_url(database), heartbeat_interval=interval, heartbeat_ttl=ttl)


def _delete_mariadb(tmp_path: Path, deployment_id: str) -> None:
    database = _store_name(tmp_path)
    mariadb_execute(database, "DELETE FROM pikku_deployment_functions WHERE deployment_id = %s", deployment_id)
    assert mariadb_execute(database, "DELETE FROM pikku_deployments WHERE deployment_id = %s", deployment_id) == 1


def _delete_mariadb_function(tmp_path: Path, deployment_id: str, function: str) -> None:
    deleted = mariadb_execute(
        _store_name(tmp_path),
        "DELETE FROM pikku_deployment_functions WHERE deployment_id = %s AND function_name = %s",
        deployment_id,
        function,
    )
    assert deleted == 1


def _drop_mariadb(tmp_path: Path) -> None:
    if tmp_path in _STORE_NAMES:
        drop_mariadb_database(_STORE_NAMES.pop(tmp_path))


BACKENDS = [
    pytest.param(Backend("memory", _make_memory, _delete_memory), id="memory"),
    pytest.param(Backend("sqlite", _make_sqlite, _delete_sqlite, _delete_sqlite_function), id="sqlite"),
    pytest.param(Backend("redis", _make_redis, _delete_redis, _delete_redis_function, _drop_redis), id="redis"),
    pytest.param(
        Backend("postgres", _make_postgres, _delete_postgres, drop_store=_drop_postgres),
        id="postgres",
    ),
    pytest.param(
        Backend(
            "sqlalchemy-postgres",
            _make_sqlalchemy_postgres,
            _delete_sqlalchemy_postgres,
            _delete_sqlalchemy_postgres_function,
            drop_store=_drop_postgres,
        ),
        id="sqlalchemy-postgres",
    ),
    pytest.param(
        Backend("sqlalchemy-mariadb", _make_mariadb, _delete_mariadb, _delete_mariadb_function, _drop_mariadb),
        id="sqlalchemy-mariadb",
    ),
]


class Store:
    """Services of one backend on one shared store, all closed at teardown."""

    def __init__(self, backend: Backend, tmp_path: Path) -> None:
        self.backend = backend
        self.tmp_path = tmp_path
        self.services: list[DeploymentService] = []

    def service(self, interval: float = INTERVAL, ttl: float = TTL) -> DeploymentService:
        service = self.backend.make(self.tmp_path, interval, ttl)
        self.services.append(service)
        return service

    def delete_registration(self, deployment_id: str) -> None:
        self.backend.delete_registration(self.tmp_path, deployment_id)


# Backends that keep one row per function, where a single function row can go missing.
ROW_BACKENDS = [param for param in BACKENDS if param.values[0].delete_function_row is not None]


async def _open_store(backend: Backend, tmp_path: Path) -> AsyncIterator[Store]:
    shared = Store(backend, tmp_path)
    try:
        yield shared
        for service in shared.services:
            await service.close()
    finally:
        if backend.drop_store is not None:
            backend.drop_store(tmp_path)


@pytest.fixture(params=BACKENDS)
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async for shared in _open_store(request.param, tmp_path):
        yield shared


@pytest.fixture(params=ROW_BACKENDS)
async def row_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    async for shared in _open_store(request.param, tmp_path):
        yield shared


def _config(deployment_id: str, *functions: str, fallbacks: tuple[str, ...] = ()) -> DeploymentConfig:
    return DeploymentConfig(
        deployment_id=deployment_id,
        endpoint=f"http://127.0.0.1:1/{deployment_id}",
        functions=list(functions),
        fallback_endpoints=fallbacks,
    )


async def _simulate_crash(service: DeploymentService) -> None:
    """Stop the heartbeat loop without deregistering, as a killed process would."""
    assert service.heartbeating
    await service._stop_heartbeats()


async def _ids(service: DeploymentService, name: str) -> list[str]:
    return sorted(info.deployment_id for info in await service.find_function(name))


# -- registration and lookup --------------------------------------------------------------------------


async def test_register_then_find(store: Store) -> None:
    service = store.service()
    await service.start(_config("alpha", "greet", "sum", fallbacks=("http://127.0.0.1:2", "http://127.0.0.1:3")))

    expected = DeploymentInfo(
        deployment_id="alpha",
        endpoint="http://127.0.0.1:1/alpha",
        fallback_endpoints=("http://127.0.0.1:2", "http://127.0.0.1:3"),
    )
    assert await service.find_function("greet") == [expected]
    assert await service.find_function("sum") == [expected]
    assert service.deployment_id == "alpha"


async def test_find_without_fallbacks(store: Store) -> None:
    service = store.service()
    await service.start(_config("alpha", "greet"))

    [info] = await service.find_function("greet")
    assert info.fallback_endpoints == ()


async def test_only_listed_functions_found(store: Store) -> None:
    service = store.service()
    await service.start(_config("alpha", "greet"))

    assert await service.find_function("farewell") == []
    assert await service.find_function("gree") == []
    assert await service.find_function("") == []


async def test_two_instances_found(store: Store) -> None:
    first, second, observer = store.service(), store.service(), store.service()
    await first.start(_config("alpha", "greet", "only_alpha"))
    await second.start(_config("beta", "greet"))

    assert await _ids(observer, "greet") == ["alpha", "beta"]
    assert await _ids(observer, "only_alpha") == ["alpha"]


async def test_start_twice_rejected(store: Store) -> None:
    service = store.service()
    await service.start(_config("alpha", "greet"))

    with pytest.raises(ConfigurationError, match="already registered 'alpha'"):
        await service.start(_config("beta", "greet"))


async def test_start_without_functions_rejected(store: Store) -> None:
    service = store.service()

    with pytest.raises(ConfigurationError, match="functions is None"):
        await service.start(DeploymentConfig("alpha", "http://127.0.0.1:1"))


async def test_restart_replaces_row(store: Store) -> None:
    old, new, observer = store.service(), store.service(), store.service()
    await old.start(_config("alpha", "greet", "legacy"))
    await _simulate_crash(old)

    # The same id restarting on the same endpoint replaces the old row and its functions at once.
    await new.start(_config("alpha", "greet"))

    assert await observer.find_function("greet") == [DeploymentInfo("alpha", "http://127.0.0.1:1/alpha")]
    assert await observer.find_function("legacy") == []


async def test_live_id_conflict_rejected(store: Store) -> None:
    holder, intruder, observer = store.service(), store.service(), store.service()
    await holder.start(_config("alpha", "greet"))

    with pytest.raises(DeploymentConflictError, match=r"held by a live instance at http://127\.0\.0\.1:1/alpha"):
        await intruder.start(DeploymentConfig("alpha", "http://127.0.0.1:9", functions=["greet"]))

    assert await observer.find_function("greet") == [DeploymentInfo("alpha", "http://127.0.0.1:1/alpha")]


async def test_stale_id_taken_over(store: Store) -> None:
    old, new, observer = store.service(), store.service(), store.service()
    await old.start(_config("alpha", "greet"))
    await _simulate_crash(old)
    await asyncio.sleep(TTL * 1.5)

    await new.start(DeploymentConfig("alpha", "http://127.0.0.1:9", functions=["greet"]))
    await old.stop()

    # The crashed instance's late stop leaves the new holder's row alone.
    assert await observer.find_function("greet") == [DeploymentInfo("alpha", "http://127.0.0.1:9")]


async def test_heartbeat_fenced_by_new_holder(store: Store) -> None:
    old, new, observer = store.service(), store.service(), store.service()
    await old.start(_config("alpha", "greet"))
    await _simulate_crash(old)
    await asyncio.sleep(TTL * 1.5)
    await new.start(DeploymentConfig("alpha", "http://127.0.0.1:9", functions=["greet"]))

    # The old instance wakes up: its heartbeat neither revives its row nor takes the id back.
    assert not await old._heartbeat(_config("alpha", "greet"), ["greet"])
    with pytest.raises(DeploymentConflictError):
        await old._register(_config("alpha", "greet"), ["greet"])
    assert await observer.find_function("greet") == [DeploymentInfo("alpha", "http://127.0.0.1:9")]


async def test_each_row_keeps_its_ttl(store: Store) -> None:
    slow = store.service(interval=5.0, ttl=15.0)
    fast, observer = store.service(), store.service()
    await slow.start(_config("slow", "greet"))
    await fast.start(_config("fast", "greet"))

    # The fast instance purges on every heartbeat, with its own short TTL; the slow one's row survives.
    await asyncio.sleep(TTL * 3)

    assert await _ids(observer, "greet") == ["fast", "slow"]
    states = {record.deployment_id: record.state for record in await observer.list_deployments()}
    assert states == {"fast": "live", "slow": "live"}


async def test_hostname_registered(store: Store) -> None:
    service, named, observer = store.service(), store.service(), store.service()
    await service.start(_config("alpha", "greet"))
    await named.start(DeploymentConfig("beta", "http://127.0.0.1:1/beta", functions=["greet"], hostname="node-b"))

    hosts = {info.deployment_id: info.hostname for info in await observer.find_function("greet")}
    assert hosts == {"alpha": service.hostname, "beta": "node-b"}
    records = {record.deployment_id: record.hostname for record in await observer.list_deployments()}
    assert records == hosts


async def test_idempotent_functions_registered(store: Store) -> None:
    marked, plain, observer = store.service(), store.service(), store.service()
    config = DeploymentConfig(
        "alpha",
        "http://127.0.0.1:1/alpha",
        functions=["greet", "sum"],
        # A name that the instance does not register is dropped.
        idempotent_functions=["greet", "not-hosted"],
    )
    await marked.start(config)
    await plain.start(_config("beta", "greet", "sum"))

    greet = {info.deployment_id: info.idempotent for info in await observer.find_function("greet")}
    assert greet == {"alpha": True, "beta": False}
    sums = {info.deployment_id: info.idempotent for info in await observer.find_function("sum")}
    assert sums == {"alpha": False, "beta": False}
    records = {record.deployment_id: record.idempotent_functions for record in await observer.list_deployments()}
    assert records == {"alpha": ("greet",), "beta": ()}


async def test_heartbeat_reports_in_flight(store: Store) -> None:
    calls = [2]
    service, silent, observer = store.service(), store.service(), store.service()
    service.in_flight_source = lambda: calls[0]
    await service.start(_config("alpha", "greet"))
    await silent.start(_config("beta", "greet"))

    async def reported() -> dict[str, int | None]:
        return {info.deployment_id: info.in_flight for info in await observer.find_function("greet")}

    assert await reported() == {"alpha": 2, "beta": None}
    calls[0] = 7
    await wait_until(lambda: _reported_is(reported, {"alpha": 7, "beta": None}), timeout=10 * INTERVAL)
    [record] = [r for r in await observer.list_deployments() if r.deployment_id == "alpha"]
    assert record.in_flight == 7


Loads = dict[str, int | None]


async def _reported_is(reported: Callable[[], Awaitable[Loads]], expected: Loads) -> bool:
    return await reported() == expected


# -- heartbeats and liveness ----------------------------------------------------------------------------


async def test_heartbeat_keeps_instance_live(store: Store) -> None:
    service, observer = store.service(), store.service()
    await service.start(_config("alpha", "greet"))

    await asyncio.sleep(TTL * 2.5)

    assert await _ids(observer, "greet") == ["alpha"]
    [record] = await observer.list_deployments()
    assert record.state == "live"
    assert record.heartbeat_age < TTL


async def test_stale_instance_excluded(store: Store) -> None:
    crashed, observer = store.service(), store.service()
    started = time.monotonic()
    await crashed.start(_config("crashed", "greet"))
    await _simulate_crash(crashed)
    assert await _ids(observer, "greet") == ["crashed"]

    async def gone() -> bool:
        return await _ids(observer, "greet") == []

    await wait_until(gone, timeout=TTL * 4)

    # Every heartbeat came after `started`, so nothing may judge the row stale before a TTL after it.
    # The margin covers the store clock's millisecond resolution.
    assert time.monotonic() - started >= TTL - 0.01


async def test_stale_instance_purged(store: Store) -> None:
    crashed, survivor, observer = store.service(), store.service(), store.service()
    await crashed.start(_config("crashed", "greet"))
    await survivor.start(_config("survivor", "greet"))
    await _simulate_crash(crashed)

    async def purged() -> bool:
        return [r.deployment_id for r in await observer.list_deployments()] == ["survivor"]

    # The survivor's heartbeat deletes the row within one interval after the TTL passes.
    await wait_until(purged, timeout=TTL + INTERVAL * 5)
    assert await _ids(observer, "greet") == ["survivor"]


async def test_stale_row_kept_without_heartbeats(store: Store) -> None:
    crashed, observer = store.service(), store.service()
    await crashed.start(_config("crashed", "greet"))
    await _simulate_crash(crashed)

    await asyncio.sleep(TTL * 1.5)

    # Only a heartbeat purges: an observer that never started lists the row as stale.
    [record] = await observer.list_deployments()
    assert record.deployment_id == "crashed"
    assert record.state == "stale"


async def test_stop_removes(store: Store) -> None:
    service, observer = store.service(), store.service()
    await service.start(_config("alpha", "greet"))

    await service.stop()

    assert await observer.find_function("greet") == []
    assert await observer.list_deployments() == []
    assert service.deployment_id is None


async def test_stop_when_not_started(store: Store) -> None:
    service = store.service()
    await service.init()

    await service.stop()
    await service.stop()

    assert await service.list_deployments() == []


async def test_lost_registration_restored(store: Store) -> None:
    service, observer = store.service(), store.service()
    await service.start(_config("alpha", "greet", "sum"))

    store.delete_registration("alpha")
    assert await observer.find_function("greet") == []

    async def restored() -> bool:
        return await _ids(observer, "greet") == ["alpha"] and await _ids(observer, "sum") == ["alpha"]

    # Two intervals, because the heartbeat that notices the loss may have been mid-sleep for one.
    await wait_until(restored, timeout=INTERVAL * 2 + 0.6)


async def test_lost_function_row_restored(row_store: Store) -> None:
    store = row_store
    service, observer = store.service(), store.service()
    await service.start(_config("alpha", "greet", "sum"))

    assert store.backend.delete_function_row is not None
    store.backend.delete_function_row(store.tmp_path, "alpha", "sum")
    assert await observer.find_function("sum") == []

    async def restored() -> bool:
        return await _ids(observer, "sum") == ["alpha"]

    await wait_until(restored, timeout=INTERVAL * 2 + 0.6)
    assert await _ids(observer, "greet") == ["alpha"]


# -- configuration and schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(("interval", "ttl"), [(1.0, 1.0), (1.0, 0.5), (0.0, 1.0), (-1.0, 1.0)])
def test_bad_heartbeat_settings_rejected(store: Store, interval: float, ttl: float) -> None:
    with pytest.raises(ConfigurationError, match="heartbeat_"):
        store.service(interval=interval, ttl=ttl)


def test_ttl_error_is_value_error(store: Store) -> None:
    with pytest.raises(ValueError, match=r"heartbeat_ttl \(2.0 s\) must be greater than heartbeat_interval"):
        store.service(interval=2.0, ttl=2.0)


async def test_init_idempotent(store: Store) -> None:
    first, second = store.service(), store.service()

    await first.init()
    await first.init()
    await second.init()
    await asyncio.gather(*(store.service().init() for _ in range(4)))
    await first.start(_config("alpha", "greet"))

    assert await _ids(second, "greet") == ["alpha"]


async def test_list_deployments_states(store: Store) -> None:
    service, observer = store.service(), store.service()
    await service.start(_config("alpha", "sum", "greet", fallbacks=("http://127.0.0.1:2",)))

    [live] = await observer.list_deployments()
    assert live.deployment_id == "alpha"
    assert live.endpoint == "http://127.0.0.1:1/alpha"
    assert live.functions == ("greet", "sum")
    assert live.fallback_endpoints == ("http://127.0.0.1:2",)
    assert live.state == "live"
    assert 0 <= live.heartbeat_age < TTL

    await _simulate_crash(service)
    await asyncio.sleep(TTL + 0.2)

    [stale] = await observer.list_deployments()
    assert stale.state == "stale"
    assert stale.heartbeat_age >= TTL


async def test_list_deployments_sorted(store: Store) -> None:
    services = [store.service() for _ in range(3)]
    for service, deployment_id in zip(services, ["gamma", "alpha", "beta"], strict=True):
        await service.start(_config(deployment_id, "greet"))

    records = await store.service().list_deployments()

    assert [r.deployment_id for r in records] == ["alpha", "beta", "gamma"]


# -- discovery URLs -----------------------------------------------------------------------------------


async def test_url_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "pikku.db"

    async with deployment_service_from_url(f"sqlite:///{path}") as service:
        assert isinstance(service, SqliteDeploymentService)
        assert service.path == path
        await service.start(_config("alpha", "greet"))
        assert await _ids(service, "greet") == ["alpha"]

    assert path.exists()


def test_url_sqlite_relative(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    service = deployment_service_from_url("sqlite:///data/pikku.db")

    assert isinstance(service, SqliteDeploymentService)
    assert service.path == Path("data/pikku.db")


def test_url_options_passed() -> None:
    service = deployment_service_from_url("memory://", heartbeat_interval=1.5, heartbeat_ttl=4.0)

    assert service.heartbeat_interval == 1.5
    assert service.heartbeat_ttl == 4.0


async def test_url_memory_private() -> None:
    first = deployment_service_from_url("memory://")
    second = deployment_service_from_url("memory://")
    assert isinstance(first, MemoryDeploymentService)
    assert isinstance(second, MemoryDeploymentService)

    async with first, second:
        await first.start(_config("alpha", "greet"))
        assert await _ids(second, "greet") == []
        assert first.registry is not second.registry


async def test_url_memory_named_shared() -> None:
    first = deployment_service_from_url("memory://contract-shared")
    second = deployment_service_from_url("memory://contract-shared")
    other = deployment_service_from_url("memory://contract-other")

    async with first, second, other:
        await first.start(_config("alpha", "greet"))
        assert await _ids(second, "greet") == ["alpha"]
        assert await _ids(other, "greet") == []


def test_url_sqlalchemy_async() -> None:
    service = deployment_service_from_url("sqlite+aiosqlite:///:memory:")

    assert type(service) is SqlAlchemyDeploymentService


@pytest.mark.parametrize("url", ["ftp://example.invalid/registry", "mysql://db/pikku", "nonsense", ""])
def test_url_unsupported(url: str) -> None:
    with pytest.raises(ConfigurationError, match="unsupported discovery URL") as caught:
        deployment_service_from_url(url)

    message = str(caught.value)
    assert "sqlite:///" in message
    assert "memory://" in message
    assert "SQLAlchemy" in message


def test_url_sqlite_without_path() -> None:
    with pytest.raises(ConfigurationError, match="names no file"):
        deployment_service_from_url("sqlite://")


def test_url_password_redacted() -> None:
    with pytest.raises(ConfigurationError) as caught:
        deployment_service_from_url("ftp://user:hunter2@example.invalid/x")

    assert "hunter2" not in str(caught.value)


def test_memory_registry_default_private() -> None:
    assert MemoryDeploymentService().registry is not MemoryDeploymentService().registry
    assert isinstance(MemoryDeploymentService().registry, MemoryRegistry)


# -- several processes on one SQLite file -----------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pikku_mq import DeploymentConfig, SqliteDeploymentService

    async def main():
        path, deployment_id = sys.argv[1], sys.argv[2]
        service = SqliteDeploymentService(path, heartbeat_interval=0.05, heartbeat_ttl=30)
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        config = DeploymentConfig(deployment_id, "http://127.0.0.1:1/" + deployment_id,
                                  functions=["shared", deployment_id])
        await service.start(config)
        print("registered", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        await service.close()
        print("closed", flush=True)

    asyncio.run(main())
    """
)

PROCESSES = 6


async def _expect_line(process: asyncio.subprocess.Process, expected: str) -> None:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
    if not line:
        assert process.stderr is not None
        stderr = await asyncio.wait_for(process.stderr.read(), timeout=5)
        pytest.fail(f"child exited before printing {expected!r}:\n{stderr.decode()[-3000:]}")
    assert line.decode().strip() == expected


async def test_sqlite_many_processes(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    ids = [f"proc-{i}" for i in range(PROCESSES)]
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            str(path),
            deployment_id,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for deployment_id in ids
    ]
    try:
        await asyncio.gather(*(_expect_line(p, "ready") for p in processes))

        # Release every process at once: all create the schema and register on a fresh file together.
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
        await asyncio.gather(*(_expect_line(p, "registered") for p in processes))

        # Let them heartbeat (and purge) concurrently for a while, each every 50 ms.
        await asyncio.sleep(0.5)
        async with SqliteDeploymentService(path) as observer:
            assert await _ids(observer, "shared") == ids
            assert await _ids(observer, "proc-3") == ["proc-3"]

            for process in processes:
                assert process.stdin is not None
                process.stdin.write(b"stop\n")
            await asyncio.gather(*(_expect_line(p, "closed") for p in processes))
            outputs = await asyncio.gather(*(asyncio.wait_for(p.communicate(), timeout=20) for p in processes))

            for process, (_, stderr) in zip(processes, outputs, strict=True):
                assert "database is locked" not in stderr.decode()
                assert stderr.decode() == ""
                assert process.returncode == 0
            assert await observer.list_deployments() == []
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
                await process.wait()


def _remove_files(folder: Path, pattern: str) -> None:
    for leftover in folder.glob(pattern):
        leftover.unlink()


async def test_sqlite_deleted_file_recovered(tmp_path: Path) -> None:
    path = tmp_path / "wiped.db"
    service = SqliteDeploymentService(path, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    observer = SqliteDeploymentService(path, heartbeat_interval=INTERVAL, heartbeat_ttl=TTL)
    try:
        await service.start(_config("alpha", "greet"))
        _remove_files(tmp_path, "wiped.db*")

        # The first heartbeat after the wipe fails on the missing tables; the next one rebuilds both.
        async def registered() -> bool:
            try:
                return await _ids(observer, "greet") == ["alpha"]
            except DiscoveryError:
                return False

        await wait_until(registered, timeout=INTERVAL * 10)
    finally:
        await service.close()
        await observer.close()


async def test_broken_store_is_discovery_error(tmp_path: Path) -> None:
    # A directory where the database file should be: every query fails.
    (tmp_path / "broken.db").mkdir()
    caller = SqliteDeploymentService(tmp_path / "broken.db")
    try:
        with pytest.raises(DiscoveryError, match=r"broken\.db") as raised:
            await caller.invoke("greet", timeout=5)
        assert raised.value.status == 503
    finally:
        await caller.close()
