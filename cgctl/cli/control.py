"""`cgctl freeze`/`thaw` (`pause`/`unpause`), `kill` and `update`: act on a running container by name."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated, Any

import typer

from cgctl.cli import connection, limits
from cgctl.cli.errors import fail, invalid_options, invalid_value

Name = Annotated[str, typer.Argument(help="the container's name")]
StateDir = Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")]
Timeout = Annotated[float, typer.Option(help="seconds to wait for the kernel", min=0.1)]


def register(app: typer.Typer) -> None:
    app.command()(freeze)
    app.command()(thaw)
    app.command("pause", help="Alias of freeze.")(freeze)
    app.command("unpause", help="Alias of thaw.")(thaw)
    app.command()(kill)
    app.command()(limits.limit_options(update))


def freeze(name: Name, timeout: Timeout = 10.0, state_dir: StateDir = None) -> None:
    """Freeze every process of the container (cgroup.freeze), and wait until the kernel says it is."""
    _set_frozen(name, True, timeout, state_dir)


def thaw(name: Name, timeout: Timeout = 10.0, state_dir: StateDir = None) -> None:
    """Let a frozen container run again, and wait until the kernel says it does."""
    _set_frozen(name, False, timeout, state_dir)


def _set_frozen(name: str, freeze: bool, timeout: float, state_dir: Path | None) -> None:
    rt = connection.runtime(state_dir)
    try:
        changed = rt.freeze(name, timeout) if freeze else rt.thaw(name, timeout)
    except connection.Failure as error:
        raise connection.failed(error) from None
    state = "frozen" if freeze else "running"
    print(f"{name}: {state}" if changed else f"{name}: already {state}")


def kill(
    name: Name,
    signal_name: Annotated[str, typer.Option("--signal", "-s", help="signal name or number")] = "KILL",
    state_dir: StateDir = None,
) -> None:
    """Send a signal to every process of the container (default SIGKILL, through cgroup.kill)."""
    from cgctl.runtime.api import parse_signal

    try:
        sig = parse_signal(signal_name)
    except ValueError as error:
        raise fail(f"invalid value {signal_name!r} for --signal: {error}") from None
    try:
        signalled = connection.runtime(state_dir).kill(name, sig.name)
    except connection.Failure as error:
        raise connection.failed(error) from None
    if sig == signal.SIGKILL:
        print(f"{name}: killed")
    else:
        print(f"{name}: {sig.name} sent to {signalled} process{'es' if signalled != 1 else ''}")


def update(
    name: Name,
    limit_fields: dict[str, dict[str, Any]] | None = None,
    state_dir: StateDir = None,
) -> None:
    """Change a running container's limits, with the options of run: every value is checked before
    anything is written, and a write that fails puts back those already made."""
    from pydantic import ValidationError

    from cgctl.spec import SpecError

    changes = limit_fields or {}
    if not any(changes.values()):
        raise fail("nothing to update: give at least one limit option (see cgctl update --help)")
    # Values are checked alone first (fields as in Limits), then against the host (fields under "limits").
    options = {
        **limits.OPTION_FOR_FIELD,
        **{("limits", *field): opt for field, opt in limits.OPTION_FOR_FIELD.items()},
    }
    try:
        written = connection.runtime(state_dir).update(name, changes)
    except ValidationError as error:
        raise invalid_options(error, options) from None
    except SpecError as error:
        raise invalid_value(error, options) from None
    except connection.Failure as error:
        raise connection.failed(error) from None
    for file, value in written.items():
        print(f"{name}: {file} = {value}")
    if not written:
        print(f"{name}: already so")
