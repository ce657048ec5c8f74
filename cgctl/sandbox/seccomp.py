"""The sandbox's seccomp layer: an OCI/docker JSON profile, compiled by libseccomp, installed before exec.

The supervisor loads and compiles the profile (libseccomp through ctypes: it writes the classic BPF,
so no filter is assembled by hand here) before it forks, so every mistake is a SpecError naming the
file, the field and the value before anything exists. The workload only makes one seccomp(2) call
with the finished program: it needs nothing from libseccomp, and nothing the child lacks.

Profiles use the format of the OCI runtime spec's linux.seccomp with docker's additions (archMap,
names, comment, includes/excludes with caps, arches and minKernel), so docker's and podman's
profiles load as they are.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import platform
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PrivateAttr,
    StrictInt,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from cgctl import syscalls
from cgctl.spec import CAPABILITIES, SpecError

DEFAULT = "default"
UNCONFINED = "unconfined"
FIELD = ("security", "seccomp")
DEFAULT_PROFILE = "seccomp-default.json"
LIBRARY = "libseccomp.so.2"
MIN_VERSION = (2, 4, 0)  # seccomp_api_get, SCMP_ACT_KILL_PROCESS and SCMP_ACT_LOG

# OCI action names to libseccomp's values (seccomp.h); ERRNO and TRACE carry errnoRet in the low 16 bits.
_ACT_ERRNO = 0x00050000
_ACT_TRACE = 0x7FF00000
ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000,  # the thread, as runc and libseccomp mean it
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": _ACT_ERRNO,
    "SCMP_ACT_TRACE": _ACT_TRACE,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
    "SCMP_ACT_LOG": 0x7FFC0000,
}
_WITH_RET = {"SCMP_ACT_ERRNO": 4095, "SCMP_ACT_TRACE": 0xFFFF}  # highest errnoRet: MAX_ERRNO, 16 bits
OPS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}
# OCI architecture names to libseccomp's (seccomp_arch_resolve_name takes the latter).
_LIBSECCOMP_ARCHES = (
    "x86", "x86_64", "x32", "arm", "aarch64", "mips", "mips64", "mips64n32", "mipsel", "mipsel64",
    "mipsel64n32", "ppc", "ppc64", "ppc64le", "s390", "s390x", "parisc", "parisc64", "riscv64",
)  # fmt: skip
ARCHES = {f"SCMP_ARCH_{name.upper()}": name for name in _LIBSECCOMP_ARCHES}
# includes/excludes.arches in docker's profiles are Go's GOARCH names; libseccomp's and OCI's work too.
_GOARCH = {
    "386": "x86",
    "amd64": "x86_64",
    "arm64": "aarch64",
    "mipsle": "mipsel",
    "mips64le": "mipsel64",
    "mips64p32": "mips64n32",
    "mips64p32le": "mipsel64n32",
}
# The ABIs a kernel of each architecture runs (libseccomp's names); on others every listed one is kept.
_RUNNABLE = {
    "x86_64": {"x86_64", "x86", "x32"},
    "aarch64": {"aarch64", "arm"},
    "ppc64le": {"ppc64le"},
    "s390x": {"s390x", "s390"},
    "riscv64": {"riscv64"},
}
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}
MAX_ARG_INDEX = 5  # system calls have six arguments
BPF_MAXINSNS = 4096  # the kernel's limit on one classic BPF program
_KERNEL_VERSION = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?")

# libseccomp's enum scmp_filter_attr
_ATTR_ACT_BADARCH = 2
_ATTR_CTL_NNP = 3
_ATTR_CTL_OPTIMIZE = 8
_OPTIMIZE_TREE = 2  # a binary tree of system call numbers instead of one long if-chain
_TREE_FROM_RULES = 32  # libseccomp <= 2.5.4 writes a broken tree for an empty rule set (runc's threshold)
_NR_SCMP_ERROR = -1  # what seccomp_syscall_resolve_name returns for a name it does not know

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
_PR_SET_SECCOMP = 22
_SECCOMP_MODE_FILTER = 2


def _none_is_empty(value: object) -> object:
    return [] if value is None else value


def _one_of(known: Iterable[str]) -> str:
    return f"use one of {', '.join(sorted(set(known)))}"


class _Model(BaseModel):
    # Built on first use: a run under --privileged or --seccomp unconfined never parses a profile.
    model_config = ConfigDict(extra="forbid", alias_generator=to_camel, defer_build=True)


class Arg(_Model):
    """One comparison of a system call argument: (arg[index] op value), or (arg & value) == valueTwo."""

    index: StrictInt
    value: StrictInt
    value_two: StrictInt = 0
    op: StrictStr

    @field_validator("index")
    @classmethod
    def _index(cls, index: int) -> int:
        if not 0 <= index <= MAX_ARG_INDEX:
            raise ValueError(f"is not an argument index: system calls have arguments 0 to {MAX_ARG_INDEX}")
        return index

    @field_validator("value", "value_two")
    @classmethod
    def _datum(cls, value: int) -> int:
        if not 0 <= value < 1 << 64:
            raise ValueError("is not a 64-bit unsigned value: give 0 to 18446744073709551615")
        return value

    @field_validator("op")
    @classmethod
    def _op(cls, op: str) -> str:
        if op not in OPS:
            raise ValueError(f"is not a seccomp comparison: {_one_of(OPS)}")
        return op


def _all_known(names: list[str], known: Collection[str], what: str) -> list[str]:
    for index, name in enumerate(names):
        if name not in known:
            raise ValueError(f"[{index}] {json.dumps(name)} is not {what}: {_one_of(known)}")
    return names


def _arch_alias(name: str) -> str | None:
    """libseccomp's name for an architecture given in OCI's, libseccomp's or Go's spelling."""
    if name in ARCHES:
        return ARCHES[name]
    if name in ARCHES.values():
        return name
    return _GOARCH.get(name)


def _check_arches(names: list[str], example: str) -> list[str]:
    for index, name in enumerate(names):
        if _arch_alias(name) is None:
            raise ValueError(f"[{index}] {json.dumps(name)} is not an architecture: {example}")
    return names


class Condition(_Model):
    """docker's includes/excludes: the capabilities, architectures and kernel an entry is meant for."""

    caps: Annotated[list[StrictStr], BeforeValidator(_none_is_empty)] = []
    arches: Annotated[list[StrictStr], BeforeValidator(_none_is_empty)] = []
    min_kernel: StrictStr | None = None

    @field_validator("caps")
    @classmethod
    def _caps(cls, caps: list[str]) -> list[str]:
        for index, cap in enumerate(caps):
            if cap not in CAPABILITIES:
                raise ValueError(
                    f"[{index}] {json.dumps(cap)} is not a capability: use a name of capabilities(7) "
                    "such as CAP_SYS_ADMIN (with the CAP_ prefix, upper case)"
                )
        return caps

    @field_validator("arches")
    @classmethod
    def _arches(cls, arches: list[str]) -> list[str]:
        return _check_arches(arches, "use a name such as amd64, arm64, x86_64 or SCMP_ARCH_X86_64")

    @field_validator("min_kernel")
    @classmethod
    def _min_kernel(cls, release: str | None) -> str | None:
        if release is not None and not re.fullmatch(r"\d+(\.\d+){0,2}", release):
            raise ValueError("is not a kernel version: give major.minor such as 4.8")
        return release


