"""Hostile inputs for the remote surfaces, generated with hypothesis, and the rules their replies must meet.

The strategies here build the parts that every surface shares. They are the data of a call and the
body that carries it: valid, truncated, nested too deep, random bytes, oversized, or msgpack with huge
declared lengths or extension types. They are also the metadata header values (absurd deadlines and
hop counts) and the ``authorization`` header, mostly with a valid token, so that an input gets past
the token check. ``test_fuzz_surfaces.py`` puts them together into HTTP requests, NATS messages and
AMQP messages.

A run is reproducible: hypothesis runs with ``derandomize=True`` and no example database, so the same
code generates the same inputs on every machine.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import time
import warnings
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import jwt
import msgpack
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisWarning

from pikku_mq import RemoteSecurity
from pikku_mq._security import data_digest

SECRET = "fuzz-secret-" + "0123456789abcdef" * 3
"""The remote secret of the fuzzed worker. The tests sign most inputs with it."""

WRONG_SECRET = "another-secret-" + "fedcba9876543210" * 3

INPUTS_PER_SURFACE = 10_000
"""Inputs sent to each surface in one run. About one in seven is valid in every part, the others have
one to three hostile parts."""

VALID_CALL_EVERY = 100
"""A valid call follows every this many generated inputs, and must succeed."""

RSS_GROWTH_LIMIT_KIB = 16 * 1024
"""How much the worker's resident memory may grow over a run, in KiB: about twice the most measured.
Part of the growth is the worker's replay cache, which keeps the id of each signed input's token for
five minutes, about 200 bytes each."""

FUNCTIONS = ("echo", "greet", "measure", "orders.create", "grüße", "nap", "reject", "whoami")
"""The exposed functions of tests/apps/fuzz_worker.py."""

HIDDEN = "hidden"
MAX_HOPS = 16
MAX_NAP_MS = 200
DEADLINE_TOLERANCE_MS = 2.0
"""How much earlier than its deadline a worker may time a call out: its timers fire on whole milliseconds."""

MAX_NESTING = 200
"""Levels of arrays and objects a worker accepts in a body (more are rejected with 400)."""

T = TypeVar("T")


# -- data ------------------------------------------------------------------------------------------
# Strategies are built once, at import. A strategy built inside a composite is validated again, with
# everything it contains, on every draw, which made generation about ten times slower.

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)

JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
"""Any JSON value that msgpack can carry too (integers within 64 bits)."""

_SHAPED_DATA: dict[str, st.SearchStrategy[Any]] = {
    "greet": st.fixed_dictionaries({"name": st.text(max_size=30)}),
    "measure": st.fixed_dictionaries(
        {"words": st.lists(st.text(max_size=10), max_size=8)},
        optional={"limit": st.integers(min_value=-5, max_value=2000), "tag": st.none() | st.text(max_size=10)},
    ),
    "nap": st.fixed_dictionaries({"ms": st.integers(min_value=-1, max_value=MAX_NAP_MS + 1)}),
}
FUNCTION_DATA = {name: st.one_of(shape, shape, JSON_VALUES) for name, shape in _SHAPED_DATA.items()}
"""Data for the functions with a typed input: mostly of that type, sometimes anything at all."""


def function_data(name: str) -> st.SearchStrategy[Any]:
    return FUNCTION_DATA.get(name, JSON_VALUES)


VALID_NAMES = st.sampled_from(FUNCTIONS)
HOSTILE_NAMES = st.one_of(
    st.text(max_size=40),
    st.just(HIDDEN),
    st.sampled_from([f.upper() for f in FUNCTIONS] + ["", ".", "..", "echo ", " echo", "echo\x00", "echo.x"]),
    st.text(max_size=600).map(lambda text: text * 8),
)
"""A hidden or missing function, an odd name, or any text (up to a few thousand characters)."""


def function_names(hostile: bool) -> st.SearchStrategy[str]:
    return HOSTILE_NAMES if hostile else VALID_NAMES


# -- bodies ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Body:
    """A request body, how it was made, and the data it carries when it is valid."""

    kind: str
    """How it was made: ``valid``, ``truncated``, ``deep``, ``huge-length``... for the report."""
    raw: bytes
    data: Any = None
    """The data the worker decodes, when the body is valid."""
    valid: bool = False


def encode(value: Any, binary: bool) -> bytes:
    if binary:
        packed: bytes = msgpack.packb(value)
        return packed
    return json.dumps(value, ensure_ascii=False).encode()


# hypothesis often tries the first option of a choice, so each list starts with a kind worth trying often.
_JSON_BODY_KINDS = st.sampled_from(
    [
        "truncated",
        "random-bytes",
        "deep",
        "special",
        "special",
        "extra-field",
        "not-an-object",
        "empty-object",
        "empty",
        "oversized",
    ]
)
_MSGPACK_BODY_KINDS = st.sampled_from(
    [
        "truncated",
        "huge-length",
        "deep",
        "extension",
        "odd-keys",
        "random-bytes",
        "extra-field",
        "not-an-object",
        "empty-object",
        "empty",
        "oversized",
    ]
)
_DEPTHS = st.integers(min_value=MAX_NESTING - 5, max_value=MAX_NESTING + 5) | st.integers(1, 200_000)
_LENGTH_KINDS = st.sampled_from(["str", "bin", "array", "map", "ext"])
_HUGE_LENGTHS = st.integers(min_value=2**20, max_value=2**32 - 1)
_EXTENSION_CODES = st.just(-1) | st.integers(min_value=-128, max_value=127)
_EXTENSION_DATA = st.binary(max_size=20) | st.sampled_from([b"\x00" * 4, b"\xff" * 8, b"\x00" * 12])
_ODD_KEYS = st.sampled_from([b"\x01", b"\xc0", b"\xcb" + b"\x00" * 8, b"\xc4\x01k", b"\x91\x01", b"\xd4\x01\x00"])
_SPECIAL_JSON = st.sampled_from(
    [
        b"NaN",
        b"Infinity",
        b"-Infinity",
        b"1e999",
        b"-1e999",
        b"1" * 5000,
        b"1" * 4000,
        b'"\\ud800"',
        b'"\\udfff\\ud800"',
        b'"\xff\xfe"',
        b'"\xed\xa0\x80"',
        b"\xef\xbb\xbf1",
        b"1 // comment",
        b"[1,]",
        b"01",
        b"true false",
        b'"\\u0000"',
        b'{"a":1,"a":2}',
    ]
)


@st.composite
def bodies(draw: st.DrawFn, name: str, binary: bool, max_body_size: int, hostile: bool) -> Body:
    """A body for a call of ``name`` in JSON (``binary`` false) or msgpack, valid or else broken in one way."""
    data = draw(function_data(name))
    valid = encode({"data": data}, binary)
    if not hostile:
        return Body("valid", valid, data, valid=True)

    kind = draw(_MSGPACK_BODY_KINDS if binary else _JSON_BODY_KINDS)
    if kind == "empty-object":
        return Body(kind, encode({}, binary), None, valid=True)
    if kind == "extra-field":
        return Body(kind, encode({"data": data, draw(st.text(max_size=8)): 1}, binary))
    if kind == "not-an-object":
        return Body(kind, encode(data, binary))
    if kind == "truncated":
        return Body(kind, valid[: draw(st.integers(min_value=0, max_value=max(0, len(valid) - 1)))])
    if kind == "random-bytes":
        return Body(kind, draw(st.binary(max_size=300)))
    if kind == "deep":
        return Body(kind, _deep_body(draw, binary))
    if kind == "empty":
        return Body(kind, b"")
    if kind == "oversized":
        return Body(kind, _oversized_body(draw, binary, max_body_size))
    if kind == "huge-length":
        return Body(
            kind,
            b"\x81\xa4data" + _length_header(draw(_LENGTH_KINDS), draw(_HUGE_LENGTHS)) + draw(st.binary(max_size=40)),
        )
    if kind == "extension":
        return Body(kind, b"\x81\xa4data" + _extension(draw(_EXTENSION_CODES), draw(_EXTENSION_DATA)))
    if kind == "odd-keys":
        return Body(kind, _odd_keys_body(draw(_ODD_KEYS), draw(st.booleans())))
    return Body(kind, b'{"data":' + draw(_SPECIAL_JSON) + b"}")


def _deep_body(draw: st.DrawFn, binary: bool) -> bytes:
    """Arrays or maps nested around the limit or far beyond it, closed or cut off at the deepest level."""
    depth, closed, use_maps = draw(_DEPTHS), draw(st.booleans()), draw(st.booleans())
    if binary:
        opener = b"\x81\xa1k" if use_maps else b"\x91"
        return b"\x81\xa4data" + opener * depth + (b"\xc0" if closed else b"")
    opener, closer = (b'{"k":', b"}") if use_maps else (b"[", b"]")
    return b'{"data":' + opener * depth + (b"null" + closer * depth + b"}" if closed else b"")


def _oversized_body(draw: st.DrawFn, binary: bool, max_body_size: int) -> bytes:
    size = draw(st.integers(min_value=max_body_size + 1, max_value=max_body_size * 2))
    if draw(st.booleans()):
        return random.Random(draw(st.integers(0, 2**32))).randbytes(size)
    return encode({"data": "x" * size}, binary)


def _length_header(kind: str, length: int) -> bytes:
    """Return the msgpack header of a str, bin, array, map or ext value that declares ``length``."""
    if kind == "ext":
        return b"\xc9" + struct.pack(">I", length) + b"\x05"
    markers = {"str": b"\xdb", "bin": b"\xc6", "array": b"\xdd", "map": b"\xdf"}
    return markers[kind] + struct.pack(">I", length)


def _extension(code: int, payload: bytes) -> bytes:
    """Return a msgpack extension value; ``msgpack.ExtType`` takes no negative (reserved) type code."""
    fixed = {1: b"\xd4", 2: b"\xd5", 4: b"\xd6", 8: b"\xd7", 16: b"\xd8"}
    header = fixed.get(len(payload), b"\xc7" + bytes([len(payload)]))
    return header + struct.pack(">b", code) + payload


def _odd_keys_body(key: bytes, nested: bool) -> bytes:
    """A map with a key that is not a string, as the data or beside ``data``."""
    if nested:
        return b"\x81\xa4data\x81" + key + b"\x01"
    return b"\x82\xa4data\xc0" + key + b"\x01"


# -- metadata headers ------------------------------------------------------------------------------

VALID_DEADLINES = st.one_of(
    st.none(),
    st.integers(min_value=1000, max_value=60_000).map(str),
    st.integers(min_value=1, max_value=30).map(str),
    st.integers(min_value=10**12, max_value=10**18 - 1).map(str),
)
"""``pikku-deadline-ms`` values a worker accepts: absent, usual, tiny enough to run out, and huge."""

HOSTILE_DEADLINES = st.one_of(
    st.sampled_from(["0", "-5", "1.5", "1e3", "+5", "-0", "0x10", "\u00b2", "1_000", "nan", "inf", " ", "0" * 19]),
    st.integers(min_value=10**18, max_value=10**40).map(str),
    st.integers(max_value=0).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.text(max_size=12),
)

VALID_HOPS = st.none() | st.integers(min_value=1, max_value=MAX_HOPS).map(str)
HOSTILE_HOPS = st.one_of(
    st.integers(min_value=MAX_HOPS + 1, max_value=999_999).map(str),
    st.sampled_from(["0", "", "1.0", "+1", "one", "\u00b9", "1e1", "-1"]),
    st.integers(min_value=10**6, max_value=10**30).map(str),
    st.integers(max_value=0).map(str),
    st.text(max_size=8),
)
"""``pikku-hop`` values over the limit (a loop, 508 by design) or malformed (400)."""


def deadline_values(hostile: bool) -> st.SearchStrategy[str | None]:
    return HOSTILE_DEADLINES if hostile else VALID_DEADLINES


def hop_values(hostile: bool) -> st.SearchStrategy[str | None]:
    return HOSTILE_HOPS if hostile else VALID_HOPS


def positive_integer(value: Any, max_digits: int) -> int | None:
    """Return the value of a header that a worker may read as a positive integer, else None.

    Surrounding whitespace of any kind is stripped, as the transports' header parsers may strip it.
    """
    text = str(value).strip() if value is not None else ""
    if text.isascii() and text.isdigit() and len(text) <= max_digits and int(text) > 0:
        return int(text)
    return None


# -- tokens ----------------------------------------------------------------------------------------

SECURITY = RemoteSecurity(SECRET)
WRONG_SECURITY = RemoteSecurity(WRONG_SECRET)


_VALID_TOKEN_KINDS = st.sampled_from(["signed", "pikku-style", "session", "signed"])
_HOSTILE_TOKEN_KINDS = st.sampled_from(
    ["other-data", "absent", "wrong-secret", "expired", "other-function", "garbage", "scheme", "empty", "too-long"]
)
_SESSIONS = st.recursive(
    JSON_SCALARS, lambda children: st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=4
)


@st.composite
def authorizations(draw: st.DrawFn, name: str, body: Body, hostile: bool) -> str | None:
    """An ``authorization`` value for a call of ``name`` with ``body``: valid, or else broken in one way."""
    kind = draw(_HOSTILE_TOKEN_KINDS if hostile else _VALID_TOKEN_KINDS)
    digest = _digest(body.data) if body.valid else None
    if kind == "signed":
        return "Bearer " + SECURITY.create_token(name, digest=digest)
    if kind == "pikku-style":
        now = int(time.time())
        claims = {"aud": "pikku-remote", "fn": name, "iat": now, "exp": now + 300}
        return "Bearer " + jwt.encode(claims, SECRET.encode(), algorithm="HS256")
    if kind == "session":
        blob = SECURITY.seal_session(draw(_SESSIONS))
        return "Bearer " + SECURITY.create_token(name, session_blob=blob, digest=digest)
    if kind == "absent":
        return None
    if kind == "wrong-secret":
        return "Bearer " + WRONG_SECURITY.create_token(name, digest=digest)
    if kind == "expired":
        return "Bearer " + SECURITY.create_token(name, digest=digest, now=time.time() - 3600)
    if kind == "other-function":
        return "Bearer " + SECURITY.create_token(name + "x", digest=digest)
    if kind == "other-data":
        return "Bearer " + SECURITY.create_token(name, digest=_digest(["other"]))
    if kind == "garbage":
        return draw(st.text(max_size=80))
    if kind == "scheme":
        return "Basic " + SECURITY.create_token(name, digest=digest)
    if kind == "empty":
        return "Bearer "
    return "Bearer " + "a" * draw(st.integers(min_value=64 * 1024 - 10, max_value=64 * 1024 + 10))


_ASPECT_COUNTS = st.sampled_from([1, 1, 1, 2, 2, 3, 0])


@st.composite
def hostile_aspects(draw: st.DrawFn, aspects: st.SearchStrategy[str]) -> frozenset[str]:
    """The parts of an input to make hostile: none for about one input in seven, else one to three.

    Keeping the other parts valid lets each hostile part reach the code that checks it, instead of
    being rejected for another one first.
    """
    return frozenset(draw(aspects) for _ in range(draw(_ASPECT_COUNTS)))


def _digest(data: Any) -> str | None:
    try:
        return data_digest(data)
    except (ValueError, TypeError):
        return None


def valid_token(name: str, data: Any) -> str:
    return "Bearer " + SECURITY.create_token(name, digest=data_digest(data))


# -- judging replies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metadata:
    """The metadata header values an input carried, every copy of each, for judging its reply."""

    deadlines: tuple[Any, ...] = ()
    hops: tuple[Any, ...] = ()


def status_problem(status: int, metadata: Metadata, elapsed: float) -> str | None:
    """Return why a reply status breaks the rules for an input, or None if it is acceptable.

    Every status under 500 is acceptable: the input is the caller's mistake, or it was valid. Two 5xx
    replies are by design, for exactly these inputs: 508 ``LoopDetectedError`` when a ``pikku-hop``
    above the limit came with it, and 504 ``DeadlineExceededError`` when it carried a valid deadline
    and the reply came no earlier than that deadline.
    """
    if status < 500:
        return None
    hops = [positive_integer(value, 6) for value in metadata.hops]
    if status == 508 and any(hop is not None and hop > MAX_HOPS for hop in hops):
        return None
    deadlines = [positive_integer(value, 18) for value in metadata.deadlines]
    elapsed_ms = elapsed * 1000 + DEADLINE_TOLERANCE_MS
    if status == 504 and any(deadline is not None and elapsed_ms >= deadline for deadline in deadlines):
        return None
    return f"status {status} is a server error for an input that is the caller's mistake"


def envelope_problem(body: Any) -> str | None:
    """Return why an error reply's body is not a pikku_mq error envelope, or None if it is one."""
    if not isinstance(body, dict):
        return f"the error reply is not an envelope: {body!r:.200}"
    if not isinstance(body.get("name"), str) or not isinstance(body.get("message"), str):
        return f"the error envelope has no name or message: {body!r:.200}"
    return None


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Tally:
    """What one surface's run sent and got back, for its assertions and its printed report.

    An outcome is a reply status (the worker replied), ``delivered, ...`` (the worker received the input
    but had no reply subject or queue that leads to the fuzzer), or what else happened to the input.
    """

    surface: str
    sent: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    kinds: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    """Other counts of the run, such as the connections the fuzzer had to open again."""
    valid_calls: int = 0
    rss_kib: list[tuple[str, int]] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def record(self, outcome: str, kind: str) -> None:
        self.sent += 1
        self.outcomes[outcome] += 1
        self.kinds[kind] += 1

    def answered(self) -> Counter[str]:
        return Counter({outcome: count for outcome, count in self.outcomes.items() if outcome.isdigit()})

    def report(self) -> str:
        seconds = time.monotonic() - self.started
        answered = self.answered()
        others = self.outcomes - answered
        lines = [
            f"{self.surface}: {self.sent} generated inputs in {seconds:.0f} s, "
            f"{self.valid_calls} valid calls interleaved",
            f"  answered by the worker: {answered.total()} ({_counts(answered)})",
            f"  not answered: {others.total()} ({_counts(others)})",
            f"  bodies: {_counts(self.kinds)}",
            "  worker RSS: " + ", ".join(f"{label} {kib / 1024:.1f} MiB" for label, kib in self.rss_kib),
        ]
        if self.notes:
            lines.append(f"  notes: {_counts(self.notes)}")
        return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{key}: {count}" for key, count in sorted(counter.items()))


