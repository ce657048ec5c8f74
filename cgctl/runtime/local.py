"""Run a workload on this host: its own cgroup, every limit written before it starts, cleaned up after.

The child joins the cgroup between fork and exec, so the workload's first
instruction already runs under its limits. When the main process ends,
anything it left behind is killed with cgroup.kill and the group is removed
after its final accounting has been read.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from cgctl.cgroup import fs, memory
from cgctl.spec import WorkloadSpec

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
PR_SET_PDEATHSIG = 1


class SpawnError(Exception):
    """The workload could not be started; exit_code follows docker (126 not executable, 127 not found)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class RunResult:
    name: str
    cgroup: str
    exit_code: int | None  # None when killed by a signal
    signal: int | None
    oom_killed: bool
    oom_kills: int
    wall_seconds: float
    memory_peak_bytes: int | None
    memory_limit_bytes: int | None


def run(spec: WorkloadSpec, cgroup_root: Path | None = None) -> RunResult:
    """Run spec to completion and return its accounting. Raises fs.CgroupError or SpawnError."""
    unified = fs.open_unified_root([memory.CONTROLLER])
    parent = fs.open_cgctl_root(unified, [memory.CONTROLLER], root=cgroup_root)
    name = spec.name or f"run-{secrets.token_hex(4)}"
    group = fs.create(parent, name)
    try:
        memory.apply(group, spec.limits.memory)
        started = time.monotonic()
        process = _spawn(spec.command, group)
        returncode = _wait_forwarding_signals(process)
        wall = time.monotonic() - started
        final = memory.stat(group)
    finally:
        fs.remove(group)
    return RunResult(
        name=name,
        cgroup=str(group.path),
        exit_code=returncode if returncode >= 0 else None,
        signal=-returncode if returncode < 0 else None,
        oom_killed=final.oom_kills > 0,
        oom_kills=final.oom_kills,
        wall_seconds=wall,
        memory_peak_bytes=final.peak_bytes,
        memory_limit_bytes=final.limit_bytes,
    )


def _spawn(command: list[str], group: fs.Cgroup) -> subprocess.Popen[bytes]:
    procs = str(group.file("cgroup.procs"))
    libc = ctypes.CDLL(None, use_errno=True)

    def in_child() -> None:
        # Runs between fork and exec: die with cgctl, and join the cgroup before the first instruction.
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        with open(procs, "w") as handle:
            handle.write(str(os.getpid()))

    try:
        return subprocess.Popen(command, preexec_fn=in_child, close_fds=True)
    except FileNotFoundError:
        raise SpawnError(f"{command[0]}: command not found", 127) from None
    except subprocess.SubprocessError as error:
        raise fs.CgroupError(f"{procs}: the workload could not join its cgroup ({error})") from None
    except OSError as error:  # EACCES, ENOEXEC, EISDIR, ...: it exists but cannot be executed
        raise SpawnError(f"{command[0]}: cannot execute: {error.strerror}", 126) from None


def _wait_forwarding_signals(process: subprocess.Popen[bytes]) -> int:
    """Wait for the workload, passing on the signals a supervisor is expected to forward."""
    previous = {
        sig: signal.signal(sig, lambda sig, _frame: process.send_signal(sig)) for sig in FORWARDED_SIGNALS
    }
    try:
        return process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
