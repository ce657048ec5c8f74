"""cgctl's default seccomp filter on a real kernel, as root with docker's default capability set.

Every probe runs in a forked child with no_new_privs, once under the filter and once without it: the
call must fail with EPERM under the filter and not without it, so the refusal is the filter's and not
a missing privilege. Arguments are chosen so that every call fails harmlessly even when let through
(bad flags, a missing path, fd -1), except unshare and clone, which only affect the child itself.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import subprocess
import sys
from collections.abc import Callable

import pytest

from cgctl.sandbox import seccomp
from cgctl.spec import DEFAULT_CAPABILITIES
from tests.unit.test_seccomp import in_child

PR_SET_NO_NEW_PRIVS = 38
CLONE_NEWUSER = 0x10000000
SIGCHLD = 17
X32_SYSCALL_BIT = 0x40000000
READ_IMPLIES_EXEC = 0x0400000
ADDR_NO_RANDOMIZE = 0x0040000
# x86_64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl): the VM is x86_64.
NR = {
    "getpid": 39,
    "clone": 56,
    "personality": 135,
    "acct": 163,
    "mount": 165,
    "swapon": 167,
    "reboot": 169,
    "iopl": 172,
    "init_module": 175,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "open_by_handle_at": 304,
    "setns": 308,
    "finit_module": 313,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "clone3": 435,
}
# mov eax, 20 (i386 getpid); int 0x80; ret: an i386 system call from this 64-bit process.
I386_GETPID = bytes.fromhex("b814000000cd80c3")

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


@pytest.fixture(scope="module", autouse=True)
def x86_64() -> None:
    if platform.machine() != "x86_64":
        pytest.fail(f"these probes use x86_64 system call numbers; this machine is {platform.machine()}")


@pytest.fixture(scope="module")
def default_filter() -> seccomp.Filter:
    return seccomp.compile(seccomp.load_profile(seccomp.DEFAULT), DEFAULT_CAPABILITIES)


def raw(name: str, *args: int | bytes | None) -> int:
    """0 (or the call's result) if it succeeds, else -errno."""
    ctypes.set_errno(0)
    result = libc.syscall(
        ctypes.c_long(NR[name]), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args)
    )
    return -ctypes.get_errno() if result == -1 else int(result)


