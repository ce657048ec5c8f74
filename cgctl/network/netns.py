"""A new net namespace held by a file descriptor, not by a mount: the CNI plugins reach it as
/proc/PID/fd/FD while it is being set up, the workload joins it by that path, and once the last
process in it ends the kernel destroys it with the container's side of its veth. Nothing is left
to unmount after a crash."""

from __future__ import annotations

import os

from cgctl import syscalls
from cgctl.ns import net


def create() -> int:
    """An fd of a new net namespace with lo up (the caller closes it once the workload is in)."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            os.close(ready_r)
            os.close(hold_w)
            syscalls.unshare(syscalls.CLONE_NEWNET)
            net.loopback_up()
            os.write(ready_w, b"y")
            os.read(hold_r, 1)  # until the parent has opened the namespace
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(hold_r)
    try:
        if os.read(ready_r, 1) != b"y":
            raise OSError(f"could not make a net namespace (process {child} failed to unshare it)")
        return os.open(f"/proc/{child}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(hold_w)
        os.waitpid(child, 0)


def path(fd: int) -> str:
    """The path of the namespace open at fd, for a plugin or a child to open."""
    return f"/proc/{os.getpid()}/fd/{fd}"
