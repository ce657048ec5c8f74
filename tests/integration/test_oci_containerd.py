"""containerd (Debian's 1.6, no CRI plugin) running busybox through its runc v2 shim with runc and with
cgctl-oci as the shim's runtime binary (`ctr run --runc-binary`): the same assertions for both."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.oci_bundles import (
    IMAGE_NAME,
    UNIFIED,
    assert_shell_on_a_terminal,
    processes_mentioning,
    remove_cgroup_tree,
    runtime_params,
    wait_for,
    write_busybox_archive,
)
from tests.integration.workloads import tmpfs

NAMESPACE = "cgctl-oci-test"
CGROUPS = UNIFIED / NAMESPACE  # the default cgroupsPath of a container is /<namespace>/<id>
# containerd 1.6's default spec mounts no cgroup file system and unshares no cgroup namespace: the
# container gets the hierarchy mounted and finds its own cgroup through /proc/self/cgroup.
CGROUP_MOUNT = ("--mount", "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro")
READ_MEMORY_MAX = "IFS=: read -r _ _ path < /proc/self/cgroup; cat /sys/fs/cgroup$path/memory.max"
WAITER = ["sh", "-c", "trap 'exit 143' TERM; sleep 1000 & wait"]
CONFIG = """version = 2
root = "{base}/root"
state = "{base}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{base}/containerd.sock"
[ttrpc]
  address = "{base}/containerd.sock.ttrpc"
"""


@dataclass
class Containerd:
    base: Path

    def ctr_argv(self, *args: str) -> list[str]:
        return ["ctr", "--address", str(self.base / "containerd.sock"), "--namespace", NAMESPACE, *args]

    def ctr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(self.ctr_argv(*args), capture_output=True, text=True, timeout=120)
        assert not check or done.returncode == 0, (
            f"ctr {' '.join(args)}: exit {done.returncode}: {done.stderr}"
        )
        return done

    def run_argv(self, runtime: str, *args: str) -> list[str]:
        """`ctr run` with the runtime binary, its state under our base rather than /run/containerd."""
        return self.ctr_argv(
            "run", "--runc-binary", runtime, "--runc-root", str(self.base / "runtime"), *args
        )

    def tasks(self) -> list[list[str]]:
        return [line.split() for line in self.ctr("task", "ls").stdout.splitlines()[1:]]

    def assert_nothing_left(self, name: str) -> None:
        assert self.tasks() == []
        assert self.ctr("container", "ls", "-q").stdout.split() == []
        assert not (CGROUPS / name).exists()
        assert processes_mentioning(f"-id {name} ") == []


@pytest.fixture(scope="module")
def containerd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """One containerd for the module, its root, state and socket on a tmpfs, busybox imported."""
    base = tmpfs(tmp_path_factory.mktemp("containerd"))
    (base / "config.toml").write_text(CONFIG.format(base=base))
    with (base / "containerd.log").open("w") as log:
        daemon = subprocess.Popen(
            ["containerd", "--config", str(base / "config.toml")], stdout=log, stderr=log
        )
    started = Containerd(base)
    try:
        wait_for(lambda: (base / "containerd.sock").exists() or daemon.poll() is not None, "containerd", 60)
        assert daemon.poll() is None, (base / "containerd.log").read_text()
        archive = write_busybox_archive(base / "busybox.tar", base / "image")
        started.ctr("images", "import", str(archive))
        yield started
    finally:
        for task in started.tasks() if daemon.poll() is None else []:
            started.ctr("task", "kill", "--signal", "KILL", task[0], check=False)
            started.ctr("task", "delete", "--force", task[0], check=False)
        if daemon.poll() is None:
            for container in started.ctr("container", "ls", "-q").stdout.split():
                started.ctr("container", "delete", container, check=False)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)
        for shim in processes_mentioning(str(base / "containerd.sock")):
            raise AssertionError(f"a shim outlived its containers: {shim}")
        remove_cgroup_tree(CGROUPS)
        subprocess.run(["umount", "--lazy", str(base)], check=True)


@runtime_params()
def test_run_rm_gives_the_exit_status_and_the_memory_limit(containerd: Containerd, runtime: str) -> None:
    done = subprocess.run(
        containerd.run_argv(runtime, "--rm", *CGROUP_MOUNT, "--memory-limit", str(64 << 20),
                            IMAGE_NAME, "rm1", "sh", "-c", f"{READ_MEMORY_MAX}; exit 3"),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (3, f"{64 << 20}\n"), done.stderr
    containerd.assert_nothing_left("rm1")


@runtime_params()
def test_a_task_pauses_resumes_execs_and_gives_metrics(containerd: Containerd, runtime: str) -> None:
    subprocess.run(containerd.run_argv(runtime, "-d", IMAGE_NAME, "t1", *WAITER), check=True, timeout=120)
    try:
        assert [task[0::2] for task in containerd.tasks()] == [["t1", "RUNNING"]]
        pid = int(containerd.tasks()[0][1])
        assert str(pid) in (CGROUPS / "t1/cgroup.procs").read_text().split()

        containerd.ctr("task", "pause", "t1")
        assert (containerd.tasks()[0][2], (CGROUPS / "t1/cgroup.freeze").read_text()) == ("PAUSED", "1\n")
        containerd.ctr("task", "resume", "t1")
        assert (containerd.tasks()[0][2], (CGROUPS / "t1/cgroup.freeze").read_text()) == ("RUNNING", "0\n")

        done = containerd.ctr(
            "task", "exec", "--exec-id", "e1", "t1", "sh", "-c", "echo in-exec; exit 4", check=False
        )
        assert (done.returncode, done.stdout) == (4, "in-exec\n"), done.stderr

        metrics = containerd.ctr("task", "metrics", "t1").stdout
        assert "memory.usage_in_bytes" in metrics or "memory" in metrics, metrics
        assert "pids.current" in metrics or "pids" in metrics, metrics

        containerd.ctr("task", "kill", "t1")  # SIGTERM
        wait_for(lambda: containerd.tasks()[0][2] == "STOPPED", "the task to stop", 60)
        containerd.ctr("task", "delete", "t1")
        containerd.ctr("container", "delete", "t1")
        containerd.assert_nothing_left("t1")
    finally:
        if containerd.ctr("container", "ls", "-q").stdout.split():
            containerd.ctr("task", "delete", "--force", "t1", check=False)
            containerd.ctr("container", "delete", "t1", check=False)


@runtime_params()
def test_run_t_gives_a_terminal(containerd: Containerd, runtime: str) -> None:
    assert_shell_on_a_terminal(containerd.run_argv(runtime, "-t", "--rm", IMAGE_NAME, "tty1", "sh"))
    containerd.assert_nothing_left("tty1")
