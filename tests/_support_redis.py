"""Key prefixes of the tests on the shared Redis server at 127.0.0.1:6379, and their cleanup.

Each test gets a prefix of its own, so tests never see each other's keys, and only the keys under the
prefixes handed out here are ever deleted: never FLUSHDB or FLUSHALL on the shared server.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import redis

REDIS_URL = "redis://127.0.0.1:6379/0"

_prefixes: dict[Path, str] = {}


def redis_prefix(tmp_path: Path) -> str:
    """Return the key prefix of the test that owns ``tmp_path``, creating it on first use."""
    return _prefixes.setdefault(tmp_path, f"pikku_t_{uuid.uuid4().hex}:")


def sync_client() -> redis.Redis:
    """Return a new synchronous client on the test server; the caller closes it."""
    return redis.Redis.from_url(REDIS_URL, socket_timeout=10, socket_connect_timeout=5)


def prefix_keys(client: redis.Redis, prefix: str) -> list[bytes]:
    """Return every key under ``prefix`` (which must contain no glob characters)."""
    return list(client.scan_iter(match=f"{prefix}*", count=500))


def delete_prefix(prefix: str) -> int:
    """Delete every key under ``prefix`` and return how many there were."""
    with sync_client() as client:
        keys = prefix_keys(client, prefix)
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    return len(keys)


def drop_redis_prefixes() -> None:
    """Delete the keys of every prefix handed out so far, and forget the prefixes."""
    while _prefixes:
        _, prefix = _prefixes.popitem()
        delete_prefix(prefix)
