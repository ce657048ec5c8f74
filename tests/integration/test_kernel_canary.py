"""Canaries: prove the test kernel really enforces cgroup v2 limits and offers every namespace.

If one of these fails, no other integration test's result means anything.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import ScratchCgroup

MiB = 1 << 20
PYTHON = sys.executable


def test_memory_max_oom_kills_an_allocation_over_the_limit(scratch_cgroup: ScratchCgroup) -> None:
    scratch_cgroup.write("memory.max", str(64 * MiB))
    scratch_cgroup.write("memory.swap.max", "0")
    process = scratch_cgroup.spawn([PYTHON, "-S", "-c", f"b = b'x' * {200 * MiB}"])
    assert process.wait(timeout=120) == -signal.SIGKILL
    events = scratch_cgroup.keyed("memory.events")
    assert events["oom_kill"] == 1, events


def test_memory_below_the_limit_is_not_killed(scratch_cgroup: ScratchCgroup) -> None:
    scratch_cgroup.write("memory.max", str(64 * MiB))
    process = scratch_cgroup.spawn([PYTHON, "-S", "-c", f"b = b'x' * {16 * MiB}"])
    assert process.wait(timeout=120) == 0
    assert scratch_cgroup.keyed("memory.events")["oom_kill"] == 0


def test_cpu_max_holds_a_busy_loop_to_half_a_cpu(scratch_cgroup: ScratchCgroup) -> None:
    scratch_cgroup.write("cpu.max", "50000 100000")
    process = scratch_cgroup.spawn(["sh", "-c", "while :; do :; done"])
    try:
        time.sleep(0.5)  # let the loop start before measuring
        usage_before = scratch_cgroup.keyed("cpu.stat")["usage_usec"]
        started = time.monotonic()
        time.sleep(4.5)
        usage = scratch_cgroup.keyed("cpu.stat")["usage_usec"] - usage_before
        wall = time.monotonic() - started
    finally:
        process.kill()
        process.wait()
    ratio = usage / 1e6 / wall
    assert 0.45 <= ratio <= 0.55, f"busy loop used {ratio:.3f} of a CPU under cpu.max 50000 100000"
    assert scratch_cgroup.keyed("cpu.stat")["nr_throttled"] > 0


def test_pids_max_makes_fork_fail(scratch_cgroup: ScratchCgroup) -> None:
    scratch_cgroup.write("pids.max", "4")
    forker = (
        "import os, errno, time\n"
        "children = 0\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        print(children, errno.errorcode[e.errno]); break\n"
        "    if pid == 0:\n"
        "        time.sleep(30); os._exit(0)\n"
        "    children += 1\n"
    )
    process = scratch_cgroup.spawn([PYTHON, "-S", "-c", forker], stdout=subprocess.PIPE)
    out, _ = process.communicate(timeout=120)
    assert out.decode().split() == ["3", "EAGAIN"]
    assert scratch_cgroup.keyed("pids.events")["max"] >= 1


def test_freeze_stops_a_counter_and_thaw_resumes_it(scratch_cgroup: ScratchCgroup, tmp_path: Path) -> None:
    counter = tmp_path / "counter"
    process = scratch_cgroup.spawn(["sh", "-c", f"i=0; while :; do i=$((i+1)); echo $i > {counter}; done"])

    def count_after(previous: int) -> int:
        """The counter once it has moved past previous (the file is empty for a moment at each write)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = counter.read_text() if counter.exists() else ""
            if text.strip() and int(text) > previous:
                return int(text)
            time.sleep(0.01)
        raise AssertionError(f"the counter in {counter} did not move past {previous}")

    try:
        count_after(0)
        scratch_cgroup.write("cgroup.freeze", "1")
        scratch_cgroup.wait_events("frozen", 1)
        frozen_at = counter.read_text()
        time.sleep(1)
        assert counter.read_text() == frozen_at, "the counter moved while frozen"
        scratch_cgroup.write("cgroup.freeze", "0")
        scratch_cgroup.wait_events("frozen", 0)
        count_after(int(frozen_at or 0))
    finally:
        process.kill()
        process.wait()


def _direct_write_seconds(cgroup: ScratchCgroup, device: str, mib: int) -> float:
    started = time.monotonic()
    process = cgroup.spawn(
        ["dd", "if=/dev/zero", f"of={device}", "bs=64K", f"count={mib * 16}", "oflag=direct", "status=none"]
    )
    assert process.wait(timeout=120) == 0
    return time.monotonic() - started


def test_io_max_wbps_limits_direct_writes_to_the_disk(scratch_cgroup: ScratchCgroup) -> None:
    device = os.environ.get("CGCTL_VM_DISK", "/dev/vda")
    major_minor = Path(f"/sys/class/block/{Path(device).name}/dev").read_text().strip()
    unlimited = 8 / _direct_write_seconds(scratch_cgroup, device, 8)
    scratch_cgroup.write("io.max", f"{major_minor} wbps={MiB}")
    limited = 4 / _direct_write_seconds(scratch_cgroup, device, 4)
    assert unlimited > 3, f"the disk itself writes only {unlimited:.1f} MiB/s: cannot tell a 1 MiB/s limit"
    assert 0.7 <= limited <= 1.3, f"{limited:.2f} MiB/s under io.max wbps=1MiB ({unlimited:.1f} unlimited)"
    assert scratch_cgroup.read("io.stat").count(f"{major_minor} ") == 1


NAMESPACES = {
    "pid": "--pid",
    "net": "--net",
    "mnt": "--mount",
    "uts": "--uts",
    "ipc": "--ipc",
    "user": "--user",
    "cgroup": "--cgroup",
}


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_every_namespace_can_be_unshared(namespace: str) -> None:
    inside = subprocess.run(
        ["unshare", NAMESPACES[namespace], "--fork", "readlink", f"/proc/self/ns/{namespace}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert inside.startswith(f"{namespace}:[")
    assert inside != os.readlink(f"/proc/self/ns/{namespace}")


def test_new_pid_namespace_starts_at_pid_1_and_user_namespace_maps_root() -> None:
    seen = subprocess.run(
        ["unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", "echo $$ /proc/[0-9]*"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert seen == ["1", "/proc/1"], seen  # the shell is pid 1 and sees no host process
    uid_map = subprocess.run(
        ["unshare", "--user", "--map-root-user", "cat", "/proc/self/uid_map"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert uid_map == ["0", "0", "1"]
