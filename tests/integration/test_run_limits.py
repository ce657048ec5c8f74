"""Each limit of `cgctl run`, proven by its effect on a real workload."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl import runtime
from tests.integration.workloads import (
    CGCTL_ROOT,
    PYTHON,
    MiB,
    allocate,
    busy_loop_share,
    cgctl_in_process,
    spec,
)

pytestmark = pytest.mark.usefixtures("no_leaks")
DISK = os.environ.get("CGCTL_VM_DISK", "/dev/vda")


def test_allocation_over_mem_is_oom_killed_and_reported() -> None:
    report = runtime.run(spec(allocate(200), limits={"memory": {"max": "64M"}}))
    assert report.oom_killed and report.oom_kills >= 1
    assert (report.signal, report.exit_code, report.exit_status) == (9, None, 137)
    assert report.memory_limit_bytes == 64 * MiB and report.limits["memory.max"] == str(64 * MiB)
    assert report.cgroup == str(CGCTL_ROOT / report.name)


def test_cli_oom_exits_137_names_the_limit_and_writes_the_report(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    report_file = tmp_path / "report.json"
    status, _, err = cgctl_in_process(
        capfd, "run", "--name", "job1", "--mem", "64M", "--report", str(report_file), "--", *allocate(200)
    )
    assert status == 137
    assert "cgctl: job1 killed by the OOM killer: memory.max 64 MiB reached (oom_kill " in err
    report = json.loads(report_file.read_text())
    assert report["oom_killed"] is True and report["name"] == "job1" and report["signal"] == 9
    assert report["memory_peak_bytes"] <= 64 * MiB and report["limits"]["memory.oom.group"] == "1"
    for key in (
        "wall_seconds",
        "cpu_user_seconds",
        "cpu_system_seconds",
        "cpu_throttled_seconds",
        "swap_peak_bytes",
        "io",
        "pids_peak",
        "cgroup",
        "exit_code",
    ):
        assert key in report


def test_allocation_under_mem_completes_and_its_peak_is_measured() -> None:
    report = runtime.run(spec(allocate(32), limits={"memory": {"max": "128M"}}))
    assert (report.exit_code, report.signal, report.oom_killed) == (0, None, False)
    assert report.memory_peak_bytes is not None and 32 * MiB < report.memory_peak_bytes < 128 * MiB


def test_mem_high_throttles_page_cache_without_a_kill() -> None:
    write = ["dd", "if=/dev/zero", f"of={DISK}", "bs=1M", "count=128", "status=none"]
    report = runtime.run(spec(write, limits={"memory": {"high": "32M"}}, security={"devices": [DISK]}))
    assert (report.exit_code, report.oom_killed) == (0, False)
    assert report.memory_high_events > 0
    assert report.memory_peak_bytes is not None and report.memory_peak_bytes < 96 * MiB


def test_cpus_half_holds_a_busy_loop_to_half_a_cpu(tmp_path: Path) -> None:
    share = tmp_path / "share"
    start = time.time() + 3  # after the interpreter has started
    report = runtime.run(spec(busy_loop_share(start, start + 4.5, share), limits={"cpu": {"cpus": "0.5"}}))
    assert report.exit_code == 0
    assert 0.45 <= float(share.read_text()) <= 0.55, share.read_text()
    assert report.limits["cpu.max"] == "50000 100000"
    assert report.cpu_throttled_periods > 0 and report.cpu_throttled_seconds > 1


def test_cpu_weights_100_and_300_share_a_contended_cpu_1_to_3(tmp_path: Path) -> None:
    start = time.time() + 5
    shares = {weight: tmp_path / f"share-{weight}" for weight in (100, 300)}
    runs = [
        threading.Thread(
            target=runtime.run,
            args=(
                spec(
                    busy_loop_share(start, start + 6, shares[weight]),
                    name=f"weight-{weight}",
                    limits={"cpu": {"weight": weight, "cpuset": "0"}},
                ),
            ),
        )
        for weight in shares
    ]
    for thread in runs:
        thread.start()
    for thread in runs:
        thread.join()
    low, high = (float(shares[weight].read_text()) for weight in (100, 300))
    assert 2.5 <= high / low <= 3.5, f"weight 300 got {high:.3f} of the CPU, weight 100 got {low:.3f}"


def test_io_max_wbps_limits_direct_writes(tmp_path: Path) -> None:
    write = ["dd", "if=/dev/zero", f"of={DISK}", "bs=64K", "count=64", "oflag=direct", "status=none"]  # 4 MiB
    started = time.monotonic()
    report = runtime.run(
        spec(write, limits={"io": {"max": [f"{DISK}:wbps=1M"]}}, security={"devices": [DISK]})
    )
    rate = 4 / (time.monotonic() - started)
    assert report.exit_code == 0
    assert 0.6 <= rate <= 1.3, f"{rate:.2f} MiB/s under wbps=1M"
    major_minor = Path(f"/sys/class/block/{Path(DISK).name}/dev").read_text().strip()
    assert report.limits["io.max"].startswith(f"{major_minor} rbps=max wbps=1048576")
    written = {usage.device: usage.write_bytes for usage in report.io}
    assert written[Path(DISK).name] == 4 * MiB


@pytest.fixture
def iocost_on_disk() -> Iterator[str]:
    """Switch io.cost on for the test disk (per-device io.weight needs it), and off again after."""
    major_minor = Path(f"/sys/class/block/{Path(DISK).name}/dev").read_text().strip()
    qos = Path("/sys/fs/cgroup/io.cost.qos")
    qos.write_text(f"{major_minor} enable=1")
    try:
        yield major_minor
    finally:
        qos.write_text(f"{major_minor} enable=0")


def test_io_weight_is_written_for_the_device_and_as_default(iocost_on_disk: str) -> None:
    report = runtime.run(spec(["true"], limits={"io": {"weight": ["300", f"{DISK}:50"]}}))
    assert report.limits["io.weight"].splitlines() == ["default 300", f"{iocost_on_disk} 50"]


def test_pids_max_makes_fork_fail(tmp_path: Path) -> None:
    out = tmp_path / "forks"
    forker = (
        "import errno, os, sys, time\n"
        "children = 0\n"
        "while True:\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except OSError as e:\n"
        "        open(sys.argv[1], 'w').write(f'{children} {errno.errorcode[e.errno]}'); break\n"
        "    if pid == 0:\n"
        "        time.sleep(30); os._exit(0)\n"
        "    children += 1\n"
    )
    report = runtime.run(spec([PYTHON, "-S", "-c", forker, str(out)], limits={"pids": {"max": 4}}))
    assert out.read_text() == "3 EAGAIN"
    assert report.pids_refused_forks >= 1 and report.pids_peak == 4
    assert report.exit_code == 0  # its sleeping children were killed with the cgroup


def test_cgroup_set_writes_any_other_interface_file() -> None:
    report = runtime.run(spec(["true"], limits={"files": {"memory.swap.max": "0", "cpu.weight.nice": "5"}}))
    assert report.limits["memory.swap.max"] == "0" and report.limits["cpu.weight.nice"] == "5"


def test_cpu_idle_and_cpuset_are_applied(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    command = ["sh", "-c", f"grep Cpus_allowed_list /proc/self/status > {allowed}"]
    report = runtime.run(spec(command, limits={"cpu": {"idle": True, "cpuset": "1"}}))
    assert report.limits["cpu.idle"] == "1" and report.limits["cpuset.cpus"] == "1"
    assert allowed.read_text().split() == ["Cpus_allowed_list:", "1"]


def test_limits_are_written_before_the_workload_runs(tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    command = ["sh", "-c", f"cat /sys/fs/cgroup/memory.max /sys/fs/cgroup/pids.max > {seen}"]
    runtime.run(spec(command, limits={"memory": {"max": "32M"}, "pids": {"max": 9}}))
    assert seen.read_text().split() == [str(32 * MiB), "9"]


def test_the_cli_spawns_a_real_supervisor() -> None:
    """One real `cgctl run` process end to end (the other tests call the CLI in-process)."""
    done = subprocess.run([PYTHON, "-m", "cgctl", "run", "--mem", "64M", "--", "sh", "-c", "exit 7"])
    assert done.returncode == 7
