"""`cgctl stats`: a live table of the running containers' usage, like docker stats; --json for machines."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli.connection import failed, runtime
from cgctl.cli.table import render_table

if TYPE_CHECKING:
    from cgctl.accounting import Usage

COLUMNS = (
    "NAME",
    "CPU %",
    "MEM USAGE / LIMIT",
    "MEM %",
    "WORKING SET",
    "BLOCK I/O",
    "PIDS",
    "THROTTLED",
    "PSI cpu/mem/io",
)


def register(app: typer.Typer) -> None:
    app.command()(stats)


def stats(
    names: Annotated[list[str] | None, typer.Argument(help="containers to show (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="print one sample and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between samples", min=0.1)] = 1.0,
    state_dir: Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")] = None,
) -> None:
    """Show CPU, memory, IO, pids, throttling and pressure of running containers."""
    from cgctl.runtime.models import Failure

    tty = sys.stdout.isatty() and not as_json
    try:
        for rows in runtime(state_dir).stats(names, interval, stream=not no_stream):
            if as_json:
                print(json.dumps([asdict(row) for row in rows]), flush=True)
            else:
                print(("\x1b[H\x1b[J" if tty and not no_stream else "") + table(rows), flush=True)
    except Failure as error:
        raise failed(error) from None
    except KeyboardInterrupt:
        return


def table(rows: list[Usage]) -> str:
    from cgctl.spec import format_size

    def size(value: int | None) -> str:
        return "max" if value is None else format_size(value)

    def pressure(value: float | None) -> str:
        return "-" if value is None else f"{value:.0f}"

    lines: list[tuple[str, ...]] = [COLUMNS]
    for row in rows:
        limit = row.memory_limit_bytes
        lines.append(
            (
                row.name,
                f"{row.cpu_percent:.1f}%",
                f"{size(row.memory_bytes)} / {size(limit)}",
                "-" if limit is None else f"{100 * row.memory_bytes / limit:.1f}%",
                size(row.working_set_bytes),
                f"{size(row.read_bytes)} / {size(row.write_bytes)}",
                f"{row.pids}" + ("" if row.pids_limit is None else f" / {row.pids_limit}"),
                f"{row.throttled_percent:.0f}%",
                "/".join(pressure(p) for p in (row.pressure_cpu, row.pressure_memory, row.pressure_io)),
            )
        )
    return render_table(lines)
