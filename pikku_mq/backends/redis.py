"""Discovery in Redis through redis-py's asyncio client.

The layout is that of @pikku/redis (0.12.18), so a Pikku instance and a pikku_mq instance can share
one registry. With the default key prefix ``pikku:``::

    pikku:deployment:<id>   hash: endpoint, functions (a JSON array of names), and pikku_mq's own
                            fallback_endpoints (a JSON array), heartbeat_ttl (seconds),
                            last_heartbeat_ms, created_at_ms, in_flight (the calls in flight at
                            the last heartbeat), hostname and idempotent_functions (a JSON
                            array, absent when there are none); the key expires after
                            RETENTION_FACTOR times the TTL, so a stale row stays listable for a while
    pikku:fn:<name>         sorted set: member = deployment id, score = its expiry time in ms; no TTL,
                            as Pikku writes it, because Pikku's members would expire with the key
    pikku:deployments       sorted set (pikku_mq's own): member = deployment id, score = expiry in ms,
                            so a heartbeat finds the stale rows to purge without scanning keys

Registering, heartbeats, lookups, purges and deregistering are each one Lua script, so each costs one
round trip whatever the number of functions. Registering, deregistering and purging publish join and
leave events on the channel ``<prefix>changes`` from inside their scripts. So an event goes out in the
same atomic step as its change, and callers subscribe to that channel.

Each script reads the time with ``TIME``, so liveness is judged by the Redis server's clock, never by
the clocks of the hosts. Each row keeps its own TTL, so instances with different heartbeat settings can
share the registry.

A Pikku peer removes expired members from a function's set by its own host clock when it calls that
function, so a Pikku host whose clock runs ahead of the server's can drop live pikku_mq members from
that set; the next heartbeat of each member adds it back.

NOTE: a function set keeps the member of an instance that crashed until a heartbeat of that function,
a purge that still finds the instance's row, or a Pikku caller of that function removes it. A crashed
instance's member can outlive its row, and a set that nobody serves any more then stays in Redis.

The scripts build the keys of other deployments and functions from the prefix, so they need a single
Redis server (or a primary with replicas), not Redis Cluster. ``TIME`` before a write needs Redis 5 or
newer, where scripts replicate their effects instead of their source.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .._errors import ConfigurationError
from .._presence import ChangeEvent, ChangeKind, decode_change, encode_change
from .._types import DeploymentConfig, DeploymentInfo, DeploymentRecord
from . import _redact
from .base import DeploymentService, conflict_error, decode_string_list

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RETENTION_FACTOR", "RedisDeploymentService"]

DEFAULT_KEY_PREFIX = "pikku:"

RETENTION_FACTOR = 3
"""A row's keys expire after this many heartbeat TTLs without a heartbeat, unless a heartbeat purges it first."""

_PURGE_BATCH = 100
"""The maximum number of stale rows one heartbeat deletes, to keep each script short."""

_SCAN_COUNT = 500

# Shared by the scripts: the server's time in milliseconds, and a key TTL that is only ever extended,
# so an instance with a short TTL never shortens the life of a set that another instance still needs.
_LUA_HELPERS = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x)
  return string.format('%.0f', x)
end
local function extend_ttl(key, ms)
  local left = redis.call('PTTL', key)
  if left < ms then
    redis.call('PEXPIRE', key, ms)
  end
end
local function decode_names(raw)
  if not raw then
    return {}
  end
  local ok, names = pcall(cjson.decode, raw)
  if ok and type(names) == 'table' then
    return names
  end
  return {}
end
"""

# KEYS: row hash, index, then the sets of the new functions.
# ARGV: id, endpoint, functions JSON, fallbacks JSON or '', TTL ms, retention ms, fn key prefix,
# TTL in seconds as the row stores it, change channel, join event, calls in flight or '', host name.
# Returns {} when registered, or {endpoint, age ms, TTL ms} of the live instance registered under the id.
_REGISTER = (
    _LUA_HELPERS
    + """
