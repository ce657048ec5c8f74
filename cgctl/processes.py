"""Single processes as the host sees them, through psutil: a container's for `cgctl top`, and the
daemon's and its keeper's own for /metrics.

It sits beside accounting, below the runtime: accounting reads a cgroup's totals from its
interface files, this reads the processes one by one, and both are read by the runtime and by the
metrics alike. psutil is imported in the functions, so a verb that never looks at a process (every
one but `top`) does not pay for it.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Any

# `top`'s CPU % is over this many seconds, as top(1) shows it, not ps's average since the process
# started: that average hides a process that just began to spin, or has just stopped.
CPU_INTERVAL = 0.5


def sample(pids: Iterable[int], interval: float = CPU_INTERVAL) -> list[dict[str, Any]]:
    """One row per process that lives through the interval, by pid, keyed as the runtime's
    ProcessRow (the models are above this layer); a process that exits meanwhile is left out.
    Raises PermissionError where the host hides a process from this user (hidepid)."""
    import psutil

    watched = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            process.cpu_percent()  # the start of the interval: this first call always says 0.0
        except psutil.NoSuchProcess:
            continue
        except psutil.AccessDenied:
            raise _hidden(pid) from None
        watched.append(process)
    if watched:
        time.sleep(interval)
    rows = []
    for process in watched:
        try:
            with process.oneshot():
                uid = process.uids().effective
                rows.append(
                    {
                        "pid": process.pid,
                        "nspid": _nspid(process.pid),
                        "user": _user(uid),
                        "uid": uid,
                        "cpu_percent": process.cpu_percent(),
                        "rss_bytes": process.memory_info().rss,
                        "started_at": process.create_time(),
                        "command": process.cmdline() or [f"[{process.name()}]"],
                    }
                )
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            continue  # it exited meanwhile (a zombie too: it has nothing left to show)
        except psutil.AccessDenied:
            raise _hidden(process.pid) from None
    return sorted(rows, key=lambda row: row["pid"])


def _hidden(pid: int) -> PermissionError:
    return PermissionError(
        f"/proc/{pid}: uid {os.geteuid()} may not read this process (/proc is mounted with hidepid): "
        "run as root, or through the daemon"
    )


def _nspid(pid: int) -> int:
    """The pid inside the process's own pid namespace: the last of /proc/PID/status's NSpid, which
    lists it from the reader's namespace down (psutil does not read it)."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("NSpid:"))
    return int(line.split()[-1])


@cache
def _user(uid: int) -> str:
    """The host's name for uid (the effective one, as ps shows), or the number if it has none."""
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True)
class Resources:
    """What a long-lived process of cgctl's own holds, in the units Prometheus's process_* use."""

    cpu_seconds: float  # user and system
    resident_bytes: int
    open_fds: int
    threads: int
    started_at: float  # unix time


def resources(pid: int) -> Resources | None:
    """The process's resources now, or None if it is gone (or not this user's to read)."""
    import psutil

    try:
        process = psutil.Process(pid)
        with process.oneshot():
            times = process.cpu_times()
            return Resources(
                cpu_seconds=times.user + times.system,
                resident_bytes=process.memory_info().rss,
                open_fds=process.num_fds(),
                threads=process.num_threads(),
                started_at=process.create_time(),
            )
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None
