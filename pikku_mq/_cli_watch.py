"""``pikku-mq ls --watch``: follow the mesh events of a registry until interrupted.

On a terminal, with the ``cli`` extra (rich) installed, the table of deployments is redrawn in place
after each event. Otherwise each event is printed as one tab-separated line (kind, id, endpoints,
functions), or as one JSON object per line with ``--json``, so scripts and tests can read the output.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TextIO

from ._watch import MeshEvent

if TYPE_CHECKING:
    from .backends.base import DeploymentService

__all__ = ["format_event_line", "watch_deployments"]


def format_event_line(event: MeshEvent, printable: Callable[[str], str]) -> str:
    """Format one event as ``kind<TAB>id<TAB>endpoints<TAB>functions``, lists separated by spaces and commas."""
    return "\t".join(
        (
            event.kind,
            printable(event.deployment_id),
            " ".join(printable(endpoint) for endpoint in event.endpoints),
            ",".join(printable(name) for name in event.functions),
        )
    )


class _LineOutput:
    def __init__(self, stream: TextIO, printable: Callable[[str], str], as_json: bool) -> None:
        self.stream = stream
        self.printable = printable
        self.as_json = as_json

    def __enter__(self) -> _LineOutput:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def show(self, event: MeshEvent) -> None:
        line = json.dumps(asdict(event)) if self.as_json else format_event_line(event, self.printable)
        self.stream.write(line + "\n")
        self.stream.flush()


class _TableOutput:
    """Redraws a rich table of the live and draining deployments after each event."""

    def __init__(self, printable: Callable[[str], str], source: str) -> None:
        from rich.console import Console
        from rich.live import Live

        self.printable = printable
        self.source = source
        self.rows: dict[str, MeshEvent] = {}
        self.last = "waiting for events"
        self.live = Live(self._render(), console=Console(), auto_refresh=False)

    def __enter__(self) -> _TableOutput:
        self.live.__enter__()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.live.__exit__(*exc_info)

    def show(self, event: MeshEvent) -> None:
        if event.kind in ("join", "draining"):
            self.rows[event.deployment_id] = event
        else:
            self.rows.pop(event.deployment_id, None)
        self.last = f"last event: {event.kind} {self.printable(event.deployment_id)}"
        self.live.update(self._render(), refresh=True)

    def _render(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        # Cells are Text, not markup strings: ids and names come from the registry and may contain brackets.
        table = Table(title=Text(f"deployments in {self.source}"), caption=Text(self.last), title_justify="left")
        for header in ("ID", "STATE", "ENDPOINTS", "FUNCTIONS"):
            table.add_column(header, overflow="fold")
        for deployment_id in sorted(self.rows):
            event = self.rows[deployment_id]
            state = "draining" if event.kind == "draining" else "live"
            endpoints = "\n".join(self.printable(endpoint) for endpoint in event.endpoints)
            functions = ", ".join(self.printable(name) for name in event.functions)
            table.add_row(Text(self.printable(deployment_id)), Text(state), Text(endpoints), Text(functions))
        return table


def _use_table(as_json: bool) -> bool:
    if as_json or not sys.stdout.isatty():
        return False
    try:
        import rich  # noqa: F401 - only checks that the cli extra is installed
    except ImportError:
        return False
    return True


async def watch_deployments(
    service: DeploymentService,
    source: str,
    printable: Callable[[str], str],
    *,
    as_json: bool,
    poll_interval: float | None,
) -> None:
    """Show the events of ``service``'s registry until SIGINT or SIGTERM, then return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    output: _LineOutput | _TableOutput
    output = _TableOutput(printable, source) if _use_table(as_json) else _LineOutput(sys.stdout, printable, as_json)
    try:
        async with service.watch(poll_interval=poll_interval) as events:
            with output:
                stopped = asyncio.ensure_future(stop.wait())
                try:
                    while True:
                        next_event = asyncio.ensure_future(anext(events))
                        done, _ = await asyncio.wait({next_event, stopped}, return_when=asyncio.FIRST_COMPLETED)
                        if next_event not in done:
                            next_event.cancel()
                            return
                        output.show(next_event.result())
                finally:
                    stopped.cancel()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
