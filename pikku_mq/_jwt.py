"""HS256 tokens with the HMAC key prepared once, byte for byte as PyJWT makes and checks them.

PyJWT validates the HMAC key again on every ``jwt.encode`` and ``jwt.decode`` (it checks that the
secret does not look like a PEM, SSH or DER key) and merges its options on every call. On a signed
call that was about a third of the caller's and half of the worker's CPU. :func:`encode_hs256`
writes the token that ``jwt.encode(claims, key, algorithm="HS256")`` writes, and
:func:`decode_hs256_common` accepts only the common case: a known header, a signature that matches,
canonical base64url, and claims of the plain types that pikku_mq and Pikku send, within their
times. It returns None for anything else, and the caller then runs ``jwt.decode``, so every
rejection, and every unusual token that PyJWT accepts, goes through PyJWT's own checks and errors.
"""

from __future__ import annotations

import base64
import hmac
import json
from typing import Any

__all__ = ["check_hmac_key", "decode_hs256_common", "encode_hs256"]

_CLAIMS_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""Encodes claims as ``jwt.encode`` does: compact separators, ASCII only, keys in insertion order."""


def _b64encode(raw: bytes) -> bytes:
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def _header_segment(header: str) -> bytes:
    return _b64encode(header.encode("ascii"))


_HEADER_SEGMENT = _header_segment('{"alg":"HS256","typ":"JWT"}')
"""The header ``jwt.encode`` writes for HS256 (its keys are sorted)."""

_COMMON_HEADER_SEGMENTS = frozenset(
    _header_segment(header)
    for header in (
        '{"alg":"HS256","typ":"JWT"}',
        '{"typ":"JWT","alg":"HS256"}',
        '{"alg":"HS256"}',
        '{"alg":"HS256","kid":"pikku-remote"}',
    )
)
"""Headers taken on the common path: PyJWT's, its field order reversed, and the headers that jose writes
without a key id and with the key id that Pikku's JWT service sets."""


def check_hmac_key(key: bytes) -> None:
    """Run PyJWT's HS256 key checks once; raise ``jwt.InvalidKeyError`` for a key PyJWT would reject."""
    from jwt.algorithms import HMACAlgorithm

    HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(key)


def encode_hs256(claims: dict[str, Any], key: bytes) -> str:
    """Return the HS256 JWT of ``claims``, identical to ``jwt.encode(claims, key, algorithm="HS256")``.

    ``claims`` must hold only JSON values (no datetimes, which PyJWT would convert) and ``key`` must
    have passed :func:`check_hmac_key`.
    """
    signing_input = _HEADER_SEGMENT + b"." + _b64encode(_CLAIMS_ENCODER.encode(claims).encode("utf-8"))
    signature = _b64encode(hmac.digest(key, signing_input, "sha256"))
    return (signing_input + b"." + signature).decode("ascii")


def decode_hs256_common(token: str, key: bytes, audience: str, leeway: float, now: float) -> dict[str, Any] | None:
    """Return the claims of ``token`` if it is a valid HS256 JWT of the common form, else None.

    The claims returned are those that ``jwt.decode(token, key, algorithms=["HS256"],
    audience=audience, leeway=leeway, options={"require": ["exp", "iat", "aud"]})`` returns at time
    ``now``. None means "not decided here": the token may be invalid, signed with another key, or
    valid in a form this path does not handle, and the caller must ask PyJWT.
    """
    if not token.isascii():
        return None
    segments = token.encode("ascii").split(b".")
    if len(segments) != 3:
        return None
    header, payload_segment, signature = segments
    if header not in _COMMON_HEADER_SEGMENTS:
        return None

    expected = _b64encode(hmac.digest(key, header + b"." + payload_segment, "sha256"))
    if not hmac.compare_digest(expected, signature):
        return None

    # PyJWT rejects a segment that is not canonical base64url (stray characters, non-zero padding bits).
    try:
        payload = base64.urlsafe_b64decode(payload_segment + b"=" * (-len(payload_segment) % 4))
    except ValueError:
        return None
    if _b64encode(payload) != payload_segment:
        return None
    try:
        claims = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(claims, dict):
        return None
    return claims if _claims_pass(claims, audience, leeway, now) else None


def _claims_pass(claims: dict[str, Any], audience: str, leeway: float, now: float) -> bool:
    """Check the claims as PyJWT does, for plain integer times and a string audience only."""
    iat = claims.get("iat")
    exp = claims.get("exp")
    if type(iat) is not int or type(exp) is not int:
        return False
    if claims.get("aud") != audience or "nbf" in claims:
        return False
    if "sub" in claims and not isinstance(claims["sub"], str):
        return False
    if "jti" in claims and not isinstance(claims["jti"], str):
        return False
    return iat <= now + leeway and exp > now - leeway
