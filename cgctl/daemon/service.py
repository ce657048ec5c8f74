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
import logging
import os
import queue
import secrets
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgctl import policy, state
from cgctl.cgroup import fs
from cgctl.daemon import attempts, recovery, streams
from cgctl.daemon.events import EventLog
from cgctl.daemon.images import Images
from cgctl.daemon.keeper import KeeperClient
from cgctl.daemon.managed import Managed
from cgctl.daemon.paths import Paths
from cgctl.daemon.policies import Hooks, PolicyEngine
from cgctl.daemon.restarts import STOPPING_SIGNALS, Restarts
from cgctl.daemon.streams import log_lines
from cgctl.daemon.watch import CgroupWatcher
from cgctl.metrics import render_processes
from cgctl.netspec import PortMapping
from cgctl.runtime import logs
from cgctl.runtime.api import (
    Attempt,
    CheckpointRequest,
    CheckpointResult,
    Conflict,
    Container,
    CreateRequest,
    Explanation,
    Failure,
    Info,
    NotFound,
    ProcessRow,
    RestoreRequest,
    parse_signal,
)
from cgctl.runtime.local import LocalRuntime, has_labels, signal_cgroup
from cgctl.runtime.spawn import SpawnError
from cgctl.spec import ExecSpec, Limits, SpecError

if TYPE_CHECKING:
    from cgctl.runtime.checkpoint import Restoring

log = logging.getLogger("cgctld")


