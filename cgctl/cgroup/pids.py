"""The pids controller: pids.max; current count, peak and fork refusals."""

from __future__ import annotations

from dataclasses import dataclass

from cgctl.cgroup.fs import Cgroup
from cgctl.spec import PidsLimits

CONTROLLER = "pids"


def settings(limits: PidsLimits) -> list[tuple[str, str]]:
    return [] if limits.max is None else [("pids.max", str(limits.max))]


@dataclass(frozen=True)
class PidsStat:
    current: int
    peak: int | None  # pids.peak: recent kernels only
    refused_forks: int  # pids.events max: forks refused by pids.max


def stat(group: Cgroup) -> PidsStat:
    return PidsStat(
        current=group.read_int("pids.current") or 0,
        peak=group.read_optional_int("pids.peak"),
        refused_forks=group.read_keyed("pids.events").get("max", 0),
    )
