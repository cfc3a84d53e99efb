"""Measure what the work per call that pikku_mq's design requires costs over NATS, written by hand.

Runs four cases of ``rpc_client.py`` against servers of ``rpc_servers.py``, interleaved over
``--rounds`` rounds, each with its sequential phase and 3 s at 64 calls in flight:

- ``raw-nats``: nats-py ``request()`` to a subscriber that sends the bytes back (the benchmark's floor);
- ``features-nats``: the same, plus only the work per call that pikku_mq's design requires: the four
  metadata headers, a task per request, a deadline timer, input and output validation, a de-duplication
  fingerprint and the status header (see ``features_nats_server`` in rpc_servers.py);
- ``features-nats, pikku_mq client``: ``features-nats`` on pikku_mq's subclass of nats-py's client,
  which writes its buffer when the first message has waited 1 ms;
- ``pikku-nats``: ``rpc.remote`` to a ``PikkuWorker``, with discovery in Redis.

The report gives the median over the rounds, with the lowest and highest, and each case's calls/s as a
ratio to the floor's from the same round. Needs NATS and Redis on their standard ports on 127.0.0.1;
uses subjects and a Redis key prefix of its own and removes the keys.

Run from the repository root: ``python benchmarks/nats_feature_floor.py [--rounds 3] [--quick]``.
``--quick`` makes each phase short, for a smoke run that measures nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from nats_latency_split import start

HERE = Path(__file__).resolve().parent
NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"


def nats_server_pid() -> str:
    found = subprocess.run(["pgrep", "-x", "nats-server"], capture_output=True, text=True, check=False).stdout.split()
    return found[0] if found else ""


QUICK = ["--warmup", "0.1", "--sequential", "100", "--sequential-seconds", "0.3", "--seconds", "0.5"]


def measure(client: list[str], server: subprocess.Popen[bytes], quick: bool) -> dict[str, float]:
    """Run one rpc_client.py measurement and return its figures."""
    argv = [sys.executable, "rpc_client.py", *client, "--pids", str(server.pid), "--broker-pids", nats_server_pid()]
    argv += QUICK if quick else []
    done = subprocess.run(argv, cwd=HERE, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(done.stdout.strip().splitlines()[-1])
    concurrent = report["concurrent"]
    return {
        "seq_p50_us": report["sequential"]["p50_us"],
        "calls_per_s": concurrent["calls_per_s"],
        "client_cpu_us": concurrent["client_cpu_us"],
        "server_cpu_us": concurrent["server_cpu_us"],
        "broker_cpu_us": concurrent["broker_cpu_us"],
        "machine_busy_share": concurrent["machine_busy_share"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--quick", action="store_true", help="short phases, for a smoke run")
    args = parser.parse_args()

    tag = f"floor{uuid.uuid4().hex[:8]}"
    key_prefix = f"{tag}:"
    env = {"PIKKU_NATS_URL": NATS_URL}
    servers = {
        "raw-nats": start(["raw-nats", "--subject", f"{tag}.raw"], env),
        "features-nats": start(["features-nats", "--subject", f"{tag}.features"], env),
        "features-nats, pikku_mq client": start(["features-nats", "--subject", f"{tag}.ours", "--pikku-client"], env),
        "pikku-nats": start(
            ["pikku", "--endpoint", f"{NATS_URL}/{tag}.pikku", "--id", f"{tag}-w", "--key-prefix", key_prefix], env
        ),
    }
    clients = {
        "raw-nats": ["raw-nats", "--subject", f"{tag}.raw"],
        "features-nats": ["features-nats", "--subject", f"{tag}.features"],
        "features-nats, pikku_mq client": ["features-nats", "--subject", f"{tag}.ours", "--pikku-client"],
        "pikku-nats": ["pikku", "--redis-url", REDIS_URL, "--key-prefix", key_prefix],
    }
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in clients}
    try:
        for number in range(args.rounds):
            for name, client in clients.items():
                runs[name].append(measure(client, servers[name], args.quick))
                figures = runs[name][-1]
                print(
                    f"round {number + 1} {name}: {figures['calls_per_s']:,.0f} calls/s, "
                    f"p50 {figures['seq_p50_us']:.0f} µs",
                    file=sys.stderr,
                )
    finally:
        for process in servers.values():
            process.terminate()
        for process in servers.values():
            process.wait(timeout=10)
        remove_keys(key_prefix)
    print(report(runs, args.rounds))


def remove_keys(prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(f"{prefix}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def spread(values: list[float], digits: int = 0) -> str:
    fmt = f"{{:,.{digits}f}}"
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def report(runs: dict[str, list[dict[str, Any]]], rounds: int) -> str:
    floor = runs["raw-nats"]
    lines = [
        "| case | calls/s @64 | ÷ raw | client CPU µs/call | server CPU µs/call | broker CPU µs/call | machine busy "
        "| seq p50 µs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, figures in runs.items():
        ratios = [figures[i]["calls_per_s"] / floor[i]["calls_per_s"] for i in range(rounds)]

        def median(key: str, figures: list[dict[str, Any]] = figures) -> float:
            return float(statistics.median(f[key] for f in figures))

        lines.append(
            f"| {name} | {spread([f['calls_per_s'] for f in figures])} | {spread(ratios, 2)} "
            f"| {median('client_cpu_us'):.0f} | {median('server_cpu_us'):.0f} | {median('broker_cpu_us'):.0f} "
            f"| {median('machine_busy_share'):.0%} | {median('seq_p50_us'):.0f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
