"""Lenient reading of AMQP content headers, for the connections that pikku_mq opens.

RabbitMQ passes message properties on as the publisher wrote them. It does not check that short
strings (the content type, a correlation id, the keys of the headers table) are UTF-8, that a
timestamp is within range, or how deeply header tables nest. pamqp (4.0) raises on such a content
header, and aiormq (7.2) then closes the whole connection. So anyone who may publish to a worker's
queue could make the worker drop its connection, and with it its exclusive queue and every request
waiting there, with one message.

Inside :func:`lenient_frames`, the connections opened read a content header that fails to decode as
one with the same body size whose properties are the ones that decode, and a
:class:`DamagedProperties` that lists the others. The worker replies 400 to such a request when its
``reply_to`` is readable. Connections opened elsewhere in the process keep pamqp's behaviour.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Iterator
from contextvars import ContextVar

import pamqp.frame
from pamqp import constants, decode
from pamqp.commands import Basic
from pamqp.header import ContentHeader

__all__ = ["DamagedProperties", "install", "lenient_frames"]

_LENIENT: ContextVar[bool] = ContextVar("pikku_mq_lenient_amqp_frames", default=False)
_unmarshal = pamqp.frame.unmarshal

_FIXED_SIZES = {"octet": 1, "timestamp": 8}
_LENGTH_PREFIXES = {"shortstr": ">B", "table": ">I"}


class DamagedProperties(Basic.Properties):
    """Message properties read from a content header that pamqp failed to decode.

    ``undecodable`` names the properties that did not decode, which are None here.
    """

    def __init__(self, undecodable: list[str]) -> None:
        super().__init__()
        self.undecodable = undecodable


@contextlib.contextmanager
def lenient_frames() -> Iterator[None]:
    """Read damaged content headers leniently on the AMQP connections opened inside this block.

    aiormq reads frames in a task that the connection creates as it opens, and that task keeps the
    context of its creation, so the setting lasts for the connection's lifetime.
    """
    token = _LENIENT.set(True)
    try:
        yield
    finally:
        _LENIENT.reset(token)


def install() -> None:
    """Route pamqp's frame decoding through :func:`_unmarshal_leniently`; calling it again does nothing."""
    # NOTE: aiormq calls pamqp.frame.unmarshal through the module, so this replaces it for the whole
    # process. The replacement changes nothing outside lenient_frames().
    pamqp.frame.unmarshal = _unmarshal_leniently


def _unmarshal_leniently(data_in: bytes) -> tuple[int, int, pamqp.frame.FrameTypes]:
    try:
        return _unmarshal(data_in)
    except Exception:
        # pamqp wraps a UnicodeDecodeError, but lets OverflowError and RecursionError through.
        if not _LENIENT.get() or data_in[:1] != bytes([constants.FRAME_HEADER]):
            raise
        damaged = _damaged_header(data_in)
        if damaged is None:
            raise
        return damaged


def _damaged_header(data: bytes) -> tuple[int, int, ContentHeader] | None:
    """Return a content header frame rebuilt from what decodes, or None if its framing is broken too."""
    header_size = constants.FRAME_HEADER_SIZE
    if len(data) < header_size:
        return None
    _, channel, size = struct.unpack_from(">BHI", data)
    end = header_size + size
    if len(data) <= end or data[end] != constants.FRAME_END or size < 14:
        return None
    _, _, body_size = struct.unpack_from(">HHQ", data, header_size)
    properties = _decode_properties(data[header_size + 12 : end])
    return end + 1, channel, ContentHeader(body_size=body_size, properties=properties)


def _decode_properties(data: bytes) -> DamagedProperties:
    """Decode each property on its own, so that one that fails leaves the others readable."""
    flags, offset = _property_flags(data)
    names = [name for name in Basic.Properties.__slots__ if flags & Basic.Properties.flags[name]]
    properties = DamagedProperties([])
    for index, name in enumerate(names):
        kind = Basic.Properties.amqp_type(name)
        size = _field_size(kind, data, offset)
        if size is None:
            # Truncated: the properties from here on cannot be located.
            properties.undecodable += names[index:]
            break
        try:
            _, value = decode.by_type(data[offset : offset + size], kind)
        except (ValueError, OverflowError, RecursionError, struct.error):
            properties.undecodable.append(name)
        else:
            setattr(properties, name, value)
        offset += size
    return properties


def _property_flags(data: bytes) -> tuple[int, int]:
    """Return the property flags and the offset of the first property; Basic uses the first flag word only."""
    flags, offset = 0, 0
    while offset + 2 <= len(data):
        word = struct.unpack_from(">H", data, offset)[0]
        flags = flags or word
        offset += 2
        if not word & 1:
            break
    return flags, offset


def _field_size(kind: str, data: bytes, offset: int) -> int | None:
    """Return how many bytes the property of ``kind`` at ``offset`` takes, or None if it runs past the end."""
    if kind in _FIXED_SIZES:
        size = _FIXED_SIZES[kind]
    else:
        prefix = _LENGTH_PREFIXES[kind]
        width = struct.calcsize(prefix)
        if offset + width > len(data):
            return None
        size = width + struct.unpack_from(prefix, data, offset)[0]
    return size if offset + size <= len(data) else None
