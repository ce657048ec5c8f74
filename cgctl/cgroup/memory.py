"""The memory controller: memory.max/high/low/min, swap and OOM grouping."""

from __future__ import annotations

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
