"""The ``pikku-mq`` command: run a worker, make one call, list deployments, run the demo.

Exit statuses: 0 on success, 1 when a call or a worker fails at run time, 2 for invalid arguments or
configuration (argparse's convention), 130 after Ctrl-C where a command does not handle it itself.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from types import ModuleType
from typing import Any, NoReturn

from ._dedup import DEFAULT_DEDUP_WINDOW
from ._dispatch import DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_IN_FLIGHT
from ._errors import ConfigurationError, PikkuMQError, function_not_found
from ._functions import FunctionDefinition, default_registry
from ._settings import (
    ENV_AMQP_URL,
    ENV_DISCOVERY_URL,
    ENV_METRICS_HOST,
    ENV_METRICS_PORT,
    ENV_NATS_URL,
    default_discovery_url,
)
from ._types import DEFAULT_TIMEOUT, DeploymentRecord
from ._worker import PikkuWorker
from .backends import DeploymentService, _redact, deployment_service_from_url
from .backends.base import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TTL
from .backends.sqlite import SqliteDeploymentService

__all__ = ["build_parser", "format_deployments", "main", "run"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Flags that configure a worker; a worker object named by MODULE:ATTR brings its own configuration.
_WORKER_FLAGS = {
    "deployment_id": "--id",
    "endpoint": "--endpoint",
    "fallback_endpoints": "--fallback-endpoint",
    "discovery": "--discovery",
    "heartbeat_interval": "--heartbeat-interval",
    "heartbeat_ttl": "--heartbeat-ttl",
    "bind_host": "--bind-host",
    "max_concurrency": "--max-concurrency",
    "max_in_flight": "--max-in-flight",
    "dedup_window": "--dedup-window",
    "nats_url": "--nats-url",
    "amqp_url": "--amqp-url",
    "metrics_port": "--metrics-port",
    "metrics_host": "--metrics-host",
}


class UsageError(Exception):
    """Invalid arguments: reported on stderr with exit status 2."""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and exit with its status."""
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status: int = args.handler(args)
    except UsageError as exc:
        parser.exit(EXIT_USAGE, f"{parser.prog} {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return status


# -- arguments -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of ``pikku-mq`` and its commands."""
    parser = argparse.ArgumentParser(
        prog="pikku-mq",
        description="Run pikku_mq workers and call their functions from the command line.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_worker_parser(commands)
    _add_call_parser(commands)
    _add_ls_parser(commands)
    _add_demo_parser(commands)
    return parser


def _add_discovery_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--discovery",
        metavar="URL",
        help="discovery URL: sqlite:///path, postgresql://..., redis://... or an SQLAlchemy async URL such as "
        f"mysql+aiomysql://...; default: ${ENV_DISCOVERY_URL}, else the SQLite file pikku-mq.db in the working "
        "directory",
    )


def _add_log_level_flag(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help=f"level of the log lines written to stderr (default: {default})",
    )


def _add_worker_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "worker",
        help="serve the exposed functions of a module",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Serve the exposed functions defined in MODULE (and its submodules), register them in the\n"
            "discovery store and heartbeat until SIGTERM or SIGINT, then deregister, finish the calls in\n"
            "flight and exit 0. The working directory is added to the import path, as `python -m` does.\n\n"
            "MODULE:ATTR names a PikkuWorker object, or a function that takes no arguments and returns\n"
            "one. That worker keeps its own configuration, so the worker flags below are rejected with\n"
            "MODULE:ATTR."
        ),
    )
    parser.add_argument("target", metavar="MODULE[:ATTR]", help="module to serve, e.g. myapp.functions")
    parser.add_argument("--id", dest="deployment_id", metavar="ID", help="deployment id (default: host-pid-random)")
    parser.add_argument(
        "--endpoint",
        metavar="URL",
        help="URL to listen on and advertise: http://host:port (port 0 picks a free port) or "
        "nats://host:port/SUBJECT_PREFIX or amqp://host:port/<vhost>?queue=<queue> (default: http://127.0.0.1:0)",
    )
    parser.add_argument(
        "--fallback-endpoint",
        dest="fallback_endpoints",
        metavar="URL",
        action="append",
        help="endpoint that callers try when they cannot use --endpoint; repeat for several",
    )
    _add_discovery_flag(parser)
    parser.add_argument(
        "--nats-url",
        metavar="URL",
        help=f"NATS server that a nats:// endpoint is served through, credentials included; never advertised "
        f"(default: ${ENV_NATS_URL}, else the address in the endpoint)",
    )
    parser.add_argument(
        "--amqp-url",
        metavar="URL",
        help=f"broker URL with credentials that an amqp:// endpoint connects with; default: ${ENV_AMQP_URL}, "
        "else amqp://guest:guest@127.0.0.1:5672/",
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive_seconds,
        metavar="SECONDS",
        help=f"seconds between heartbeats (default: {DEFAULT_HEARTBEAT_INTERVAL:g})",
    )
    parser.add_argument(
        "--heartbeat-ttl",
        type=_positive_seconds,
        metavar="SECONDS",
        help=f"seconds without a heartbeat after which callers treat this worker as dead; must be greater "
        f"than --heartbeat-interval (default: {DEFAULT_HEARTBEAT_TTL:g})",
    )
    parser.add_argument(
        "--bind-host",
        metavar="HOST",
        help="address the HTTP endpoints listen on when it differs from the advertised host, e.g. 0.0.0.0 "
        "(default: the endpoint's host)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=_positive_int,
        metavar="N",
        help=f"functions run at once; further calls wait for a free slot (default: {DEFAULT_MAX_CONCURRENCY})",
    )
    parser.add_argument(
        "--max-in-flight",
        type=_positive_int,
        metavar="N",
        help=f"calls accepted at once, running or waiting; past it the worker replies busy and callers try "
        f"another instance (default: {DEFAULT_MAX_IN_FLIGHT})",
    )
    parser.add_argument(
        "--dedup-window",
        type=_non_negative_seconds,
        metavar="SECONDS",
        help=f"seconds this worker keeps the reply of a call to an idempotent function, so a retry with the "
        f"same call id gets it instead of running the function again; 0 turns this off "
        f"(default: {DEFAULT_DEDUP_WINDOW:g})",
    )
    parser.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help=f"serve Prometheus metrics on http://HOST:PORT/metrics, apart from the endpoints, and turn metrics "
        f"on; 0 picks a free port (default: ${ENV_METRICS_PORT}, else none). Needs pikku-mq[metrics]",
    )
    parser.add_argument(
        "--metrics-host",
        metavar="HOST",
        help=f"address that --metrics-port listens on (default: ${ENV_METRICS_HOST}, else 127.0.0.1)",
    )
    _add_log_level_flag(parser, "INFO")
    parser.set_defaults(handler=_run_worker)


