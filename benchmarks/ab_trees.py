"""Compare pikku_mq from two or more source trees against the raw floor, in interleaved rounds.

A change worth a few percent of CPU per call hides in the noise of this shared VM unless the code
before and after it runs in the same minutes. This script starts the raw echo server of
``--transport`` and one ``PikkuWorker`` per tree, each with its tree first on ``PYTHONPATH``. It
then runs ``rpc_client.py`` against each of them in turn, once per round, so that every round
measures all of them under the same load. The caller of each tree runs from that tree as well.

For each tree, the report gives its sequential p50 and its calls/s at 64 in flight as ratios to
the raw floor of the same round: the median over the rounds, then each round's ratio. It also gives
the median CPU µs per call of the caller and of the worker. Needs NATS (for ``nats``) and Redis on their
standard ports on 127.0.0.1; uses a subject prefix and Redis key prefixes of its own and removes the
keys.

Run from the repository root, for example to compare a commit with the working tree:
``git worktree add /tmp/before <commit>`` and then
``python benchmarks/ab_trees.py --transport nats --rounds 4 /tmp/before .``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from nats_feature_floor import nats_server_pid
from nats_latency_split import start as start_server

NATS_URL = "nats://127.0.0.1:4222"
REDIS_URL = "redis://127.0.0.1:6379/0"
PHASES = ["--sequential", "2000", "--sequential-seconds", "2", "--seconds", "3", "--warmup", "0.5"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trees", nargs="+", type=Path, help="source trees, each holding pikku_mq/ and benchmarks/")
    parser.add_argument("--transport", choices=("nats", "http"), default="nats")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    for tree in trees:
        if not (tree / "pikku_mq").is_dir() or not (tree / "benchmarks" / "rpc_client.py").is_file():
            raise SystemExit(f"{tree} is not a pikku_mq source tree: pikku_mq/ or benchmarks/rpc_client.py not found")

    tag = f"ab{uuid.uuid4().hex[:8]}"
    cases: dict[str, tuple[Path, list[str]]] = {}
    servers: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if args.transport == "nats":
            subject = f"raw{tag}.echo"
            servers["raw"] = start(trees[0], ["raw-nats", "--subject", subject])
            cases["raw"] = (trees[0], ["raw-nats", "--subject", subject])
        else:
            port = free_port()
            servers["raw"] = start(trees[0], ["raw-http", "--port", str(port)])
            cases["raw"] = (trees[0], ["raw-http", "--url", f"http://127.0.0.1:{port}/remote/rpc/echo"])
        for index, tree in enumerate(trees):
            name = f"tree {index}"
            prefix = f"{tag}{index}:"
            endpoint = f"{NATS_URL}/{tag}{index}" if args.transport == "nats" else f"http://127.0.0.1:{free_port()}"
            argv = ["pikku", "--endpoint", endpoint, "--id", f"{tag}-{index}", "--redis-url", REDIS_URL]
            servers[name] = start(tree, [*argv, "--key-prefix", prefix])
            cases[name] = (tree, ["pikku", "--redis-url", REDIS_URL, "--key-prefix", prefix])

        results: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
        for round_number in range(args.rounds):
            for name, (tree, client) in cases.items():
                results[name].append(measure(tree, client, servers[name].pid, args.transport))
            line = ", ".join(f"{name}: {r[-1]['p50']:.0f} µs, {r[-1]['calls']:,.0f}/s" for name, r in results.items())
            print(f"round {round_number + 1}: {line}", flush=True)
    finally:
        for process in servers.values():
            process.terminate()
        for process in servers.values():
            process.wait(timeout=30)
        delete_keys(tag)

    report(trees, results)


def start(tree: Path, argv: list[str]) -> subprocess.Popen[bytes]:
    """Start a server of the tree's rpc_servers.py, with the tree first on PYTHONPATH."""
    return start_server(argv, {"PYTHONPATH": str(tree)}, tree / "benchmarks")


def measure(tree: Path, client: list[str], server_pid: int, transport: str) -> dict[str, float]:
    """Run one rpc_client.py measurement of the tree and return its figures."""
    argv = [sys.executable, "rpc_client.py", *client, "--pids", str(server_pid), *PHASES]
    if transport == "nats":
        argv += ["--broker-pids", nats_server_pid()]
    done = subprocess.run(
        argv, cwd=tree / "benchmarks", env=env_for(tree), capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    concurrent = report["concurrent"]
    return {
        "p50": report["sequential"]["p50_us"],
        "calls": concurrent["calls_per_s"],
        "client_cpu": concurrent["client_cpu_us"],
        "server_cpu": concurrent["server_cpu_us"],
    }


def report(trees: list[Path], results: dict[str, list[dict[str, float]]]) -> None:
    raw = results["raw"]
    print(f"raw floor: p50 {median(raw, 'p50'):.0f} µs, {median(raw, 'calls'):,.0f} calls/s at 64 in flight")
    for index, tree in enumerate(trees):
        runs = results[f"tree {index}"]
        p50 = [run["p50"] / floor["p50"] for run, floor in zip(runs, raw, strict=True)]
        calls = [run["calls"] / floor["calls"] for run, floor in zip(runs, raw, strict=True)]
        print(
            f"tree {index} ({tree}): p50 ÷ raw {statistics.median(p50):.2f} ({rounded(p50)}), "
            f"calls/s ÷ raw {statistics.median(calls):.2f} ({rounded(calls)}), "
            f"CPU µs per call: caller {median(runs, 'client_cpu'):.1f}, worker {median(runs, 'server_cpu'):.1f}"
        )


def median(runs: list[dict[str, float]], key: str) -> float:
    return statistics.median(run[key] for run in runs)


def rounded(values: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in values)


def env_for(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree)}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def delete_keys(tag: str) -> None:
    import redis

    client: Any = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{tag}*"))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


if __name__ == "__main__":
    main()
