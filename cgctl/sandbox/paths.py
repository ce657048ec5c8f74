"""Kernel paths a workload must not reach: masked, or read-only, as runc and docker do by default.

Run in the workload's init inside its own mount namespace, once /proc, /sys and cgroup2 are
mounted (in its own root, if it has one). A masked file gets /dev/null bound over it, a masked
directory an empty read-only tmpfs; a read-only path is bound onto itself and every mount at or
under it is remounted read-only. Without CAP_SYS_ADMIN (and with the seccomp filter) the workload
can neither unmount these nor mount a fresh proc, sysfs or cgroup2 to get around them.
"""

from __future__ import annotations

import errno
import os

from cgctl import syscalls

MASKED = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/sys/devices/virtual/powercap",
    "/sys/firmware",
)
READ_ONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger", "/sys")
# Per-mount flags a remount must keep (in a user namespace the kernel refuses to clear locked ones).
_KEPT_FLAGS = {
    "nosuid": syscalls.MS_NOSUID,
    "nodev": syscalls.MS_NODEV,
    "noexec": syscalls.MS_NOEXEC,
    "noatime": syscalls.MS_NOATIME,
    "nodiratime": syscalls.MS_NODIRATIME,
    "relatime": syscalls.MS_RELATIME,
}


def restrict(masked: tuple[str, ...] = MASKED, read_only_paths: tuple[str, ...] = READ_ONLY) -> None:
    """Write-protect read_only_paths, then mask masked (the masks are read-only by themselves)."""
    for path in read_only_paths:
        if os.path.lexists(path):
            read_only(path)
    for path in masked:
        mask(path)


def read_only(path: str) -> None:
    """Make path and every mount under it read-only: bound onto itself (so that it is a mount of its
    own: /proc/sys is not) and made read-only recursively in one call, or, on kernels before 5.12,
    mount by mount as /proc/self/mountinfo lists them."""
    syscalls.mount(path, path, None, syscalls.MS_BIND | syscalls.MS_REC)
    try:
        syscalls.make_read_only_recursively(path)
    except OSError as error:
        if error.errno != errno.ENOSYS:
            raise
        remount_each_read_only(path)


def remount_each_read_only(path: str) -> None:
    """read_only without mount_setattr(2): remount path (a mount point) and every mount below it."""
    for point, flags in _mounts().items():
        if _under(point, path):
            syscalls.mount(
                "none", point, None, syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY | flags
            )


def _under(path: str, top: str) -> bool:
    """Whether path is top or below it."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def mask(path: str) -> None:
    """Hide path: /dev/null over a file, an empty read-only tmpfs over a directory; nothing if missing."""
    if os.path.isdir(path):
        syscalls.mount(
            "tmpfs",
            path,
            "tmpfs",
            syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC,
        )
    elif os.path.exists(path):
        syscalls.mount("/dev/null", path, None, syscalls.MS_BIND)


def _mounts() -> dict[str, int]:
    """The visible mount points, with the flags each must keep. /proc/self/mountinfo lists mounts in
    the order they were made, hidden ones too: a mount on P hides every earlier one at or under P
    (a fresh sysfs over the host's /sys hides the host's /sys/fs/cgroup)."""
    mounts: dict[str, int] = {}
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            point = fields[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            for hidden in [other for other in mounts if _under(other, point)]:
                del mounts[hidden]
            mounts[point] = sum(_KEPT_FLAGS.get(option, 0) for option in fields[5].split(","))
    return mounts
