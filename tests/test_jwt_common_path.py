"""The HS256 common path of signed calls against PyJWT, and the reuse of HKDF session keys."""

from __future__ import annotations

import base64
import hmac
import json
import time
from typing import Any

import jwt
import pytest

from pikku_mq import ConfigurationError
from pikku_mq._jwt import decode_hs256_common, encode_hs256
from pikku_mq._security import RemoteSecurity, _Secret

SECRET = "unit-test-secret-0123456789-abcdefghij"
KEY = SECRET.encode()
OTHER_KEY = b"another-unit-test-secret-9876543210-zyx"
AUDIENCE = "pikku-remote"
LEEWAY = 30.0


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {"aud": AUDIENCE, "fn": "greet", "iat": now, "exp": now + 300, "jti": "a" * 32}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _with_header(header: dict[str, Any], claims: dict[str, Any], key: bytes = KEY) -> str:
    return jwt.encode(claims, key, algorithm="HS256", headers=header, sort_headers=False)


def _pyjwt_decode(token: str) -> dict[str, Any] | None:
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            KEY,
            algorithms=["HS256"],
            audience=AUDIENCE,
            leeway=LEEWAY,
            options={"require": ["exp", "iat", "aud"]},
        )
    except jwt.PyJWTError:
        return None
    return claims


@pytest.mark.parametrize(
    "claims",
    [
        _claims(),
        _claims(session="c2Vzc2lvbg", data_sha256="x" * 43),
        _claims(fn="名前/ünïcode"),
        _claims(fn='a"quote\\and\nnewline'),
        _claims(jti=None),
    ],
)
def test_encode_matches_pyjwt(claims: dict[str, Any]) -> None:
    assert encode_hs256(claims, KEY) == jwt.encode(claims, KEY, algorithm="HS256")


def _tampered_payload() -> str:
    header, _, signature = jwt.encode(_claims(), KEY, algorithm="HS256").split(".")
    return f"{header}.{_b64(json.dumps(_claims(fn='other')).encode())}.{signature}"


def _padded_signature() -> str:
    token = jwt.encode(_claims(), KEY, algorithm="HS256")
    return token + "=" * (-len(token.rsplit(".", 1)[1]) % 4)


def _signed_segments(header: bytes, payload_segment: str) -> str:
    """A token with the given header JSON and payload segment, signed with KEY as they are."""
    signing_input = f"{_b64(header)}.{payload_segment}"
    return f"{signing_input}.{_b64(hmac.digest(KEY, signing_input.encode(), 'sha256'))}"


PYJWT_HEADER = b'{"alg":"HS256","typ":"JWT"}'


def _non_canonical_payload() -> str:
    """A payload segment with a stray character that a lenient base64 decoder drops."""
    return _signed_segments(PYJWT_HEADER, _b64(json.dumps(_claims()).encode()) + "!")


def _signed_raw(payload: bytes) -> str:
    return _signed_segments(PYJWT_HEADER, _b64(payload))


