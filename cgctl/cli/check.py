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
    """Check that this host has a usable cgroup v2 with the memory, cpu, io and pids controllers, and
    whether the default sandbox's seccomp filter and device program work here."""
    from cgctl.cgroup import devices
    from cgctl.cgroup.fs import HostNotSupported, check_host
    from cgctl.sandbox import libseccomp

    try:
        unified, root = check_host(cgroup_root)
    except HostNotSupported as error:
        raise fail(str(error)) from None
    controllers = sorted(unified.controllers())
    seccomp_problem, devices_problem = libseccomp.problem(), devices.problem()
    if as_json:
        report = {
            "cgroup2_mount": str(unified.path),
            "controllers": controllers,
            "cgctl_root": str(root),
            "cgctl_root_exists": root.exists(),
            "seccomp": {"usable": seccomp_problem is None, "libseccomp": libseccomp.version(),
                        "problem": seccomp_problem},
            "device_program": {"usable": devices_problem is None, "problem": devices_problem},
        }  # fmt: skip
        print(json.dumps(report, indent=2))
    else:
        print(f"cgroup v2 mount: {unified.path}")
        print(f"controllers:     {' '.join(controllers)}")
        print(f"cgctl root:      {root} ({'exists' if root.exists() else 'created on first run'})")
        print(f"seccomp:         {seccomp_problem or f'usable (libseccomp {libseccomp.version()})'}")
        print(f"devices:         {devices_problem or 'usable (cgroup BPF device program)'}")
    if seccomp_problem:
        raise fail(f"the default sandbox needs seccomp: {seccomp_problem} (or run with --seccomp unconfined)")
    if not as_json:
        print("ready: cgctl can apply limits and its default sandbox on this host")
