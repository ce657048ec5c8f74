"""`cgctl run [OPTIONS] -- CMD [ARGS...]`: run a workload under limits and exit with its status."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError

from cgctl.cli.errors import fail, invalid_options

# Which option fed each spec field, so validation errors speak the user's language.
OPTION_FOR_FIELD: dict[tuple[str | int, ...], str] = {
    ("name",): "--name",
    ("command",): "CMD",
    ("limits", "memory", "max"): "--mem",
}


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_interspersed_args": False})(run)


def run(
    command: Annotated[
        list[str] | None, typer.Argument(help="the workload: -- CMD [ARGS...]", show_default=False)
    ] = None,
    name: Annotated[str | None, typer.Option(help="unique name (default: generated)")] = None,
    mem: Annotated[
        str | None, typer.Option("--mem", help="memory.max: 256M, 1.5G, 1073741824, or max")
    ] = None,
    oom_group: Annotated[
        bool, typer.Option(help="memory.oom.group: an OOM kill takes the whole workload")
    ] = True,
    cgroup_root: Annotated[
        Path | None,
        typer.Option(
            envvar="CGCTL_CGROUP_ROOT", help="cgctl's cgroup subtree (default /sys/fs/cgroup/cgctl.slice)"
        ),
    ] = None,
) -> None:
    """Run CMD in its own cgroup with the given limits; exit with its status (125: cgctl error,
    126: not executable, 127: not found, 128+N: killed by signal N)."""
    from cgctl import runtime
    from cgctl.cgroup.fs import CgroupError
    from cgctl.spec import WorkloadSpec, format_size

    if not command:
        raise fail("no command given: cgctl run [OPTIONS] -- CMD [ARGS...]")
    try:
        spec = WorkloadSpec.model_validate(
            {
                "name": name,
                "command": command,
                "limits": {"memory": {"max": mem, "oom_group": oom_group}},
            }
        )
    except ValidationError as error:
        raise invalid_options(error, OPTION_FOR_FIELD) from None
    try:
        result = runtime.run(spec, cgroup_root=cgroup_root)
    except CgroupError as error:
        raise fail(str(error)) from None
    except runtime.SpawnError as error:
        print(f"cgctl: {error}", file=sys.stderr)
        raise typer.Exit(error.exit_code) from None

    if result.oom_killed:
        limit = (
            "no memory.max"
            if result.memory_limit_bytes is None
            else f"memory.max {format_size(result.memory_limit_bytes)} reached"
        )
        print(
            f"cgctl: {result.name} killed by the OOM killer: {limit} (oom_kill {result.oom_kills})",
            file=sys.stderr,
        )
    elif result.signal is not None:
        print(f"cgctl: {result.name} killed by {signal.Signals(result.signal).name}", file=sys.stderr)
    raise typer.Exit(result.exit_code if result.signal is None else 128 + result.signal)
