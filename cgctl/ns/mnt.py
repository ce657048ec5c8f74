"""The mount namespace: the workload's mounts (its /proc, /sys, cgroup view) never reach the host."""

from __future__ import annotations

from cgctl.ns import libc
from cgctl.ns.context import Context

FLAG = libc.CLONE_NEWNS


def in_child(context: Context) -> None:
    # Stop mount events propagating back to the host before anything is mounted.
    libc.mount("none", "/", None, libc.MS_REC | libc.MS_PRIVATE)


in_init = None
