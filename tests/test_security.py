"""Tokens, session blobs and the replay cache of signed calls (PIKKU_REMOTE_SECRET), without a transport."""

from __future__ import annotations

import base64
import json
import time
import warnings
from pathlib import Path
from typing import Any

import jwt
import msgpack
import pytest

from pikku_mq import ConfigurationError, UnauthorizedError
from pikku_mq._security import RemoteSecurity, _ReplayCache, data_digest

# Session blobs made by Pikku's own code (see "about" in the file).
VECTORS = json.loads((Path(__file__).parent / "vectors" / "pikku-session-blobs.json").read_text())
SECRET = "unit-test-secret-0123456789-abcdefghij"
OTHER = "another-unit-test-secret-9876543210-zyx"
SESSION = {"userId": "u-42", "roles": ["ops"], "name": "Zoë"}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _raw_token(secret: str = SECRET, **claims: Any) -> str:
    """A token built with PyJWT directly, so a test controls every claim."""
    now = int(time.time())
    payload: dict[str, Any] = {"aud": "pikku-remote", "fn": "greet", "iat": now, "exp": now + 300}
    payload.update(claims)
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, secret.encode(), algorithm="HS256")


def _rejected(security: RemoteSecurity, header: str | None, name: str = "greet", data: Any = None) -> str:
    with pytest.raises(UnauthorizedError) as caught:
        security.verify(header, name, data)
    assert caught.value.status == 401
    return caught.value.message


# -- session blobs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: f"{v['format']}-{v['blob'][:8]}")
def test_pikku_vectors_decrypt(vector: dict[str, Any]) -> None:
    security = RemoteSecurity(vector["secret"])
    assert security.open_session(vector["blob"]) == vector["plaintext"]["session"]


@pytest.mark.parametrize("session_format", ["hkdf", "sha256"])
@pytest.mark.parametrize("session", [SESSION, None, "plain", 7, {"deep": [[{"x": "✓"}]]}])
def test_session_round_trip(session_format: Any, session: Any) -> None:
    security = RemoteSecurity(SECRET, session_format=session_format)
    blob = security.seal_session(session)
    plaintext_size = len(json.dumps({"session": session}, separators=(",", ":"), ensure_ascii=False).encode())
    header = 16 + 12 + 16 if session_format == "hkdf" else 12 + 16
    assert len(_unb64(blob)) == header + plaintext_size
    assert "=" not in blob
    assert "+" not in blob
    assert "/" not in blob
    assert security.open_session(blob) == session
    assert RemoteSecurity(OTHER, previous=SECRET).open_session(blob) == session


def test_each_blob_is_fresh() -> None:
    security = RemoteSecurity(SECRET)
    assert security.seal_session(SESSION) != security.seal_session(SESSION)


