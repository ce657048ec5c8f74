"""The memory controller: memory.max/high/low/min, swap and OOM grouping; usage, peaks and events."""

from __future__ import annotations

from dataclasses import dataclass

from cgctl.cgroup.fs import Cgroup
from cgctl.spec import MemoryLimits

CONTROLLER = "memory"


def settings(limits: MemoryLimits) -> list[tuple[str, str]]:
    """(interface file, value) pairs that enforce limits, in the order they are written."""
    files = {
        "memory.min": limits.min,
        "memory.low": limits.low,
        "memory.high": limits.high,
        "memory.max": limits.max,
        "memory.swap.max": limits.swap_max,
    }
    written = [(name, str(value)) for name, value in files.items() if value is not None]
    return [*written, ("memory.oom.group", "1" if limits.oom_group else "0")]


@dataclass(frozen=True)
class MemoryStat:
    current_bytes: int
    peak_bytes: int | None  # memory.peak: Linux 5.19+
    swap_current_bytes: int | None  # None without swap accounting
    swap_peak_bytes: int | None  # memory.swap.peak: Linux 6.5+
    limit_bytes: int | None  # None: no limit (max)
    events: dict[str, int]

    @property
    def oom_kills(self) -> int:
        return self.events.get("oom_kill", 0)


def stat(group: Cgroup) -> MemoryStat:
    return MemoryStat(
        current_bytes=group.read_int("memory.current") or 0,
        peak_bytes=group.read_optional_int("memory.peak"),
        swap_current_bytes=group.read_optional_int("memory.swap.current"),
        swap_peak_bytes=group.read_optional_int("memory.swap.peak"),
        limit_bytes=group.read_int("memory.max"),
        events=group.read_keyed("memory.events"),
    )
