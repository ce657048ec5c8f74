"""Device access control for cgroup v2: which device nodes a workload may open or create.

cgroup v2 has no devices.allow file; like runc and crun, cgctl attaches an eBPF program
(BPF_PROG_TYPE_CGROUP_DEVICE) to the workload's cgroup, and the kernel runs it on every open and
mknod of a device node there: default deny, each Rule allows some. bpf(2) goes through ctypes, as
in cgctl.syscalls; the encoding is little-endian (x86_64, aarch64, riscv64, ppc64le).
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import platform
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial

from cgctl import syscalls
from cgctl.cgroup.fs import Cgroup, CgroupError

SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361}

# include/uapi/linux/bpf.h
BPF_PROG_LOAD = 5
BPF_PROG_ATTACH = 8
BPF_PROG_QUERY = 16
BPF_PROG_TYPE_CGROUP_DEVICE = 15
BPF_CGROUP_DEVICE = 6
BPF_F_ALLOW_MULTI = 2
BPF_F_QUERY_EFFECTIVE = 1
DEV_BLOCK, DEV_CHAR = 1, 2  # bpf_cgroup_dev_ctx.access_type & 0xffff
ACCESS_BITS = {"m": 1, "r": 2, "w": 4}  # bpf_cgroup_dev_ctx.access_type >> 16
KINDS = {"b": DEV_BLOCK, "c": DEV_CHAR}

LICENSE = b"Apache-2.0"
PROGRAM_NAME = b"cgctl_devices"  # what bpftool shows; at most 15 characters
LOG_SIZE = 1 << 18
NEEDS_ROOT = (
    "needs root: CAP_SYS_ADMIN in the host's user namespace (rootless runs rely on the kernel "
    "refusing device nodes in user namespaces instead)"
)


@dataclass(frozen=True)
class Rule:
    """Allow `access` (a subset of "rwm") to devices of `kind` ("c", "b", "a" for both) major:minor."""

    kind: str
    major: int | None  # None: any
    minor: int | None
    access: str

    def __post_init__(self) -> None:
        if self.kind not in ("a", "b", "c"):
            raise ValueError(f"device rule {self}: the kind must be 'c', 'b' or 'a', not {self.kind!r}")
        if not self.access or not set(self.access) <= set(ACCESS_BITS):
            raise ValueError(f"device rule {self}: the access must be letters of 'rwm', not {self.access!r}")
        for number in (self.major, self.minor):
            # They become signed 32-bit immediates; real numbers are 12 (major) and 20 (minor) bits.
            if number is not None and not 0 <= number < 1 << 31:
                raise ValueError(f"device rule {self}: {number} is no device number")

    def __str__(self) -> str:
        def number(value: int | None) -> str:
            return "*" if value is None else str(value)

        return f"{self.kind} {number(self.major)}:{number(self.minor)} {self.access}"


DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("a", None, None, "m"),  # mknod of any node (image tools create them); opening is another matter
    *(Rule("c", 1, minor, "rwm") for minor in (3, 5, 7, 8, 9)),  # null, zero, full, random, urandom
    *(Rule("c", 5, minor, "rwm") for minor in (0, 1, 2)),  # tty, console, ptmx
    Rule("c", 136, None, "rwm"),  # pty slaves, /dev/pts/N
)


def rule_for(path: str, access: str = "rwm") -> Rule:
    """The rule granting `access` to the host's device node at `path` (symlinks followed)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such device node: it does not exist") from None
    except OSError as error:
        raise ValueError(f"{path}: cannot stat the device node: {error.strerror}") from None
    if stat.S_ISCHR(info.st_mode):
        kind = "c"
    elif stat.S_ISBLK(info.st_mode):
        kind = "b"
    else:
        raise ValueError(f"{path}: not a device node: it is {_file_type(info.st_mode)}")
    return Rule(kind, os.major(info.st_rdev), os.minor(info.st_rdev), access)


