"""Interop with Pikku's own npm packages, run by Node.js: both sides share one registry.

A session fixture installs the exact versions pinned in ``tests/interop/package.json`` (@pikku/pg 0.12.1,
@pikku/redis 0.12.18, @pikku/core 0.12.84) into a temporary copy of that folder, so concurrent test runs
never share a ``node_modules``. The Node scripts there drive Pikku's ``PgDeploymentService`` and
``RedisDeploymentService`` classes. A missing Node.js or npm, or a failed install, fails the tests.

Both Pikku services take the location as a constructor argument: a schema name for @pikku/pg and a key
prefix for @pikku/redis. So each test works in its own schema or key prefix, as the other backend tests
do, and drops it at the end. Nothing is written to the shared ``pikku`` schema or ``pikku:`` keys.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from _support_node import NODE_TIMEOUT, install_node_project, run_node_json
from _support_redis import REDIS_URL, drop_redis_prefixes, redis_prefix, sync_client
from _support_sql import POSTGRES_DSN, drop_postgres_schema, unique_name
from aiohttp import web

from pikku_mq import DeploymentConfig, DeploymentInfo, PgDeploymentService, RedisDeploymentService
from pikku_mq.backends.redis import RETENTION_FACTOR

# The first test also waits for the npm install, which is bounded by INSTALL_TIMEOUT.
pytestmark = pytest.mark.timeout(360)

INTEROP_DIR = Path(__file__).parent / "interop"

PINNED_VERSIONS = {"@pikku/core": "0.12.84", "@pikku/pg": "0.12.1", "@pikku/redis": "0.12.18"}

# An address that nothing needs to serve: these tests only look endpoints up, apart from the one
# that Pikku's invoke calls.
UNUSED_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture(scope="session")
def node_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Install the pinned npm packages into a copy of ``tests/interop`` and return that copy's path."""
    return install_node_project(
        tmp_path_factory.mktemp("pikku_interop"), INTEROP_DIR, sorted(INTEROP_DIR.glob("*.mjs")), PINNED_VERSIONS
    )


class NodePeer:
    """A Node script that registers one Pikku instance, and deregisters it on a line on its stdin."""

    def __init__(self, process: asyncio.subprocess.Process, stderr_path: Path) -> None:
        self.process = process
        self.stderr_path = stderr_path

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def expect_line(self, expected: str) -> None:
        assert self.process.stdout is not None
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), NODE_TIMEOUT)
        except TimeoutError:
            pytest.fail(f"the Node peer printed no {expected!r} within {NODE_TIMEOUT} s:\n{self.stderr()}")
        assert line.decode().strip() == expected, f"unexpected output {line!r}:\n{self.stderr()}"

    async def stop(self) -> None:
        """Ask Pikku's service to deregister, then wait for the script to exit 0."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"stop\n")
        await self.process.stdin.drain()
        await self.expect_line("stopped")
        returncode = await asyncio.wait_for(self.process.wait(), NODE_TIMEOUT)
        assert returncode == 0, f"the Node peer exited with {returncode}:\n{self.stderr()}"


class NodeRunner:
    """Runs the scripts of the installed Node project, and kills any still running at test end."""

    def __init__(self, project: Path, tmp_path: Path) -> None:
        self.project = project
        self.tmp_path = tmp_path
        self.peers: list[NodePeer] = []

    async def register(self, script: str, *args: str) -> NodePeer:
        """Start ``script`` and wait until it prints ``registered``."""
        stderr_path = self.tmp_path / f"node_{len(self.peers)}.stderr"
        with stderr_path.open("wb") as stderr_file:
            process = await asyncio.create_subprocess_exec(
                "node",
                script,
                *args,
                cwd=self.project,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr_file,
            )
        peer = NodePeer(process, stderr_path)
        self.peers.append(peer)
        await peer.expect_line("registered")
        return peer

    async def output_json(self, script: str, *args: str) -> Any:
        """Run ``script`` to completion and return the JSON it prints on its last stdout line."""
        return await run_node_json(self.project, script, *args)

    async def kill_all(self) -> None:
        for peer in self.peers:
            if peer.process.returncode is None:
                peer.process.kill()
                await asyncio.wait_for(peer.process.wait(), NODE_TIMEOUT)


@pytest.fixture
async def node(node_project: Path, tmp_path: Path) -> AsyncIterator[NodeRunner]:
    runner = NodeRunner(node_project, tmp_path)
    yield runner
    await runner.kill_all()


@pytest.fixture
def schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped at the end whichever side created it."""
    name = unique_name()
    yield name
    drop_postgres_schema(name)


