"""De-duplication of retried calls to idempotent functions, by call id, within one worker process.

A caller sends the same ``pikku-call-id`` on every attempt of one logical call. When an attempt's
reply is lost (the caller's timeout fired, the connection broke) and the caller retries, the retry
may reach a worker that already ran the call. For a function declared ``idempotent=True``, the worker
keeps what each call id produced, so the retry gets the first attempt's reply and the function's side
effects happen once:

- a retry that arrives while the first attempt still runs waits for its reply, within the retry's
  own deadline;
- a retry that arrives after the first attempt finished gets the recorded reply, for
  ``window`` seconds after it finished.

Recorded are results and the errors that another attempt would get again (``retryable`` false).
A call that did not finish (its deadline passed on the worker, the worker stopped under it) or that
failed with a retryable error is not recorded, so a retry runs the function again, which an
idempotent function allows.

The records are bounded by count and by the size of their encoded replies. Past either bound the
oldest records are dropped first, and a retry of a dropped call runs the function again. The calls
still running are not counted: the dispatcher's ``max_in_flight`` bounds them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Final

import pydantic_core

from ._errors import BadRequestError, CallInterruptedError, DeadlineExceededError

if TYPE_CHECKING:
    from ._dispatch import Outcome

__all__ = [
    "DEFAULT_DEDUP_MAX_BYTES",
    "DEFAULT_DEDUP_MAX_ENTRIES",
    "DEFAULT_DEDUP_WINDOW",
    "MAX_CALL_ID_LENGTH",
    "CallRecords",
    "Claim",
]

DEFAULT_DEDUP_WINDOW = 60.0
"""Seconds a finished call's reply is kept for retries: twice the default call deadline of 30 s."""

DEFAULT_DEDUP_MAX_ENTRIES = 10_000
"""Finished calls kept at most; the oldest are dropped first."""

DEFAULT_DEDUP_MAX_BYTES = 64 * 1024 * 1024
"""Bytes of encoded replies kept at most; the oldest are dropped first, and a larger reply is not kept."""

MAX_CALL_ID_LENGTH = 200
"""Characters a ``pikku-call-id`` may have. pikku_mq sends 32 hexadecimal digits."""

_RECORD_OVERHEAD = 200
"""Bytes counted for each record besides its encoded reply and its fingerprint: the key and the bookkeeping."""


class Claim:
    """A running call, which later attempts with the same call id wait for."""

    __slots__ = ("_future", "_outcome", "_settled", "fingerprint", "key")

    def __init__(self, key: tuple[str, str], fingerprint: bytes) -> None:
        self.key = key
        self.fingerprint = fingerprint
        # The first attempt that waits makes the future, so a call that no attempt waits for makes none.
        self._future: asyncio.Future[Outcome] | None = None
        self._settled = False
        self._outcome: Outcome | None = None

    @property
    def future(self) -> asyncio.Future[Outcome]:
        """The future that waiting attempts await: the outcome, or cancelled if the call ended without one."""
        future = self._future
        if future is None:
            future = self._future = asyncio.get_running_loop().create_future()
            if self._settled:
                _resolve(future, self._outcome)
        return future

    def settle(self, outcome: Outcome | None) -> None:
        """Wake the waiting attempts with ``outcome`` (None if the call ended without one); only the first counts."""
        if self._settled:
            return
        self._settled = True
        self._outcome = outcome
        if self._future is not None:
            _resolve(self._future, outcome)


def _resolve(future: asyncio.Future[Outcome], outcome: Outcome | None) -> None:
    if future.done():
        return
    if outcome is None:
        future.cancel()
    else:
        future.set_result(outcome)


_Record = tuple[bytes, "Outcome", int, float]
"""A finished call: the fingerprint of its data, its outcome, the bytes counted for it and when it finished."""

_FINGERPRINT: Final = 0
_OUTCOME: Final = 1
_SIZE: Final = 2
_FINISHED_AT: Final = 3


