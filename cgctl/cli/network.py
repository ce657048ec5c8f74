"""`cgctl network create|ls|inspect|rm` and `cgctl port`: the host's networks and a container's
published ports, through the daemon when one answers, else on this host."""

from __future__ import annotations

import json
import re
import sys
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli import connection
from cgctl.cli.errors import fail
from cgctl.cli.table import render_table

if TYPE_CHECKING:
    from cgctl.netspec import PortMapping

app = typer.Typer(help="Create, list, inspect and remove networks (docs/network.md).")
Names = Annotated[list[str], typer.Argument(help="network names", show_default=False)]
PORT = re.compile(r"^(\d{1,5})(?:/(tcp|udp))?$")


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="network")
    parent.command()(port)


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="the network's name", show_default=False)],
    subnet: Annotated[
        str | None, typer.Option(help="IPv4 CIDR, e.g. 10.93.0.0/24 [default: a free /24 of 10.92.0.0/16]")
    ] = None,
    gateway: Annotated[str | None, typer.Option(help="the bridge's address [default: the first]")] = None,
    internal: Annotated[bool, typer.Option(help="no route out of its bridge, no published ports")] = False,
) -> None:
    """Create a network: its containers reach each other by name, others' not at all. Prints its name."""
    try:
        made = connection.runtime().create_network(name, subnet, gateway, internal)
    except connection.Failure as error:
        raise connection.failed(error) from None
    print(made.name)


@app.command("ls")
def ls(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="only the names")] = False,
) -> None:
    """List networks."""
    try:
        found = connection.runtime().networks()
    except connection.Failure as error:
        raise connection.failed(error) from None
    if as_json:
        print(json.dumps([network.model_dump(mode="json") for network in found], indent=2))
    elif quiet:
        for network in found:
            print(network.name)
    else:
        rows = [("NAME", "SUBNET", "GATEWAY", "BRIDGE", "INTERNAL")]
        rows += [(n.name, n.subnet, n.gateway, n.bridge, str(n.internal).lower()) for n in found]
        print(render_table(rows))


@app.command()
def inspect(names: Names) -> None:
    """Show networks as JSON (a list, as docker's): subnet, gateway, bridge and running containers."""
    chosen = connection.runtime()
    try:
        found = [chosen.inspect_network(name).model_dump(mode="json") for name in names]
    except connection.Failure as error:
        raise connection.failed(error) from None
    print(json.dumps(found, indent=2))


@app.command()
def rm(names: Names) -> None:
    """Remove networks no running container uses, with their bridges. Prints each one removed; exits 1
    if any was not (saying why)."""
    chosen = connection.runtime()
    failed = False
    for name in names:
        try:
            chosen.remove_network(name)
            print(name)
        except connection.Failure as error:
            print(f"cgctl: {error}", file=sys.stderr)
            failed = True
    if failed:
        raise typer.Exit(1)


def port(
    name: Annotated[str, typer.Argument(help="the container", show_default=False)],
    wanted: Annotated[
        str | None,
        typer.Argument(metavar="[PORT[/PROTO]]", help="only this container port", show_default=False),
    ] = None,
) -> None:
    """List a running container's published ports as docker does: 80/tcp -> 127.0.0.1:8080 (with PORT,
    only the host's addresses for it)."""
    match = None
    if wanted is not None:
        match = PORT.match(wanted)
        if match is None or not 1 <= int(match[1]) <= 65535:
            raise fail(f"invalid value {wanted!r} for PORT[/PROTO]: expected e.g. 80 or 53/udp")
    try:
        ports = connection.runtime().port(name)
    except connection.Failure as error:
        raise connection.failed(error) from None
    if match is None:
        for mapping in ports:
            print(f"{mapping.container_port}/{mapping.protocol} -> {_host_side(mapping)}")
        return
    number, protocol = int(match[1]), match[2] or "tcp"
    shown = [_host_side(p) for p in ports if (p.container_port, p.protocol) == (number, protocol)]
    if not shown:
        print(f"cgctl: no public port {number}/{protocol} published for {name}", file=sys.stderr)
        raise typer.Exit(1)
    print("\n".join(shown))


def _host_side(mapping: PortMapping) -> str:
    address = f"[{mapping.host_ip}]" if ":" in mapping.host_ip else mapping.host_ip or "0.0.0.0"
    return f"{address}:{mapping.host_port}"
