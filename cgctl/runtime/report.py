"""The run report: what a workload did and what it was allowed, read from its cgroup as it ends."""

from __future__ import annotations

import os

from pydantic import BaseModel

from cgctl.accounting import Container, read_snapshot
from cgctl.cgroup import fs
from cgctl.spec import Security, WorkloadSpec


class IoUsage(BaseModel):
    device: str  # vda, sda, ... (MAJ:MIN when the name is unknown)
    read_bytes: int
    write_bytes: int
    read_ios: int
    write_ios: int


class NetworkUsage(BaseModel):
    """Totals over the container's interfaces (lo left out), read just before its network went."""

    rx_bytes: int
    rx_packets: int
    tx_bytes: int
    tx_packets: int


class SandboxReport(BaseModel):
    """The sandbox in force (see cgctl.sandbox)."""

    privileged: bool  # True: none of what follows applied
    capabilities: list[str]  # what a root workload holds; a non-root --user holds none effective
    no_new_privileges: bool
    seccomp: str  # default, unconfined, or the profile file
    masked_paths: bool  # kernel paths in /proc and /sys masked or read-only
    devices: list[str]  # device nodes granted beyond the default set, HOST[:PATH]:ACCESS; "all" if privileged

    @classmethod
    def of(cls, security: Security) -> SandboxReport:
        privileged = security.privileged
        return cls(
            privileged=privileged,
            capabilities=security.capabilities(),
            no_new_privileges=security.no_new_privileges and not privileged,
            seccomp="unconfined" if privileged else security.seccomp,
            masked_paths=not privileged,
            devices=["all"]
            if privileged
            else [
                ":".join(filter(None, (device.path, device.target, device.access)))
                for device in security.devices
            ],
        )


class RunReport(BaseModel):
    """Written by `cgctl run --report`; None where this kernel lacks the counter (e.g. memory.swap.peak)."""

    name: str
    cgroup: str
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    oom_killed: bool
    oom_kills: int  # processes the OOM killer killed
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
    # None when unknown: no network of its own (none, host), or not read before its teardown; the
    # cgroup is empty by the time this report is read, so accounting.network_totals is called earlier
    network: NetworkUsage | None = None
    pids_peak: int | None
    pids_refused_forks: int
    limits: dict[str, str]  # each interface file cgctl wrote, as the kernel reads it back
    labels: dict[str, str]
    sandbox: SandboxReport
    checkpointed_to: str | None = None  # the checkpoint directory, when `cgctl checkpoint` ended it

    @property
    def exit_status(self) -> int:
        """The status `cgctl run` exits with: the workload's, or 128+N when killed by signal N."""
        return self.exit_code if self.signal is None else 128 + self.signal  # type: ignore[return-value]


def final_report(
    name: str,
    group: fs.Cgroup,
    status: int,
    wall: float,
    applied: dict[str, str],
    spec: WorkloadSpec,
    network: dict[str, int] | None = None,
) -> RunReport:
    """Read the cgroup's final accounting (call once it is empty, before it is removed); `network` is
    what accounting.network_totals read while the workload's net namespace still had a process."""
    snap = read_snapshot(Container(name=name, id="", cgroup=group.path, started_at=0.0))
    if snap is None:
        raise fs.CgroupError(f"{group.path}: the cgroup vanished before its final accounting was read")

    def whole(file: str, key: str = "") -> int | None:
        value = snap.value(file, key)
        return None if value is None else int(value)

    killed_by = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    oom_kills = int(snap.oom_kills() or 0)
    return RunReport(
        name=name,
        cgroup=str(group.path),
        exit_code=None if killed_by else os.waitstatus_to_exitcode(status),
        signal=killed_by,
        oom_killed=oom_kills > 0,
        oom_kills=oom_kills,
        wall_seconds=round(wall, 6),
        cpu_user_seconds=(whole("cpu.stat", "user_usec") or 0) / 1e6,
        cpu_system_seconds=(whole("cpu.stat", "system_usec") or 0) / 1e6,
        cpu_throttled_seconds=(whole("cpu.stat", "throttled_usec") or 0) / 1e6,
        cpu_throttled_periods=whole("cpu.stat", "nr_throttled") or 0,
        memory_peak_bytes=whole("memory.peak"),
        memory_limit_bytes=whole("memory.max"),
        memory_high_events=whole("memory.events", "high") or 0,
        swap_peak_bytes=whole("memory.swap.peak"),
        io=[
            IoUsage(
                device=device,
                read_bytes=int(values.get("rbytes", 0)),
                write_bytes=int(values.get("wbytes", 0)),
                read_ios=int(values.get("rios", 0)),
                write_ios=int(values.get("wios", 0)),
            )
            for device, values in sorted(snap.devices.items())
        ],
        network=None if network is None else NetworkUsage(**network),
        pids_peak=whole("pids.peak"),
        pids_refused_forks=whole("pids.events", "max") or 0,
        limits=applied,
        labels=spec.labels,
        sandbox=SandboxReport.of(spec.security),
    )