@pytest.mark.parametrize("session_format", ["hkdf", "sha256"])
def test_tampered_blob_rejected(session_format: Any) -> None:
    security = RemoteSecurity(SECRET, session_format=session_format)
    raw = _unb64(security.seal_session(SESSION))
    for index in (0, 5, 12, 20, 28, len(raw) // 2, len(raw) - 1):
        tampered = bytearray(raw)
        tampered[index] ^= 0x01
        with pytest.raises(UnauthorizedError):
            security.open_session(_b64(bytes(tampered)))


@pytest.mark.parametrize("session_format", ["hkdf", "sha256"])
def test_truncated_blob_rejected(session_format: Any) -> None:
    security = RemoteSecurity(SECRET, session_format=session_format)
    raw = _unb64(security.seal_session(SESSION))
    for length in (0, 1, 11, 12, 27, 28, 43, 44, len(raw) - 16, len(raw) - 1):
        with pytest.raises(UnauthorizedError):
            security.open_session(_b64(raw[:length]))


@pytest.mark.parametrize("blob", ["not base64!", "a", "abc=", "ab+/cdef", "ümlaut", ""])
def test_malformed_blob_rejected(blob: str) -> None:
    with pytest.raises(UnauthorizedError):
        RemoteSecurity(SECRET).open_session(blob)


def test_blob_of_another_secret_rejected() -> None:
    blob = RemoteSecurity(OTHER).seal_session(SESSION)
    message = _rejected_blob(RemoteSecurity(SECRET), blob)
    assert "decrypt" in message


def _rejected_blob(security: RemoteSecurity, blob: str) -> str:
    with pytest.raises(UnauthorizedError) as caught:
        security.open_session(blob)
    return caught.value.message


# -- secrets ----------------------------------------------------------------------------------------


def test_short_secret_names_variable_and_minimum() -> None:
    short = "s" * 31
    with pytest.raises(ConfigurationError) as caught:
        RemoteSecurity(short)
    assert "PIKKU_REMOTE_SECRET" in str(caught.value)
    assert "32" in str(caught.value)
    assert short not in str(caught.value)


def test_short_previous_secret_names_its_variable() -> None:
    with pytest.raises(ConfigurationError) as caught:
        RemoteSecurity.from_env({"PIKKU_REMOTE_SECRET": SECRET, "PIKKU_REMOTE_SECRET_PREVIOUS": "p" * 20})
    assert "PIKKU_REMOTE_SECRET_PREVIOUS" in str(caught.value)
    assert "p" * 20 not in str(caught.value)


def test_from_env() -> None:
    assert RemoteSecurity.from_env({}) is None
    assert RemoteSecurity.from_env({"PIKKU_REMOTE_SECRET": ""}) is None
    security = RemoteSecurity.from_env({"PIKKU_REMOTE_SECRET": SECRET, "PIKKU_REMOTE_SECRET_PREVIOUS": OTHER})
    assert security is not None
    token = _raw_token(OTHER)
    assert security.verify(f"Bearer {token}", "greet", None) is None
    with pytest.raises(ConfigurationError) as caught:
        RemoteSecurity.from_env({"PIKKU_REMOTE_SECRET": "x" * 31})
    assert "PIKKU_REMOTE_SECRET" in str(caught.value)
    assert "x" * 31 not in str(caught.value)


def test_repr_hides_secrets() -> None:
    security = RemoteSecurity(SECRET, previous=[OTHER])
    signer = security.signer("greet", {"a": 1}, SESSION)
    for text in (repr(security), str(security), repr(signer), repr(security._secrets)):
        assert SECRET not in text
        assert OTHER not in text
        assert "u-42" not in text


# -- tokens -----------------------------------------------------------------------------------------


def test_signed_call_round_trip() -> None:
    security = RemoteSecurity(SECRET)
    header = security.signer("greet", {"name": "Ada"}, SESSION)()
    assert header.startswith("Bearer ")
    claims = jwt.decode(header[7:], SECRET.encode(), algorithms=["HS256"], audience="pikku-remote")
    assert claims["fn"] == "greet"
    assert claims["exp"] - claims["iat"] == 300
    assert set(claims) == {"aud", "fn", "iat", "exp", "session", "jti", "data_sha256"}
    assert security.verify(header, "greet", {"name": "Ada"}) == SESSION


def test_call_without_session_has_no_session_claim() -> None:
    security = RemoteSecurity(SECRET)
    header = security.signer("greet", None, None)()
    assert "session" not in jwt.decode(header[7:], options={"verify_signature": False})
    assert security.verify(header, "greet", None) is None


def test_each_attempt_has_its_own_jti() -> None:
    signer = RemoteSecurity(SECRET).signer("greet", None, SESSION)
    jtis = {jwt.decode(signer()[7:], options={"verify_signature": False})["jti"] for _ in range(20)}
    assert len(jtis) == 20


def test_pikku_token_without_jti_or_digest_accepted() -> None:
    security = RemoteSecurity(SECRET)
    token = _raw_token(session=security.seal_session(SESSION))
    assert security.verify(f"Bearer {token}", "greet", {"anything": 1}) == SESSION
    assert security.verify(f"bearer {token}", "greet", None) == SESSION  # the scheme is case-insensitive


def test_no_token() -> None:
    assert "no authorization" in _rejected(RemoteSecurity(SECRET), None)
    assert "no authorization" in _rejected(RemoteSecurity(SECRET), "")


@pytest.mark.parametrize("scheme", ["Basic", "Token", "JWT", "Bearer:", "Beare"])
def test_other_scheme(scheme: str) -> None:
    assert "Bearer" in _rejected(RemoteSecurity(SECRET), f"{scheme} {_raw_token()}")


@pytest.mark.parametrize("header", ["Bearer", "Bearer ", "Bearer    ", "  Bearer  "])
def test_empty_token(header: str) -> None:
    assert "empty token" in _rejected(RemoteSecurity(SECRET), header)


def test_bad_signature() -> None:
    token = _raw_token()
    head, body, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]
    assert "signature" in _rejected(RemoteSecurity(SECRET), f"Bearer {head}.{body}.{flipped}")
    # A payload changed under the original signature fails the same way.
    claims = json.loads(_unb64(body))
    claims["fn"] = "admin"
    forged = _b64(json.dumps(claims).encode())
    assert "signature" in _rejected(RemoteSecurity(SECRET), f"Bearer {head}.{forged}.{signature}", name="admin")