def _check_action(action: str) -> str:
    if action == "SCMP_ACT_NOTIFY":
        raise ValueError(
            "needs a seccomp notify listener and cgctl has none: use SCMP_ACT_ERRNO or SCMP_ACT_ALLOW"
        )
    if action not in ACTIONS:
        raise ValueError(f"is not a seccomp action: {_one_of(ACTIONS)}")
    return action


def _check_errno_ret(value: int | None, action: str | None, action_field: str) -> int | None:
    if value is None or action is None:  # without a valid action, its own error comes first
        return value
    top = _WITH_RET.get(action)
    if top is None:
        raise ValueError(f"goes with an {action_field} of SCMP_ACT_ERRNO or SCMP_ACT_TRACE only: remove it")
    if not 0 <= value <= top:
        raise ValueError(f"is out of range: give 0 to {top}")
    return value


class Syscall(_Model):
    """One entry of `syscalls`: these names get this action (when the args match)."""

    names: Annotated[list[StrictStr], BeforeValidator(_none_is_empty)] = []
    name: StrictStr | None = None  # the old single-name form
    action: StrictStr
    errno_ret: StrictInt | None = None
    args: Annotated[list[Arg], BeforeValidator(_none_is_empty)] = []
    comment: StrictStr | None = None
    includes: Condition | None = None
    excludes: Condition | None = None

    @field_validator("action")
    @classmethod
    def _known_action(cls, action: str) -> str:
        return _check_action(action)

    @field_validator("errno_ret")
    @classmethod
    def _errno_ret(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_errno_ret(value, info.data.get("action"), "action")

    @model_validator(mode="after")
    def _whole(self) -> Syscall:
        if self.name is not None:
            if self.names:
                raise ValueError("has both name and names: use names")
            self.names = [self.name]
            self.name = None
        if not self.names:
            raise ValueError("names no system call: give names: [...]")
        return self


class ArchMapEntry(_Model):
    """docker's archMap: on this native architecture, also filter these."""

    architecture: StrictStr
    sub_architectures: Annotated[list[StrictStr], BeforeValidator(_none_is_empty)] = []

    @field_validator("architecture")
    @classmethod
    def _architecture(cls, name: str) -> str:
        if name not in ARCHES:
            raise ValueError(f"is not an architecture: {_one_of(ARCHES)}")
        return name

    @field_validator("sub_architectures")
    @classmethod
    def _sub(cls, names: list[str]) -> list[str]:
        return _all_known(names, ARCHES, "an architecture")


class Profile(_Model):
    """A seccomp profile in the OCI runtime-spec / docker JSON format."""

    default_action: StrictStr
    default_errno_ret: StrictInt | None = None
    architectures: Annotated[list[StrictStr], BeforeValidator(_none_is_empty)] = []
    arch_map: Annotated[list[ArchMapEntry], BeforeValidator(_none_is_empty)] = []
    flags: Annotated[list[StrictStr], BeforeValidator(_none_is_empty)] = []
    listener_path: StrictStr | None = None
    listener_metadata: StrictStr | None = None
    syscalls: Annotated[list[Syscall], BeforeValidator(_none_is_empty)] = []

    _source: str = PrivateAttr(default="<profile>")
    _file: str = PrivateAttr(default="<profile>")

    @field_validator("default_action")
    @classmethod
    def _known_default_action(cls, action: str) -> str:
        return _check_action(action)

    @field_validator("default_errno_ret")
    @classmethod
    def _default_errno_ret(cls, value: int | None, info: ValidationInfo) -> int | None:
        return _check_errno_ret(value, info.data.get("default_action"), "defaultAction")

    @field_validator("architectures")
    @classmethod
    def _architectures(cls, names: list[str]) -> list[str]:
        return _all_known(names, ARCHES, "an architecture")

    @field_validator("flags")
    @classmethod
    def _flags(cls, flags: list[str]) -> list[str]:
        return _all_known(flags, FLAGS, "a seccomp flag")

    @field_validator("listener_path", "listener_metadata")
    @classmethod
    def _no_listener(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("names a seccomp notify listener and cgctl has none: remove it")
        return value

    @model_validator(mode="after")
    def _whole(self) -> Profile:
        if self.architectures and self.arch_map:
            raise ValueError("has both architectures and archMap: use one of them")
        return self

    @property
    def source(self) -> str:
        """What the spec named: "default" or the profile's path."""
        return self._source


@dataclass(frozen=True)
class Filter:
    """A compiled filter: the sock_filter array for seccomp(2) and its SECCOMP_FILTER_FLAG_* flags."""

    program: bytes
    flags: int


# libseccomp through ctypes


class _Version(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint), ("minor", ctypes.c_uint), ("micro", ctypes.c_uint)]


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@functools.cache
def _library() -> ctypes.CDLL | None:
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
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.restype = ctypes.c_int
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def version() -> str | None:
    """libseccomp's version ("2.5.4"), or None if this host has no libseccomp."""
    lib = _library()
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
    lib = _library()
    if lib is not None and lib.seccomp_api_get() < 1:
        return f"libseccomp {found} finds no usable seccomp filter support in this kernel"
    return None


def _need_library(profile_file: str, source: str) -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise SpecError(
            FIELD,
            source,
            f"{profile_file}: libseccomp ({LIBRARY}) cannot be loaded on this host: install libseccomp2, "
            "or run with --seccomp unconfined",
        )
    return lib


# Loading


def _json_path(loc: Iterable[str | int]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(the top level)"


def _shown(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _error_reason(profile_file: str, error: dict[str, Any]) -> str:
    loc = list(error["loc"])
    kind = error["type"]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{profile_file}: {_json_path(loc)} = {_shown(error['input'])}: should be a JSON object"
    if kind == "missing":
        return f"{profile_file}: {_json_path(loc)} is missing: it is required"
    if kind == "extra_forbidden":
        return (
            f"{profile_file}: {_json_path(loc)} = {_shown(error['input'])}: is not a field of the "
            "OCI/docker seccomp profile format: check its spelling, or remove it"
        )
    if kind == "value_error":
        message = str(error["ctx"]["error"])
        # Our list validators name the item themselves: "[3] "x" is not ...".
        item = re.match(r"^\[(\d+)\] (.*?) (is not .*)$", message)
        if item:
            loc.append(int(item.group(1)))
            return f"{profile_file}: {_json_path(loc)} = {item.group(2)}: {item.group(3)}"
        if isinstance(error["input"], dict):  # a whole-entry check
            return f"{profile_file}: {_json_path(loc)} {message}"
        return f"{profile_file}: {_json_path(loc)} = {_shown(error['input'])}: {message}"
    return f"{profile_file}: {_json_path(loc)} = {_shown(error['input'])}: {error['msg'].lower()}"


def _default_file() -> Path:
    return Path(__file__).with_name(DEFAULT_PROFILE)


def load_profile(source: str) -> Profile:
    """The profile `source` names ("default": cgctl's own; else an absolute path), checked in full: every
    action, comparison, architecture, capability, flag and system call name, so compile cannot meet a
    typo. Raises SpecError naming the file, the field, the value and the fix."""
    if source == UNCONFINED:
        raise SpecError(FIELD, source, "unconfined means no seccomp filter: there is no profile to load")
    if source == DEFAULT:
        path = _default_file()
    elif source.startswith("/"):
        path = Path(source)
    else:
        raise SpecError(FIELD, source, "give default, unconfined, or an absolute path to a JSON profile")
    profile_file = str(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else f"not UTF-8 text ({error.reason})"
        raise SpecError(
            FIELD, source, f"{profile_file}: cannot read the profile: {reason}: give a readable JSON file"
        ) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise SpecError(
            FIELD,
            source,
            f"{profile_file}: not valid JSON at line {error.lineno} column {error.colno}: {error.msg}: "
            "fix the syntax there",
        ) from None
    try:
        profile = Profile.model_validate(data)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        raise SpecError(FIELD, source, _error_reason(profile_file, dict(first))) from None
    profile._source, profile._file = source, profile_file
    _check_names(profile)
    return profile


def _check_names(profile: Profile) -> None:
    """Every system call and architecture name must be known to this host's libseccomp."""
    lib = _need_library(profile._file, profile._source)
    for arch_field, names in _arch_fields(profile):
        for index, name in enumerate(names):
            if lib.seccomp_arch_resolve_name(ARCHES[name].encode()) == 0:
                raise SpecError(
                    FIELD,
                    profile._source,
                    f"{profile._file}: {arch_field}[{index}] = {_shown(name)}: libseccomp {version()} on "
                    "this host does not know this architecture: remove it, or update libseccomp",
                )
    for position, entry in enumerate(profile.syscalls):
        for index, name in enumerate(entry.names):
            if lib.seccomp_syscall_resolve_name(name.encode()) == _NR_SCMP_ERROR:
                raise SpecError(
                    FIELD,
                    profile._source,
                    f"{profile._file}: syscalls[{position}].names[{index}] = {_shown(name)}: libseccomp "
                    f"{version()} on this host does not know this system call: a typo, or a system call "
                    "newer than this libseccomp: fix the name, or remove it (or update libseccomp)",
                )


def _arch_fields(profile: Profile) -> Iterable[tuple[str, list[str]]]:
    yield "architectures", profile.architectures
    for index, entry in enumerate(profile.arch_map):
        yield f"archMap[{index}].architecture", [entry.architecture]
        yield f"archMap[{index}].subArchitectures", entry.sub_architectures


# Compiling


def _action(name: str, errno_ret: int | None) -> int:
    value = ACTIONS[name]
    if name in _WITH_RET:
        value |= (errno.EPERM if errno_ret is None else errno_ret) & 0xFFFF
    return value


def _action_name(value: int) -> str:
    for name, base in ACTIONS.items():
        if name in _WITH_RET and value & 0xFFFF0000 == base:
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
    names |= {go for go, name in _GOARCH.items() if name in names}
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
    lib = _need_library(where, source)
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
            f"{where}: defaultAction = {_shown(profile.default_action)}: libseccomp {version()} refuses it "
            "(this kernel may lack that action): use SCMP_ACT_ERRNO",
        )
    try:
        _set(lib, ctx, _ATTR_CTL_NNP, 0, where, source)  # cgctl sets no_new_privs itself
        _set(lib, ctx, _ATTR_ACT_BADARCH, _ACT_ERRNO | errno.EPERM, where, source)
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
    path = _default_file() if source == DEFAULT else Path(source)
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
    conditions = (_ArgCmp * len(entry.args))(
        *(_ArgCmp(arg.index, OPS[arg.op], arg.value, arg.value_two) for arg in entry.args)
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
                f"{where}: syscalls[{position}].names[{index}] = {_shown(name)}: libseccomp {version()} "
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
