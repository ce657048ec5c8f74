"""cgctl-oci's data and CRIU functions on containers runc made (runc is the reference): `events --stats`
equal to runc's own for the same paused container, and a runc container checkpointed and restored into a
new cgroup, its output going on where it stopped, through new pipes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cgctl.cgroup.fs import Cgroup
from cgctl.runtime import oci_checkpoint, oci_stats
from tests.integration.conftest import UNIFIED
from tests.integration.workloads import wait_for

COUNTER = "i=0; while true; do i=$((i+1)); echo $i; sleep 0.1; done"


class Runc:
    """runc with a state root of its own under /run, on a busybox bundle; deletes what it made."""

    def __init__(self, workdir: Path) -> None:
        self.workdir, self.root = workdir, workdir / "runc"
        self.bundle = workdir / "bundle"
        (self.bundle / "rootfs" / "bin").mkdir(parents=True)
        (self.bundle / "rootfs" / "data").mkdir()
        busybox = shutil.which("busybox")
        assert busybox, "busybox is missing: apt-get install busybox-static"
        shutil.copy(busybox, self.bundle / "rootfs" / "bin" / "busybox")
        for name in ("sh", "sleep", "echo"):
            (self.bundle / "rootfs" / "bin" / name).symlink_to("busybox")
        subprocess.run(["runc", "spec"], cwd=self.bundle, check=True)
        self.ids: list[str] = []

    def config(self) -> dict[str, Any]:
        return json.loads((self.bundle / "config.json").read_text())

    def run(self, name: str, config: dict[str, Any], stdout: int) -> dict[str, Any]:
        """`runc run -d` with stdout and stderr to the fd given; its state."""
        (self.bundle / "config.json").write_text(json.dumps(config))
        self.ids.append(name)
        argv = ["runc", "--root", str(self.root), "run", "-d", "--bundle", str(self.bundle), name]
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stdout, check=True, timeout=60)
        return self.state(name)

    def state(self, name: str) -> dict[str, Any]:
        done = subprocess.run(
            ["runc", "--root", str(self.root), "state", name], capture_output=True, check=True
        )
        return json.loads(done.stdout)

    def __call__(self, *args: str) -> str:
        return subprocess.run(
            ["runc", "--root", str(self.root), *args], capture_output=True, text=True, check=True, timeout=60
        ).stdout

    def clean_up(self) -> None:
        for name in self.ids:
            subprocess.run(
                ["runc", "--root", str(self.root), "delete", "--force", name], capture_output=True, timeout=60
            )


@pytest.fixture
def runc() -> Iterator[Runc]:
    with tempfile.TemporaryDirectory(prefix="test-oci-", dir="/run") as workdir:
        made = Runc(Path(workdir))
        try:
            yield made
        finally:
            made.clean_up()
    assert not [path for path in UNIFIED.iterdir() if path.name.startswith("test-oci-")]


def test_stats_equals_runcs_events(runc: Runc) -> None:
    config = runc.config()
    config["process"].update(args=["sh", "-c", "while true; do :; done"], terminal=False)
    config["linux"]["cgroupsPath"] = "/test-oci-stats"
    config["linux"]["resources"].update(
        memory={"limit": 64 << 20}, pids={"limit": 16}, cpu={"quota": 20000, "period": 100000}
    )
    runc.run("stats", config, subprocess.DEVNULL)
    time.sleep(0.5)  # some throttled periods
    runc("pause", "stats")  # frozen: the counters hold still between the two reads...
    time.sleep(0.3)  # ...once the 100 ms period running at the freeze is counted (nr_periods moved on once)
    expected = json.loads(runc("events", "--stats", "stats"))
    found = oci_stats.stats("stats", Cgroup(UNIFIED / "test-oci-stats"))
    assert found == expected
    assert found["data"]["cpu"]["throttling"]["throttledPeriods"] > 0
    assert found["data"]["memory"]["usage"]["limit"] == 64 << 20
    runc("resume", "stats")


def drain(fd: int, into: list[bytes]) -> threading.Thread:
    def read() -> None:
        while data := os.read(fd, 4096):
            into.append(data)
        os.close(fd)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def numbers(chunks: list[bytes]) -> list[int]:
    return [int(word) for word in b"".join(chunks).split()]


def test_checkpoint_and_restore_a_runc_container(runc: Runc) -> None:
    config = runc.config()
    config["process"].update(args=["sh", "-c", COUNTER], terminal=False)
    config["linux"]["cgroupsPath"] = "/test-oci-dumped"
    config["mounts"].append(
        {"destination": "/data", "type": "bind", "source": str(runc.workdir), "options": ["rbind", "ro"]}
    )
    before: list[bytes] = []
    read_end, write_end = os.pipe()
    drain(read_end, before)
    state = runc.run("dumped", config, write_end)
    os.close(write_end)
    wait_for(lambda: len(numbers(before)) >= 5, "the counter to count")
    options = oci_checkpoint.CriuOptions(runc.workdir / "images", work_path=runc.workdir / "work")
    rootfs = runc.bundle / "rootfs"
    oci_checkpoint.checkpoint(state["pid"], Cgroup(UNIFIED / "test-oci-dumped"), rootfs, config, options)
    assert runc.state("dumped")["status"] == "stopped"  # without --leave-running CRIU ends it
    runc("delete", "dumped")
    assert json.loads((options.image_path / "descriptors.json").read_text())[1].startswith("pipe:")

    group = Cgroup(UNIFIED / "test-oci-restored")
    group.path.mkdir()
    group.write("memory.max", str(128 << 20))
    after: list[bytes] = []
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    pid = 0
    try:
        drain(read_end, after)
        pid = oci_checkpoint.restore(group, rootfs, config, options, {0: null, 1: write_end, 2: write_end})
        os.close(write_end)
        assert Path(f"/proc/{pid}/cgroup").read_text().strip() == "0::/test-oci-restored"
        wait_for(lambda: len(numbers(after)) >= 3, "the restored counter to count")
        assert numbers(after)[0] == numbers(before)[-1] + 1  # on from where it was dumped
    finally:
        os.close(null)
        if group.populated():
            group.write("cgroup.kill", "1")
        if pid:
            os.waitpid(pid, 0)  # the restored init is our child (--restore-sibling)
        wait_for(lambda: not group.populated(), "the restored container to end", timeout=30)
        group.path.rmdir()
