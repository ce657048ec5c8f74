"""Small real workloads and helpers for the `cgctl run` integration tests."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cgctl import runtime
from cgctl.cli import main as cgctl_main
from cgctl.spec import WorkloadSpec

MiB = 1 << 20
PYTHON = sys.executable
CGCTL_ROOT = Path("/sys/fs/cgroup/cgctl.slice")
STATE_DIR = Path("/run/cgctl/runs")


def allocate(mib: int) -> list[str]:
    """Allocate and touch mib MiB of anonymous memory."""
    return [PYTHON, "-S", "-c", f"b = b'x' * {mib * MiB}"]


def busy_loop_share(start_at: float, end_at: float, out: Path) -> list[str]:
    """Spin from start_at to end_at (wall clock) and write the CPU share the loop got in that window."""
    code = (
        "import sys, time\n"
        f"while time.time() < {start_at}: time.sleep(0.01)\n"
        "cpu = time.process_time()\n"
        f"while time.time() < {end_at}: pass\n"
        f"open(sys.argv[1], 'w').write(str((time.process_time() - cpu) / ({end_at} - {start_at})))\n"
    )
    return [PYTHON, "-S", "-c", code, str(out)]


def spec(command: list[str], **fields: object) -> WorkloadSpec:
    return WorkloadSpec.model_validate({"command": command, **fields})


def workload_cgroups() -> list[str]:
    return sorted(p.name for p in CGCTL_ROOT.iterdir() if p.is_dir()) if CGCTL_ROOT.exists() else []


def run_records() -> list[str]:
    return sorted(p.name for p in STATE_DIR.glob("*.json")) if STATE_DIR.exists() else []


def workload_pids(name: str) -> list[int]:
    procs = CGCTL_ROOT / name / "cgroup.procs"
    try:
        return [int(pid) for pid in procs.read_text().split()]
    except FileNotFoundError:
        return []


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def cgctl_in_process(capfd: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """Run the CLI in this process (a new Python costs seconds in the VM): (status, stdout, stderr)."""
    capfd.readouterr()
    saved = sys.argv
    sys.argv = ["cgctl", *args]
    try:
        cgctl_main()
        status = 0
    except SystemExit as exit_:
        status = int(exit_.code or 0)
    finally:
        sys.argv = saved
    out, err = capfd.readouterr()
    return status, out, err


def tmpfs(path: Path) -> Path:
    """A tmpfs at path: image stores (whiteouts) and overlayfs upper directories cannot live on the
    VM's root, which is itself overlayfs."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(path)], check=True)
    return path


class Background:
    """Workloads run by cgctl's library in threads, killed (cgroup.kill) when the test is done."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.names: list[str] = []

    def start(self, name: str, command: list[str], **fields: object) -> None:
        thread = threading.Thread(target=runtime.run, args=(spec(command, name=name, **fields),), daemon=True)
        thread.start()
        self.threads.append(thread)
        self.names.append(name)
        wait_for(lambda: bool(workload_pids(name)), f"{name} to start")

    def stop(self) -> None:
        for name in self.names:
            kill = CGCTL_ROOT / name / "cgroup.kill"
            if kill.exists():
                kill.write_text("1")
        for thread in self.threads:
            thread.join(timeout=60)
