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
import resource
import select
import shutil
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, NamedTuple, NoReturn

from cgctl import ns, sandbox, syscalls
from cgctl.ns import console, rootfs, user
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
    terminal: tuple[int, int] | None = (
        None  # a pty of its own, at (rows, columns): its stdio, and master ours
    )
    # An OCI container's exec FIFO: the init gets everything ready, reports {"held": true} and waits
    # for the caller's "ok" (its state is written), then for a byte on the FIFO (`start`) before exec.
    # It does not die with the caller, which exits once the container is created.
    hold: str | None = None
    start_hooks: tuple[Any, ...] = ()  # with hold: OCI startContainer hooks (runtime.hooks), run before exec
    rlimits: tuple[tuple[int, int, int], ...] = ()  # (resource, soft, hard) to set before exec
    groups: tuple[int, ...] = ()  # supplementary groups
    umask: int | None = None
    oom_score_adj: int | None = None
    sysctl: tuple[tuple[str, str], ...] = ()  # (key, value) written under /proc/sys, in its namespaces
    personality: int | None = None  # personality(2)'s domain
    id_maps: tuple[str, str] | None = None  # (uid_map, gid_map) the supervisor writes for the setup child


class Started(NamedTuple):
    pid: int
    alive_fd: int | None  # to close once the workload has been waited for (its children then die)
    master: int | None = None  # the master of the workload's terminal, with Launch.terminal


def start(launch: Launch, adopt: bool = True, before_go: Callable[[int], None] | None = None) -> Started:
    """Start the workload; with launch.terminal, its pty is allocated inside (ns/console.py). With
    adopt, the workload becomes our child; else (an OCI container's create) it goes to our nearest
    subreaper (the caller's shim or conmon), as runc's does. before_go(pid) runs once the namespaces
    exist, before the workload joins its cgroup (an OCI container's createRuntime hooks); if it
    raises, the workload ends there."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
    ours, theirs = console.channel() if launch.terminal else (None, None)
    supervisor = os.getpid()
    unshared_r, unshared_w = os.pipe2(os.O_CLOEXEC) if launch.id_maps else (-1, -1)
    mapped_r, mapped_w = os.pipe2(os.O_CLOEXEC) if launch.id_maps else (-1, -1)
    with subreaper() if adopt else contextlib.nullcontext():
        setup = os.fork()
        if setup == 0:
            os.close(report_r)
            os.close(alive_w)  # or the init would never see the supervisor's end of it close
            if ours is not None:
                ours.close()
            if launch.id_maps:
                os.close(unshared_r)
                os.close(mapped_w)
            mapping = (unshared_w, mapped_r) if launch.id_maps else None
            _setup_child(launch, supervisor, report_w, alive_r, theirs.fileno() if theirs else None, mapping)
        os.close(report_w)
        os.close(alive_r)
        if theirs is not None:
            theirs.close()
        refused = None
        if launch.id_maps:
            os.close(unshared_w)
            os.close(mapped_r)
            refused = _write_id_maps(setup, launch.id_maps, unshared_r, mapped_w)
        _, setup_status = os.waitpid(setup, 0)
    if refused:
        os.close(report_r)
        os.close(alive_w)
        raise SpawnError(refused, 125)
    why = f"the setup process died ({describe(setup_status)}) before starting the workload"
    try:
        pid, master = reported_start(report_r, ours, launch.argv[0], why, alive_w, before_go)
    finally:
        if ours is not None:
            ours.close()
    return Started(pid, alive_w, master)


def _write_id_maps(setup: int, maps: tuple[str, str], unshared_r: int, mapped_w: int) -> str | None:
    """Write the setup child's uid_map and gid_map once it has unshared its user namespace (the kernel
    lets only a process outside write a map of more than its own id); the reason if that failed."""
    try:
        if os.read(unshared_r, 1) != b"u":
            return None  # it failed before: its report says why
        for kind, text in zip(("uid_map", "gid_map"), maps, strict=True):
            try:
                with open(f"/proc/{setup}/{kind}", "w") as file:
                    file.write(text)
            except OSError as error:
                return (
                    f"writing the user namespace's {kind} ({text.strip()!r}) failed: {error.strerror}; "
                    "the host ids must exist and be the caller's to give (run as root)"
                )
        os.write(mapped_w, b"m")
        return None
    finally:
        os.close(unshared_r)
        os.close(mapped_w)


def reported_start(
    report_r: int,
    console_sock: socket.socket | None,
    command: str,
    died: str,
    alive_w: int | None = None,
    before_go: Callable[[int], None] | None = None,
) -> tuple[int, int | None]:
    """What the children report, as (pid, its terminal's master): the pid (then the init is let go
    through alive_w, if given), the master once it was sent, and EOF once exec succeeded. Otherwise
    a SpawnError: `died` if they reported nothing, else their reason; alive_w is then closed."""
    with os.fdopen(report_r, "rb") as reports:
        first = read_report(reports)
        if "pid" not in first:
            if alive_w is not None:
                os.close(alive_w)
            if not first:
                raise SpawnError(died, 125)
            raise failure(first, command)
        pid = int(first["pid"])
        if before_go is not None:
            try:
                before_go(pid)
            except BaseException:
                if alive_w is not None:
                    os.close(alive_w)  # the init reads EOF instead of "go", and ends
                raise
        if alive_w is not None:
            os.write(alive_w, b"go")
        master = console.receive_master(console_sock) if console_sock is not None else None
        second = read_report(reports)  # EOF (exec succeeded), held (Launch.hold), or why it failed
    if second and not second.get("held"):
        with contextlib.suppress(ChildProcessError):  # not ours when not adopted: our reaper's
            os.waitpid(pid, 0)
        if alive_w is not None:
            os.close(alive_w)
        if master is not None:
            os.close(master)
        raise failure(second, command)
    return pid, master


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    """Be a child subreaper while an intermediate child exits (spawn's setup child, exec's joining
    child), so that its child (the workload, the exec'd process) becomes ours."""
    with _SUBREAPER_LOCK:
        was = syscalls.get_child_subreaper()
        syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, 1)
        try:
            yield
        finally:
            syscalls.prctl(syscalls.PR_SET_CHILD_SUBREAPER, int(was))


