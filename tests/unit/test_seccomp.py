"""The seccomp profile loader and compiler, against this host's real libseccomp.

Filters are installed only in forked children (seccomp is per process: the test process stays
unfiltered), which then call the system calls under test and report their errno through a pipe.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import pytest

from cgctl.sandbox import libseccomp, seccomp
from cgctl.spec import CAPABILITIES, DEFAULT_CAPABILITIES, SpecError

PR_SET_NO_NEW_PRIVS = 38
SYS_CLONE3 = 435  # the same on every architecture (asm-generic numbering since 5.3)
GOARCH = {"x86_64": "amd64", "aarch64": "arm64"}

libc = ctypes.CDLL(None, use_errno=True)


def in_child(filter_: seccomp.Filter | None, probe: Callable[[], Any]) -> Any:
    """probe()'s result, computed in a forked child under no_new_privs and `filter_`."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 0
        try:
            os.close(read_end)
            if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
            if filter_ is not None:
                seccomp.install(filter_)
            answer = {"result": probe()}
        except BaseException as error:
            answer = {"error": f"{type(error).__name__}: {error}"}
            status = 1
        try:
            os.write(write_end, json.dumps(answer).encode())
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert data, f"the child wrote nothing (wait status {status:#x})"
    answer = json.loads(data)
    assert "error" not in answer, answer["error"]
    return answer["result"]


def errno_of(call: Callable[[], object]) -> int:
    """0 if call() succeeds, else its errno."""
    try:
        call()
    except OSError as error:
        return error.errno or -1
    return 0


def libc_errno(result: int) -> int:
    return ctypes.get_errno() if result == -1 else 0


def mount_probe() -> int:
    """mount onto a missing directory: ENOENT if the filter lets it through (the path is looked up before
    any capability check), EPERM if the filter refuses it."""
    return libc_errno(libc.mount(b"none", b"/nonexistent-cgctl-test", b"tmpfs", ctypes.c_ulong(0), None))


def clone3_probe() -> int:
    """clone3 with no arguments: EINVAL from the kernel, ENOSYS from the filter."""
    return libc_errno(libc.syscall(ctypes.c_long(SYS_CLONE3), None, ctypes.c_size_t(0)))


def write_profile(tmp_path: Path, profile: dict[str, Any], name: str = "profile.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(profile, indent=2))
    return str(path)


def compiled(tmp_path: Path, profile: dict[str, Any], caps: Collection[str] = ()) -> seccomp.Filter:
    return seccomp.compile(seccomp.load_profile(write_profile(tmp_path, profile)), caps)


def deny(name: str, **entry: Any) -> dict[str, Any]:
    """A profile that allows everything but `name`."""
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": [name], "action": "SCMP_ACT_ERRNO", **entry}],
    }


# The library and the host


def test_version_and_host() -> None:
    found = libseccomp.version()
    assert found is not None
    assert tuple(map(int, found.split("."))) >= (2, 4, 0)
    assert libseccomp.problem() is None


# The default profile


@pytest.mark.parametrize("caps", [DEFAULT_CAPABILITIES, CAPABILITIES, ()], ids=["docker", "all", "none"])
def test_default_profile_compiles(caps: Collection[str]) -> None:
    profile = seccomp.load_profile(seccomp.DEFAULT)
    assert profile.source == "default"
    filter_ = seccomp.compile(profile, caps)
    assert filter_.program and len(filter_.program) % 8 == 0
    assert len(filter_.program) // 8 <= seccomp.BPF_MAXINSNS
    assert filter_.flags == 0


