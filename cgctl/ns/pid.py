"""The pid namespace: the workload is pid 1 and sees only its own processes in a private /proc.

/proc is remounted only with a private mount namespace too; sharing the host's
mounts (--share mnt) leaves the host's /proc in place, as `unshare -p` does.
"""

from __future__ import annotations

from cgctl import syscalls
from cgctl.ns.context import Context

FLAG = syscalls.CLONE_NEWPID
in_child = None


def in_init(context: Context) -> None:
    if "mnt" in context.private and not context.own_mounts:
        syscalls.mount("proc", "/proc", "proc", syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC)
