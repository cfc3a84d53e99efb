"""A worker process for the tests of events and one-way calls on real brokers.

``python events_worker.py --id ID --discovery URL --endpoint URL --ledger FILE [--events URL]
[--nats-url URL] [--amqp-url URL] [--durable-notify] [--ack-wait SECONDS]``

Every finished run appends a line ``<kind> <tag> <deployment id>`` to the ledger file, where kind is
``notify`` for the one-way function ``record`` and ``event`` for the handler of ``jobs.created``.
The handler also appends ``<tag> <deployment id>`` to ``<ledger>.started`` when it starts, and when
the job has a ``hold`` and no run of its tag started before, it sleeps that many seconds first. So
a test can kill the worker that runs an event and see another worker finish it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pikku_mq import DeliveryPolicy, FunctionRegistry, PikkuWorker, pikku_sessionless_func

functions = FunctionRegistry()


class Job(BaseModel):
    tag: str
    hold: float = 0.0


def _append(path: Path, line: str) -> None:
    # One write of a short line in append mode, so lines of several processes do not interleave.
    with path.open("a") as file:
        file.write(line + "\n")


def _started_before(started: Path, tag: str) -> bool:
    return started.exists() and any(line.split()[0] == tag for line in started.read_text().splitlines())


@pikku_sessionless_func(expose=True, registry=functions)
async def record(services: dict[str, Any], data: Job) -> None:
    _append(services["ledger"], f"notify {data.tag} {services['deployment_id']}")


@pikku_sessionless_func(registry=functions, events=["jobs.created"])
async def run_job(services: dict[str, Any], data: Job) -> None:
    started: Path = services["ledger"].with_suffix(".started")
    earlier = _started_before(started, data.tag)
    _append(started, f"{data.tag} {services['deployment_id']}")
    if data.hold and not earlier:
        await asyncio.sleep(data.hold)
    _append(services["ledger"], f"event {data.tag} {services['deployment_id']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--id", required=True)
    parser.add_argument("--discovery", required=True)
    parser.add_argument("--endpoint", required=True)
    parser.add_argument("--ledger", required=True, type=Path)
    parser.add_argument("--events")
    parser.add_argument("--nats-url")
    parser.add_argument("--amqp-url")
    parser.add_argument("--durable-notify", action="store_true")
    parser.add_argument("--ack-wait", type=float, default=30.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    PikkuWorker(
        endpoint=args.endpoint,
        deployment_id=args.id,
        registry=functions,
        services={"deployment_id": args.id, "ledger": args.ledger},
        deployment_service=args.discovery,
        heartbeat_interval=1.0,
        heartbeat_ttl=60.0,
        nats_url=args.nats_url,
        amqp_url=args.amqp_url,
        events=args.events,
        durable_notify=args.durable_notify,
        delivery=DeliveryPolicy(max_attempts=3, backoff=0.2, max_backoff=1.0, ack_wait=args.ack_wait),
        drain_timeout=2.0,
        security=False,
    ).run()


if __name__ == "__main__":
    main()
