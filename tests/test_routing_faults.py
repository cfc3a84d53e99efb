"""The router through faults of the registry and the brokers, and under concurrent calls.

The fault drills in tests/faults found each of these cases; the tests here pin them down in one process.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from _support_core import Mesh, closed_port

from pikku_mq import (
    DeploymentConfig,
    EjectionPolicy,
    FunctionNotFoundError,
    FunctionRegistry,
    PikkuWorker,
    RoutingError,
    pikku_sessionless_func,
    testing,
)

REG = FunctionRegistry()

CALLER_TTL = 1.0
"""The caller's heartbeat TTL, in seconds: how long it keeps routing to instances that vanished."""


@pikku_sessionless_func(expose=True, registry=REG)
async def whoami(services: Any) -> str:
    return str(services)


async def test_wiped_registry_keeps_routing() -> None:
    # Workers write their registrations again with their next heartbeat. A caller that trusted the
    # empty lookup in between would fail calls with not-found while the instances serve.
    async with testing.Mesh() as mesh:
        # The worker's next heartbeat is far off, so nothing registers it again during the test.
        await mesh.add("wiped-a", registry=REG, services="wiped-a", heartbeat_interval=30, heartbeat_ttl=60)
        caller = mesh.service(heartbeat_interval=0.2, heartbeat_ttl=CALLER_TTL, routing_cache_ttl=0)
        assert await caller.invoke("whoami", timeout=5) == "wiped-a"

        mesh.wipe_registry()
        lookups = mesh.registry.lookups
        served = [await caller.invoke("whoami", timeout=5) for _ in range(3)]
        assert served == ["wiped-a"] * 3
        assert mesh.registry.lookups > lookups, "the calls did not look the function up again"

        # Once the instance has been absent for longer than the caller's TTL, the caller believes the registry.
        await asyncio.sleep(CALLER_TTL + 0.2)
        with pytest.raises(FunctionNotFoundError):
            await caller.invoke("whoami", timeout=5)


async def test_invalidated_lookup_not_reported_missing() -> None:
    async with Mesh() as mesh:
        endpoint = f"http://127.0.0.1:{closed_port()}"
        await mesh.service().start(DeploymentConfig("refusing-a", endpoint, functions=["ghost"]))
        caller = mesh.service(routing_cache_ttl=30)
        router = caller.router

        # The refused call takes refusing-a out of routing for half a second.
        with pytest.raises(RoutingError):
            await caller.invoke("ghost", timeout=5)
        router.invalidate("ghost")

        # The next call waits for a fresh lookup. The application drops the cached lookup again
        # (Router.invalidate) after that lookup is stored and before the waiting call resumes.
        call = asyncio.create_task(caller.invoke("ghost", timeout=5))
        await asyncio.sleep(0)
        lookup = router._pending["ghost"]
        lookup.add_done_callback(lambda _: router.invalidate("ghost"))

        # The instance is out of routing, but it is the only one, so the call tries it anyway.
        with pytest.raises(RoutingError) as raised:
            await call
        assert raised.value.payload["tried"] == ["refusing-a"]
        assert raised.value.payload["attempts"] == 1


async def test_resync_readmits_ejected_instances() -> None:
    async with Mesh() as mesh:
        # One refused call takes an instance out of routing for 30 s, as a long broker outage would.
        caller = mesh.service(ejection=EjectionPolicy(base_interval=30, max_interval=30))
        endpoint = f"http://127.0.0.1:{closed_port()}"
        holder = mesh.service()
        await holder.start(DeploymentConfig("back-a", endpoint, functions=["whoami"]))
        other = PikkuWorker(
            endpoint="http://127.0.0.1:0",
            deployment_id="other-b",
            registry=REG,
            services="other-b",
            deployment_service=mesh.service(),
        )
        async with other:
            # Round-robin sends one of these to back-a, which refuses, and the call moves to other-b.
            assert [await caller.invoke("whoami", timeout=5) for _ in range(2)] == ["other-b"] * 2
            assert caller.router.is_ejected("back-a")
            await holder.stop()

            worker = PikkuWorker(
                endpoint=endpoint,
                deployment_id="back-a",
                registry=REG,
                services="back-a",
                deployment_service=mesh.service(),
            )
            async with worker:
                assert {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"other-b"}

                # The caller's connection is back, and with it its change feed or presence subscription.
                caller.router.resync()
                assert {await caller.invoke("whoami", timeout=5) for _ in range(4)} == {"back-a", "other-b"}


async def test_only_ejected_instances_still_get_calls() -> None:
    async with Mesh() as mesh:
        caller = mesh.service(ejection=EjectionPolicy(base_interval=30, max_interval=30))
        endpoint = f"http://127.0.0.1:{closed_port()}"
        holder = mesh.service()
        await holder.start(DeploymentConfig("only-a", endpoint, functions=["whoami"]))
        with pytest.raises(RoutingError):
            await caller.invoke("whoami", timeout=5)
        assert caller.router.is_ejected("only-a")
        await holder.stop()

        # The only instance comes back at the same endpoint within its ejection interval, and the
        # next call reaches it, since no other instance could take the call.
        worker = PikkuWorker(
            endpoint=endpoint,
            deployment_id="only-a",
            registry=REG,
            services="only-a",
            deployment_service=mesh.service(),
        )
        async with worker:
            assert await caller.invoke("whoami", timeout=5) == "only-a"
            assert not caller.router.is_ejected("only-a")
