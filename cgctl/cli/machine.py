"""`cgctl machine init|start|stop|status|set|rm|shell`: a long-lived cgroup v2 VM running the daemon,
for hosts without a usable cgroup v2 (cgctl.machine.instance). Once it is started, the other verbs
act through it whenever this host cannot run containers itself."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli.errors import fail

if TYPE_CHECKING:
    from cgctl.machine.instance import Machine

app = typer.Typer(help="A cgroup v2 VM running the daemon, for hosts without a usable cgroup v2.")


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="machine")


def _machine() -> Machine:
    from cgctl.machine.instance import Machine

    return Machine()


def _size(option: str, text: str | None) -> int | None:
    from cgctl.spec import parse_size

    if text is None:
        return None
    try:
        size = parse_size(text)
    except ValueError as error:
        raise fail(f"invalid value {text!r} for {option}: {error}") from None
    if size == "max" or size < 1 << 30:
        raise fail(f"invalid value {text!r} for {option}: at least 1G")
    return size


def _memory(text: str | None) -> str | None:
    size = _size("--memory", text)
    return None if size is None else f"{size >> 20}M"


Cpus = Annotated[int | None, typer.Option(min=1, max=64, help="virtual CPUs [default: 2]")]
Memory = Annotated[str | None, typer.Option(help="memory, e.g. 4G [default: 4G]")]
DiskSize = Annotated[
    str | None, typer.Option(help="the disk's size (sparse; it can grow later) [default: 20G]")
]
MetricsPort = Annotated[
    int | None, typer.Option(min=1, max=65535, help="host loopback port for /metrics [default: a free one]")
]


@app.command()
def init(
    cpus: Cpus = None,
    memory: Memory = None,
    disk_size: DiskSize = None,
    metrics_port: MetricsPort = None,
    share: Annotated[
        list[Path] | None,
        typer.Option(help="a host directory the VM sees read-write at the same path [default: $HOME]"),
    ] = None,
) -> None:
    """Create the machine: its settings, its API token and its empty ext4 disk. The host's root is
    shared with it read-only; the --share directories read-write."""
    from cgctl.machine.instance import Config, MachineError
    from cgctl.machine.vm import VMError

    machine = _machine()
    config = Config()
    config.cpus = cpus or config.cpus
    config.memory = _memory(memory) or config.memory
    config.disk_size = _size("--disk-size", disk_size) or config.disk_size
    config.metrics_port = metrics_port or 0
    config.shares = [str(path.absolute()) for path in share] if share else [os.path.expanduser("~")]
    try:
        machine.init(config)
    except (MachineError, VMError) as error:
        raise fail(str(error)) from None
    print(
        f"machine created in {machine.home}: {config.cpus} CPUs, {config.memory} memory, "
        f"{config.disk_size >> 30} GiB disk; shared read-write: {' '.join(config.shares)}"
    )
    print("start it with: cgctl machine start")


@app.command()
def start(
    timeout: Annotated[float, typer.Option(min=1, help="seconds to wait for its daemon")] = 300.0,
) -> None:
    """Boot the machine and wait until its daemon answers."""
    from cgctl.machine.instance import MachineError
    from cgctl.machine.vm import VMError

    began = time.monotonic()
    try:
        running, started = _machine().start(lambda message: print(message, file=sys.stderr), timeout)
    except (MachineError, VMError) as error:
        raise fail(str(error)) from None
    if started:
        print(
            f"machine started in {time.monotonic() - began:.1f} s: API on {running.url}, "
            f"metrics on http://127.0.0.1:{running.metrics_port}/metrics"
        )
    else:
        print(f"machine already running: API on {running.url}")


@app.command()
def stop(
    timeout: Annotated[float, typer.Option(min=1, help="seconds before qemu is killed")] = 90.0,
) -> None:
    """Stop the daemon (and with it the containers, their exits recorded) and power the machine off."""
    from cgctl.machine.instance import MachineError

    began = time.monotonic()
    try:
        stopped = _machine().stop(timeout)
    except MachineError as error:
        raise fail(str(error)) from None
    print(f"machine stopped in {time.monotonic() - began:.1f} s" if stopped else "machine not running")


@app.command()
def status(json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Say whether the machine exists and runs, its settings and where to reach it."""
    from dataclasses import asdict

    from cgctl.machine.instance import MachineError

    machine = _machine()
    try:
        config = machine.config()
    except MachineError as error:
        raise fail(str(error)) from None
    running = machine.running()
    disk_used = machine.disk.stat().st_blocks * 512
    if json_output:
        report = {"home": str(machine.home), "config": asdict(config), "disk_used": disk_used,
                  "running": asdict(running) | {"url": running.url} if running else None}  # fmt: skip
        print(json.dumps(report))
        return
    print(f"machine:  {machine.home}")
    print(f"state:    {f'running (qemu pid {running.pid})' if running else 'stopped'}")
    print(f"settings: {config.cpus} CPUs, {config.memory} memory")
    print(f"disk:     {disk_used >> 20} MiB used of {config.disk_size >> 20} MiB ({machine.disk})")
    print(f"shared:   / read-only; read-write: {' '.join(config.shares) or 'nothing'}")
    if running:
        print(f"API:      {running.url} (token in {machine.share / 'token'})")
    print(f"metrics:  http://127.0.0.1:{config.metrics_port}/metrics{'' if running else ' (when running)'}")
    print(f"console:  {machine.console}")


@app.command("set")
def set_(
    cpus: Cpus = None,
    memory: Memory = None,
    disk_size: DiskSize = None,
    metrics_port: MetricsPort = None,
    share: Annotated[
        list[Path] | None, typer.Option(help="one more host directory to share read-write")
    ] = None,
) -> None:
    """Change a stopped machine's settings; the disk can only grow."""
    from cgctl.machine.instance import MachineError
    from cgctl.machine.vm import VMError

    shares = [str(path.absolute()) for path in share or []]
    try:
        _machine().set(cpus, _memory(memory), _size("--disk-size", disk_size), metrics_port, shares)
    except (MachineError, VMError) as error:
        raise fail(str(error)) from None


@app.command()
def rm(
    force: Annotated[bool, typer.Option("--force", "-f", help="stop it first if it runs")] = False,
) -> None:
    """Remove the machine and its disk: its images, containers and logs go with it."""
    from cgctl.machine.instance import MachineError

    machine = _machine()
    try:
        machine.config()
        if force:
            machine.stop()
        machine.remove()
    except MachineError as error:
        raise fail(str(error)) from None
    print(f"machine removed ({machine.home})")


@app.command()
def shell() -> None:
    """A root shell in the machine, on its second serial port; Ctrl-] leaves it (the shell stays)."""
    from cgctl.machine.console import attach

    machine = _machine()
    if not machine.running():
        raise fail("the machine is not running: start it with `cgctl machine start`")
    try:
        attach(machine.home / "shell.sock")
    except OSError as error:
        raise fail(f"{machine.home / 'shell.sock'}: {error.strerror or error}") from None
