"""`cgctl daemon` (also installed as `cgctld`): the service that supervises detached containers and
serves the API the CLI talks to (docs/daemon.md)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli import hostwide as options
from cgctl.cli.errors import fail

if TYPE_CHECKING:
    import socket as sockets


def register(app: typer.Typer) -> None:
    app.command()(daemon)
    app.command("dial-stdio", hidden=True)(dial_stdio)


def daemon(
    socket: Annotated[
        Path | None, typer.Option(help="the API's unix socket [default: /run/cgctl/cgctl.sock as root]")
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option(help="containers' state and logs, kept across reboots [default: /var/lib/cgctl]"),
    ] = None,
    runtime_dir: Annotated[
        Path | None, typer.Option(help="sockets, gone at reboot [default: /run/cgctl]")
    ] = None,
    state_dir: Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")] = None,
    cgroup_root: Annotated[
        Path | None, typer.Option(envvar="CGCTL_CGROUP_ROOT", help="cgctl's cgroup subtree")
    ] = None,
    group: Annotated[
        str, typer.Option(help="members of this group may use the socket, if it exists")
    ] = "cgctl",
    metrics: Annotated[
        str | None, typer.Option(help="also serve /metrics over TCP on HOST:PORT, for Prometheus")
    ] = None,
    metrics_all: Annotated[bool, typer.Option(help="/metrics covers " + options.ALL_HELP)] = False,
    metrics_compat: Annotated[
        list[str] | None,
        typer.Option(help="/metrics also emits another exporter's names: cadvisor", show_default=False),
    ] = None,
    metrics_cgroup_root: options.CgroupRoot = None,
    metrics_max_depth: options.MaxDepth = None,
    metrics_include: options.Include = None,
    metrics_exclude: options.Exclude = None,
    tcp: Annotated[
        str | None,
        typer.Option(help="also serve the API on TCP HOST:PORT, to clients with --token-file's token"),
    ] = None,
    token_file: Annotated[
        Path | None, typer.Option(help="with --tcp: a file of the owner's alone (mode 0600) with the token")
    ] = None,
    stop_containers: Annotated[
        bool, typer.Option(help="on SIGTERM, stop the containers too (default: they keep running)")
    ] = False,
    stop_timeout: Annotated[
        float, typer.Option(help="with --stop-containers: seconds from SIGTERM to SIGKILL", min=0)
    ] = 10.0,
    policy_dir: Annotated[
        Path | None,
        typer.Option(
            envvar="CGCTL_POLICY_DIR",
            help="policy files, reloaded on SIGHUP and on change [default: /etc/cgctl/policies.d as root]",
        ),
    ] = None,
) -> None:
    """Supervise detached containers and serve the API on a unix socket (root and --group only).

    Containers keep running when the daemon stops or dies; a daemon that starts finds them again,
    with the exit status of any that ended meanwhile.
    """
    from cgctl.cgroup.fs import CgroupError
    from cgctl.cli.exporter import parse_compat, parse_listen
    from cgctl.daemon.paths import default_paths
    from cgctl.daemon.server import listening_socket, serve
    from cgctl.daemon.service import Service
    from cgctl.metrics import ContainerCollector
    from cgctl.runtime.api import Failure

    logging.basicConfig(level=logging.INFO, format="cgctld: %(message)s", stream=sys.stderr)
    defaults = default_paths()
    paths = type(defaults)(
        runtime_dir=runtime_dir or defaults.runtime_dir,
        data_dir=data_dir or defaults.data_dir,
        state_dir=state_dir or defaults.state_dir,
        cgroup_root=cgroup_root,
        policy_dir=policy_dir,
    )
    try:
        address = parse_listen(metrics) if metrics else None
    except ValueError as error:
        raise fail(f"invalid value {metrics!r} for --metrics: {error}") from None
    families = parse_compat(metrics_compat, "--metrics-compat")
    selecting = (metrics_cgroup_root, metrics_max_depth, metrics_include, metrics_exclude)
    if metrics_all:
        unified, selection = options.selection(*selecting)
        collector = ContainerCollector(paths.state_dir, compat=families, unified=unified, selection=selection)
    else:
        options.refuse_without("--metrics-all", *selecting, prefix="metrics-")
        collector = ContainerCollector(paths.state_dir, compat=families)
    tcp_listener = _tcp_listener(tcp, token_file) if tcp else None
    try:
        listener = listening_socket(socket or paths.socket, group)
    except Failure as error:
        raise fail(str(error)) from None
    except OSError as error:
        raise fail(f"{socket or paths.socket}: cannot listen there: {error.strerror}") from None
    try:
        service = Service(paths)
    except (OSError, CgroupError, RuntimeError) as error:
        raise fail(f"cannot start: {error}") from None
    print(f"cgctld: serving on {socket or paths.socket}", file=sys.stderr, flush=True)
    try:
        collector.extra = service.metrics
        serve(service, listener, collector, address, tcp_listener)
    finally:
        service.close(stop_timeout if stop_containers else None)


def _tcp_listener(tcp: str, token_file: Path | None) -> tuple[sockets.socket, str]:
    """The TCP listener and the token its clients must send; refused without a private token file."""
    from cgctl.cli.exporter import parse_listen
    from cgctl.daemon.server import tcp_socket

    try:
        address = parse_listen(tcp)
    except ValueError as error:
        raise fail(f"invalid value {tcp!r} for --tcp: {error}") from None
    if token_file is None:
        raise fail("--tcp needs --token-file: over TCP, the token is what keeps others out")
    try:
        mode = token_file.stat().st_mode
        token = token_file.read_text().strip()
    except OSError as error:
        raise fail(f"{token_file}: cannot read the token: {error.strerror}") from None
    if mode & 0o077:
        raise fail(
            f"{token_file}: others may read the token (mode {mode & 0o777:o}); fix: chmod 600 {token_file}"
        )
    if len(token) < 32:
        raise fail(f"{token_file}: the token is too short ({len(token)} characters; 32 or more)")
    try:
        return tcp_socket(address), token
    except OSError as error:
        raise fail(f"{tcp}: cannot listen there: {error.strerror}") from None


def main() -> None:
    """The `cgctld` console script: `cgctl daemon`."""
    sys.argv[1:1] = ["daemon"]
    from cgctl.cli import main as cgctl_main

    cgctl_main()


def dial_stdio(
    socket: Annotated[
        Path | None, typer.Option(help="the daemon's socket [default: the local daemon's]")
    ] = None,
) -> None:
    """Connect standard input and output to the daemon's socket: what ssh://HOST runs on the far side."""
    import socket as sockets
    import threading

    from cgctl.runtime.interface import answers, default_sockets

    path = socket or next((p for p in default_sockets() if answers(p)), None)
    if path is None:
        raise fail("no cgctl daemon answers on this host: start it with `systemctl start cgctld`")
    connection = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    try:
        connection.connect(str(path))
    except OSError as error:
        raise fail(f"{path}: cannot connect: {error.strerror}") from None

    def upstream() -> None:
        while data := os.read(0, 65536):
            connection.sendall(data)
        connection.shutdown(sockets.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while data := connection.recv(65536):
        os.write(1, data)
