"""Start a workload in new namespaces and its cgroup, with no window where it runs unlimited.

The dance, the same for root and rootless:

    supervisor ──fork──> setup child: [user ns] unshare(mnt uts ipc net pid), hostname, lo up
                              └──fork──> workload init (pid 1): joins the cgroup, [its root],
                                         cgroup ns, /proc /sys /sys/fs/cgroup, kernel paths
                                         masked, setsid, the sandbox (capabilities, user,
                                         no_new_privs, seccomp), exec
    the setup child reports the init's pid and exits; the init is reparented
    to the supervisor, which is a child subreaper for that moment.

Only the workload's own processes are ever in its cgroup (the setup child is
not, so it does not count against pids.max), and the workload joins it
before exec, after every limit was written. Both children die with the
supervisor (PR_SET_PDEATHSIG, armed once the init has been reparented and
checked against a pipe the supervisor holds open). Errors in the children,
exec's included, come back over a CLOEXEC pipe as JSON, so a missing command
is a clean 127, never a half-started workload.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NoReturn

from cgctl import ns, sandbox
from cgctl.ns import libc, rootfs, user
from cgctl.sandbox import paths

# Serialises the moment the supervisor is a child subreaper, for callers that run workloads from threads.
_SUBREAPER_LOCK = threading.Lock()


class SpawnError(Exception):
    """The workload could not start; exit_code as docker's: 125 setup, 126 not executable, 127 not found."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Launch:
    """Everything the children need, decided before the first fork."""

    argv: list[str]
    env: dict[str, str]
    workdir: str | None
    cgroup_procs: str  # the workload cgroup's cgroup.procs
    namespaces: ns.Context
    user_namespace: bool
    init: bool  # a reaper as pid 1 that forwards signals to the command
    sandbox: sandbox.Plan
    root: rootfs.Plan | None = None  # a root of its own (overlay layers), else the host's
    user: str | None = None  # USER[:GROUP] to become just before exec
    stdio: tuple[int, int, int] | None = None  # the caller's fds to become the workload's 0, 1, 2


