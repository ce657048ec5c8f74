"""OCI containers: the runtime specification's lifecycle (create, start, state, kill, delete, and
runc's pause, resume, ps, list) over cgctl's own pipeline, with no cgctl process left behind.

    create: config.json -> WorkloadSpec (bundle.py) -> policies -> the cgroup with every limit
            (supervisor.create) -> the init (spawn.start with Launch.hold) does everything up to
            exec, then blocks on <root>/<id>/exec.fifo; state.json written; create exits, and the
            init goes to the caller's subreaper (containerd's shim, conmon), which reaps it.
    start:  a byte into exec.fifo, which is then removed: the init execs the process.
    state:  from the init's liveness (pid and start time, not a zombie), the FIFO and cgroup.freeze.
    delete: the cgroup killed and removed, poststop hooks, the run record and the state gone.

Each container also has a run record in cgctl's state directory (state.py), so `cgctl ps`, `stats`,
`top`, `exec`, `update`, the exporter and live policies see it under its OCI id. Only `create` and
`exec` need pydantic and the sandbox: the verbs a shim calls for every container (state, kill,
delete) import nothing heavy.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgctl import durable, state
from cgctl.cgroup import freezer, fs

if TYPE_CHECKING:
    from cgctl.policy import PolicySet
    from cgctl.runtime import spawn, supervisor
    from cgctl.runtime.bundle import Bundle
    from cgctl.runtime.oci_checkpoint import CriuOptions

OCI_VERSION = "1.0.2"
ID_PATTERN = re.compile(r"^[\w+.-]+$")
STATE_FILE = "state.json"
FIFO = "exec.fifo"


class OciError(Exception):
    """An operation failed; the message is runc's wording where callers match it (exit status 1)."""


def default_root() -> Path:
    """Where containers' state lives, as runc's /run/runc: per user when rootless."""
    if os.geteuid() == 0:
        return Path("/run/cgctl-oci")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}") / "cgctl-oci"


@dataclass(frozen=True)
class Container:
    """One container's state directory, <root>/<id>."""

    root: Path
    id: str

    @property
    def directory(self) -> Path:
        return self.root / self.id

    def saved(self) -> dict[str, Any]:
        """state.json; OciError (runc's "container does not exist") if there is none."""
        try:
            return dict(json.loads((self.directory / STATE_FILE).read_text()))
        except FileNotFoundError:
            raise OciError("container does not exist") from None

    @property
    def cgroup(self) -> fs.Cgroup:
        return fs.Cgroup(Path(self.saved()["cgroup"]))

    def status(self, saved: dict[str, Any] | None = None) -> str:
        """created, running, paused or stopped (creating while `create` is still at work)."""
        saved = saved or self.saved()
        if "pid" not in saved:
            return "creating"
        if not _alive(int(saved["pid"]), saved.get("pid_start")):
            return "stopped"
        if (self.directory / FIFO).exists():
            return "created"
        with contextlib.suppress(fs.CgroupError):
            if freezer.frozen(fs.Cgroup(Path(saved["cgroup"]))):
                return "paused"
        return "running"

    def state(self) -> dict[str, Any]:
        """The OCI state, as `state` prints it and hooks read it."""
        saved = self.saved()
        status = self.status(saved)
        return {
            "ociVersion": OCI_VERSION,
            "id": self.id,
            "pid": int(saved.get("pid", 0)) if status != "stopped" else 0,
            "status": status,
            "bundle": saved["bundle"],
            "rootfs": saved["rootfs"],
            "created": saved["created"],
            "owner": saved.get("owner", ""),
            "annotations": saved.get("annotations", {}),
        }


def open_container(root: Path, container_id: str) -> Container:
    """The container, which must exist (OciError otherwise)."""
    container = Container(root, _checked_id(container_id))
    container.saved()
    return container


def containers(root: Path) -> list[Container]:
    """Every container under root, by id."""
    if not root.is_dir():
        return []
    return [Container(root, entry.name) for entry in sorted(root.iterdir()) if (entry / STATE_FILE).exists()]


def _checked_id(container_id: str) -> str:
    if not ID_PATTERN.match(container_id) or container_id in (".", ".."):
        raise OciError(f"invalid id format: {container_id}")
    return container_id