def test_default_profile_shape() -> None:
    """What the default profile promises: native 64-bit arches only, EPERM by default, and the
    dangerous calls never in an ALLOW entry."""
    data = json.loads(Path(seccomp.__file__).with_name("seccomp-default.json").read_text())
    assert data["defaultAction"] == "SCMP_ACT_ERRNO" and data["defaultErrnoRet"] == errno.EPERM
    assert data["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_AARCH64"]
    assert "archMap" not in data
    allowed = {
        name for entry in data["syscalls"] if entry["action"] == "SCMP_ACT_ALLOW" for name in entry["names"]
    }
    never = {
        "keyctl", "add_key", "request_key", "userfaultfd", "io_uring_setup", "io_uring_enter",
        "io_uring_register", "uselib", "ustat", "sysfs", "_sysctl", "nfsservctl", "create_module",
        "get_kernel_syms", "query_module", "vm86", "vm86old",
    }  # fmt: skip
    assert not allowed & never
    assert all(entry.get("comment") for entry in data["syscalls"])
    unconditional = {
        name
        for entry in data["syscalls"]
        if entry["action"] == "SCMP_ACT_ALLOW"
        and not entry.get("includes")
        and not entry.get("excludes")
        and not entry.get("args")
        for name in entry["names"]
    }
    gated = {
        "mount", "unshare", "setns", "bpf", "perf_event_open", "reboot", "init_module", "kexec_load", "clone",
        "clone3", "personality", "open_by_handle_at", "clock_settime", "iopl", "acct", "swapon",
    }  # fmt: skip
    assert not unconditional & gated
    assert {"read", "statx", "openat2", "close_range", "faccessat2", "rseq", "seccomp"} <= unconditional


def test_mount_only_with_cap_sys_admin() -> None:
    profile = seccomp.load_profile(seccomp.DEFAULT)
    assert in_child(seccomp.compile(profile, DEFAULT_CAPABILITIES), mount_probe) == errno.EPERM
    with_admin = seccomp.compile(profile, [*DEFAULT_CAPABILITIES, "CAP_SYS_ADMIN"])
    assert in_child(with_admin, mount_probe) == errno.ENOENT


def test_clone3_enosys_unless_cap_sys_admin() -> None:
    """The excludes.caps entry: ENOSYS (glibc then falls back to clone) without CAP_SYS_ADMIN only."""
    profile = seccomp.load_profile(seccomp.DEFAULT)
    assert in_child(seccomp.compile(profile, DEFAULT_CAPABILITIES), clone3_probe) == errno.ENOSYS
    assert in_child(seccomp.compile(profile, CAPABILITIES), clone3_probe) == errno.EINVAL


def test_ordinary_calls_work_under_the_default_profile() -> None:
    def probe() -> list[int]:
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        _, status = os.waitpid(pid, 0)
        return [os.waitstatus_to_exitcode(status), len(os.listdir("/")), os.getpid(), len(os.uname().sysname)]

    exit_code, entries, pid, _ = in_child(
        seccomp.compile(seccomp.load_profile("default"), DEFAULT_CAPABILITIES), probe
    )
    assert exit_code == 7 and entries > 0 and pid > 0


# Profiles that deny one call


@pytest.mark.parametrize("name", ["uname", "getcwd"])
def test_denying_one_call_denies_exactly_it(tmp_path: Path, name: str) -> None:
    def probe() -> dict[str, int]:
        return {
            "uname": errno_of(os.uname),
            "getcwd": errno_of(os.getcwd),
            "getpid": errno_of(os.getpid),
            "listdir": errno_of(lambda: os.listdir("/")),
        }

    assert in_child(None, probe) == {"uname": 0, "getcwd": 0, "getpid": 0, "listdir": 0}
    result = in_child(compiled(tmp_path, deny(name)), probe)
    assert result == {"uname": 0, "getcwd": 0, "getpid": 0, "listdir": 0} | {name: errno.EPERM}


def test_errno_ret(tmp_path: Path) -> None:
    assert in_child(compiled(tmp_path, deny("uname", errnoRet=errno.ENOSYS)), lambda: errno_of(os.uname)) == (
        errno.ENOSYS
    )


def test_old_single_name_form(tmp_path: Path) -> None:
    profile = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"name": "uname", "action": "SCMP_ACT_ERRNO"}]}
    assert in_child(compiled(tmp_path, profile), lambda: errno_of(os.uname)) == errno.EPERM


