"""PSI triggers: a file descriptor the kernel marks with POLLPRI when a cgroup stalls on a resource.

Why triggers rather than reading <resource>.pressure: the averages there are updated every 2 s
and smoothed over 10 s at best, while a trigger reports "stalled for stall_us within any
window_us" as it happens, and costs a waiting daemon nothing in between. The kernel's rules,
Documentation/accounting/psi.rst "Monitoring for pressure thresholds": one trigger per open file,
written as "some|full <stall us> <window us>" with its NUL; a window of 500 ms to 10 s
(unprivileged writers: a multiple of 2 s); at most one event per window; POLLERR once the cgroup
is removed. The trigger lives as long as the file descriptor.
"""

from __future__ import annotations

import errno
import os

from cgctl.cgroup import fs

RESOURCES = ("cpu", "memory", "io")
KINDS = ("some", "full")
WINDOW_MIN_US = 500_000
WINDOW_MAX_US = 10_000_000
UNPRIVILEGED_WINDOW_US = 2_000_000  # without CAP_SYS_RESOURCE the window must be a multiple of this

FIX_PRIVILEGE = (
    "run with CAP_SYS_RESOURCE (as root), or choose a window that is a multiple of 2 s "
    "(the only windows the kernel lets an unprivileged process arm)"
)
# Why the kernel refuses a trigger, and what to do about it, by errno.
FIXES = {
    errno.ENOENT: (
        "the cgroup is gone, or the kernel offers no pressure file for it (built without "
        "CONFIG_PSI, or PSI switched off for this cgroup by writing 0 to cgroup.pressure). "
        "Fix: check the cgroup exists; write 1 to its cgroup.pressure; boot the kernel with psi=1"
    ),
    errno.ENODEV: "the cgroup was removed while the trigger was being armed. Fix: arm it on a live cgroup",
    errno.EOPNOTSUPP: (
        "PSI is disabled in this kernel. Fix: boot it with psi=1 on its command line "
        "(kernels built with CONFIG_PSI_DEFAULT_DISABLED need it)"
    ),
    errno.EBUSY: "this file descriptor already holds a trigger. Fix: open the file again for each trigger",
    errno.EINVAL: (
        "the kernel refused the trigger: a window outside the range this kernel accepts, a stall "
        f"larger than its window, or, for an unprivileged process, a window not a multiple of 2 s. Fix: "
        f"{FIX_PRIVILEGE}"
    ),
    errno.EPERM: f"arming a trigger needs privilege for this window on this kernel. Fix: {FIX_PRIVILEGE}",
    errno.EACCES: f"arming a trigger needs privilege for this window on this kernel. Fix: {FIX_PRIVILEGE}",
}


def trigger_text(kind: str, stall_us: int, window_us: int) -> str:
    return f"{kind} {stall_us} {window_us}"


def validate(resource: str, kind: str, stall_us: int, window_us: int) -> None:
    """ValueError naming the value and what is allowed, before the kernel gives a bare EINVAL."""
    if resource not in RESOURCES:
        raise ValueError(f"pressure resource {resource!r}: must be one of {', '.join(RESOURCES)}")
    if kind not in KINDS:
        raise ValueError(f"pressure kind {kind!r}: must be one of {', '.join(KINDS)}")
    if not WINDOW_MIN_US <= window_us <= WINDOW_MAX_US:
        raise ValueError(
            f"pressure window {window_us} us: must be from {WINDOW_MIN_US} us (500 ms) "
            f"to {WINDOW_MAX_US} us (10 s)"
        )
    if not 0 < stall_us <= window_us:
        raise ValueError(
            f"pressure stall {stall_us} us: must be more than 0 and at most the window ({window_us} us)"
        )


def open_trigger(group: fs.Cgroup, resource: str, kind: str, stall_us: int, window_us: int) -> int:
    """Arm a trigger on group's <resource>.pressure and return its fd, which fires as POLLPRI.

    The caller owns the fd: closing it removes the trigger.
    """
    validate(resource, kind, stall_us, window_us)
    path = group.file(f"{resource}.pressure")
    text = trigger_text(kind, stall_us, window_us)
    try:
        fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise fs.CgroupError(_refusal(path, text, error)) from None
    try:
        os.write(fd, text.encode() + b"\0")  # the NUL is part of the trigger, as in psi.rst's example
    except OSError as error:
        os.close(fd)
        raise fs.CgroupError(_refusal(path, text, error)) from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(path: os.PathLike[str], text: str, error: OSError) -> str:
    reason = error.strerror or os.strerror(error.errno or 0)
    message = f"{path}: cannot arm the pressure trigger {text!r}: {reason}"
    fix = FIXES.get(error.errno or 0)
    return f"{message}: {fix}" if fix else message