def _cases() -> dict[str, tuple[str, bool]]:
    """Return each case: a token and whether the common path must accept it (True) or leave it to PyJWT (False).

    The tokens are made when a test runs, because their times count from now and a full run takes minutes.
    """
    now = int(time.time())
    return {
        "pyjwt header": (jwt.encode(_claims(), KEY, algorithm="HS256"), True),
        "header without typ": (_with_header({"alg": "HS256", "typ": None}, _claims()), True),
        "with session and digest": (jwt.encode(_claims(session="s", data_sha256="d"), KEY, algorithm="HS256"), True),
        "iat within leeway ahead": (jwt.encode(_claims(iat=now + 20), KEY, algorithm="HS256"), True),
        "iat past leeway ahead": (jwt.encode(_claims(iat=now + 120), KEY, algorithm="HS256"), False),
        "expired within leeway": (jwt.encode(_claims(exp=now - 10), KEY, algorithm="HS256"), True),
        "expired past leeway": (jwt.encode(_claims(exp=now - 60), KEY, algorithm="HS256"), False),
        "float exp": (jwt.encode(_claims(exp=now + 300.5), KEY, algorithm="HS256"), False),
        "string iat": (jwt.encode(_claims(iat=str(now)), KEY, algorithm="HS256"), False),
        "bool exp": (jwt.encode(_claims(exp=True), KEY, algorithm="HS256"), False),
        "missing iat": (jwt.encode(_claims(iat=None), KEY, algorithm="HS256"), False),
        "missing aud": (jwt.encode(_claims(aud=None), KEY, algorithm="HS256"), False),
        "aud list": (jwt.encode(_claims(aud=[AUDIENCE, "x"]), KEY, algorithm="HS256"), False),
        "other aud": (jwt.encode(_claims(aud="other"), KEY, algorithm="HS256"), False),
        "nbf present": (jwt.encode(_claims(nbf=now - 5), KEY, algorithm="HS256"), False),
        "integer sub": (jwt.encode(_claims(sub=5), KEY, algorithm="HS256"), False),
        "integer jti": (jwt.encode(_claims(jti=5), KEY, algorithm="HS256"), False),
        "other key": (jwt.encode(_claims(), OTHER_KEY, algorithm="HS256"), False),
        "HS512": (jwt.encode(_claims(), KEY * 2, algorithm="HS512"), False),
        "header with other kid": (_with_header({"kid": "k1"}, _claims()), False),
        "Pikku header with kid": (_with_header({"alg": "HS256", "kid": "pikku-remote", "typ": None}, _claims()), True),
        "tampered payload": (_tampered_payload(), False),
        "padded signature": (_padded_signature(), False),
        "non-canonical payload": (_non_canonical_payload(), False),
        "payload is a list": (_signed_raw(b"[1, 2]"), False),
        "payload not JSON": (_signed_raw(b"{nope"), False),
        "four segments": (jwt.encode(_claims(), KEY, algorithm="HS256") + ".x", False),
        "non-ASCII token": ("é." + jwt.encode(_claims(), KEY, algorithm="HS256"), False),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_common_path_agrees_with_pyjwt(name: str) -> None:
    token, accepted = _cases()[name]
    common = decode_hs256_common(token, KEY, AUDIENCE, LEEWAY, time.time())
    if accepted:
        assert common is not None
        assert common == _pyjwt_decode(token)
    else:
        assert common is None


PEM_KEY = "-----BEGIN PUBLIC KEY-----\n" + "A" * 40 + "\n-----END PUBLIC KEY-----\n"


@pytest.mark.parametrize("secret", [PEM_KEY, "ssh-rsa " + "A" * 40], ids=["pem", "ssh"])
def test_secret_that_looks_like_key_rejected(secret: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RemoteSecurity(secret)
    assert "PIKKU_REMOTE_SECRET" in caught.value.message
    assert secret not in caught.value.message


def _salt(blob: str) -> bytes:
    return base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))[:16]


def _iv(blob: str) -> bytes:
    return base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4))[16:28]


def test_sender_reuses_salt_with_fresh_iv() -> None:
    security = RemoteSecurity(SECRET)
    blobs = [security.seal_session({"n": i}) for i in range(50)]
    assert len({_salt(blob) for blob in blobs}) == 1
    assert len({_iv(blob) for blob in blobs}) == 50
    receiver = RemoteSecurity(SECRET)
    assert [receiver.open_session(blob) for blob in blobs] == [{"n": i} for i in range(50)]


def test_sender_draws_new_salt_after_lifetime() -> None:
    security = RemoteSecurity(SECRET)
    first = security.seal_session("s")
    security._secrets[0]._send_until = 0.0
    second = security.seal_session("s")
    assert _salt(first) != _salt(second)
    assert RemoteSecurity(SECRET).open_session(second) == "s"


def test_sender_draws_new_salt_after_max_blobs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pikku_mq._security._SEND_KEY_MAX_BLOBS", 3)
    security = RemoteSecurity(SECRET)
    salts = [_salt(security.seal_session(i)) for i in range(7)]
    assert salts[0] == salts[1] == salts[2]
    assert salts[3] == salts[4] == salts[5]
    assert salts[2] != salts[3]
    assert salts[5] != salts[6]


def test_receiver_key_cache_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pikku_mq._security._RECEIVE_KEY_CACHE_SIZE", 8)
    receiver = RemoteSecurity(SECRET)
    secret: _Secret = receiver._secrets[0]
    for i in range(20):
        sender = RemoteSecurity(SECRET)
        assert receiver.open_session(sender.seal_session(i)) == i
        assert len(secret._received) <= 8
    assert len(secret._received) == 8


def test_receiver_caches_only_authenticated_salts() -> None:
    receiver = RemoteSecurity(SECRET)
    secret: _Secret = receiver._secrets[0]
    blob = RemoteSecurity(SECRET).seal_session("s")
    raw = bytearray(base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)))
    raw[-1] ^= 1
    assert secret.open(bytes(raw)) is None
    assert secret._received == {}
