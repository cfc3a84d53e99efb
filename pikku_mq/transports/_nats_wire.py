"""The NATS wire form that needs no NATS client: endpoints, subjects and header sizes.

Kept apart from :mod:`pikku_mq.transports.nats` so that a worker can validate a ``nats://`` endpoint,
and report a missing nats-py clearly, without importing nats-py.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from .._errors import ConfigurationError

__all__ = [
    "DEFAULT_PORT",
    "HEADER_REJECTED",
    "HEADER_SERVICE_ERROR",
    "HEADER_SERVICE_ERROR_CODE",
    "HEADER_STATUS",
    "MAX_PREFIX_LENGTH",
    "MAX_SUBJECT_LENGTH",
    "NatsEndpoint",
    "escape_name",
    "header_block_size",
    "message_size",
    "parse_nats_endpoint",
    "server_addresses",
    "split_server_urls",
    "unescape_token",
]

DEFAULT_PORT = 4222

HEADER_STATUS = "pikku-status"
"""Reply header: the HTTP status code of the reply, in decimal. Every pikku_mq reply carries it."""
HEADER_REJECTED = "pikku-rejected"
"""Reply header, ``1`` when the worker declined the call before running it (draining or busy)."""
HEADER_SERVICE_ERROR = "Nats-Service-Error"
"""Reply header of an error reply: the error message, as NATS micro services send it."""
HEADER_SERVICE_ERROR_CODE = "Nats-Service-Error-Code"
"""Reply header of an error reply: the status code, as NATS micro services send it."""

MAX_PREFIX_LENGTH = 128
"""Maximum length of a subject prefix, in characters."""

MAX_SUBJECT_LENGTH = 3500
"""Maximum length of a request subject, in bytes. nats-server (2.9) rejects a protocol line over 4096
bytes by default and drops the connection that sent it. The subject shares that line with the reply
inbox and two sizes. The longest function name that can be registered (255 characters of up to 4
UTF-8 bytes, each byte escaped to 3 characters) fits under this limit with the longest prefix."""

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPED_RE = re.compile(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+")
_RESERVED_FIRST_TOKENS = ("_INBOX",)
_SERVER_SCHEMES = ("nats", "tls", "ws", "wss")

_NATS_HEADER_LINE = b"NATS/1.0\r\n"
_HEADER_VALUE_NEWLINES = str.maketrans({"\r": " ", "\n": " "})


@dataclass(frozen=True, slots=True)
class NatsEndpoint:
    """A parsed ``nats://host:port/<subject-prefix>`` endpoint."""

    host: str
    port: int
    prefix: str
    username: str | None = None
    password: str | None = None

    @property
    def advertised(self) -> str:
        """The endpoint as callers see it: ``nats://host:port/prefix``, without credentials."""
        return urlunsplit(("nats", f"{_bracketed(self.host)}:{self.port}", "/" + self.prefix, "", ""))

    @property
    def server_url(self) -> str:
        """The URL of the broker named by the endpoint, with its credentials if it has some."""
        netloc = f"{_bracketed(self.host)}:{self.port}"
        if self.username is not None:
            credentials = self.username if self.password is None else f"{self.username}:{self.password}"
            netloc = f"{credentials}@{netloc}"
        return urlunsplit(("nats", netloc, "", "", ""))

    @property
    def subscription(self) -> str:
        """The subject a worker subscribes to: every function under the prefix."""
        return self.prefix + ".>"

    def subject(self, name: str) -> str:
        """Return the request subject of function ``name``: ``<prefix>.<escaped name>``."""
        return f"{self.prefix}.{escape_name(name)}"


def parse_nats_endpoint(endpoint: str) -> NatsEndpoint:
    """Parse and validate ``nats://host[:port]/<subject-prefix>``, raising ConfigurationError if it is not one.

    The prefix is one or more tokens separated by dots, each made of ASCII letters, digits, ``_`` and
    ``-``, at most ``MAX_PREFIX_LENGTH`` characters in all. Its first token may not be ``_INBOX``, where
    NATS clients receive their replies.
    """
    try:
        parts = urlsplit(endpoint)
        port = parts.port
    except ValueError as exc:
        raise ConfigurationError(f"endpoint {endpoint!r} is not a valid URL: {exc}") from None
    if parts.scheme != "nats":
        raise ConfigurationError(f"endpoint {endpoint!r} is not a NATS endpoint; use nats://host:port/<subject-prefix>")
    if not parts.hostname:
        raise ConfigurationError(f"endpoint {endpoint!r} has no host; use nats://host:port/<subject-prefix>")
    if parts.query or parts.fragment:
        raise ConfigurationError(
            f"endpoint {endpoint!r} has a query or fragment; use nats://host:port/<subject-prefix>"
        )
    prefix = parts.path[1:] if parts.path.startswith("/") else parts.path
    prefix = prefix[:-1] if prefix.endswith("/") else prefix
    check_prefix(prefix, endpoint)
    return NatsEndpoint(
        host=parts.hostname,
        port=port or DEFAULT_PORT,
        prefix=prefix,
        username=parts.username,
        password=parts.password,
    )


