"""The memory controller: memory.max/high/low/min, swap, zswap and OOM grouping (cgctl.limits's rows)."""

from __future__ import annotations

from cgctl import limits as table
from cgctl.spec import MAX, MemoryLimits, SpecError, format_size

CONTROLLER = "memory"


def settings(limits: MemoryLimits) -> list[tuple[str, str]]:
    """(interface file, value) pairs that enforce limits, in the order they are written, after
    checking that none is above the host's memory."""
    check_sizes(limits)
    return table.settings(CONTROLLER, dict(limits))


def check_sizes(limits: MemoryLimits) -> None:
    """Refuse a limit or protection above the host's memory (docker only warns): it could never
    apply, so it is most likely a unit too big, 256G for 256M. Swap is left alone: swap space can
    be added while the workload runs."""
    import psutil

    given = {"max": limits.max, "high": limits.high, "low": limits.low, "min": limits.min}
    sizes = {field: size for field, size in given.items() if size is not None and size != MAX}
    if not sizes:
        return
    total = psutil.virtual_memory().total
    for field, size in sizes.items():
        if size > total:
            raise SpecError(
                ("limits", "memory", field),
                format_size(size),
                f"this host has only {format_size(total)} of memory ({total} bytes), so memory.{field} "
                f"above it can never apply: a unit too big (256G for 256M)? Give at most {total} bytes",
            )