def _add_call_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "call",
        help="call a function once and print its result",
        description="Call NAME on a live instance found through discovery and print the result as JSON on "
        "stdout. A typed error is printed on stderr and the exit status is 1.",
    )
    parser.add_argument("name", metavar="NAME", help="function name")
    parser.add_argument("data", metavar="JSON", nargs="?", help="input data as JSON (default: null)")
    _add_discovery_flag(parser)
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of the call in seconds (default: {DEFAULT_TIMEOUT:g})",
    )
    _add_log_level_flag(parser, "WARNING")
    parser.set_defaults(handler=_run_call)


def _add_ls_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "ls",
        help="list the registered deployments",
        description="List the deployments in the discovery store with their endpoint, functions, heartbeat "
        "age and state (live, or stale when the last heartbeat is older than the deployment's TTL).",
    )
    _add_discovery_flag(parser)
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    parser.add_argument(
        "--heartbeat-ttl",
        type=_positive_seconds,
        default=DEFAULT_HEARTBEAT_TTL,
        metavar="SECONDS",
        help=f"heartbeat age in seconds after which a deployment that records no TTL of its own (one "
        f"registered by Pikku) is shown as stale (default: {DEFAULT_HEARTBEAT_TTL:g})",
    )
    _add_log_level_flag(parser, "WARNING")
    parser.set_defaults(handler=_run_ls)


