"""The sandbox's seccomp layer: an OCI/docker JSON profile, compiled by libseccomp, installed before exec.

The supervisor loads and compiles the profile (libseccomp through ctypes: it writes the classic BPF,
so no filter is assembled by hand here) before it forks, so every mistake is a SpecError naming the
file, the field and the value before anything exists. The workload only makes one seccomp(2) call
with the finished program: it needs nothing from libseccomp, and nothing the child lacks.
The profile format and its loading are seccomp_profile.py's; libseccomp's binding is libseccomp.py.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from cgctl import syscalls
from cgctl.sandbox.libseccomp import ArgCmp, version
from cgctl.sandbox.seccomp_profile import (
    ACT_ERRNO,
    ACTIONS,
    ARCHES,
    DEFAULT,
    FIELD,
    FLAGS,
    GOARCH,
    OPS,
    UNCONFINED,
    WITH_RET,
    Profile,
    Syscall,
    default_file,
    load_profile,
    need_library,
    shown,
)
from cgctl.spec import SpecError

__all__ = ["DEFAULT", "UNCONFINED", "Filter", "Profile", "compile", "filter_for", "install", "load_profile"]

# The ABIs a kernel of each architecture runs (libseccomp's names); on others every listed one is kept.
_RUNNABLE = {
    "x86_64": {"x86_64", "x86", "x32"},
    "aarch64": {"aarch64", "arm"},
    "ppc64le": {"ppc64le"},
    "s390x": {"s390x", "s390"},
    "riscv64": {"riscv64"},
}
BPF_MAXINSNS = 4096  # the kernel's limit on one classic BPF program
_KERNEL_VERSION = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?")

# libseccomp's enum scmp_filter_attr
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_NNP = 3
_ATTR_CTL_OPTIMIZE = 8
_OPTIMIZE_TREE = 2  # a binary tree of system call numbers instead of one long if-chain
_TREE_FROM_RULES = 32  # libseccomp <= 2.5.4 writes a broken tree for an empty rule set (runc's threshold)

# seccomp(2)'s number per machine (uname -m); the call takes (operation, flags, args).
SYS_SECCOMP = {
    "x86_64": 317,
    "i386": 354,
    "i686": 354,
    "aarch64": 277,
    "armv7l": 383,
    "armv6l": 383,
    "riscv64": 277,
    "loongarch64": 277,
    "ppc64le": 358,
    "ppc64": 358,
    "s390x": 348,
    "mips64": 5312,
}
SECCOMP_SET_MODE_FILTER = 1


@dataclass(frozen=True)
class Filter:
    """A compiled filter: the sock_filter array for seccomp(2) and its SECCOMP_FILTER_FLAG_* flags."""

    program: bytes
    flags: int


# Compiling


def _action(name: str, errno_ret: int | None) -> int:
    value = ACTIONS[name]
    if name in WITH_RET:
        value |= (errno.EPERM if errno_ret is None else errno_ret) & 0xFFFF
    return value


def _action_name(value: int) -> str:
    for name, base in ACTIONS.items():
        if name in WITH_RET and value & 0xFFFF0000 == base:
            return f"{name}({value & 0xFFFF})"
        if value == base:
            return name
    return hex(value)


def _kernel_release(release: str) -> tuple[int, int, int]:
    match = _KERNEL_VERSION.match(release)
    if not match:
        return (0, 0, 0)
    major, minor, patch = (int(part) if part else 0 for part in match.groups())
    return (major, minor, patch)


def _native_names(lib: ctypes.CDLL) -> set[str]:
    """Every spelling of the native architecture: OCI's, libseccomp's and Go's."""
    native = lib.seccomp_arch_native()
    names = {name for name in ARCHES.values() if lib.seccomp_arch_resolve_name(name.encode()) == native}
    names |= {oci for oci, name in ARCHES.items() if name in names}
    names |= {go for go, name in GOARCH.items() if name in names}
    return names


def _applies(entry: Syscall, caps: set[str], arches: set[str], kernel: tuple[int, int, int]) -> bool:
    """docker's rules: excludes drops the entry if any cap, arch or newer kernel matches; includes keeps
    it only if all caps are held, the native arch is listed and the kernel is new enough."""
    if entry.excludes:
        if arches & set(entry.excludes.arches) or caps & set(entry.excludes.caps):
            return False
        if entry.excludes.min_kernel and kernel >= _kernel_release(entry.excludes.min_kernel):
            return False
    if entry.includes:
        if entry.includes.arches and not arches & set(entry.includes.arches):
            return False
        if not set(entry.includes.caps) <= caps:
            return False
        if entry.includes.min_kernel and kernel < _kernel_release(entry.includes.min_kernel):
            return False
    return True


