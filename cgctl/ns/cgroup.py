"""The cgroup namespace: the workload sees its own cgroup as the root of the hierarchy.

It is created by the workload's first process right after joining its cgroup
(the namespace's root is the cgroup current at unshare time: ns.init_unshare),
not with the others. With a private mount namespace, cgroup2 is mounted again
at /sys/fs/cgroup, showing only the workload's subtree (unless the spec gives
its own mounts).
"""

from __future__ import annotations

from pathlib import Path

from cgctl import syscalls
from cgctl.ns.context import Context

FLAG = syscalls.CLONE_NEWCGROUP
UNSHARE_IN_INIT = True
CGROUP_MOUNT = Path("/sys/fs/cgroup")
in_child = None


def in_init(context: Context) -> None:
    if "mnt" in context.private and not context.own_mounts and CGROUP_MOUNT.is_dir():
        if (
            CGROUP_MOUNT.is_mount()
        ):  # the host's view (no fresh /sys under it): the kernel refuses a mount on top
            syscalls.umount(str(CGROUP_MOUNT), syscalls.MNT_DETACH)
        syscalls.mount(
            "cgroup2",
            str(CGROUP_MOUNT),
            "cgroup2",
            syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
        )
