"""nameko's side of the transport benchmark: an echo service, and the client that measures it.

nameko runs on eventlet, which patches the standard library and cannot share a process with asyncio,
so both sides run in processes of their own:

    python nameko_echo.py serve --amqp-url URL      # prints READY, stops on SIGTERM
    python nameko_echo.py call --amqp-url URL ...   # prints one JSON line, as rpc_client.py does

nameko is used with its defaults (10 workers per service, JSON serialisation). The client keeps
``--concurrency`` calls in flight with ``call_async`` on one ``ClusterRpcProxy``.
"""

import eventlet

eventlet.monkey_patch()

import argparse  # noqa: E402
import json  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402

from nameko.rpc import rpc  # noqa: E402
from nameko.runners import ServiceRunner  # noqa: E402
from nameko.standalone.rpc import ClusterRpcProxy  # noqa: E402
from rpc_client import CpuMeter, percentile, pid_list  # noqa: E402
from rpc_echo import make_payload  # noqa: E402

SERVICE = "bench_echo"


class EchoService:
    name = SERVICE

    @rpc
    def echo(self, data):
        return data


def serve(args):
    runner = ServiceRunner({"AMQP_URI": args.amqp_url})
    runner.add_service(EchoService)
    runner.start()
    print("READY", flush=True)
    stopped = eventlet.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.send(True))
    stopped.wait()
    runner.stop()


def measure(args):
    payload = make_payload(args.payload_size)
    with ClusterRpcProxy({"AMQP_URI": args.amqp_url}) as proxy:
        service = getattr(proxy, SERVICE)
        if service.echo(payload) != payload:
            raise RuntimeError("nameko returned something other than its payload")
        end = time.perf_counter() + args.warmup
        while time.perf_counter() < end:
            service.echo(payload)

        latencies = []
        started = time.perf_counter()
        end = started + args.sequential_seconds
        while len(latencies) < args.sequential and (time.perf_counter() < end or len(latencies) < 50):
            begin = time.perf_counter()
            service.echo(payload)
            latencies.append(time.perf_counter() - begin)
        elapsed = time.perf_counter() - started
        latencies.sort()
        report = {
            "sequential": {
                "calls": len(latencies),
                "p50_us": statistics.median(latencies) * 1e6,
                "p99_us": percentile(latencies, 0.99) * 1e6,
                "calls_per_s": len(latencies) / elapsed,
            }
        }

        meter = CpuMeter(args.pids, args.broker_pids)
        latencies = []
        pending = deque()
        started = time.perf_counter()
        stop_at = started + args.seconds
        for _ in range(args.concurrency):
            pending.append((time.perf_counter(), service.echo.call_async(payload)))
        while pending:
            begin, reply = pending.popleft()
            reply.result()
            now = time.perf_counter()
            latencies.append(now - begin)
            if now < stop_at:
                pending.append((now, service.echo.call_async(payload)))
        elapsed = time.perf_counter() - started
        latencies.sort()
        report["concurrent"] = {
            "calls": len(latencies),
            "calls_per_s": len(latencies) / elapsed,
            "p50_us": statistics.median(latencies) * 1e6,
            "p99_us": percentile(latencies, 0.99) * 1e6,
            **meter.stop(len(latencies), elapsed),
        }
        report["discovery_lookups"] = 0
    return report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("serve", "call"))
    parser.add_argument("--amqp-url", required=True, help="AMQP broker URL with the benchmark's vhost")
    parser.add_argument("--payload-size", type=int, default=100)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--sequential", type=int, default=2000)
    parser.add_argument("--sequential-seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--pids", type=pid_list, default=[])
    parser.add_argument("--broker-pids", type=pid_list, default=[])
    args = parser.parse_args()
    if args.mode == "serve":
        serve(args)
    else:
        print(json.dumps(measure(args)), flush=True)


if __name__ == "__main__":
    main()
