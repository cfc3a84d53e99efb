"""An example of testing failure handling with pikku_mq.testing; CI runs it as part of the test suite.

Run it with ``python -m pytest examples/test_example_mesh.py`` (it needs pytest-asyncio, which the
``dev`` extra installs).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from pydantic import BaseModel

from pikku_mq import (
    BusyError,
    DeadlineExceededError,
    DiscoveryError,
    FunctionRegistry,
    PayloadTooLargeError,
    RetryPolicy,
    RoutingError,
    pikku_sessionless_func,
)
from pikku_mq.testing import Mesh

# A registry of this file's own keeps these functions out of the default registry of other tests.
functions = FunctionRegistry()


class Order(BaseModel):
    item: str
    quantity: int


@pikku_sessionless_func(expose=True, idempotent=True, registry=functions)
async def price(services: dict[str, Any], order: Order) -> float:
    """Price an order; ``services["prices"]`` is the price list of the instance."""
    return float(services["prices"][order.item] * order.quantity)


QUOTE = "price unavailable, we will send a quote"


@pikku_sessionless_func(expose=True, registry=functions)
async def checkout(services: dict[str, Any], order: Order, wire: Any) -> str:
    """Call ``price`` on another instance, as application code does, and fall back to a quote."""
    try:
        total = await wire.rpc.remote("price", order, timeout=1.0)
    except (RoutingError, DeadlineExceededError, BusyError):
        return QUOTE
    return f"total {total:.2f}"


PRICES = {"prices": {"tea": 2.5}}
TEA = {"item": "tea", "quantity": 1}


@pytest.mark.asyncio
async def test_call_moves_to_live_instance() -> None:
    async with Mesh() as mesh:
        first = await mesh.add("pricing-1", functions=[price], services=PRICES, registry=functions)
        await mesh.add("pricing-2", functions=[price], services=PRICES, registry=functions)
        shop = await mesh.add("shop", functions=[checkout], registry=functions)

        await first.kill()
        results = [await shop.rpc.invoke("checkout", {"item": "tea", "quantity": 2}) for _ in range(4)]

    assert results == ["total 5.00"] * 4


@pytest.mark.asyncio
async def test_fallback_when_pricing_down() -> None:
    async with Mesh() as mesh:
        pricing = await mesh.add("pricing", functions=[price], services=PRICES, registry=functions)
        shop = await mesh.add("shop", functions=[checkout], registry=functions)

        pricing.make_busy()
        assert await shop.rpc.invoke("checkout", TEA) == QUOTE

        pricing.make_busy(False)
        pricing.freeze()
        assert await shop.rpc.invoke("checkout", TEA) == QUOTE

        pricing.thaw()
        assert await shop.rpc.invoke("checkout", TEA) == "total 2.50"


@pytest.mark.asyncio
async def test_checkout_answers_in_time() -> None:
    async with Mesh() as mesh:
        pricing = await mesh.add("pricing", functions=[price], services=PRICES, registry=functions)
        shop = await mesh.add("shop", functions=[checkout], registry=functions)

        pricing.freeze()
        started = time.monotonic()
        assert await shop.rpc.invoke("checkout", TEA) == QUOTE
        # checkout gives price 1 s, so it returns long before the caller's default deadline of 30 s.
        assert time.monotonic() - started < 5


@pytest.mark.asyncio
async def test_idempotent_retry_survives_freeze() -> None:
    async with Mesh() as mesh:
        frozen = await mesh.add("pricing-1", functions=[price], services=PRICES, registry=functions)
        await mesh.add("pricing-2", functions=[price], services=PRICES, registry=functions)
        # Each attempt may take 0.2 s, so a retry fits in the call's deadline of 2 s.
        caller = mesh.caller(retry=RetryPolicy(attempt_timeout=0.2), balancing="round_robin")

        frozen.freeze()
        totals = [await caller.remote("price", TEA, timeout=2, idempotent=True) for _ in range(3)]

    assert totals == [2.5, 2.5, 2.5]


@pytest.mark.asyncio
async def test_oversized_order_rejected() -> None:
    async with Mesh() as mesh:
        await mesh.add("pricing", functions=[price], services=PRICES, registry=functions, payload_limit=64)
        caller = mesh.caller()

        with pytest.raises(PayloadTooLargeError):
            await caller.remote("price", {"item": "tea" * 100, "quantity": 1})


@pytest.mark.asyncio
async def test_cached_lookup_outlives_registry() -> None:
    async with Mesh() as mesh:
        await mesh.add("pricing", functions=[price], services=PRICES, registry=functions)
        warm = mesh.caller()
        assert await warm.remote("price", TEA) == 2.5

        mesh.drop_registry()
        # A caller that looked the function up before keeps routing; a new one cannot find anything.
        assert await warm.remote("price", TEA) == 2.5
        with pytest.raises(DiscoveryError):
            await mesh.caller().remote("price", TEA)