def _alive(pid: int, start: int | None) -> bool:
    """Whether pid is still the container's init: running (not a zombie) and started when it did."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0] not in ("Z", "X") and (start is None or int(fields[19]) == start)


def _start_time(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[19])


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def cgroup_location(cgroups_path: str, container_id: str, systemd: bool) -> tuple[Path | None, str]:
    """(the parent cgroup's directory, the container cgroup's name) for linux.cgroupsPath: an absolute
    path below the cgroup2 mount, a relative one below our own cgroup, or with --systemd-cgroup
    "slice:prefix:name" (the slice's path spelled out, the unit <prefix>-<name>.scope); with none, the
    id below cgctl's root (None)."""
    unified = fs.open_unified_root(())
    if systemd:
        parts = cgroups_path.split(":") if cgroups_path else ["", "cgctl", container_id]
        if len(parts) != 3:
            raise OciError(
                f'expected cgroupsPath to be of format "slice:prefix:name" for systemd cgroups, '
                f"got {cgroups_path!r}"
            )
        slice_name, prefix, name = parts
        directory = unified.path
        slice_name = slice_name or "system.slice"
        if slice_name != "-.slice":
            stem = slice_name.removesuffix(".slice")
            words = stem.split("-")
            for end in range(1, len(words) + 1):
                directory /= "-".join(words[:end]) + ".slice"
        unit = name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
        return directory, unit
    if not cgroups_path:
        return None, container_id
    path = Path(cgroups_path)
    base = unified.path if path.is_absolute() else fs.own_cgroup(unified).path
    full = Path(os.path.normpath(base / path.relative_to("/") if path.is_absolute() else base / path))
    if full == unified.path or unified.path not in full.parents:
        raise OciError(f"cgroupsPath {cgroups_path!r}: not a cgroup below {unified.path}")
    return full.parent, full.name


@dataclass(frozen=True)
class Options:
    """How `create`, `run` and `restore` were asked to make a container (runc's flags)."""

    console_socket: str | None = None
    pid_file: Path | None = None
    systemd_cgroup: bool = False
    state_dir: Path | None = None  # cgctl's run records
    policies: PolicySet | None = None  # default: the policy directory's
    adopt: bool = False  # the init becomes our child (`run` and `restore` without --detach wait for it)


def create(
    root: Path, container_id: str, bundle_dir: Path, options: Options, restoring: CriuOptions | None = None
) -> tuple[Container, int | None]:
    """Create the container (see the module's docstring), or with restoring restore a checkpoint
    into it (running at once); on any failure nothing is left. With a terminal and no console
    socket (`run`), the terminal's master comes back for the caller to relay."""
    from cgctl.runtime import bundle as bundles

    container = Container(root, _checked_id(container_id))
    root.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        container.directory.mkdir(mode=0o711)
    except FileExistsError:
        raise OciError(f"container with id exists: {container_id}") from None
    try:
        try:
            loaded = bundles.load(bundle_dir, container_id, container.directory / "seccomp.json")
        except bundles.BundleError as error:
            raise OciError(str(error)) from None
        if loaded.spec.tty and options.console_socket is None and not options.adopt:
            raise OciError("cannot allocate tty if runc will detach without setting console socket")
        if options.console_socket is not None and not loaded.spec.tty:
            raise OciError("cannot use console socket if runc will not detach or allocate tty")
        master = _create(container, loaded, options, restoring)
    except BaseException:
        shutil.rmtree(container.directory, ignore_errors=True)
        raise
    return container, master


def _create(
    container: Container, loaded: Bundle, options: Options, restoring: CriuOptions | None
) -> int | None:
    from cgctl import policy
    from cgctl.runtime import checkpoint, hooks, oci_checkpoint, spawn, supervisor
    from cgctl.spec import SpecError

    if loaded.seccomp:
        durable.write_json(container.directory / "seccomp.json", loaded.seccomp)
    saved: dict[str, Any] = {
        "id": container.id,
        "bundle": str(loaded.directory),
        "rootfs": str(loaded.root),
        "created": _now(),
        "owner": "",
        "annotations": loaded.annotations,
        "hooks": {kind: [dataclasses.asdict(hook) for hook in found] for kind, found in loaded.hooks.items()},
    }
    state_path = container.directory / STATE_FILE
    try:
        policies = options.policies or policy.load_directory(policy.default_directory())
        spec, noted = policy.apply_to(loaded.spec, container.id, policies)
        parent, name = cgroup_location(loaded.cgroups_path, container.id, options.systemd_cgroup)
        confinement = supervisor.plan_sandbox(spec)
        durable.write_json(state_path, saved)  # the run record points here: the name is the container's
        with supervisor.prepared_root(spec) as root_plan, policy.blamed(noted):
            record = {**noted, "oci": {"state": str(state_path)}}
            created = supervisor.create(spec, parent, options.state_dir, record, cgroup_name=name)
            saved["cgroup"] = str(created.group.path)
            durable.write_json(state_path, saved)
            try:
                if restoring is None:
                    launch = supervisor.launch_for(
                        spec, container.id, created.group, confinement, root_plan, spec.env, _size(spec.tty)
                    )
                    master = _hold(container, loaded, launch, created, saved, options)
                else:
                    stdio = {0: 0, 1: 1, 2: 2}
                    pid = oci_checkpoint.restore(created.group, loaded.root, loaded.config, restoring, stdio)
                    _record_pid(container, saved, created.claim.path, pid, options.pid_file)
                    master = None
            except BaseException:
                fs.remove(created.group)
                created.claim.release()
                raise
            created.claim.hand_over()
            return master
    except (
        SpecError,
        spawn.SpawnError,
        hooks.HookError,
        checkpoint.CheckpointError,
        fs.CgroupError,
        policy.PolicyError,
        OSError,
    ) as error:
        raise OciError(str(error)) from None


def _size(tty: bool) -> tuple[int, int] | None:
    from cgctl.ns import console

    return console.UNKNOWN_SIZE if tty else None


def _hold(
    container: Container,
    loaded: Bundle,
    launch: spawn.Launch,
    created: supervisor.Created,
    saved: dict[str, Any],
    options: Options,
) -> int | None:
    """Start the init held before exec (Launch.hold), after the prestart and createRuntime hooks, and
    record it; returns the terminal's master if the caller relays it."""
    from cgctl.runtime import hooks, spawn

    launch = dataclasses.replace(
        launch,
        hold=str(container.directory / FIFO),
        start_hooks=tuple(loaded.hooks.get("startContainer", [])),
    )
    os.mkfifo(container.directory / FIFO, 0o600)

    def before_go(pid: int) -> None:
        early = {**container_state(container, saved), "status": "creating", "pid": pid}
        for kind in ("prestart", "createRuntime"):
            hooks.run(kind, loaded.hooks.get(kind, []), early)

    started = spawn.start(launch, adopt=options.adopt, before_go=before_go)
    assert started.alive_fd is not None
    relayed = started.master is not None and options.console_socket is None
    try:
        if started.master is not None and options.console_socket:
            send_console(options.console_socket, started.master)
        _record_pid(container, saved, created.claim.path, started.pid, options.pid_file)
        ready = {**container_state(container, saved), "status": "created", "pid": started.pid}
        os.write(started.alive_fd, b"ok" + json.dumps(ready).encode())
    finally:
        os.close(started.alive_fd)
        if started.master is not None and not relayed:
            os.close(started.master)
    return started.master if relayed else None


def _record_pid(
    container: Container, saved: dict[str, Any], record: Path, pid: int, pid_file: Path | None
) -> None:
    """The init's pid in state.json (with its start time, against pid reuse), the run record and the
    caller's pid file."""
    saved.update(pid=pid, pid_start=_start_time(pid))
    durable.write_json(container.directory / STATE_FILE, saved)
    state.update(record, pid=pid)
    if pid_file is not None:
        write_pid_file(pid_file, pid)


def container_state(container: Container, saved: dict[str, Any]) -> dict[str, Any]:
    return {
        "ociVersion": OCI_VERSION,
        "id": container.id,
        "status": "creating",
        "bundle": saved["bundle"],
        "annotations": saved.get("annotations", {}),
    }


def send_console(path: str, master: int) -> None:
    """Hand the terminal's master to the caller's --console-socket, as runc does (SCM_RIGHTS)."""
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(path)
        except OSError as error:
            raise OciError(f"--console-socket {path}: cannot connect: {error.strerror}") from None
        socket.send_fds(sock, [b"/dev/ptmx"], [master])


def write_pid_file(path: Path, pid: int) -> None:
    """Written whole or not at all: the shim reads it as soon as create returns."""
    partial = path.with_name(f".{path.name}.tmp")
    partial.write_text(str(pid))
    partial.rename(path)


def start(container: Container) -> None:
    """Let the created container's init exec its process, and run the poststart hooks."""
    from cgctl.runtime import hooks

    saved = container.saved()
    status = container.status(saved)
    if status == "stopped":
        raise OciError("cannot start a container that has stopped")
    if status in ("running", "paused"):
        raise OciError("cannot start an already running container")
    if status != "created":
        raise OciError(f"cannot start a container in the {status} state")
    fifo = container.directory / FIFO
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENXIO: no reader, the init is gone
        raise OciError("cannot start a container that has stopped") from None
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)
    fifo.unlink(missing_ok=True)
    try:
        hooks.run("poststart", _hooks(saved, "poststart"), container.state())
    except hooks.HookError as error:
        kill(container, signal.SIGKILL, all_processes=True)
        raise OciError(str(error)) from None


