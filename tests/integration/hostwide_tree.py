"""Cgroups laid out as other managers lay them out (systemd units, docker, podman, Kubernetes pods), for
the host-wide accounting tests: made through plain files, as those managers would, not through cgctl.

Only cgroups that do not exist yet are made (the VM, or a host, may already have system.slice), and
exactly those are removed again: their processes killed with cgroup.kill, the wait for cgroup.events
`populated 0` bounded by time, then rmdir, deepest first. Controllers switched on in the
cgroup.subtree_control of a cgroup that was there before are switched off again.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.integration.conftest import UNIFIED

CONTROLLERS = ("cpu", "io", "memory", "pids")


class HostTree:
    """The cgroups (and processes) a test made below the mount; close() removes them."""

    def __init__(self, mount: Path = UNIFIED) -> None:
        self.mount = mount
        self.created: list[Path] = []  # parents before children
        self.enabled: list[tuple[Path, list[str]]] = []  # (a cgroup that was there before, controllers)
        self.processes: list[subprocess.Popen[bytes]] = []

    def directory(self, path: str) -> Path:
        """The directory of the cgroup at path (as /proc/PID/cgroup writes it)."""
        return self.mount / path.lstrip("/")

    def cgroup(self, path: str) -> Path:
        """The cgroup at path, made (with its missing parents) if it does not exist, with the cpu, io,
        memory and pids controllers switched on down to it."""
        directory = self.mount
        for name in path.strip("/").split("/"):
            self.delegate(directory)
            directory = directory / name
            if not directory.is_dir():
                directory.mkdir()
                self.created.append(directory)
        return directory

    def delegate(self, directory: Path) -> None:
        """Switch the controllers on for the children of directory."""
        control = directory / "cgroup.subtree_control"
        missing = [name for name in CONTROLLERS if name not in control.read_text().split()]
        if missing:
            control.write_text(" ".join(f"+{name}" for name in missing))
            if directory not in self.created:
                self.enabled.append((directory, missing))

    def spawn(self, path: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """Start argv inside the cgroup at path: it moves itself in between fork and exec, so all it
        runs is accounted there."""
        procs = self.cgroup(path) / "cgroup.procs"
        process = subprocess.Popen(argv, preexec_fn=lambda: procs.write_text("0"), stdin=subprocess.DEVNULL)
        self.processes.append(process)
        return process

    def remove(self, path: str) -> None:
        """Remove the cgroup at path, and every cgroup below it that this tree made."""
        top = self.directory(path)
        doomed = [d for d in self.created if d == top or top in d.parents]
        self._remove(doomed)

    def close(self) -> None:
        """Remove every cgroup this tree made, and switch off what it switched on elsewhere."""
        self._remove(list(self.created))
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=30)
        for directory, controllers in reversed(self.enabled):
            (directory / "cgroup.subtree_control").write_text(" ".join(f"-{name}" for name in controllers))
        self.enabled.clear()

    def _remove(self, doomed: list[Path]) -> None:
        for directory in reversed(doomed):  # children before their parents
            if directory.is_dir():
                if populated(directory):
                    (directory / "cgroup.kill").write_text("1")
                    wait_unpopulated(directory)
                directory.rmdir()
            self.created.remove(directory)
        for process in self.processes:
            process.poll()  # reap what was killed


def populated(directory: Path) -> bool:
    events = dict(line.split() for line in (directory / "cgroup.events").read_text().splitlines())
    return events["populated"] == "1"


def wait_unpopulated(directory: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while populated(directory):
        assert time.monotonic() < deadline, f"{directory}: still populated {timeout:.0f} s after cgroup.kill"
        time.sleep(0.02)
