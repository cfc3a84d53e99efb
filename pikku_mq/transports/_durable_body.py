"""The msgpack body ``{"data": ...}`` of a durable one-way call or event, shared by NATS JetStream and RabbitMQ.

It imports no broker client, so each broker's module works without the other's extra.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pydantic_core

from .._errors import BadRequestError
from .http import _decode_call_body

__all__ = ["decode_data", "encode_data"]


def encode_data(data: Any, what: str) -> bytes:
    try:
        return msgpack.packb({"data": pydantic_core.to_jsonable_python(data)})  # type: ignore[no-any-return]
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError, OverflowError) as exc:
        raise BadRequestError(f"data for '{what}' cannot be serialised to msgpack: {exc}") from None


def decode_data(payload: bytes) -> Any:
    """Return ``data`` of a msgpack ``{"data": ...}`` body, checked as a request body is, or raise BadRequestError."""
    return _decode_call_body(payload, binary=True)
