"""OCI bundles, images and runtimes for the cgctl-oci tests: each test runs against runc (the
reference, so every assertion is shown to hold for it too) and against cgctl-oci."""

from __future__ import annotations

import ctypes
import fcntl
import functools
import io
import json
import os
import pty
import select
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import termios
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests import oci

RUNC = shutil.which("runc") or "/usr/sbin/runc"
CGCTL_OCI = str(Path(sys.executable).parent / "cgctl-oci")
RUNTIMES = {"runc": RUNC, "cgctl-oci": CGCTL_OCI}
UNIFIED = Path("/sys/fs/cgroup")
PR_SET_CHILD_SUBREAPER = 36
IMAGE_NAME = "docker.io/library/cgctl-oci-busybox:latest"


def runtime_params() -> Any:
    """pytest.mark.parametrize over the runtimes' binaries, named by runtime."""
    return pytest.mark.parametrize("runtime", list(RUNTIMES.values()), ids=list(RUNTIMES))


def busybox_rootfs(path: Path) -> Path:
    """A busybox root at path with the mount points runc's default config.json mounts on."""
    members = oci.busybox_layer(*(oci.directory(name) for name in ("proc", "sys", "dev", "tmp")))
    path.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(oci.tar_bytes(members))) as archive:
        archive.extractall(path, filter="tar")
    return path


@functools.cache
def runc_spec() -> str:
    """`runc spec`'s config.json (the template containerd and podman start from too), once."""
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run([RUNC, "spec", "--bundle", scratch], check=True)
        return (Path(scratch) / "config.json").read_text()


def make_bundle(path: Path, args: list[str], cgroups_path: str, **changes: Any) -> Path:
    """A bundle at path: a busybox root (writable, so a test sees what its command writes there) and
    `runc spec`'s config.json with args, no terminal, cgroupsPath and `changes` merged into its top."""
    config = json.loads(runc_spec())
    config["process"].update(args=args, terminal=False)
    config["root"] = {"path": "rootfs", "readonly": False}
    config["linux"]["cgroupsPath"] = cgroups_path
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    busybox_rootfs(path / "rootfs")
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def write_busybox_archive(path: Path, scratch: Path) -> Path:
    """An oci-archive tar of a busybox image named IMAGE_NAME (containerd's and podman's loaders both
    read the names from index.json's annotations)."""
    layout = scratch / "layout"
    layout.mkdir(parents=True)
    descriptor = oci.put_image(
        layout, [oci.busybox_layer(oci.directory("tmp", 0o1777))], {"Env": ["PATH=/bin"], "Cmd": ["sh"]}
    )
    annotations = {"io.containerd.image.name": IMAGE_NAME, "org.opencontainers.image.ref.name": IMAGE_NAME}
    oci.write_index(layout, {**descriptor, "annotations": annotations})
    with tarfile.open(path, "w") as archive:
        for member in sorted(layout.rglob("*")):
            archive.add(member, str(member.relative_to(layout)), recursive=False)
    return path


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.05)


def cgroup_dirs(parent: Path) -> list[str]:
    """The cgroups under parent, as paths relative to it (empty when parent is gone)."""
    if not parent.exists():
        return []
    return sorted(str(p.relative_to(parent)) for p in parent.rglob("*") if p.is_dir())


def remove_cgroup_tree(path: Path) -> None:
    """Kill what is left in path's cgroups and remove them, deepest first (a finalizer's job)."""
    if not path.exists():
        return
    (path / "cgroup.kill").write_text("1")
    for directory in [*sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)), path]:
        procs = directory / "cgroup.procs"
        wait_for(lambda procs=procs: not procs.read_text().strip(), f"{directory} to empty", 10)
        directory.rmdir()


def alive(pid: int) -> bool:
    """True while pid runs (a zombie is not running)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@contextmanager
def subreaper() -> Iterator[None]:
    """This process as the subreaper of what it starts, as containerd's shim and conmon are: a
    runtime's `create` returns leaving the container's init, whose exit status only its reaper sees.
    Children still unreaped at the end are reaped, so nothing is left as a zombie."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def reap(pid: int, timeout: float = 30) -> int:
    """Wait (bounded) for child pid, reparented to this subreaper; its exit status as a shell shows it."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"pid {pid} still running after {timeout} s")
        time.sleep(0.02)


def read_until(fd: int, wanted: bytes, timeout: float = 30) -> bytes:
    """Read fd until wanted shows up (bounded); all that was read."""
    seen, deadline = b"", time.monotonic() + timeout
    while wanted not in seen:
        assert time.monotonic() < deadline, f"no {wanted!r} within {timeout} s; read {seen!r}"
        if select.select([fd], [], [], 0.5)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # EIO: every end of the terminal closed
                chunk = b""
            assert chunk, f"the terminal closed before {wanted!r}; read {seen!r}"
            seen += chunk
    return seen


def terminal() -> tuple[int, int]:
    """A pty (master, slave) with a window size (a runtime copies it; 0x0 confuses line editing)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    return master, slave


def assert_shell_on_a_terminal(argv: list[str]) -> None:
    """Run argv (a shell in a container with a terminal: `ctr run -t`, `podman run -it`) on a pty of
    ours, type into it, and check that it is on the container's own pty and that its exit status
    comes back."""
    master, slave = terminal()
    try:
        shell = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
        os.close(slave)
        read_until(master, b"# ", timeout=60)
        os.write(master, b"tty; echo h''i; exit 5\n")
        seen = read_until(master, b"\nhi\r", timeout=60)
        assert b"/dev/pts/0" in seen, seen
        assert shell.wait(timeout=60) == 5
    finally:
        os.close(master)


def processes_mentioning(word: str) -> list[str]:
    """Command lines of running processes with `word` in them (shims and conmon name their container)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (FileNotFoundError, NotADirectoryError, ProcessLookupError):
            continue
        if word in command and entry.name != str(os.getpid()):
            found.append(command)
    return found
