"""Spawning and supervising workloads. `run` is the library's entry point; the CLI is a thin layer over it."""

from cgctl.runtime.local import RunResult, SpawnError, run

__all__ = ["RunResult", "SpawnError", "run"]