@pytest.fixture
def prefix(tmp_path: Path) -> Iterator[str]:
    """pikku_mq's key prefix for this test, such as ``pikku_t_<hex>:``, whose keys are deleted at the end."""
    yield redis_prefix(tmp_path)
    drop_redis_prefixes()


def pikku_key_prefix(prefix: str) -> str:
    """Return @pikku/redis's spelling of ``prefix``: Pikku adds the colon after the prefix itself."""
    assert prefix.endswith(":")
    return prefix[:-1]


def unique_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def pg_services(schema: str) -> AsyncIterator[list[PgDeploymentService]]:
    """pikku_mq services on the test's schema, each closed at the end."""
    services: list[PgDeploymentService] = []
    yield services
    for service in services:
        await service.close()


@pytest.fixture
async def redis_services(prefix: str) -> AsyncIterator[list[RedisDeploymentService]]:
    """pikku_mq services under the test's key prefix, each closed at the end."""
    services: list[RedisDeploymentService] = []
    yield services
    for service in services:
        await service.close()


# -- PostgreSQL -------------------------------------------------------------------------------------


async def test_pg_pikku_instance_found(node: NodeRunner, schema: str, pg_services: list[PgDeploymentService]) -> None:
    # Pikku creates the schema and its table here, so pikku_mq's init adds its own columns to Pikku's table.
    deployment_id = unique_id("pikku-ts")
    endpoint = f"{UNUSED_ENDPOINT}/{deployment_id}"
    peer = await node.register("pg_register.mjs", POSTGRES_DSN, schema, deployment_id, endpoint, "greet,farewell")

    service = PgDeploymentService(POSTGRES_DSN, schema=schema)
    pg_services.append(service)
    await service.init()

    assert await service.find_function("greet") == [DeploymentInfo(deployment_id, endpoint)]
    assert await service.find_function("farewell") == [DeploymentInfo(deployment_id, endpoint)]
    assert await service.find_function("missing") == []

    [record] = await service.list_deployments()
    assert record.deployment_id == deployment_id
    assert record.functions == ("farewell", "greet")
    assert record.state == "live"

    await peer.stop()
    assert await service.find_function("greet") == []


async def test_pg_pikku_mq_instance_found(
    node: NodeRunner, schema: str, pg_services: list[PgDeploymentService]
) -> None:
    # pikku_mq creates the table here, with its extra columns, and Pikku's init must accept it.
    deployment_id = unique_id("pikku-mq")
    endpoint = f"{UNUSED_ENDPOINT}/{deployment_id}"
    service = PgDeploymentService(POSTGRES_DSN, schema=schema)
    pg_services.append(service)
    await service.start(
        DeploymentConfig(deployment_id, endpoint, functions=["greet"], fallback_endpoints=[f"{endpoint}/http"])
    )

    found = await node.output_json("pg_find.mjs", POSTGRES_DSN, schema, "greet")
    assert found == [{"deploymentId": deployment_id, "endpoint": endpoint}]
    assert await node.output_json("pg_find.mjs", POSTGRES_DSN, schema, "missing") == []

    await service.stop()
    assert await node.output_json("pg_find.mjs", POSTGRES_DSN, schema, "greet") == []


async def test_pg_mixed_registry(node: NodeRunner, schema: str, pg_services: list[PgDeploymentService]) -> None:
    pikku_id = unique_id("pikku-ts")
    pikku_endpoint = f"{UNUSED_ENDPOINT}/{pikku_id}"
    peer = await node.register("pg_register.mjs", POSTGRES_DSN, schema, pikku_id, pikku_endpoint, "greet")

    mq_id = unique_id("pikku-mq")
    mq_endpoint = f"{UNUSED_ENDPOINT}/{mq_id}"
    service = PgDeploymentService(POSTGRES_DSN, schema=schema)
    pg_services.append(service)
    await service.start(DeploymentConfig(mq_id, mq_endpoint, functions=["greet"]))

    found_by_mq = await service.find_function("greet")
    assert sorted(found_by_mq, key=lambda info: info.deployment_id) == sorted(
        [DeploymentInfo(pikku_id, pikku_endpoint), DeploymentInfo(mq_id, mq_endpoint)],
        key=lambda info: info.deployment_id,
    )
    found_by_pikku = await node.output_json("pg_find.mjs", POSTGRES_DSN, schema, "greet")
    assert sorted(found_by_pikku, key=lambda info: info["deploymentId"]) == sorted(
        [
            {"deploymentId": pikku_id, "endpoint": pikku_endpoint},
            {"deploymentId": mq_id, "endpoint": mq_endpoint},
        ],
        key=lambda info: info["deploymentId"],
    )

    await peer.stop()
    assert await service.find_function("greet") == [DeploymentInfo(mq_id, mq_endpoint)]


