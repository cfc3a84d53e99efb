"""The vhosts of the tests on the shared RabbitMQ at 127.0.0.1:5672, created and deleted with rabbitmqctl.

Tests never use the default vhost. A session gets a vhost of its own, ``SESSION_VHOST``, which the
``amqp_vhost`` fixture creates and deletes at the end with everything in it. A test that closes
connections takes another vhost of its own, so it closes only its own connections. The tests never
stop or restart the node itself.
"""

from __future__ import annotations

import struct
import subprocess
import uuid

from pamqp.commands import Basic

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
"""The broker URL of the tests: RabbitMQ's local default user."""

SESSION_VHOST = f"pikku_t_{uuid.uuid4().hex[:12]}"

RABBITMQCTL_TIMEOUT = 60.0
"""Seconds that one rabbitmqctl command may take. Each command starts an Erlang VM."""


def rabbitmqctl(*args: str) -> str:
    """Run ``rabbitmqctl -q ARGS`` and return its output, or fail the test with its stderr."""
    completed = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=RABBITMQCTL_TIMEOUT, check=False
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"rabbitmqctl {' '.join(args)} exited with {completed.returncode}. Check that RabbitMQ runs on "
            f"127.0.0.1:5672 (scripts/ensure-services starts it).\n{completed.stderr or completed.stdout}"
        )
    return completed.stdout


def new_vhost() -> str:
    """Return a fresh vhost name of the tests (it is not created)."""
    return f"pikku_t_{uuid.uuid4().hex[:12]}"


def create_vhost(vhost: str) -> None:
    """Create ``vhost`` and give the guest user every permission on it."""
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")


def delete_vhost(vhost: str) -> None:
    """Delete ``vhost``, which deletes its queues and closes its connections."""
    rabbitmqctl("delete_vhost", vhost)


def amqp_endpoint(vhost: str = SESSION_VHOST, queue: str | None = None) -> str:
    """Return an endpoint in ``vhost`` with a queue of its own, unless ``queue`` is given."""
    return f"amqp://127.0.0.1:5672/{vhost}?queue={queue or 'pikku-t-' + uuid.uuid4().hex[:12]}"


def vhost_connections(vhost: str, name_contains: str = "") -> list[str]:
    """Return the Erlang pids of the connections to ``vhost`` whose client properties contain ``name_contains``.

    pikku_mq names its connections in the ``connection_name`` client property ("pikku-mq worker <id>",
    "pikku-mq caller"), so a test can pick the worker's or the caller's.
    """
    pids = []
    output = rabbitmqctl("--no-table-headers", "list_connections", "pid", "vhost", "client_properties")
    for line in output.splitlines():
        fields = line.split("\t")
        if len(fields) >= 3 and fields[1] == vhost and name_contains in fields[2]:
            pids.append(fields[0])
    return pids


def vhost_heartbeats(vhost: str) -> list[int]:
    """Return the heartbeat timeout, in seconds, that each connection to ``vhost`` negotiated."""
    output = rabbitmqctl("--no-table-headers", "list_connections", "vhost", "timeout")
    return [int(fields[1]) for fields in (line.split("\t") for line in output.splitlines()) if fields[0] == vhost]


def close_vhost_connections(vhost: str, name_contains: str = "") -> int:
    """Close the connections to ``vhost`` whose client properties contain ``name_contains``, and return how many."""
    pids = vhost_connections(vhost, name_contains)
    for pid in pids:
        rabbitmqctl("close_connection", pid, "pikku_mq test: broker restart drill")
    return len(pids)


# -- raw messages ----------------------------------------------------------------------------------

REPLY_TO = "amq.rabbitmq.reply-to"


class RawProperties(Basic.Properties):
    """Message properties sent as the given bytes, whatever they contain: aiormq encodes them with ``marshal``."""

    def __init__(self, raw: bytes) -> None:
        # aiormq adds a message id to properties that have none. This one is never encoded.
        super().__init__(message_id="raw")
        self.raw = raw

    def marshal(self) -> bytes:
        return self.raw


def short_string(raw: bytes) -> bytes:
    """Encode an AMQP short string from any bytes."""
    return bytes([len(raw)]) + raw


def field_table(entries: list[bytes]) -> bytes:
    """Encode an AMQP field table from entries already encoded as name, type byte and value."""
    content = b"".join(entries)
    return struct.pack(">I", len(content)) + content


def long_string_entry(name: bytes, value: bytes) -> bytes:
    """Encode a field table entry whose value is a long string of any bytes."""
    return short_string(name) + b"S" + struct.pack(">I", len(value)) + value


def nested_table(depth: int) -> bytes:
    """Encode a field table value nested ``depth`` tables deep."""
    value = b"V"
    for _ in range(depth):
        value = b"F" + field_table([short_string(b"k") + value])
    return value


def raw_properties(
    *, content_type: bytes = b"application/msgpack", table: bytes, correlation_id: bytes, reply_to: bytes = b""
) -> bytes:
    """Encode message properties with a content type, headers, a correlation id and a reply-to, from bytes."""
    flags = Basic.Properties.flags
    fields = [
        (flags["content_type"], short_string(content_type)),
        (flags["headers"], table),
        (flags["delivery_mode"], b"\x01"),
        (flags["correlation_id"], short_string(correlation_id)),
        (flags["reply_to"], short_string(reply_to or REPLY_TO.encode())),
    ]
    return struct.pack(">H", sum(flag for flag, _ in fields)) + b"".join(value for _, value in fields)
