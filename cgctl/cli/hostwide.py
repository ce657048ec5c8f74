"""Host-wide accounting's options, one spelling for `cgctl stats --all`, `cgctl exporter --all` and
cgctld's --metrics-all: which cgroups of the host they cover."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli.errors import fail

if TYPE_CHECKING:
    from cgctl.discovery import Selection
    from cgctl.runtime.api import HostWide

ALL_HELP = (
    "every cgroup of the host, not only cgctl's containers: systemd units, other runtimes' containers, "
    "Kubernetes pods"
)
CgroupRoot = Annotated[
    Path | None,
    typer.Option(help="host-wide: the cgroup to start from [default: the whole cgroup2 hierarchy]"),
]
MaxDepth = Annotated[
    int | None,
    typer.Option(help="host-wide: levels below the root (0: the root alone) [default: no limit]", min=0),
]
Include = Annotated[
    list[str] | None,
    typer.Option(
        help="host-wide: show only cgroups whose path (as /proc/PID/cgroup writes it) matches this glob; "
        "repeatable; * crosses /, e.g. '/system.slice/*'",
        show_default=False,
    ),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(
        help="host-wide: leave out cgroups whose path matches this glob; repeatable", show_default=False
    ),
]


def refuse_without(
    flag: str,
    cgroup_root: Path | None,
    max_depth: int | None,
    include: list[str] | None,
    exclude: list[str] | None,
    prefix: str = "",
) -> None:
    """Selection options (--PREFIXcgroup-root, ...) mean nothing without the flag that turns host-wide
    accounting on."""
    given = {"cgroup-root": cgroup_root, "max-depth": max_depth, "include": include, "exclude": exclude}
    for option, value in given.items():
        if value is not None and value != []:
            raise fail(f"--{prefix}{option} selects among every cgroup of the host: add {flag}")


def hostwide(
    everything: bool,
    cgroup_root: Path | None,
    max_depth: int | None,
    include: list[str] | None,
    exclude: list[str] | None,
) -> HostWide | None:
    """The request for `--all` and its options (None without --all; its options alone are refused)."""
    if not everything:
        refuse_without("--all", cgroup_root, max_depth, include, exclude)
        return None
    from cgctl.runtime.api import HostWide

    return HostWide(
        cgroup_root=None if cgroup_root is None else str(cgroup_root),
        max_depth=max_depth,
        include=include or [],
        exclude=exclude or [],
    )


def selection(
    cgroup_root: Path | None, max_depth: int | None, include: list[str] | None, exclude: list[str] | None
) -> tuple[Path, Selection]:
    """(the cgroup2 mount, the checked selection) for a collector on this host."""
    from cgctl import discovery
    from cgctl.cgroup.fs import HostNotSupported

    try:
        return discovery.select_on_host(cgroup_root, max_depth, tuple(include or ()), tuple(exclude or ()))
    except (discovery.SelectionError, HostNotSupported) as error:
        raise fail(str(error)) from None
