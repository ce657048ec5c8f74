"""The keeper: the one process that is the parent of every detached container, and outlives the daemon.

Why it exists: the kernel gives a process's exit status to its parent only. The daemon can be
restarted or SIGKILLed while containers run; were it their parent, an exit meanwhile would be
lost. So the daemon makes and checks everything (cgroup, limits, sandbox plan) and sends the
keeper the launch; the keeper forks it, and then, in one select loop with no threads:
- reaps each container through a pidfd and writes its status to <container dir>/exit.json
  (fsynced, renamed into place) before telling the daemon, so a status is on disk even when no
  daemon is listening;
- reads the container's stdout and stderr pipes, or its terminal's master (`run -t`), into its log
  files (size-capped, rotated), and passes what it reads on to the daemon's attach streams
  (`cgctl attach`), whose keystrokes and window size it passes back; a slow attach stream is
  dropped rather than let wait the loop (the log has everything);
- holds the container's run record lock, so `cgctl ps`, `stats` and the exporter see it alive
  while the daemon is down; the daemon asks it to let go once it has read the final accounting.
One Python process for all containers, not one per container (conmon's model costs ~1 MB each).
If the keeper itself dies, its containers die with it (PR_SET_PDEATHSIG, as with a foreground
`cgctl run`), and the daemon records their status as unknown.

The daemon talks to it over a SOCK_SEQPACKET unix socket that only the keeper's own user may
use: requests are pickled (they carry spawn.Launch, built by the same code on the same host),
replies and events are JSON.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pickle
import queue
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cgctl import durable
from cgctl.cgroup import fs
from cgctl.ns import console
from cgctl.runtime import spawn
from cgctl.runtime.logs import LogWriter
from cgctl.runtime.terminal import EXITED, RESIZE, STDERR, STDIN, STDIN_CLOSED, STDOUT

MESSAGE_LIMIT = 1 << 20
READ_SIZE = 65536
RECENT = 65536  # a terminal's latest output, replayed to the first attach of `run -it`


@dataclasses.dataclass
class _Child:
    """A container's main process, or (with no record, exit path or log) a process `cgctl exec` started
    in one, whose output and status go to its one attach stream."""

    name: str
    attempt: int
    pid: int
    pidfd: int
    record_fd: int | None
    alive_fd: int | None  # spawn's: closed once the container is reaped
    exit_path: Path | None
    log: LogWriter | None
    pipes: dict[int, str] = dataclasses.field(default_factory=dict)  # open read ends -> stdout/stderr
    master: int | None = None  # its terminal's (-t), one of the pipes while it is open
    stdin: int | None = None  # where attached keystrokes go: the master, or a pipe (-i without -t)
    attached: list[socket.socket] = dataclasses.field(default_factory=list)
    recent: bytearray = dataclasses.field(default_factory=bytearray)


class Keeper:
    """The select loop (see the module's docstring)."""

    def __init__(self, listener: socket.socket, cgroup_root: str) -> None:
        self.listener = listener
        self.cgroup_root = cgroup_root
        self.selector = selectors.DefaultSelector()
        self.selector.register(listener, selectors.EVENT_READ, self._accept)
        self.clients: list[socket.socket] = []
        self.running: dict[str, _Child] = {}
        self.finished: dict[str, _Child] = {}  # exited, record lock held until the daemon releases it

    def serve(self) -> None:
        while True:
            for key, _ in self.selector.select():
                # A handler earlier in this batch may have closed this fd (a reaped container's
                # pipes are drained and closed with it): only keys still registered are served.
                if self.selector.get_map().get(key.fd) is key:
                    key.data(key.fileobj)

    def _accept(self, _: object) -> None:
        client, _ = self.listener.accept()
        uid = struct.unpack("3i", client.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.geteuid():
            client.close()
            return
        self.clients.append(client)
        self.selector.register(client, selectors.EVENT_READ, self._request)

    def _request(self, client: socket.socket) -> None:
        try:
            data, fds, _, _ = socket.recv_fds(client, MESSAGE_LIMIT, 4)
        except OSError:
            data, fds = b"", []
        if not data:
            self.selector.unregister(client)
            self.clients.remove(client)
            client.close()
            for fd in fds:
                os.close(fd)
            return
        message = pickle.loads(data)
        try:
            reply = getattr(self, f"_op_{message['op']}")(message, fds)
        except Exception as error:  # a request must never take the keeper down
            reply = {"ok": False, "error": f"{type(error).__name__}: {error}", "exit_code": 125}
        with contextlib.suppress(OSError):
            client.send(json.dumps(reply).encode())

    def _op_start(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        launch: spawn.Launch = message["launch"]
        return self._start(message, fds, lambda stdio: spawn.start(dataclasses.replace(launch, stdio=stdio)))

    def _op_restore(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Restore a checkpoint (checkpoint.restore_tasks): CRIU runs here, so that the restored init
        is our child. The loop waits while CRIU works (seconds; the containers' pipes buffer)."""
        from cgctl.runtime import checkpoint

        def restore(stdio: tuple[int, int, int]) -> spawn.Started:
            group = fs.Cgroup(Path(message["cgroup"]))
            # The namespace the daemon attached for it, by the path of the daemon's fd (held until we reply).
            netns = os.open(message["netns"], os.O_RDONLY | os.O_CLOEXEC) if message.get("netns") else None
            try:
                pid = checkpoint.restore_tasks(
                    message["restoring"], group, message["root"], dict(enumerate(stdio)), netns=netns
                )
            except checkpoint.CheckpointError as error:
                raise spawn.SpawnError(str(error), 125) from None
            finally:
                if netns is not None:
                    os.close(netns)
            return spawn.Started(pid, None)

        return self._start(message, fds, restore)

    def _start(
        self,
        message: dict[str, Any],
        fds: list[int],
        start: Callable[[tuple[int, int, int]], spawn.Started],
    ) -> dict[str, Any]:
        """Start a container with `start`, then watch its pidfd and outputs (see _launch)."""
        (record_fd,) = fds
        log = message["log"]
        try:
            child = self._launch(message, start)
        except spawn.SpawnError as error:
            os.close(record_fd)
            return {"ok": False, "error": str(error), "exit_code": error.exit_code}
        child.record_fd, child.exit_path = record_fd, Path(message["exit_path"])
        child.log = LogWriter(Path(log["path"]), log["max_bytes"], log["max_files"])
        self.running[child.name] = child
        return {"ok": True, "pid": child.pid}

    def _op_exec(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Start a process in a running container (runtime/exec.py) for `cgctl exec` through the
        daemon: its output goes to the attach stream in fds, then its status, and the stream ends."""
        from cgctl.runtime import exec as execution

        (fd,) = fds
        stream = socket.socket(fileno=fd)
        size = message["terminal"]
        try:
            child = self._launch(message, lambda stdio: execution.start(message["target"], stdio, size))
        except spawn.SpawnError as error:
            stream.close()
            return {"ok": False, "error": str(error), "exit_code": error.exit_code}
        self._attach(child, stream)
        return {"ok": True, "pid": child.pid, **self._hello(child)}

    def _launch(
        self, message: dict[str, Any], start: Callable[[tuple[int, int, int]], spawn.Started]
    ) -> _Child:
        """Start a process with `start`, its stdio /dev/null or a pipe for -i, and two pipes we read;
        with -t its terminal instead, whose master we read. Raises SpawnError."""
        null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        tty, interactive = message.get("tty", False), message.get("interactive", False)
        out_r, out_w = os.pipe2(os.O_CLOEXEC) if not tty else (None, null)
        err_r, err_w = os.pipe2(os.O_CLOEXEC) if not tty else (None, null)
        in_r, in_w = os.pipe2(os.O_CLOEXEC) if interactive and not tty else (null, None)
        try:
            started = start((in_r, out_w, err_w))
        except spawn.SpawnError:
            for fd in (out_r, err_r, in_w):
                if fd is not None:
                    os.close(fd)
            raise
        finally:
            for fd in {out_w, err_w, in_r, null}:
                os.close(fd)
        child = _Child(
            name=message["name"],
            attempt=message.get("attempt", 0),
            pid=started.pid,
            pidfd=os.pidfd_open(started.pid),
            record_fd=None,
            alive_fd=started.alive_fd,
            exit_path=None,
            log=None,
            master=started.master,
            stdin=started.master if started.master is not None and interactive else in_w,
        )
        self.selector.register(child.pidfd, selectors.EVENT_READ, lambda _: self._reap(child))
        outputs: list[tuple[int | None, str]] = [
            (out_r, "stdout"),
            (err_r, "stderr"),
            (started.master, "stdout"),
        ]
        for output, stream in outputs:
            if output is not None:
                os.set_blocking(output, False)
                child.pipes[output] = stream
                self.selector.register(output, selectors.EVENT_READ, lambda fd: self._read_pipe(child, fd))
        return child

    def _op_attach(self, message: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        """Pass a running container's output from now on to the socket in fds (and, with "replay", its
        terminal's latest output first), and what comes back on it to its stdin or terminal."""
        (fd,) = fds
        stream = socket.socket(fileno=fd)
        child = self.running.get(message["name"])
        if child is None:
            stream.close()
            return {"ok": False, "error": f"{message['name']} is not running", "exit_code": 125}
        if message.get("replay") and child.recent:
            stream.send(STDOUT + child.recent)  # still blocking: the stream is new and empty
        self._attach(child, stream)
        return {"ok": True, **self._hello(child)}

    @staticmethod
    def _hello(child: _Child) -> dict[str, bool]:
        """What a stream's client needs to know: a terminal (raw mode, sizes) and a stdin to feed."""
        return {"tty": child.master is not None, "stdin": child.stdin is not None}

    def _attach(self, child: _Child, stream: socket.socket) -> None:
        stream.setblocking(False)
        child.attached.append(stream)
        self.selector.register(stream, selectors.EVENT_READ, lambda s: self._attached_input(child, s))

    def _attached_input(self, child: _Child, stream: socket.socket) -> None:
        try:
            data = stream.recv(MESSAGE_LIMIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._detach(child, stream)
        elif data[:1] == STDIN and child.stdin is not None:
            with contextlib.suppress(OSError):  # a full terminal or pipe drops keys, as a terminal does
                os.write(child.stdin, data[1:])
        elif data[:1] == RESIZE and child.master is not None:
            with contextlib.suppress(OSError, ValueError, TypeError, struct.error):  # a bad size is ignored
                rows, columns = json.loads(data[1:])
                console.set_size(child.master, (rows, columns))
        elif data[:1] == STDIN_CLOSED and child.stdin is not None and child.stdin != child.master:
            os.close(child.stdin)
            child.stdin = None

    def _send(self, child: _Child, stream: socket.socket, data: bytes) -> bool:
        """Pass output to one attach stream; one that cannot take it now is dropped."""
        try:
            stream.send(data)
            return True
        except OSError:
            self._detach(child, stream)
            return False

    def _detach(self, child: _Child, stream: socket.socket) -> None:
        if stream in child.attached:
            child.attached.remove(stream)
            self.selector.unregister(stream)
        stream.close()

    def _op_list(self, _message: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        return {
            "ok": True,
            "running": {name: {"pid": c.pid, "attempt": c.attempt} for name, c in self.running.items()},
            "finished": sorted(self.finished),
            "pid": os.getpid(),
            "cgroup_root": self.cgroup_root,
        }

    def _op_release(self, message: dict[str, Any], _fds: list[int]) -> dict[str, Any]:
        child = self.finished.pop(message["name"], None)
        if child is not None and child.record_fd is not None:
            os.close(child.record_fd)
        return {"ok": True}

    def _read_pipe(self, child: _Child, fd: int) -> bool:
        """Log one read from the pipe or master, and pass it on to the attach streams; False once
        there is nothing more to read now."""
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:
            return False
        except OSError:  # EIO from a master: nothing has its terminal open any more
            data = b""
        if data:
            stream = child.pipes[fd]
            if child.log is not None:
                child.log.feed(stream, data)
            if fd == child.master:
                child.recent += data
                del child.recent[:-RECENT]
            for attached in list(child.attached):
                self._send(child, attached, (STDOUT if stream == "stdout" else STDERR) + data)
            return True
        stream = child.pipes.pop(fd)
        self.selector.unregister(fd)
        os.close(fd)
        if fd == child.master:
            child.stdin = None if child.stdin == fd else child.stdin
            child.master = None
        if child.log is not None:
            child.log.flush_partial(stream)
            if not child.pipes:
                child.log.close()
        return False

    def _drain(self, child: _Child) -> None:
        """Log what the container wrote before it exited, before its exit is told."""
        for fd in list(child.pipes):
            while fd in child.pipes and self._read_pipe(child, fd):
                pass

    def _reap(self, child: _Child) -> None:
        result = os.waitid(os.P_PIDFD, child.pidfd, os.WEXITED)
        self.selector.unregister(child.pidfd)
        os.close(child.pidfd)
        if child.alive_fd is not None:
            os.close(child.alive_fd)
        self._drain(child)
        status: dict[str, Any] = {"name": child.name, "attempt": child.attempt, "pid": child.pid}
        if result is not None and result.si_code == os.CLD_EXITED:
            status["exit_code"] = result.si_status
        elif result is not None:
            status["signal"] = result.si_status
        status["exited_at"] = time.time()
        for attached in list(child.attached):  # a container's: the daemon tells its status
            if child.exit_path is None:
                attached.settimeout(5)  # the status must arrive, even behind output not yet read
                with contextlib.suppress(OSError):
                    attached.send(EXITED + json.dumps(status).encode())
            self._detach(child, attached)
        if child.stdin is not None and child.stdin != child.master:
            os.close(child.stdin)
            child.stdin = None
        if child.exit_path is None:  # an exec'd process: its status went to its stream
            for fd in list(child.pipes):  # what a process it left behind still writes goes nowhere
                self.selector.unregister(fd)
                os.close(fd)
            return
        with contextlib.suppress(OSError):  # a full disk must not lose the event too
            durable.write_json(child.exit_path, status)
        del self.running[child.name]
        self.finished[child.name] = child
        event = json.dumps({"event": "exit", **status}).encode()
        for client in self.clients:
            with contextlib.suppress(OSError):
                client.send(event)


def main() -> None:
    """`python -m cgctl.daemon.keeper SOCKET READY_FD`: detach, listen, say ready, serve."""
    path, ready = Path(sys.argv[1]), int(sys.argv[2])
    if os.fork():  # the daemon reaps this parent at once; the keeper is reparented to init
        os._exit(0)
    os.setsid()
    os.chdir("/")
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(null, fd)
    os.close(null)
    with open("/proc/self/oom_score_adj", "w") as score:  # the daemon's OOM protection is not the containers'
        score.write("0")
    cgroup_root = _claim_cgroup()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    path.unlink(missing_ok=True)
    old = os.umask(0o077)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(16)
    os.write(ready, f"{os.getpid()}\n".encode())
    os.close(ready)
    Keeper(listener, cgroup_root).serve()


class KeeperClient:
    """The daemon's end: requests one at a time, and the keeper's events passed to `on_event`
    from a reader thread ({"event": "lost"} when the keeper is gone)."""

    def __init__(self, path: Path, on_event: Callable[[dict[str, Any]], None]) -> None:
        self.path = path
        self.on_event = on_event
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.connect(str(path))
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, name="keeper-events", daemon=True)
        self.reader.start()

    @classmethod
    def connect(
        cls, path: Path, on_event: Callable[[dict[str, Any]], None], timeout: float = 60.0
    ) -> KeeperClient:
        """Connect to the running keeper, or start one first."""
        try:
            return cls(path, on_event)
        except (FileNotFoundError, ConnectionRefusedError):
            pass
        ready_r, ready_w = os.pipe()
        first = subprocess.Popen(
            [*_own_scope(), sys.executable, "-m", "cgctl.daemon.keeper", str(path), str(ready_w)],
            pass_fds=(ready_w,),
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        os.close(ready_w)
        first.wait(timeout)
        try:
            if not _read_line(ready_r, timeout):
                raise RuntimeError(f"the keeper ({sys.executable} -m cgctl.daemon.keeper) died on start")
        finally:
            os.close(ready_r)
        return cls(path, on_event)

    def request(self, message: dict[str, Any], fds: tuple[int, ...] = ()) -> dict[str, Any]:
        with self.lock:
            socket.send_fds(self.sock, [pickle.dumps(message)], list(fds))
            reply = self.replies.get()
        if reply.get("lost"):
            raise ConnectionError("the keeper is gone")
        return reply

    @property
    def pid(self) -> int | None:
        """The keeper's pid as the kernel gives it (SO_PEERCRED: who listened, after the keeper
        detached) rather than by a request, which a scrape would wait for behind a restore's CRIU;
        None once the connection is closed."""
        try:
            credentials = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        except OSError:
            return None
        return int(struct.unpack("3i", credentials)[0])

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(MESSAGE_LIMIT)
            except OSError:
                data = b""
            if not data:
                self.replies.put({"lost": True})
                self.on_event({"event": "lost"})
                return
            message = json.loads(data)
            if "event" in message:
                self.on_event(message)
            else:
                self.replies.put(message)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _own_scope() -> list[str]:
    """Under systemd, the keeper runs in a delegated scope of its own (cgctl-keeper.scope), and the
    containers below it: were they below cgctld.service, systemd could not start the daemon again
    there (no process may join a cgroup that enables controllers for children), and a restart of the
    daemon would fail while containers run. Elsewhere the keeper simply stays where it is started."""
    if not (os.environ.get("INVOCATION_ID") and os.path.isdir("/run/systemd/system")):
        return []
    user = ["--user"] if os.geteuid() != 0 else []
    unit = "cgctl-keeper" if not _unit_exists(user, "cgctl-keeper.scope") else f"cgctl-keeper-{os.getpid()}"
    return ["systemd-run", *user, "--scope", "--quiet", "--collect", "--unit", unit, "-p", "Delegate=yes",
            "--description", "cgctl's keeper and its containers", "--"]  # fmt: skip


def _unit_exists(user: list[str], unit: str) -> bool:
    """A scope left by an earlier keeper (one whose containers still run) keeps its name."""
    found = subprocess.run(["systemctl", *user, "is-active", "--quiet", unit], check=False)
    return found.returncode == 0


def _claim_cgroup() -> str:
    """The cgroup root for containers, from the keeper's point of view: a delegated cgroup it was
    started in (its scope), which it leaves for a leaf of its own so that controllers can be
    enabled there; else cgctl's default root. "" on a host without a usable cgroup v2."""
    try:
        unified = fs.open_unified_root(fs.SUPPORTED_CONTROLLERS)
        root = fs.choose_root(unified)
        if fs.own_cgroup(unified).path == root:
            fs.open_cgctl_root(unified, fs.SUPPORTED_CONTROLLERS, root)
        return str(root)
    except (fs.CgroupError, OSError):
        return ""


def _read_line(fd: int, timeout: float) -> bytes:
    """What the keeper writes to its ready pipe, bounded by time; b"" if it closed it or is too slow."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
            return b""
        chunk = os.read(fd, 64)
        if not chunk:
            return b""
        data += chunk
    return data


if __name__ == "__main__":
    main()
