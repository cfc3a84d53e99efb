"""Discovery in PostgreSQL through asyncpg, in the layout of Pikku's ``@pikku/pg`` deployment service.

One row per instance, so a Pikku TypeScript instance and a pikku_mq instance can share the table::

    <schema>.pikku_deployments(deployment_id text PRIMARY KEY, endpoint text NOT NULL,
                               functions text[] NOT NULL, last_heartbeat timestamptz NOT NULL,
                               created_at timestamptz NOT NULL,
                               fallback_endpoints text[] NULL,         -- pikku_mq's own
                               heartbeat_ttl double precision NULL,    -- pikku_mq's own, seconds
                               in_flight integer NULL,                 -- pikku_mq's own
                               hostname text NULL,                     -- pikku_mq's own
                               idempotent_functions text[] NULL)       -- pikku_mq's own

with a GIN index on ``functions`` and a B-tree index on ``last_heartbeat``, named as @pikku/pg 0.12.1
names them. Liveness is judged with the database's clock (``now()``) and each row's own TTL. A row
without one, as Pikku writes it, is judged with the reader's TTL. Because the functions live in the
instance's row, a heartbeat is one UPDATE whatever their number. It also writes the instance's calls in
flight, which least-loaded callers read. ``init()`` adds pikku_mq's columns to a table that Pikku or an
older pikku_mq created.

Joins, draining and leaves (including the stale rows a heartbeat purges) are announced with
``pg_notify`` on the channel ``pikku_mq_<schema>``, and callers ``LISTEN`` on a connection of their own.
Pikku's instances send no notifications, so callers learn of them through lookups only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from types import ModuleType
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .._errors import ConfigurationError, DeploymentConflictError
from .._presence import MAX_CHANGE_PAYLOAD, ChangeEvent, ChangeKind, decode_change, encode_change
from .._types import DeploymentConfig, DeploymentInfo, DeploymentRecord
from .base import DeploymentService, conflict_error

__all__ = ["DEFAULT_SCHEMA", "PgDeploymentService"]

logger = logging.getLogger(__name__)

DEFAULT_SCHEMA = "pikku"

# Lower case only: Pikku writes the schema name unquoted, so PostgreSQL folds it to lower case, and
# quoting a mixed-case name here would name another schema.
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_COLUMNS_ADDED = {
    "fallback_endpoints": "text[]",
    "heartbeat_ttl": "double precision",
    "in_flight": "integer",
    "hostname": "text",
    "idempotent_functions": "text[]",
}
_FUNCTIONS_INDEX = "idx_pikku_deployments_functions"
_HEARTBEAT_INDEX = "idx_pikku_deployments_heartbeat"

# Schema creation can still race with a Pikku instance, which does not take the advisory lock.
_SCHEMA_ATTEMPTS = 3

# A few connections suffice: a caller caches lookups, and a heartbeat is one statement. No floor
# (min_size 0): from asyncpg 0.32 on, a pool with a floor reconnects in a task of its own while the
# server is down and logs a WARNING with a traceback at each attempt, beside the heartbeat's one.
# asyncpg sets no statement timeout and no TCP keepalive, so without command_timeout (seconds) a
# heartbeat on a half-open connection would wait forever.
# asyncpg waits 60 s for a connection by default; timeout (seconds) bounds connecting too.
_DEFAULT_POOL_OPTIONS: dict[str, Any] = {"min_size": 0, "max_size": 4, "command_timeout": 10.0, "timeout": 10.0}

# create_pool's own options, which asyncpg.connect does not take.
_POOL_ONLY_OPTIONS = frozenset(
    {"min_size", "max_size", "max_queries", "max_inactive_connection_lifetime", "setup", "init", "reset", "loop"}
)

_FEED_CLOSE_TIMEOUT = 2.0
"""Seconds to wait for UNLISTEN before giving up on a change feed connection."""

_POOL_CLOSE_TIMEOUT = 10.0
"""Seconds ``close`` waits for the pool's connections to be released and closed before terminating them.