def _hooks(saved: dict[str, Any], kind: str) -> list[Any]:
    from cgctl.runtime.hooks import Hook

    return [Hook(**entry) for entry in saved.get("hooks", {}).get(kind, [])]


def parse_signal(name: str) -> int:
    """SIGTERM, TERM, term or 15, as runc takes them."""
    text = name.strip().upper()
    if text.isdigit():
        number = int(text)
        if not 0 < number < signal.NSIG:
            raise OciError(f"invalid signal: {name}")
        return number
    try:
        return int(signal.Signals[text if text.startswith("SIG") else f"SIG{text}"])
    except KeyError:
        raise OciError(f"invalid signal: {name}") from None


def kill(container: Container, sig: int, all_processes: bool = False) -> None:
    """Signal the init (or with all_processes every process of the cgroup); runc's "container not
    running" for a stopped one."""
    saved = container.saved()
    status = container.status(saved)
    group = fs.Cgroup(Path(saved["cgroup"]))
    if all_processes:
        if sig == signal.SIGKILL and group.path.exists():
            group.write("cgroup.kill", "1")
            return
        for pid in group.pids() if group.path.exists() else []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return
    if status not in ("created", "running", "paused"):
        raise OciError("container not running")
    os.kill(int(saved["pid"]), sig)