def test_args_select(tmp_path: Path) -> None:
    """An ERRNO rule on prctl's first argument: PR_SET_NAME (15) refused, PR_GET_NAME (16) not."""
    profile = deny("prctl", args=[{"index": 0, "value": 15, "op": "SCMP_CMP_EQ"}])
    buffer = ctypes.create_string_buffer(16)

    def probe() -> list[int]:
        return [libc_errno(libc.prctl(16, buffer, 0, 0, 0)), libc_errno(libc.prctl(15, b"x", 0, 0, 0))]

    assert in_child(compiled(tmp_path, profile), probe) == [0, errno.EPERM]


@pytest.mark.parametrize(
    ("condition", "applies"),
    [
        ({"includes": {"caps": ["CAP_SYS_ADMIN"]}}, False),
        ({"includes": {"caps": ["CAP_CHOWN"]}}, True),
        ({"includes": {"caps": ["CAP_CHOWN", "CAP_SYS_ADMIN"]}}, False),
        ({"excludes": {"caps": ["CAP_CHOWN"]}}, False),
        ({"excludes": {"caps": ["CAP_SYS_ADMIN"]}}, True),
        ({"includes": {"minKernel": "3.0"}}, True),
        ({"includes": {"minKernel": "99.0"}}, False),
        ({"excludes": {"minKernel": "3.0"}}, False),
        ({"excludes": {"minKernel": "99.1"}}, True),
        ({"includes": {"arches": ["native"]}}, True),
        ({"includes": {"arches": ["s390x", "SCMP_ARCH_PPC64LE"]}}, False),
        ({"excludes": {"arches": ["native"]}}, False),
        ({"excludes": {"arches": ["s390", "s390x"]}}, True),
    ],
)
def test_includes_and_excludes(tmp_path: Path, condition: dict[str, Any], applies: bool) -> None:
    native = GOARCH.get(platform.machine(), platform.machine())
    condition = json.loads(json.dumps(condition).replace('"native"', json.dumps(native)))
    filter_ = compiled(tmp_path, deny("uname", **condition), caps=["CAP_CHOWN"])
    assert in_child(filter_, lambda: errno_of(os.uname)) == (errno.EPERM if applies else 0)


def test_rule_with_the_default_action_is_skipped(tmp_path: Path) -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": ["uname"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["getcwd"], "action": "SCMP_ACT_ERRNO"},
        ],
    }
    filter_ = compiled(tmp_path, profile)
    assert in_child(filter_, lambda: [errno_of(os.uname), errno_of(os.getcwd)]) == [0, errno.EPERM]


