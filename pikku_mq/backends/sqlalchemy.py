"""Discovery in a relational database through SQLAlchemy Core with an async engine.

The layout is that of Pikku's Kysely deployment service, so both can share one registry::

    pikku_deployments(deployment_id PK, endpoint, last_heartbeat, created_at,
                      fallback_endpoints NULL, heartbeat_ttl NULL,  -- pikku_mq's own columns from here
                      in_flight NULL, hostname NULL, idempotent_functions NULL)
    pikku_deployment_functions(deployment_id FK ON DELETE CASCADE, function_name)

Liveness is judged with the database's clock, so instances whose clocks disagree still agree on who
is alive, and with each row's own TTL, so instances with different heartbeat settings can share the
store; a row without one (written by Pikku) is judged with the reader's TTL. On MySQL and MariaDB the
clock is UTC_TIMESTAMP(), whatever the session's time zone. A heartbeat is one
UPDATE whatever the number of functions: it also checks that all of the instance's function rows are
still there, so a registration the store lost is written again, and it writes the instance's calls in
flight. ``init()`` adds pikku_mq's nullable columns to a table that Pikku or an older pikku_mq created.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import mysql
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.ext.compiler import compiles

from .._errors import ConfigurationError, DeploymentConflictError, DiscoveryError
from .._types import DeploymentConfig, DeploymentInfo, DeploymentRecord
from . import _redact
from .base import DeploymentService, conflict_error, decode_string_list

__all__ = ["SqlAlchemyDeploymentService"]

logger = logging.getLogger(__name__)


# MySQL's DATETIME drops fractions of a second unless it is declared with a precision.
_TIMESTAMP = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")

_NAME_LENGTH = 255
"""Maximum length, in characters, of a deployment id or function name: the columns' VARCHAR length."""


class _Name(sa.String):
    """A deployment id or function name column, compared byte for byte on every database.

    MySQL and MariaDB compare strings with the database's default collation, which is often
    case-insensitive (``utf8mb4_general_ci``) and ignores trailing spaces, so a lookup of ``Greet``
    would find ``greet``. PostgreSQL and SQLite compare VARCHARs byte for byte.
    """

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(_NAME_LENGTH)


@compiles(_Name, "mysql", "mariadb")
def _compile_name_for_mysql(type_: _Name, compiler: sa.sql.compiler.TypeCompiler, **kw: Any) -> str:
    # NOTE: tables created before this column type keep their collation until converted with
    # ALTER TABLE ... MODIFY ... COLLATE. The MySQL collations below are untested (only MariaDB 10.11
    # was), and MySQL before 8.0 has no binary collation that keeps trailing spaces.
    dialect = compiler.dialect
    if getattr(dialect, "is_mariadb", False):
        collation = "utf8mb4_nopad_bin"
    elif (dialect.server_version_info or (0,)) >= (8, 0):
        collation = "utf8mb4_0900_bin"
    else:
        collation = "utf8mb4_bin"
    return f"VARCHAR({type_.length}) CHARACTER SET utf8mb4 COLLATE {collation}"


_READ_ONLY = {"pikku_read_only": True}
"""Execution option of lookups; the SQLite backend starts their transactions without a write lock."""

_SCHEMA_LOCK_TIMEOUT = 30
"""Seconds ``init()`` waits for another process that is creating the same tables."""

_SCHEMA_ATTEMPTS = 3
"""Maximum attempts at creating the tables. A peer that takes no lock, such as Pikku's Kysely service,
can create a table between the check and the CREATE TABLE, and the next attempt finds that table."""

_REGISTER_ATTEMPTS = 3
"""Maximum attempts at registering when another session inserts the same id at the same moment and
its row then turns out to be gone, stale or at this instance's endpoint."""

_CONCURRENT_DDL_ERRORS: frozenset[str | int] = frozenset(
    {
        # PostgreSQL SQLSTATEs: unique_violation (on a system catalog), duplicate_object, duplicate_table,
        # deadlock_detected.
        "23505",
        "42710",
        "42P07",
        "40P01",
        # MySQL and MariaDB error numbers: table exists, duplicate key name, deadlock, duplicate foreign key.
        1050,
        1061,
        1213,
        1826,
    }
)
"""Errors that a CREATE statement raises when another session creates the same object at the same time."""


