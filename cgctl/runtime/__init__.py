"""Spawning and supervising workloads. `run` is the library's entry point; the CLI is a thin layer over it."""

from cgctl.runtime.local import run
from cgctl.runtime.report import RunReport
from cgctl.runtime.spawn import SpawnError

__all__ = ["RunReport", "SpawnError", "run"]