class CallRecords:
    """The calls to idempotent functions that one dispatcher runs or ran lately, by function name and call id."""

    def __init__(
        self,
        *,
        window: float = DEFAULT_DEDUP_WINDOW,
        max_entries: int = DEFAULT_DEDUP_MAX_ENTRIES,
        max_bytes: int = DEFAULT_DEDUP_MAX_BYTES,
    ) -> None:
        self.window = window
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size = 0
        """Bytes counted for the finished records."""
        self._running: dict[tuple[str, str], Claim] = {}
        self._finished: OrderedDict[tuple[str, str], _Record] = OrderedDict()
        """Finished calls, oldest first."""
        self._oldest_at = float("inf")
        """The finish time of the oldest record, or an earlier one. :meth:`_expire` scans only once it expired."""

    def __len__(self) -> int:
        return len(self._finished)

    def find(self, key: tuple[str, str], fingerprint: bytes) -> Claim | Outcome | None:
        """Return the running call or the recorded reply for ``key``, or None if there is neither.

        Raise :class:`BadRequestError` if the call id was used for other data or another session.
        """
        self._expire()
        claim = self._running.get(key)
        if claim is not None:
            _check_fingerprint(key, claim.fingerprint, fingerprint)
            return claim
        record = self._finished.get(key)
        if record is None:
            return None
        _check_fingerprint(key, record[_FINGERPRINT], fingerprint)
        return record[_OUTCOME]

    def claim(self, key: tuple[str, str], fingerprint: bytes) -> Claim:
        """Register a call that starts now, which later attempts will wait for."""
        claim = Claim(key, fingerprint)
        self._running[key] = claim
        return claim

    def settle(self, claim: Claim, outcome: Outcome | None) -> None:
        """Record how a claimed call ended, and wake the attempts that wait for it.

        ``outcome`` None means the call was cancelled before it had a reply. The waiting attempts
        then run the call themselves, as they do after an outcome that is not recorded.
        """
        running = self._running
        if running.get(claim.key) is claim:
            del running[claim.key]
        if outcome is not None and (outcome.error is None or is_final(outcome)):
            self._record(claim, outcome)
        claim.settle(outcome)

    def forget(self, key: tuple[str, str]) -> None:
        """Drop the finished record of ``key``, if there is one, so that the next attempt runs the call."""
        record = self._finished.pop(key, None)
        if record is not None:
            self.size -= record[_SIZE]

    def _record(self, claim: Claim, outcome: Outcome) -> None:
        encoded = outcome.encoded
        reply_size = len(encoded) if encoded is not None else _encoded_size(outcome)
        size = _RECORD_OVERHEAD + len(claim.fingerprint) + reply_size
        if size > self.max_bytes:
            return
        finished, key = self._finished, claim.key
        if key in finished:  # an attempt ran the call again after one whose reply was not final
            self.size -= finished.pop(key)[_SIZE]
        now = time.monotonic()
        if not finished:
            self._oldest_at = now
        finished[key] = (claim.fingerprint, outcome, size, now)
        self.size += size
        while len(finished) > self.max_entries or self.size > self.max_bytes:
            self._drop_oldest()

    def _expire(self) -> None:
        horizon = time.monotonic() - self.window
        if self._oldest_at > horizon:
            return
        # Records are in the order they finished, so the expired ones are at the front.
        finished = self._finished
        while finished:
            oldest_at = next(iter(finished.values()))[_FINISHED_AT]
            if oldest_at > horizon:
                self._oldest_at = oldest_at
                return
            self._drop_oldest()
        self._oldest_at = float("inf")

    def _drop_oldest(self) -> None:
        # The records left finished later, so _oldest_at is still no later than theirs.
        _, record = self._finished.popitem(last=False)
        self.size -= record[_SIZE]


def is_final(outcome: Outcome) -> bool:
    """Return whether another attempt of the call would get the same reply, so it may be replayed."""
    error = outcome.error
    if error is None:
        return True
    # The function did not finish: its deadline passed on the worker, or the worker stopped under it.
    if isinstance(error, DeadlineExceededError | CallInterruptedError):
        return False
    return not error.retryable


def fingerprint(data: Any, session: Any) -> bytes:
    """Return what every attempt of a call must share: its data and session, encoded, or a digest of them.

    Up to ``_INLINE_DATA`` bytes the encoding itself is kept, since hashing it would cost more than
    comparing it (Python's BLAKE2b takes about 5,000 instructions to set up).
    """
    try:
        encoded = pydantic_core.to_json((data, session))
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError):
        # Data from a transport is always JSON-compatible. Other data, from a direct caller of the
        # dispatcher, is digested by its repr.
        encoded = repr((data, session)).encode()
    if len(encoded) <= _INLINE_DATA:
        return encoded
    if len(encoded) < _LARGE_DATA:
        return hashlib.blake2b(encoded, digest_size=16).digest()
    # OpenSSL's SHA-256 uses the CPU's SHA instructions where it has them: twice as fast on 64 KiB here.
    return hashlib.sha256(encoded).digest()


_INLINE_DATA = 256
"""Bytes of encoded data up to which the fingerprint is the encoding itself."""

_LARGE_DATA = 1024
"""Bytes of encoded data from which the fingerprint is a SHA-256 digest instead of BLAKE2b, which is faster on less."""


def _check_fingerprint(key: tuple[str, str], recorded: bytes, received: bytes) -> None:
    if recorded != received:
        name, call_id = key
        raise BadRequestError(
            f"call id {call_id!r} was already used for a call to '{name}' with other data or another session. "
            "Send a new pikku-call-id for each logical call, and the same one only on its retries",
            payload={"call_id": call_id},
        )


def _encoded_size(outcome: Outcome) -> int:
    if outcome.encoded is not None:
        return len(outcome.encoded)
    if outcome.error is not None:
        return len(json.dumps(outcome.error.to_envelope()))
    return 0
