"""A worker process for the fault drills: it serves one plain and one idempotent function.

``python drill_worker.py --id ID --discovery URL --endpoint URL --runs-file PATH [--nats-url URL]
[--amqp-url URL] [--fallback-endpoint URL] [--heartbeat-interval S] [--heartbeat-ttl S]``. Each
function appends the caller's token to the runs file before it does its work, so a drill can count how
often each logical call ran.
Both return ``"<deployment id>:<pid>"``, so a drill can tell a restarted instance from its predecessor.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from typing import Any

from pydantic import BaseModel

from pikku_mq import FunctionRegistry, PikkuWorker, pikku_sessionless_func

functions = FunctionRegistry()


class DrillIn(BaseModel):
    token: str
    """The drill's id of the logical call, the same on every attempt."""
    work: float = 0.0
    """Seconds the function takes after it recorded the run."""


class RunLog:
    """Appends one line per run to a file, unbuffered, so a run recorded before a SIGKILL is not lost."""

    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def record(self, token: str) -> None:
        # One write(2) of a short line to a file opened with O_APPEND is not interleaved with other writers.
        os.write(self._fd, f"{token}\n".encode())


async def _run(services: dict[str, Any], data: DrillIn) -> str:
    services["runs"].record(data.token)
    if data.work > 0:
        await asyncio.sleep(data.work)
    return f"{services['deployment_id']}:{os.getpid()}"


@pikku_sessionless_func(expose=True, registry=functions)
async def drill_plain(services: dict[str, Any], data: DrillIn) -> str:
    return await _run(services, data)


@pikku_sessionless_func(expose=True, idempotent=True, registry=functions)
async def drill_idempotent(services: dict[str, Any], data: DrillIn) -> str:
    return await _run(services, data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--id", required=True, help="deployment id")
    parser.add_argument("--discovery", required=True, help="discovery URL, such as sqlite:///registry.db")
    parser.add_argument("--endpoint", required=True, help="endpoint to serve and advertise")
    parser.add_argument("--fallback-endpoint", action="append", default=[], help="fallback endpoint; repeatable")
    parser.add_argument("--runs-file", required=True, help="file that receives the token of every run")
    parser.add_argument("--nats-url", default=None, help="NATS server of a nats:// endpoint")
    parser.add_argument("--amqp-url", default=None, help="AMQP broker of an amqp:// endpoint, with credentials")
    parser.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds between heartbeats")
    parser.add_argument("--heartbeat-ttl", type=float, default=2.0, help="seconds until a silent instance is stale")
    parser.add_argument("--drain-timeout", type=float, default=5.0, help="seconds to finish calls in flight on stop")
    args = parser.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    PikkuWorker(
        deployment_id=args.id,
        deployment_service=args.discovery,
        registry=functions,
        services={"deployment_id": args.id, "runs": RunLog(args.runs_file)},
        heartbeat_interval=args.heartbeat_interval,
        heartbeat_ttl=args.heartbeat_ttl,
        drain_timeout=args.drain_timeout,
        endpoint=args.endpoint,
        fallback_endpoints=args.fallback_endpoint,
        nats_url=args.nats_url,
        amqp_url=args.amqp_url,
    ).run()


if __name__ == "__main__":
    main()
