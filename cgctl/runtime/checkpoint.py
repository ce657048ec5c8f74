"""Checkpoint a running container with CRIU, and restore it into a new cgroup under the same limits.

A checkpoint directory holds CRIU's images, its logs (dump.log, restore.log)
and cgctl's manifest (cgctl.json: the spec with its limits, labels and
namespaces as in force at the dump, where the workload's stdio went, and
the dumped init's pid). CRIU freezes the container's cgroup to collect its
tree, so nothing forks away during the dump; a dump that fails leaves the
container running, and a failed restore leaves no cgroup and no process.

Restore makes the new cgroup and writes every limit first, then starts CRIU
inside it: every process CRIU creates is born in the new cgroup, so none is
ever moved, and none can land in the old one (--manage-cgroups=ignore).
The restored init is the child of the process that runs CRIU (--restore-sibling):
the restoring cgctl, which supervises it as `cgctl run` does and hands it its
own stdio (--inherit-fd), or, through the daemon, the keeper, which hands it
the pipes to the new container's log. Terminals are refused at checkpoint
time, since CRIU takes one along only as a shell job.

Hooks: CRIU runs criu-action.sh at each step; it runs the user's hook at
pre-dump, post-dump, pre-restore and post-restore with CGCTL_HOOK_ACTION,
CGCTL_CONTAINER and CGCTL_CHECKPOINT_DIR set, and a hook that fails aborts
the step. cgctl runs the hook itself with CGCTL_HOOK_ACTION=failure when
a dump or restore fails.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cgctl import network, state, syscalls
from cgctl.accounting import find_container
from cgctl.cgroup import freezer, fs
from cgctl.ns import rootfs
from cgctl.runtime import spawn
from cgctl.runtime.report import RunReport
from cgctl.runtime.supervisor import prepared_root, supervise, with_network_files
from cgctl.spec import SpecError, WorkloadSpec

CRIU_PATHS = ("/usr/sbin/criu", "/sbin/criu")  # where Debian puts it, if sbin is not on PATH
MANIFEST = "cgctl.json"
MANIFEST_VERSION = 1
ACTION_SCRIPT = Path(__file__).with_name("criu-action.sh")
# The container's mounts are the host's (until it has a root of its own): CRIU treats them as external.
EXTERNAL_MOUNTS = ("--ext-mount-map", "auto", "--enable-external-sharing", "--enable-external-masters")
TERMINAL_MAJORS = {4, 5, *range(136, 144)}  # tty, console/ptmx, pts
# The key of a container's net namespace in CRIU's images: external, given back with --inherit-fd.
NET_KEY = "cgctl-net"
# CRIU errors that are the consequence of another or harmless here (no iptables, no /dev/net/tun).
CRIU_NOISE = ("exited, status=", "execvp(", " -V failed", "Unable to create tun", "FAILED", "failed with -1")
# Reports (bytes done, bytes expected or None) about twice a second while CRIU works.
Progress = Callable[[int, int | None], None]


class CheckpointError(Exception):
    """A checkpoint or restore that did not happen; the container is as it was."""


@dataclass(frozen=True)
class Checkpoint:
    name: str
    directory: Path
    seconds: float
    image_bytes: int
    left_running: bool
    notes: tuple[str, ...] = ()  # what the images do not hold


def checkpoint(
    name: str,
    directory: Path,
    *,
    leave_running: bool = False,
    tcp_established: bool = False,
    hook: Path | None = None,
    state_dir: Path | None = None,
    progress: Progress | None = None,
) -> Checkpoint:
    """Dump the running container `name` into directory (new or empty) with CRIU.

    Without leave_running the container ends once its images are complete, and its
    `cgctl run` reports where it went. Raises LookupError (no such container),
    CheckpointError (nothing was dumped, the container runs on) or SpecError (a bad
    directory or hook).
    """
    criu = _criu()
    hook = _checked_hook(hook)
    container = find_container(name, state_dir)
    record_path = state.record_path(state_dir or state.default_state_dir(), name)
    record = state.read(record_path)
    if "pid" not in record:
        raise CheckpointError(
            f"{name} was started by a cgctl that did not record its pid; it cannot be dumped"
        )
    init = int(record["pid"])
    directory = _empty_directory(directory)
    manifest = {
        "version": MANIFEST_VERSION,
        "name": name,
        "spec": record["spec"],
        "init_pid": init,
        "stdio": _stdio(name, init),
        "tcp_established": tcp_established,
        "checkpointed_at": time.time(),
    }
    group = fs.Cgroup(container.cgroup)
    attached = record.get("network") or {}
    external_net = []
    if attached.get("result"):  # its namespace is the network's: restored into a new one (restore)
        inode = os.stat(f"/proc/{init}/ns/net").st_ino
        external_net = ["--external", f"net[{inode}]:{NET_KEY}"]
        manifest["network"] = {"address": attached.get("address")}
    args = [
        criu,
        "dump",
        "--tree", str(init),
        "--images-dir", str(directory),
        "--log-file", "dump.log",
        "--freeze-cgroup", str(group.path),
        "--manage-cgroups=ignore",
        "--network-lock", "nftables",
        *EXTERNAL_MOUNTS,
        *external_net,
        *(["--leave-running"] if leave_running else []),
        *(["--tcp-established"] if tcp_established else []),
    ]  # fmt: skip
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    started = time.monotonic()
    with state.checkpointing(record_path):
        state.update(record_path, checkpoint={"dir": str(directory), "leave_running": leave_running})
        try:
            _run_criu(
                args,
                directory / "dump.log",
                _hook_env(hook, name, directory),
                lambda: (_image_bytes(directory), _memory(group)),
                progress,
            )
        except CheckpointError as error:
            state.update(record_path, checkpoint=None)
            (directory / MANIFEST).unlink(missing_ok=True)
            if group.path.exists():
                freezer.set_frozen(group, False)  # CRIU thaws what it froze; make sure
            also = _run_failure_hook(hook, name, directory)
            raise CheckpointError(f"{error}; {name} is still running{also}") from None
        state.update(
            record_path, checkpoint={"dir": str(directory), "leave_running": leave_running, "complete": True}
        )
        if leave_running:
            state.update(record_path, checkpoint=None)
    seconds = time.monotonic() - started
    return Checkpoint(
        name, directory, seconds, _image_bytes(directory), leave_running, _notes(record["spec"])
    )


def _notes(spec: dict[str, Any]) -> tuple[str, ...]:
    """A root's upper layer is not in CRIU's images: say when writes to it will not come back."""
    root = spec.get("rootfs") or {}
    if root and not (root.get("upper") and root.get("keep_upper")):
        return (
            "files written to its root (outside /tmp, /dev/shm and volumes) are not in the checkpoint: "
            "the upper layer is not dumped; run with --upper DIR --keep-upper to keep them for a restore",
        )
    return ()


@dataclass(frozen=True)
class Restoring:
    """A checkpoint checked and ready to restore (open_checkpoint): the container's creator makes its
    cgroup, and whoever is to be the restored tree's parent runs restore_tasks."""

    directory: Path
    manifest: dict[str, Any]
    spec: WorkloadSpec
    hook: Path | None