def read_report(reports: BinaryIO) -> dict[str, Any]:
    """The next report from the children, or {} once they have all closed the pipe (exec succeeded)."""
    line = reports.readline()
    return json.loads(line) if line else {}


def failure(message: dict[str, Any], command: str) -> SpawnError:
    """The error a child reported, as docker words it and with its exit code."""
    code = int(message.get("errno", 0))
    if message.get("stage") == "exec":
        if code == errno.ENOENT:
            return SpawnError(f"{command}: command not found", 127)
        return SpawnError(f"{command}: cannot execute: {os.strerror(code)}", 126)
    return SpawnError(
        f"setting up the workload failed while {message.get('stage')}: {message.get('error')}", 125
    )


def describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def report(fd: int, **message: object) -> None:
    """Tell the parent, over the CLOEXEC pipe, how far a child got (or its pid)."""
    os.write(fd, (json.dumps(message) + "\n").encode())


def report_failure(fd: int, stage: str, error: BaseException) -> NoReturn:
    """A child's last words: what it was doing and why it failed (failure() words it for the user)."""
    report(fd, stage=stage, error=str(error), errno=getattr(error, "errno", None) or 0)
    os._exit(125)


def default_signals() -> None:
    """In a forked child: the parent's Python handlers must not run here, nor its blocked signals stay
    blocked in the workload."""
    for sig in range(1, signal.NSIG):
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])  # the supervisor blocks some while it starts us


def _die_with(parent: int) -> None:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the death signal was armed
        os._exit(1)


