"""Presence and change events: joins, heartbeats, draining and leaves, as the feeds carry them.

The discovery stores with a change feed (PostgreSQL ``LISTEN/NOTIFY``, Redis pub/sub) and the broker
transports (presence messages) carry the same JSON text, so a caller applies every feed alike.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Literal

__all__ = ["MAX_CHANGE_PAYLOAD", "ChangeEvent", "ChangeKind", "decode_change", "encode_change"]

logger = logging.getLogger(__name__)

MAX_CHANGE_PAYLOAD = 7000
"""Bytes an encoded change event may take (PostgreSQL caps a notification's payload near 8000).

A longer event, from a very long deployment id, is sent as a ``resync`` event instead.
"""

ChangeKind = Literal["join", "heartbeat", "draining", "leave", "resync"]
_CHANGE_KINDS = frozenset({"join", "heartbeat", "draining", "leave", "resync"})


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """One message of a change feed.

    ``join``: an instance registered, so cached lookups may miss it. ``heartbeat``: an instance is
    alive (sent by the broker transports only). ``draining`` and ``leave``: the instance takes no more
    calls. ``resync``: expire every cached lookup, as after a gap in the feed.
    """

    kind: ChangeKind
    deployment_id: str = ""
    endpoint: str = ""
    """The endpoint of the instance, or empty where the feed does not send one.

    The broker transports send it, so a mesh that shares the broker cannot act on another mesh's
    instance with the same deployment id."""
    in_flight: int | None = None
    """The calls the instance had in flight when it sent the event, or None where the event has no count.

    Workers send it with ``join`` and ``heartbeat`` presence events, and least-loaded callers balance on it."""
    busy: bool = False
    """Set on a heartbeat while the instance's event loop is blocked, so its calls wait until it is free."""


def encode_change(
    kind: ChangeKind, deployment_id: str, endpoint: str = "", in_flight: int | None = None, *, busy: bool = False
) -> str:
    """Return the JSON text of a change event, or of a ``resync`` event if it would be too long."""
    event: dict[str, str | int | bool] = {"event": kind, "deployment_id": deployment_id}
    if endpoint:
        event["endpoint"] = endpoint
    if in_flight is not None:
        event["in_flight"] = in_flight
    if busy:
        event["busy"] = True
    payload = json.dumps(event, separators=(",", ":"))
    if len(payload.encode()) > MAX_CHANGE_PAYLOAD:
        return json.dumps({"event": "resync"})
    return payload


def decode_change(raw: str | bytes) -> ChangeEvent | None:
    """Parse a change event; return None for a message that is not one (logged, then ignored)."""
    try:
        value = json.loads(raw)
        kind = value["event"]
        deployment_id = value.get("deployment_id", "")
        endpoint = value.get("endpoint", "")
        in_flight = value.get("in_flight")
        busy = value.get("busy") is True
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        # RecursionError: deeply nested JSON, which anyone who can publish on the channel can send.
        logger.debug("ignoring a malformed change event: %.200r", raw)
        return None
    if (
        kind not in _CHANGE_KINDS
        or not isinstance(deployment_id, str)
        or not isinstance(endpoint, str)
        or (kind != "resync" and not deployment_id)
    ):
        logger.debug("ignoring an unknown change event: %.200r", raw)
        return None
    return ChangeEvent(kind, deployment_id, endpoint, _count(in_flight), busy)


def _count(value: object) -> int | None:
    """Return ``value`` if it is a count of calls (a non-negative integer, not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**31:
        return value
    return None
