"""The echo function and payloads of the transport benchmark (benchmarks/rpc_bench.py).

Every case, pikku_mq and its peers alike, echoes the same JSON object. pikku_mq and FastStream
validate it against the same pydantic model on the way in and on the way out.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from pikku_mq import pikku_sessionless_func


class Payload(BaseModel):
    name: str
    items: list[int]
    note: str


def make_payload(size: int) -> dict[str, Any]:
    """Return a payload whose compact JSON encoding is ``size`` bytes long (at least 60)."""
    payload: dict[str, Any] = {"name": "Ada Lovelace", "items": [1, 2, 3], "note": ""}
    overhead = len(json.dumps(payload, separators=(",", ":")))
    payload["note"] = "x" * max(0, size - overhead)
    return payload


@pikku_sessionless_func(expose=True, idempotent=True)
async def echo(services: Any, data: Payload) -> Payload:
    return data
