"""podman (Debian's 4.3, with conmon) running busybox with `--runtime` runc and cgctl-oci: the same
assertions for both. Its storage, run root, configuration and events live on a tmpfs of the module's."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.oci_bundles import (
    IMAGE_NAME,
    UNIFIED,
    assert_shell_on_a_terminal,
    cgroup_dirs,
    processes_mentioning,
    remove_cgroup_tree,
    runtime_params,
    write_busybox_archive,
)
from tests.integration.workloads import tmpfs

CGROUP_PARENT = UNIFIED / "cgctl-oci-podman"
RUN_OPTIONS = ("--network", "none", "--cgroup-parent", f"/{CGROUP_PARENT.name}")
WAITER = ["sh", "-c", "trap 'exit 143' TERM; sleep 1000 & wait"]
CONTAINERS_CONF = """[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{base}/events.log"
tmp_dir = "{base}/tmp"
"""
STORAGE_CONF = """[storage]
driver = "vfs"
runroot = "{base}/runroot"
graphroot = "{base}/root"
"""


@dataclass
class Podman:
    base: Path

    def argv(self, runtime: str, *args: str) -> list[str]:
        return ["podman", "--runtime", runtime, "--cgroup-manager", "cgroupfs", *args]

    def __call__(self, runtime: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.argv(runtime, *args), capture_output=True, text=True, timeout=120)
        assert not check or done.returncode == 0, f"podman {args}: exit {done.returncode}: {done.stderr}"
        return done

    def run_argv(self, runtime: str, *args: str) -> list[str]:
        return self.argv(runtime, "run", *RUN_OPTIONS, *args)

    def assert_nothing_left(self, runtime: str) -> None:
        assert self(runtime, "ps", "--all", "--quiet").stdout.split() == []
        assert [name for name in cgroup_dirs(CGROUP_PARENT) if name != "conmon"] == []
        assert processes_mentioning("/conmon ") == []


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    """Podman's configuration, storage and state on a tmpfs (never the host's), busybox loaded."""
    base = tmpfs(tmp_path_factory.mktemp("podman"))
    (base / "containers.conf").write_text(CONTAINERS_CONF.format(base=base))
    (base / "storage.conf").write_text(STORAGE_CONF.format(base=base))
    (base / "registries.conf").write_text("")
    saved = {name: os.environ.get(name) for name in ("CONTAINERS_CONF", "CONTAINERS_STORAGE_CONF",
                                                     "CONTAINERS_REGISTRIES_CONF")}  # fmt: skip
    os.environ.update(
        CONTAINERS_CONF=str(base / "containers.conf"),
        CONTAINERS_STORAGE_CONF=str(base / "storage.conf"),
        CONTAINERS_REGISTRIES_CONF=str(base / "registries.conf"),
    )
    started = Podman(base)
    try:
        archive = write_busybox_archive(base / "busybox.tar", base / "image")
        started("runc", "load", "--input", str(archive))
        yield started
    finally:
        subprocess.run(started.argv("runc", "rm", "--all", "--force", "--time", "0"), timeout=120)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        remove_cgroup_tree(CGROUP_PARENT)
        subprocess.run(["umount", "--lazy", str(base)], check=True)


@runtime_params()
def test_run_gives_the_exit_status_and_the_memory_limit(podman: Podman, runtime: str) -> None:
    argv = podman.run_argv(runtime, "--rm", "--memory", "64m", IMAGE_NAME,
                           "sh", "-c", "cat /sys/fs/cgroup/memory.max; exit 3")  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (3, f"{64 << 20}\n"), done.stderr
    podman.assert_nothing_left(runtime)


@runtime_params()
def test_run_it_gives_a_terminal(podman: Podman, runtime: str) -> None:
    assert_shell_on_a_terminal(podman.run_argv(runtime, "-it", "--rm", IMAGE_NAME, "sh"))
    podman.assert_nothing_left(runtime)


@runtime_params()
def test_exec_pause_unpause_stop_and_rm(podman: Podman, runtime: str) -> None:
    podman(runtime, "run", *RUN_OPTIONS, "-d", "--name", "p1", IMAGE_NAME, *WAITER)
    try:
        status = ("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", "p1")
        assert podman(runtime, *status).stdout.split() == ["running", "0"]
        done = podman(runtime, "exec", "p1", "sh", "-c", "echo in-exec; exit 4", check=False)
        assert (done.returncode, done.stdout) == (4, "in-exec\n"), done.stderr

        podman(runtime, "pause", "p1")
        (cgroup,) = [name for name in cgroup_dirs(CGROUP_PARENT) if name.startswith("libpod-")]
        assert podman(runtime, *status).stdout.split()[0] == "paused"
        assert (CGROUP_PARENT / cgroup / "cgroup.freeze").read_text() == "1\n"
        podman(runtime, "unpause", "p1")
        assert podman(runtime, *status).stdout.split()[0] == "running"
        assert (CGROUP_PARENT / cgroup / "cgroup.freeze").read_text() == "0\n"

        podman(runtime, "stop", "--time", "20", "p1")
        assert podman(runtime, *status).stdout.split() == ["exited", "143"]
        podman(runtime, "rm", "p1")
        podman.assert_nothing_left(runtime)
    finally:
        podman(runtime, "rm", "--force", "--time", "0", "--ignore", "p1", check=False)
