"""Signed calls and session forwarding (``PIKKU_REMOTE_SECRET``), compatible with Pikku.

A caller with a secret sends ``authorization: Bearer <token>`` on every attempt of a call. The token is
an HS256 JWT signed with the secret's UTF-8 bytes, with the claims Pikku uses (``aud`` =
``pikku-remote``, ``fn``, ``iat``, ``exp`` five minutes later, ``session``) and two of pikku_mq's own:
``jti``, a fresh id per attempt that a worker accepts once, and ``data_sha256``, the digest of the
call's data (see :func:`data_digest`), so that a captured token can be neither replayed nor sent with
other data. Tokens from Pikku carry neither and are accepted; when present they must check out.

The ``session`` claim is a blob: the JSON object ``{"session": ...}`` encrypted with AES-256-GCM, as
base64url without padding. Two formats exist, both from Pikku releases:

- ``hkdf`` (current Pikku, the default): key = HKDF-SHA256 of the secret with a random 16-byte salt and
  info ``pikku:remote-session``; blob = salt (16) + IV (12) + ciphertext + tag (16).
- ``sha256`` (@pikku/core 0.12.37 and older): key = SHA-256 of the secret; blob = IV (12) + ciphertext
  + tag (16).

A worker reads both. Secrets never appear in reprs, messages or logs, and neither do sessions.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import heapq
import hmac
import json
import os
import secrets
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jwt
import pydantic_core
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ._errors import BadRequestError, ConfigurationError, UnauthorizedError
from ._jwt import check_hmac_key, decode_hs256_common, encode_hs256
from ._settings import ENV_REMOTE_SECRET, ENV_REMOTE_SECRET_PREVIOUS

__all__ = [
    "AUTHORIZATION_HEADER",
    "ENV_REMOTE_SECRET",
    "ENV_REMOTE_SECRET_PREVIOUS",
    "MIN_SECRET_LENGTH",
    "TOKEN_AUDIENCE",
    "TOKEN_LIFETIME",
    "RemoteSecurity",
    "SessionFormat",
    "data_digest",
]

MIN_SECRET_LENGTH = 32
"""Minimum length of a secret, in characters."""

AUTHORIZATION_HEADER = "authorization"
TOKEN_AUDIENCE = "pikku-remote"  # noqa: S105 - the audience claim, not a password
TOKEN_LIFETIME = 300
"""Seconds a token is valid after it is made, as in Pikku."""

DEFAULT_LEEWAY = 30.0
"""Seconds of clock difference between hosts tolerated on ``exp`` and ``iat``."""

DEFAULT_REPLAY_CACHE_SIZE = 200_000
"""Token ids a worker remembers at most; see :class:`_ReplayCache` for what happens past it."""

MAX_TOKEN_LENGTH = 64 * 1024
"""Characters of a token a worker reads at most; a longer one is rejected before it is parsed."""

_MAX_JTI_LENGTH = 128
_SESSION_INFO = b"pikku:remote-session"
_SALT_SIZE = 16
_IV_SIZE = 12
_TAG_SIZE = 16

_SEND_KEY_LIFETIME = 60.0
"""Seconds a caller seals session blobs under one HKDF salt and key before it draws a new salt."""

_SEND_KEY_MAX_BLOBS = 1 << 20
"""Blobs a caller seals under one key at most. Each blob has a random 96-bit IV, so the chance that
two IVs under one key are equal is about n**2 / 2**97, which is 2**-57 at this count."""

_RECEIVE_KEY_CACHE_SIZE = 256
"""HKDF keys a worker keeps per secret, by salt. A caller changes its salt once a minute, so this
covers many callers. Only blobs inside a token signed with the secret get this far."""

SessionFormat = Literal["hkdf", "sha256"]


def data_digest(data: Any) -> str:
    """Return the ``data_sha256`` claim of ``data``, a JSON-compatible value.

    SHA-256 over the canonical JSON text of the value (keys sorted, no whitespace, non-ASCII
    characters as they are, UTF-8), as base64url without padding. Caller and worker compute it from
    the decoded value, so it is the same whichever codec carried the data. Raises ValueError or
    TypeError for a value JSON cannot represent (such as a map with keys that are not strings).
    """
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return _b64encode(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest())


class _Secret:
    """One secret, held as bytes, with the keys derived from it. Its repr shows nothing of it.

    HKDF keys are derived once per salt, not once per blob: the caller seals under one salt for up to
    a minute, and the worker keeps the keys of recent salts. Every blob still has its own random IV.
    """

    __slots__ = ("_key", "_legacy_aead", "_received", "_send_aead", "_send_blobs", "_send_salt", "_send_until")

    def __init__(self, secret: str) -> None:
        self._key = secret.encode("utf-8")
        self._legacy_aead = AESGCM(hashlib.sha256(self._key).digest())
        self._received: dict[bytes, AESGCM] = {}
        self._send_salt = b""
        self._send_aead: AESGCM | None = None
        self._send_until = 0.0
        self._send_blobs = 0

    def __repr__(self) -> str:
        return "<secret>"

    @property
    def key(self) -> bytes:
        return self._key

    def seal(self, plaintext: bytes, session_format: SessionFormat) -> str:
        iv = secrets.token_bytes(_IV_SIZE)
        if session_format == "sha256":
            return _b64encode(iv + self._legacy_aead.encrypt(iv, plaintext, None))
        salt, aead = self._sending_key()
        return _b64encode(salt + iv + aead.encrypt(iv, plaintext, None))

    def open(self, raw: bytes) -> bytes | None:
        """Decrypt a blob of either format; return None if it does not authenticate under this secret."""
        if len(raw) >= _SALT_SIZE + _IV_SIZE + _TAG_SIZE:
            salt, iv, sealed = raw[:_SALT_SIZE], raw[_SALT_SIZE : _SALT_SIZE + _IV_SIZE], raw[_SALT_SIZE + _IV_SIZE :]
            aead = self._received.get(salt)
            if aead is None:
                aead = AESGCM(self._hkdf(salt))
            try:
                plaintext = aead.decrypt(iv, sealed, None)
            except InvalidTag:
                pass
            else:
                self._remember(salt, aead)
                return plaintext
        if len(raw) >= _IV_SIZE + _TAG_SIZE:
            try:
                return self._legacy_aead.decrypt(raw[:_IV_SIZE], raw[_IV_SIZE:], None)
            except InvalidTag:
                pass
        return None

    def _sending_key(self) -> tuple[bytes, AESGCM]:
        now = time.monotonic()
        if self._send_aead is None or now >= self._send_until or self._send_blobs >= _SEND_KEY_MAX_BLOBS:
            self._send_salt = secrets.token_bytes(_SALT_SIZE)
            self._send_aead = AESGCM(self._hkdf(self._send_salt))
            self._send_until = now + _SEND_KEY_LIFETIME
            self._send_blobs = 0
        self._send_blobs += 1
        return self._send_salt, self._send_aead

    def _remember(self, salt: bytes, aead: AESGCM) -> None:
        """Keep the key of a salt that authenticated a blob, dropping the oldest past the bound."""
        received = self._received
        if salt in received:
            return
        if len(received) >= _RECEIVE_KEY_CACHE_SIZE:
            del received[next(iter(received))]
        received[salt] = aead

    def _hkdf(self, salt: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_SESSION_INFO).derive(self._key)


class _ReplayCache:
    """The token ids seen recently, each kept until its token expires (``exp`` plus the leeway).

    Memory is bounded by ``max_size`` entries. When the cache is full, it drops the entries closest
    to expiry, and the latest ``exp`` it dropped becomes a floor. A token that expires at or before
    the floor is rejected as a possible replay, because the cache no longer contains the ids of that
    age. Fresh tokens expire five minutes after they are made, later than anything dropped, so they
    pass. Only a token older than every id in the cache is rejected, and only while the cache is full.
    """

    __slots__ = ("_expiries", "_floor", "_heap", "leeway", "max_size")

    def __init__(self, max_size: int, leeway: float) -> None:
        self.max_size = max_size
        self.leeway = leeway
        self._expiries: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._floor = -1.0

    def __len__(self) -> int:
        return len(self._expiries)

    def add(self, jti: str, exp: float, now: float) -> bool:
        """Store ``jti`` until ``exp``. Return False for a replay, or for a token older than the floor."""
        self._purge(now)
        if jti in self._expiries or exp <= self._floor:
            return False
        while len(self._expiries) >= self.max_size:
            dropped_exp, dropped = heapq.heappop(self._heap)
            del self._expiries[dropped]
            self._floor = max(self._floor, dropped_exp)
        self._expiries[jti] = exp
        heapq.heappush(self._heap, (exp, jti))
        return exp > self._floor

    def _purge(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] + self.leeway < now:
            _, jti = heapq.heappop(heap)
            del self._expiries[jti]


class RemoteSecurity:
    """The remote secret of an instance: signs the calls it makes and checks the calls it serves.

    ``secret`` signs tokens and seals sessions. ``previous`` secrets are accepted besides it, so a mesh
    can change its secret without failed calls: first give every worker the new secret with the old
    one as previous, then drop the old one. ``session_format`` is the blob format sent (``hkdf``, or
    ``sha256`` for Pikku peers older than @pikku/core 0.12.84); both are read. ``leeway`` is the clock
    difference tolerated, in seconds. ``replay_cache_size`` bounds the token ids remembered.

    :meth:`from_env` reads ``PIKKU_REMOTE_SECRET`` and ``PIKKU_REMOTE_SECRET_PREVIOUS``.
    """

    def __init__(
        self,
        secret: str,
        *,
        previous: str | Sequence[str] = (),
        session_format: SessionFormat = "hkdf",
        leeway: float = DEFAULT_LEEWAY,
        replay_cache_size: int = DEFAULT_REPLAY_CACHE_SIZE,
    ) -> None:
        previous_secrets = [previous] if isinstance(previous, str) else list(previous)
        _check_secret(secret, ENV_REMOTE_SECRET)
        for old in previous_secrets:
            _check_secret(old, ENV_REMOTE_SECRET_PREVIOUS)
        if session_format not in ("hkdf", "sha256"):
            raise ConfigurationError(f"session_format must be 'hkdf' or 'sha256', got {session_format!r}")
        if not 0 <= leeway <= TOKEN_LIFETIME:
            raise ConfigurationError(f"leeway must be between 0 and {TOKEN_LIFETIME} seconds, got {leeway!r}")
        if replay_cache_size < 1:
            raise ConfigurationError(f"replay_cache_size must be at least 1, got {replay_cache_size!r}")
        self._secrets = [_Secret(secret), *(_Secret(old) for old in previous_secrets if old != secret)]
        self.session_format: SessionFormat = session_format
        self.leeway = float(leeway)
        self._replays = _ReplayCache(replay_cache_size, self.leeway)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **options: Any) -> RemoteSecurity | None:
        """Build from ``PIKKU_REMOTE_SECRET`` (and ``PIKKU_REMOTE_SECRET_PREVIOUS``), or None if it is unset.

        The previous variable may hold several secrets separated by commas.
        """
        env = os.environ if environ is None else environ
        secret = env.get(ENV_REMOTE_SECRET, "")
        if not secret:
            return None
        previous = [s for s in env.get(ENV_REMOTE_SECRET_PREVIOUS, "").split(",") if s]
        return cls(secret, previous=previous, **options)

    def __repr__(self) -> str:
        return f"RemoteSecurity(secrets={len(self._secrets)}, session_format={self.session_format!r})"

    # -- caller side -------------------------------------------------------------------------------

    def signer(self, name: str, data: Any, session: Any) -> _Signer:
        """Prepare the tokens of one call. Calling the result returns a fresh header value per attempt.

        ``data`` is the call's data as the caller passes it, models included. The digest is taken of
        its JSON-compatible form, because that is what every transport carries.
        """
        try:
            digest = data_digest(pydantic_core.to_jsonable_python(data))
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError, RecursionError) as exc:
            raise BadRequestError(
                f"data for function '{name}' cannot be serialised to JSON: {type(exc).__name__}"
            ) from None
        blob = None if session is None else self.seal_session(session)
        return _Signer(self, name, digest, blob)

    def create_token(
        self,
        name: str,
        *,
        session_blob: str | None = None,
        digest: str | None = None,
        jti: str | None = None,
        now: float | None = None,
        lifetime: int = TOKEN_LIFETIME,
    ) -> str:
        """Return a token for one call of ``name``, signed with the current secret."""
        issued = int(time.time() if now is None else now)
        claims: dict[str, Any] = {"aud": TOKEN_AUDIENCE, "fn": name, "iat": issued, "exp": issued + lifetime}
        if session_blob is not None:
            claims["session"] = session_blob
        claims["jti"] = jti if jti is not None else os.urandom(16).hex()
        if digest is not None:
            claims["data_sha256"] = digest
        return encode_hs256(claims, self._secrets[0].key)

    def seal_session(self, session: Any, session_format: SessionFormat | None = None) -> str:
        """Encrypt ``{"session": session}`` with the current secret into a blob of ``session_format``."""
        try:
            plaintext = pydantic_core.to_json({"session": session})
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
            raise BadRequestError(f"the session cannot be serialised to JSON: {type(exc).__name__}") from None
        return self._secrets[0].seal(plaintext, session_format or self.session_format)

    # -- worker side -------------------------------------------------------------------------------

    def open_session(self, blob: str) -> Any:
        """Decrypt a session blob made with any accepted secret and return the session it holds."""
        return self._open_session(blob, self._secrets)

    def verify(self, authorization: str | None, name: str, data: Any, *, check_replay: bool = True) -> Any:
        """Check the ``authorization`` header of a call of ``name`` with ``data``; return its session.

        Raise :class:`UnauthorizedError` if the call is not signed with an accepted secret, or its
        token is expired, for another audience or function, replayed, or made for other data. The
        message names the failed check and contains neither the token, a secret nor a session.
        ``check_replay=False`` accepts a token id seen before, for a broker's redelivery of a durable
        one-way call, which the worker de-duplicates by call id instead.
        """
        token = _bearer_token(authorization)
        claims, secret = self._decode(token)
        fn = claims.get("fn")
        if not isinstance(fn, str) or fn != name:
            raise _unauthorized(f"the token is not for function '{name}'")
        if "data_sha256" in claims and not self._digest_matches(claims["data_sha256"], data):
            raise _unauthorized("the data does not match the digest in the token")

        session = None
        if "session" in claims:
            blob = claims["session"]
            if not isinstance(blob, str):
                raise _unauthorized("the session in the token is not a string")
            session = self._open_session(blob, [secret])

        if "jti" in claims and check_replay:
            jti = claims["jti"]
            if not isinstance(jti, str) or not 0 < len(jti) <= _MAX_JTI_LENGTH:
                raise _unauthorized(f"the token id (jti) must be a string of 1 to {_MAX_JTI_LENGTH} characters")
            if not self._replays.add(jti, float(claims["exp"]), time.time()):
                raise _unauthorized("the token was already used: each token id (jti) is accepted once")
        return session

    def _decode(self, token: str) -> tuple[dict[str, Any], _Secret]:
        now = time.time()
        for secret in self._secrets:
            common = decode_hs256_common(token, secret.key, TOKEN_AUDIENCE, self.leeway, now)
            if common is not None:
                if common["exp"] > now + TOKEN_LIFETIME + self.leeway:
                    raise _unauthorized(f"the token is valid for longer than {TOKEN_LIFETIME} seconds")
                return common, secret
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    secret.key,
                    algorithms=["HS256"],
                    audience=TOKEN_AUDIENCE,
                    leeway=self.leeway,
                    options={"require": ["exp", "iat", "aud"]},
                )
            except jwt.InvalidSignatureError:
                continue
            except jwt.ExpiredSignatureError:
                raise _unauthorized("the token has expired") from None
            except (jwt.InvalidAudienceError, jwt.MissingRequiredClaimError, jwt.ImmatureSignatureError) as exc:
                raise _unauthorized(f"the token is not valid: {exc}") from None
            except jwt.InvalidTokenError:
                raise _unauthorized("the token is not a well-formed HS256 JWT") from None
            exp = claims["exp"]
            if not isinstance(exp, int | float) or exp > time.time() + TOKEN_LIFETIME + self.leeway:
                raise _unauthorized(f"the token is valid for longer than {TOKEN_LIFETIME} seconds")
            return claims, secret
        raise _unauthorized(
            "the token's signature is invalid for the worker's secrets; check that caller and worker share "
            "PIKKU_REMOTE_SECRET"
        )

    def _open_session(self, blob: str, candidates: Sequence[_Secret]) -> Any:
        raw = _b64decode(blob)
        if raw is None:
            raise _unauthorized("the session in the token is not base64url")
        for secret in candidates:
            plaintext = secret.open(raw)
            if plaintext is None:
                continue
            try:
                sealed = json.loads(plaintext)
            except (ValueError, RecursionError):
                raise _unauthorized("the session in the token is not JSON") from None
            if not isinstance(sealed, dict):
                raise _unauthorized("the session in the token is not a JSON object")
            return sealed.get("session")
        raise _unauthorized("the session in the token does not decrypt with the remote secret")

    @staticmethod
    def _digest_matches(claimed: Any, data: Any) -> bool:
        if not isinstance(claimed, str):
            return False
        try:
            actual = data_digest(data)
        except (ValueError, TypeError, RecursionError):
            return False
        return hmac.compare_digest(claimed.encode("utf-8", "surrogatepass"), actual.encode())


class _Signer:
    """The header values of one call: the digest and session blob are computed once, the token per attempt."""

    __slots__ = ("_blob", "_digest", "_name", "_security")

    def __init__(self, security: RemoteSecurity, name: str, digest: str, blob: str | None) -> None:
        self._security = security
        self._name = name
        self._digest = digest
        self._blob = blob

    def __repr__(self) -> str:
        return f"<signer for {self._name!r}>"

    def __call__(self) -> str:
        """Return ``Bearer <token>`` with a fresh ``jti`` and ``iat``."""
        return "Bearer " + self._security.create_token(self._name, session_blob=self._blob, digest=self._digest)


def _check_secret(secret: str, variable: str) -> None:
    if not isinstance(secret, str):
        raise ConfigurationError(f"{variable} must be a string")
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigurationError(
            f"{variable} is too short: a remote secret must be at least {MIN_SECRET_LENGTH} characters long"
        )
    try:
        check_hmac_key(secret.encode("utf-8"))
    except jwt.InvalidKeyError:
        raise ConfigurationError(
            f"{variable} looks like a PEM, SSH or DER key, which PyJWT rejects as an HMAC secret; use a random string"
        ) from None


def _bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise _unauthorized(
            f"the call has no {AUTHORIZATION_HEADER} header, and this worker requires calls signed with "
            "PIKKU_REMOTE_SECRET"
        )
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise _unauthorized(f"the {AUTHORIZATION_HEADER} header must use the Bearer scheme")
    token = token.strip()
    if not token:
        raise _unauthorized(f"the {AUTHORIZATION_HEADER} header carries an empty token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise _unauthorized(f"the token is longer than {MAX_TOKEN_LENGTH} characters")
    return token


def _unauthorized(reason: str) -> UnauthorizedError:
    return UnauthorizedError(f"call rejected: {reason}")


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes | None:
    """Decode base64url without padding; return None for anything else."""
    if len(text) % 4 == 1 or not text.isascii() or any(c in text for c in "+/="):
        return None
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
