"""Concurrent calls and the routing cache: a call reports its failure from the lookup it routed with."""

from __future__ import annotations

import asyncio

import pytest
from _support_core import Mesh, closed_port

from pikku_mq import DeploymentConfig, RoutingError


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

        with pytest.raises(RoutingError) as raised:
            await call
        assert raised.value.payload == {"function": "ghost", "ejected": ["refusing-a"]}
