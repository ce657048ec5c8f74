"""The cpu controller: bandwidth (cpu.max), weight and idle."""

from __future__ import annotations

import os
from decimal import Decimal

from cgctl import limits as table
from cgctl.cgroup.cpuset import parse_cpu_list
from cgctl.spec import CpuLimits, SpecError

CONTROLLER = "cpu"


def settings(limits: CpuLimits) -> list[tuple[str, str]]:
    """(interface file, value) pairs, after checking that the host has the CPUs asked for."""
    if limits.cpus is not None:
        check_cpus(limits.cpus, limits.cpuset)
    return table.settings(CONTROLLER, dict(limits))


def check_cpus(cpus: Decimal, cpuset: str | None) -> None:
    """Refuse more CPUs' time than the workload can run on, as docker does: such a quota is never
    used up, so it is a mistake. The CPUs are its cpuset's, else those cgctl may use (its affinity,
    which a cpuset or taskset around cgctl narrows from psutil's count of the host's)."""
    import psutil

    if cpuset is not None:
        available, where = len(parse_cpu_list(cpuset)), f"in its cpuset ({cpuset})"
    else:
        available, host = len(os.sched_getaffinity(0)), psutil.cpu_count() or 0
        where = "on this host" if available >= host else f"to cgctl, of this host's {host} (its affinity)"
    if cpus > available:
        raise SpecError(
            ("limits", "cpu", "cpus"),
            str(cpus),
            f"range of CPUs is from 0.01 to {available}.00, as there are only {available} CPUs "
            f"available {where}",
        )
