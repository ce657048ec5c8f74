"""The cpuset controller: which CPUs the workload may run on."""

from __future__ import annotations

from cgctl import limits as table
from cgctl.cgroup.fs import Cgroup
from cgctl.spec import CpuLimits, SpecError

CONTROLLER = "cpuset"


def parse_cpu_list(text: str) -> set[int]:
    """'0-3,6' -> {0, 1, 2, 3, 6}, the kernel's list format."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def settings(limits: CpuLimits, parent: Cgroup) -> list[tuple[str, str]]:
    """cpuset.cpus, after checking that the parent lets the workload have those CPUs."""
    if limits.cpuset is None:
        return []
    available = parent.read("cpuset.cpus.effective").strip()
    outside = parse_cpu_list(limits.cpuset) - parse_cpu_list(available)
    if outside:
        raise SpecError(
            ("limits", "cpu", "cpuset"),
            limits.cpuset,
            f"CPU(s) {','.join(map(str, sorted(outside)))} are not available (this host offers {available})",
        )
    return table.settings(CONTROLLER, dict(limits))
