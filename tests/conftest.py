"""Shared fixtures: an SQLite registry, worker processes killed at test end, and a private nats-server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from _support_servers import PrivateNats
from _support_workers import WorkerProcesses

from pikku_mq import DeploymentService, deployment_service_from_url


@pytest.fixture
def discovery_url(tmp_path: Path) -> str:
    """URL of an SQLite registry file in the test's temporary folder."""
    return f"sqlite:///{tmp_path / 'registry.db'}"


@pytest.fixture
async def caller(discovery_url: str) -> AsyncIterator[DeploymentService]:
    """A caller on the temporary registry with the default settings, which never registers itself."""
    service = deployment_service_from_url(discovery_url)
    await service.init()
    yield service
    await service.close()


@pytest.fixture
async def worker_processes(tmp_path: Path, discovery_url: str) -> AsyncIterator[WorkerProcesses]:
    processes = WorkerProcesses(tmp_path, discovery_url)
    try:
        yield processes
    finally:
        await processes.close()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    """A nats-server of this test, without JetStream, which the test may kill and start again."""
    server = PrivateNats(tmp_path / "nats-server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def amqp_vhost() -> Iterator[str]:
    """The session's RabbitMQ vhost, created on first use and deleted with its queues at the end."""
    from _support_amqp import SESSION_VHOST, create_vhost, delete_vhost

    create_vhost(SESSION_VHOST)
    try:
        yield SESSION_VHOST
    finally:
        delete_vhost(SESSION_VHOST)
