"""The net namespace: loopback only, and up; a fresh read-only /sys shows only the workload's interfaces."""

from __future__ import annotations

import fcntl
import socket
import struct

from cgctl import syscalls
from cgctl.ns.context import Context

FLAG = syscalls.CLONE_NEWNET
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1


def in_child(context: Context) -> None:
    loopback_up()


def loopback_up() -> None:
    """Bring lo up in the calling process's net namespace (a new one has it down)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def in_init(context: Context) -> None:
    if "mnt" in context.private and not context.own_mounts:
        flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
        syscalls.mount("sysfs", "/sys", "sysfs", flags)