def _setup_child(
    launch: Launch,
    supervisor: int,
    report_w: int,
    alive_r: int,
    console_fd: int | None,
    mapping: tuple[int, int] | None,
) -> NoReturn:
    stage = "starting"
    try:
        default_signals()
        _die_with(supervisor)
        # Opened before any namespace: the kernel checks a cgroup.procs write against the opener's
        # credentials, and a user namespace's mapped root may not be the cgroup's owner.
        procs = os.open(launch.cgroup_procs, os.O_WRONLY | os.O_CLOEXEC)
        if launch.namespaces.joined:
            stage = "joining namespaces " + ", ".join(f"{k}={p}" for k, p in launch.namespaces.joined.items())
            ns.join(launch.namespaces)
        if launch.user_namespace:
            stage = "creating the user namespace"
            if mapping is None:
                user.enter(os.geteuid(), os.getegid())
            else:
                user.enter_mapped(*mapping)
        stage = "creating namespaces"
        syscalls.unshare(ns.unshare_flags(launch.namespaces))
        ns.child_steps(launch.namespaces)
        stage = "forking the workload"
        pid = os.fork()
        if pid == 0:
            _workload_init(launch, report_w, alive_r, console_fd, procs)
        report(report_w, pid=pid)
        os._exit(0)
    except BaseException as error:  # every failure must reach the supervisor
        report_failure(report_w, stage, error)


def _workload_init(
    launch: Launch, report_w: int, alive_r: int, console_fd: int | None, procs: int
) -> NoReturn:
    stage = "waiting for the supervisor"
    try:
        if os.read(alive_r, 2) != b"go":
            os._exit(1)
        if launch.hold is None:
            syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)  # now relative to the supervisor
            if select.select([alive_r], [], [], 0)[0]:  # readable = EOF: the supervisor already died
                os._exit(1)
        held = None
        if launch.hold is not None:
            stage = f"opening the exec FIFO {launch.hold}"
            held = os.open(launch.hold, os.O_RDWR | os.O_CLOEXEC)  # before the root hides it
        if launch.stdio:
            for target, source in enumerate(launch.stdio):
                os.dup2(source, target)
        stage = "joining the cgroup"
        os.write(procs, b"0")
        os.close(procs)
        ns.init_unshare(launch.namespaces)
        if launch.oom_score_adj is not None:
            stage = f"setting oom_score_adj to {launch.oom_score_adj}"
            with open("/proc/self/oom_score_adj", "w") as adj:
                adj.write(str(launch.oom_score_adj))
        if launch.root:
            stage = "building the root filesystem"
            rootfs.enter(launch.root)
        stage = "setting up namespaces"
        ns.init_steps(launch.namespaces)
        for key, value in launch.sysctl:
            stage = f"setting the sysctl {key}={value}"
            with open(f"/proc/sys/{key.replace('.', '/')}", "w") as sysctl:
                sysctl.write(value)
        if launch.sandbox.masked or launch.sandbox.read_only:
            stage = "masking kernel paths"
            paths.restrict(launch.sandbox.masked, launch.sandbox.read_only)
        os.setsid()
        if launch.terminal and console_fd is not None:
            stage = "opening its terminal"
            console.take_terminal(console_fd, launch.terminal)
        if launch.workdir:
            stage = f"changing to the working directory {launch.workdir}"
            os.chdir(launch.workdir)
        identity = None
        if launch.user:
            stage = f"looking up the user {launch.user}"
            identity = lookup_identity(launch.user)
        close_inherited_fds(keep={report_w, alive_r} | ({held} if held is not None else set()))
        stage = "setting its process attributes (rlimits, umask, personality)"
        set_attributes(launch.rlimits, launch.umask, launch.personality)
        stage = "entering the sandbox" + (f" as the user {launch.user}" if launch.user else "")
        sandbox.enter(launch.sandbox, identity, launch.groups)
        if launch.init:
            _reaper(launch, report_w)
        if held is not None:
            stage = "finding the command"
            _wait_for_start(launch, held, report_w, alive_r)
            exec_command(launch.argv, launch.env, None)
        exec_command(launch.argv, launch.env, report_w)
    except BaseException as error:  # every failure must reach the supervisor
        report_failure(report_w, stage, error)


