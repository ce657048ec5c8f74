"""A machine: a long-lived micro-VM (cgctl.machine.vm) that runs `cgctl daemon` for a host with no
usable cgroup v2 of its own, with a persistent ext4 disk for /var/lib/cgctl (images, containers'
records and logs), as podman machine and Docker Desktop do for their engines.

The host reaches the daemon's API on a loopback TCP port that qemu forwards into the VM, with a
bearer token only the machine's owner can read (its directory is 0700): qemu 7.2's user network
cannot forward a unix socket, and a loopback port alone would let every local user in. /metrics
gets a second loopback port, without token, for a host Prometheus. The guest's network is
restricted (restrict=on): nothing in the VM reaches out, nothing outside the host reaches in.

    <home>/config.json  CPUs, memory, disk size, metrics port, shared paths
    <home>/disk.img     the ext4 disk (sparse), /dev/vda in the VM, mounted at /var/lib/cgctl
    <home>/share/       read-write 9p share: the job script, the token, the last boot's status
    <home>/run.json     the running VM: qemu's pid and the API's port
    <home>/console.log  the VM's console: the kernel's and the daemon's messages of this boot
    <home>/control.in   a FIFO to the VM's control port: a line asks the VM to stop cleanly
    <home>/shell.sock   the second serial port: a root shell (`cgctl machine shell`)
    <home>/monitor.sock qemu's QMP monitor: ports forwarded to the host while containers publish them
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cgctl.machine import RUN_FILE, default_home, vm

DEFAULT_CPUS = 2
DEFAULT_MEMORY = "4G"
DEFAULT_DISK_SIZE = 20 << 30  # sparse: the host's disk holds what the machine wrote, not this
GUEST_API_PORT = 9700
GUEST_METRICS_PORT = 9753
GUEST_SCRIPT = vm.GUEST / "machine.sh"
MONITOR_TIMEOUT = 30.0  # seconds for qemu's monitor to answer: it does at once, unless qemu is stuck


class MachineError(Exception):
    """The machine could not do what was asked; the message says why and what to do."""


@dataclass
class Config:
    cpus: int = DEFAULT_CPUS
    memory: str = DEFAULT_MEMORY
    disk_size: int = DEFAULT_DISK_SIZE
    metrics_port: int = 0
    shares: list[str] = field(default_factory=list)


@dataclass
class Running:
    pid: int
    api_port: int
    metrics_port: int
    started_at: float

    @property
    def url(self) -> str:
        return f"tcp://127.0.0.1:{self.api_port}"


class Machine:
    def __init__(self, home: Path | None = None) -> None:
        self.home = home or default_home()
        self.disk = self.home / "disk.img"
        self.share = self.home / "share"
        self.console = self.home / "console.log"

    def exists(self) -> bool:
        return (self.home / "config.json").exists()

    def config(self) -> Config:
        try:
            return Config(**json.loads((self.home / "config.json").read_text()))
        except FileNotFoundError:
            raise MachineError(f"no machine in {self.home}: create one with `cgctl machine init`") from None
        except OSError as error:
            raise MachineError(
                f"{self.home}: cannot read the machine's settings: {error.strerror} (another user's "
                "machine? set CGCTL_MACHINE_DIR, or HOME to your own)"
            ) from None

    def writes_reach_the_host(self, path: Path) -> bool:
        """Whether the VM sees `path` read-write at the same path (under a share): writes anywhere
        else land in the VM's throw-away overlay, not on this host."""
        return any(path.absolute().is_relative_to(share) for share in self.config().shares)

    def token(self) -> str:
        return (self.share / "token").read_text().strip()

    def forward(self, port: int, protocol: str = "tcp") -> None:
        """Make the guest's `port` reachable at the same port of this host's loopback, while the
        machine runs (qemu's hostfwd_add, through its monitor): a container's published port. The
        guest's network stays restricted: a forward lets the host in, nothing out. MachineError,
        naming the port, if qemu cannot listen there (in use on this host)."""
        said = self._monitor(f"hostfwd_add net {protocol}:127.0.0.1:{port}-:{port}")
        if said.strip():
            raise MachineError(
                f"cannot forward {port}/{protocol} of the machine to this host: {said.strip()}"
            )

    def unforward(self, port: int, protocol: str = "tcp") -> None:
        """Take a forward away again (qemu's hostfwd_remove); one that is not there is no error."""
        self._monitor(f"hostfwd_remove net {protocol}:127.0.0.1:{port}")

    @contextlib.contextmanager
    def forwarded(self, ports: Sequence[tuple[int, str]]) -> Iterator[None]:
        """The (port, protocol)s forwarded while the block runs, all or none."""
        done: list[tuple[int, str]] = []
        try:
            for port, protocol in ports:
                self.forward(port, protocol)
                done.append((port, protocol))
            yield
        finally:
            for port, protocol in done:
                with contextlib.suppress(MachineError, OSError):
                    self.unforward(port, protocol)

    def _monitor(self, command: str) -> str:
        """What qemu's human monitor answers to one command, asked over QMP (no echo, no prompt)."""
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(MONITOR_TIMEOUT)
                sock.connect(str(self.home / "monitor.sock"))
                with sock.makefile("rw") as lines:
                    _qmp(lines, None)  # the greeting
                    _qmp(lines, {"execute": "qmp_capabilities"})
                    answer = _qmp(
                        lines, {"execute": "human-monitor-command", "arguments": {"command-line": command}}
                    )
        except OSError as error:
            raise MachineError(f"cannot reach the machine's monitor (is it running?): {error}") from None
        return str(answer.get("return", ""))

    def init(self, config: Config) -> None:
        """Create the machine's directory, token and empty ext4 disk (the config last: a machine
        whose init was cut short has none, and init may simply run again)."""
        if self.exists():
            raise MachineError(f"a machine already exists in {self.home} (cgctl machine rm removes it)")
        for path in config.shares:
            _check_share(Path(path))
        if any(c.isspace() or c in ",=" for c in str(self.home)):
            raise MachineError(
                f"{self.home}: qemu cannot take a machine directory with spaces, ',' or '='; "
                "set CGCTL_MACHINE_DIR to a plain path"
            )
        vm.find_tool("mkfs.ext4")
        shutil.rmtree(self.home, ignore_errors=True)
        self.home.mkdir(mode=0o700, parents=True)
        self.share.mkdir(mode=0o700)
        token = self.share / "token"
        with os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        with self.disk.open("wb") as handle:
            handle.truncate(config.disk_size)
        vm.capture(vm.find_tool("mkfs.ext4"), "-q", "-F", "-L", "cgctl-data", str(self.disk))
        if not config.metrics_port:
            config.metrics_port = _free_port()
        self._save(config)

    def set(
        self,
        cpus: int | None,
        memory: str | None,
        disk_size: int | None,
        metrics_port: int | None,
        shares: list[str],
    ) -> None:
        """Change the settings of a stopped machine; the disk only grows (resize2fs, offline)."""
        config = self.config()
        for path in shares:
            _check_share(Path(path))
        with self._locked():
            if self.running():
                raise MachineError("the machine is running: stop it first (cgctl machine stop)")
            if disk_size is not None and disk_size != config.disk_size:
                if disk_size < config.disk_size:
                    raise MachineError(
                        f"the disk can only grow: it is {config.disk_size >> 20} MiB, "
                        f"{disk_size >> 20} MiB asked"
                    )
                vm.capture(vm.find_tool("e2fsck"), "-f", "-p", str(self.disk))
                with self.disk.open("r+b") as handle:
                    handle.truncate(disk_size)
                vm.capture(vm.find_tool("resize2fs"), str(self.disk))
                config.disk_size = disk_size
            config.cpus = cpus or config.cpus
            config.memory = memory or config.memory
            config.metrics_port = metrics_port or config.metrics_port
            config.shares += [path for path in shares if path not in config.shares]
            self._save(config)

    def running(self) -> Running | None:
        """The running VM, if its qemu is alive (a run.json left by a killed one does not count, nor
        one this user cannot read: another user's machine, found through a HOME that is not theirs)."""
        try:
            running = Running(**json.loads((self.home / RUN_FILE).read_text()))
            cmdline = Path(f"/proc/{running.pid}/cmdline").read_bytes()
        except (OSError, ValueError, TypeError):
            return None
        return running if str(self.disk).encode() in cmdline else None

    def start(self, progress: Callable[[str], None], timeout: float = 300.0) -> tuple[Running, bool]:
        """Boot the VM and wait until its daemon answers; (the machine, whether it was started now)."""
        config = self.config()
        with self._locked():
            if running := self.running():
                return running, False
            image = vm.ensure_image()
            started = time.monotonic()
            running = self._boot(image, config)
            progress(f"booting the machine (qemu pid {running.pid}); waiting for its daemon")
            self._wait_ready(running, started + timeout)
            return running, True

    def stop(self, timeout: float = 90.0) -> bool:
        """Ask the VM to stop its daemon (which stops the containers and records their exits) and
        power off; kill qemu if it has not within `timeout`. False if it was not running."""
        with self._locked():
            running = self.running()
            if running is None:
                return False
            try:
                fd = os.open(self.home / "control.in", os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(fd, b"stop\n")
                finally:
                    os.close(fd)
            except OSError:
                pass  # qemu no longer reads it: it is on its way out, or is killed below
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.running():
                time.sleep(0.2)
            if self.running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(running.pid, signal.SIGKILL)
                raise MachineError(
                    f"the machine did not stop within {timeout:.0f} s and was killed; "
                    f"see {self.console}. Its disk's journal is replayed at the next start"
                )
            (self.home / RUN_FILE).unlink(missing_ok=True)
            return True

    def remove(self) -> None:
        with self._locked():
            if self.running():
                raise MachineError("the machine is running: stop it first (cgctl machine stop)")
        shutil.rmtree(self.home)

    def _boot(self, image: Path, config: Config) -> Running:
        api_port = _free_port()
        python = Path(sys.executable).parent
        vm.write_job(
            self.share,
            ["sh", str(GUEST_SCRIPT)],
            {
                "PATH": f"{python}:/usr/sbin:/usr/bin:/sbin:/bin",
                "HOME": "/root",
                "LANG": "C.UTF-8",
                "CGCTL_MACHINE_SHARES": " ".join(f"share{i}={path}" for i, path in enumerate(config.shares)),
                "CGCTL_MACHINE_API": str(GUEST_API_PORT),
                "CGCTL_MACHINE_METRICS": str(GUEST_METRICS_PORT),
            },
            cwd="/",
        )
        for stale in ("status", "dmesg.log"):
            (self.share / stale).unlink(missing_ok=True)
        for end in ("in", "out"):
            fifo = self.home / f"control.{end}"
            if not fifo.exists():
                os.mkfifo(fifo, 0o600)
        with (self.home / "qemu.log").open("wb") as log:
            qemu = subprocess.Popen(
                self.qemu_argv(image, config, api_port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        running = Running(qemu.pid, api_port, config.metrics_port, time.time())
        _write_atomically(self.home / RUN_FILE, json.dumps(asdict(running)))
        self._qemu = qemu
        return running

    def qemu_argv(self, image: Path, config: Config, api_port: int) -> list[str]:
        """The VM: its disk, its two serial ports, its control port, the shares, and a network that
        reaches nothing and is reached only at two ports of the host's loopback (and at the ports
        `forward` adds, through the QMP monitor)."""
        forwards = (
            f"hostfwd=tcp:127.0.0.1:{api_port}-:{GUEST_API_PORT},"
            f"hostfwd=tcp:127.0.0.1:{config.metrics_port}-:{GUEST_METRICS_PORT}"
        )
        return [
            *vm.qemu_argv(image, self.share, config.memory, config.cpus),
            *["-serial", f"file:{self.console}"],
            *["-serial", f"unix:{self.home / 'shell.sock'},server=on,wait=off"],
            *vm.disk(self.disk, "data"),
            *["-netdev", f"user,id=net,restrict=on,{forwards}", "-device", "virtio-net-pci,netdev=net"],
            *["-qmp", f"unix:{self.home / 'monitor.sock'},server=on,wait=off"],
            *["-chardev", f"pipe,id=control,path={self.home / 'control'}", "-device", "virtio-serial-pci"],
            *["-device", "virtserialport,chardev=control,name=cgctl.control"],
            *(
                arg
                for index, path in enumerate(config.shares)
                for arg in vm.share(Path(path), f"share{index}")
            ),
        ]

    def _wait_ready(self, running: Running, deadline: float) -> None:
        from cgctl.runtime.api import Failure
        from cgctl.runtime.remote import RemoteRuntime

        remote = RemoteRuntime(running.url, timeout=5.0, token=self.token())
        while time.monotonic() < deadline:
            if self._qemu.poll() is not None:
                (self.home / RUN_FILE).unlink(missing_ok=True)
                raise MachineError(f"the machine stopped while booting: {self._last_words()}")
            try:
                remote.ping()
                return
            except Failure:
                time.sleep(0.5)
        os.kill(running.pid, signal.SIGKILL)
        self._qemu.wait()
        (self.home / RUN_FILE).unlink(missing_ok=True)
        raise MachineError(
            f"the machine's daemon did not answer in time and it was stopped: {self._last_words()}"
        )

    def _last_words(self) -> str:
        """The end of qemu's log and of the console, for an error message."""
        said = []
        for path in (self.home / "qemu.log", self.console):
            with contextlib.suppress(OSError):
                lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
                if lines:
                    said.append(f"{path.name}: " + " | ".join(lines[-3:]))
        return "; ".join(said) or f"nothing logged (see {self.console})"

    def _save(self, config: Config) -> None:
        _write_atomically(self.home / "config.json", json.dumps(asdict(config), indent=2) + "\n")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One start, stop, set or rm at a time."""
        with open(self.home / "lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield


def _qmp(lines: Any, request: dict[str, Any] | None) -> dict[str, Any]:
    """Send a QMP request (None: read the greeting) and return qemu's answer, past its events."""
    if request is not None:
        lines.write(json.dumps(request) + "\n")
        lines.flush()
    while True:
        line = lines.readline()
        if not line:
            raise MachineError("the machine's monitor closed the connection")
        answer = json.loads(line)
        if "error" in answer:
            raise MachineError(f"the machine's monitor refused {request}: {answer['error'].get('desc')}")
        if "event" not in answer:
            return dict(answer)


def _check_share(path: Path) -> None:
    if not path.is_absolute() or not path.is_dir():
        raise MachineError(f"invalid share {str(path)!r}: expected an existing directory's absolute path")
    if any(c.isspace() or c in ",=" for c in str(path)):
        raise MachineError(f"invalid share {str(path)!r}: the VM cannot share a path with spaces, ',' or '='")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    temporary.replace(path)
