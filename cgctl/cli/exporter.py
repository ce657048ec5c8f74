"""`cgctl exporter`: serve the containers' metrics to Prometheus (with --all, every cgroup's), read from
the cgroups at each scrape."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli import hostwide as options
from cgctl.cli.errors import fail

if TYPE_CHECKING:
    from cgctl.metrics import Family


def register(app: typer.Typer) -> None:
    app.command()(exporter)


def parse_listen(listen: str) -> tuple[str, int]:
    """'127.0.0.1:9753', '[::1]:9753' or ':9753' (all addresses) -> (host, port)."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:9753")
    return host.strip("[]") or "0.0.0.0", int(port)


def parse_compat(values: list[str] | None, option: str) -> list[Family]:
    """The other exporters' names to emit too; cadvisor is the one there is."""
    if unknown := set(values or []) - {"cadvisor"}:
        raise fail(f"invalid value {sorted(unknown)[0]!r} for {option}: the one compatible mode is cadvisor")
    return ["cadvisor"] if values else []


def exporter(
    listen: Annotated[str, typer.Option(help="HOST:PORT to serve /metrics on")] = "127.0.0.1:9753",
    compat: Annotated[
        list[str] | None,
        typer.Option(help="also emit another exporter's names: cadvisor", show_default=False),
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")] = None,
    everything: Annotated[bool, typer.Option("--all", "-a", help=options.ALL_HELP)] = False,
    cgroup_root: options.CgroupRoot = None,
    max_depth: options.MaxDepth = None,
    include: options.Include = None,
    exclude: options.Exclude = None,
) -> None:
    """Serve Prometheus metrics of every running container, or with --all of every cgroup of the host
    (read at scrape time, never cached)."""
    from cgctl.cli import connection
    from cgctl.exporter import make_server

    if state_dir is None and connection.machine_runtime() and (machine := connection.machine):
        port = machine.config().metrics_port
        raise fail(
            f"this host's containers run in the cgctl machine, whose daemon serves their metrics at "
            f"http://127.0.0.1:{port}/metrics: scrape that (cgctl machine set --metrics-port picks the port)"
        )
    from cgctl.metrics import ContainerCollector

    try:
        host, port = parse_listen(listen)
    except ValueError as error:
        raise fail(f"invalid value {listen!r} for --listen: {error}") from None
    families = parse_compat(compat, "--compat")
    if everything:
        mount, selection = options.selection(cgroup_root, max_depth, include, exclude)
        collector = ContainerCollector(state_dir, compat=families, unified=mount, selection=selection)
    else:
        options.refuse_without("--all", cgroup_root, max_depth, include, exclude)
        collector = ContainerCollector(state_dir, compat=families)
    try:
        server = make_server(host, port, collector)
    except OSError as error:
        raise fail(f"invalid value {listen!r} for --listen: cannot listen there: {error.strerror}") from None
    print(f"cgctl exporter: serving http://{listen}/metrics", file=sys.stderr, flush=True)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()
    server.server_close()