def _wait_for_start(launch: Launch, fifo: int, report_w: int, alive_r: int) -> None:
    """Launch.hold: the command must be there (a missing one fails `create`, as runc's does), then
    report held, wait for the caller's "ok" and the container's state (EOF alone: it died before
    recording the container, which nobody could then start or delete: end), then for `start`'s byte
    on the FIFO, and run the startContainer hooks."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2):
        # pid 1 of its namespace: the kernel drops a signal it has no handler for, and `kill` of a
        # created container must end it (handlers are reset by exec)
        signal.signal(sig, lambda received, _frame: os._exit(128 + received))
    path = launch.env.get("PATH", os.defpath)
    if shutil.which(launch.argv[0], path=path) is None:
        if "/" in launch.argv[0] and os.path.exists(launch.argv[0]):
            raise OSError(errno.EACCES, f"exec: {launch.argv[0]!r}: permission denied")
        raise FileNotFoundError(errno.ENOENT, f"exec: {launch.argv[0]!r}: executable file not found in $PATH")
    report(report_w, held=True)
    os.close(report_w)
    said = b""
    while chunk := os.read(alive_r, 65536):  # "ok" and the container's OCI state, then EOF
        said += chunk
    if not said.startswith(b"ok"):
        os._exit(1)
    os.close(alive_r)
    if not os.read(fifo, 1):
        os._exit(1)
    os.close(fifo)
    if launch.start_hooks:
        from cgctl.runtime import hooks

        try:
            hooks.run("startContainer", list(launch.start_hooks), json.loads(said[2:]))
        except hooks.HookError as error:
            os.write(2, f"{error}\n".encode())
            os._exit(1)


def set_attributes(rlimits: tuple[tuple[int, int, int], ...], umask: int | None, persona: int | None) -> None:
    """The process attributes exec keeps, set while the init is still privileged (raising a hard
    limit needs CAP_SYS_RESOURCE); an OCI limit of 2**64-1 (or over 2**63) is unlimited."""
    for kind, soft, hard in rlimits:
        resource.setrlimit(kind, (_limit(soft), _limit(hard)))
    if umask is not None:
        os.umask(umask)
    if persona is not None:
        syscalls.personality(persona)


def _limit(value: int) -> int:
    return resource.RLIM_INFINITY if value >= 1 << 63 else value


def lookup_identity(user: str) -> tuple[int, int]:
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


def close_inherited_fds(keep: set[int]) -> None:
    """Nothing but stdio reaches the workload (leaked fds would pin files and defeat CRIU)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def exec_command(argv: list[str], env: dict[str, str], report_w: int | None) -> NoReturn:
    """exec, or report why not (its stage is "exec": failure() makes it a 126 or 127); with no one to
    report to (an OCI container's `start` has returned), say so on the workload's stderr."""
    try:
        os.execvpe(argv[0], argv, env)
    except OSError as error:
        if report_w is None:
            os.write(2, f"exec {argv[0]}: {error.strerror}\n".encode())
        else:
            report(report_w, stage="exec", error=error.strerror, errno=error.errno)
        os._exit(127 if error.errno == errno.ENOENT else 126)


def _reaper(launch: Launch, report_w: int) -> NoReturn:
    """--init: pid 1 forks the command, forwards every signal to it, reaps orphans, exits as it does."""
    command = os.fork()
    if command == 0:
        exec_command(launch.argv, launch.env, report_w)
    os.close(report_w)
    for sig in set(range(1, signal.NSIG)) - {signal.SIGCHLD, signal.SIGKILL, signal.SIGSTOP}:
        with contextlib.suppress(OSError, ValueError):
            signal.signal(sig, lambda received, _frame: os.kill(command, received))
    while True:
        pid, status = os.wait()
        if pid == command:
            os._exit(exit_status(status))


def exit_status(status: int) -> int:
    """A wait status as docker reports it: the exit code, or 128+N when killed by signal N."""
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