def _tables(schema: str | None) -> tuple[sa.MetaData, sa.Table, sa.Table]:
    metadata = sa.MetaData(schema=schema)
    deployments = sa.Table(
        "pikku_deployments",
        metadata,
        sa.Column("deployment_id", _Name(), primary_key=True),
        sa.Column("endpoint", sa.Text, nullable=False),
        sa.Column("last_heartbeat", _TIMESTAMP, nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("fallback_endpoints", sa.Text, nullable=True),
        sa.Column("heartbeat_ttl", sa.Float, nullable=True),
        sa.Column("in_flight", sa.Integer, nullable=True),
        sa.Column("hostname", sa.Text, nullable=True),
        sa.Column("idempotent_functions", sa.Text, nullable=True),  # a JSON array of names
        sa.Index("pikku_deployments_last_heartbeat_idx", "last_heartbeat"),
    )
    qualified = f"{schema}.pikku_deployments" if schema else "pikku_deployments"
    functions = sa.Table(
        "pikku_deployment_functions",
        metadata,
        sa.Column(
            "deployment_id",
            _Name(),
            sa.ForeignKey(f"{qualified}.deployment_id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("function_name", _Name(), primary_key=True),
        sa.Index("pikku_deployment_functions_name_idx", "function_name"),
    )
    return metadata, deployments, functions


class _Clock:
    """SQL expressions for the database's current time and the age of a timestamp, per dialect."""

    def __init__(self, dialect: str) -> None:
        self.dialect = dialect

    def now(self) -> sa.ColumnElement[Any]:
        if self.dialect == "sqlite":
            # Millisecond resolution; ages are computed with julianday(), which also reads ISO 8601 text.
            return sa.func.strftime("%Y-%m-%d %H:%M:%f", "now")
        if self.dialect in ("mysql", "mariadb"):
            # DATETIME has no time zone and NOW() is in the session's, so sessions in different
            # zones would disagree on every age. UTC_TIMESTAMP() is the same for all of them.
            return sa.func.utc_timestamp(6)
        # Not now(), which PostgreSQL fixes at the start of the transaction. Registering runs several
        # statements, so a row written with a time from before a wait on a lock could look stale to the
        # next instance that registers the same id, and that instance would take it over.
        return sa.func.statement_timestamp()

    def age(self, column: sa.ColumnElement[Any]) -> sa.ColumnElement[Any]:
        if self.dialect == "sqlite":
            return (sa.func.julianday("now") - sa.func.julianday(column)) * 86400.0
        if self.dialect in ("mysql", "mariadb"):
            return sa.func.timestampdiff(sa.literal_column("MICROSECOND"), column, self.now()) / 1e6
        return sa.extract("epoch", self.now() - column)


class SqlAlchemyDeploymentService(DeploymentService):
    """Discovery in PostgreSQL, MySQL/MariaDB or SQLite through an async SQLAlchemy engine.

    ``engine`` is an :class:`~sqlalchemy.ext.asyncio.AsyncEngine` (the caller keeps ownership) or a
    URL such as ``postgresql+asyncpg://...`` (the service creates and disposes of the engine).
    """

    def __init__(self, engine: AsyncEngine | str, *, schema: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self._owns_engine = isinstance(engine, str)
        self.engine = create_async_engine(engine) if isinstance(engine, str) else engine
        self._metadata, self._deployments, self._functions = _tables(schema)
        self._clock = _Clock(self.engine.dialect.name)

    def __repr__(self) -> str:
        # render_as_string hides the password of the user info only, not one given in the query.
        return f"{type(self).__name__}({_redact(self.engine.url.render_as_string(hide_password=True))!r})"

    def _heartbeat_twin(self) -> SqlAlchemyDeploymentService | None:
        if self._owns_engine:
            url = self.engine.url.render_as_string(hide_password=False)
        elif self.heartbeat_url is not None:
            url = self.heartbeat_url
        else:
            return None
        return type(self)(url, schema=self._metadata.schema, **self._twin_options())

    async def start(self, config: DeploymentConfig) -> None:
        _check_name_lengths(config)
        await super().start(config)

    async def _create_schema(self) -> None:
        # Once the tables exist with every column, init() issues no DDL and takes no lock, so a role
        # that may use the tables but not create them can start.
        missing = await self._missing_columns()
        if missing is not None:
            if missing:
                await self._add_columns(missing)
            return
        for attempt in range(1, _SCHEMA_ATTEMPTS + 1):
            try:
                async with self.engine.connect() as conn, self._schema_lock(conn):
                    await conn.run_sync(self._metadata.create_all, checkfirst=True)
                    await conn.commit()
            except sa.exc.DBAPIError as exc:
                if attempt == _SCHEMA_ATTEMPTS or not _is_concurrent_ddl_error(exc):
                    raise
                logger.info(
                    "creating the tables in %r failed because another session created them at the same time: %s. "
                    "Retrying, attempt %d of %d",
                    self,
                    exc.orig,
                    attempt + 1,
                    _SCHEMA_ATTEMPTS,
                )
            else:
                return

    async def _missing_columns(self) -> list[str] | None:
        """Return the nullable columns that the deployment table lacks, or None if a table is missing."""
        tables = list(self._metadata.tables.values())
        deployments = self._deployments

        def check(sync_conn: sa.Connection) -> list[str] | None:
            inspector = sa.inspect(sync_conn)
            if not all(inspector.has_table(table.name, schema=table.schema) for table in tables):
                return None
            present = {column["name"] for column in inspector.get_columns(deployments.name, schema=deployments.schema)}
            return [column.name for column in deployments.columns if column.name not in present]

        async with self.engine.connect() as conn:
            await conn.execution_options(**_READ_ONLY)
            return await conn.run_sync(check)

    async def _add_columns(self, names: list[str]) -> None:
        """Add pikku_mq's nullable columns to a deployment table that Pikku or an older pikku_mq created.

        Another process may add the same column at the same moment, so a failed ALTER TABLE counts as
        done when the column exists afterwards.
        """
        d = self._deployments
        for name in names:
            column = d.c[name]
            if not column.nullable:
                raise DiscoveryError(
                    f"the table {d.fullname} in {self!r} lacks the column {name}, which only a new table gets; "
                    "drop the table or add the column by hand"
                )
            column_type = column.type.compile(dialect=self.engine.dialect)
            preparer = self.engine.dialect.identifier_preparer
            statement = f"ALTER TABLE {preparer.format_table(d)} ADD COLUMN {preparer.quote(name)} {column_type}"
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(sa.text(statement))
            except sa.exc.DBAPIError:
                if name in (await self._missing_columns() or []):
                    raise
            logger.info("added the column %s to %s in %r", name, d.fullname, self)

    @asynccontextmanager
    async def _schema_lock(self, conn: AsyncConnection) -> AsyncIterator[None]:
        """Hold a database lock named after the schema, so processes that start at once create the tables in turn.

        Two sessions that both see no table and both run CREATE TABLE collide: PostgreSQL raises a
        unique violation on ``pg_type`` or "relation already exists", MariaDB "table already exists".
        Once it has the lock, ``create_all(checkfirst=True)`` finds the tables that the previous holder
        created. PostgreSQL's advisory lock lasts until the caller commits; MySQL's named lock belongs to
        the session, so it is released on exit. Other dialects take no lock: SQLite's own write lock
        does the same job in :class:`SqliteDeploymentService`, which begins every write with
        ``BEGIN IMMEDIATE``.
        """
        schema = self._metadata.schema
        if self._clock.dialect == "postgresql":
            # The key is the one PgDeploymentService takes for a schema of the same name.
            await conn.execute(
                sa.text("SELECT set_config('lock_timeout', :timeout, true)"),
                {"timeout": f"{_SCHEMA_LOCK_TIMEOUT}s"},
            )
            await conn.execute(
                sa.text(
                    "SELECT pg_advisory_xact_lock("
                    "hashtextextended('pikku_mq:' || coalesce(CAST(:schema AS text), current_schema(), ''), 0))"
                ),
                {"schema": schema},
            )
            yield
        elif self._clock.dialect in ("mysql", "mariadb"):
            # Named locks are server-wide, so the name includes the database. MySQL limits it to 64 characters.
            database = schema or (await conn.scalar(sa.text("SELECT DATABASE()"))) or ""
            name = f"pikku_mq:{database}"[:64]
            acquired = await conn.scalar(
                sa.text("SELECT GET_LOCK(:name, :timeout)"), {"name": name, "timeout": _SCHEMA_LOCK_TIMEOUT}
            )
            if acquired != 1:
                raise TimeoutError(
                    f"timed out after {_SCHEMA_LOCK_TIMEOUT} s waiting for the lock {name!r}, which another session "
                    f"holds while it creates the tables; IS_USED_LOCK({name!r}) returns that session's connection id"
                )
            try:
                yield
            finally:
                await conn.execute(sa.text("SELECT RELEASE_LOCK(:name)"), {"name": name})
        else:
            yield

    @asynccontextmanager
    async def _begin_write(self) -> AsyncIterator[AsyncConnection]:
        """Begin a write transaction, under READ COMMITTED on MySQL and MariaDB.

        Under InnoDB's default REPEATABLE READ, registering a new id first locks the gap where the id
        would go. Two instances that register different ids in one gap then each wait for the other's
        gap lock before they can insert, and one of them fails with a deadlock (error 1213). READ
        COMMITTED takes no gap locks for these statements, so a new id locks nothing until it is
        inserted, as on PostgreSQL. Two instances that insert the same id still get a duplicate key error.
        """
        async with self.engine.connect() as conn:
            if self._clock.dialect in ("mysql", "mariadb"):
                await conn.execution_options(isolation_level="READ COMMITTED")
            async with conn.begin():
                yield conn

    async def _register(self, config: DeploymentConfig, functions: list[str]) -> None:
        for attempt in range(1, _REGISTER_ATTEMPTS + 1):
            try:
                async with self._begin_write() as conn:
                    await self._check_holder(conn, config)
                    await self._take_over(conn, config)
                    await self._insert_functions(conn, config, functions)
                return
            except _IdTakenError as exc:
                # Another session inserted the id between our check and our insert. A new transaction
                # reads its committed row and checks whether that instance is live and elsewhere.
                async with self._begin_write() as conn:
                    await self._check_holder(conn, config)
                if attempt == _REGISTER_ATTEMPTS:
                    raise DeploymentConflictError(
                        f"deployment id '{config.deployment_id}' was registered by another instance at the same "
                        f"moment {_REGISTER_ATTEMPTS} times in a row; give each instance its own id",
                        payload={"deployment_id": config.deployment_id},
                    ) from exc.__cause__
                logger.info(
                    "registering %s collided with another instance that registered the same id, whose row is "
                    "gone, stale or at this endpoint; retrying, attempt %d of %d",
                    config.deployment_id,
                    attempt + 1,
                    _REGISTER_ATTEMPTS,
                )

    async def _take_over(self, conn: AsyncConnection, config: DeploymentConfig) -> None:
        """Replace the id's row with this instance's, unless a live instance at another endpoint has it.

        The DELETE repeats the holder check's test in the same statement, because under READ
        COMMITTED ``_check_holder`` locks nothing when the row is absent: another session may insert
        and commit the row before this DELETE runs. Such a row survives the DELETE, so the INSERT
        fails on the primary key and :class:`_IdTakenError` is raised.
        """
        d = self._deployments
        await conn.execute(
            d.delete().where(
                d.c.deployment_id == config.deployment_id,
                sa.or_(d.c.endpoint == config.endpoint, sa.not_(self._is_live())),
            )
        )
        now = self._clock.now()
        try:
            await conn.execute(
                d.insert().values(
                    deployment_id=config.deployment_id,
                    endpoint=config.endpoint,
                    last_heartbeat=now,
                    created_at=now,
                    fallback_endpoints=_encode_endpoints(config.fallback_endpoints),
                    heartbeat_ttl=self.heartbeat_ttl,
                    in_flight=self._in_flight(),
                    hostname=config.hostname,
                    idempotent_functions=json.dumps(list(config.idempotent_functions))
                    if config.idempotent_functions
                    else None,
                )
            )
        except sa.exc.IntegrityError as exc:
            raise _IdTakenError from exc

    async def _insert_functions(self, conn: AsyncConnection, config: DeploymentConfig, functions: list[str]) -> None:
        """Write the function rows of the id whose row this transaction has just inserted.

        The row lock of that insert keeps other sessions from writing rows of the same id until
        commit, so the only rows this DELETE finds are orphans that SQLite keeps when its foreign
        keys are off.
        """
        f = self._functions
        await conn.execute(f.delete().where(f.c.deployment_id == config.deployment_id))
        if not functions:
            return
        try:
            await conn.execute(
                f.insert(), [{"deployment_id": config.deployment_id, "function_name": name} for name in functions]
            )
        except sa.exc.IntegrityError as exc:
            raise DiscoveryError(
                f"writing the function rows of deployment '{config.deployment_id}' in {self!r} failed because "
                f"the store treats two of its function names as equal: {exc.orig}. Check the collation of "
                "pikku_deployment_functions.function_name, which must compare names byte for byte"
            ) from exc

    async def _check_holder(self, conn: AsyncConnection, config: DeploymentConfig) -> None:
        """Raise :func:`conflict_error` if a live instance at another endpoint has the id."""
        d = self._deployments
        statement = (
            sa.select(d.c.endpoint, self._clock.age(d.c.last_heartbeat), d.c.heartbeat_ttl)
            .where(d.c.deployment_id == config.deployment_id)
            .with_for_update()
        )
        row = (await conn.execute(statement)).first()
        if row is None or row[0] == config.endpoint:
            return
        age, ttl = float(row[1]), row[2] if row[2] is not None else self.heartbeat_ttl
        if age <= ttl:
            raise conflict_error(config.deployment_id, row[0], age, ttl)

    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        d, f = self._deployments, self._functions
        registered_functions = (
            sa.select(sa.func.count()).select_from(f).where(f.c.deployment_id == config.deployment_id).scalar_subquery()
        )
        statement = (
            d.update()
            .where(
                d.c.deployment_id == config.deployment_id,
                d.c.endpoint == config.endpoint,
                registered_functions == len(functions),
            )
            .values(last_heartbeat=self._clock.now(), in_flight=self._in_flight())
        )
        async with self._begin_write() as conn:
            result = await conn.execute(statement)
        return result.rowcount == 1

    async def _deregister(self, config: DeploymentConfig) -> None:
        d = self._deployments
        async with self._begin_write() as conn:
            owned = d.delete().where(d.c.deployment_id == config.deployment_id, d.c.endpoint == config.endpoint)
            if (await conn.execute(owned)).rowcount > 0:
                await self._delete_orphan_functions(conn, [config.deployment_id])

    async def _delete_orphan_functions(self, conn: AsyncConnection, deployment_ids: list[str]) -> None:
        """Delete the function rows of ``deployment_ids`` that no longer have a deployment row.

        PostgreSQL and MySQL delete them through the foreign key's cascade, so this finds nothing
        there. SQLite enforces the cascade only with foreign_keys on. The NOT EXISTS keeps the rows of
        an instance that registered one of these ids again since the caller's last read.
        """
        d, f = self._deployments, self._functions
        parent = sa.select(d.c.deployment_id).where(d.c.deployment_id == f.c.deployment_id)
        await conn.execute(f.delete().where(f.c.deployment_id.in_(deployment_ids), ~parent.exists()))

    def _is_live(self) -> sa.ColumnElement[bool]:
        d = self._deployments
        return self._clock.age(d.c.last_heartbeat) <= sa.func.coalesce(d.c.heartbeat_ttl, self.heartbeat_ttl)

    async def _purge_stale(self) -> int:
        d = self._deployments
        stale = sa.select(d.c.deployment_id).where(sa.not_(self._is_live()))
        async with self._begin_write() as conn:
            stale_ids = [row[0] for row in (await conn.execute(stale)).all()]
            if not stale_ids:
                return 0
            # Another instance may have taken one of the ids over since the SELECT, so the DELETE tests
            # liveness again, and function rows go only where the deployment row went.
            result = await conn.execute(d.delete().where(d.c.deployment_id.in_(stale_ids), sa.not_(self._is_live())))
            await self._delete_orphan_functions(conn, stale_ids)
        return max(result.rowcount, 0)

    async def find_function(self, name: str) -> list[DeploymentInfo]:
        d, f = self._deployments, self._functions
        statement = (
            sa.select(
                d.c.deployment_id,
                d.c.endpoint,
                d.c.fallback_endpoints,
                d.c.in_flight,
                d.c.hostname,
                d.c.idempotent_functions,
            )
            .join(f, f.c.deployment_id == d.c.deployment_id)
            .where(f.c.function_name == name, self._is_live())
        )
        async with self._translate_errors(f"looking up '{name}'"), self.engine.connect() as conn:
            await conn.execution_options(**_READ_ONLY)
            rows = (await conn.execute(statement)).all()
        return [
            DeploymentInfo(
                row[0], row[1], decode_string_list(row[2]), row[3], row[4], name in decode_string_list(row[5])
            )
            for row in rows
        ]

    async def list_deployments(self) -> list[DeploymentRecord]:
        d, f = self._deployments, self._functions
        async with self._translate_errors("listing deployments"), self.engine.connect() as conn:
            await conn.execution_options(**_READ_ONLY)
            rows = (
                await conn.execute(
                    sa.select(
                        d.c.deployment_id,
                        d.c.endpoint,
                        d.c.fallback_endpoints,
                        self._clock.age(d.c.last_heartbeat),
                        d.c.heartbeat_ttl,
                        d.c.in_flight,
                        d.c.hostname,
                        d.c.idempotent_functions,
                    ).order_by(d.c.deployment_id)
                )
            ).all()
            pairs = (await conn.execute(sa.select(f.c.deployment_id, f.c.function_name))).all()

        functions: dict[str, list[str]] = {}
        for deployment_id, function_name in pairs:
            functions.setdefault(deployment_id, []).append(function_name)
        records = []
        for deployment_id, endpoint, fallbacks, age, ttl, in_flight, hostname, idempotent in rows:
            live = float(age) <= (ttl if ttl is not None else self.heartbeat_ttl)
            records.append(
                DeploymentRecord(
                    deployment_id=deployment_id,
                    endpoint=endpoint,
                    functions=tuple(sorted(functions.get(deployment_id, []))),
                    heartbeat_age=float(age),
                    state="live" if live else "stale",
                    fallback_endpoints=decode_string_list(fallbacks),
                    in_flight=in_flight,
                    hostname=hostname,
                    idempotent_functions=tuple(sorted(decode_string_list(idempotent))),
                )
            )
        return records

    async def _close_store(self) -> None:
        if self._owns_engine:
            await self.engine.dispose()


class _IdTakenError(Exception):
    """The INSERT of a deployment row failed on the primary key: another session inserted the id first."""


def _is_concurrent_ddl_error(exc: sa.exc.DBAPIError) -> bool:
    """Check whether ``exc`` is the error that CREATE raises when another session creates the same object."""
    # asyncpg's errors carry a SQLSTATE, PyMySQL's an error number as their first argument.
    code = getattr(exc.orig, "sqlstate", None)
    if code is None and exc.orig is not None and exc.orig.args:
        code = exc.orig.args[0]
    if code in _CONCURRENT_DDL_ERRORS:
        return True
    # SQLite has no error code of its own for this case.
    return "already exists" in str(exc.orig)


def _check_name_lengths(config: DeploymentConfig) -> None:
    """Raise ConfigurationError for an id or function name that does not fit its VARCHAR column.

    PostgreSQL and MySQL would reject it with an error that quotes the whole statement and its
    parameters. SQLite ignores VARCHAR lengths, but its registry is held to the same limit so that
    a store can move between databases.
    """
    if len(config.deployment_id) > _NAME_LENGTH:
        raise ConfigurationError(
            f"deployment id {_shorten(config.deployment_id)} has {len(config.deployment_id)} characters, more than "
            f"the {_NAME_LENGTH} that the SQL deployment table allows; choose a shorter id"
        )
    for name in config.functions or ():
        if len(name) > _NAME_LENGTH:
            raise ConfigurationError(
                f"function name {_shorten(name)} of deployment {_shorten(config.deployment_id)} has {len(name)} "
                f"characters, more than the {_NAME_LENGTH} that the SQL deployment table allows; rename the function"
            )


def _shorten(name: str, length: int = 40) -> str:
    """Quote ``name`` for an error message, cut to ``length`` characters."""
    return repr(name) if len(name) <= length else f"{name[:length]!r}..."


def _encode_endpoints(endpoints: Sequence[str]) -> str | None:
    return json.dumps(list(endpoints)) if endpoints else None