# -- Redis ------------------------------------------------------------------------------------------


class RecordingServer:
    """An HTTP server in place of an instance, which records each request and returns a greeting."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append((request.path, body))
        return web.json_response({"greeting": f"hello {body['data']['name']}"})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        host, port = self.runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def close(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def recording_server() -> AsyncIterator[RecordingServer]:
    server = RecordingServer()
    await server.start()
    yield server
    await server.close()


async def test_redis_pikku_instance_found(
    node: NodeRunner, prefix: str, redis_services: list[RedisDeploymentService]
) -> None:
    deployment_id = unique_id("pikku-ts")
    endpoint = f"{UNUSED_ENDPOINT}/{deployment_id}"
    peer = await node.register(
        "redis_register.mjs", REDIS_URL, pikku_key_prefix(prefix), deployment_id, endpoint, "greet,farewell"
    )

    service = RedisDeploymentService(REDIS_URL, key_prefix=prefix)
    redis_services.append(service)
    await service.init()

    assert await service.find_function("greet") == [DeploymentInfo(deployment_id, endpoint)]
    assert await service.find_function("farewell") == [DeploymentInfo(deployment_id, endpoint)]
    assert await service.find_function("missing") == []

    [record] = await service.list_deployments()
    assert record.deployment_id == deployment_id
    assert record.functions == ("farewell", "greet")
    assert record.state == "live"

    await peer.stop()
    assert await service.find_function("greet") == []


async def test_redis_pikku_mq_instance_invoked(
    node: NodeRunner,
    prefix: str,
    redis_services: list[RedisDeploymentService],
    recording_server: RecordingServer,
) -> None:
    deployment_id = unique_id("pikku-mq")
    endpoint = f"{recording_server.url}/{deployment_id}"
    service = RedisDeploymentService(REDIS_URL, key_prefix=prefix)
    redis_services.append(service)
    await service.start(DeploymentConfig(deployment_id, endpoint, functions=["greet"]))

    outcome = await node.output_json("redis_invoke.mjs", REDIS_URL, pikku_key_prefix(prefix), "greet", '{"name":"Ada"}')
    assert outcome == {"result": {"greeting": "hello Ada"}}
    # The request path starts with the endpoint's path, so Pikku took the endpoint from pikku_mq's row.
    assert recording_server.requests == [(f"/{deployment_id}/remote/rpc/greet", {"data": {"name": "Ada"}})]

    await service.stop()
    outcome = await node.output_json("redis_invoke.mjs", REDIS_URL, pikku_key_prefix(prefix), "greet", '{"name":"Ada"}')
    assert outcome == {"error": "No deployment found for function 'greet'"}
    assert len(recording_server.requests) == 1


async def test_redis_pikku_member_outlives_pikku_mq(
    node: NodeRunner, prefix: str, redis_services: list[RedisDeploymentService]
) -> None:
    # Pikku never refreshes a TTL on a function's sorted set, so a TTL that pikku_mq left on a shared set
    # would delete Pikku's live member with it, until Pikku's next heartbeat added it back.
    pikku_id = unique_id("pikku-ts")
    pikku_endpoint = f"{UNUSED_ENDPOINT}/{pikku_id}"
    await node.register(
        "redis_register.mjs", REDIS_URL, pikku_key_prefix(prefix), pikku_id, pikku_endpoint, "greet", "30000"
    )

    # A short TTL keeps the test fast: pikku_mq's keys expire after RETENTION_FACTOR TTLs.
    mq = RedisDeploymentService(REDIS_URL, key_prefix=prefix, heartbeat_interval=0.2, heartbeat_ttl=0.6)
    caller = RedisDeploymentService(REDIS_URL, key_prefix=prefix)
    redis_services.extend([mq, caller])
    await mq.start(DeploymentConfig(unique_id("pikku-mq"), UNUSED_ENDPOINT, functions=["greet"]))
    await asyncio.sleep(0.5)
    await mq.stop()

    await asyncio.sleep(0.6 * RETENTION_FACTOR + 0.7)
    assert await caller.find_function("greet") == [DeploymentInfo(pikku_id, pikku_endpoint)]
    with sync_client() as client:
        assert client.pttl(f"{prefix}fn:greet") == -1, "the function's set has a TTL"
