"""`cgctl top`: a running container's processes, as `docker top` and ps show them.

A verb of its own module: reading processes (psutil) is this verb's alone, and the others start
without it."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli import connection
from cgctl.cli.table import render_table

if TYPE_CHECKING:
    from cgctl.runtime.api import ProcessRow

COLUMNS = ("PID", "NSPID", "USER", "CPU %", "RSS", "STARTED", "COMMAND")


def register(app: typer.Typer) -> None:
    app.command()(top)


def top(
    name: Annotated[str, typer.Argument(help="the container's name")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output (RSS in bytes)")] = False,
    state_dir: Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")] = None,
) -> None:
    """List the container's processes, those of cgroups it made below its own too: the host's pid,
    the pid inside the container (NSPID), user, CPU % over half a second, resident memory, start
    time and command line."""
    try:
        rows = connection.runtime(state_dir).top(name)
    except connection.Failure as error:
        raise connection.failed(error) from None
    if as_json:
        print(json.dumps([row.model_dump(mode="json") for row in rows], indent=2))
        return
    print(render_table([COLUMNS, *(_cells(row) for row in rows)]))


def _cells(row: ProcessRow) -> tuple[str, ...]:
    from cgctl.spec import format_size

    return (
        str(row.pid),
        str(row.nspid),
        row.user,
        f"{row.cpu_percent:.1f}",
        format_size(row.rss_bytes),
        _started(row.started_at),
        " ".join(row.command),
    )


def _started(moment: float) -> str:
    """ps's STIME: the time of day if it started today, else the date."""
    started = datetime.fromtimestamp(moment)
    return started.strftime("%H:%M:%S" if started.date() == datetime.now().date() else "%b %d")