def _file_type(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISFIFO, "a named pipe"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return f"of file type {stat.S_IFMT(mode):#o}"


# The instruction forms the program uses. An eBPF instruction is 8 bytes: opcode, dst and src
# registers in one byte (dst in the low nibble), a signed 16-bit offset, a signed 32-bit immediate.
# Jump offsets count instructions after the jump.
def _insn(opcode: int, dst: int = 0, src: int = 0, offset: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", opcode, src << 4 | dst, offset, imm)


def load_word(dst: int, src: int, offset: int) -> bytes:  # dst = *(u32 *)(src + offset)
    return _insn(0x61, dst, src, offset)  # BPF_LDX | BPF_MEM | BPF_W


def mov_imm(dst: int, imm: int) -> bytes:  # dst = imm
    return _insn(0xB7, dst, imm=imm)  # BPF_ALU64 | BPF_MOV | BPF_K


def mov_reg(dst: int, src: int) -> bytes:  # dst = src
    return _insn(0xBF, dst, src)  # BPF_ALU64 | BPF_MOV | BPF_X


def and_imm(dst: int, imm: int) -> bytes:  # dst &= imm
    return _insn(0x57, dst, imm=imm)  # BPF_ALU64 | BPF_AND | BPF_K


def rsh_imm(dst: int, imm: int) -> bytes:  # dst >>= imm
    return _insn(0x77, dst, imm=imm)  # BPF_ALU64 | BPF_RSH | BPF_K


def jne_imm(dst: int, imm: int, offset: int) -> bytes:  # if dst != imm: skip `offset` instructions
    return _insn(0x55, dst, offset=offset, imm=imm)  # BPF_JMP | BPF_JNE | BPF_K


def jne_reg(dst: int, src: int, offset: int) -> bytes:  # if dst != src: skip `offset` instructions
    return _insn(0x5D, dst, src, offset)  # BPF_JMP | BPF_JNE | BPF_X


def exit_() -> bytes:  # return r0
    return _insn(0x95)  # BPF_JMP | BPF_EXIT


# Registers: r1 points to struct bpf_cgroup_dev_ctx {u32 access_type, major, minor} on entry,
# and is scratch once the fields are loaded; r0 is the verdict (1 allow, 0 deny).
R0, R1, R_TYPE, R_ACCESS, R_MAJOR, R_MINOR = range(6)


def program(rules: Iterable[Rule]) -> bytes:
    """The eBPF program: allow (return 1) a request that any rule matches, deny (0) the rest."""
    code = [
        load_word(R_TYPE, R1, 0),
        and_imm(R_TYPE, 0xFFFF),
        load_word(R_ACCESS, R1, 0),
        rsh_imm(R_ACCESS, 16),
        load_word(R_MAJOR, R1, 4),
        load_word(R_MINOR, R1, 8),
    ]
    for rule in rules:
        code += _rule_block(rule)
    return b"".join([*code, mov_imm(R0, 0), exit_()])


def _rule_block(rule: Rule) -> list[bytes]:
    """Instructions returning 1 if the request matches `rule`, else falling through to the next block."""
    # Each test: the instructions it needs first, and its jump past the block, still lacking the offset.
    tests: list[tuple[list[bytes], Callable[[int], bytes]]] = []
    if rule.kind != "a":
        tests.append(([], partial(jne_imm, R_TYPE, KINDS[rule.kind])))
    bits = sum(ACCESS_BITS[letter] for letter in set(rule.access))
    if bits != 0b111:  # every requested bit must be an allowed one: (access & bits) == access
        tests.append(([mov_reg(R1, R_ACCESS), and_imm(R1, bits)], partial(jne_reg, R1, R_ACCESS)))
    if rule.major is not None:
        tests.append(([], partial(jne_imm, R_MAJOR, rule.major)))
    if rule.minor is not None:
        tests.append(([], partial(jne_imm, R_MINOR, rule.minor)))
    block = [mov_imm(R0, 1), exit_()]
    for before, jump in reversed(tests):  # built backwards: each jump skips what follows it
        block = [*before, jump(len(block)), *block]
    return block


class VerifierError(OSError):
    """The kernel's verifier refused the program; the message carries its log."""


def _attr(data: bytes) -> ctypes.Array[ctypes.c_char]:
    """A union bpf_attr: the fields of one command; the kernel zero-fills the rest."""
    return ctypes.create_string_buffer(data, len(data))


def _bpf(command: int, attr: ctypes.Array[ctypes.c_char], call: str) -> int:
    """bpf(command, attr): its result, or OSError(errno, "<call>: <errno text>")."""
    number = SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"{call}: cgctl knows no bpf() system call on {platform.machine()}")
    result = syscalls.raw_syscall(
        ctypes.c_long(number),
        ctypes.c_long(command),
        ctypes.c_void_p(ctypes.addressof(attr)),
        ctypes.c_long(len(attr)),
    )
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{call}: {os.strerror(code)}")
    return int(result)


def _load(code: bytes) -> int:
    """A new fd of the device program; OSError if refused, VerifierError with the verifier's log."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(LICENSE)  # NUL-terminated

    def load(log: ctypes.Array[ctypes.c_char] | None) -> int:
        attr = struct.pack(
            "<IIQQIIQII16s",
            BPF_PROG_TYPE_CGROUP_DEVICE,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(license_),
            0 if log is None else 1,  # log_level
            0 if log is None else len(log),
            0 if log is None else ctypes.addressof(log),
            0,  # kern_version
            0,  # prog_flags
            PROGRAM_NAME,
        )
        return _bpf(BPF_PROG_LOAD, _attr(attr), "bpf(BPF_PROG_LOAD, BPF_PROG_TYPE_CGROUP_DEVICE)")

    try:
        return load(None)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.EACCES):  # the verifier refuses with these two
            raise
        first = error
    log = ctypes.create_string_buffer(LOG_SIZE)
    try:
        return load(log)
    except OSError as error:
        text = log.value.decode(errors="replace").strip()
        if text:
            raise VerifierError(error.errno, f"{error.strerror}; the verifier's log:\n{text}") from None
        raise first from None


def _hint(error: OSError) -> str:
    """What a failed bpf() call's errno means here, where that helps."""
    if error.errno == errno.EPERM:
        return f"; device access control {NEEDS_ROOT}"
    if error.errno == errno.EINVAL and not isinstance(error, VerifierError):
        return "; the kernel lacks CONFIG_CGROUP_BPF (cgroup device programs need Linux 4.15+ built with it)"
    if error.errno == errno.ENOSYS:
        return "; the kernel lacks the bpf() system call (CONFIG_BPF_SYSCALL)"
    return ""


def _open_dir(group: Cgroup) -> int:
    try:
        return os.open(group.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise CgroupError(f"{group.path}: cannot open the cgroup: {error.strerror}") from None


def attach(group: Cgroup, rules: Iterable[Rule]) -> None:
    """Allow the cgroup's processes only the device access `rules` grant (and ancestors' programs allow).

    The program stays attached until the cgroup is removed; with BPF_F_ALLOW_MULTI, programs of
    ancestors (systemd's DevicePolicy=) still apply too, and programs of descendants may be added.
    """
    try:
        program_fd = _loaded(tuple(rules))
    except OSError as error:
        raise CgroupError(
            f"{group.path}: cannot load the device program: {error.strerror}{_hint(error)}"
        ) from None
    cgroup_fd = _open_dir(group)
    try:
        attr = struct.pack("<IIIII", cgroup_fd, program_fd, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI, 0)
        _bpf(BPF_PROG_ATTACH, _attr(attr), "bpf(BPF_PROG_ATTACH, BPF_CGROUP_DEVICE, BPF_F_ALLOW_MULTI)")
    except OSError as error:
        hint = _hint(error)
        if error.errno == errno.EPERM:
            hint += (
                ", and no ancestor may hold a device program attached without "
                "BPF_F_ALLOW_MULTI or BPF_F_ALLOW_OVERRIDE"
            )
        raise CgroupError(f"{group.path}: cannot attach the device program: {error.strerror}{hint}") from None
    finally:
        os.close(cgroup_fd)


@functools.lru_cache(maxsize=8)
def _loaded(rules: tuple[Rule, ...]) -> int:
    """A program fd, built and loaded (verified) once per set of rules for the life of the process: a
    process that starts many workloads (a daemon, a library caller) attaches the same program to each
    cgroup. The fd is close-on-exec, and workloads close every inherited fd anyway."""
    return _load(program(rules))


def attached(group: Cgroup, effective: bool = False) -> list[int]:
    """Ids of the device programs attached to the cgroup (effective: also those inherited)."""
    cgroup_fd = _open_dir(group)
    try:
        capacity = 64  # BPF_CGROUP_MAX_PROGS per cgroup; more only when inherited
        while True:
            ids = (ctypes.c_uint32 * capacity)()
            attr = _attr(
                struct.pack(
                    "<IIIIQII",
                    cgroup_fd,
                    BPF_CGROUP_DEVICE,
                    BPF_F_QUERY_EFFECTIVE if effective else 0,
                    0,  # attach_flags, out
                    ctypes.addressof(ids),
                    capacity,  # prog_cnt: in, the room in ids; out, the count
                    0,
                )
            )
            try:
                _bpf(BPF_PROG_QUERY, attr, "bpf(BPF_PROG_QUERY, BPF_CGROUP_DEVICE)")
            except OSError as error:
                if error.errno == errno.ENOSPC:
                    capacity = struct.unpack_from("<I", attr, 24)[0]
                    continue
                raise CgroupError(
                    f"{group.path}: cannot list the device programs: {error.strerror}{_hint(error)}"
                ) from None
            count = struct.unpack_from("<I", attr, 24)[0]
            return list(ids[:count])
    finally:
        os.close(cgroup_fd)


def problem() -> str | None:
    """Why this host cannot restrict device access (for `cgctl check`), or None if it can.

    Loads the default program and closes it again; nothing is attached.
    """
    try:
        os.close(_load(program(DEFAULT_RULES)))
    except OSError as error:
        return f"cannot load a cgroup device program: {error.strerror}{_hint(error)}"
    return None
