"""A misbehaving HTTP instance for the routing tests: a real TCP server on 127.0.0.1 that fails on purpose.

:class:`FaultyInstance` reads each request in full, records its headers, then acts by its current
``mode``: ``drop`` closes the connection without a reply (a connection lost after the request was
sent), ``hang`` keeps it open without a reply, ``gateway`` responds 502 with an HTML page (as a proxy
in front of a dead worker does), and ``answer`` responds 200 with ``answer`` as the JSON result. The
mode can change while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Literal, Self

Mode = Literal["drop", "hang", "gateway", "answer"]

_MAX_HEADER_BYTES = 64 * 1024


@dataclass
class RecordedRequest:
    """One request that reached the instance: its path, lowercase headers and arrival time."""

    path: str
    headers: dict[str, str]
    arrived: float = field(default_factory=time.monotonic)


class FaultyInstance:
    """An HTTP server on 127.0.0.1 that fails as ``mode`` sets; use it as an async context manager."""

    def __init__(self, mode: Mode = "drop", answer: object = "faulty") -> None:
        self.mode: Mode = mode
        self.answer = answer
        self.requests: list[RecordedRequest] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def call_ids(self) -> list[str]:
        """Return the ``pikku-call-id`` header of every request, in arrival order."""
        return [request.headers.get("pikku-call-id", "") for request in self.requests]

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and act on it; return whether the connection stays open for another."""
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEADER_BYTES:
            return False
        request_line, *lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append(RecordedRequest(request_line.split(" ")[1], headers))

        if self.mode == "drop":
            return False
        if self.mode == "hang":
            await reader.read()  # until the caller gives up and closes the connection
            return False
        if self.mode == "gateway":
            page = b"<html><body>502 Bad Gateway</body></html>"
            writer.write(_response(502, "Bad Gateway", "text/html", page))
        else:
            writer.write(_response(200, "OK", "application/json", json.dumps(self.answer).encode()))
        await writer.drain()
        return True


def _response(status: int, reason: str, content_type: str, body: bytes) -> bytes:
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body
