"""A real cgctl daemon for the integration tests: its own socket, runtime and data directories, the
default run records (so the no_leaks fixture sees what it leaves) and the default cgroup root."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from cgctl.runtime.interface import answers
from cgctl.runtime.remote import RemoteRuntime
from tests.integration.workloads import PYTHON, cgctl_in_process


class Daemon:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "cgctl.sock"
        self.runtime_dir = directory / "run"
        self.data_dir = directory / "data"
        self.log = directory / "daemon.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.host = f"unix://{self.socket}"
        self.api = RemoteRuntime(self.host)
        # The API on loopback TCP too, as `cgctl machine` serves it, behind this token.
        self.token_file = directory / "token"
        self.token_file.write_text(secrets.token_urlsafe(32))
        self.token_file.chmod(0o600)
        self.tcp = ""
        # Its image store on tmpfs: the VM's root is overlayfs, which cannot hold whiteouts.
        self.images = directory / "images"

    def start(self, *options: str) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.tcp = f"127.0.0.1:{probe.getsockname()[1]}"
        if not os.path.ismount(self.images):
            self.images.mkdir(exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(self.images)], check=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "cgctl", "daemon", "--socket", str(self.socket), "--runtime-dir",
                 str(self.runtime_dir), "--data-dir", str(self.data_dir), "--tcp", self.tcp,
                 "--token-file", str(self.token_file), *options],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                env={**os.environ, "CGCTL_IMAGE_STORE": str(self.images)},
            )  # fmt: skip
        deadline = time.monotonic() + 180
        while not answers(self.socket):
            assert self.process.poll() is None, f"the daemon died on start: {self.log.read_text()}"
            assert time.monotonic() < deadline, f"the daemon did not answer in 180 s: {self.log.read_text()}"
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=120)

    def keeper_pid(self) -> int:
        """The pid of this daemon's keeper (0 if none runs)."""
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"cgctl.daemon.keeper" in argv and str(self.runtime_dir / "keeper.sock").encode() in argv:
                return int(proc.name)
        return 0

    def cli(self, capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
        return cgctl_in_process(capfd, "--host", self.host, *args)

    def clean_up(self) -> None:
        """Remove every container this daemon has (killing running ones), then stop it and its keeper."""
        if self.process is not None and self.process.poll() is None:
            for container in self.api.list(all=True):
                if container.detached:
                    self.api.remove(container.name, force=True)
            self.stop()
        if keeper := self.keeper_pid():
            os.kill(keeper, signal.SIGTERM)
        if os.path.ismount(self.images):
            subprocess.run(["umount", "--lazy", str(self.images)], check=True)
