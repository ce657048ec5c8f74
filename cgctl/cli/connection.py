"""Which runtime the verbs act through: --host or CGCTL_HOST, else a started `cgctl machine` when this
host has no usable cgroup v2, else (cgctl.runtime.interface.connect) a daemon answering at the
default socket, else this host's run records (no daemon).

The remote runtime and the runtime's (pydantic) models are imported only when a daemon is there
to be spoken to: without one, `cgctl ps` reads a directory and needs neither."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    from cgctl.machine.instance import Machine
    from cgctl.runtime.api import Failure
    from cgctl.runtime.interface import Runtime

host: str | None = None  # set by the root callback from --host
machine: Machine | None = None  # the machine the verbs act through, once machine_runtime chose it


def __getattr__(name: str) -> Any:
    """`connection.Failure`, the runtime's error, imported when first looked up: in an except clause,
    that is once an exception reaches it, so a verb that catches it does not import the models."""
    if name == "Failure":
        from cgctl.runtime.api import Failure

        return Failure
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def runtime(state_dir: Path | None = None, store: Path | None = None) -> Runtime:
    """The runtime the verbs act through; with a store (`--store DIR`), this host's on that image
    store, whatever daemon or machine answers."""
    from cgctl.runtime.interface import connect

    try:
        if (
            store is None
            and host is None
            and not os.environ.get("CGCTL_HOST")
            and (through_machine := machine_runtime())
        ):
            return through_machine
        return connect(host, state_dir, store)
    except __getattr__("Failure") as error:
        raise failed(error) from None


def machine_runtime() -> Runtime | None:
    """The started machine's daemon, if there is one and this host cannot run containers itself."""
    from cgctl.machine import RUN_FILE, default_home

    if not (default_home() / RUN_FILE).exists():
        return None  # none started: spare every verb the import of what starting one needs
    from cgctl.machine.instance import Machine

    global machine
    candidate = Machine()
    running = candidate.running()
    if running is None:
        return None
    from cgctl.cgroup.fs import HostNotSupported, check_host
    from cgctl.runtime.remote import RemoteRuntime

    try:
        check_host(None)
        return None
    except HostNotSupported:
        machine = candidate
        return RemoteRuntime(running.url, token=candidate.token())


def failed(error: Failure) -> typer.Exit:
    """Print a runtime failure; return the Exit to raise (125, or 126/127 for a command that cannot run)."""
    print(f"cgctl: {error}", file=sys.stderr)
    return typer.Exit(error.exit_code)
