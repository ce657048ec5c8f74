"""The daemon's containers: detached runs started through the keeper, watched through the kernel's
notifications, restarted by their policy, and found again when the daemon starts.

What survives the daemon: each container's directory under <data dir>/containers/NAME holds its
request (request.json, 0600: it has the environment), what is known of it (container.json: its
attempts, exit statuses, restart count, final accounting), its logs, and exit.json, which the
keeper writes when it reaps the container. A daemon that starts reads them all, asks the keeper
which containers still run, and finishes those that ended while it was away from their exit.json;
a status nobody recorded (the keeper died too) is marked unknown, never made up.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import logging
import os
import queue
import secrets
import shutil
import signal as signals
import socket
import threading
import time
from collections import deque
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgctl import durable, policy, state
from cgctl.cgroup import fs
from cgctl.daemon.keeper import KeeperClient
from cgctl.daemon.policies import PolicyEngine
from cgctl.daemon.watch import CgroupWatcher
from cgctl.metrics import render_processes
from cgctl.ns import console
from cgctl.runtime import logs, supervisor
from cgctl.runtime.api import (
    Attempt,
    BadGateway,
    CheckpointRequest,
    CheckpointResult,
    CommitRequest,
    Conflict,
    Container,
    CreateRequest,
    Event,
    EventType,
    Explanation,
    Failure,
    ImportRequest,
    Info,
    Invalid,
    NotFound,
    PolicyPlan,
    PolicyStatus,
    ProcessRow,
    PullRequest,
    PushRequest,
    PushResult,
    RegistryRequest,
    ReloadResult,
    RestoreRequest,
    SaveRequest,
    parse_signal,
)
from cgctl.runtime.local import LocalRuntime, has_labels, signal_cgroup
from cgctl.runtime.spawn import SpawnError
from cgctl.spec import ExecSpec, Limits, SpecError

if TYPE_CHECKING:
    from cgctl.runtime.checkpoint import Restoring

log = logging.getLogger("cgctld")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BACKOFF_FIRST = 0.1  # seconds before the first restart; doubled for each quick failure after it
BACKOFF_CAP = 30.0
RESET_AFTER = 10.0  # an attempt that ran this long starts the backoff over
HISTORY = 1000  # events kept for `events --since`
STOPPING_SIGNALS = {"SIGKILL", "SIGTERM", "SIGINT"}  # a kill with these is a stop: no restart


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where the daemon keeps things: the runtime dir (sockets, run records) and the data dir."""

    runtime_dir: Path
    data_dir: Path
    state_dir: Path
    cgroup_root: Path | None = None
    policy_dir: Path | None = None  # default: policy.default_directory()

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "cgctl.sock"

    @property
    def keeper_socket(self) -> Path:
        return self.runtime_dir / "keeper.sock"

    @property
    def containers(self) -> Path:
        return self.data_dir / "containers"


def default_paths() -> Paths:
    """/run/cgctl and /var/lib/cgctl as root; $XDG_RUNTIME_DIR/cgctl and ~/.local/share/cgctl rootless."""
    if os.geteuid() == 0:
        runtime, data = Path("/run/cgctl"), Path("/var/lib/cgctl")
    else:
        runtime = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}") / "cgctl"
        data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "cgctl"
    return Paths(runtime, data, state.default_state_dir())


class Managed:
    """A detached container: what is persisted (info, request) and what lives only in the daemon."""

    def __init__(self, info: Container, request: CreateRequest, directory: Path) -> None:
        self.info, self.request, self.dir = info, request, directory
        self.lock = threading.RLock()  # held while it starts or ends: an exit waits for its start
        self.group: fs.Cgroup | None = None
        self.written: list[str] = []
        self.root = contextlib.ExitStack()  # what its own root needs on the host while it runs
        self.started = 0.0  # monotonic
        self.stopping = False  # stopped or removed by the user: no restart
        self.backoff = 0.0
        self.timer: threading.Timer | None = None
        self.oom_kills = 0
        self.restart_requested = False  # by a policy's action: restart whatever its restart policy

    @property
    def log_path(self) -> Path:
        return self.dir / "container.log"

    @property
    def exit_path(self) -> Path:
        return self.dir / "exit.json"

    def save(self) -> None:
        durable.write_json(self.dir / "container.json", self.info.model_dump(mode="json"))


