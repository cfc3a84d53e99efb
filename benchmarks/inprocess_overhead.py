"""Measure pikku_mq's own work per call, without any I/O: the worker's dispatcher, and a whole call in memory.

Reports CPU µs per call. Runs on uvloop in one process, with the benchmark's validated ``echo`` and a 100-byte payload:

- ``Dispatcher.handle`` plus the encoding of its result, as a broker worker (msgpack) and an HTTP
  worker (JSON) run them for each call;
- ``rpc.remote("echo", ...)`` to a PikkuWorker on the in-memory transport, which runs the caller's
  routing and the worker's dispatch in this process;
- an ``asyncio.timeout()`` scope around an await, which ``Dispatcher.execute`` put around each
  function before it had a timer of its own, beside a bare ``loop.call_at`` timer;
- the steps of the worker's part that carry the call's data: the msgpack body, the input and output
  validation, the de-duplication fingerprint and the reply's encoding, each timed on its own;
- with ``PIKKU_REMOTE_SECRET``: the caller's signing of a call with a session (digest, sealed
  session, token) and the worker's check of it, beside PyJWT's own ``jwt.encode`` and ``jwt.decode``
  of the same token for comparison.

Run from the repository root: ``python benchmarks/inprocess_overhead.py [--calls 20000]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import msgpack
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rpc_echo import echo, make_payload

from pikku_mq import RPC, FunctionRegistry, MemoryDeploymentService, MemoryRegistry, PikkuWorker
from pikku_mq._dedup import fingerprint
from pikku_mq._dispatch import Dispatcher
from pikku_mq._security import TOKEN_AUDIENCE, RemoteSecurity

HEADERS = {"x-request-id": "a" * 32, "pikku-call-id": "b" * 32, "pikku-hop": "1", "pikku-deadline-ms": "29999"}
SECRET = "pikku-bench-secret-" + "0123456789abcdef" * 2
SESSION = {"userId": "bench-user", "roles": ["reader"]}


async def per_call(call: Callable[[], Awaitable[Any]], calls: int) -> float:
    """Return the mean CPU µs per call of ``calls`` calls, after ``calls // 10`` warm-up calls.

    CPU time of this process, not wall time, so other processes on the machine distort it less.
    """
    for _ in range(calls // 10):
        await call()
    started = time.process_time()
    for _ in range(calls):
        await call()
    return (time.process_time() - started) / calls * 1e6


async def main(calls: int) -> None:
    payload = make_payload(100)
    registry = FunctionRegistry()
    registry.add(echo.__pikku__)
    dispatcher = Dispatcher(registry)

    # A fresh call id per call: echo is idempotent, so a repeated id would return the recorded result.
    async def broker_worker() -> None:
        headers = {**HEADERS, "pikku-call-id": os.urandom(16).hex()}
        (await dispatcher.handle("echo", payload, headers)).encode_python()

    async def http_worker() -> None:
        headers = {**HEADERS, "pikku-call-id": os.urandom(16).hex()}
        (await dispatcher.handle("echo", payload, headers)).encode_json()

    print(f"Dispatcher.handle + encode_python: {await per_call(broker_worker, calls):.1f} µs")
    print(f"Dispatcher.handle + encode_json:   {await per_call(http_worker, calls):.1f} µs")

    mesh = MemoryRegistry()
    caller = MemoryDeploymentService(mesh)
    worker = PikkuWorker(endpoint="memory://bench", functions=[echo], deployment_service=MemoryDeploymentService(mesh))
    async with worker:
        rpc = RPC(deployment_service=caller)
        result = await per_call(lambda: rpc.remote("echo", payload), calls)
        print(f"rpc.remote over the memory transport, both sides: {result:.1f} µs")
    await caller.close()

    await pieces(registry, payload, calls)
    await deadline_scope(calls)
    await signing(payload, calls)


async def pieces(registry: FunctionRegistry, payload: dict[str, Any], calls: int) -> None:
    """Time the steps of the worker's part that the echo call cannot skip, each on its own."""
    definition = registry.get("echo")
    assert definition is not None
    value = definition.validate_input(payload)
    body = msgpack.packb({"data": payload})

    async def nothing() -> None:
        return None

    steps: dict[str, Callable[[], Any]] = {
        "msgpack body decoded": lambda: msgpack.unpackb(body),
        "input validated (pydantic model)": lambda: definition.validate_input(payload),
        "output validated and written as JSON": lambda: definition.dump_json(definition.validate_output(value)),
        "de-duplication fingerprint of the data": lambda: fingerprint(payload, None),
        "reply encoded (msgpack)": lambda: msgpack.packb({"status": 200, "body": payload}),
    }
    bare = await per_call(nothing, calls)
    for label, step in steps.items():

        async def timed(step: Callable[[], Any] = step) -> None:
            step()

        print(f"  step, {label}: {await per_call(timed, calls) - bare:.1f} µs")


async def deadline_scope(calls: int) -> None:
    loop = asyncio.get_running_loop()

    async def nothing() -> None:
        return None

    async def scoped() -> None:
        async with asyncio.timeout(30.0):
            await nothing()

    async def timer() -> None:
        handle = loop.call_at(loop.time() + 30.0, print)
        await nothing()
        handle.cancel()

    bare = await per_call(nothing, calls)
    print(f"asyncio.timeout() around an await: {await per_call(scoped, calls) - bare:.1f} µs")
    print(f"loop.call_at() timer around an await: {await per_call(timer, calls) - bare:.1f} µs")


async def signing(payload: dict[str, Any], calls: int) -> None:
    security = RemoteSecurity(SECRET)

    async def sign() -> str:
        return security.signer("echo", payload, SESSION)()

    print(f"signing a call with a session (caller): {await per_call(sign, calls):.1f} µs")

    # Each token is accepted once (its jti), so every check gets a token of its own.
    tokens = iter([await sign() for _ in range(calls + calls // 10)])

    async def verify() -> None:
        security.verify(next(tokens), "echo", payload)

    print(f"checking a signed call (worker): {await per_call(verify, calls):.1f} µs")

    key = SECRET.encode()
    token = (await sign()).removeprefix("Bearer ")
    claims = jwt.decode(token, key, algorithms=["HS256"], audience=TOKEN_AUDIENCE)

    async def pyjwt_encode() -> None:
        jwt.encode(claims, key, algorithm="HS256")

    async def pyjwt_decode() -> None:
        jwt.decode(
            token, key, algorithms=["HS256"], audience=TOKEN_AUDIENCE, options={"require": ["exp", "iat", "aud"]}
        )

    print(f"PyJWT jwt.encode of the same claims: {await per_call(pyjwt_encode, calls):.1f} µs")
    print(f"PyJWT jwt.decode of the same token: {await per_call(pyjwt_decode, calls):.1f} µs")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000, help="timed calls per measurement")
    uvloop.run(main(parser.parse_args().calls))