def open_checkpoint(directory: Path, name: str | None = None, hook: Path | None = None) -> Restoring:
    """Check that directory holds a checkpoint this host can restore, as `name` (default: the
    dumped one's). Raises CheckpointError (no CRIU, not root) or SpecError (a bad name, hook,
    directory or manifest)."""
    _criu()
    hook = _checked_hook(hook)
    manifest = _read_manifest(directory)
    try:
        spec = WorkloadSpec.model_validate({**manifest["spec"], "name": name or manifest["name"]})
    except ValidationError as error:
        if name and any(detail["loc"] == ("name",) for detail in error.errors()):
            raise SpecError(("name",), name, "not a valid name (letters, digits, _ . -)") from None
        raise SpecError(("dir",), str(directory), f"its manifest's spec is not valid: {error}") from None
    return Restoring(directory, manifest, spec, hook)


def restore_tasks(
    restoring: Restoring,
    group: fs.Cgroup,
    root: rootfs.Plan | None,
    stdio: dict[int, int],
    progress: Progress | None = None,
    netns: int | None = None,
) -> int:
    """Run CRIU restore inside `group` (limits already written) and return the restored init's pid.
    The init becomes the caller's child (--restore-sibling), and its stdin, stdout and stderr are
    `stdio`'s fds (dumped fd number -> ours) in place of the dumped ones; a container dumped with a
    network of its own is restored into `netns` (an fd of a namespace attached anew). CheckpointError if CRIU
    fails (the failure hook has run); the caller then removes the cgroup, and nothing is left."""
    directory, manifest, name = restoring.directory, restoring.manifest, restoring.spec.name or ""
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cgctl-restore-")))
        pidfile = scratch / "pid"
        inherited = _inherit_stdio(manifest["stdio"], stdio, stack)
        if manifest.get("network"):
            if netns is None:
                raise CheckpointError(
                    "the checkpoint has a network of its own, and no namespace was made for it"
                )
            inherited[netns] = NET_KEY
        args = [
            _criu(),
            "restore",
            "--images-dir", str(directory),
            "--log-file", "restore.log",
            "--restore-detached",
            "--restore-sibling",
            "--manage-cgroups=ignore",
            "--root", f"{root.staging}/merged" if root else "/",
            "--pidfile", str(pidfile),
            *EXTERNAL_MOUNTS,
            *(["--tcp-established"] if manifest.get("tcp_established") else []),
            *(arg for fd, key in inherited.items() for arg in ("--inherit-fd", f"fd[{fd}]:{key}")),
        ]  # fmt: skip
        env = {
            **_hook_env(restoring.hook, name, directory),
            "CGCTL_DUMPED_INIT_PID": str(manifest["init_pid"]),
        }
        try:
            _run_criu(
                args,
                directory / "restore.log",
                env,
                lambda: (_memory(group) or 0, _image_bytes(directory)),
                progress,
                cgroup=group,
                pass_fds=tuple(inherited),
                root=root,
                # CRIU 3.17 restores capabilities and seccomp filters but not no_new_privs:
                # set it on CRIU itself, and every task it forks inherits it.
                no_new_privs=restoring.spec.security.no_new_privileges
                and not restoring.spec.security.privileged,
            )
            return int(pidfile.read_text())
        except CheckpointError as error:
            raise CheckpointError(f"{error}{_run_failure_hook(restoring.hook, name, directory)}") from None