def delete(container: Container, force: bool = False, state_dir: Path | None = None) -> None:
    """Remove a stopped (or created) container, or with force any: its processes killed, its cgroup
    removed, poststop hooks run, its records gone."""
    from cgctl.runtime import hooks

    saved = container.saved()
    status = container.status(saved)
    if status in ("running", "paused") and not force:
        raise OciError(f"cannot delete container {container.id} that is not stopped: {status}")
    stopped = {**container.state(), "status": "stopped"}
    if "cgroup" in saved:
        try:
            fs.remove(fs.Cgroup(Path(saved["cgroup"])))
        except fs.CgroupError as error:
            raise OciError(str(error)) from None
    problem = None
    try:
        hooks.run("poststop", _hooks(saved, "poststop"), stopped)
    except hooks.HookError as error:
        problem = error  # the container is gone all the same; say so once all is cleaned
    record = state.record_path(state_dir or state.default_state_dir(), container.id)
    with contextlib.suppress(OSError, ValueError):
        if state.read(record).get("oci", {}).get("state") == str(container.directory / STATE_FILE):
            record.unlink()
    shutil.rmtree(container.directory, ignore_errors=True)
    if problem is not None:
        raise OciError(f"the container was deleted, but a poststop hook failed: {problem}")


def set_paused(container: Container, paused: bool) -> None:
    """pause (freeze every process) or resume; runc's errors for the wrong state."""
    status = container.status()
    if paused and status != "running":
        raise OciError("container not running")
    if not paused and status != "paused":
        raise OciError("container not paused")
    try:
        freezer.set_frozen(container.cgroup, paused)
    except fs.CgroupError as error:
        raise OciError(str(error)) from None


def pids(container: Container) -> list[int]:
    """Every process of the container (its cgroup and those below it)."""
    group = container.cgroup
    return group.pids() if group.path.exists() else []
