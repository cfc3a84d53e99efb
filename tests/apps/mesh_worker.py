"""A worker process for the process tests: it serves the functions named on its command line.

``python mesh_worker.py --id ID --discovery URL --functions greet,whoami [--heartbeat-interval S]
[--heartbeat-ttl S] [--endpoint URL] [--fallback-endpoint URL ...] [--schema NAME]
[--key-prefix PREFIX] [--no-heartbeat-thread]``. The results name the deployment
id of the worker that ran the call, so a test can tell which instance served it. Tests import this
module for :class:`GreetingRefusedError`, which must be defined on both sides to be re-raised as the same
class.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pikku_mq import (
    BadRequestError,
    DeploymentService,
    FunctionRegistry,
    PikkuWorker,
    Wire,
    deployment_service_from_url,
    pikku_sessionless_func,
)

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


class CountIn(BaseModel):
    ledger: str
    tag: str
    hold: float = 0.0
    """Seconds the call takes after it is counted, so that calls are in flight when a worker stops."""


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


@pikku_sessionless_func(expose=True, registry=functions)
async def block_loop(services: dict[str, Any], data: SlowIn) -> str:
    """Block the event loop for ``seconds``, as CPU-bound code would, and return the deployment id."""
    Path(data.started_marker).touch()  # noqa: ASYNC240 - blocking the loop is the point
    time.sleep(data.seconds)  # noqa: ASYNC251
    return str(services["deployment_id"])


@pikku_sessionless_func(expose=True, registry=functions)
async def count(services: dict[str, Any], data: CountIn) -> str:
    """Append ``data.tag`` to the file ``data.ledger``, so a test can count runs, and return ``<id>@<pid>``.

    The process id distinguishes two processes that served under the same deployment id, one after the other.
    """
    # Append mode puts each call's single short write at the end of the file, whichever process makes it.
    with Path(data.ledger).open("a") as ledger:  # noqa: ASYNC230
        ledger.write(data.tag + "\n")
    await asyncio.sleep(data.hold)
    return f"{services['deployment_id']}@{os.getpid()}"


class ChainIn(BaseModel):
    """A call that travels along ``route``, a list of function names, one process per hop."""

    route: list[str]
    pause: float = 0.0
    """Seconds each hop waits before it calls the next one."""
    blocking: bool = False
    """Whether the wait blocks the event loop (time.sleep), so the worker cannot cancel the function at its deadline."""
    arrivals_dir: str
    """A folder where each hop that runs creates a file named after its deployment id and hop."""


async def _travel(services: dict[str, Any], data: ChainIn, wire: Wire) -> dict[str, Any]:
    """Record the arrival, wait, then call the next function of the route, or report the budget left at the end."""
    arrival = Path(data.arrivals_dir) / f"{services['deployment_id']}-{wire.hop}"
    await asyncio.to_thread(arrival.touch)
    if data.blocking:
        time.sleep(data.pause)  # noqa: ASYNC251 - blocking on purpose
    else:
        await asyncio.sleep(data.pause)
    if not data.route:
        return {"remaining": wire.remaining, "hop": wire.hop, "path": [services["deployment_id"]]}

    onward = data.model_copy(update={"route": data.route[1:]})
    result: dict[str, Any] = await wire.rpc.remote(data.route[0], onward)
    result["path"].insert(0, services["deployment_id"])
    return result


# The same function under three names, so that each process of a chain hosts one of them.
for _name in ("chain_a", "chain_b", "chain_c"):
    pikku_sessionless_func(expose=True, name=_name, registry=functions)(_travel)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--id", required=True, help="deployment id")
    parser.add_argument("--discovery", required=True, help="discovery URL, such as sqlite:///registry.db")
    parser.add_argument("--functions", required=True, help="comma-separated names of the functions to serve")
    parser.add_argument("--heartbeat-interval", type=float, default=10.0, help="seconds between heartbeats")
    parser.add_argument("--heartbeat-ttl", type=float, default=30.0, help="seconds until a silent instance is stale")
    parser.add_argument("--endpoint", default="http://127.0.0.1:0", help="endpoint to serve and advertise")
    parser.add_argument("--fallback-endpoint", action="append", default=[], help="fallback endpoint; repeatable")
    parser.add_argument("--schema", help="PostgreSQL schema of the registry, for a postgresql:// discovery URL")
    parser.add_argument("--key-prefix", help="Redis key prefix of the registry, for a redis:// discovery URL")
    parser.add_argument("--no-heartbeat-thread", action="store_true", help="heartbeat from the event loop")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options: dict[str, Any] = {
        "heartbeat_interval": args.heartbeat_interval,
        "heartbeat_ttl": args.heartbeat_ttl,
        "heartbeat_thread": not args.no_heartbeat_thread,
    }
    if args.schema:
        options["schema"] = args.schema
    if args.key_prefix:
        options["key_prefix"] = args.key_prefix
    service = deployment_service_from_url(args.discovery, **options)
    worker = PikkuWorker(
        deployment_id=args.id,
        deployment_service=service,
        registry=functions,
        functions=args.functions.split(","),
        services={"deployment_id": args.id},
        endpoint=args.endpoint,
        fallback_endpoints=args.fallback_endpoint,
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(worker, service))
    else:
        # As PikkuWorker.run does.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve(worker, service))


async def serve(worker: PikkuWorker, service: DeploymentService) -> None:
    """Serve until SIGTERM or SIGINT, then close the deployment service, which the worker does not own."""
    try:
        await worker.serve_until_signal()
    finally:
        await service.close()


if __name__ == "__main__":
    main()
