"""Seccomp profiles: the OCI runtime-spec / docker JSON format, read and checked in full.

Profiles use the format of the OCI runtime spec's linux.seccomp with docker's additions (archMap,
names, comment, includes/excludes with caps, arches and minKernel), so docker's and podman's
profiles load as they are. Every mistake is a SpecError naming the file, the field, the value and
the fix, raised before anything exists; system call and architecture names are checked against
this host's libseccomp, so compiling (seccomp.py) cannot meet a typo.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Collection, Iterable
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

from cgctl.sandbox.libseccomp import LIBRARY, NR_SCMP_ERROR, library, version
from cgctl.spec import CAPABILITIES, SpecError

DEFAULT = "default"
UNCONFINED = "unconfined"
FIELD = ("security", "seccomp")
DEFAULT_PROFILE = "seccomp-default.json"

# OCI action names to libseccomp's values (seccomp.h); ERRNO and TRACE carry errnoRet in the low 16 bits.
ACT_ERRNO = 0x00050000
ACT_TRACE = 0x7FF00000
ACTIONS = {
    "SCMP_ACT_KILL": 0x00000000,  # the thread, as runc and libseccomp mean it
    "SCMP_ACT_KILL_THREAD": 0x00000000,
    "SCMP_ACT_KILL_PROCESS": 0x80000000,
    "SCMP_ACT_TRAP": 0x00030000,
    "SCMP_ACT_ERRNO": ACT_ERRNO,
    "SCMP_ACT_TRACE": ACT_TRACE,
    "SCMP_ACT_ALLOW": 0x7FFF0000,
    "SCMP_ACT_LOG": 0x7FFC0000,
}
WITH_RET = {"SCMP_ACT_ERRNO": 4095, "SCMP_ACT_TRACE": 0xFFFF}  # highest errnoRet: MAX_ERRNO, 16 bits
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
GOARCH = {
    "386": "x86",
    "amd64": "x86_64",
    "arm64": "aarch64",
    "mipsle": "mipsel",
    "mips64le": "mipsel64",
    "mips64p32": "mips64n32",
    "mips64p32le": "mipsel64n32",
}
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 1,
    "SECCOMP_FILTER_FLAG_LOG": 2,
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 4,
}
MAX_ARG_INDEX = 5  # system calls have six arguments


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
    return GOARCH.get(name)


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
    top = WITH_RET.get(action)
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


def need_library(profile_file: str, source: str) -> ctypes.CDLL:
    lib = library()
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


def shown(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _error_reason(profile_file: str, error: dict[str, Any]) -> str:
    loc = list(error["loc"])
    kind = error["type"]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{profile_file}: {_json_path(loc)} = {shown(error['input'])}: should be a JSON object"
    if kind == "missing":
        return f"{profile_file}: {_json_path(loc)} is missing: it is required"
    if kind == "extra_forbidden":
        return (
            f"{profile_file}: {_json_path(loc)} = {shown(error['input'])}: is not a field of the "
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
        return f"{profile_file}: {_json_path(loc)} = {shown(error['input'])}: {message}"
    return f"{profile_file}: {_json_path(loc)} = {shown(error['input'])}: {error['msg'].lower()}"


def default_file() -> Path:
    return Path(__file__).with_name(DEFAULT_PROFILE)


def load_profile(source: str) -> Profile:
    """The profile `source` names ("default": cgctl's own; else an absolute path), checked in full: every
    action, comparison, architecture, capability, flag and system call name, so compile cannot meet a
    typo. Raises SpecError naming the file, the field, the value and the fix."""
    if source == UNCONFINED:
        raise SpecError(FIELD, source, "unconfined means no seccomp filter: there is no profile to load")
    if source == DEFAULT:
        path = default_file()
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
    lib = need_library(profile._file, profile._source)
    for arch_field, names in _arch_fields(profile):
        for index, name in enumerate(names):
            if lib.seccomp_arch_resolve_name(ARCHES[name].encode()) == 0:
                raise SpecError(
                    FIELD,
                    profile._source,
                    f"{profile._file}: {arch_field}[{index}] = {shown(name)}: libseccomp {version()} on "
                    "this host does not know this architecture: remove it, or update libseccomp",
                )
    for position, entry in enumerate(profile.syscalls):
        for index, name in enumerate(entry.names):
            if lib.seccomp_syscall_resolve_name(name.encode()) == NR_SCMP_ERROR:
                raise SpecError(
                    FIELD,
                    profile._source,
                    f"{profile._file}: syscalls[{position}].names[{index}] = {shown(name)}: libseccomp "
                    f"{version()} on this host does not know this system call: a typo, or a system call "
                    "newer than this libseccomp: fix the name, or remove it (or update libseccomp)",
                )


def _arch_fields(profile: Profile) -> Iterable[tuple[str, list[str]]]:
    yield "architectures", profile.architectures
    for index, entry in enumerate(profile.arch_map):
        yield f"archMap[{index}].architecture", [entry.architecture]
        yield f"archMap[{index}].subArchitectures", entry.sub_architectures
