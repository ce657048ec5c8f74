"""`cgctl exec`: one more process in a running container, as `docker exec` and `runc exec` start one.

It joins what the container's init has, in the one order that works:

    caller ──fork──> joining child: the container's cgroup.procs (by the host's path, before the
                     cgroup namespace hides it), then setns: [user], ipc, uts, net, pid, mnt, cgroup
                     (those the container has of its own; /proc/PID/ns/* opened by the caller)
                          └──fork──> the process, in the container's pid namespace (setns(pid)
                                     applies to children): chdir, setsid, its terminal or stdio,
                                     the container's sandbox, exec
    the joining child reports the process's pid and exits; the process is reparented to the
    caller, a child subreaper for that moment (spawn.subreaper), which waits for it.

setns(mnt) gives it the container's root and cwd, where the kernel paths are masked already; the
sandbox (capabilities, no_new_privs, seccomp) is planned again from the container's recorded spec,
so it gets what the init got, with the same supplementary groups, rlimits and umask. Errors come
back over a CLOEXEC pipe as spawn's do.

A process outlives a caller that dies (as docker exec's outlives its client): the kernel hands it
to the caller's reaper (the nearest subreaper, else the host's init; never the container's init,
whose pid namespace the caller is not in). It is in the container's cgroup and pid namespace, so it
ends with the container all the same.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from cgctl import sandbox, state, syscalls
from cgctl.accounting import find_container
from cgctl.cgroup import freezer, fs
from cgctl.ns import console
from cgctl.runtime import spawn, terminal
from cgctl.runtime.supervisor import SignalForwarder, rlimits
from cgctl.spec import ExecSpec, SpecError, WorkloadSpec

# The order to join them in: the user namespace first (it owns the others), mnt before cgroup.
NAMESPACES = ("user", "ipc", "uts", "net", "pid", "mnt", "cgroup")


class ExecError(spawn.SpawnError):
    """The container cannot take a process now, or not this one; nothing was started (exit 125)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 125)


@dataclass(frozen=True)
class Target:
    """Everything start needs, found and checked by prepare before anything is forked."""

    name: str
    pid: int  # the container's init (or --init's reaper), as this host numbers it
    cgroup_procs: str  # the container cgroup's cgroup.procs
    namespaces: tuple[str, ...]  # the kinds of /proc/PID/ns/ to join, in NAMESPACES' order
    sandbox: sandbox.Plan
    argv: list[str]
    env: dict[str, str]
    user: str | None
    workdir: str
    tty: bool
    interactive: bool
    groups: tuple[int, ...] = ()  # the container's supplementary groups
    rlimits: tuple[tuple[int, int, int], ...] = ()  # and its resource limits
    umask: int | None = None


def prepare(state_dir: Path, name: str, spec: ExecSpec) -> Target:
    """The container's side of spec, from its run record and its init. Raises LookupError (no running
    container of that name) or ExecError (it cannot take this process now)."""
    container = find_container(name, state_dir)
    record = state.read(state.record_path(state_dir, name))
    if "pid" not in record:
        raise ExecError(f"{name} has not started its process yet: try again in a moment")
    pid = int(record["pid"])
    workload = WorkloadSpec.model_validate(record["spec"])
    if spec.privileged and not workload.security.privileged:
        raise ExecError(
            f"--privileged on exec needs a container started with --privileged, and {name} was not: "
            "drop --privileged"
        )
    group = fs.Cgroup(container.cgroup)
    if freezer.frozen(group):
        raise ExecError(
            f"{name} is frozen: `cgctl thaw {name}` first (a process joining it would freeze at once)"
        )
    try:
        plan = sandbox.plan(workload.security)
    except SpecError as error:  # a --seccomp profile file changed or removed since the container started
        raise ExecError(
            f"{name}'s sandbox cannot be planned again, so a process would not get the container's: "
            f"{error}. Fix: put the profile back as it was, or restart {name}"
        ) from None
    try:
        env = _environment(pid, workload.init)
        namespaces = tuple(kind for kind in NAMESPACES if _namespace(pid, kind) != _namespace("self", kind))
    except (FileNotFoundError, ProcessLookupError):
        raise ExecError(f"{name} is not running: its init (pid {pid}) has ended") from None
    return Target(
        name=name,
        pid=pid,
        cgroup_procs=str(group.file("cgroup.procs")),
        namespaces=namespaces,
        sandbox=plan,
        argv=spec.command,
        env={**env, **spec.env},
        user=spec.user or workload.user,
        workdir=spec.workdir or workload.workdir or "/",
        tty=spec.tty,
        interactive=spec.interactive,
        groups=tuple(dict.fromkeys(workload.additional_gids)),
        rlimits=rlimits(workload),
        umask=workload.umask,
    )


def _environment(pid: int, init: bool) -> dict[str, str]:
    """The environment the container's command was started with (its run record leaves it out: it may
    hold secrets). With --init, pid 1 is cgctl's reaper, which never exec'd: the command is its first
    child."""
    if init:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            raise ProcessLookupError(pid)
        pid = int(children[0])
    entries = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(os.fsdecode(entry).partition("=")[::2] for entry in entries if b"=" in entry)


