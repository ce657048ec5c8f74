"""libseccomp through ctypes: the prototypes cgctl calls, its version, and whether this host can filter.

libseccomp writes the classic BPF of a filter (seccomp.py asks it to); it is loaded on first use, so a
host without it fails only the runs that ask for a filter, with `cgctl check` saying why.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import re
from pathlib import Path

from cgctl import syscalls

LIBRARY = "libseccomp.so.2"
MIN_VERSION = (2, 4, 0)  # seccomp_api_get, SCMP_ACT_KILL_PROCESS and SCMP_ACT_LOG
NR_SCMP_ERROR = -1  # what seccomp_syscall_resolve_name returns for a name it does not know
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


class ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def library() -> ctypes.CDLL | None:
    """libseccomp with its prototypes declared, or None when this host has none."""
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError:
        return None
    lib.seccomp_version.restype = ctypes.POINTER(_Version)
    lib.seccomp_version.argtypes = []
    lib.seccomp_api_get.restype = ctypes.c_uint
    lib.seccomp_api_get.argtypes = []
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.restype = None
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_attr_set.restype = ctypes.c_int
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_arch_native.restype = ctypes.c_uint32
    lib.seccomp_arch_native.argtypes = []
    lib.seccomp_arch_resolve_name.restype = ctypes.c_uint32
    lib.seccomp_arch_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_arch_add.restype = ctypes.c_int
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(ArgCmp),
    ]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def version() -> str | None:
    """libseccomp's version ("2.5.4"), or None if this host has no libseccomp."""
    lib = library()
    if lib is None:
        return None
    found = lib.seccomp_version().contents
    return f"{found.major}.{found.minor}.{found.micro}"


def problem() -> str | None:
    """Why seccomp filters cannot be used on this host (for `cgctl check`), or None."""
    found = version()
    if found is None:
        return (
            f"libseccomp ({LIBRARY}) cannot be loaded: install it (Debian/Ubuntu: apt-get install "
            "libseccomp2; Fedora/RHEL: dnf install libseccomp), or run workloads with --seccomp unconfined"
        )
    if tuple(map(int, found.split("."))) < MIN_VERSION:
        return f"libseccomp {found} is too old: cgctl needs {'.'.join(map(str, MIN_VERSION))} or later"
    status = Path("/proc/self/status").read_text()
    if not re.search(r"^Seccomp:", status, re.MULTILINE):
        return (
            "this kernel has no seccomp (no Seccomp field in /proc/self/status): build it with CONFIG_SECCOMP"
        )
    # The classic probe: with filters built in, a NULL program is refused with EFAULT (and nothing is set).
    if (
        syscalls.raw_prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, None, 0, 0) != -1
        or ctypes.get_errno() != errno.EFAULT
    ):
        return "this kernel has no seccomp filters (CONFIG_SECCOMP_FILTER): rebuild it with them"
    lib = library()
    if lib is not None and lib.seccomp_api_get() < 1:
        return f"libseccomp {found} finds no usable seccomp filter support in this kernel"
    return None
