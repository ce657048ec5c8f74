"""cgctl update on running workloads: the new limit bites, bad values change nothing, failures roll back."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.workloads import (
    CGCTL_ROOT,
    PYTHON,
    STATE_DIR,
    MiB,
    cgctl_in_process,
    wait_for,
    workload_pids,
)

pytestmark = pytest.mark.usefixtures("no_leaks")


def waiting_allocation(go: Path, mib: int) -> list[str]:
    code = (
        "import os, time\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.05)\n"
        f"b = b'x' * {mib * MiB}\ntime.sleep(3600)\n"
    )
    return [PYTHON, "-S", "-c", code]


def supervise(name: str, *args: str, report: Path | None = None) -> subprocess.Popen[str]:
    extra = ["--report", str(report)] if report else []
    supervisor = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "run", "--name", name, *extra, *args], stderr=subprocess.PIPE, text=True
    )
    wait_for(lambda: workload_pids(name), f"{name} to start")
    return supervisor


def limit(name: str, file: str) -> str:
    return (CGCTL_ROOT / name / file).read_text().strip()


def test_lowering_mem_on_a_running_workload_oom_kills_at_the_new_limit(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    go, report = tmp_path / "go", tmp_path / "report.json"
    supervisor = supervise("shrinking", "--mem", "256M", "--", *waiting_allocation(go, 96), report=report)
    status, out, err = cgctl_in_process(capfd, "update", "shrinking", "--mem", "64M", "--pids", "32")
    assert status == 0, err
    assert out.splitlines() == [f"shrinking: memory.max = {64 * MiB}", "shrinking: pids.max = 32"]
    record = json.loads((STATE_DIR / "shrinking.json").read_text())
    assert (
        record["spec"]["limits"]["memory"]["max"] == 64 * MiB
        and record["spec"]["limits"]["pids"]["max"] == 32
    )
    go.touch()
    assert supervisor.wait(timeout=120) == 137
    assert "memory.max 64 MiB reached" in (supervisor.stderr.read() if supervisor.stderr else "")
    final = json.loads(report.read_text())
    assert (
        final["oom_killed"]
        and final["limits"]["memory.max"] == str(64 * MiB)
        and final["limits"]["pids.max"] == "32"
    )


@pytest.fixture
def sleeper() -> subprocess.Popen[str]:
    supervisor = supervise("steady", "--mem", "128M", "--cpus", "1", "--", "sleep", "3600")
    yield supervisor
    supervisor.terminate()
    supervisor.stderr and supervisor.stderr.close()
    subprocess.run([PYTHON, "-m", "cgctl", "kill", "steady"], capture_output=True)
    supervisor.wait(timeout=60)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mem", "64M", "--cpus", "0"], "invalid value '0' for --cpus"),
        (["--mem", "64M", "--io-max", "/dev/nope:wbps=1M"], "invalid value '/dev/nope' for --io-max"),
        (
            ["--mem", "64M", "--cgroup-set", "memory.bogus=1"],
            "invalid value 'memory.bogus=1' for --cgroup-set",
        ),
    ],
)
def test_a_bad_value_changes_nothing(
    capfd: pytest.CaptureFixture[str], sleeper: subprocess.Popen[str], args: list[str], message: str
) -> None:
    status, _, err = cgctl_in_process(capfd, "update", "steady", *args)
    assert status == 125 and message in err
    assert limit("steady", "memory.max") == str(128 * MiB)


def test_a_failing_write_puts_back_what_was_written(
    capfd: pytest.CaptureFixture[str], sleeper: subprocess.Popen[str]
) -> None:
    # cpu.max.burst larger than the quota is refused by the kernel, after memory.max was written.
    status, _, err = cgctl_in_process(
        capfd, "update", "steady", "--mem", "64M", "--cgroup-set", "cpu.max.burst=999999999"
    )
    assert status == 125
    assert "cpu.max.burst: cannot write" in err and "the 1 value(s) already written were put back" in err
    assert limit("steady", "memory.max") == str(128 * MiB)
    record = json.loads((STATE_DIR / "steady.json").read_text())
    assert record["spec"]["limits"]["memory"]["max"] == 128 * MiB


def test_updating_an_unknown_container_or_nothing_is_refused(capfd: pytest.CaptureFixture[str]) -> None:
    status, _, err = cgctl_in_process(capfd, "update", "ghost", "--mem", "64M")
    assert status == 125 and "no running container named 'ghost'" in err
    status, _, err = cgctl_in_process(capfd, "update", "ghost")
    assert status == 125 and "nothing to update" in err


def test_a_new_io_max_line_for_a_device_replaces_the_old_one_whole(
    sleeper: subprocess.Popen[str], capfd: pytest.CaptureFixture[str]
) -> None:
    """The kernel changes only the keys an io.max write names: a cap the new line leaves out goes."""
    disk = os.environ.get("CGCTL_VM_DISK", "/dev/vda")
    device = os.stat(disk).st_rdev
    number = f"{os.major(device)}:{os.minor(device)}"
    assert cgctl_in_process(capfd, "update", "steady", "--io-max", f"{disk}:wbps=1M")[0] == 0
    assert limit("steady", "io.max") == f"{number} rbps=max wbps=1048576 riops=max wiops=max"
    assert cgctl_in_process(capfd, "update", "steady", "--io-max", f"{disk}:rbps=5M")[0] == 0
    assert limit("steady", "io.max") == f"{number} rbps=5242880 wbps=max riops=max wiops=max"
