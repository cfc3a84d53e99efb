"""Two services that talk through events: orders publishes ``orders.placed``, shipping reacts and calls back.

Run it with NATS JetStream at 127.0.0.1:4222 (or set ``PIKKU_EVENTS_URL`` to another event bus, for
example ``amqp://guest:guest@127.0.0.1:5672/%2F?exchange=pikku.example``)::

    python examples/orders_events.py

The orders service exposes ``place_order``, which stores the order and publishes ``orders.placed``
with ``wire.rpc.publish``, and ``mark_shipped``. The shipping service has the handler
``ship_order(events=["orders.placed"])``, which books a parcel and calls ``mark_shipped`` back on the
orders service with ``wire.rpc.remote``. The script starts both workers in this process, on HTTP
endpoints and a registry file in a temporary folder, places three orders, waits until all three are
shipped and prints each order with its parcel number. It exits 0 on success and 1 if an order was
not shipped within 30 seconds.

The registry file goes with the temporary folder, but the broker keeps what the run created, as it
does for any event bus (pikku_mq never deletes a place that may hold deliveries). On NATS that is the
stream ``PIKKU_EVENTS_pikku-example`` with its consumer, which the nats CLI deletes::

    nats stream rm -f PIKKU_EVENTS_pikku-example

On RabbitMQ it is the exchange named in the URL and the queues ``<exchange>.ship_order``,
``<exchange>.ship_order.retry`` and ``<exchange>.ship_order.dead``, which rabbitmqadmin deletes::

    rabbitmqadmin delete exchange name=pikku.example
    rabbitmqadmin delete queue name=pikku.example.ship_order  # and the .retry and .dead queues
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pikku_mq import (
    RPC,
    FunctionRegistry,
    PikkuWorker,
    Wire,
    deployment_service_from_url,
    pikku_sessionless_func,
)

DEFAULT_EVENTS_URL = "nats://127.0.0.1:4222/pikku-example"

orders = FunctionRegistry()
shipping = FunctionRegistry()


class Order(BaseModel):
    order_id: str
    item: str


class Shipment(BaseModel):
    order_id: str
    parcel: str


# -- the orders service ----------------------------------------------------------------------------


@pikku_sessionless_func(expose=True, registry=orders)
async def place_order(services: dict[str, Any], order: Order, wire: Wire) -> str:
    services["orders"][order.order_id] = {"item": order.item, "parcel": None}
    await wire.rpc.publish("orders.placed", order)
    return order.order_id


@pikku_sessionless_func(expose=True, idempotent=True, registry=orders)
async def mark_shipped(services: dict[str, Any], shipment: Shipment) -> None:
    services["orders"][shipment.order_id]["parcel"] = shipment.parcel


# -- the shipping service --------------------------------------------------------------------------


@pikku_sessionless_func(registry=shipping, events=["orders.placed"])
async def ship_order(services: dict[str, Any], order: Order, wire: Wire) -> None:
    parcel = f"PARCEL-{order.order_id.upper()}"
    # An event is delivered at least once, and mark_shipped is idempotent, so a redelivery is harmless.
    await wire.rpc.remote("mark_shipped", Shipment(order_id=order.order_id, parcel=parcel))


# -- running both ----------------------------------------------------------------------------------


async def main() -> int:
    events_url = os.environ.get("PIKKU_EVENTS_URL", "").strip() or DEFAULT_EVENTS_URL
    with tempfile.TemporaryDirectory() as folder:
        discovery = f"sqlite:///{Path(folder) / 'registry.db'}"
        order_book: dict[str, dict[str, Any]] = {}
        orders_worker = PikkuWorker(
            deployment_id="orders-1",
            registry=orders,
            services={"orders": order_book},
            deployment_service=discovery,
            events=events_url,
        )
        shipping_worker = PikkuWorker(
            deployment_id="shipping-1", registry=shipping, deployment_service=discovery, events=events_url
        )
        async with orders_worker, shipping_worker:
            caller = deployment_service_from_url(discovery)
            try:
                rpc = RPC(deployment_service=caller)
                for order_id, item in (("a1", "tea"), ("a2", "cups"), ("a3", "kettle")):
                    await rpc.remote("place_order", Order(order_id=order_id, item=item))
                shipped = await _wait_shipped(order_book, timeout=30.0)
            finally:
                await caller.close()

    for order_id, entry in sorted(order_book.items()):
        print(f"order {order_id} ({entry['item']}): parcel {entry['parcel']}")
    if not shipped:
        print("some orders were not shipped within 30 s", file=sys.stderr)
        return 1
    return 0


async def _wait_shipped(order_book: dict[str, dict[str, Any]], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if order_book and all(entry["parcel"] for entry in order_book.values()):
            return True
        await asyncio.sleep(0.05)
    return False


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