def test_other_secret() -> None:
    assert "signature" in _rejected(RemoteSecurity(SECRET), f"Bearer {_raw_token(OTHER)}")


@pytest.mark.parametrize("token", ["abc", "a.b.c", "a.b", "...", "eyJ.eyJ.sig"])
def test_malformed_token(token: str) -> None:
    _rejected(RemoteSecurity(SECRET), f"Bearer {token}")


def test_unsigned_and_other_algorithms() -> None:
    security = RemoteSecurity(SECRET)
    payload = {"aud": "pikku-remote", "fn": "greet", "iat": int(time.time()), "exp": int(time.time()) + 300}
    unsigned = jwt.encode(payload, None, algorithm="none")
    _rejected(security, f"Bearer {unsigned}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyJWT warns that the key is short for HS512
        hs512 = jwt.encode(payload, SECRET.encode(), algorithm="HS512")
    _rejected(security, f"Bearer {hs512}")


def test_expired() -> None:
    now = int(time.time())
    token = _raw_token(iat=now - 400, exp=now - 100)
    assert "expired" in _rejected(RemoteSecurity(SECRET), f"Bearer {token}")


def test_small_clock_difference_tolerated() -> None:
    now = int(time.time())
    security = RemoteSecurity(SECRET)
    assert security.verify(f"Bearer {_raw_token(iat=now + 10, exp=now + 310)}", "greet", None) is None
    assert security.verify(f"Bearer {_raw_token(iat=now - 310, exp=now - 10)}", "greet", None) is None


def test_token_valid_too_long() -> None:
    now = int(time.time())
    token = _raw_token(exp=now + 3600)
    assert "longer than" in _rejected(RemoteSecurity(SECRET), f"Bearer {token}")


@pytest.mark.parametrize("aud", ["other", "pikku", "Pikku-Remote", ["other"]])
def test_wrong_audience(aud: Any) -> None:
    _rejected(RemoteSecurity(SECRET), f"Bearer {_raw_token(aud=aud)}")


@pytest.mark.parametrize("missing", ["aud", "exp", "iat"])
def test_missing_claim(missing: str) -> None:
    token = _raw_token(**{missing: None})
    _rejected(RemoteSecurity(SECRET), f"Bearer {token}")


@pytest.mark.parametrize("fn", ["Greet", "GREET", "gr%65et", "greet ", "greet/", "", None, 7, ["greet"]])
def test_fn_mismatch(fn: Any) -> None:
    token = _raw_token(fn=fn)
    _rejected(RemoteSecurity(SECRET), f"Bearer {token}")


def test_replayed_token() -> None:
    security = RemoteSecurity(SECRET)
    header = security.signer("greet", None, SESSION)()
    assert security.verify(header, "greet", None) == SESSION
    assert "already used" in _rejected(security, header)


@pytest.mark.parametrize("jti", ["", 5, "x" * 129, ["a"]])
def test_invalid_jti(jti: Any) -> None:
    _rejected(RemoteSecurity(SECRET), f"Bearer {_raw_token(jti=jti)}")


def test_digest_mismatch() -> None:
    security = RemoteSecurity(SECRET)
    header = security.signer("transfer", {"amount": 10, "to": "alice"}, None)()
    assert "digest" in _rejected(security, header, name="transfer", data={"amount": 10_000, "to": "mallory"})
    for claimed in (7, "", "x" * 43):
        _rejected(security, f"Bearer {_raw_token(data_sha256=claimed)}")


@pytest.mark.parametrize("session_format", ["hkdf", "sha256"])
def test_tampered_session_in_signed_token(session_format: Any) -> None:
    security = RemoteSecurity(SECRET, session_format=session_format)
    raw = _unb64(security.seal_session(SESSION))
    tampered = bytearray(raw)
    tampered[-1] ^= 0x80
    for blob in (_b64(bytes(tampered)), _b64(raw[:-3]), 17):
        _rejected(security, f"Bearer {_raw_token(session=blob)}")


def test_session_sealed_with_previous_secret() -> None:
    old = RemoteSecurity(OTHER)
    rotated = RemoteSecurity(SECRET, previous=OTHER)
    assert rotated.verify(old.signer("greet", None, SESSION)(), "greet", None) == SESSION
    # A worker without the old secret rejects it, and one that only has the new secret rejects old tokens.
    _rejected(RemoteSecurity(SECRET), old.signer("greet", None, SESSION)())
    # The new secret signs: an old worker that does not know it yet rejects those calls.
    _rejected(old, rotated.signer("greet", None, SESSION)())


def test_rejection_messages_hide_token_and_session() -> None:
    security = RemoteSecurity(SECRET)
    header = security.signer("greet", {"a": 1}, SESSION)()
    security.verify(header, "greet", {"a": 1})
    for message in (
        _rejected(security, header, data={"a": 1}),
        _rejected(security, header, data={"a": 2}),
        _rejected(security, header, name="other"),
    ):
        assert header[7:] not in message
        assert "u-42" not in message
        assert SECRET not in message


# -- the data digest --------------------------------------------------------------------------------

DIGEST_VALUES: list[Any] = [
    None,
    0,
    -(2**63),
    1.0,
    1e20,
    0.1,
    "grüße 🚀 \u0000",
    [1, "two", None, [3.5]],
    {"b": 1, "a": {"z": [], "y": {}}, "ключ": "значение"},
]


@pytest.mark.parametrize("value", DIGEST_VALUES, ids=range(len(DIGEST_VALUES)))
def test_digest_same_after_every_codec(value: Any) -> None:
    digest = data_digest(value)
    assert data_digest(json.loads(json.dumps({"data": value}))["data"]) == digest
    assert data_digest(msgpack.unpackb(msgpack.packb({"data": value}), raw=False)["data"]) == digest


def test_digest_ignores_key_order_and_sees_values() -> None:
    assert data_digest({"a": 1, "b": 2}) == data_digest({"b": 2, "a": 1})
    assert data_digest({"a": 1}) != data_digest({"a": 1.0})
    assert data_digest([1, 2]) != data_digest([2, 1])
    assert data_digest("x") != data_digest(["x"])


def test_digest_of_model_matches_decoded_data() -> None:
    from pydantic import BaseModel

    class Parcel(BaseModel):
        label: str
        weight: float

    security = RemoteSecurity(SECRET)
    header = security.signer("weigh", Parcel(label="a", weight=2), None)()
    assert security.verify(header, "weigh", {"weight": 2.0, "label": "a"}) is None


def test_undigestable_data_is_a_mismatch() -> None:
    security = RemoteSecurity(SECRET)
    header = security.signer("greet", {"1": "a"}, None)()
    _rejected(security, header, data={1: "a", "b": 2})


# -- the replay cache -------------------------------------------------------------------------------


def test_replay_cache_forgets_expired_ids() -> None:
    cache = _ReplayCache(max_size=100, leeway=5)
    now = 1_000_000.0
    for index in range(50):
        assert cache.add(f"old-{index}", now + 10, now)
    assert len(cache) == 50
    assert cache.add("new", now + 300, now + 16)
    assert len(cache) == 1


def test_replay_cache_is_bounded_and_fails_closed() -> None:
    cache = _ReplayCache(max_size=10, leeway=5)
    now = 1_000_000.0
    for index in range(1000):
        assert cache.add(f"id-{index}", now + 300 + index, now)
        assert len(cache) <= 10
    # The cache no longer contains ids as old as these, so it rejects them as possible replays.
    assert not cache.add("late", now + 300 + 500, now)
    assert not cache.add("id-999", now + 300 + 999, now)
    assert cache.add("fresh", now + 300 + 1000, now)
