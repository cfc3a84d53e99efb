"""Profile the pikku_mq client and worker with py-spy while 64 calls are in flight, one transport at a time.

For each transport it starts a PikkuWorker (discovery in Redis, as in rpc_bench.py) and a client
process that keeps 64 ``rpc.remote`` calls in flight (``--concurrency 1`` makes them sequential),
then samples both processes with ``py-spy record`` for ``--seconds`` and writes, per process, the
functions with the most samples of their own (self) and with the most samples in their call tree
(total). Run from the repository root:

    python benchmarks/profile_hot_path.py [--transports http,nats,amqp] [--seconds 10] [--secret]

It needs py-spy (the ``bench`` extra) and permission to read the processes' memory (root, or
ptrace allowed). Summaries go to ``--out-dir``, and the raw collapsed stacks with ``--keep-raw``.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rpc_bench import (
    AMQP_BASE,
    HERE,
    NATS_URL,
    PYTHONPATH,
    ROOT,
    SMALL,
    TRANSPORTS,
    fixture_names,
    pikku_client,
    python,
    start_pikku,
    stop_servers,
    transport_list,
)

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")


def frame_name(frame: str) -> str:
    """Return ``function (short/path.py)`` for a py-spy frame ``function (path:line)``."""
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", "/work/wt-bench/", str(ROOT) + "/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['function']} ({path})"


def summarise(raw: Path, top: int) -> str:
    """Return the self and total sample shares of the busiest functions in a py-spy raw (collapsed) file."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [frame_name(f) for f in stack.split(";")]
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count

    lines = [f"{samples} samples", "", "self %  function"]
    lines += [f"{100 * n / samples:6.1f}  {name}" for name, n in own.most_common(top)]
    lines += ["", "total %  function"]
    lines += [f"{100 * n / samples:7.1f}  {name}" for name, n in total.most_common(top * 2)]
    return "\n".join(lines) + "\n"


def profile(transport: str, args: argparse.Namespace, out_dir: Path, raw_dir: Path) -> None:
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    amqp = transport == "amqp"
    with fixture_names(amqp) as fixture:
        group = f"profile-{transport}"
        worker = start_pikku(fixture, group, transport, group, secret=args.secret)
        env = {"PYTHONPATH": PYTHONPATH, "PIKKU_AMQP_URL": AMQP_BASE, "PIKKU_NATS_URL": NATS_URL}
        if args.secret:
            from rpc_bench import SECRET

            env["PIKKU_REMOTE_SECRET"] = SECRET
        command = [python(), "rpc_client.py", *pikku_client(fixture, group), "--payload-size", str(args.payload_size)]
        command += ["--warmup", "1", "--sequential", "1", "--seconds", str(args.seconds + 4)]
        command += ["--concurrency", str(args.concurrency)]
        client = subprocess.Popen(command, cwd=HERE, env={**_base_env(), **env}, stdout=subprocess.DEVNULL)
        try:
            time.sleep(2.5)
            label = f"{transport}{'-secret' if args.secret else ''}-{args.payload_size}"
            if args.concurrency != 64:
                label += f"-c{args.concurrency}"
            recorders = {}
            for side, pid in (("client", client.pid), ("worker", worker.pid)):
                raw = raw_dir / f"{label}-{side}.txt"
                command = [py_spy, "record", "-p", str(pid), "-d", str(args.seconds), "-r", str(args.rate)]
                command += ["-f", "raw", "-o", str(raw)]
                recorder = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                recorders[side] = (raw, recorder)
            for side, (raw, recorder) in recorders.items():
                recorder.wait(timeout=args.seconds + 60)
                summary = summarise(raw, args.top)
                (out_dir / f"{label}-{side}.txt").write_text(summary)
                print(f"== {label} {side}\n{summary}", flush=True)
            client.wait(timeout=60)
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
            stop_servers(fixture)


def _base_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PIKKU_REMOTE_SECRET"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transports", type=transport_list, default=list(TRANSPORTS), help="comma-separated")
    parser.add_argument("--seconds", type=int, default=10, help="seconds of sampling per process")
    parser.add_argument("--rate", type=int, default=250, help="samples per second")
    parser.add_argument("--payload-size", type=int, default=SMALL, help="bytes of the payload's compact JSON")
    parser.add_argument("--secret", action="store_true", help="sign calls with a remote secret on both sides")
    parser.add_argument("--concurrency", type=int, default=64, help="calls the client keeps in flight")
    parser.add_argument("--top", type=int, default=25, help="functions listed by self samples")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "profiles")
    parser.add_argument("--keep-raw", type=Path, help="folder for the raw collapsed stacks (default: discarded)")
    args = parser.parse_args()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pikku-profile-") as scratch:
        raw_dir = args.keep_raw or Path(scratch)
        raw_dir.mkdir(parents=True, exist_ok=True)
        for transport in args.transports:
            profile(transport, args, args.out_dir, raw_dir)


if __name__ == "__main__":
    main()
