"""`cgctl ps`, `inspect`, `logs`, `wait`, `rm` and `events`: containers as the runtime knows them
(the daemon's detached ones, which need it, and every foreground run)."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli import connection
from cgctl.cli.errors import fail
from cgctl.cli.table import render_table

if TYPE_CHECKING:
    from cgctl.runtime.api import Container, Event
    from cgctl.runtime.logs import LogLine

Names = Annotated[list[str], typer.Argument(help="container names", show_default=False)]
AsJson = Annotated[bool, typer.Option("--json", help="machine-readable output")]
StateDir = Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")]
DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def register(app: typer.Typer) -> None:
    app.command()(ps)
    app.command()(inspect)
    app.command()(logs)
    app.command()(wait)
    app.command()(rm)
    app.command()(events)


def ps(
    all: Annotated[bool, typer.Option("--all", "-a", help="exited containers too")] = False,
    filter: Annotated[list[str] | None, typer.Option("--filter", help="label=K=V (repeatable)")] = None,
    as_json: AsJson = False,
    state_dir: StateDir = None,
) -> None:
    """List containers: running ones, and with -a the daemon's exited ones."""
    labels = {}
    for item in filter or []:
        kind, _, pair = item.partition("=")
        key, separator, value = pair.partition("=")
        if kind != "label" or not separator or not key:
            raise fail(f"invalid value {item!r} for --filter: expected label=K=V")
        labels[key] = value
    try:
        containers = connection.runtime(state_dir).list(all=all, labels=labels)
    except connection.Failure as error:
        raise connection.failed(error) from None
    if as_json:
        print(json.dumps([container.model_dump(mode="json") for container in containers], indent=2))
        return
    now = time.time()
    rows: list[tuple[str, ...]] = [("NAME", "STATE", "STATUS", "PID", "RESTARTS", "IMAGE", "COMMAND")]
    for c in containers:
        rows.append(
            (
                c.name,
                c.state,
                _status(c, now),
                str(c.pid or "-"),
                str(c.restart_count),
                c.image or "-",
                _shorten(" ".join(c.command), 40),
            )
        )
    print(render_table(rows))


def inspect(names: Names, as_json: AsJson = False, state_dir: StateDir = None) -> None:
    """Show everything known of containers: spec (without its environment), attempts with their exit
    statuses and OOM kills, restart count, and the last attempt's final accounting."""
    rt = connection.runtime(state_dir)
    try:
        found = [rt.inspect(name) for name in names]
    except connection.Failure as error:
        raise connection.failed(error) from None
    if as_json:
        dumped = [c.model_dump(mode="json") for c in found]
        print(json.dumps(dumped[0] if len(dumped) == 1 else dumped, indent=2))
        return
    now = time.time()
    for c in found:
        print(f"{c.name} ({c.id}): {_status(c, now)}")
        print(f"  state: {c.state}   pid: {c.pid or '-'}   cgroup: {c.cgroup or '-'}")
        print(f"  command: {' '.join(c.command)}")
        if c.image:
            print(f"  image: {c.image}")
        if c.labels:
            print("  labels: " + " ".join(f"{k}={v}" for k, v in sorted(c.labels.items())))
        if c.network is not None:
            on = f" ({c.network.network} {c.network.address or '-'})" if c.network.network else ""
            ports = ", ".join(str(p) for p in c.network.ports)
            print(f"  network: {c.network.mode}{on}" + (f"   ports: {ports}" if ports else ""))
        print(f"  restart policy: {c.restart_policy}   restarts: {c.restart_count}")
        for number, attempt in enumerate(c.attempts, 1):
            ended = attempt.ended or "running"
            print(
                f"  attempt {number}: started {_when(attempt.started_at)}, pid {attempt.pid or '-'}: {ended}"
            )


