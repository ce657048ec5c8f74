"""The micro-VM runner itself: everything else trusts it to carry the command in and the status out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.vm import microvm

RUNNER = [sys.executable, str(Path(microvm.__file__))]


def test_job_script_carries_argv_env_and_cwd_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tricky = ["it's", 'say "hi"', "$HOME", "two\nlines", "*", ""]
    monkeypatch.chdir(tmp_path)
    env = {"PATH": os.environ["PATH"], "QUOTED": "a'b\"c $x", "_": "dropped", "SHLVL": "3"}
    show = "import json, os, sys; print(json.dumps([sys.argv[1:], dict(os.environ), os.getcwd()]))"
    microvm.write_job(tmp_path, [sys.executable, "-c", show, *tricky], env)
    monkeypatch.chdir("/")
    done = subprocess.run(["sh", str(tmp_path / "job.sh")], capture_output=True, text=True, check=True)
    argv, seen_env, cwd = json.loads(done.stdout)
    assert argv == tricky
    assert cwd == str(tmp_path)
    assert seen_env["QUOTED"] == "a'b\"c $x"
    assert "SHLVL" not in seen_env and seen_env["CGCTL_VM"] == "1"
    assert seen_env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_status_output_and_artifacts_come_back_from_the_guest(tmp_path: Path) -> None:
    script = 'echo out; echo err >&2; echo kept > "$CGCTL_VM_OUT/artifact"; uname -r; exit 7'
    done = subprocess.run(
        [*RUNNER, "--artifacts", str(tmp_path), "--", "sh", "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 7, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["out", "err"]
    assert lines[2] != os.uname().release, "the command ran on the host's kernel, not the VM's"
    assert (tmp_path / "artifact").read_text() == "kept\n"
    assert (tmp_path / "status").read_text().strip() == "7"
    assert "Linux version" in (tmp_path / "dmesg.log").read_text()


def test_timeout_stops_the_vm_with_status_124() -> None:
    started = time.monotonic()
    done = subprocess.run(
        [*RUNNER, "--timeout", "20", "--", "sleep", "600"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == microvm.EXIT_TIMEOUT
    assert "timed out after 20s" in done.stderr
    assert time.monotonic() - started < 120


def test_systemd_mode_runs_the_command_as_a_unit_of_systemd_as_pid_1() -> None:
    script = (
        "systemctl is-system-running --wait; cat /proc/1/comm /proc/self/cgroup; "
        "stat -f -c %T /sys/fs/cgroup; hostname; exit 3"
    )
    done = subprocess.run(
        [*RUNNER, "--systemd", "--", "sh", "-c", script], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 3, done.stderr
    # "running": the boot finished with no failed unit, and the job's own start did not hold it up.
    assert done.stdout.splitlines() == [
        "running",
        "systemd",
        "0::/system.slice/microvm-job.service",
        "cgroup2fs",
        "microvm",
    ]
