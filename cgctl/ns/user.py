"""The user namespace: root inside maps to the caller outside (one id, no helper binaries needed).

The mapping is written by the process itself right after unshare, which the
kernel allows for exactly one id: the caller's own. That is all `--userns`
promises, and it works unprivileged.
"""

from __future__ import annotations

from pathlib import Path

from cgctl import syscalls

FLAG = syscalls.CLONE_NEWUSER


def enter(outer_uid: int, outer_gid: int) -> None:
    syscalls.unshare(FLAG)
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {outer_uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {outer_gid} 1")
