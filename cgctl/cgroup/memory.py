"""The memory controller: memory.max and memory.oom.group; peak and OOM accounting."""

from __future__ import annotations

from dataclasses import dataclass

from cgctl.cgroup.fs import Cgroup
from cgctl.spec import MemoryLimits

CONTROLLER = "memory"


def apply(group: Cgroup, limits: MemoryLimits) -> None:
    if limits.max is not None:
        group.write("memory.max", str(limits.max))
    group.write("memory.oom.group", "1" if limits.oom_group else "0")


@dataclass(frozen=True)
class MemoryStat:
    current_bytes: int
    peak_bytes: int | None  # memory.peak exists from Linux 5.19
    limit_bytes: int | None  # None: no limit (max)
    oom_kills: int
    events: dict[str, int]


def stat(group: Cgroup) -> MemoryStat:
    events = group.read_keyed("memory.events")
    return MemoryStat(
        current_bytes=group.read_int("memory.current") or 0,
        peak_bytes=group.read_int("memory.peak") if group.has("memory.peak") else None,
        limit_bytes=group.read_int("memory.max"),
        oom_kills=events.get("oom_kill", 0),
        events=events,
    )