def rss_kib(pid: int) -> int:
    """Return the resident set size of process ``pid`` in KiB, from /proc/PID/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"/proc/{pid}/status has no VmRSS line")


def run_examples(strategy: st.SearchStrategy[T], send: Callable[[T], None], inputs: int) -> None:
    """Draw ``inputs`` inputs from ``strategy`` with hypothesis and pass each to ``send``.

    Reproducible (``derandomize``, no example database) and without shrinking, so a failure reports
    the input that caused it at once, and a broken worker cannot keep the run busy.
    """

    @settings(
        max_examples=inputs,
        derandomize=True,
        database=None,
        deadline=None,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(strategy)
    def run(case: T) -> None:
        send(case)

    # When an input fails, hypothesis runs it again to report it and warns that the repr of a large
    # input is long. pytest turns that warning into an error, which then hides the real failure.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HypothesisWarning)
        run()


async def run_in_thread(
    strategy: st.SearchStrategy[T], exchange: Callable[[T], Coroutine[Any, Any, None]], inputs: int, timeout: float
) -> None:
    """Run hypothesis in a thread and each exchange on this event loop, where the test's clients live."""
    loop = asyncio.get_running_loop()

    def send(case: T) -> None:
        future = asyncio.run_coroutine_threadsafe(exchange(case), loop)
        try:
            future.result(timeout=timeout)
        except AssertionError:
            raise
        except Exception as exc:
            future.cancel()
            # An exception from the exchange itself (a timeout, a lost connection) names no input otherwise.
            raise AssertionError(f"sending an input failed with {exc!r}: {case!r:.2000}") from exc

    await asyncio.to_thread(run_examples, strategy, send, inputs)