def _normal_cap(name: str) -> str:
    name = name.upper()
    return name if name.startswith("CAP_") else f"CAP_{name}"


def compile(profile: Profile, capabilities: Collection[str]) -> Filter:
    """The filter for a workload holding `capabilities` (names such as CAP_SYS_ADMIN), written by
    libseccomp as classic BPF. The native architecture is always filtered, with the profile's listed
    ones; any other (x32, i386 through int 0x80) gets ERRNO(EPERM). Entries whose includes/excludes do
    not fit these capabilities, this architecture or this kernel are left out. Runs in the supervisor."""
    where, source = profile._file, profile._source
    lib = need_library(where, source)
    caps = {_normal_cap(name) for name in capabilities}
    native = lib.seccomp_arch_native()
    native_names = _native_names(lib)
    kernel = _kernel_release(os.uname().release)
    default = _action(profile.default_action, profile.default_errno_ret)

    rules: list[tuple[int, Syscall, int]] = []  # (entry index, entry, action)
    for position, entry in enumerate(profile.syscalls):
        action = _action(entry.action, entry.errno_ret)
        if action != default and _applies(entry, caps, native_names, kernel):
            rules.append((position, entry, action))
    _refuse_conflicts(rules, where, source)

    ctx = lib.seccomp_init(default)
    if not ctx:
        raise SpecError(
            FIELD,
            source,
            f"{where}: defaultAction = {shown(profile.default_action)}: libseccomp {version()} refuses it "
            "(this kernel may lack that action): use SCMP_ACT_ERRNO",
        )
    try:
        _set(lib, ctx, _ATTR_CTL_NNP, 0, where, source)  # cgctl sets no_new_privs itself
        _set(lib, ctx, _ATTR_ACT_BADARCH, ACT_ERRNO | errno.EPERM, where, source)
        if sum(len(entry.names) for _, entry, _ in rules) > _TREE_FROM_RULES:
            _set(lib, ctx, _ATTR_CTL_OPTIMIZE, _OPTIMIZE_TREE, where, source)
        for arch in _filter_arches(profile, native_names):
            token = lib.seccomp_arch_resolve_name(ARCHES[arch].encode())
            if token == native:
                continue
            result = lib.seccomp_arch_add(ctx, token)
            # EDOM: the other byte order, which this kernel can never present: nothing to filter.
            if result < 0 and result not in (-errno.EEXIST, -errno.EDOM):
                raise SpecError(
                    FIELD,
                    source,
                    f"{where}: architecture {arch}: libseccomp refuses it: {os.strerror(-result)}",
                )
        for position, entry, action in rules:
            _add_rules(lib, ctx, position, entry, action, where, source)
        program = _export(lib, ctx, where, source)
    finally:
        lib.seccomp_release(ctx)
    flags = 0
    for flag in profile.flags:
        flags |= FLAGS[flag]
    return Filter(program=program, flags=flags)


def filter_for(source: str, capabilities: Collection[str]) -> Filter:
    """load_profile and compile, remembered for each profile file (by inode, size and modification time)
    and capability set: a process starting many workloads (a daemon, a library caller) pays for
    parsing and compiling once, while an edited profile is read again."""
    path = default_file() if source == DEFAULT else Path(source)
    try:
        info = path.stat()
        identity: tuple[int, int, int] | None = (info.st_ino, info.st_size, info.st_mtime_ns)
    except OSError:
        identity = None  # load_profile says why
    return _compiled(source, identity, frozenset(capabilities))


@functools.lru_cache(maxsize=16)
def _compiled(source: str, identity: tuple[int, int, int] | None, capabilities: frozenset[str]) -> Filter:
    return compile(load_profile(source), capabilities)


def _set(lib: ctypes.CDLL, ctx: int, attribute: int, value: int, where: str, source: str) -> None:
    result = lib.seccomp_attr_set(ctx, attribute, value)
    if result < 0:
        raise SpecError(
            FIELD, source, f"{where}: libseccomp attribute {attribute}={value:#x}: {os.strerror(-result)}"
        )


def _filter_arches(profile: Profile, native_names: set[str]) -> list[str]:
    """OCI's architectures, or docker's archMap entry for the native architecture and its sub-arches,
    less those this kernel can never present (aarch64 on x86_64): filtering them only makes the
    program longer, and every system call pays for its length."""
    arches = list(profile.architectures)
    for entry in profile.arch_map:
        if entry.architecture in native_names:
            arches += [entry.architecture, *entry.sub_architectures]
    runnable = next((abis for native, abis in _RUNNABLE.items() if native in native_names), None)
    return [arch for arch in arches if runnable is None or ARCHES[arch] in runnable]