def _namespace(pid: int | str, kind: str) -> tuple[int, int]:
    """A namespace's identity: joining one's own user namespace is EINVAL, the others would be no-ops."""
    found = os.stat(f"/proc/{pid}/ns/{kind}")
    return found.st_dev, found.st_ino


def start(
    target: Target,
    stdio: tuple[int, int, int] | None = None,
    terminal: tuple[int, int] | None = None,
    adopt: bool = True,
) -> spawn.Started:
    """Start the process in the container (see the module's docstring), our child. Its stdin, stdout
    and stderr are stdio's fds, else ours; with target.tty, a pty from the container's devpts at
    terminal's (rows, columns) instead, whose master comes back in Started.master. Without adopt (an
    OCI exec --detach), the process goes to our nearest subreaper, the caller's. Raises SpawnError:
    125 with the stage that failed, 126/127 when the command cannot be run."""
    try:
        fds = [
            (kind, os.open(f"/proc/{target.pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC))
            for kind in target.namespaces
        ]
    except (FileNotFoundError, ProcessLookupError):
        raise ExecError(f"{target.name} is not running: its init (pid {target.pid}) has ended") from None
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    ours, theirs = console.channel() if target.tty else (None, None)
    try:
        with spawn.subreaper() if adopt else contextlib.nullcontext():
            joiner = os.fork()
            if joiner == 0:
                os.close(report_r)
                if ours is not None:
                    ours.close()
                size = terminal or console.UNKNOWN_SIZE
                _join(target, fds, stdio, size, theirs.fileno() if theirs else None, report_w)
            os.close(report_w)
            if theirs is not None:
                theirs.close()
            _, joiner_status = os.waitpid(joiner, 0)
    finally:
        for _, fd in fds:
            os.close(fd)
    died = f"the process joining {target.name} died ({spawn.describe(joiner_status)})"
    try:
        pid, master = spawn.reported_start(report_r, ours, target.argv[0], died)
    finally:
        if ours is not None:
            ours.close()
    return spawn.Started(pid, None, master)


def _join(
    target: Target,
    fds: list[tuple[str, int]],
    stdio: tuple[int, int, int] | None,
    size: tuple[int, int],
    console_fd: int | None,
    report_w: int,
) -> NoReturn:
    stage = f"joining {target.name}'s cgroup"
    try:
        spawn.default_signals()
        with open(target.cgroup_procs, "w") as procs:
            procs.write("0")
        for kind, fd in fds:
            stage = f"joining {target.name}'s {kind} namespace"
            syscalls.setns(fd)
        stage = "forking the process"
        pid = os.fork()
        if pid == 0:
            _process(target, stdio, size, console_fd, report_w)
        spawn.report(report_w, pid=pid)
        os._exit(0)
    except BaseException as error:  # every failure must reach the caller
        spawn.report_failure(report_w, stage, error)


def _process(
    target: Target,
    stdio: tuple[int, int, int] | None,
    size: tuple[int, int],
    console_fd: int | None,
    report_w: int,
) -> NoReturn:
    stage = f"changing to the working directory {target.workdir}"
    try:
        os.chdir(target.workdir)
        os.setsid()
        if console_fd is not None:
            stage = "opening its terminal"
            console.take_terminal(console_fd, size)
        elif stdio:
            for fd, source in enumerate(stdio):
                os.dup2(source, fd)
        identity = None
        if target.user:
            stage = f"looking up the user {target.user}"
            identity = spawn.lookup_identity(target.user)
        spawn.close_inherited_fds(keep={report_w})
        stage = "setting its rlimits and umask"
        spawn.set_attributes(target.rlimits, target.umask, None)
        stage = "entering the sandbox" + (f" as the user {target.user}" if target.user else "")
        sandbox.enter(target.sandbox, identity, target.groups)
        spawn.exec_command(target.argv, target.env, report_w)
    except BaseException as error:  # every failure must reach the caller
        spawn.report_failure(report_w, stage, error)


def wait(pid: int) -> int:
    """The process's exit status as docker reports it (128+N when killed by signal N)."""
    return spawn.exit_status(os.waitpid(pid, 0)[1])


def run_attached(target: Target) -> int:
    """Run the process here, without a daemon, and return its status: with the caller's stdout and
    stderr (and stdin with -i; else it reads nothing), or with -t a terminal relayed to the caller's;
    the caller's signals are forwarded to it."""
    group = fs.Cgroup(Path(target.cgroup_procs).parent)
    with SignalForwarder(target.name, group, namespace_init=False) as forwarder:
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            stdio = None if target.interactive else (null, 1, 2)
            started = start(target, stdio, terminal.size() if target.tty else None)
        finally:
            os.close(null)
        master = started.master
        forwarder.start(
            started.pid, hang_up=(lambda: terminal.hang_up(master)) if master is not None else None
        )
        if started.master is None:
            return wait(started.pid)
        return terminal.relay_until_exit(started.master, target.interactive, lambda: wait(started.pid))