def restore(
    directory: Path,
    *,
    name: str | None = None,
    hook: Path | None = None,
    cgroup_root: Path | None = None,
    state_dir: Path | None = None,
    progress: Progress | None = None,
    on_restored: Callable[[str, float], None] | None = None,
) -> RunReport:
    """Restore the checkpoint in directory as a new container (named `name`, default the dumped one's)
    under the limits it had, supervise it to its end and return its report.

    on_restored(name, seconds) is called once its processes run again. Raises
    CheckpointError (CRIU failed), SpecError (a name in use, limits this host
    refuses, a bad hook) or fs.CgroupError; in every case nothing is left behind.
    """
    restoring = open_checkpoint(directory, name, hook)
    spec = restoring.spec
    wired = restored_network(restoring)
    spec = with_network_files(spec, wired) if wired else spec
    with prepared_root(spec) as root:

        def start(
            name: str, group: fs.Cgroup, netns: str | None, _before_go: Callable[[int], None] | None
        ) -> spawn.Started:
            started = time.monotonic()
            with ExitStack() as stack:
                fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC) if netns else None
                if fd is not None:
                    stack.callback(os.close, fd)
                pid = restore_tasks(restoring, group, root, {0: 0, 1: 1, 2: 2}, progress, fd)
            if on_restored:
                on_restored(name, time.monotonic() - started)
            return spawn.Started(pid, None)

        record: dict[str, object] = {"restored_from": str(directory)}
        return supervise(spec, start, cgroup_root, state_dir, record, wired)


