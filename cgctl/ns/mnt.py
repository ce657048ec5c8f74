"""The mount namespace: the workload's mounts (its /proc, /sys, cgroup view) never reach the host."""

from __future__ import annotations

from cgctl import syscalls
from cgctl.ns.context import Context

FLAG = syscalls.CLONE_NEWNS


def in_child(context: Context) -> None:
    # Stop mount events propagating back to the host before anything is mounted.
    syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)


in_init = None
