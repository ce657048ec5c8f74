"""`cgctl stats`: a live table of the running containers' usage, like docker stats; with --all, of
every cgroup of the host, like systemd-cgtop; --json for machines."""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer

from cgctl.cli import connection
from cgctl.cli import hostwide as options
from cgctl.cli.table import render_table

if TYPE_CHECKING:
    from cgctl.accounting import Usage

COLUMNS = (
    "NAME",
    "CPU %",
    "MEM USAGE / LIMIT",
    "MEM %",
    "WORKING SET",
    "NET I/O",
    "BLOCK I/O",
    "PIDS",
    "THROTTLED",
    "PSI cpu/mem/io",
)
HOSTWIDE_COLUMNS = ("CGROUP", "NAME", "CPU %", "MEMORY", "IO/s", "PIDS", "PSI cpu/mem/io")
Sort = Literal["name", "cpu", "mem", "io", "pressure"]


def register(app: typer.Typer) -> None:
    app.command()(stats)


def stats(
    names: Annotated[list[str] | None, typer.Argument(help="containers to show (default: all)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="print one sample and exit")] = False,
    interval: Annotated[float, typer.Option(help="seconds between samples", min=0.1)] = 1.0,
    everything: Annotated[bool, typer.Option("--all", "-a", help=options.ALL_HELP)] = False,
    sort: Annotated[
        Sort | None,
        typer.Option(
            help="order rows by: name, cpu, mem, io (rate), pressure [default: name; cpu with --all]"
        ),
    ] = None,
    cgroup_root: options.CgroupRoot = None,
    max_depth: options.MaxDepth = None,
    include: options.Include = None,
    exclude: options.Exclude = None,
    state_dir: Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")] = None,
) -> None:
    """Show CPU, memory, network, IO, pids, throttling and pressure of running containers (--all: every
    cgroup)."""
    from cgctl.cli.errors import fail

    selection = options.hostwide(everything, cgroup_root, max_depth, include, exclude)
    if selection is not None and names:
        raise fail("name containers or show every cgroup with --all, not both")
    order: Sort = sort or ("cpu" if everything else "name")
    tty = sys.stdout.isatty() and not as_json
    try:
        for rows in connection.runtime(state_dir).stats(
            names, interval, stream=not no_stream, hostwide=selection
        ):
            rows = sorted_rows(rows, order)
            if as_json:
                print(json.dumps([asdict(row) for row in rows]), flush=True)
            else:
                text = hostwide_table(rows) if everything else table(rows)
                print(("\x1b[H\x1b[J" if tty and not no_stream else "") + text, flush=True)
    except connection.Failure as error:
        raise connection.failed(error) from None
    except KeyboardInterrupt:
        return


def sorted_rows(rows: list[Usage], order: Sort) -> list[Usage]:
    """Biggest first (ties and `name` by name, then cgroup path)."""
    if order == "name":
        return sorted(rows, key=lambda row: (row.name, row.cgroup))
    measure = {
        "cpu": lambda row: row.cpu_percent,
        "mem": lambda row: float(row.memory_bytes),
        "io": lambda row: row.io_bytes_per_second,
        "pressure": lambda row: max(
            p or 0.0 for p in (row.pressure_cpu, row.pressure_memory, row.pressure_io)
        ),
    }[order]
    return sorted(rows, key=lambda row: (-measure(row), row.name, row.cgroup))


def _size(value: int | None) -> str:
    from cgctl.spec import format_size

    return "max" if value is None else format_size(value)


DECIMAL_UNITS = ("B", "kB", "MB", "GB", "TB", "PB")


def _network(row: Usage) -> str:
    """Received / sent as docker stats writes them (decimal units, three digits: 1.23kB / 648B); "-"
    for a container with no network of its own (the host's)."""
    if row.net_rx_bytes is None or row.net_tx_bytes is None:
        return "-"
    return f"{_decimal(row.net_rx_bytes)} / {_decimal(row.net_tx_bytes)}"


def _decimal(count: int) -> str:
    value, unit = float(count), 0
    while float(f"{value:.3g}") >= 1000 and unit < len(DECIMAL_UNITS) - 1:
        value /= 1000
        unit += 1
    return f"{value:.3g}{DECIMAL_UNITS[unit]}"


def _pressure(row: Usage) -> str:
    return "/".join(
        "-" if p is None else f"{p:.0f}" for p in (row.pressure_cpu, row.pressure_memory, row.pressure_io)
    )


def table(rows: list[Usage]) -> str:
    lines: list[tuple[str, ...]] = [COLUMNS]
    for row in rows:
        limit = row.memory_limit_bytes
        lines.append(
            (
                row.name,
                f"{row.cpu_percent:.1f}%",
                f"{_size(row.memory_bytes)} / {_size(limit)}",
                "-" if limit is None else f"{100 * row.memory_bytes / limit:.1f}%",
                _size(row.working_set_bytes),
                _network(row),
                f"{_size(row.read_bytes)} / {_size(row.write_bytes)}",
                f"{row.pids}" + ("" if row.pids_limit is None else f" / {row.pids_limit}"),
                f"{row.throttled_percent:.0f}%",
                _pressure(row),
            )
        )
    return render_table(lines)


def hostwide_table(rows: list[Usage]) -> str:
    """systemd-cgtop's view: one row per cgroup, its path first."""
    lines: list[tuple[str, ...]] = [HOSTWIDE_COLUMNS]
    for row in rows:
        lines.append(
            (
                row.cgroup,
                row.name or "-",
                f"{row.cpu_percent:.1f}%",
                _size(row.memory_bytes) if row.memory_bytes else "-",
                f"{_size(int(row.io_bytes_per_second))}/s" if row.io_bytes_per_second else "-",
                f"{row.pids}" if row.pids else "-",
                _pressure(row),
            )
        )
    return render_table(lines)
