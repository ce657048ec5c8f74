"""The cpu controller: bandwidth (cpu.max), weight and idle; usage and throttling."""

from __future__ import annotations

from dataclasses import dataclass

from cgctl.cgroup.fs import Cgroup
from cgctl.spec import CpuLimits

CONTROLLER = "cpu"
PERIOD_USEC = 100_000  # cpu.max's period: 100 ms, as docker and systemd use


def settings(limits: CpuLimits) -> list[tuple[str, str]]:
    files = []
    if limits.cpus is not None:
        files.append(("cpu.max", f"{int(limits.cpus * PERIOD_USEC)} {PERIOD_USEC}"))
    if limits.weight is not None:
        files.append(("cpu.weight", str(limits.weight)))
    if limits.idle:
        files.append(("cpu.idle", "1"))
    return files


@dataclass(frozen=True)
class CpuStat:
    usage_usec: int
    user_usec: int
    system_usec: int
    nr_periods: int
    nr_throttled: int
    throttled_usec: int


def stat(group: Cgroup) -> CpuStat:
    values = group.read_keyed("cpu.stat")
    return CpuStat(**{field: values.get(field, 0) for field in CpuStat.__dataclass_fields__})
