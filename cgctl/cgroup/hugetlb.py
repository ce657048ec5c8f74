"""The hugetlb controller: how much of each huge page size the workload may use (hugetlb.<size>.max).

Page sizes are named as the kernel names them in its files (2MB, 1GB); those this host has are
its /sys/kernel/mm/hugepages entries. The controller is enabled only for a workload that asks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from cgctl import limits as table
from cgctl.cgroup.fs import Cgroup
from cgctl.spec import SpecError

CONTROLLER = "hugetlb"
HUGEPAGES = Path("/sys/kernel/mm/hugepages")


def page_sizes(hugepages: Path = HUGEPAGES) -> list[str]:
    """This host's huge page sizes as hugetlb's files name them: hugepages-2048kB is 2MB."""
    sizes = []
    try:
        entries = sorted(int(entry.name[len("hugepages-") : -len("kB")]) for entry in hugepages.iterdir())
    except OSError:
        return []
    for kib in entries:
        unit, amount = next(
            (u, kib // 1024**n) for n, u in ((2, "GB"), (1, "MB"), (0, "KB")) if kib >= 1024**n
        )
        sizes.append(f"{amount}{unit}")
    return sizes


def settings(
    limits: dict[str, int | Literal["max"]], unified: Cgroup, hugepages: Path = HUGEPAGES
) -> list[tuple[str, str]]:
    """hugetlb.<size>.max per page size given, after checking that this host has the controller and
    the sizes."""
    if not limits:
        return []
    limit = table.row(CONTROLLER)
    if CONTROLLER not in unified.controllers():
        size, value = next(iter(limits.items()))
        raise SpecError(
            ("limits", CONTROLLER, size),
            f"{size}:{value}",
            f"this kernel offers no hugetlb controller ({unified.file('cgroup.controllers')} lists "
            f"{' '.join(sorted(unified.controllers())) or 'none'}): build it with CONFIG_CGROUP_HUGETLB, "
            f"or leave {limit.name} out",
        )
    sizes = page_sizes(hugepages)
    for size, value in limits.items():
        if size not in sizes:
            raise SpecError(
                ("limits", CONTROLLER, size),
                f"{size}:{value}",
                f"this host has no {size} huge pages (it has {', '.join(sizes) or 'none'}, from {hugepages})",
            )
    return [(limit.file.replace("{key}", size), str(value)) for size, value in limits.items()]