local now = now_ms()
local ttl = tonumber(ARGV[5])
local current = redis.call('HMGET', KEYS[1], 'endpoint', 'last_heartbeat_ms', 'heartbeat_ttl', 'functions')
if current[1] and current[1] ~= ARGV[2] then
  local holder_ttl = ttl
  if tonumber(current[3]) then
    holder_ttl = tonumber(current[3]) * 1000
  end
  local age
  if tonumber(current[2]) then
    age = now - tonumber(current[2])
  else
    -- A row without pikku_mq's fields (written by Pikku) lives as long as its key.
    age = math.max(holder_ttl - redis.call('PTTL', KEYS[1]), 0)
  end
  if age <= holder_ttl then
    return {current[1], int(age), int(holder_ttl)}
  end
end
for _, name in ipairs(decode_names(current[4])) do
  redis.call('ZREM', ARGV[7] .. name, ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'endpoint', ARGV[2], 'functions', ARGV[3], 'heartbeat_ttl', ARGV[8],
  'last_heartbeat_ms', int(now), 'created_at_ms', int(now))
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[1], 'fallback_endpoints', ARGV[4])
end
if ARGV[11] ~= '' then
  redis.call('HSET', KEYS[1], 'in_flight', ARGV[11])
end
redis.call('HSET', KEYS[1], 'hostname', ARGV[12])
if ARGV[13] ~= '' then
  redis.call('HSET', KEYS[1], 'idempotent_functions', ARGV[13])
end
local retention = tonumber(ARGV[6])
redis.call('PEXPIRE', KEYS[1], retention)
local expiry = int(now + ttl)
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
extend_ttl(KEYS[2], retention)
-- The function sets get no TTL: Pikku never refreshes one, so a TTL left behind by this instance
-- would delete the live Pikku members of a shared set when it ran out.
for i = 3, #KEYS do
  redis.call('ZADD', KEYS[i], expiry, ARGV[1])
end
redis.call('PUBLISH', ARGV[9], ARGV[10])
return {}
"""
)

# KEYS: row hash, index, then the sets of this instance's functions.
# ARGV: id, endpoint, functions JSON, TTL ms, retention ms, calls in flight or ''.
# Returns 0 when the row is missing, belongs to another endpoint or lists other functions.
_HEARTBEAT = (
    _LUA_HELPERS
    + """
local current = redis.call('HMGET', KEYS[1], 'endpoint', 'functions')
if current[1] ~= ARGV[2] or current[2] ~= ARGV[3] then
  return 0
end
local now = now_ms()
local retention = tonumber(ARGV[5])
local expiry = int(now + tonumber(ARGV[4]))
redis.call('HSET', KEYS[1], 'last_heartbeat_ms', int(now))
if ARGV[6] ~= '' then
  redis.call('HSET', KEYS[1], 'in_flight', ARGV[6])
end
redis.call('PEXPIRE', KEYS[1], retention)
redis.call('ZADD', KEYS[2], expiry, ARGV[1])
extend_ttl(KEYS[2], retention)
for i = 3, #KEYS do
  -- Drop expired members of this set (rows that Pikku wrote are never in the index).
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', '(' .. int(now))
  redis.call('ZADD', KEYS[i], expiry, ARGV[1])
end
return 1
"""
)

# KEYS: row hash, index. ARGV: id, endpoint, fn key prefix, change channel, leave event.
# Returns 1 if the row was ours and deleted.
_DEREGISTER = (
    _LUA_HELPERS
    + """
local current = redis.call('HMGET', KEYS[1], 'endpoint', 'functions')
if current[1] ~= ARGV[2] then
  return 0
end
for _, name in ipairs(decode_names(current[2])) do
  redis.call('ZREM', ARGV[3] .. name, ARGV[1])
end
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
)