def check_prefix(prefix: str, endpoint: str) -> None:
    """Raise ConfigurationError unless ``prefix`` is a valid subject prefix (see :func:`parse_nats_endpoint`)."""
    if not prefix:
        raise ConfigurationError(
            f"endpoint {endpoint!r} has no subject prefix; use nats://host:port/<subject-prefix>, "
            "for example nats://127.0.0.1:4222/orders"
        )
    if len(prefix) > MAX_PREFIX_LENGTH:
        raise ConfigurationError(
            f"the subject prefix of endpoint {endpoint!r} is {len(prefix)} characters long; "
            f"the limit is {MAX_PREFIX_LENGTH}"
        )
    tokens = prefix.split(".")
    if not all(_TOKEN_RE.fullmatch(token) for token in tokens):
        raise ConfigurationError(
            f"the subject prefix {prefix[:MAX_PREFIX_LENGTH]!r} of endpoint {endpoint!r} is not valid: use tokens "
            "of ASCII letters, digits, '_' and '-', separated by single dots (no wildcards, spaces or '/')"
        )
    if tokens[0] in _RESERVED_FIRST_TOKENS:
        raise ConfigurationError(
            f"the subject prefix {prefix!r} of endpoint {endpoint!r} starts with {tokens[0]}, where NATS clients "
            "receive their replies; choose another prefix"
        )


def escape_name(name: str) -> str:
    """Return the subject token of a function name.

    ASCII letters, digits, ``_`` and ``-`` stand for themselves; every other byte of the name's UTF-8
    form becomes ``%XX`` (two uppercase hex digits). ``greet`` stays ``greet``, ``orders.create``
    becomes ``orders%2Ecreate`` and ``grüße`` becomes ``gr%C3%BC%C3%9Fe``.
    """
    if name.isascii() and _TOKEN_RE.fullmatch(name):
        return name
    return "".join(chr(byte) if byte in _SAFE else f"%{byte:02X}" for byte in name.encode("utf-8", "surrogatepass"))


def unescape_token(token: str) -> str:
    """Return the function name of a subject token, raising ValueError unless it is the canonical escaping."""
    if _TOKEN_RE.fullmatch(token):
        return token
    if not _ESCAPED_RE.fullmatch(token):
        raise ValueError("it contains characters other than ASCII letters, digits, '_', '-' and %XX escapes")
    raw = bytearray()
    index = 0
    while index < len(token):
        if token[index] == "%":
            raw.append(int(token[index + 1 : index + 3], 16))
            index += 3
        else:
            raw.append(ord(token[index]))
            index += 1
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("its escapes are not UTF-8") from None
    if escape_name(name) != token:
        raise ValueError(f"it is not the canonical escaping of the name; send {escape_name(name)[:200]!r}")
    return name


def header_block_size(headers: Mapping[str, str]) -> int:
    """Return the bytes that ``headers`` take in a NATS message, as nats-py writes them.

    nats-server counts them against its ``max_payload`` together with the body.
    """
    size = len(_NATS_HEADER_LINE) + 2
    for key, value in headers.items():
        key = key.strip()
        if key:
            size += len(key.encode()) + 2 + len(value.strip().translate(_HEADER_VALUE_NEWLINES).encode()) + 2
    return size


def message_size(headers: Mapping[str, str], payload: bytes, max_payload: int) -> int:
    """Return the bytes that ``headers`` and ``payload`` take in a NATS message, exactly if near ``max_payload``.

    Far below the limit it returns an upper bound, which costs a few ``len`` calls instead of encoding
    every header: UTF-8 takes at most 4 bytes per character, and each header line adds 4 bytes.
    """
    lengths = sum(map(len, headers)) + sum(map(len, headers.values()))
    bound = len(_NATS_HEADER_LINE) + 2 + len(payload) + 4 * (lengths + len(headers))
    return bound if bound <= max_payload else header_block_size(headers) + len(payload)


def split_server_urls(url: str) -> list[str]:
    """Split a comma-separated list of NATS server URLs, raising ConfigurationError on an invalid one.

    A URL without a scheme is taken as ``nats://``; the port defaults to 4222.
    """
    servers = [item.strip() for item in url.split(",") if item.strip()]
    if not servers:
        raise ConfigurationError(
            "the NATS URL is empty; set PIKKU_NATS_URL or pass a URL such as nats://127.0.0.1:4222"
        )
    for server in servers:
        try:
            parts = urlsplit(server if "://" in server else "nats://" + server)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number from 0 to 65535
        except ValueError as exc:
            raise ConfigurationError(f"the NATS URL {_redacted(server)!r} is not valid: {exc}") from None
        if parts.scheme not in _SERVER_SCHEMES or not parts.hostname:
            raise ConfigurationError(
                f"the NATS URL {_redacted(server)!r} is not valid; use nats://[user:password@]host:port "
                "(or tls://, ws://, wss://)"
            )
    return servers


def server_addresses(url: str) -> str:
    """Return the ``host:port`` of each server in a NATS URL list, without credentials, for messages."""
    addresses = []
    for item in url.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            parts = urlsplit(item if "://" in item else "nats://" + item)
            port = parts.port or DEFAULT_PORT
        except ValueError:
            addresses.append("<invalid URL>")
            continue
        addresses.append(f"{_bracketed(parts.hostname or '?')}:{port}")
    return ", ".join(addresses) or "<no server>"


def _redacted(url: str) -> str:
    if "@" not in url:
        return url
    scheme, separator, rest = url.partition("://")
    host = rest.rpartition("@")[2] if separator else url.rpartition("@")[2]
    return f"{scheme}://***@{host}" if separator else f"***@{host}"


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
