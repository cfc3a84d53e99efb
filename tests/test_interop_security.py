"""Signed calls and session forwarding between pikku_mq and Pikku's own code, run by Node.js.

Each session format is tested against the Pikku release that uses it: ``hkdf`` against @pikku/core
0.12.84 (``tests/interop/package.json``) and ``sha256`` against @pikku/core 0.12.37
(``tests/interop/pikku-0.12.37/package.json``), both with jose 6.2.19 for the JWTs. A session fixture
installs each project once, with ``npm ci``, into a temporary folder with the scripts of
``tests/interop``. A missing Node.js or npm, or a failed install, fails the tests.

In one direction, Pikku's ``buildRemoteHeaders`` makes the headers of a call, and the test sends them
over HTTP to a pikku_mq worker, with the body and path that Pikku's deployment services use. In the
other, a pikku_mq caller's ``authorization`` header goes through Pikku's ``pikkuRemoteAuthMiddleware``.
Pikku reads the secret from ``PIKKU_REMOTE_SECRET`` in its environment, and pikku_mq gets it as a
:class:`RemoteSecurity`.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt
import pytest
from _support_node import install_node_project, run_node_json

from pikku_mq import FunctionRegistry, PikkuWorker, RemoteSecurity, Wire, pikku_func
from pikku_mq._security import SessionFormat

# The first test of each format also waits for its npm install, which is bounded by INSTALL_TIMEOUT.
pytestmark = pytest.mark.timeout(360)

INTEROP_DIR = Path(__file__).parent / "interop"
SCRIPTS = [INTEROP_DIR / name for name in ("remote_jwt.mjs", "remote_headers.mjs", "remote_auth.mjs")]

SESSION = {"userId": "interop-user-7", "roles": ["ops", "auditor"], "name": "Zoë", "nested": {"level": [1, 2.5]}}
DATA = {"name": "Ada"}


@dataclass(frozen=True)
class PikkuRelease:
    version: str
    package_dir: Path
    session_format: SessionFormat
    header_size: int
    """Bytes of a session blob around the ciphertext: salt, IV and tag, or IV and tag."""


RELEASES = {
    "hkdf": PikkuRelease("0.12.84", INTEROP_DIR, "hkdf", 16 + 12 + 16),
    "sha256": PikkuRelease("0.12.37", INTEROP_DIR / "pikku-0.12.37", "sha256", 12 + 16),
}


@dataclass(frozen=True)
class PikkuPeer:
    """One installed Pikku release, whose scripts run with a given remote secret."""

    release: PikkuRelease
    project: Path

    async def headers(self, secret: str, name: str, session: Any, trace_id: str = "") -> dict[str, str]:
        """Return the headers that Pikku's buildRemoteHeaders makes for a call of ``name``."""
        args = [name, json.dumps(session)] + ([trace_id] if trace_id else [])
        headers: dict[str, str] = await run_node_json(
            self.project, "remote_headers.mjs", *args, env={"PIKKU_REMOTE_SECRET": secret}
        )
        return headers

    async def authenticate(self, secret: str, name: str, authorization: str) -> dict[str, Any]:
        """Return the outcome of Pikku's remote-auth middleware for a call of ``name`` with ``authorization``."""
        outcome: dict[str, Any] = await run_node_json(
            self.project, "remote_auth.mjs", name, authorization, env={"PIKKU_REMOTE_SECRET": secret}
        )
        return outcome


@pytest.fixture(scope="session", params=sorted(RELEASES))
def pikku(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PikkuPeer:
    release = RELEASES[request.param]
    project = install_node_project(
        tmp_path_factory.mktemp(f"pikku_{release.version}"),
        release.package_dir,
        SCRIPTS,
        {"@pikku/core": release.version, "jose": "6.2.19"},
    )
    return PikkuPeer(release, project)


REG = FunctionRegistry()
RUNS: list[str] = []


@pikku_func(expose=True, registry=REG)
async def whoami(services: Any, data: Any, wire: Wire) -> Any:
    RUNS.append("whoami")
    return wire.session


@pikku_func(expose=True, registry=REG)
async def other_function(services: Any, data: Any, wire: Wire) -> Any:
    RUNS.append("other_function")
    return None


@pytest.fixture
def secret() -> str:
    return f"interop-secret-{uuid.uuid4().hex}"


@pytest.fixture
async def worker(secret: str) -> AsyncIterator[PikkuWorker]:
    """A pikku_mq worker on HTTP with the test's secret and no discovery."""
    RUNS.clear()
    async with PikkuWorker(registry=REG, discovery=False, security=RemoteSecurity(secret)) as started:
        yield started


async def post_as_pikku(worker: PikkuWorker, name: str, data: Any, headers: dict[str, str]) -> tuple[int, Any]:
    """POST a call the way Pikku's deployment services do: ``{"data": ...}`` to ``/remote/rpc/<name>``."""
    assert worker.endpoint is not None
    url = f"{worker.endpoint}/remote/rpc/{quote(name, safe='')}"
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as client,
        client.post(url, data=json.dumps({"data": data}), headers=headers) as reply,
    ):
        return reply.status, await reply.json()


def _claims(authorization: str) -> dict[str, Any]:
    scheme, _, token = authorization.partition(" ")
    assert scheme == "Bearer"
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _blob_size(blob: str) -> int:
    return len(base64.urlsafe_b64decode(blob + "=" * (-len(blob) % 4)))