class Service:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.local = LocalRuntime(paths.state_dir)
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)  # notified whenever a container starts or ends
        self.containers: dict[str, Managed] = {}
        self.feed = EventLog()
        self.emit = self.feed.emit
        self.closing = False
        paths.runtime_dir.mkdir(mode=0o711, parents=True, exist_ok=True)  # the socket's group may pass
        for directory in (paths.data_dir, paths.containers):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.keeper_events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.keeper = KeeperClient.connect(paths.keeper_socket, self.keeper_events.put)
        self.watcher = CgroupWatcher(self._cgroup_changed)
        self.restarts = Restarts(self._start, self._ended_for_good, self._current, self.emit)
        self.images = Images(self.emit, self.list, self.inspect)
        hooks = Hooks(
            emit=self.emit,
            find=self.containers.get,
            watch=self.watcher.add,
            freeze=self.freeze,
            thaw=self.thaw,
            kill=self.local.kill,
            restart=self.restarts.now,
        )
        self.engine = PolicyEngine(hooks, paths.state_dir, paths.policy_dir or policy.default_directory())
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
                managed.save_request()
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
                self.restarts.cancel(managed)
                if managed.info.state == "restarting":
                    self._ended_for_good(managed)
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
                managed.save_request()
                managed.info.spec = spec.model_dump(mode="json", exclude={"env"})
                managed.save()
                if managed.group is not None:
                    self.engine.arm(managed)  # what `update` set explicitly is no longer the policy's
        self.emit("update", name, dict(written))
        return written

    def port(self, name: str) -> builtins.list[PortMapping]:
        """A running container's published ports (none once it has ended)."""
        container = self.inspect(name)
        running = container.state in ("running", "frozen")
        return container.network.ports if running and container.network else []

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
        managed = self._managed(name, ", owned by its `cgctl run`: stop it with cgctl kill")
        with managed.lock:
            running = managed.info.state in ("running", "frozen")
            if running and not force:
                raise Conflict(f"{name!r} is running: stop it first, or `cgctl rm -f {name}` kills it")
            managed.stopping = True
            self.restarts.cancel(managed)
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
        """A stream from the keeper: see streams.attach."""
        return streams.attach(self.keeper, self._managed(name), replay)

    def exec(
        self, name: str, spec: ExecSpec, size: tuple[int, int] | None
    ) -> tuple[socket.socket, dict[str, Any]]:
        """A process started in the running container, and its stream: see streams.exec."""
        return streams.exec(self.keeper, self.paths.state_dir, name, spec, size)

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

        return log_lines(managed, ended, tail, since, follow, streams)

    def metrics(self) -> str:
        """What /metrics shows beside the containers: the policies' rows, and the daemon's and its
        keeper's processes."""
        return self.engine.metrics() + render_processes({"daemon": os.getpid(), "keeper": self.keeper.pid})

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
        self.feed.closed = True
        for managed in self.containers.values():
            self.restarts.cancel(managed)
        self.keeper.close()
        self.watcher.close()
        self.engine.close()

    # --- starting and ending ---

    def _start(self, managed: Managed, restoring: Restoring | None = None) -> None:
        """Start the next attempt, or restore a checkpoint as it (call with managed.lock held). Raises
        SpecError, SpawnError, Failure, fs.CgroupError; nothing is left of a start that failed."""
        name = managed.info.name
        pid, created, root, network = attempts.start(
            self.keeper, managed, self.paths.cgroup_root, self.paths.state_dir, self.engine.active, restoring
        )
        managed.group, managed.written, managed.root = created.group, created.written, root
        managed.info.network = network
        managed.started = time.monotonic()
        managed.oom_kills = 0
        managed.info.attempts.append(Attempt(started_at=time.time(), pid=pid))
        managed.info.state, managed.info.pid, managed.info.cgroup = "running", pid, str(created.group.path)
        managed.save()
        self.watcher.add(name, created.group)
        self.engine.arm(managed)
        started = {"pid": str(pid), "attempt": str(len(managed.info.attempts))}
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
        report = attempts.final_report(managed, status, self.paths.state_dir)
        self._release(name)
        managed.root.close()
        attempt = managed.info.attempts[-1]
        attempts.record_end(attempt, status, report)
        if report is not None and report.checkpointed_to:
            managed.stopping = True  # it lives on in its images: no restart
        managed.info.report = report
        managed.info.pid = None
        self.emit("exit", name, attempts.exit_attributes(attempt))
        self.engine.ended(
            managed, attempts.exit_attributes(attempt), attempt.oom_killed and managed.oom_kills == 0
        )
        if not self.restarts.after_exit(managed, attempt, self.closing):
            self._ended_for_good(managed)
        managed.exit_path.unlink(missing_ok=True)
        with self.changed:
            self.changed.notify_all()

    def _ended_for_good(self, managed: Managed) -> None:
        managed.info.state = "exited"
        managed.save()
        if managed.request.auto_remove:
            with self.lock:
                self.containers.pop(managed.info.name, None)
            shutil.rmtree(managed.dir, ignore_errors=True)
            self.engine.forget(managed.info.name)
            self.emit("remove", managed.info.name)
        with self.changed:
            self.changed.notify_all()

    def _current(self, managed: Managed) -> bool:
        """Whether it may still be (re)started: not stopped, still in the table, the daemon not closing."""
        return not managed.stopping and not self.closing and self.containers.get(managed.info.name) is managed

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
        for managed in recovery.load(self.paths.containers):
            self.containers[managed.info.name] = managed
            with managed.lock:
                self._recover_one(managed, listing["running"].get(managed.info.name))
        for name in listing["finished"]:
            if name not in self.containers or self.containers[name].info.state == "exited":
                self._release(name)
        state.clean_stale(self.paths.state_dir)
        named = {c.cgroup for c in self.local.list()} | {m.info.cgroup for m in self.containers.values()}
        recovery.remove_stale_cgroups(self.paths.cgroup_root, named)

    def _recover_one(self, managed: Managed, running: dict[str, int] | None) -> None:
        info = managed.info
        if info.state == "restarting":
            self.restarts.schedule(managed, 0, "the daemon restarted")
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
        self._finish(managed, recovery.ended_status(managed))

    # --- helpers ---

    def _managed(
        self, name: str, foreground: str = ": its output and status go to its own `cgctl run`"
    ) -> Managed:
        """The daemon's container `name`; a foreground run of that name is a Conflict, saying why."""
        managed = self.containers.get(name)
        if managed is None:
            if any(c.name == name for c in self.local.list()):
                raise Conflict(f"{name!r} is a foreground run{foreground}")
            raise NotFound(f"no container named {name!r}")
        return managed

    def _running(self) -> builtins.list[Managed]:
        return [m for m in self.containers.values() if m.info.state in ("running", "frozen")]

    def _view(self, managed: Managed) -> Container:
        return managed.info.model_copy(deep=True)
