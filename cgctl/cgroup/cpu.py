"""The cpu controller: bandwidth (cpu.max), weight and idle."""

from __future__ import annotations

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
