"""A worker process for the process tests: it serves the functions named on its command line.

``python mesh_worker.py --id ID --discovery URL --functions greet,whoami [--heartbeat-interval S]
[--heartbeat-ttl S] [--endpoint URL]``. The results name the deployment id of the worker that ran the call, so a test
can tell which instance served it. Tests import this module for :class:`GreetingRefusedError`, which
must be defined on both sides to be re-raised as the same class.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pikku_mq import BadRequestError, FunctionRegistry, PikkuWorker, Wire, pikku_sessionless_func

functions = FunctionRegistry()


class GreetIn(BaseModel):
    name: str


class GreetOut(BaseModel):
    greeting: str
    served_by: str


class SlowIn(BaseModel):
    seconds: float
    started_marker: str
    """A file the function creates once it runs, so a test can tell that the call is in flight."""


class GreetingRefusedError(BadRequestError):
    code = "greeting_refused"


@pikku_sessionless_func(expose=True, registry=functions)
async def greet(services: dict[str, Any], data: GreetIn) -> GreetOut:
    if data.name == "nobody":
        raise GreetingRefusedError("greet refuses to greet 'nobody'", payload={"name": data.name})
    return GreetOut(greeting=f"Hello, {data.name}!", served_by=services["deployment_id"])


@pikku_sessionless_func(expose=True, registry=functions)
async def farewell(services: dict[str, Any], data: GreetIn) -> GreetOut:
    return GreetOut(greeting=f"Goodbye, {data.name}!", served_by=services["deployment_id"])


@pikku_sessionless_func(expose=True, registry=functions)
async def remote_greet(services: dict[str, Any], data: GreetIn, wire: Wire) -> GreetOut:
    return await wire.rpc.remote("greet", data)


@pikku_sessionless_func(expose=True, registry=functions)
async def remote_farewell(services: dict[str, Any], data: GreetIn, wire: Wire) -> GreetOut:
    return await wire.rpc.remote("farewell", data)


@pikku_sessionless_func(expose=True, idempotent=True, registry=functions)
async def whoami(services: dict[str, Any]) -> str:
    return str(services["deployment_id"])


@pikku_sessionless_func(expose=True, registry=functions)
async def whoami_once(services: dict[str, Any]) -> str:
    """Like ``whoami`` but not idempotent, so a caller may move it only when it certainly did not run."""
    return str(services["deployment_id"])


@pikku_sessionless_func(expose=True, registry=functions)
async def slow(services: dict[str, Any], data: SlowIn) -> str:
    await asyncio.to_thread(Path(data.started_marker).touch)
    await asyncio.sleep(data.seconds)
    return str(services["deployment_id"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--id", required=True, help="deployment id")
    parser.add_argument("--discovery", required=True, help="discovery URL, such as sqlite:///registry.db")
    parser.add_argument("--functions", required=True, help="comma-separated names of the functions to serve")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0, help="seconds between heartbeats")
    parser.add_argument("--heartbeat-ttl", type=float, default=30.0, help="seconds until a silent instance is stale")
    parser.add_argument("--endpoint", default="http://127.0.0.1:0", help="endpoint to serve and advertise")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    PikkuWorker(
        deployment_id=args.id,
        deployment_service=args.discovery,
        registry=functions,
        functions=args.functions.split(","),
        services={"deployment_id": args.id},
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_ttl=args.heartbeat_ttl,
        endpoint=args.endpoint,
    ).run()


if __name__ == "__main__":
    main()