# KEYS: index. ARGV: row key prefix, fn key prefix, batch size, change channel.
# Returns how many rows it deleted.
_PURGE = (
    _LUA_HELPERS
    + """
local now = now_ms()
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. int(now), 'LIMIT', 0, tonumber(ARGV[3]))
local deleted = 0
for _, id in ipairs(ids) do
  local key = ARGV[1] .. id
  local row = redis.call('HMGET', key, 'last_heartbeat_ms', 'heartbeat_ttl', 'functions')
  local last, ttl = tonumber(row[1]), tonumber(row[2])
  if not (last and ttl) then
    -- The row expired, or the id was taken over by a row without pikku_mq's fields (Pikku's) or
    -- with fields that are not numbers, which no pikku_mq instance writes.
    redis.call('ZREM', KEYS[1], id)
  else
    local expiry = last + ttl * 1000
    if expiry < now then
      for _, name in ipairs(decode_names(row[3])) do
        local score = redis.call('ZSCORE', ARGV[2] .. name, id)
        if score and tonumber(score) < now then
          redis.call('ZREM', ARGV[2] .. name, id)
        end
      end
      redis.call('DEL', key)
      redis.call('ZREM', KEYS[1], id)
      redis.call('PUBLISH', ARGV[4], cjson.encode({event = 'leave', deployment_id = id}))
      deleted = deleted + 1
    else
      redis.call('ZADD', KEYS[1], int(expiry), id)
    end
  end
end
return deleted
"""
)

# KEYS: the function's set. ARGV: row key prefix.
# Returns {id, endpoint, fallbacks JSON or '', in_flight or '', hostname or '', idempotent functions
# JSON or '', ...} for each live member whose row exists.
_FIND = (
    _LUA_HELPERS
    + """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], int(now_ms()), '+inf')
local found = {}
for _, id in ipairs(ids) do
  local row = redis.call('HMGET', ARGV[1] .. id, 'endpoint', 'fallback_endpoints', 'in_flight', 'hostname',
    'idempotent_functions')
  if row[1] then
    table.insert(found, id)
    table.insert(found, row[1])
    table.insert(found, row[2] or '')
    table.insert(found, row[3] or '')
    table.insert(found, row[4] or '')
    table.insert(found, row[5] or '')
  end
end
return found
"""
)


def _import_redis() -> Any:
    try:
        import redis.asyncio
    except ImportError as exc:
        raise ConfigurationError(
            "RedisDeploymentService needs the redis package; install it with: pip install 'pikku-mq[redis]'"
        ) from exc
    return redis.asyncio