def _refuse_conflicts(rules: list[tuple[int, Syscall, int]], where: str, source: str) -> None:
    """libseccomp silently keeps one of two rules for a system call when either has no args and their
    actions differ (the first of two plain rules, the plain one over one with args): refuse instead."""
    seen: dict[str, list[tuple[int, int, bool]]] = {}
    for position, entry, action in rules:
        for name in entry.names:
            for other, other_action, other_args in seen.get(name, []):
                if other_action != action and not (other_args and entry.args):
                    raise SpecError(
                        FIELD,
                        source,
                        f"{where}: syscalls[{other}] and syscalls[{position}] both apply to {name!r} with "
                        f"different actions ({_action_name(other_action)}, {_action_name(action)}) and one "
                        "of them for any arguments: libseccomp would keep only one; make them exclusive "
                        "with includes/excludes, or drop one",
                    )
            seen.setdefault(name, []).append((position, action, bool(entry.args)))


def _add_rules(
    lib: ctypes.CDLL, ctx: int, position: int, entry: Syscall, action: int, where: str, source: str
) -> None:
    conditions = (ArgCmp * len(entry.args))(
        *(ArgCmp(arg.index, OPS[arg.op], arg.value, arg.value_two) for arg in entry.args)
    )
    for index, name in enumerate(entry.names):
        number = lib.seccomp_syscall_resolve_name(name.encode())
        result = lib.seccomp_rule_add_array(ctx, action, number, len(entry.args), conditions)
        if result < 0:
            hint = (
                ": two comparisons of the same argument in one entry are refused: split them into entries"
                if result == -errno.EINVAL and len(entry.args) > 1
                else ""
            )
            raise SpecError(
                FIELD,
                source,
                f"{where}: syscalls[{position}].names[{index}] = {shown(name)}: libseccomp {version()} "
                f"refuses the rule: {os.strerror(-result)}{hint}",
            )


def _export(lib: ctypes.CDLL, ctx: int, where: str, source: str) -> bytes:
    """The BPF program (libseccomp 2.5 writes it only to a file descriptor)."""
    fd = os.memfd_create("cgctl-seccomp", os.MFD_CLOEXEC)
    try:
        result = lib.seccomp_export_bpf(ctx, fd)
        if result < 0:
            raise SpecError(
                FIELD, source, f"{where}: libseccomp cannot write the filter: {os.strerror(-result)}"
            )
        size = os.fstat(fd).st_size
        program = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    if len(program) // 8 > BPF_MAXINSNS:
        raise SpecError(
            FIELD,
            source,
            f"{where}: the filter has {len(program) // 8} instructions, more than the kernel's "
            f"{BPF_MAXINSNS}: use fewer rules",
        )
    return program


# Installing


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


# Looked up before the fork: install() runs in the workload, on its way to exec, where every first
# touch of Python's memory costs a copy-on-write fault.
_SYS_SECCOMP_HERE = SYS_SECCOMP.get(platform.machine())


def install(filter: Filter) -> None:
    """Load the filter into this process with seccomp(2): the workload's last step before exec. Needs
    no_new_privs or CAP_SYS_ADMIN; raises OSError naming the call."""
    count = len(filter.program) // 8
    if not filter.program or len(filter.program) % 8:
        raise ValueError(f"not a BPF program: {len(filter.program)} bytes")
    if _SYS_SECCOMP_HERE is None:
        raise OSError(errno.ENOSYS, f"seccomp(2): cgctl does not know its number on {platform.machine()}")
    program = ctypes.create_string_buffer(filter.program, len(filter.program))
    fprog = _SockFprog(count, ctypes.cast(program, ctypes.c_void_p))
    result = syscalls.raw_syscall(
        ctypes.c_long(_SYS_SECCOMP_HERE),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(filter.flags),
        ctypes.byref(fprog),
    )
    call = f"seccomp(SECCOMP_SET_MODE_FILTER, {filter.flags:#x}, {count} instructions)"
    if result == -1:
        code = ctypes.get_errno()
        hint = ": set no_new_privs first, or hold CAP_SYS_ADMIN" if code == errno.EACCES else ""
        raise OSError(code, f"{call}: {os.strerror(code)}{hint}")
    if result != 0:  # TSYNC: the thread that could not be synchronised
        raise OSError(errno.EBUSY, f"{call}: thread {result} cannot take the filter")