def clone_newuser() -> int:
    """clone(CLONE_NEWUSER | SIGCHLD) as a raw call: a new child returns to here with 0 and leaves."""
    result = raw("clone", CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
    if result == 0:
        os._exit(0)
    if result > 0:
        os.waitpid(result, 0)
        return 0
    return result


# Each probe: its result, -errno on failure. Arguments fail harmlessly if the call is let through.
PROBES: dict[str, Callable[[], int]] = {
    "init_module": lambda: raw("init_module", None, 0, b""),
    "finit_module": lambda: raw("finit_module", -1, b"", 0),
    "kexec_load": lambda: raw("kexec_load", 0, 0, None, 0xFFFFFFFF),
    "reboot": lambda: raw("reboot", 0, 0, 0, None),
    "bpf": lambda: raw("bpf", 0xFFFF, None, 0),
    "perf_event_open": lambda: raw("perf_event_open", None, 0, -1, -1, 0),
    "keyctl": lambda: raw("keyctl", 0xFFFF, 0, 0, 0, 0),
    "add_key": lambda: raw("add_key", None, None, None, 0, 0),
    "userfaultfd": lambda: raw("userfaultfd", 0xFFFFFFFF),
    "unshare(CLONE_NEWUSER)": lambda: raw("unshare", CLONE_NEWUSER),
    "setns": lambda: raw("setns", -1, 0),
    "mount": lambda: raw("mount", b"none", b"/nonexistent-cgctl-test", b"tmpfs", 0, None),
    "swapon": lambda: raw("swapon", None, 0),
    "clock_settime": lambda: raw("clock_settime", 0, None),
    "acct": lambda: raw("acct", b"/nonexistent-cgctl-test"),
    "iopl": lambda: raw("iopl", 4),
    "open_by_handle_at": lambda: raw("open_by_handle_at", -1, None, 0),
    "io_uring_setup": lambda: raw("io_uring_setup", 0, None),
    "clone(CLONE_NEWUSER)": clone_newuser,
}


@pytest.mark.parametrize("name", PROBES)
def test_privileged_call_refused(default_filter: seccomp.Filter, name: str) -> None:
    """Each in a child of its own: after unshare(CLONE_NEWUSER) a process holds no capability outside."""
    assert os.geteuid() == 0
    unfiltered = in_child(None, PROBES[name])
    assert unfiltered != -errno.EPERM, "as root without the filter it must not fail with EPERM"
    assert in_child(default_filter, PROBES[name]) == -errno.EPERM


def test_clone3_answers_enosys(default_filter: seccomp.Filter) -> None:
    def probe() -> int:
        return raw("clone3", None, 0)

    assert in_child(None, probe) == -errno.EINVAL
    assert in_child(default_filter, probe) == -errno.ENOSYS


def test_x32_system_call_refused(default_filter: seccomp.Filter) -> None:
    def probe() -> int:
        ctypes.set_errno(0)
        result = libc.syscall(ctypes.c_long(NR["getpid"] | X32_SYSCALL_BIT))
        return -ctypes.get_errno() if result == -1 else int(result)

    assert in_child(None, probe) == -errno.ENOSYS  # Debian builds x32 in but leaves it off
    assert in_child(default_filter, probe) == -errno.EPERM


def test_i386_system_call_refused(default_filter: seccomp.Filter) -> None:
    def probe() -> list[int]:
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(I386_GETPID)
        address = ctypes.addressof(ctypes.c_char.from_buffer(page))
        getpid_i386 = ctypes.CFUNCTYPE(ctypes.c_int)(address)
        return [getpid_i386(), os.getpid()]

    result, pid = in_child(None, probe)
    assert result == pid
    result, pid = in_child(default_filter, probe)
    assert result == -errno.EPERM


def test_personality(default_filter: seccomp.Filter) -> None:
    def probe() -> dict[str, int]:
        return {
            "query": raw("personality", 0xFFFFFFFF),
            "READ_IMPLIES_EXEC": raw("personality", READ_IMPLIES_EXEC),
            "ADDR_NO_RANDOMIZE": raw("personality", ADDR_NO_RANDOMIZE),
        }

    unfiltered = in_child(None, probe)
    assert all(result >= 0 for result in unfiltered.values()), unfiltered
    filtered = in_child(default_filter, probe)
    assert filtered["query"] >= 0
    assert filtered["READ_IMPLIES_EXEC"] == -errno.EPERM
    assert filtered["ADDR_NO_RANDOMIZE"] == -errno.EPERM


ORDINARY_WORK = r"""
import os, socket, subprocess, threading
pid = os.fork()
if pid == 0:
    os._exit(3)
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 3
listing = subprocess.run(["/bin/sh", "-c", "ls / | wc -l"], capture_output=True, text=True, check=True)
entries = int(listing.stdout)
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.create_connection(server.getsockname(), timeout=10)
connection, _ = server.accept()
client.sendall(b"ping")
assert connection.recv(4) == b"ping"
squares = []
threads = [threading.Thread(target=lambda i=i: squares.append(i * i)) for i in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print("ok", entries, sorted(squares))
"""


def exec_under(filter_: seccomp.Filter, argv: list[str]) -> subprocess.CompletedProcess[str]:
    """argv exec'd by a child under no_new_privs and the filter, installed just before exec as cgctl does."""

    def enter() -> None:
        if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        seccomp.install(filter_)

    return subprocess.run(argv, preexec_fn=enter, capture_output=True, text=True, timeout=300)


def test_ordinary_work_keeps_working(default_filter: seccomp.Filter) -> None:
    done = exec_under(default_filter, [sys.executable, "-c", ORDINARY_WORK])
    assert done.returncode == 0, done.stderr
    word, entries, *_ = done.stdout.split(maxsplit=2)
    assert word == "ok" and int(entries) == len(
        [name for name in os.listdir("/") if not name.startswith(".")]
    )
    assert done.stdout.strip().endswith("[0, 1, 4, 9]")
