# PYTHON_ARGCOMPLETE_OK
"""The ``pikku-mq`` command: run a worker, make one call, list deployments, run the demo, print completion scripts.

Exit statuses: 0 on success, 1 when a call or a worker fails at run time, 2 for invalid arguments or
configuration (argparse's convention), 130 after Ctrl-C where a command does not handle it itself.
``call`` has a status of its own for each kind of failure (see :data:`CALL_EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import json
import logging
import math
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import asdict
from types import ModuleType
from typing import Any, NoReturn

from ._dedup import DEFAULT_DEDUP_WINDOW
from ._dispatch import DEFAULT_MAX_CONCURRENCY, DEFAULT_MAX_IN_FLIGHT
from ._errors import (
    BadRequestError,
    CallInterruptedError,
    ConfigurationError,
    DeadlineExceededError,
    DiscoveryError,
    EndpointUnreachableError,
    ForbiddenError,
    NotFoundError,
    PayloadTooLargeError,
    PikkuMQError,
    ProtocolError,
    RoutingError,
    ServiceUnavailableError,
    TransportError,
    UnauthorizedError,
    UnprocessableContentError,
    function_not_found,
)
from ._functions import FunctionDefinition, default_registry
from ._security import RemoteSecurity
from ._settings import (
    ENV_AMQP_URL,
    ENV_DISCOVERY_URL,
    ENV_METRICS_HOST,
    ENV_METRICS_PORT,
    ENV_NATS_URL,
    ENV_REMOTE_SECRET,
    default_discovery_url,
)
from ._types import DEFAULT_TIMEOUT, DeploymentInfo, DeploymentRecord
from ._watch import MIN_POLL_INTERVAL
from ._worker import PikkuWorker
from .backends import DeploymentService, _redact, deployment_service_from_url
from .backends.base import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TTL
from .backends.sqlite import SqliteDeploymentService
from .transports.base import ClientTransport, TransportSet

__all__ = ["build_parser", "format_deployments", "main", "run"]

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# Exit statuses of `pikku-mq call`, one per kind of failure, so that scripts can react to each.
EXIT_NOT_FOUND = 3
EXIT_REJECTED = 4
EXIT_UNAVAILABLE = 5
EXIT_DEADLINE = 6
EXIT_IN_TRANSIT = 7
EXIT_DISCOVERY = 8

CALL_EXIT_CODES = (
    (EXIT_OK, "the call succeeded; the result is on stdout"),
    (EXIT_FAILURE, "the function raised an error (500, or an error class of the application), or another error"),
    (EXIT_USAGE, "invalid arguments or configuration"),
    (EXIT_NOT_FOUND, "no instance hosts the function, or it is not exposed (404)"),
    (EXIT_REJECTED, "the worker rejected the request: invalid input, too large, unauthorized or forbidden (4xx)"),
    (EXIT_UNAVAILABLE, "no instance could take the call: none reachable, all busy or draining, or none on --transport"),
    (EXIT_DEADLINE, "the deadline (--timeout) passed; the function may have run (504)"),
    (EXIT_IN_TRANSIT, "the call failed after it was sent; the function may have run (502)"),
    (EXIT_DISCOVERY, "the discovery store failed"),
    (EXIT_INTERRUPTED, "interrupted (Ctrl-C)"),
)
"""The exit statuses of ``pikku-mq call``, with what each means, as its --help lists them."""

_TRANSPORT_SCHEMES = {"http": ("http", "https"), "nats": ("nats",), "amqp": ("amqp", "amqps")}
"""The endpoint schemes that ``call --transport`` keeps, by transport name."""

_RELOAD_CHILD = "PIKKU_MQ_RELOAD_CHILD"
"""The variable set to 1 in the environment of the worker that ``worker --reload`` starts, so that it serves
without watching."""

_RELOAD_STOP_TIMEOUT = 30
"""Seconds ``--reload`` lets a worker deregister and drain after SIGINT before it sends SIGKILL."""

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
    "events": "--events",
    "durable_notify": "--durable-notify",
}


class UsageError(Exception):
    """Invalid arguments: reported on stderr with exit status 2."""


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line ``argv`` (default ``sys.argv[1:]``) and exit with its status."""
    sys.exit(run(argv))


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` and return the exit status."""
    parser = build_parser()
    if "_ARGCOMPLETE" in os.environ:
        _complete(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
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
    _add_completion_parser(commands)
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
        "--events",
        metavar="URL",
        help="event bus whose events run the functions declared with events=[...], and that rpc.publish "
        "publishes on: nats://host:port/SUBJECT_PREFIX or amqp://user:password@host:port/<vhost>?exchange=<name> "
        "(default: $PIKKU_EVENTS_URL)",
    )
    parser.add_argument(
        "--durable-notify",
        action="store_const",
        const=True,
        help="take one-way calls (rpc.notify) on the nats:// and amqp:// endpoints from a JetStream stream or "
        "durable queues, which keep them across worker crashes and broker restarts",
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
        "--reload",
        action="store_true",
        help="for development: restart the worker whenever a .py file under the module's folder (or under "
        f"--reload-dir) changes. Each restart stops the worker as SIGINT does (deregister, drain; SIGKILL after "
        f"{_RELOAD_STOP_TIMEOUT} seconds) and starts a new process. Needs watchfiles: pip install 'pikku-mq[reload]'",
    )
    parser.add_argument(
        "--reload-dir",
        dest="reload_dirs",
        metavar="DIR",
        action="append",
        help="folder to watch with --reload instead of the module's folder; repeat for several",
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
    codes = "\n".join(f"  {code:>3}  {meaning}" for code, meaning in CALL_EXIT_CODES)
    parser = commands.add_parser(
        "call",
        help="call a function once and print its result",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Call NAME on a live instance found through discovery and print the result as JSON on stdout.\n"
            "A failed call prints the error on stderr: its class, HTTP status, code and message, the\n"
            "attempts and instances tried, and its payload."
        ),
        epilog=f"exit status:\n{codes}",
    )
    parser.add_argument("name", metavar="NAME", help="function name")
    parser.add_argument("data", metavar="JSON", nargs="?", help="input data as JSON (default: null)")
    _add_discovery_flag(parser)
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"deadline of the call in seconds, retries included (default: {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument(
        "--session",
        metavar="JSON",
        help=f"session to forward to the function as a JSON object, e.g. '{{\"user_id\": 7}}'; sessions travel only in "
        f"signed calls, so this needs ${ENV_REMOTE_SECRET}",
    )
    parser.add_argument(
        "--transport",
        choices=sorted(_TRANSPORT_SCHEMES),
        help="send the call only to endpoints of this transport, preferred or fallback (default: any); "
        f"nats uses ${ENV_NATS_URL} and amqp uses ${ENV_AMQP_URL} to reach the broker",
    )
    # The typed error printed on stderr names what failed, so the router's warnings would only repeat it.
    _add_log_level_flag(parser, "ERROR")
    parser.set_defaults(handler=_run_call)


def _add_ls_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "ls",
        help="list the registered deployments",
        description="List the deployments in the discovery store with their endpoint, functions, heartbeat "
        "age and state (live, or stale when the last heartbeat is older than the deployment's TTL).",
    )
    _add_discovery_flag(parser)
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a JSON list instead of a table; with --watch, one JSON object per event and line",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="keep running and show each join, draining, leave and expiry until Ctrl-C or SIGTERM: on a terminal "
        "the table is redrawn (needs the cli extra, pip install 'pikku-mq[cli]'), otherwise each event is printed "
        "as a tab-separated line: kind, id, endpoints, functions",
    )
    parser.add_argument(
        "--poll-interval",
        type=_poll_interval,
        default=None,
        metavar="SECONDS",
        help="with --watch, seconds between two listings of the registry table, which find expired deployments "
        "and changes that no change feed reports (at least 0.1; default: 5 seconds, or the heartbeat interval "
        "if shorter)",
    )
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


def _add_completion_parser(commands: Any) -> None:
    parser = commands.add_parser(
        "completion",
        help="print a shell completion script",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Print the script that completes pikku-mq commands and flags in SHELL. Load it with:\n"
            '  bash:  eval "$(pikku-mq completion bash)"   (e.g. in ~/.bashrc)\n'
            '  zsh:   eval "$(pikku-mq completion zsh)"    (e.g. in ~/.zshrc)\n'
            "  fish:  pikku-mq completion fish | source   (e.g. in ~/.config/fish/config.fish)\n"
            "Needs argcomplete: pip install 'pikku-mq[completion]'."
        ),
    )
    parser.add_argument("shell", choices=["bash", "zsh", "fish"], help="the shell to print the script for")
    parser.set_defaults(handler=_run_completion)


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


def _poll_interval(text: str) -> float:
    seconds = _positive_seconds(text)
    if seconds < MIN_POLL_INTERVAL:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_POLL_INTERVAL:g} seconds, got {text!r}")
    return seconds


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format=_LOG_FORMAT, stream=sys.stderr)


def _discovery_url(args: argparse.Namespace) -> str:
    url: str | None = args.discovery
    return url or default_discovery_url()


# -- worker ----------------------------------------------------------------------------------------


def _run_worker(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    if args.reload_dirs and not args.reload:
        raise UsageError("--reload-dir only applies with --reload")
    if args.reload and os.environ.get(_RELOAD_CHILD) != "1":
        return _run_reloading(args)
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


def _run_reloading(args: argparse.Namespace) -> int:
    """Run the worker in a child process and start a new one whenever a watched Python file changes."""
    try:
        import watchfiles
    except ImportError:
        raise UsageError(
            "--reload needs the watchfiles package, which is not installed; install it with "
            "pip install 'pikku-mq[reload]'"
        ) from None

    paths = _reload_paths(args)
    command = shlex.join([sys.executable, "-m", "pikku_mq", *args.argv])
    # The child inherits this environment, and with it the marker that makes it serve instead of watching.
    os.environ[_RELOAD_CHILD] = "1"
    logger.info("watching %s for changes to .py files; the worker restarts on each change", ", ".join(paths))

    def log_changes(changes: set[tuple[Any, str]]) -> None:
        changed = sorted({path for _, path in changes})
        listed = ", ".join(changed[:5]) + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")
        logger.info("restarting the worker, because these files changed: %s", listed)

    # NOTE: on Ctrl-C or SIGTERM, watchfiles 1.3.0 stops the last worker with its own default of 5 s
    # before SIGKILL, not with sigint_timeout, so a drain longer than that is cut short.
    watchfiles.run_process(
        *paths,
        target=command,
        target_type="command",
        callback=log_changes,
        watch_filter=watchfiles.PythonFilter(),
        sigint_timeout=_RELOAD_STOP_TIMEOUT,
    )
    return EXIT_OK


def _reload_paths(args: argparse.Namespace) -> list[str]:
    """Return the folders that ``--reload`` watches: ``--reload-dir``, else the folder of the target's top package."""
    if args.reload_dirs:
        missing = [path for path in args.reload_dirs if not os.path.isdir(path)]
        if missing:
            raise UsageError(f"--reload-dir {missing[0]!r} is not a folder")
        return [os.path.abspath(path) for path in args.reload_dirs]

    top_level = args.target.partition(":")[0].split(".")[0]
    if not top_level:
        raise UsageError("missing module name; pass MODULE or MODULE:ATTR, e.g. myapp.functions")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # find_spec locates a top-level module without running it.
    spec = importlib.util.find_spec(top_level)
    if spec is None:
        raise UsageError(f"module {top_level!r} was not found in the working directory or the import path")
    if spec.submodule_search_locations:
        return [os.path.abspath(path) for path in spec.submodule_search_locations]
    if spec.origin is None or not os.path.isfile(spec.origin):
        raise UsageError(f"module {top_level!r} has no source folder to watch; pass --reload-dir")
    return [os.path.dirname(os.path.abspath(spec.origin))]


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
    if not any(definition.expose or definition.events for definition in functions):
        raise UsageError(
            f"module {module.__name__!r} defines no exposed functions and no event handlers; decorate them "
            "with @pikku_func(expose=True) or @pikku_sessionless_func(expose=True), or pass events=[...]"
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
        "events",
        "durable_notify",
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
    data = _parse_json(args.data, "input data")
    session = _parse_session(args.session) if args.session is not None else None
    if session is not None and RemoteSecurity.from_env() is None:
        raise UsageError(
            f"--session needs ${ENV_REMOTE_SECRET}: a session travels only sealed in a call signed with the "
            "remote secret, so without one the session would be dropped"
        )
    try:
        result = asyncio.run(_call(_discovery_url(args), args.name, data, args.timeout, session, args.transport))
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    except PikkuMQError as exc:
        _print_error(exc)
        return call_exit_code(exc)

    print(json.dumps(result, ensure_ascii=False))
    return EXIT_OK


def call_exit_code(error: PikkuMQError) -> int:
    """Return the exit status of ``pikku-mq call`` for ``error``, as :data:`CALL_EXIT_CODES` lists them."""
    if isinstance(error, DiscoveryError):
        return EXIT_DISCOVERY
    if isinstance(error, NotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, DeadlineExceededError):
        return EXIT_DEADLINE
    if isinstance(error, RoutingError | EndpointUnreachableError):
        return EXIT_UNAVAILABLE
    # Checked before ServiceUnavailableError, its base: an interrupted function may have partly run.
    if isinstance(error, TransportError | ProtocolError | CallInterruptedError):
        return EXIT_IN_TRANSIT
    if isinstance(error, ServiceUnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(
        error, BadRequestError | UnauthorizedError | ForbiddenError | PayloadTooLargeError | UnprocessableContentError
    ):
        return EXIT_REJECTED
    return EXIT_FAILURE


def _parse_json(text: str | None, label: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"invalid JSON {label}: {exc}; quote it for the shell, e.g. '{{\"a\": 1}}'") from None


def _parse_session(text: str) -> dict[str, Any]:
    session = _parse_json(text, "--session")
    if not isinstance(session, dict):
        raise UsageError(
            f"--session must be a JSON object, e.g. '{{\"user_id\": 7}}', got {_json_type(session)}; omit "
            "--session to call without a session"
        )
    return session


def _json_type(value: Any) -> str:
    """Return the JSON name of the type of a value that json.loads returned."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array"


def _transports_for(name: str | None) -> TransportSet | None:
    """Return the client transports that ``--transport name`` allows, or None for the default set."""
    if name is None:
        return None
    transport: ClientTransport
    if name == "http":
        from .transports.http import AiohttpTransport

        transport = AiohttpTransport()
    elif name == "nats":
        try:
            from .transports.nats import NatsTransport
        except ImportError as exc:
            raise ConfigurationError(f"--transport nats needs nats-py ({exc}); pip install 'pikku-mq[nats]'") from None
        transport = NatsTransport()
    else:
        try:
            from .transports.amqp import AmqpTransport
        except ImportError as exc:
            raise ConfigurationError(f"--transport amqp needs aio-pika ({exc}); pip install 'pikku-mq[amqp]'") from None
        transport = AmqpTransport()
    return TransportSet([transport])


async def _call(
    url: str, name: str, data: Any, timeout: float, session: Any = None, transport: str | None = None
) -> Any:
    """Make one call; ``transport`` (http, nats or amqp) limits it to endpoints of that transport."""
    # One call needs no change feed, whose subscription would cost a connection and a round trip.
    transports = _transports_for(transport)
    service = deployment_service_from_url(url, change_feed=False, transports=transports)
    if _registry_file_missing(service):
        await service.close()
        missing = function_not_found(name)
        missing.message += f"; the registry file of {_redact(url)} does not exist, so no worker is registered there"
        raise missing
    async with service:
        try:
            return await service.invoke(name, data, session, timeout=timeout)
        except NotFoundError:
            if transport is None:
                raise
            # The router skipped the instances without an endpoint of this transport, so name them if there are any.
            elsewhere = await service.find_function(name)
            if not elsewhere:
                raise
            raise _no_instance_on(name, transport, elsewhere) from None


def _no_instance_on(name: str, transport: str, instances: Sequence[DeploymentInfo]) -> RoutingError:
    """Return the error for a function none of whose instances has an endpoint of the chosen transport."""
    schemes = list(_TRANSPORT_SCHEMES[transport])
    described = [
        f"{instance.deployment_id} ({', '.join((instance.endpoint, *instance.fallback_endpoints))})"
        for instance in sorted(instances, key=lambda i: i.deployment_id)[:5]
    ]
    return RoutingError(
        f"no instance of '{name}' has an endpoint of scheme {' or '.join(schemes)}, as --transport requires; "
        f"its instances: {'; '.join(described)}",
        payload={"function": name, "schemes": schemes, "instances": [i.deployment_id for i in instances]},
    )


def _registry_file_missing(service: DeploymentService) -> bool:
    """Return whether ``service`` is an SQLite registry whose file does not exist.

    ``call`` and ``ls`` only read, so they report an empty registry instead of creating the file (a
    mistyped path or the wrong working directory would otherwise leave a stray database behind).
    """
    return isinstance(service, SqliteDeploymentService) and not service.path.exists()


def _print_error(error: PikkuMQError) -> None:
    """Print a typed error on stderr: class, status, code and message, then the attempts and the payload.

    The message and payload come from the worker, so characters that a terminal would act on are escaped.
    """
    envelope = error.to_envelope()
    print(
        f"{_printable(envelope['name'])} ({error.http_status}, {_printable(str(envelope['code']))}): "
        f"{_printable(envelope['message'])}",
        file=sys.stderr,
    )
    payload = envelope["payload"]
    if isinstance(payload, dict) and isinstance(payload.get("attempts"), int):
        instances = payload.get("instances") or payload.get("tried") or []
        tried = f" on {', '.join(_printable(str(i)) for i in instances)}" if instances else ""
        print(f"attempts: {payload['attempts']}{tried}", file=sys.stderr)
    if payload is not None:
        print(f"payload: {_printable(json.dumps(payload, ensure_ascii=False))}", file=sys.stderr)


# -- ls --------------------------------------------------------------------------------------------


def _run_ls(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    url = _discovery_url(args)
    if args.watch:
        return _run_ls_watch(args, url)
    if args.poll_interval is not None:
        raise UsageError("--poll-interval only applies with --watch")
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


def _run_ls_watch(args: argparse.Namespace, url: str) -> int:
    try:
        asyncio.run(_watch(url, args))
    except ConfigurationError as exc:
        raise UsageError(str(exc)) from None
    except PikkuMQError as exc:
        _print_error(exc)
        return EXIT_FAILURE
    return EXIT_OK


async def _watch(url: str, args: argparse.Namespace) -> None:
    # Imported here: the other commands do not need it.
    from ._cli_watch import watch_deployments

    async with _listing_service(url, args.heartbeat_ttl) as service:
        await watch_deployments(service, _redact(url), _printable, as_json=args.json, poll_interval=args.poll_interval)


def _listing_service(url: str, heartbeat_ttl: float) -> DeploymentService:
    """Build a service that only reads the registry.

    It never registers, so its heartbeat interval only has to be below the TTL.
    """
    interval = min(DEFAULT_HEARTBEAT_INTERVAL, heartbeat_ttl / 2)
    return deployment_service_from_url(url, heartbeat_interval=interval, heartbeat_ttl=heartbeat_ttl)


async def _list(url: str, heartbeat_ttl: float) -> list[DeploymentRecord]:
    service = _listing_service(url, heartbeat_ttl)
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


# -- completion ----------------------------------------------------------------------------------


def _run_completion(args: argparse.Namespace) -> int:
    try:
        from argcomplete.shell_integration import shellcode
    except ImportError:
        raise UsageError(
            "shell completion needs the argcomplete package, which is not installed; install it with "
            "pip install 'pikku-mq[completion]'"
        ) from None
    print(shellcode(["pikku-mq"], shell=args.shell))
    return EXIT_OK


def _complete(parser: argparse.ArgumentParser) -> None:
    """Write the completions of the command line that the completion script passes in, then exit.

    The script runs ``pikku-mq`` with ``_ARGCOMPLETE`` set; without argcomplete there is nothing to offer.
    """
    try:
        import argcomplete
    except ImportError:
        sys.exit(EXIT_OK)
    argcomplete.autocomplete(parser)


# -- demo ------------------------------------------------------------------------------------------


def _run_demo(args: argparse.Namespace) -> int:
    _configure_logging(args.log_level)
    # Imported here: the other commands do not need the demo.
    from .demo.runner import run_demo

    return run_demo()
