"""Spawning and supervising workloads. `run` is the library's entry point; the CLI is a thin layer over it,
through one runtime interface (cgctl.runtime.interface) with a local and a remote implementation.

Names are imported on first use, so that the remote client (the CLI talking to the daemon) does not
pay for the spawning machinery it never uses."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cgctl.runtime.report import RunReport
    from cgctl.runtime.spawn import SpawnError
    from cgctl.runtime.supervisor import run

__all__ = ["RunReport", "SpawnError", "run"]


def __getattr__(name: str) -> Any:
    if name == "run":
        from cgctl.runtime.supervisor import run

        return run
    if name == "RunReport":
        from cgctl.runtime.report import RunReport

        return RunReport
    if name == "SpawnError":
        from cgctl.runtime.spawn import SpawnError

        return SpawnError
    raise AttributeError(name)