def restored_network(restoring: Restoring) -> network.Plan | None:
    """A checkpoint with a network of its own gets a new namespace on the same network, asking for
    the address it had (its connections, with --tcp-established, need it); None without one."""
    dumped = restoring.manifest.get("network")
    if not dumped:
        return None
    planned = network.plan(restoring.spec.network)
    return dataclasses.replace(planned, address=dumped.get("address"), files_of=restoring.manifest["name"])


def _criu() -> str:
    criu = shutil.which("criu") or next((path for path in CRIU_PATHS if os.access(path, os.X_OK)), None)
    if criu is None:
        raise CheckpointError("criu is not installed: install it (Debian/Ubuntu: apt-get install criu)")
    if os.geteuid() != 0:
        raise CheckpointError("checkpoint and restore need root (CRIU ptraces the whole process tree)")
    return criu


def _checked_hook(hook: Path | None) -> Path | None:
    if hook is None:
        return None
    if not hook.is_file() or not os.access(hook, os.X_OK):
        raise SpecError(("hook",), str(hook), "not an executable file")
    return hook.resolve()


def _empty_directory(directory: Path) -> Path:
    """The checkpoint directory, made if need be; one that holds anything is refused (never overwritten)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if any(directory.iterdir()):
            raise SpecError(("dir",), str(directory), "not empty: give a new or empty directory")
    except OSError as error:
        raise SpecError(("dir",), str(directory), error.strerror or str(error)) from None
    return directory.resolve()


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise SpecError(("dir",), str(directory), f"no cgctl checkpoint here ({path} is missing)") from None
    except (OSError, ValueError) as error:
        raise SpecError(("dir",), str(directory), f"cannot read {path}: {error}") from None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        raise SpecError(
            ("dir",), str(directory), f"{path} is not a cgctl manifest of version {MANIFEST_VERSION}"
        )
    return manifest


def _stdio(name: str, init: int) -> dict[str, str]:
    """What the init's stdin, stdout and stderr are (pipe:[N], a path, ...); terminals are refused."""
    resources = {}
    for fd in (0, 1, 2):
        link = f"/proc/{init}/fd/{fd}"
        try:
            mode = os.stat(link)
            resources[str(fd)] = os.readlink(link)
        except FileNotFoundError:
            continue  # closed
        if stat.S_ISCHR(mode.st_mode) and os.major(mode.st_rdev) in TERMINAL_MAJORS:
            raise CheckpointError(
                f"{name}'s {('stdin', 'stdout', 'stderr')[fd]} is a terminal ({resources[str(fd)]}), "
                "which CRIU cannot take along (with -t, the pty's master is held outside the container, by "
                "cgctl or the daemon's keeper): start it without -t and with its stdio redirected, "
                "e.g. cgctl run ... </dev/null >job.log 2>&1"
            )
    return resources


def _inherit_stdio(manifest: dict[str, str], stdio: dict[int, int], stack: ExitStack) -> dict[int, str]:
    """Hand CRIU `stdio`'s fds in place of the dumped stdio (pipes, sockets and files; devices such
    as /dev/null are reopened by CRIU itself): a copy's fd number in CRIU -> the resource it replaces.
    The copies are new fds, so that none of the caller's is overwritten."""
    inherited: dict[int, str] = {}
    for fd, resource in sorted(manifest.items()):
        if resource.startswith(("pipe:", "socket:")):
            key = resource
        elif resource.startswith("/") and not resource.startswith("/dev/") and "(deleted)" not in resource:
            key = resource[1:]  # CRIU names files relative to the root
        else:
            continue
        if key in inherited.values() or int(fd) not in stdio:
            continue  # stdout and stderr were one file: it becomes our stdout
        copy = os.dup(stdio[int(fd)])
        stack.callback(os.close, copy)
        inherited[copy] = key
    return inherited