It equals the default ``command_timeout``, so a query still running can finish first.
"""


def _import_asyncpg() -> ModuleType:
    try:
        import asyncpg
    except ImportError as exc:
        raise ImportError(
            "PgDeploymentService needs asyncpg, which is not installed; install it with "
            "pip install 'pikku-mq[postgres]'"
        ) from exc
    module: ModuleType = asyncpg
    return module


def _asyncpg_version(asyncpg: ModuleType) -> tuple[int, ...]:
    numbers = re.findall(r"\d+", str(getattr(asyncpg, "__version__", "0")))
    return tuple(int(n) for n in numbers[:2])


async def _skip_reset(connection: Any) -> None:
    """Release a connection to the pool without asyncpg's reset query.

    asyncpg's default reset costs a round trip on every release. This service leaves no session state
    behind: its transactions are managed, its advisory locks are transaction-level, and it sets no
    settings and no LISTEN.
    """
    del connection


def _redact_dsn(dsn: str) -> str:
    """Return ``dsn`` with the password replaced by ``***``, whether in the user info or the query."""
    parts = urlsplit(dsn)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key == "password" for key, _ in pairs):
            query = urlencode([(key, "***" if key == "password" else value) for key, value in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class _Statements:
    """The SQL of one schema. asyncpg prepares each statement once per connection and caches it."""

    # The schema name is checked against _SCHEMA_NAME before it reaches this class, so formatting it
    # into the SQL cannot inject anything. Values are always bind parameters.
    def __init__(self, schema: str) -> None:
        table = f"{schema}.pikku_deployments"
        self.table = table
        # A channel name is an identifier of at most 63 bytes.
        self.channel = f"pikku_mq_{schema}"[:63]
        # The limit applies to the encoded event, which escapes quotes and control characters: a short id
        # can still make a payload over PostgreSQL's 8000 bytes, and pg_notify would fail the DELETE.
        leave_event = "json_build_object('event', 'leave', 'deployment_id', deployment_id)::text AS event"
        leave_payload = f"""
            CASE WHEN octet_length(event) <= {MAX_CHANGE_PAYLOAD} THEN event ELSE '{{"event":"resync"}}' END
            """
        is_live = "last_heartbeat >= now() - make_interval(secs => coalesce(heartbeat_ttl, {ttl}))"

        # The upsert replaces a row only if it is this endpoint's or stale, so two live instances with
        # the same id never take turns on it, even when both insert at the same moment.
        self.register = f"""
            INSERT INTO {table} AS d
                (deployment_id, endpoint, functions, fallback_endpoints, heartbeat_ttl, in_flight, hostname,
                 idempotent_functions, last_heartbeat, created_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now(), now())
            ON CONFLICT (deployment_id) DO UPDATE
            SET endpoint = EXCLUDED.endpoint,
                functions = EXCLUDED.functions,
                fallback_endpoints = EXCLUDED.fallback_endpoints,
                heartbeat_ttl = EXCLUDED.heartbeat_ttl,
                in_flight = EXCLUDED.in_flight,
                hostname = EXCLUDED.hostname,
                idempotent_functions = EXCLUDED.idempotent_functions,
                last_heartbeat = now(),
                created_at = now()
            WHERE d.endpoint = EXCLUDED.endpoint
               OR d.last_heartbeat < now() - make_interval(secs => coalesce(d.heartbeat_ttl, $5))
            RETURNING true
            """  # noqa: S608
        self.holder = f"""
            SELECT endpoint, extract(epoch FROM now() - last_heartbeat)::float8, heartbeat_ttl
            FROM {table} WHERE deployment_id = $1
            """  # noqa: S608
        # The containment check re-registers a row whose functions someone rewrote without ours.
        self.heartbeat = f"""
            UPDATE {table} SET last_heartbeat = now(), in_flight = $4
            WHERE deployment_id = $1 AND endpoint = $2 AND functions @> $3::text[]
            RETURNING true
            """  # noqa: S608
        # Deleting and announcing in one statement: the notification goes out when the delete commits.
        self.deregister = f"""
            WITH gone AS (DELETE FROM {table} WHERE deployment_id = $1 AND endpoint = $2 RETURNING {leave_event})
            SELECT count(pg_notify($3, {leave_payload})) FROM gone
            """  # noqa: S608
        self.purge = f"""
            WITH gone AS (DELETE FROM {table} WHERE NOT ({is_live.format(ttl="$1")}) RETURNING {leave_event})
            SELECT count(pg_notify($2, {leave_payload})) FROM gone
            """  # noqa: S608
        self.notify = "SELECT pg_notify($1, $2)"
        # "functions @> ARRAY[name]" rather than "name = ANY(functions)": only the former can use the GIN index.
        self.find = f"""
            SELECT deployment_id, endpoint, fallback_endpoints, in_flight, hostname,
                   coalesce(idempotent_functions @> ARRAY[$1::text], false)
            FROM {table}
            WHERE functions @> ARRAY[$1::text] AND {is_live.format(ttl="$2")}
            """  # noqa: S608
        # COLLATE "C" sorts by code point, as Python sorts strings.
        self.list = f"""
            SELECT deployment_id, endpoint, functions, fallback_endpoints,
                   extract(epoch FROM now() - last_heartbeat)::float8, heartbeat_ttl, in_flight, hostname,
                   idempotent_functions
            FROM {table} ORDER BY deployment_id COLLATE "C"
            """  # noqa: S608


class PgDeploymentService(DeploymentService):
    """Discovery in PostgreSQL through an asyncpg pool.

    ``pool`` is an :class:`asyncpg.Pool` (the caller keeps ownership) or a DSN such as
    ``postgresql://user@host/db`` (the service creates the pool on first use and closes it in
    ``close``). ``pool_options`` go to :func:`asyncpg.create_pool` when the service creates the pool,
    for example ``{"max_size": 8}`` or ``{"statement_cache_size": 0}`` behind a transaction-mode
    PgBouncer. ``schema`` names the PostgreSQL schema that holds the table (``pikku`` by default, as in
    Pikku).

    The change feed listens on a connection of its own: a new one for a DSN (with ``pool_options``
    that ``asyncpg.connect`` takes), or one borrowed from the caller's pool while the service is open.
    LISTEN does not work through a transaction-mode PgBouncer; pass ``change_feed=False`` there.
    """

    has_change_feed = True

    def __init__(
        self,
        pool: Any,
        *,
        schema: str = DEFAULT_SCHEMA,
        pool_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self._asyncpg = _import_asyncpg()
        if not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(
                f"invalid PostgreSQL schema name {schema!r}; use 1 to 63 lower-case letters, digits and "
                "underscores, not starting with a digit"
            )
        self.schema = schema
        self._sql = _Statements(schema)

        if isinstance(pool, str):
            self._dsn: str | None = pool
            self._pool: Any = None
            self._owns_pool = True
        else:
            self._dsn = None
            self._pool = pool
            self._owns_pool = False
        self._pool_options = {**_DEFAULT_POOL_OPTIONS, **(pool_options or {})}
        self._pool_lock = asyncio.Lock()

    def __repr__(self) -> str:
        where = _redact_dsn(self._dsn) if self._dsn is not None else "<asyncpg pool>"
        return f"{type(self).__name__}({where!r}, schema={self.schema!r})"

    def _heartbeat_twin(self) -> PgDeploymentService | None:
        dsn = self._dsn or self.heartbeat_url
        if dsn is None:
            return None
        return type(self)(dsn, schema=self.schema, pool_options=self._pool_options, **self._twin_options())

    @property
    def pool(self) -> Any:
        """The asyncpg pool, or None while a service built from a DSN has not connected yet."""
        return self._pool

    async def _connect(self) -> Any:
        """Return the pool, creating it from the DSN on first use."""
        if self._pool is not None:
            return self._pool
        async with self._pool_lock:
            if self._pool is None:
                options = dict(self._pool_options)
                # create_pool(reset=...) exists from asyncpg 0.30 on; older releases always run the reset query.
                if _asyncpg_version(self._asyncpg) >= (0, 30):
                    options.setdefault("reset", _skip_reset)
                self._pool = await self._asyncpg.create_pool(self._dsn, **options)
        return self._pool

    # -- schema ------------------------------------------------------------------------------------

    async def _create_schema(self) -> None:
        asyncpg = self._asyncpg
        retryable = (asyncpg.UniqueViolationError, asyncpg.DuplicateObjectError, asyncpg.DuplicateTableError)
        for attempt in range(1, _SCHEMA_ATTEMPTS + 1):
            try:
                await self._create_schema_once()
            except retryable:
                if attempt == _SCHEMA_ATTEMPTS:
                    raise
            else:
                return

    async def _create_schema_once(self) -> None:
        pool = await self._connect()
        async with pool.acquire() as conn, conn.transaction():
            # Serialize the instances of this schema that start at once: concurrent CREATE ... IF NOT EXISTS
            # statements can still fail on a unique index of the system catalogs.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"pikku_mq:{self.schema}")
            state = await conn.fetchrow(
                """
                SELECT to_regnamespace($1) IS NOT NULL,
                       to_regclass($2) IS NOT NULL,
                       ARRAY(SELECT attname::text FROM pg_attribute
                             WHERE attrelid = to_regclass($2) AND attnum > 0 AND NOT attisdropped),
                       to_regclass($3) IS NOT NULL,
                       to_regclass($4) IS NOT NULL
                """,
                self.schema,
                self._sql.table,
                f"{self.schema}.{_FUNCTIONS_INDEX}",
                f"{self.schema}.{_HEARTBEAT_INDEX}",
            )
            has_schema, has_table, columns, has_functions_index, has_heartbeat_index = state

            # Each statement runs only when its object is missing, so a role without the CREATE privilege
            # can use a schema that someone else created.
            if not has_schema:
                await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            if not has_table:
                await conn.execute(
                    f"""
                    CREATE TABLE IF NOT EXISTS {self._sql.table} (
                        deployment_id TEXT PRIMARY KEY,
                        endpoint TEXT NOT NULL,
                        functions TEXT[] NOT NULL,
                        last_heartbeat TIMESTAMPTZ NOT NULL DEFAULT now(),
                        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                        fallback_endpoints TEXT[],
                        heartbeat_ttl DOUBLE PRECISION,
                        in_flight INTEGER,
                        hostname TEXT,
                        idempotent_functions TEXT[]
                    )
                    """
                )
            else:
                # A table that Pikku or an older pikku_mq created lacks some of pikku_mq's nullable columns.
                for column, column_type in _COLUMNS_ADDED.items():
                    if column not in columns:
                        await conn.execute(
                            f"ALTER TABLE {self._sql.table} ADD COLUMN IF NOT EXISTS {column} {column_type}"
                        )
            if not has_functions_index:
                await conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {_FUNCTIONS_INDEX} ON {self._sql.table} USING GIN (functions)"
                )
            if not has_heartbeat_index:
                await conn.execute(
                    f"CREATE INDEX IF NOT EXISTS {_HEARTBEAT_INDEX} ON {self._sql.table} (last_heartbeat)"
                )

    # -- registration ------------------------------------------------------------------------------

    async def _register(self, config: DeploymentConfig, functions: list[str]) -> None:
        pool = await self._connect()
        fallbacks = list(config.fallback_endpoints) or None
        sql = self._sql
        if await pool.fetchval(
            sql.register,
            config.deployment_id,
            config.endpoint,
            functions,
            fallbacks,
            self.heartbeat_ttl,
            self._in_flight(),
            config.hostname,
            list(config.idempotent_functions) or None,
        ):
            await self._announce_quietly("join", config.deployment_id)
            return

        holder = await pool.fetchrow(sql.holder, config.deployment_id)
        if holder is None:
            # The holder deregistered between the two statements.
            raise DeploymentConflictError(
                f"deployment id '{config.deployment_id}' was held by another instance while this one "
                "registered; give each instance its own id"
            )
        endpoint, age, ttl = holder
        raise conflict_error(config.deployment_id, endpoint, age, ttl if ttl is not None else self.heartbeat_ttl)

    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        pool = await self._connect()
        heartbeat = self._sql.heartbeat
        return bool(await pool.fetchval(heartbeat, config.deployment_id, config.endpoint, functions, self._in_flight()))

    async def _deregister(self, config: DeploymentConfig) -> None:
        pool = await self._connect()
        await pool.fetchval(self._sql.deregister, config.deployment_id, config.endpoint, self._sql.channel)

    async def _purge_stale(self) -> int:
        pool = await self._connect()
        return int(await pool.fetchval(self._sql.purge, self.heartbeat_ttl, self._sql.channel))

    # -- change feed -------------------------------------------------------------------------------

    async def _announce(self, kind: ChangeKind, deployment_id: str) -> None:
        pool = await self._connect()
        await pool.execute(self._sql.notify, self._sql.channel, encode_change(kind, deployment_id))

    async def _watch_changes(self, deliver: Callable[[ChangeEvent | None], None], check_interval: float) -> None:
        # LISTEN needs a connection of its own: a pooled connection's release would UNLISTEN, and
        # notifications sent while no connection listens are lost (hence deliver(None) on each start).
        conn, release = await self._feed_connection()
        events: asyncio.Queue[str | None] = asyncio.Queue()

        def on_notification(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            events.put_nowait(payload)

        def on_termination(_conn: Any) -> None:
            events.put_nowait(None)

        try:
            conn.add_termination_listener(on_termination)
            await conn.add_listener(self._sql.channel, on_notification)
            deliver(None)
            while True:
                # asyncio.timeout, not wait_for: Python 3.11's wait_for (fixed in 3.12) drops a
                # cancellation that arrives in the same loop iteration as its result. With wait_for, a
                # notification that arrives as close() cancels the feed would keep the feed running
                # and close() waiting for it forever.
                try:
                    async with asyncio.timeout(check_interval):
                        payload = await events.get()
                except TimeoutError:
                    # A half-open connection stays silent, so a quiet feed is checked with a round trip.
                    await conn.fetchval("SELECT 1", timeout=check_interval)
                    continue
                if payload is None:
                    raise ConnectionError(f"the connection listening on {self._sql.channel} closed")
                event = decode_change(payload)
                if event is not None:
                    deliver(event)
        finally:
            await release(conn, on_notification)

    async def _feed_connection(self) -> tuple[Any, Callable[[Any, Any], Any]]:
        """Return a connection for LISTEN and the coroutine function that gives it back."""
        if self._dsn is not None:
            options = {k: v for k, v in self._pool_options.items() if k not in _POOL_ONLY_OPTIONS}
            conn = await self._asyncpg.connect(self._dsn, **options)

            async def close(conn: Any, _listener: Any) -> None:
                conn.terminate()  # nothing to wait for: the server ends LISTEN with the session

            return conn, close

        # A pool that the caller passed in: borrow one of its connections for as long as the feed runs.
        pool = await self._connect()
        conn = await pool.acquire(timeout=_FEED_CLOSE_TIMEOUT * 5)

        async def give_back(conn: Any, listener: Any) -> None:
            if not conn.is_closed():
                try:
                    async with asyncio.timeout(_FEED_CLOSE_TIMEOUT):
                        await conn.remove_listener(self._sql.channel, listener)
                except Exception:  # a connection that cannot UNLISTEN is closed instead
                    conn.terminate()
            with contextlib.suppress(Exception):
                await pool.release(conn)

        return conn, give_back

    # -- lookups -----------------------------------------------------------------------------------

    async def find_function(self, name: str) -> list[DeploymentInfo]:
        pool = await self._connect()
        rows = await pool.fetch(self._sql.find, name, self.heartbeat_ttl)
        return [DeploymentInfo(row[0], row[1], _endpoints(row[2]), row[3], row[4], row[5]) for row in rows]

    async def list_deployments(self) -> list[DeploymentRecord]:
        pool = await self._connect()
        rows = await pool.fetch(self._sql.list)
        records = []
        for deployment_id, endpoint, functions, fallbacks, age, ttl, in_flight, hostname, idempotent in rows:
            live = age <= (ttl if ttl is not None else self.heartbeat_ttl)
            records.append(
                DeploymentRecord(
                    deployment_id=deployment_id,
                    endpoint=endpoint,
                    functions=tuple(sorted(functions or ())),
                    heartbeat_age=float(age),
                    state="live" if live else "stale",
                    fallback_endpoints=_endpoints(fallbacks),
                    in_flight=in_flight,
                    hostname=hostname,
                    idempotent_functions=tuple(sorted(idempotent or ())),
                )
            )
        return records

    async def _close_store(self) -> None:
        if self._owns_pool and self._pool is not None:
            pool, self._pool = self._pool, None
            # Pool.close() waits for every acquired connection to be released, so asyncpg's documentation
            # advises a timeout.
            try:
                async with asyncio.timeout(_POOL_CLOSE_TIMEOUT):
                    await pool.close()
            except TimeoutError:
                logger.warning(
                    "closing the connection pool of %r timed out after %g s, so its connections were terminated. "
                    "A connection acquired from service.pool and not released, or a query still running, can "
                    "cause this.",
                    self,
                    _POOL_CLOSE_TIMEOUT,
                )
                pool.terminate()


def _endpoints(value: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(value) if value else ()
