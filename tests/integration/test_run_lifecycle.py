"""A run's life: the environment it starts with, its exit status, signals, and what is left after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cgctl import runtime
from tests.integration.workloads import (
    CGCTL_ROOT,
    PYTHON,
    cgctl_in_process,
    run_records,
    spec,
    wait_for,
    workload_cgroups,
    workload_pids,
)


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for the VM's init to reap it counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.usefixtures("no_leaks")
def test_workload_runs_inside_its_cgroup_from_its_first_instruction(tmp_path: Path) -> None:
    seen = tmp_path / "cgroup"
    runtime.run(
        spec(["cp", "/proc/self/cgroup", str(seen)], name="where-am-i", namespaces={"share": ["cgroup"]})
    )
    assert seen.read_text() == "0::/cgctl.slice/where-am-i\n"


@pytest.mark.usefixtures("no_leaks")
def test_env_env_file_workdir_and_labels(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# settings\nFROM_FILE=1\nOVERRIDDEN=file\n\n")
    seen, report_file = tmp_path / "seen", tmp_path / "report.json"
    status, _, _ = cgctl_in_process(
        capfd,
        "run",
        "--env-file",
        str(env_file),
        "--env",
        "OVERRIDDEN=flag",
        "--env",
        "EMPTY=",
        "--workdir",
        str(tmp_path),
        "--label",
        "team=infra",
        "--label",
        "tier=gold",
        "--report",
        str(report_file),
        "--",
        "sh",
        "-c",
        f"pwd > {seen}; env >> {seen}",
    )
    assert status == 0
    lines = seen.read_text().splitlines()
    assert lines[0] == str(tmp_path)
    assert {"FROM_FILE=1", "OVERRIDDEN=flag", "EMPTY="} <= set(lines)
    assert not any("infra" in line or "gold" in line for line in lines), "a label leaked into the environment"
    assert json.loads(report_file.read_text())["labels"] == {"team": "infra", "tier": "gold"}


@pytest.mark.usefixtures("no_leaks")
@pytest.mark.parametrize(
    ("command", "status", "message"),
    [
        (["no-such-command"], 127, "no-such-command: command not found"),
        (["{plain}"], 126, "cannot execute: Permission denied"),
        (["{garbage}"], 126, "cannot execute: Exec format error"),
        (["sh", "-c", "exit 3"], 3, ""),
        (["sh", "-c", "kill -TERM $$"], 143, "killed by SIGTERM"),
    ],
)
def test_exit_status_follows_docker(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, command: list[str], status: int, message: str
) -> None:
    plain, garbage = tmp_path / "plain", tmp_path / "garbage"
    plain.write_text("#!/bin/sh\n")
    garbage.write_bytes(b"\x00\x01not a program")
    garbage.chmod(0o755)
    argv = [arg.format(plain=plain, garbage=garbage) for arg in command]
    got, _, err = cgctl_in_process(capfd, "run", "--share", "pid", "--", *argv)
    assert got == status
    assert message in err


@pytest.mark.usefixtures("no_leaks")
def test_processes_left_behind_are_killed_with_the_cgroup(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    report = runtime.run(
        spec(["sh", "-c", f"setsid sleep 1000 & echo $! > {pidfile}"], namespaces={"share": ["pid"]})
    )
    assert report.exit_code == 0
    pid = int(pidfile.read_text())
    wait_for(lambda: gone(pid), "the escaped sleep to be killed", timeout=10)


ORPHAN_MAKER = r"""
import os, sys, time
if os.fork() == 0:  # a child that leaves an orphan behind: pid 1 inherits it
    if os.fork() == 0:
        time.sleep(0.2); os._exit(0)
    os._exit(0)