def logs(
    name: Annotated[str, typer.Argument(help="the container")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new output until it ends")
    ] = False,
    tail: Annotated[int | None, typer.Option(help="only the last N lines", min=0)] = None,
    since: Annotated[
        str | None, typer.Option(help="only output since: 10m, 2h, a unix time or an ISO date")
    ] = None,
    timestamps: Annotated[
        bool, typer.Option("--timestamps", "-t", help="prefix each line with its time")
    ] = False,
) -> None:
    """Print a detached container's output: stdout to stdout, stderr to stderr."""
    start = _parse_time("--since", since) if since else None
    try:
        for line in connection.runtime().logs(
            name, tail=tail, since=datetime.fromtimestamp(start, UTC) if start else None, follow=follow
        ):
            print_log_line(line, timestamps)
    except connection.Failure as error:
        raise connection.failed(error) from None
    except KeyboardInterrupt:
        return


def wait(names: Names) -> None:
    """Block until each container's current run ends; print its exit status (or why it is unknown)."""
    rt = connection.runtime()
    try:
        for name in names:
            last = rt.wait(name).last
            known = last is not None and last.status_known
            print(
                last.exit_status if known and last is not None else f"unknown: {last.ended if last else ''}"
            )
    except connection.Failure as error:
        raise connection.failed(error) from None


def rm(
    names: Names,
    force: Annotated[bool, typer.Option("--force", "-f", help="kill it first if it runs")] = False,
) -> None:
    """Remove containers: their state and logs (running ones only with -f)."""
    rt = connection.runtime()
    for name in names:
        try:
            rt.remove(name, force)
        except connection.Failure as error:
            raise connection.failed(error) from None
        print(name)


def events(
    since: Annotated[str | None, typer.Option(help="replay from: 10m, a unix time or an ISO date")] = None,
    until: Annotated[
        str | None, typer.Option(help="stop at: a duration ago, a unix time or an ISO date")
    ] = None,
    as_json: AsJson = False,
) -> None:
    """Stream the daemon's events: create, start, exit, oom, freeze, thaw, update, restart, remove."""
    try:
        for event in connection.runtime().events(
            since=_parse_time("--since", since) if since else None,
            until=_parse_time("--until", until) if until else None,
        ):
            print(event.model_dump_json() if as_json else _event_line(event), flush=True)
    except connection.Failure as error:
        raise connection.failed(error) from None
    except KeyboardInterrupt:
        return


def print_log_line(line: LogLine, timestamps: bool = False) -> None:
    """A container's output line on our stdout or stderr, as it wrote it (run's attach uses it too)."""
    out = sys.stdout if line.stream == "stdout" else sys.stderr
    prefix = line.time.strftime("%Y-%m-%dT%H:%M:%S.%fZ ") if timestamps else ""
    out.write(prefix + line.text + ("" if line.partial else "\n"))
    out.flush()


def _event_line(event: Event) -> str:
    when = datetime.fromtimestamp(event.time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return " ".join(
        [when, event.type, event.name, *(f"{k}={v}" for k, v in sorted(event.attributes.items()))]
    )


def _parse_time(option: str, text: str) -> float:
    """A unix time, an ISO 8601 date, or a duration before now (30s, 10m, 2h, 1d)."""
    if match := DURATION.match(text):
        return time.time() - float(match[1]) * UNITS[match[2]]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise fail(
            f"invalid value {text!r} for {option}: expected a duration (30s, 10m, 2h, 1d), a unix time "
            "or an ISO date (2026-11-28T17:00:00Z)"
        ) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _status(c: Container, now: float) -> str:
    last = c.last
    if c.state in ("running", "frozen") and last is not None:
        return f"Up {_ago(now - last.started_at)}" + (" (frozen)" if c.state == "frozen" else "")
    if c.state == "restarting":
        return "Restarting"
    if last is None:
        return "Created"
    if not last.status_known:
        return "Exited (unknown)"
    return f"Exited ({last.exit_status}) {_ago(now - (last.finished_at or now))} ago"


def _ago(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{int(seconds)} second{'s' if int(seconds) != 1 else ''}"


def _when(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