def start(launch: Launch) -> tuple[int, int]:
    """Start the workload; return (its pid, the fd to close once it has been waited for)."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    supervisor = os.getpid()
    with _subreaper():
        setup = os.fork()
        if setup == 0:
            os.close(report_r)
            os.close(alive_w)  # or the init would never see the supervisor's end of it close
            _setup_child(launch, supervisor, report_w, alive_r)
        os.close(report_w)
        os.close(alive_r)
        _, setup_status = os.waitpid(setup, 0)
    with os.fdopen(report_r, "rb") as reports:
        first = _message(reports)
        if "pid" not in first:
            os.close(alive_w)
            if not first:
                raise SpawnError(
                    f"the setup process died ({_describe(setup_status)}) before starting the workload", 125
                )
            raise _error(first, launch)
        pid = int(first["pid"])
        os.write(alive_w, b"go")
        second = _message(reports)  # EOF (exec succeeded) or the reason it did not
    if second:
        os.waitpid(pid, 0)
        os.close(alive_w)
        raise _error(second, launch)
    return pid, alive_w


@contextlib.contextmanager
def _subreaper() -> Iterator[None]:
    """Be a child subreaper while the setup child exits, so its child (the workload) becomes ours."""
    with _SUBREAPER_LOCK:
        was = libc.get_child_subreaper()
        libc.prctl(libc.PR_SET_CHILD_SUBREAPER, 1)
        try:
            yield
        finally:
            libc.prctl(libc.PR_SET_CHILD_SUBREAPER, int(was))


def _message(reports: BinaryIO) -> dict[str, Any]:
    """The next report from the children, or {} once they have all closed the pipe (exec succeeded)."""
    line = reports.readline()
    return json.loads(line) if line else {}


def _error(message: dict[str, Any], launch: Launch) -> SpawnError:
    code = int(message.get("errno", 0))
    if message.get("stage") == "exec":
        if code == errno.ENOENT:
            return SpawnError(f"{launch.argv[0]}: command not found", 127)
        return SpawnError(f"{launch.argv[0]}: cannot execute: {os.strerror(code)}", 126)
    return SpawnError(
        f"setting up the workload failed while {message.get('stage')}: {message.get('error')}", 125
    )


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _report(fd: int, **message: object) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def _die_with(parent: int) -> None:
    libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


def _setup_child(launch: Launch, supervisor: int, report_w: int, alive_r: int) -> NoReturn:
    stage = "starting"
    try:
        for sig in range(1, signal.NSIG):  # the supervisor's Python handlers must not run here
            with contextlib.suppress(OSError, ValueError):
                signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the supervisor blocks some while it starts us
        _die_with(supervisor)
        if launch.user_namespace:
            stage = "creating the user namespace"
            user.enter(os.geteuid(), os.getegid())
        stage = "creating namespaces"
        libc.unshare(ns.unshare_flags(launch.namespaces))
        ns.child_steps(launch.namespaces)
        stage = "forking the workload"
        pid = os.fork()
        if pid == 0:
            _workload_init(launch, report_w, alive_r)
        _report(report_w, pid=pid)
        os._exit(0)
    except BaseException as error:  # every failure must reach the supervisor
        _report(report_w, stage=stage, error=str(error), errno=getattr(error, "errno", None) or 0)
        os._exit(125)


def _workload_init(launch: Launch, report_w: int, alive_r: int) -> NoReturn:
    stage = "waiting for the supervisor"
    try:
        if os.read(alive_r, 2) != b"go":
            os._exit(1)
        libc.prctl(libc.PR_SET_PDEATHSIG, signal.SIGKILL)  # now relative to the supervisor
        if select.select([alive_r], [], [], 0)[0]:  # readable = EOF: the supervisor already died
            os._exit(1)
        if launch.stdio:
            for target, source in enumerate(launch.stdio):
                os.dup2(source, target)
        stage = "joining the cgroup"
        with open(launch.cgroup_procs, "w") as procs:
            procs.write("0")
        if launch.root:
            stage = "building the root filesystem"
            rootfs.enter(launch.root)
        stage = "setting up namespaces"
        ns.init_steps(launch.namespaces)
        if launch.sandbox.restrict_paths:
            stage = "masking kernel paths"
            paths.restrict()
        os.setsid()
        if launch.workdir:
            stage = f"changing to the working directory {launch.workdir}"
            os.chdir(launch.workdir)
        identity = None
        if launch.user:
            stage = f"looking up the user {launch.user}"
            identity = _identity(launch.user)
        _close_inherited_fds(keep={report_w, alive_r})
        stage = "entering the sandbox" + (f" as the user {launch.user}" if launch.user else "")
        sandbox.enter(launch.sandbox, identity)
        if launch.init:
            _reaper(launch, report_w)
        _exec(launch, report_w)
    except BaseException as error:  # every failure must reach the supervisor
        _report(report_w, stage=stage, error=str(error), errno=getattr(error, "errno", None) or 0)
        os._exit(125)


def _identity(user: str) -> tuple[int, int]:
    """The (uid, gid) of USER[:GROUP] (names from the root's /etc/passwd and /etc/group, or numbers; with
    no GROUP, the user's own group, or 0 for an id /etc/passwd does not know, as docker does)."""
    name, _, group = user.partition(":")
    passwd = _entries("/etc/passwd")
    entry = next((e for e in passwd if name in (e[0], e[2])), None)
    if entry is None and not name.isdigit():
        raise OSError(errno.ENOENT, f"no user {name!r} in the root's /etc/passwd")
    uid = int(entry[2]) if entry else int(name)
    gid = int(entry[3]) if entry else 0
    if group:
        found = next((e for e in _entries("/etc/group") if group in (e[0], e[2])), None)
        if found is None and not group.isdigit():
            raise OSError(errno.ENOENT, f"no group {group!r} in the root's /etc/group")
        gid = int(found[2]) if found else int(group)
    return uid, gid


def _entries(path: str) -> list[list[str]]:
    """The colon-separated entries of /etc/passwd or /etc/group (none if the file is missing)."""
    try:
        with open(path) as file:
            return [line.split(":") for line in file.read().splitlines() if line.count(":") >= 3]
    except FileNotFoundError:
        return []


def _close_inherited_fds(keep: set[int]) -> None:
    """Nothing but stdio reaches the workload (leaked fds would pin files and defeat CRIU)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _exec(launch: Launch, report_w: int) -> NoReturn:
    try:
        os.execvpe(launch.argv[0], launch.argv, launch.env)
    except OSError as error:
        _report(report_w, stage="exec", error=error.strerror, errno=error.errno)
        os._exit(127 if error.errno == errno.ENOENT else 126)


def _reaper(launch: Launch, report_w: int) -> NoReturn:
    """--init: pid 1 forks the command, forwards every signal to it, reaps orphans, exits as it does."""
    command = os.fork()
    if command == 0:
        _exec(launch, report_w)
    os.close(report_w)
    for sig in set(range(1, signal.NSIG)) - {signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP}:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, lambda received, _frame: os.kill(command, received))
    while True:
        pid, status = os.wait()
        if pid == command:
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