def test_arch_map_and_flags(tmp_path: Path) -> None:
    native = {"x86_64": "SCMP_ARCH_X86_64", "aarch64": "SCMP_ARCH_AARCH64"}[platform.machine()]
    sub = {"x86_64": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"], "aarch64": ["SCMP_ARCH_ARM"]}[platform.machine()]
    profile = deny("uname") | {
        "archMap": [
            {"architecture": native, "subArchitectures": sub},
            {"architecture": "SCMP_ARCH_S390X", "subArchitectures": ["SCMP_ARCH_S390"]},
        ],
        "flags": ["SECCOMP_FILTER_FLAG_TSYNC", "SECCOMP_FILTER_FLAG_SPEC_ALLOW"],
    }
    with_sub = compiled(tmp_path, profile)
    assert with_sub.flags == 1 | 4
    plain = compiled(tmp_path, deny("uname"))
    assert len(with_sub.program) > len(plain.program)  # the sub-architectures are in, s390 is not
    assert in_child(with_sub, lambda: errno_of(os.uname)) == errno.EPERM


# Bad input: every error names the file, the field and the value


BASE: dict[str, Any] = {
    "defaultAction": "SCMP_ACT_ERRNO",
    "syscalls": [
        {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
        {
            "names": ["personality"],
            "action": "SCMP_ACT_ALLOW",
            "args": [{"index": 0, "value": 0, "op": "SCMP_CMP_EQ"}],
        },
    ],
}


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A change to BASE at a dotted path (list indices as numbers)."""

    def change(profile: dict[str, Any]) -> None:
        *parents, last = [int(part) if part.isdigit() else part for part in path.split(".")]
        node: Any = profile
        for part in parents:
            node = node[part]
        node[last] = value

    return change


BAD = [
    ("syscalls.1.action", "SCMP_ACT_FOO", "syscalls[1].action", '"SCMP_ACT_FOO"', "SCMP_ACT_ALLOW"),
    ("syscalls.0.action", "SCMP_ACT_NOTIFY", "syscalls[0].action", '"SCMP_ACT_NOTIFY"', "notify listener"),
    ("defaultAction", "SCMP_ACT_KILLL", "defaultAction", '"SCMP_ACT_KILLL"', "is not a seccomp action"),
    (
        "syscalls.1.args.0.op",
        "SCMP_CMP_FOO",
        "syscalls[1].args[0].op",
        '"SCMP_CMP_FOO"',
        "SCMP_CMP_MASKED_EQ",
    ),
    ("syscalls.1.args.0.index", 6, "syscalls[1].args[0].index", "6", "arguments 0 to 5"),
    ("syscalls.1.args.0.value", -1, "syscalls[1].args[0].value", "-1", "64-bit unsigned"),
    (
        "architectures",
        ["SCMP_ARCH_X86_64", "SCMP_ARCH_VAX"],
        "architectures[1]",
        '"SCMP_ARCH_VAX"',
        "SCMP_ARCH_X86",
    ),
    ("syscalls.0.names", ["read", "frobnicate"], "syscalls[0].names[1]", '"frobnicate"', "does not know"),
    (
        "syscalls.0.includes",
        {"caps": ["CAP_SYS_FOO"]},
        "syscalls[0].includes.caps[0]",
        '"CAP_SYS_FOO"',
        "CAP_SYS_ADMIN",
    ),
    (
        "syscalls.0.excludes",
        {"caps": ["SYS_ADMIN"]},
        "syscalls[0].excludes.caps[0]",
        '"SYS_ADMIN"',
        "CAP_ prefix",
    ),
    ("syscalls.0.includes", {"arches": ["vax"]}, "syscalls[0].includes.arches[0]", '"vax"', "amd64"),
    ("syscalls.0.includes", {"minKernel": "four"}, "syscalls[0].includes.minKernel", '"four"', "4.8"),
    (
        "flags",
        ["SECCOMP_FILTER_FLAG_FOO"],
        "flags[0]",
        '"SECCOMP_FILTER_FLAG_FOO"',
        "SECCOMP_FILTER_FLAG_TSYNC",
    ),
    ("listenerPath", "/run/agent.sock", "listenerPath", '"/run/agent.sock"', "remove it"),
    ("listenerMetadata", "x", "listenerMetadata", '"x"', "remove it"),
    ("syscalls.0.errnoRet", 38, "syscalls[0].errnoRet", "38", "SCMP_ACT_ERRNO"),
    ("defaultErrnoRet", 5000, "defaultErrnoRet", "5000", "0 to 4095"),
    ("syscalls.0.bogus", 1, "syscalls[0].bogus", "1", "not a field"),
    ("syscals", [], "syscals", "[]", "check its spelling"),
    ("syscalls.0.names", [], "syscalls[0]", "", "names no system call"),
    ("syscalls.0.name", "open", "syscalls[0]", "", "both name and names"),
    (
        "archMap",
        [{"architecture": "SCMP_ARCH_X86_64"}],
        "(the top level)",
        "",
        "both architectures and archMap",
    ),
    ("syscalls.1.args.0.index", "0", "syscalls[1].args[0].index", '"0"', "integer"),
]


@pytest.mark.parametrize(
    ("where", "value", "field", "shown", "hint"), BAD, ids=[case[2] + "=" + str(case[1]) for case in BAD]
)
def test_bad_profile(tmp_path: Path, where: str, value: Any, field: str, shown: str, hint: str) -> None:
    profile = json.loads(json.dumps(BASE))
    if field == "(the top level)":
        profile["architectures"] = ["SCMP_ARCH_X86_64"]
    _set(where, value)(profile)
    path = write_profile(tmp_path, profile)
    with pytest.raises(SpecError) as raised:
        seccomp.load_profile(path)
    error = raised.value
    assert error.field == ("security", "seccomp")
    assert error.value == path
    assert path in error.reason and field in error.reason and hint in error.reason
    assert f"{field} = {shown}" in error.reason if shown else True


def test_missing_field(tmp_path: Path) -> None:
    profile = json.loads(json.dumps(BASE))
    del profile["syscalls"][1]["action"]
    path = write_profile(tmp_path, profile)
    with pytest.raises(SpecError, match=r"syscalls\[1\]\.action is missing"):
        seccomp.load_profile(path)


def test_bad_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "defaultAction": "SCMP_ACT_ERRNO",\n  "syscalls": [,]\n}\n')
    with pytest.raises(SpecError) as raised:
        seccomp.load_profile(str(path))
    assert str(path) in raised.value.reason and "line 3 column 16" in raised.value.reason


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_unreadable_file(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "profile.json"
    if kind == "directory":
        path.mkdir()
    elif kind == "not-utf8":
        path.write_bytes(b'{"defaultAction": "\xff"}')
    with pytest.raises(SpecError) as raised:
        seccomp.load_profile(str(path))
    assert str(path) in raised.value.reason and "cannot read" in raised.value.reason


@pytest.mark.parametrize("source", ["relative.json", seccomp.UNCONFINED])
def test_sources_that_are_not_profiles(source: str) -> None:
    with pytest.raises(SpecError):
        seccomp.load_profile(source)


def test_top_level_not_an_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1]")
    with pytest.raises(SpecError, match="should be a JSON object"):
        seccomp.load_profile(str(path))


def test_libseccomp_refusal_names_the_entry(tmp_path: Path) -> None:
    """Two comparisons of the same argument: libseccomp 2.5 refuses the rule (EINVAL)."""
    profile = json.loads(json.dumps(BASE))
    profile["syscalls"][1]["args"].append({"index": 0, "value": 8, "op": "SCMP_CMP_EQ"})
    path = write_profile(tmp_path, profile)
    with pytest.raises(SpecError) as raised:
        seccomp.compile(seccomp.load_profile(path), DEFAULT_CAPABILITIES)
    assert path in raised.value.reason
    assert 'syscalls[1].names[0] = "personality"' in raised.value.reason
    assert "same argument" in raised.value.reason


def test_conflicting_entries_are_refused(tmp_path: Path) -> None:
    """libseccomp would silently keep one of two rules with different actions; cgctl says so instead."""
    profile = json.loads(json.dumps(BASE))
    profile["syscalls"].append({"names": ["write"], "action": "SCMP_ACT_KILL_PROCESS"})
    path = write_profile(tmp_path, profile)
    with pytest.raises(SpecError, match=r"syscalls\[0\] and syscalls\[2\] both apply to 'write'"):
        seccomp.compile(seccomp.load_profile(path), DEFAULT_CAPABILITIES)
    # Made exclusive by a capability, they are fine.
    profile["syscalls"][2]["excludes"] = {"caps": ["CAP_CHOWN"]}
    profile["syscalls"][0]["includes"] = {"caps": ["CAP_CHOWN"]}
    seccomp.compile(seccomp.load_profile(write_profile(tmp_path, profile)), DEFAULT_CAPABILITIES)


# install


def test_install_refusal_is_an_oserror_naming_the_call() -> None:
    filter_ = seccomp.compile(seccomp.load_profile(seccomp.DEFAULT), DEFAULT_CAPABILITIES)
    bad = seccomp.Filter(program=filter_.program, flags=1 << 30)

    def probe() -> list[Any]:
        try:
            seccomp.install(bad)
        except OSError as error:
            return [error.errno, str(error)]
        return [0, ""]

    code, message = in_child(None, probe)
    assert code == errno.EINVAL and "seccomp(SECCOMP_SET_MODE_FILTER" in message


def test_install_refuses_a_non_program() -> None:
    with pytest.raises(ValueError, match="not a BPF program"):
        seccomp.install(seccomp.Filter(program=b"\0" * 5, flags=0))
