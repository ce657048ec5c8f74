"""`cgctl run` against the real kernel: the limit bites, the exit status tells, nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cgctl import runtime
from cgctl.cgroup.fs import CgroupError
from cgctl.spec import WorkloadSpec

MiB = 1 << 20
PYTHON = sys.executable
CGCTL_ROOT = Path("/sys/fs/cgroup/cgctl.slice")


def allocate(mib: int) -> list[str]:
    return [PYTHON, "-S", "-c", f"b = b'x' * {mib * MiB}"]


def spec(command: list[str], **memory: object) -> WorkloadSpec:
    return WorkloadSpec.model_validate({"command": command, "limits": {"memory": memory}})


def workload_cgroups() -> list[str]:
    return sorted(p.name for p in CGCTL_ROOT.iterdir() if p.is_dir()) if CGCTL_ROOT.exists() else []


@pytest.fixture(autouse=True)
def no_leaked_cgroups() -> Iterator[None]:
    before = workload_cgroups()
    yield
    assert workload_cgroups() == before, "a run left its cgroup behind"


def test_allocation_over_mem_is_oom_killed_and_reported() -> None:
    result = runtime.run(spec(allocate(200), max="64M"))
    assert result.oom_killed and result.oom_kills >= 1
    assert result.signal == 9 and result.exit_code is None
    assert result.memory_limit_bytes == 64 * MiB
    assert result.cgroup == str(CGCTL_ROOT / result.name)


def test_allocation_under_mem_runs_to_completion_and_its_peak_is_measured() -> None:
    result = runtime.run(spec(allocate(32), max="128M"))
    assert (result.exit_code, result.signal, result.oom_killed) == (0, None, False)
    assert result.memory_peak_bytes is not None and 32 * MiB < result.memory_peak_bytes < 128 * MiB


def test_workload_runs_inside_its_cgroup_from_its_first_instruction(tmp_path: Path) -> None:
    seen = tmp_path / "cgroup"
    runtime.run(WorkloadSpec(name="where-am-i", command=["cp", "/proc/self/cgroup", str(seen)]))
    assert seen.read_text() == "0::/cgctl.slice/where-am-i\n"


def test_processes_left_behind_are_killed_with_the_cgroup(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    result = runtime.run(spec(["sh", "-c", f"sleep 1000 & echo $! > {pidfile}"]))
    assert result.exit_code == 0
    pid = int(pidfile.read_text())
    # The orphan was reparented to the VM's init, which may not have reaped it yet.
    assert not Path(f"/proc/{pid}").exists() or "State:\tZ" in Path(f"/proc/{pid}/status").read_text()


def test_a_name_in_use_is_refused() -> None:
    (CGCTL_ROOT / "taken").mkdir()
    try:
        with pytest.raises(CgroupError, match="'taken' already exists"):
            runtime.run(WorkloadSpec(name="taken", command=["true"]))
    finally:
        (CGCTL_ROOT / "taken").rmdir()


def cgctl(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PYTHON, "-m", "cgctl", *args], capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]


def test_cli_oom_exits_137_and_names_the_limit() -> None:
    done = cgctl("run", "--name", "job1", "--mem", "64M", "--", *allocate(200))
    assert done.returncode == 137
    assert "cgctl: job1 killed by the OOM killer: memory.max 64 MiB reached (oom_kill " in done.stderr


@pytest.fixture
def unexecutable(tmp_path: Path) -> dict[str, str]:
    """A file without the execute bit, and one with it but no valid format (ENOEXEC)."""
    plain, garbage = tmp_path / "plain", tmp_path / "garbage"
    plain.write_text("#!/bin/sh\n")
    garbage.write_bytes(b"\x00\x01not a program")
    garbage.chmod(0o755)
    return {"plain": str(plain), "garbage": str(garbage)}


@pytest.mark.parametrize(
    ("command", "status"),
    [
        (["no-such-command"], 127),
        (["{plain}"], 126),
        (["{garbage}"], 126),
        (["sh", "-c", "exit 3"], 3),
        (["sh", "-c", "kill $$"], 143),
    ],
)
def test_cli_exit_status_follows_docker(
    command: list[str], status: int, unexecutable: dict[str, str]
) -> None:
    assert cgctl("run", "--", *(arg.format(**unexecutable) for arg in command)).returncode == status


def test_host_without_cgroup2_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hide_cgroup2 = (
        f"mount -t tmpfs none /sys/fs/cgroup && exec {PYTHON} -m cgctl run --mem 64M -- touch {marker}"
    )
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", hide_cgroup2],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert done.returncode == 125
    assert "no cgroup2 filesystem is mounted" in done.stderr and "cgroup_no_v1=all" in done.stderr
    assert not marker.exists()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def workload_pids(name: str) -> list[int]:
    procs = CGCTL_ROOT / name / "cgroup.procs"
    return [int(pid) for pid in procs.read_text().split()] if procs.exists() else []


def test_signals_to_cgctl_are_forwarded_to_the_workload() -> None:
    trap = "trap 'exit 42' TERM; while :; do sleep 0.1; done"
    supervisor = subprocess.Popen([PYTHON, "-m", "cgctl", "run", "--name", "trapper", "--", "sh", "-c", trap])
    wait_for(lambda: len(workload_pids("trapper")) == 2, "the workload to start")  # sh and its sleep
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 42


def test_workload_dies_with_a_killed_cgctl() -> None:
    supervisor = subprocess.Popen([PYTHON, "-m", "cgctl", "run", "--name", "orphan", "--", "sleep", "1000"])
    wait_for(lambda: len(workload_pids("orphan")) == 1, "the workload to start")
    supervisor.kill()
    supervisor.wait()
    try:
        wait_for(lambda: not workload_pids("orphan"), "the workload to die with its supervisor", timeout=10)
    finally:
        (CGCTL_ROOT / "orphan").rmdir()  # a killed cgctl cannot remove its cgroup itself