def _hook_env(hook: Path | None, name: str, directory: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CGCTL_HOOK": str(hook or ""),
        "CGCTL_CONTAINER": name,
        "CGCTL_CHECKPOINT_DIR": str(directory),
    }


def _run_failure_hook(hook: Path | None, name: str, directory: Path) -> str:
    """Run the hook with CGCTL_HOOK_ACTION=failure; returns what to add to the error if it failed too."""
    if hook is None:
        return ""
    env = {**_hook_env(hook, name, directory), "CGCTL_HOOK_ACTION": "failure"}
    try:
        status = subprocess.run([str(hook)], env=env, stdin=subprocess.DEVNULL, timeout=60).returncode
    except (OSError, subprocess.TimeoutExpired) as error:
        return f" (the failure hook could not run: {error})"
    return f" (the failure hook exited {status})" if status else ""


def _run_criu(
    args: list[str],
    log: Path,
    env: dict[str, str],
    measure: Callable[[], tuple[int, int | None]],
    progress: Progress | None,
    cgroup: fs.Cgroup | None = None,
    pass_fds: tuple[int, ...] = (),
    root: rootfs.Plan | None = None,
    no_new_privs: bool = False,
    bind_root: tuple[str, str] | None = None,
) -> None:
    """Run CRIU with our action script; CheckpointError names its log. With `cgroup`, CRIU runs in
    it; with `root`, in a mount namespace of its own where the root's layers are mounted; with
    `bind_root` (source, target), in one where source is bound at target (CRIU's --root must be a
    mount point); with `no_new_privs`, under no_new_privs (so are the tasks it restores, and the
    hooks it runs)."""
    procs = str(cgroup.file("cgroup.procs")) if cgroup else None

    def prepare() -> None:
        if procs:
            with open(procs, "w") as file:
                file.write("0")
        if root or bind_root:
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
        if root:
            rootfs.mount_layers(root)
        if bind_root:
            syscalls.mount(bind_root[0], bind_root[1], None, syscalls.MS_BIND | syscalls.MS_REC)
        if no_new_privs:
            syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)

    command = [*args, "--action-script", str(ACTION_SCRIPT)]
    with open(log.with_suffix(".out"), "wb") as output, _reporting(measure, progress):
        try:
            status = subprocess.run(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
                pass_fds=pass_fds,
                preexec_fn=prepare if procs or root or bind_root or no_new_privs else None,
            ).returncode
        except OSError as error:
            raise CheckpointError(f"cannot run {args[0]}: {error}") from None
    if status:
        raise CheckpointError(f"criu {args[1]} failed (exit {status}): {_last_error(log)}; CRIU's log: {log}")


@contextmanager
def _reporting(measure: Callable[[], tuple[int, int | None]], progress: Progress | None) -> Iterator[None]:
    """Call progress with measure() twice a second while the block runs, and once at its end."""
    if progress is None:
        yield
        return
    done = threading.Event()

    def report() -> None:
        while not done.wait(0.5):
            progress(*measure())

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    try:
        yield
    finally:
        done.set()
        reporter.join()


def _last_error(log: Path) -> str:
    """What went wrong: a hook that failed (said by criu-action.sh, into CRIU's log), else CRIU's
    first error that is not noise, without its timestamp and source location."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log was written"
    if hooks := [line.removeprefix("cgctl: ") for line in lines if line.startswith("cgctl: ")]:
        return hooks[-1]
    errors = [line.split("): ", 1)[-1] for line in lines if "Error (" in line]
    telling = [error for error in errors if not any(noise in error for noise in CRIU_NOISE)]
    return (telling or errors or [line.strip() for line in lines[-1:]] or ["the log is empty"])[0]


def _image_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("pages-*.img"))


def _memory(group: fs.Cgroup) -> int | None:
    text = group.read_optional("memory.current")
    return int(text) if text else None