def _sealed_size(session: Any) -> int:
    """Bytes of ``{"session": session}`` as JSON.stringify writes it."""
    return len(json.dumps({"session": session}, separators=(",", ":"), ensure_ascii=False).encode())


# -- Pikku calls pikku_mq ---------------------------------------------------------------------------


async def test_worker_receives_pikku_session(pikku: PikkuPeer, secret: str, worker: PikkuWorker) -> None:
    headers = await pikku.headers(secret, "whoami", SESSION, "trace-interop-1")
    assert set(headers) == {"content-type", "x-request-id", "authorization"}
    claims = _claims(headers["authorization"])
    assert claims["aud"] == "pikku-remote"
    assert claims["fn"] == "whoami"
    # The JWT service sets iat before it computes exp five minutes ahead, so a second may pass in between.
    assert 300 <= claims["exp"] - claims["iat"] <= 301
    # A genuine Pikku token: without pikku_mq's own claims, and with the release's session layout.
    assert "jti" not in claims
    assert "data_sha256" not in claims
    assert _blob_size(claims["session"]) == pikku.release.header_size + _sealed_size(SESSION)

    assert await post_as_pikku(worker, "whoami", DATA, headers) == (200, SESSION)
    assert RUNS == ["whoami"]


async def test_worker_pikku_call_without_session(pikku: PikkuPeer, secret: str, worker: PikkuWorker) -> None:
    headers = await pikku.headers(secret, "whoami", None)
    assert "session" not in _claims(headers["authorization"])

    status, body = await post_as_pikku(worker, "whoami", DATA, headers)
    # The token checks out, and then whoami, which needs a session, rejects the call.
    assert status == 401, body
    assert body["name"] == "MissingSessionError"
    assert RUNS == []


async def test_worker_rejects_pikku_token_for_other_function(
    pikku: PikkuPeer, secret: str, worker: PikkuWorker
) -> None:
    headers = await pikku.headers(secret, "other_function", SESSION)
    status, body = await post_as_pikku(worker, "whoami", DATA, headers)
    assert status == 401, body
    assert body["name"] == "UnauthorizedError"
    assert "not for function 'whoami'" in body["message"]
    assert RUNS == []


async def test_worker_rejects_pikku_token_of_other_secret(pikku: PikkuPeer, worker: PikkuWorker) -> None:
    headers = await pikku.headers(f"interop-other-secret-{uuid.uuid4().hex}", "whoami", SESSION)
    status, body = await post_as_pikku(worker, "whoami", DATA, headers)
    assert status == 401, body
    assert body["name"] == "UnauthorizedError"
    assert "signature is invalid" in body["message"]
    assert RUNS == []


# -- pikku_mq calls Pikku ---------------------------------------------------------------------------


def _pikku_mq_authorization(security: RemoteSecurity, name: str, session: Any) -> str:
    """The ``authorization`` header of one attempt of a pikku_mq call, with ``jti`` and data digest."""
    authorization = security.signer(name, DATA, session)()
    claims = _claims(authorization)
    assert {"jti", "data_sha256"} <= set(claims)
    return authorization


async def test_pikku_restores_session(pikku: PikkuPeer, secret: str) -> None:
    security = RemoteSecurity(secret, session_format=pikku.release.session_format)
    authorization = _pikku_mq_authorization(security, "whoami", SESSION)
    assert _blob_size(_claims(authorization)["session"]) == pikku.release.header_size + _sealed_size(SESSION)

    assert await pikku.authenticate(secret, "whoami", authorization) == {"accepted": True, "session": SESSION}


async def test_pikku_accepts_call_without_session(pikku: PikkuPeer, secret: str) -> None:
    security = RemoteSecurity(secret, session_format=pikku.release.session_format)
    authorization = _pikku_mq_authorization(security, "whoami", None)
    assert await pikku.authenticate(secret, "whoami", authorization) == {"accepted": True, "session": None}


async def test_pikku_rejects_token_for_other_function(pikku: PikkuPeer, secret: str) -> None:
    security = RemoteSecurity(secret, session_format=pikku.release.session_format)
    authorization = _pikku_mq_authorization(security, "other_function", SESSION)
    assert await pikku.authenticate(secret, "whoami", authorization) == {"rejected": "UnauthorizedError"}


async def test_pikku_rejects_token_of_other_secret(pikku: PikkuPeer, secret: str) -> None:
    other = RemoteSecurity(f"interop-other-secret-{uuid.uuid4().hex}", session_format=pikku.release.session_format)
    authorization = _pikku_mq_authorization(other, "whoami", SESSION)
    assert await pikku.authenticate(secret, "whoami", authorization) == {"rejected": "UnauthorizedError"}


async def test_pikku_reads_only_its_session_format(pikku: PikkuPeer, secret: str) -> None:
    # A blob in the other layout does not open in this release, which is why RemoteSecurity has session_format.
    other_format: SessionFormat = "sha256" if pikku.release.session_format == "hkdf" else "hkdf"
    security = RemoteSecurity(secret, session_format=other_format)
    authorization = _pikku_mq_authorization(security, "whoami", SESSION)
    assert await pikku.authenticate(secret, "whoami", authorization) == {"rejected": "UnauthorizedError"}
