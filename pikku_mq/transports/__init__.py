"""Transports: how a call travels to the instance that runs it."""

from .base import ClientTransport, Reply, TransportSet
from .http import AiohttpTransport, HttpxTransport, PikkuASGIApp
from .memory import MemoryTransport

__all__ = [
    "AiohttpTransport",
    "ClientTransport",
    "HttpxTransport",
    "MemoryTransport",
    "PikkuASGIApp",
    "Reply",
    "TransportSet",
]