os.wait()
time.sleep(1.5)
pids = [p for p in os.listdir("/proc") if p.isdigit()]
states = [open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[0] for p in pids]
open(sys.argv[1], "w").write(" ".join(sorted(states)))
"""


@pytest.mark.usefixtures("no_leaks")
def test_init_reaps_orphans(tmp_path: Path) -> None:
    states = tmp_path / "states"
    report = runtime.run(spec([PYTHON, "-S", "-c", ORPHAN_MAKER, str(states)], init=True))
    assert report.exit_code == 0
    assert "Z" not in states.read_text().split(), "an orphan was left a zombie"
    assert len(states.read_text().split()) == 2  # the init and the workload, nothing else


def start_supervisor(name: str, *command: str) -> subprocess.Popen[bytes]:
    supervisor = subprocess.Popen([PYTHON, "-m", "cgctl", "run", "--name", name, "--", *command])
    wait_for(lambda: workload_pids(name), "the workload to start")
    return supervisor


FORWARDED = ("INT", "HUP", "QUIT", "USR1", "USR2", "TERM")


@pytest.mark.usefixtures("no_leaks")
def test_signals_to_cgctl_reach_the_workload(tmp_path: Path) -> None:
    log, ready = tmp_path / "log", tmp_path / "ready"
    traps = "; ".join(f"trap 'echo {sig} >> {log}' {sig}" for sig in FORWARDED[:-1])
    script = f"{traps}; trap 'exit 42' TERM; touch {ready}; while :; do sleep 0.1; done"
    supervisor = start_supervisor("trapper", "sh", "-c", script)
    wait_for(ready.exists, "the workload's traps")  # before them, pid 1 ignores signals, as the kernel wants
    for sig in FORWARDED:
        supervisor.send_signal(getattr(signal, f"SIG{sig}"))
        if sig != "TERM":
            wait_for(lambda sig=sig: log.exists() and sig in log.read_text().split(), f"SIG{sig} to arrive")
    assert supervisor.wait(timeout=60) == 42
    assert log.read_text().split() == list(FORWARDED[:-1])


@pytest.mark.usefixtures("no_leaks")
def test_init_forwards_signals_to_a_command_without_handlers() -> None:
    supervisor = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "run", "--init", "--name", "inited", "--", "sleep", "1000"]
    )
    wait_for(lambda: len(workload_pids("inited")) == 2, "the init and its command")
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=60) == 128 + signal.SIGTERM


@pytest.mark.usefixtures("no_leaks")
def test_a_workload_ignoring_sigint_as_pid_1_is_killed_by_a_second_one() -> None:
    supervisor = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "run", "--name", "stubborn", "--", "sleep", "1000"],
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: workload_pids("stubborn"), "the workload to start")
    time.sleep(1)  # past exec: now the kernel drops SIGINT for this pid 1 without a handler
    supervisor.send_signal(signal.SIGINT)
    time.sleep(1)  # two signals sent at once would arrive as one
    assert supervisor.poll() is None, "one SIGINT must not kill a workload"
    supervisor.send_signal(signal.SIGINT)
    assert supervisor.wait(timeout=60) == 128 + signal.SIGKILL
    assert "ignores SIGINT; send it again to kill it (--init avoids this)" in supervisor.stderr.read()


def test_sigkill_of_cgctl_kills_the_workload_and_the_next_cgctl_cleans_up() -> None:
    before = workload_cgroups(), run_records()
    supervisor = start_supervisor("orphan", "sh", "-c", "sleep 1000 & sleep 1000")
    pids = workload_pids("orphan")
    supervisor.kill()
    supervisor.wait()
    wait_for(lambda: not workload_pids("orphan"), "the workload to die with its supervisor", timeout=10)
    assert all(gone(pid) for pid in pids)
    assert (
        "orphan" in workload_cgroups() and "orphan.json" in run_records()
    )  # what a killed cgctl cannot clean
    runtime.run(spec(["true"]))  # the next cgctl that starts
    assert (workload_cgroups(), run_records()) == before


@pytest.mark.usefixtures("no_leaks")
def test_a_name_in_use_is_refused(capfd: pytest.CaptureFixture[str]) -> None:
    supervisor = start_supervisor("taken", "sleep", "1000")
    try:
        status, _, err = cgctl_in_process(capfd, "run", "--name", "taken", "--", "true")
        assert status == 125
        assert "invalid value 'taken' for --name: already in use by a running workload" in err
    finally:
        supervisor.kill()
        supervisor.wait()
        runtime.run(spec(["true"]))  # clean up after the killed supervisor


def test_a_cgroup_cgctl_did_not_create_is_never_touched() -> None:
    foreign = CGCTL_ROOT / "foreign"
    foreign.mkdir()
    try:
        keeper = subprocess.Popen(["sleep", "1000"])
        (foreign / "cgroup.procs").write_text(str(keeper.pid))
        runtime.run(spec(["true"]))
        assert workload_pids("foreign") == [keeper.pid]
        with pytest.raises(Exception, match="'foreign' already exists"):
            runtime.run(spec(["true"], name="foreign"))
    finally:
        keeper.kill()
        keeper.wait()
        wait_for(lambda: not workload_pids("foreign"), "the keeper to go")
        foreign.rmdir()
    assert not os.path.exists(foreign)