class RedisDeploymentService(DeploymentService):
    """Discovery in Redis, laid out as @pikku/redis lays it out.

    ``client`` is a :class:`redis.asyncio.Redis` (the caller keeps ownership and closes it) or a URL
    such as ``redis://host:6379/0`` or ``rediss://...`` (the service creates the client and closes it).
    With a URL the connection pool opens at most ``max_connections`` connections, and a caller waits up
    to ``pool_timeout`` seconds for a free one instead of failing at once. ``key_prefix`` (default
    ``pikku:``, Pikku's) starts every key, so registries can share a server.

    The change feed keeps one connection of the client's pool for a pub/sub subscription while the
    service is open.
    """

    has_change_feed = True

    def __init__(
        self,
        client: Redis | str,
        *,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        max_connections: int = 50,
        pool_timeout: float = 10.0,
        socket_timeout: float = 10.0,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if not key_prefix:
            raise ConfigurationError("key_prefix must not be empty; the default is 'pikku:'")
        self.key_prefix = key_prefix
        self._owns_client = isinstance(client, str)
        self._url = client if isinstance(client, str) else None
        self._client_options: dict[str, Any] = {
            "max_connections": max_connections,
            "pool_timeout": pool_timeout,
            "socket_timeout": socket_timeout,
        }
        self._description = _redact(client) if isinstance(client, str) else _describe_client(client)
        self.client: Redis = (
            _connect(client, max_connections, pool_timeout, socket_timeout) if isinstance(client, str) else client
        )

        self._index_key = f"{key_prefix}deployments"
        self._row_prefix = f"{key_prefix}deployment:"
        self._fn_prefix = f"{key_prefix}fn:"
        self.change_channel = f"{key_prefix}changes"
        self._ttl_ms = round(self.heartbeat_ttl * 1000)
        self._retention_ms = self._ttl_ms * RETENTION_FACTOR
        self._register_script: AsyncScript = self.client.register_script(_REGISTER)
        self._heartbeat_script: AsyncScript = self.client.register_script(_HEARTBEAT)
        self._deregister_script: AsyncScript = self.client.register_script(_DEREGISTER)
        self._purge_script: AsyncScript = self.client.register_script(_PURGE)
        self._find_script: AsyncScript = self.client.register_script(_FIND)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._description!r}, key_prefix={self.key_prefix!r})"

    def _heartbeat_twin(self) -> RedisDeploymentService | None:
        url = self._url or self.heartbeat_url
        if url is None:
            return None
        return type(self)(url, key_prefix=self.key_prefix, **self._client_options, **self._twin_options())

    async def _create_schema(self) -> None:
        # Redis creates keys on first write; checking the connection here reports a wrong URL early.
        await self.client.ping()

    def _row_key(self, deployment_id: str) -> str:
        return f"{self._row_prefix}{deployment_id}"

    def _function_keys(self, functions: Sequence[str]) -> list[str]:
        return [f"{self._fn_prefix}{name}" for name in functions]

    async def _register(self, config: DeploymentConfig, functions: list[str]) -> None:
        keys = [self._row_key(config.deployment_id), self._index_key, *self._function_keys(functions)]
        args: list[str | int] = [
            config.deployment_id,
            config.endpoint,
            json.dumps(functions),
            json.dumps(list(config.fallback_endpoints)) if config.fallback_endpoints else "",
            self._ttl_ms,
            self._retention_ms,
            self._fn_prefix,
            repr(self.heartbeat_ttl),
            self.change_channel,
            encode_change("join", config.deployment_id),
            _count_arg(self._in_flight()),
            config.hostname or "",
            json.dumps(list(config.idempotent_functions)) if config.idempotent_functions else "",
        ]
        holder = await self._register_script(keys=keys, args=args)
        if holder:
            endpoint, age_ms, ttl_ms = (_text(value) for value in holder)
            raise conflict_error(config.deployment_id, endpoint, int(age_ms) / 1000, int(ttl_ms) / 1000)

    async def _heartbeat(self, config: DeploymentConfig, functions: list[str]) -> bool:
        keys = [self._row_key(config.deployment_id), self._index_key, *self._function_keys(functions)]
        args: list[str | int] = [
            config.deployment_id,
            config.endpoint,
            json.dumps(functions),
            self._ttl_ms,
            self._retention_ms,
            _count_arg(self._in_flight()),
        ]
        return int(await self._heartbeat_script(keys=keys, args=args)) == 1

    async def _deregister(self, config: DeploymentConfig) -> None:
        keys = [self._row_key(config.deployment_id), self._index_key]
        args = [
            config.deployment_id,
            config.endpoint,
            self._fn_prefix,
            self.change_channel,
            encode_change("leave", config.deployment_id),
        ]
        await self._deregister_script(keys=keys, args=args)

    async def _purge_stale(self) -> int:
        args: list[str | int] = [self._row_prefix, self._fn_prefix, _PURGE_BATCH, self.change_channel]
        return int(await self._purge_script(keys=[self._index_key], args=args))

    # -- change feed -------------------------------------------------------------------------------

    async def _announce(self, kind: ChangeKind, deployment_id: str) -> None:
        await self.client.publish(self.change_channel, encode_change(kind, deployment_id))

    async def _watch_changes(self, deliver: Callable[[ChangeEvent | None], None], check_interval: float) -> None:
        pubsub = self.client.pubsub()
        loop = asyncio.get_running_loop()
        try:
            # redis-py subscribes again by itself after a reconnect. Each confirmation arrives below as a
            # "subscribe" message and becomes deliver(None), because events sent in the gap are lost.
            await pubsub.subscribe(self.change_channel)
            last_message = loop.time()
            while True:
                message = await pubsub.get_message(timeout=check_interval)
                now = loop.time()
                if message is None:
                    # A half-open connection stays silent, so ping it and give up if no pong arrives.
                    if now - last_message > 2 * check_interval:
                        raise ConnectionError(f"ping on the {self.change_channel} subscription timed out")
                    await pubsub.ping()
                    continue
                last_message = now
                if message["type"] == "subscribe":
                    deliver(None)
                elif message["type"] == "message":
                    event = decode_change(message["data"])
                    if event is not None:
                        deliver(event)
        finally:
            await pubsub.aclose()

    async def find_function(self, name: str) -> list[DeploymentInfo]:
        flat = [
            _text(value)
            for value in await self._find_script(keys=[f"{self._fn_prefix}{name}"], args=[self._row_prefix])
        ]
        return [
            DeploymentInfo(
                flat[i],
                flat[i + 1],
                decode_string_list(flat[i + 2]),
                _count(flat[i + 3]),
                flat[i + 4] or None,
                name in decode_string_list(flat[i + 5]),
            )
            for i in range(0, len(flat), 6)
        ]

    async def list_deployments(self) -> list[DeploymentRecord]:
        keys = sorted(
            {
                _text(key)
                async for key in self.client.scan_iter(match=f"{_escape_glob(self._row_prefix)}*", count=_SCAN_COUNT)
            }
        )
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.time()
            for key in keys:
                pipe.hgetall(key)
                pipe.pttl(key)
            replies = await pipe.execute()

        seconds, microseconds = replies[0]
        now_ms = int(seconds) * 1000 + int(microseconds) // 1000
        records = []
        for index, key in enumerate(keys):
            fields = {_text(k): _text(v) for k, v in replies[1 + 2 * index].items()}
            if "endpoint" not in fields:
                continue  # expired or deleted since the scan
            records.append(self._record(key[len(self._row_prefix) :], fields, int(replies[2 + 2 * index]), now_ms))
        return records

    def _record(self, deployment_id: str, fields: dict[str, str], key_ttl_ms: int, now_ms: int) -> DeploymentRecord:
        # A field that is not a number was not written by pikku_mq: read the row as Pikku's.
        ttl = _number(fields.get("heartbeat_ttl")) or self.heartbeat_ttl
        last_heartbeat_ms = _number(fields.get("last_heartbeat_ms"))
        if last_heartbeat_ms is not None:
            age = (now_ms - last_heartbeat_ms) / 1000
        else:
            # NOTE: a row written by Pikku has no heartbeat time, so its age is estimated from the key's
            # remaining TTL, assuming Pikku set that TTL to this service's heartbeat_ttl.
            age = max(ttl - max(key_ttl_ms, 0) / 1000, 0.0)
        return DeploymentRecord(
            deployment_id=deployment_id,
            endpoint=fields["endpoint"],
            functions=tuple(sorted(decode_string_list(fields.get("functions")))),
            heartbeat_age=age,
            state="live" if age <= ttl else "stale",
            fallback_endpoints=decode_string_list(fields.get("fallback_endpoints")),
            in_flight=_count(fields.get("in_flight")),
            hostname=fields.get("hostname") or None,
            idempotent_functions=tuple(sorted(decode_string_list(fields.get("idempotent_functions")))),
        )

    async def _close_store(self) -> None:
        if self._owns_client:
            await self.client.aclose()


def _connect(url: str, max_connections: int, pool_timeout: float, socket_timeout: float) -> Redis:
    redis_asyncio = _import_redis()
    pool = redis_asyncio.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        socket_keepalive=True,
        health_check_interval=30,
    )
    client: Redis = redis_asyncio.Redis.from_pool(pool)
    return client


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _count(text: str | None) -> int | None:
    """Parse a stored count of calls; a missing or malformed value is None."""
    if not text or not text.isascii() or not text.isdigit() or len(text) > 9:
        return None
    return int(text)


def _count_arg(count: int | None) -> str:
    return "" if count is None else str(count)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _escape_glob(text: str) -> str:
    """Escape the characters that Redis's MATCH patterns treat specially."""
    return "".join(f"\\{char}" if char in "*?[]\\" else char for char in text)


def _describe_client(client: Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"
