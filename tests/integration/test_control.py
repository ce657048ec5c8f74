"""freeze/thaw and kill on running containers, by name, through the CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.workloads import CGCTL_ROOT, PYTHON, cgctl_in_process, wait_for, workload_pids

pytestmark = pytest.mark.usefixtures("no_leaks")


def supervise(name: str, *command: str) -> subprocess.Popen[bytes]:
    supervisor = subprocess.Popen([PYTHON, "-m", "cgctl", "run", "--name", name, "--", *command])
    wait_for(lambda: workload_pids(name), f"{name} to start")
    return supervisor


@pytest.fixture
def counters(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], list[Path]]]:
    """A tree of two processes, each counting into its own file."""
    files = [tmp_path / "parent", tmp_path / "child"]
    count = "i=0; while :; do i=$((i+1)); echo $i > {}; done"
    script = f"sh -c '{count.format(files[1])}' & {count.format(files[0])}"
    supervisor = supervise("counting", "sh", "-c", script)
    wait_for(lambda: all(f.exists() and f.read_text().strip() for f in files), "both counters")
    yield supervisor, files
    supervisor.kill()
    supervisor.wait()
    cgctl_run_cleanup()


def cgctl_run_cleanup() -> None:
    """A SIGKILLed supervisor's cgroup is removed by the next cgctl run."""
    subprocess.run([PYTHON, "-m", "cgctl", "run", "--", "true"], check=True)


def read_counts(files: list[Path]) -> list[str]:
    return [f.read_text() for f in files]


def test_freeze_stops_a_tree_and_thaw_resumes_it(
    capfd: pytest.CaptureFixture[str], counters: tuple[subprocess.Popen[bytes], list[Path]]
) -> None:
    _, files = counters
    status, out, _ = cgctl_in_process(capfd, "freeze", "counting")
    assert (status, out) == (0, "counting: frozen\n")
    assert (CGCTL_ROOT / "counting" / "cgroup.events").read_text().splitlines()[1] == "frozen 1"
    frozen_at = read_counts(files)
    time.sleep(1)
    assert read_counts(files) == frozen_at, "a process of the tree moved while frozen"
    status, out, _ = cgctl_in_process(capfd, "pause", "counting")
    assert (status, out) == (0, "counting: already frozen\n")
    status, out, _ = cgctl_in_process(capfd, "thaw", "counting")
    assert (status, out) == (0, "counting: running\n")
    wait_for(
        lambda: all(a.strip() and a != b for a, b in zip(read_counts(files), frozen_at, strict=True)),
        "both counters to move again",
        timeout=10,
    )
    status, out, _ = cgctl_in_process(capfd, "unpause", "counting")
    assert (status, out) == (0, "counting: already running\n")


def test_kill_leaves_nothing_even_what_forked_away() -> None:
    supervisor = supervise("escaper", "sh", "-c", "setsid sh -c 'sleep 1000' & sleep 1000")
    wait_for(lambda: len(workload_pids("escaper")) == 3, "the escaped child")
    pids = workload_pids("escaper")
    assert subprocess.run([PYTHON, "-m", "cgctl", "kill", "escaper"]).returncode == 0
    assert supervisor.wait(timeout=60) == 128 + signal.SIGKILL
    assert not (CGCTL_ROOT / "escaper").exists()
    assert all(
        not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        for pid in pids
    )


def test_kill_with_a_signal_reaches_every_process(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ready = tmp_path / "ready"
    supervisor = supervise(
        "polite", "sh", "-c", f"trap 'exit 42' TERM; touch {ready}; while :; do sleep 0.1; done"
    )
    wait_for(ready.exists, "the trap")
    status, out, _ = cgctl_in_process(capfd, "kill", "--signal", "TERM", "polite")
    assert status == 0 and out.startswith("polite: SIGTERM sent to ")
    assert supervisor.wait(timeout=60) == 42


def test_a_frozen_container_can_be_killed(capfd: pytest.CaptureFixture[str]) -> None:
    supervisor = supervise("icy", "sleep", "1000")
    assert cgctl_in_process(capfd, "freeze", "icy")[0] == 0
    assert cgctl_in_process(capfd, "kill", "icy")[0] == 0
    assert supervisor.wait(timeout=60) == 128 + signal.SIGKILL


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["freeze", "ghost"], "no running container named 'ghost'"),
        (["thaw", "ghost"], "no running container named 'ghost'"),
        (["kill", "ghost"], "no running container named 'ghost'"),
        (["kill", "--signal", "NOPE", "ghost"], "invalid value 'NOPE' for --signal"),
    ],
)
def test_unknown_names_and_signals_exit_125(
    capfd: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    status, _, err = cgctl_in_process(capfd, *args)
    assert status == 125 and message in err


def test_a_state_directory_on_overlayfs(tmp_path: Path) -> None:
    """The VM's /tmp is on its overlayfs root, as a state directory inside a docker container would
    be: /proc/locks names another device there than stat does, and the run must still be seen."""
    found = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "-T", str(tmp_path)], capture_output=True, text=True
    )
    assert found.stdout.strip() == "overlay", found
    env = {**os.environ, "CGCTL_STATE_DIR": str(tmp_path / "runs")}
    supervisor = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "run", "--name", "on-overlay", "--", "sleep", "300"], env=env
    )
    try:
        wait_for(lambda: workload_pids("on-overlay"), "on-overlay to start")
        listed = subprocess.run([PYTHON, "-m", "cgctl", "ps"], env=env, capture_output=True, text=True)
        assert "on-overlay" in listed.stdout, listed
        killed = subprocess.run([PYTHON, "-m", "cgctl", "kill", "on-overlay"], env=env, capture_output=True)
        assert killed.returncode == 0, killed
        assert supervisor.wait(timeout=120) == 137
    finally:
        if supervisor.poll() is None:  # killed through its cgroup: its supervisor still cleans up
            (CGCTL_ROOT / "on-overlay" / "cgroup.kill").write_text("1")
            supervisor.wait(timeout=120)
