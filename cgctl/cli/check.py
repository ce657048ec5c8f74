"""`cgctl check`: can this host run cgctl? Says what is missing and how to fix it (exit 125 if not)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from cgctl.cli.errors import fail


def register(app: typer.Typer) -> None:
    app.command()(check)


def check(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    cgroup_root: Annotated[
        Path | None, typer.Option(envvar="CGCTL_CGROUP_ROOT", help="cgctl's cgroup subtree")
    ] = None,
) -> None:
    """Check that this host has a usable cgroup v2 with the memory, cpu, io and pids controllers."""
    from cgctl.cgroup.fs import HostNotSupported, check_host

    try:
        unified, root = check_host(cgroup_root)
    except HostNotSupported as error:
        raise fail(str(error)) from None
    controllers = sorted(unified.controllers())
    if as_json:
        report = {
            "cgroup2_mount": str(unified.path),
            "controllers": controllers,
            "cgctl_root": str(root),
            "cgctl_root_exists": root.exists(),
        }
        print(json.dumps(report, indent=2))
        return
    print(f"cgroup v2 mount: {unified.path}")
    print(f"controllers:     {' '.join(controllers)}")
    print(f"cgctl root:      {root} ({'exists' if root.exists() else 'created on first run'})")
    print("ready: cgctl can apply limits on this host")