class Service:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.local = LocalRuntime(paths.state_dir)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified whenever a container starts or ends
        self.containers: dict[str, Managed] = {}
        self.history: deque[Event] = deque(maxlen=HISTORY)
        self.subscribers: list[queue.Queue[Event]] = []
        self.closing = False
        paths.runtime_dir.mkdir(mode=0o711, parents=True, exist_ok=True)  # the socket's group may pass
        for directory in (paths.data_dir, paths.containers):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.keeper_events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.keeper = KeeperClient.connect(paths.keeper_socket, self.keeper_events.put)
        self.watcher = CgroupWatcher(self._cgroup_changed)
        self.engine = PolicyEngine(self, paths.policy_dir or policy.default_directory())
        self._recover()
        if self.engine.status.ok:  # else the containers keep what they have: no set is active
            self.engine.apply_all()
        self.handler = threading.Thread(target=self._handle_keeper_events, name="keeper-events", daemon=True)
        self.handler.start()

    # --- the API's operations ---

    def info(self) -> Info:
        from cgctl import __version__

        with self.lock:
            running = sum(m.info.state in ("running", "frozen") for m in self.containers.values())
            return Info(
                version=__version__,
                pid=os.getpid(),
                containers=len(self.containers),
                running=running,
                cgroup_root=str(self.paths.cgroup_root or ""),
            )

    def create(self, request: CreateRequest, restoring: Restoring | None = None) -> Container:
        """A detached container, started from its command, or from a checkpoint if `restoring`."""
        name = request.spec.name or f"run-{secrets.token_hex(4)}"
        directory = self.paths.containers / name
        info = Container(
            name=name,
            id=secrets.token_hex(6),
            state="restarting",
            detached=True,
            pid=None,
            cgroup="",
            image=(request.spec.rootfs.image if request.spec.rootfs else None) or "",
            command=request.spec.command,
            labels=request.spec.labels,
            created_at=time.time(),
            restart_policy=request.restart,
            spec=request.spec.model_dump(mode="json", exclude={"env"}),
        )
        managed = Managed(info, request, directory)
        with self.lock:
            if name in self.containers:
                raise Conflict(f"the name {name!r} is taken by a container (`cgctl rm {name}` frees it)")
            self.containers[name] = managed
        try:
            with managed.lock:
                directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._save_request(managed)
                self.emit("create", name)
                self._start(managed, restoring)
        except BaseException:
            with self.lock:
                del self.containers[name]
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return self._view(managed)

    def list(self, all: bool = False, labels: dict[str, str] | None = None) -> list[Container]:
        with self.lock:
            mine = [self._view(m) for m in self.containers.values()]
        names = {m.name for m in mine}
        foreground = [c for c in self.local.list(labels=labels) if c.name not in names]
        shown = [c for c in mine if (all or c.state != "exited") and has_labels(c, labels)]
        return sorted(shown + foreground, key=lambda c: c.created_at)

    def inspect(self, name: str) -> Container:
        with self.lock:
            managed = self.containers.get(name)
            if managed is not None:
                return self._view(managed)
        return self.local.inspect(name)

    def freeze(self, name: str, timeout: float) -> bool:
        changed = self.local.freeze(name, timeout)
        if changed and name not in self.containers:  # detached ones are told by the watcher
            self.emit("freeze", name)
        return changed

    def thaw(self, name: str, timeout: float) -> bool:
        changed = self.local.thaw(name, timeout)
        if changed and name not in self.containers:
            self.emit("thaw", name)
        return changed

    def kill(self, name: str, signal_name: str) -> int:
        sig = parse_signal(signal_name)
        managed = self.containers.get(name)
        if managed is not None and sig.name in STOPPING_SIGNALS:
            with managed.lock:
                managed.stopping = True
                self._cancel_restart(managed)
                if managed.info.state == "restarting":
                    self._ended_for_good(managed, restarted=False)
                    return 0
        return self.local.kill(name, sig.name)

    def update(self, name: str, limits: dict[str, dict[str, Any]]) -> dict[str, str]:
        managed = self.containers.get(name)
        if managed is None:
            written = self.local.update(name, limits)
        else:
            with managed.lock:  # its run record stays until _finish, which takes this lock
                written = self.local.update(name, limits)
                # The next attempt starts with the explicit limits the record has now (only those:
                # its policies' are resolved again at each start).
                explicit = state.read(state.record_path(self.paths.state_dir, name))["explicit"]
                spec = managed.request.spec.model_copy(update={"limits": Limits.model_validate(explicit)})
                managed.request = managed.request.model_copy(update={"spec": spec})
                self._save_request(managed)
                managed.info.spec = spec.model_dump(mode="json", exclude={"env"})
                managed.save()
                if managed.group is not None:
                    self.engine.arm(managed)  # what `update` set explicitly is no longer the policy's
        self.emit("update", name, dict(written))
        return written

    def top(self, name: str) -> builtins.list[ProcessRow]:
        """The processes of a running container, detached or foreground (the keeper holds a detached
        one's run record, so the local runtime finds both); one of ours that is not running says so."""
        managed = self.containers.get(name)
        if managed is not None and managed.info.state not in ("running", "frozen"):
            raise Conflict(f"{name!r} is {managed.info.state}, not running: it has no processes to show")
        return self.local.top(name)

    def wait(self, name: str, timeout: float | None = None) -> Container:
        """Block until the container's current attempt ends (or timeout); returns it as it is then."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            managed = self._managed(name)
            attempt = len(managed.info.attempts)

            def ended() -> bool:
                # _finish (under the container's lock, not this one) records the attempt's end first
                # and changes the state last: an ended attempt is one with both.
                info = managed.info
                if attempt == 0 or len(info.attempts) > attempt:
                    return True
                return info.attempts[-1].finished_at is not None and info.state not in ("running", "frozen")

            while not ended():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self.changed.wait(remaining)
            return self._view(managed)

    def remove(self, name: str, force: bool = False) -> None:
        managed = self.containers.get(name)
        if managed is None:
            if any(c.name == name for c in self.local.list()):
                raise Conflict(
                    f"{name!r} is a foreground run, owned by its `cgctl run`: stop it with cgctl kill"
                )
            raise NotFound(f"no container named {name!r}")
        with managed.lock:
            running = managed.info.state in ("running", "frozen")
            if running and not force:
                raise Conflict(f"{name!r} is running: stop it first, or `cgctl rm -f {name}` kills it")
            managed.stopping = True
            self._cancel_restart(managed)
            if running and managed.group is not None:
                with contextlib.suppress(fs.CgroupError):
                    signal_cgroup(managed.group, parse_signal("KILL"))
        with self.changed:
            deadline = time.monotonic() + 30
            while managed.info.state in ("running", "frozen") and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())
            if managed.info.state in ("running", "frozen"):
                raise Failure(f"{name!r} did not end within 30 s of SIGKILL; nothing was removed")
        with managed.lock:  # taken after _finish, which holds it while it writes the container's files
            with self.lock:
                if self.containers.get(name) is managed:
                    del self.containers[name]
            shutil.rmtree(managed.dir, ignore_errors=True)
        self.engine.forget(name)
        self.emit("remove", name)

    def attach(self, name: str, replay: bool = False) -> tuple[socket.socket, dict[str, Any]]:
        """A stream from the keeper (keeper.py's attach protocol): the container's output from now
        (with replay, its terminal's latest 64 KiB first), and back to it keystrokes and window size.
        Returns it with {"tty": ..., "stdin": ...}."""
        managed = self._managed(name)
        if managed.info.state not in ("running", "frozen"):
            raise Conflict(f"{name} is {managed.info.state}, not running: attach needs a running container")
        return self._stream({"op": "attach", "name": name, "replay": replay})

    def exec(
        self, name: str, spec: ExecSpec, size: tuple[int, int] | None
    ) -> tuple[socket.socket, dict[str, Any]]:
        """Start spec's process in the running container, as the keeper's child (so the daemon's
        threads need not reap it), and return the stream of its output and then its status."""
        from cgctl.runtime import exec as execution

        try:
            target = execution.prepare(self.paths.state_dir, name, spec)
        except LookupError as error:
            raise NotFound(str(error)) from None
        terminal = (size or console.UNKNOWN_SIZE) if spec.tty else None
        message = {"op": "exec", "name": name, "target": target, "terminal": terminal}
        return self._stream({**message, "tty": spec.tty, "interactive": spec.interactive})

    def _stream(self, message: dict[str, Any]) -> tuple[socket.socket, dict[str, Any]]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            reply = self.keeper.request(message, fds=(theirs.fileno(),))
        except ConnectionError:
            reply = {"ok": False, "error": "the keeper is gone", "exit_code": 125}
        finally:
            theirs.close()
        if not reply["ok"]:
            ours.close()
            if message["op"] == "exec":
                raise SpawnError(reply["error"], reply.get("exit_code", 125))
            raise Conflict(reply["error"])
        return ours, reply

    def logs(
        self,
        name: str,
        tail: int | None = None,
        since: datetime | None = None,
        follow: bool = False,
        streams: frozenset[str] = frozenset({"stdout", "stderr"}),
    ) -> Iterator[logs.LogLine]:
        managed = self._managed(name)

        def ended() -> bool:
            return self.closing or self.containers.get(name) is not managed or managed.info.state == "exited"

        # Following starts before the past is read, so nothing written in between is missed; what
        # both see is skipped by time.
        new = logs.follow(managed.log_path, since=since, streams=streams, stop=ended) if follow else iter(())
        past = logs.read(managed.log_path, tail=tail, since=since, streams=streams)
        yield from past
        seen = past[-1].time if past else None
        yield from (line for line in new if seen is None or line.time > seen)

    def events(self, since: float | None = None, until: float | None = None) -> Iterator[Event]:
        """Past events from `since` on, then new ones as they happen until `until` (None: forever)."""
        subscription: queue.Queue[Event] = queue.Queue()
        with self.lock:
            past = [event for event in self.history if since is not None and event.time >= since]
            self.subscribers.append(subscription)
        try:
            yield from (event for event in past if until is None or event.time <= until)
            while not self.closing and (until is None or time.time() < until):
                try:
                    event = subscription.get(timeout=1.0)
                except queue.Empty:
                    continue
                if until is not None and event.time > until:
                    return
                yield event
        finally:
            with self.lock:
                self.subscribers.remove(subscription)

    def metrics(self) -> str:
        """What /metrics shows beside the containers: the policies' rows, and the daemon's and its
        keeper's processes."""
        return self.engine.metrics() + render_processes({"daemon": os.getpid(), "keeper": self.keeper.pid})

    def policy_status(self) -> PolicyStatus:
        return self.engine.status

    def policy_reload(self) -> ReloadResult:
        return self.engine.reload()

    def policy_diff(self, directory: str | None = None) -> builtins.list[PolicyPlan]:
        return self.engine.diff(Path(directory) if directory else None)

    def explain(self, name: str) -> Explanation:
        self.inspect(name)
        return self.engine.explain(name)

    def checkpoint(self, name: str, request: CheckpointRequest) -> CheckpointResult:
        """Dump the container with CRIU (docs/checkpoint.md); unless left running, it then ends, and its
        attempt says where it went (it is not restarted)."""
        self.inspect(name)
        managed = self.containers.get(name)
        if managed is not None and not request.leave_running:
            managed.stopping = True
        try:
            done = self.local.checkpoint(name, request)
        except (Failure, SpecError):
            if managed is not None:
                managed.stopping = False
            raise
        self.emit("checkpoint", name, {"dir": request.dir, "left_running": str(done.left_running).lower()})
        return done

    def restore(self, request: RestoreRequest) -> Container:
        """Restore a checkpoint as a new detached container (restart policy "no"): CRIU runs in the
        keeper, which becomes the restored tree's parent and logs its output."""
        from cgctl.runtime.checkpoint import CheckpointError, open_checkpoint

        try:
            restoring = open_checkpoint(
                Path(request.dir), request.name, Path(request.hook) if request.hook else None
            )
        except CheckpointError as error:
            raise Failure(str(error)) from None
        try:
            return self.create(CreateRequest(spec=restoring.spec), restoring)
        except SpawnError as error:
            raise Failure(f"{request.dir}: not restored: {error}") from None

    def images(self) -> builtins.list[dict[str, Any]]:
        """The image records, with where their layers are on this host (what a client's spec names)."""
        from cgctl.images import Store, default_root

        store = Store(default_root())
        return [
            {**record, "layer_dirs": [str(store.layer(diff_id)) for diff_id in record["layers"]]}
            for record in store.images()
        ]

    def import_image(self, request: ImportRequest) -> dict[str, Any]:
        from cgctl.images import ImageError, LayerError, Store, default_root, import_image

        try:
            return import_image(Path(request.path), request.reference, Store(default_root()))
        except ValueError as error:
            raise Invalid(f"invalid value {request.reference!r} for reference: {error}") from None
        except (ImageError, LayerError, OSError) as error:
            raise Invalid(f"{request.path}: not imported: {error}") from None

    def pull(self, request: PullRequest) -> dict[str, Any]:
        """Pull an image into the daemon's store (credentials: the request's, else the daemon's own)."""
        from cgctl.images import Store, default_root
        from cgctl.images.pull import pull

        with _image_errors(request.reference):
            record = pull(request.reference, Store(default_root()), _registry_options(request))
        self.emit("pull", request.reference, {"image": f"{record['name']}:{record['tag']}"})
        return record

    def push(self, request: PushRequest) -> PushResult:
        from cgctl.images import Store, default_root
        from cgctl.images.push import push

        with _image_errors(request.source):
            pushed = push(
                request.source, request.destination, Store(default_root()), _registry_options(request)
            )
        self.emit("push", request.source, {"destination": pushed.reference, "digest": pushed.digest})
        return PushResult(**dataclasses.asdict(pushed))

    def save_image(self, request: SaveRequest) -> dict[str, Any]:
        from cgctl.images import Store, default_root
        from cgctl.images.save import save

        with _image_errors(request.reference):
            size = save(request.reference, Store(default_root()), Path(request.path))
        return {"path": request.path, "size": size}

    def commit(self, name: str, request: CommitRequest) -> dict[str, Any]:
        """A new image: the container's image plus its writes (runtime/commit.py)."""
        from cgctl.runtime.commit import commit

        container = self.inspect(name)
        with _image_errors(request.reference):
            record = commit(container, request.reference, request.message)
        self.emit("commit", name, {"image": f"{record['name']}:{record['tag']}"})
        return record

    def remove_image(self, reference: str) -> builtins.list[str]:
        """Remove an image and the layers no other image uses; refused while a container runs it."""
        from cgctl.images import Store, default_root, parse_reference

        try:
            name, tag = parse_reference(reference)
        except ValueError as error:
            raise Invalid(f"invalid value {reference!r} for reference: {error}") from None
        users = [c.name for c in self.list() if c.image == f"{name}:{tag}"]
        if users:
            raise Conflict(f"{name}:{tag} is in use by the running container {users[0]}: stop it first")
        try:
            return Store(default_root()).remove(reference)
        except LookupError as error:
            raise NotFound(str(error)) from None

    def close(self, stop_timeout: float | None = None) -> None:
        """Stop serving; containers keep running unless stop_timeout is given (SIGTERM, then SIGKILL)."""
        if stop_timeout is not None:
            for managed in list(self.containers.values()):
                managed.stopping = True
                if managed.group is not None and managed.info.state in ("running", "frozen"):
                    with contextlib.suppress(Failure, fs.CgroupError):
                        signal_cgroup(managed.group, parse_signal("TERM"))
            with self.changed:
                deadline = time.monotonic() + stop_timeout
                while self._running() and time.monotonic() < deadline:
                    self.changed.wait(deadline - time.monotonic())
            for managed in self._running():
                with contextlib.suppress(fs.CgroupError):
                    signal_cgroup(managed.group, parse_signal("KILL"))  # type: ignore[arg-type]
            with self.changed:
                deadline = time.monotonic() + 30
                while self._running() and time.monotonic() < deadline:
                    self.changed.wait(deadline - time.monotonic())
        self.closing = True
        for managed in self.containers.values():
            self._cancel_restart(managed)
        self.keeper.close()
        self.watcher.close()
        self.engine.close()

    # --- starting and ending ---

    def _start(self, managed: Managed, restoring: Restoring | None = None) -> None:
        """Start the next attempt, or restore a checkpoint as it (call with managed.lock held). Raises
        SpecError, SpawnError, Failure, fs.CgroupError; nothing is left of a start that failed."""
        name = managed.info.name
        spec = managed.request.spec.model_copy(update={"name": name})
        record: dict[str, Any] = {"detached": True}
        if restoring:  # its limits are the dumped container's, policies and all
            record["restored_from"] = str(restoring.directory)
        else:
            spec, noted = policy.apply_to(spec, name, self.engine.active)
            record.update(noted)
        confinement = None if restoring else supervisor.plan_sandbox(spec)
        root = contextlib.ExitStack()
        try:
            plan = root.enter_context(supervisor.prepared_root(spec))
            with policy.blamed(record):
                created = supervisor.create(spec, self.paths.cgroup_root, self.paths.state_dir, record=record)
        except BaseException:
            root.close()
            raise
        attempt = len(managed.info.attempts) + 1
        how: dict[str, Any]
        if confinement is None:
            how = {"op": "restore", "restoring": restoring, "root": plan, "cgroup": str(created.group.path)}
        else:
            env = {"PATH": DEFAULT_PATH, **spec.env}
            size = managed.request.console_size
            launch = supervisor.launch_for(spec, name, created.group, confinement, plan, env, size)
            how = {
                "op": "start",
                "launch": dataclasses.replace(launch, workdir=spec.workdir or "/"),
                "tty": spec.tty,
                "interactive": spec.interactive,
            }
        try:
            reply = self.keeper.request(
                {
                    **how,
                    "name": name,
                    "attempt": attempt,
                    "exit_path": str(managed.exit_path),
                    "log": {
                        "path": str(managed.log_path),
                        "max_bytes": managed.request.log.max_size,
                        "max_files": managed.request.log.max_files,
                    },
                },
                fds=(created.claim.fd,),
            )
        except BaseException:
            reply = {"ok": False, "error": "the keeper is gone", "exit_code": 125}
        if not reply["ok"]:
            try:
                fs.remove(created.group)
            finally:
                created.claim.release()
                root.close()
            raise SpawnError(reply["error"], reply.get("exit_code", 125))
        os.close(created.claim.fd)  # the keeper holds the record's lock now
        pid = int(reply["pid"])
        state.update(created.claim.path, pid=pid, written=created.written)
        managed.group, managed.written, managed.root = created.group, created.written, root
        managed.started = time.monotonic()
        managed.oom_kills = 0
        managed.info.attempts.append(Attempt(started_at=time.time(), pid=pid))
        managed.info.state, managed.info.pid, managed.info.cgroup = "running", pid, str(created.group.path)
        managed.save()
        self.watcher.add(name, created.group)
        self.engine.arm(managed)
        started = {"pid": str(pid), "attempt": str(attempt)}
        self.emit("start", name, started | ({"restored_from": str(restoring.directory)} if restoring else {}))
        with self.changed:
            self.changed.notify_all()

    def _handle_keeper_events(self) -> None:
        while True:
            message = self.keeper_events.get()
            if self.closing:
                return
            try:
                if message["event"] == "exit":
                    self._exited(message)
                elif message["event"] == "lost":
                    self._keeper_lost()
            except Exception:
                log.exception("handling the keeper's %s event failed", message.get("event"))

    def _exited(self, status: dict[str, Any]) -> None:
        managed = self.containers.get(status["name"])
        if managed is None:
            self._release(status["name"])
            return
        with managed.lock:
            if (
                managed.info.state not in ("running", "frozen")
                or len(managed.info.attempts) != status["attempt"]
            ):
                self._release(status["name"])  # an attempt already finished (at recovery)
                return
            self._finish(managed, status)

    def _keeper_lost(self) -> None:
        """The keeper died, and its containers with it: their status is unknown; start a new keeper."""
        log.error("the keeper died: its containers were killed with it")
        self.keeper = KeeperClient.connect(self.paths.keeper_socket, self.keeper_events.put)
        for managed in list(self.containers.values()):
            with managed.lock:
                if managed.info.state in ("running", "frozen"):
                    self._finish(managed, {"unknown": "the keeper process died (and the container with it)"})

    def _finish(self, managed: Managed, status: dict[str, Any]) -> None:
        """Record how the current attempt ended, read its final accounting, remove its cgroup, and
        restart it if its policy says so (call with managed.lock held)."""
        name = managed.info.name
        self.watcher.remove(name)
        code, signal_number = status.get("exit_code"), status.get("signal")
        wait_status = signal_number if signal_number is not None else (code or 0) << 8
        report = None
        record = state.record_path(self.paths.state_dir, name)
        state.wait_for_checkpoint(record)  # a dump that ended it finishes its record first
        if managed.group is not None and managed.group.path.exists():
            try:
                if "unknown" not in status:
                    wall = time.monotonic() - managed.started
                    report = supervisor.final(
                        managed.request.spec, name, managed.group, record, wait_status, wall, managed.written
                    )
            except (fs.CgroupError, OSError, ValueError) as error:
                log.warning("%s: no final accounting: %s", name, error)
            try:
                fs.remove(managed.group)
            except fs.CgroupError as error:
                log.error("%s: %s", name, error)
        record.unlink(missing_ok=True)
        self._release(name)
        managed.root.close()
        attempt = managed.info.attempts[-1]
        attempt.finished_at = status.get("exited_at", time.time())
        attempt.exit_code, attempt.signal = code, signal_number
        attempt.oom_killed = bool(report and report.oom_killed)
        attempt.status_known = "unknown" not in status
        attempt.ended = _ended(attempt, status.get("unknown"))
        if report is not None and report.checkpointed_to:  # by the API or by `cgctl checkpoint` alike
            attempt.ended = f"checkpointed to {report.checkpointed_to}"
            managed.stopping = True  # it lives on in its images: no restart
        managed.info.report = report
        managed.info.pid = None
        self.emit("exit", name, _exit_attributes(attempt))
        self.engine.ended(managed, _exit_attributes(attempt), attempt.oom_killed and managed.oom_kills == 0)
        restart = self._should_restart(managed, attempt)
        if restart:
            quick = time.monotonic() - managed.started < RESET_AFTER
            managed.backoff = (
                min(managed.backoff * 2, BACKOFF_CAP) if quick and managed.backoff else BACKOFF_FIRST
            )
            managed.info.state = "restarting"
            managed.save()
            managed.timer = threading.Timer(managed.backoff, self._restart, (managed, attempt.ended))
            managed.timer.daemon = True
            managed.timer.start()
        else:
            self._ended_for_good(managed, restarted=False)
        managed.exit_path.unlink(missing_ok=True)
        with self.changed:
            self.changed.notify_all()

    def _ended_for_good(self, managed: Managed, restarted: bool) -> None:
        managed.info.state = "exited"
        managed.save()
        if managed.request.auto_remove and not restarted:
            with self.lock:
                self.containers.pop(managed.info.name, None)
            shutil.rmtree(managed.dir, ignore_errors=True)
            self.engine.forget(managed.info.name)
            self.emit("remove", managed.info.name)
        with self.changed:
            self.changed.notify_all()

    def _should_restart(self, managed: Managed, attempt: Attempt) -> bool:
        restart = managed.info.restart_policy
        requested, managed.restart_requested = managed.restart_requested, False
        if managed.stopping or self.closing:
            return False
        if requested or restart.name == "always" or restart.name == "unless-stopped":
            return True
        if restart.name == "on-failure":
            failed = attempt.exit_status != 0
            return failed and (
                restart.max_retries is None or managed.info.restart_count < restart.max_retries
            )
        return False

    def _restart(self, managed: Managed, reason: str) -> None:
        with managed.lock:
            if managed.stopping or self.closing or self.containers.get(managed.info.name) is not managed:
                return
            managed.info.restart_count += 1
            self.emit(
                "restart",
                managed.info.name,
                {
                    "reason": reason,
                    "backoff_seconds": f"{managed.backoff:g}",
                    "restart_count": str(managed.info.restart_count),
                },
            )
            try:
                self._start(managed)
            except Exception as error:
                log.error("%s: restart failed: %s", managed.info.name, error)
                managed.info.attempts.append(
                    Attempt(
                        started_at=time.time(),
                        finished_at=time.time(),
                        status_known=False,
                        ended=f"could not start: {error}",
                    )
                )
                self._ended_for_good(managed, restarted=False)

    def restart_now(self, managed: Managed) -> None:
        """A policy's restart action: end the running attempt and start the next, whatever the restart
        policy; a container that has already ended is started again."""
        with managed.lock:
            if managed.stopping or self.closing or self.containers.get(managed.info.name) is not managed:
                return
            if managed.info.state in ("running", "frozen") and managed.group is not None:
                managed.restart_requested = True
                with contextlib.suppress(fs.CgroupError):
                    signal_cgroup(managed.group, parse_signal("KILL"))
            elif managed.info.state == "exited":
                managed.info.state = "restarting"
                managed.save()
                managed.timer = threading.Timer(0, self._restart, (managed, "a policy's restart action"))
                managed.timer.daemon = True
                managed.timer.start()

    def _save_request(self, managed: Managed) -> None:
        """request.json keeps only what was given (exclude_unset): its explicit limits stay told apart
        from its policies' across daemon restarts."""
        durable.write_json(
            managed.dir / "request.json", managed.request.model_dump(mode="json", exclude_unset=True)
        )

    def _cancel_restart(self, managed: Managed) -> None:
        if managed.timer is not None:
            managed.timer.cancel()
            managed.timer = None

    def _release(self, name: str) -> None:
        """Let the keeper close the run record's lock of an ended attempt."""
        with contextlib.suppress(ConnectionError, OSError):
            self.keeper.request({"op": "release", "name": name})

    def _cgroup_changed(self, name: str, file: str) -> None:
        managed = self.containers.get(name)
        if managed is None or managed.group is None:
            return
        group = managed.group
        try:
            if file == "cgroup.events":
                frozen = group.read_keyed("cgroup.events").get("frozen", 0) == 1
                if managed.info.state in ("running", "frozen") and frozen != (managed.info.state == "frozen"):
                    managed.info.state = "frozen" if frozen else "running"
                    self.emit("freeze" if frozen else "thaw", name)
            elif file == "memory.events":
                events = group.read_keyed("memory.events")
                kills = events.get("oom_kill", 0) - events.get("oom_group_kill", 0)
                new_kills = kills > managed.oom_kills
                if new_kills:
                    managed.oom_kills = kills
                    self.emit("oom", name, {"oom_kills": str(kills)})
                self.engine.memory_events(managed, new_kills)
            else:
                self.engine.file_changed(managed, file)
        except fs.CgroupError:
            pass  # the cgroup went away meanwhile: its exit tells the rest

    # --- recovery ---

    def _recover(self) -> None:
        """Find every container again after a (re)start of the daemon; see the module's docstring."""
        listing = self.keeper.request({"op": "list"})
        if self.paths.cgroup_root is None and listing.get("cgroup_root"):
            # Containers go where the keeper is (under systemd: its delegated scope, not cgctld.service).
            self.paths = dataclasses.replace(self.paths, cgroup_root=Path(listing["cgroup_root"]))
        for directory in sorted(self.paths.containers.iterdir()):
            try:
                info = Container.model_validate_json((directory / "container.json").read_text())
                request = CreateRequest.model_validate_json((directory / "request.json").read_text())
            except (OSError, ValueError) as error:
                log.error("%s: cannot read this container's state, left as it is: %s", directory, error)
                continue
            managed = Managed(info, request, directory)
            self.containers[info.name] = managed
            with managed.lock:
                self._recover_one(managed, listing["running"].get(info.name))
        for name in listing["finished"]:
            if name not in self.containers or self.containers[name].info.state == "exited":
                self._release(name)
        state.clean_stale(self.paths.state_dir)
        self._remove_stale_cgroups()

    def _recover_one(self, managed: Managed, running: dict[str, int] | None) -> None:
        info = managed.info
        if info.state == "restarting":
            managed.timer = threading.Timer(0, self._restart, (managed, "the daemon restarted"))
            managed.timer.daemon = True
            managed.timer.start()
            return
        if info.state not in ("running", "frozen"):
            return
        managed.group = fs.Cgroup(Path(info.cgroup))
        last = info.attempts[-1]
        managed.started = time.monotonic() - (time.time() - last.started_at)
        if running is not None and running["attempt"] == len(info.attempts):
            self.watcher.add(info.name, managed.group)
            with contextlib.suppress(fs.CgroupError, ValueError):
                events = managed.group.read_keyed("memory.events")
                managed.oom_kills = events.get("oom_kill", 0) - events.get("oom_group_kill", 0)
            self._cgroup_changed(info.name, "cgroup.events")
            return
        try:
            status = dict(json.loads(managed.exit_path.read_text()))
        except (OSError, ValueError):
            status = {}
        if status.get("attempt") == len(info.attempts):
            self._finish(managed, status)
        else:
            self._finish(managed, {"unknown": "it ended while neither the daemon nor its keeper was running"})

    def _remove_stale_cgroups(self) -> None:
        """Empty cgroups in cgctl's subtree that no run record names (left by a crash) are removed."""
        try:
            unified = fs.open_unified_root(fs.SUPPORTED_CONTROLLERS)
            root = fs.Cgroup(fs.choose_root(unified, self.paths.cgroup_root))
        except fs.CgroupError:
            return
        if not root.path.is_dir():
            return
        named = {c.cgroup for c in self.local.list()} | {m.info.cgroup for m in self.containers.values()}
        for child in root.path.iterdir():
            if not child.is_dir() or child.name == fs.SUPERVISOR_LEAF or str(child) in named:
                continue
            with contextlib.suppress(OSError, fs.CgroupError):
                if not fs.Cgroup(child).populated() and not any(p.is_dir() for p in child.iterdir()):
                    child.rmdir()
                    log.info("removed the stale empty cgroup %s", child)

    # --- helpers ---

    def _managed(self, name: str) -> Managed:
        managed = self.containers.get(name)
        if managed is None:
            if any(c.name == name for c in self.local.list()):
                raise Conflict(
                    f"{name!r} is a foreground run: its output and status go to its own `cgctl run`"
                )
            raise NotFound(f"no container named {name!r}")
        return managed

    def _running(self) -> builtins.list[Managed]:
        return [m for m in self.containers.values() if m.info.state in ("running", "frozen")]

    def _view(self, managed: Managed) -> Container:
        return managed.info.model_copy(deep=True)

    def emit(self, type: EventType, name: str, attributes: dict[str, str] | None = None) -> None:
        event = Event(time=time.time(), type=type, name=name, attributes=attributes or {})
        with self.lock:
            self.history.append(event)
            for subscriber in self.subscribers:
                subscriber.put(event)
        log.info("%s %s %s", type, name, " ".join(f"{k}={v}" for k, v in event.attributes.items()))


def _ended(attempt: Attempt, unknown: str | None) -> str:
    if unknown:
        return f"exit status unknown: {unknown}"
    if attempt.oom_killed:
        return "OOM killed" + (f" (exit status {attempt.exit_status})" if attempt.exit_status else "")
    if attempt.signal is not None:
        return f"killed by {signals.Signals(attempt.signal).name}"
    return f"exited with {attempt.exit_code}"


def _exit_attributes(attempt: Attempt) -> dict[str, str]:
    attributes = {"reason": attempt.ended, "status_known": str(attempt.status_known).lower()}
    if attempt.exit_code is not None:
        attributes["exit_code"] = str(attempt.exit_code)
    if attempt.signal is not None:
        attributes["signal"] = str(attempt.signal)
    if attempt.oom_killed:
        attributes["oom_killed"] = "true"
    return attributes


@contextlib.contextmanager
def _image_errors(reference: str) -> Iterator[None]:
    """The image layer's errors as the API's: a bad reference or image 400, a missing one 404, a
    registry that refused or cannot be reached 502."""
    from cgctl.images import ImageError, LayerError
    from cgctl.images.registry import RegistryError

    try:
        yield
    except ValueError as error:
        raise Invalid(f"invalid value {reference!r} for reference: {error}") from None
    except LookupError as error:
        raise NotFound(str(error)) from None
    except RegistryError as error:
        raise BadGateway(str(error)) from None
    except (ImageError, LayerError, OSError) as error:
        raise Invalid(f"{reference}: {error}") from None


def _registry_options(request: RegistryRequest) -> Any:
    """How the daemon reaches registries for a request: its CA and insecure list, and the client's
    credentials if it sent some, else those of the daemon's own user."""
    from cgctl.images import auth
    from cgctl.images.registry import Options

    given = request.auth
    sent = (given.username, given.password.get_secret_value()) if given else None
    return Options(
        tls_ca=Path(request.tls_ca) if request.tls_ca else None,
        insecure=frozenset(request.insecure_registries),
        credentials=lambda registry: sent or auth.lookup(registry),
    )
