"""The few Linux system calls Python 3.11's os module lacks (unshare, setns, mount, prctl, capset), by ctypes.

Python 3.12 adds os.unshare; until cgctl requires it, a dozen lines of ctypes
are smaller and better kept than a third-party binding. Every failure raises
OSError carrying the call and its arguments.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import NoReturn

CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000
MS_RELATIME = 0x200000

PR_SET_PDEATHSIG = 1
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_CLEAR_ALL = 4
PERSONALITIES = {"LINUX": 0x0000, "LINUX32": 0x0008}

_libc = ctypes.CDLL(None, use_errno=True)
# Resolved here, in the parent: a symbol first looked up in the forked workload costs it milliseconds
# under emulation, on its way to exec.
_unshare, _mount, _umount2, _syscall = _libc.unshare, _libc.mount, _libc.umount2, _libc.syscall
_prctl, _capset, _setns = _libc.prctl, _libc.capset, _libc.setns
_setdomainname, _personality = _libc.setdomainname, _libc.personality
# Unchecked, for the modules that read errno themselves (seccomp(2), bpf(2) and their probes).
raw_syscall, raw_prctl = _syscall, _prctl


def _fail(call: str) -> NoReturn:
    """Raise the OSError of the call that just returned -1 (messages are built only then: in the
    forked workload every needless string costs)."""
    errno = ctypes.get_errno()
    raise OSError(errno, f"{call}: {os.strerror(errno)}")


def unshare(flags: int) -> None:
    if _unshare(ctypes.c_int(flags)) == -1:
        _fail(f"unshare({flags:#x})")


def setdomainname(name: str) -> None:
    encoded = name.encode()
    if _setdomainname(encoded, ctypes.c_size_t(len(encoded))) == -1:
        _fail(f"setdomainname({name!r})")


def personality(persona: int) -> None:
    if _personality(ctypes.c_ulong(persona)) == -1:
        _fail(f"personality({persona:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace open at fd (nstype 0: whichever kind it is)."""
    if _setns(ctypes.c_int(fd), ctypes.c_int(nstype)) == -1:
        _fail(f"setns({fd}, {nstype:#x})")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    result = _mount(
        source.encode(),
        target.encode(),
        fstype.encode() if fstype else None,
        ctypes.c_ulong(flags),
        data.encode() if data else None,
    )
    if result == -1:
        _fail(f"mount({source!r}, {target!r}, {fstype!r})")


MNT_DETACH = 0x2


def umount(target: str, flags: int = 0) -> None:
    if _umount2(target.encode(), ctypes.c_int(flags)) == -1:
        _fail(f"umount2({target!r}, {flags})")


# mount_setattr(2) (Linux 5.12) has no glibc wrapper either; new system calls share one number everywhere.
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1


class _MountAttr(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in ("attr_set", "attr_clr", "propagation", "userns_fd")]


def make_read_only_recursively(path: str) -> None:
    """The mount at path and every mount below it read-only, in one call (other flags untouched).
    Raises OSError(ENOSYS) on kernels before 5.12."""
    attr = _MountAttr(MOUNT_ATTR_RDONLY, 0, 0, 0)
    result = _syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        path.encode(),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    if result == -1:
        _fail(f"mount_setattr({path!r}, AT_RECURSIVE, MOUNT_ATTR_RDONLY)")


# pivot_root(2) has no glibc wrapper: the raw system call, by architecture.
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "ppc64le": 203, "s390x": 217}


def pivot_root(new_root: str, put_old: str) -> None:
    number = SYS_PIVOT_ROOT[platform.machine()]
    if _syscall(number, new_root.encode(), put_old.encode()) == -1:
        _fail(f"pivot_root({new_root!r}, {put_old!r})")


def prctl(option: int, value: int = 0, value2: int = 0) -> int:
    result: int = _prctl(option, ctypes.c_ulong(value), ctypes.c_ulong(value2), 0, 0)
    if result == -1:
        _fail(f"prctl({option}, {value}, {value2})")
    return result


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_CAPABILITY_VERSION_3 = 0x20080522  # two 32-bit words per set


def capset(effective: int, permitted: int, inheritable: int) -> None:
    """Set this thread's capability sets (bit N = capability N)."""
    low, high = _CapData(), _CapData()
    low.effective, low.permitted, low.inheritable = effective, permitted, inheritable  # truncated to 32 bits
    high.effective, high.permitted, high.inheritable = effective >> 32, permitted >> 32, inheritable >> 32
    data = (_CapData * 2)(low, high)
    if _capset(ctypes.byref(_CapHeader(_CAPABILITY_VERSION_3, 0)), data) == -1:
        _fail(f"capset({effective:#x}, {permitted:#x}, {inheritable:#x})")


def get_child_subreaper() -> bool:
    flag = ctypes.c_int(0)
    if _prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == -1:
        _fail("prctl(PR_GET_CHILD_SUBREAPER)")
    return bool(flag.value)
