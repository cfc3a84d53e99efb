"""The NATS client's cache of parsed header names, past its bound and with names that nats-py changes."""

from __future__ import annotations

from test_nats_transport import _nats_py_headers

from pikku_mq.transports.nats import _MAX_HEADER_NAMES, _Client

ODD_NAMES = [b"Pikku-Status", b"PIKKU-STATUS", b" pikku-status", b"pikku-status\t", b"n\xc3\xa4me", b"a b", b"\x0bx"]


async def test_header_cache_past_bound_matches_nats_py() -> None:
    client = _Client()
    names = [b"x-name-%d" % i for i in range(3 * _MAX_HEADER_NAMES)] + ODD_NAMES

    for round_number in range(2):  # the second round reads names that the first put in the cache
        for index, name in enumerate(names):
            block = b"NATS/1.0\r\n%s: v%d\r\npikku-status: 200\r\n\r\n" % (name, index + round_number)
            parsed = await client._process_headers(block)
            assert parsed == await _nats_py_headers(block), block
