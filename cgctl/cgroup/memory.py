"""The memory controller: memory.max/high/low/min, swap and OOM grouping."""

from __future__ import annotations

from cgctl.spec import MAX, MemoryLimits, SpecError, format_size

CONTROLLER = "memory"


def settings(limits: MemoryLimits) -> list[tuple[str, str]]:
    """(interface file, value) pairs that enforce limits, in the order they are written, after
    checking that none is above the host's memory."""
    files = {
        "memory.min": limits.min,
        "memory.low": limits.low,
        "memory.high": limits.high,
        "memory.max": limits.max,
        "memory.swap.max": limits.swap_max,
    }
    check_sizes(limits)
    written = [(name, str(value)) for name, value in files.items() if value is not None]
    return [*written, ("memory.oom.group", "1" if limits.oom_group else "0")]


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
