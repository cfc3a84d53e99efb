"""A worker process for the hostile-input tests: functions of every kind behind one endpoint.

``python fuzz_worker.py --id ID --discovery URL --endpoint URL [--max-body-size BYTES]``. The worker
reads ``PIKKU_REMOTE_SECRET`` like any other, so the tests run it with a secret and sign most of their
inputs: a signed input reaches the function lookup, the metadata headers and input validation, and an
unsigned one the token checks. The functions cover what a hostile input can reach: any data, a typed
input, a name that NATS escapes, a session, an error raised on purpose, a hidden function and a wait
that a short deadline interrupts.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

from pydantic import BaseModel, Field

from pikku_mq import BadRequestError, FunctionRegistry, PikkuWorker, Wire, pikku_func, pikku_sessionless_func

functions = FunctionRegistry()

MAX_NAP_MS = 200
"""The maximum wait that ``nap`` accepts, in milliseconds, so that a deadline can run out while it waits."""


class GreetIn(BaseModel):
    name: str


class GreetOut(BaseModel):
    greeting: str


class MeasureIn(BaseModel):
    words: list[str] = Field(max_length=1000)
    limit: int = Field(default=10, ge=0, le=1000)
    tag: str | None = None


class NapIn(BaseModel):
    ms: int = Field(ge=0, le=MAX_NAP_MS)


class RejectedError(BadRequestError):
    code = "rejected"


@pikku_sessionless_func(expose=True, registry=functions)
async def echo(services: Any, data: Any) -> Any:
    return data


@pikku_sessionless_func(expose=True, registry=functions)
async def greet(services: Any, data: GreetIn) -> GreetOut:
    return GreetOut(greeting=f"Hello, {data.name}!")


@pikku_sessionless_func(expose=True, registry=functions)
async def measure(services: Any, data: MeasureIn) -> dict[str, Any]:
    selected = data.words[: data.limit]
    return {"count": len(selected), "letters": sum(len(word) for word in selected), "tag": data.tag}


@pikku_sessionless_func(expose=True, registry=functions, name="orders.create")
async def create_order(services: Any, data: Any) -> str:
    return "created"


@pikku_sessionless_func(expose=True, registry=functions, name="grüße")
async def greetings(services: Any) -> str:
    return "grüße"


@pikku_sessionless_func(expose=True, registry=functions)
async def nap(services: Any, data: NapIn) -> int:
    await asyncio.sleep(data.ms / 1000)
    return data.ms


@pikku_sessionless_func(expose=True, registry=functions)
async def reject(services: Any, data: Any) -> None:
    raise RejectedError("reject raises this error on every call", payload={"data_type": type(data).__name__})


@pikku_func(expose=True, registry=functions)
async def whoami(services: Any, data: Any, wire: Wire) -> Any:
    """Return the caller's session; a call without one gets 401 ``MissingSessionError``."""
    return wire.session


@pikku_sessionless_func(registry=functions)
async def hidden(services: Any, data: Any) -> str:
    return "a hidden function must never answer a remote call"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--id", required=True, help="deployment id")
    parser.add_argument("--discovery", required=True, help="discovery URL, such as sqlite:///registry.db")
    parser.add_argument("--endpoint", required=True, help="endpoint to serve and advertise")
    parser.add_argument("--max-body-size", type=int, default=1024 * 1024, help="request body limit, in bytes")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    PikkuWorker(
        deployment_id=args.id,
        deployment_service=args.discovery,
        registry=functions,
        endpoint=args.endpoint,
        max_body_size=args.max_body_size,
    ).run()


if __name__ == "__main__":
    main()
