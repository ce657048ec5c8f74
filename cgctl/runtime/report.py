"""The run report: what a workload did and what it was allowed, read from its cgroup as it ends."""

from __future__ import annotations

import os

from pydantic import BaseModel

from cgctl.cgroup import cpu, fs, io, memory, pids
from cgctl.spec import WorkloadSpec


class IoUsage(BaseModel):
    device: str  # MAJ:MIN
    name: str | None
    read_bytes: int
    write_bytes: int
    read_ios: int
    write_ios: int


class RunReport(BaseModel):
    """Written by `cgctl run --report`; None where this kernel lacks the counter (e.g. memory.swap.peak)."""

    name: str
    cgroup: str
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    oom_killed: bool
    oom_kills: int
    wall_seconds: float
    cpu_user_seconds: float
    cpu_system_seconds: float
    cpu_throttled_seconds: float
    cpu_throttled_periods: int
    memory_peak_bytes: int | None
    memory_limit_bytes: int | None
    memory_high_events: int
    swap_peak_bytes: int | None
    io: list[IoUsage]
    pids_peak: int | None
    pids_refused_forks: int
    limits: dict[str, str]  # each interface file cgctl wrote, as the kernel reads it back
    labels: dict[str, str]

    @property
    def exit_status(self) -> int:
        """The status `cgctl run` exits with: the workload's, or 128+N when killed by signal N."""
        return self.exit_code if self.signal is None else 128 + self.signal  # type: ignore[return-value]


def final_report(
    name: str, group: fs.Cgroup, status: int, wall: float, applied: dict[str, str], spec: WorkloadSpec
) -> RunReport:
    """Read the cgroup's final accounting (call once it is empty, before it is removed)."""
    mem, cpu_stat, pids_stat = memory.stat(group), cpu.stat(group), pids.stat(group)
    killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    return RunReport(
        name=name,
        cgroup=str(group.path),
        exit_code=None if killed_by else os.waitstatus_to_exitcode(status),
        signal=killed_by,
        oom_killed=mem.oom_kills > 0,
        oom_kills=mem.oom_kills,
        wall_seconds=round(wall, 6),
        cpu_user_seconds=cpu_stat.user_usec / 1e6,
        cpu_system_seconds=cpu_stat.system_usec / 1e6,
        cpu_throttled_seconds=cpu_stat.throttled_usec / 1e6,
        cpu_throttled_periods=cpu_stat.nr_throttled,
        memory_peak_bytes=mem.peak_bytes,
        memory_limit_bytes=mem.limit_bytes,
        memory_high_events=mem.events.get("high", 0),
        swap_peak_bytes=mem.swap_peak_bytes,
        io=[
            IoUsage(
                device=d.device,
                name=d.name,
                read_bytes=d.rbytes,
                write_bytes=d.wbytes,
                read_ios=d.rios,
                write_ios=d.wios,
            )
            for d in io.stat(group)
        ],
        pids_peak=pids_stat.peak,
        pids_refused_forks=pids_stat.refused_forks,
        limits=applied,
        labels=spec.labels,
    )