def _add_demo_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "demo",
        help="run a mesh of worker processes on a temporary SQLite registry",
        description="Start four worker processes on a temporary SQLite registry, call functions across them, "
        "kill one instance with SIGKILL while calls go on, show the calls moving to the other instance, then "
        "stop everything. Needs no server; exits 0 if every step worked.",
    )
    _add_log_level_flag(parser, "WARNING")
    parser.set_defaults(handler=_run_demo)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) > 65535:
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


def _non_negative_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds, 0 or more, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r}")
    return value


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=_LOG_FORMAT, stream=sys.stderr)


def _discovery_url(args: argparse.Namespace) -> str:
    url: str | None = args.discovery
    return url or default_discovery_url()


# -- worker ----------------------------------------------------------------------------------------


def _run_worker(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    module_name, _, attr = args.target.partition(":")
    module = _import_module(module_name)

    try:
        worker = _worker_from_attr(module, attr, args) if attr else _worker_for_module(module, args)
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None

    try:
        worker.run()
    except ConfigurationError as exc:
        # Raised at start, for example when the endpoint's port is taken.
        logger.error("worker %s failed to start: %s", worker.deployment_id, exc)  # noqa: TRY400 - no traceback
        return EXIT_USAGE
    except PikkuMQError as exc:
        logger.error("worker %s failed: %s: %s", worker.deployment_id, type(exc).__name__, exc)  # noqa: TRY400
        return EXIT_FAILURE
    return EXIT_OK


def _import_module(name: str) -> ModuleType:
    if not name:
        raise UsageError("missing module name; pass MODULE or MODULE:ATTR, e.g. myapp.functions")
    # As with `python -m`, modules in the working directory are importable.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise UsageError(f"module {name!r} was not found in the working directory or the import path") from None
        raise


def _worker_for_module(module: ModuleType, args: argparse.Namespace) -> PikkuWorker:
    functions = _functions_of(module)
    if not any(definition.expose for definition in functions):
        raise UsageError(
            f"module {module.__name__!r} defines no exposed functions; decorate them with "
            "@pikku_func(expose=True) or @pikku_sessionless_func(expose=True)"
        )

    options: dict[str, Any] = {
        "functions": functions,
        "deployment_service": _discovery_url(args),
        "fallback_endpoints": args.fallback_endpoints or (),
    }
    for name in (
        "deployment_id",
        "endpoint",
        "heartbeat_interval",
        "heartbeat_ttl",
        "bind_host",
        "max_concurrency",
        "max_in_flight",
        "dedup_window",
        "nats_url",
        "amqp_url",
        "metrics_port",
        "metrics_host",
    ):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    return PikkuWorker(**options)


def _functions_of(module: ModuleType) -> list[FunctionDefinition]:
    """Return the registered functions defined in ``module`` or its submodules.

    Functions of other modules that the process imported are left out, so two services imported in
    one process do not serve each other's functions.
    """
    prefix = module.__name__ + "."
    return [
        definition
        for definition in default_registry
        if definition.func.__module__ == module.__name__ or definition.func.__module__.startswith(prefix)
    ]


def _worker_from_attr(module: ModuleType, attr: str, args: argparse.Namespace) -> PikkuWorker:
    conflicting_flags = [flag for name, flag in _WORKER_FLAGS.items() if getattr(args, name) is not None]
    if conflicting_flags:
        raise UsageError(
            f"{', '.join(conflicting_flags)} cannot be combined with MODULE:ATTR, because the worker "
            f"{module.__name__}:{attr} has its own configuration; set it there or pass MODULE only"
        )

    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise UsageError(f"module {module.__name__!r} has no attribute {attr!r}") from None

    label = f"{module.__name__}:{attr}"
    if isinstance(target, PikkuWorker):
        return target
    _check_factory(target, label)
    worker = target()
    if not isinstance(worker, PikkuWorker):
        raise UsageError(f"{label}() returned {type(worker).__name__}, not a PikkuWorker")
    return worker


def _check_factory(target: Any, label: str) -> None:
    """Raise :class:`UsageError` unless ``target`` is a plain function that can be called without arguments."""
    if isinstance(getattr(target, "__pikku__", None), FunctionDefinition):
        raise UsageError(f"{label} is a pikku function, not a worker; pass the module alone to serve its functions")
    if not callable(target):
        raise UsageError(f"{label} is neither a PikkuWorker nor a function that returns one")
    if inspect.iscoroutinefunction(target):
        raise UsageError(f"{label} is an async function; the worker factory must be a plain function")
    try:
        inspect.signature(target).bind()
    except TypeError:
        raise UsageError(f"{label} must be callable without arguments to build the worker") from None
    except ValueError:
        pass  # no signature to inspect (some builtins): let the call itself report a problem


# -- call ------------------------------------------------------------------------------------------


def _run_call(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    data = _parse_json(args.data)
    try:
        result = asyncio.run(_call(_discovery_url(args), args.name, data, args.timeout))
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    except PikkuMQError as exc:
        _print_error(exc)
        return EXIT_FAILURE

    print(json.dumps(result, ensure_ascii=False))
    return EXIT_OK


def _parse_json(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"invalid JSON input data: {exc}; quote it for the shell, e.g. '{{\"a\": 1}}'") from None


async def _call(url: str, name: str, data: Any, timeout: float) -> Any:
    # One call needs no change feed, whose subscription would cost a connection and a round trip.
    service = deployment_service_from_url(url, change_feed=False)
    if _registry_file_missing(service):
        await service.close()
        missing = function_not_found(name)
        missing.message += f"; the registry file of {_redact(url)} does not exist, so no worker is registered there"
        raise missing
    async with service:
        return await service.invoke(name, data, timeout=timeout)


def _registry_file_missing(service: DeploymentService) -> bool:
    """Return whether ``service`` is an SQLite registry whose file does not exist.

    ``call`` and ``ls`` only read, so they report an empty registry instead of creating the file (a
    mistyped path or the wrong working directory would otherwise leave a stray database behind).
    """
    return isinstance(service, SqliteDeploymentService) and not service.path.exists()


def _print_error(error: PikkuMQError) -> None:
    envelope = error.to_envelope()
    print(f"{envelope['name']} ({error.http_status}, {envelope['code']}): {envelope['message']}", file=sys.stderr)
    if envelope["payload"] is not None:
        print(f"payload: {json.dumps(envelope['payload'], ensure_ascii=False)}", file=sys.stderr)


# -- ls --------------------------------------------------------------------------------------------


def _run_ls(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    url = _discovery_url(args)
    try:
        records = asyncio.run(_list(url, args.heartbeat_ttl))
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    except PikkuMQError as exc:
        _print_error(exc)
        return EXIT_FAILURE

    if args.json:
        print(json.dumps([asdict(record) for record in records], indent=2))
    elif records:
        print(format_deployments(records))
    else:
        print(f"no deployments registered in {_redact(url)}")
    return EXIT_OK


async def _list(url: str, heartbeat_ttl: float) -> list[DeploymentRecord]:
    # The interval only has to be below the TTL: this service never heartbeats.
    interval = min(DEFAULT_HEARTBEAT_INTERVAL, heartbeat_ttl / 2)
    service = deployment_service_from_url(url, heartbeat_interval=interval, heartbeat_ttl=heartbeat_ttl)
    if _registry_file_missing(service):
        await service.close()
        return []
    async with service:
        records = await service.list_deployments()
    return sorted(records, key=lambda record: record.deployment_id)


def format_deployments(records: Sequence[DeploymentRecord]) -> str:
    """Format deployments as a table with one row per deployment.

    Ids, endpoints and function names come from the registry, which any instance writes, so characters
    that a terminal would act on (newlines, escape sequences) are shown as Python escapes.
    """
    header = ("ID", "STATE", "HEARTBEAT", "ENDPOINT", "FUNCTIONS")
    rows = [
        (
            _printable(record.deployment_id),
            record.state,
            f"{record.heartbeat_age:.1f} s ago",
            " ".join(_printable(endpoint) for endpoint in (record.endpoint, *record.fallback_endpoints)),
            ", ".join(_printable(name) for name in record.functions),
        )
        for record in records
    ]
    widths = [max(len(row[column]) for row in (header, *rows)) for column in range(len(header) - 1)]
    lines = []
    for row in (header, *rows):
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join((*cells, row[-1])))
    return "\n".join(lines)


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


# -- demo ------------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    # Imported here: the other commands do not need the demo.
    from .demo.runner import run_demo

    return run_demo()
