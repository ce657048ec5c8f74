"""Run records: the flock that makes names unique and tells dead runs from live ones.

The locks are real (another process holds one); no cgroup is involved here:
the cleanup of a dead run's cgroup is proven in tests/integration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cgctl import state
from cgctl.spec import SpecError

HOLD = "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "


def test_a_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    held = state.claim(tmp_path, "job", {"cgroup": ""})
    with pytest.raises(SpecError, match="already in use by a running workload"):
        state.claim(tmp_path, "job", {"cgroup": ""})
    held.release()
    assert not (tmp_path / "job.json").exists()
    state.claim(tmp_path, "job", {"cgroup": ""}).release()


def test_the_record_says_where_the_run_is(tmp_path: Path) -> None:
    held = state.claim(
        tmp_path / "new", "job", {"cgroup": "/sys/fs/cgroup/cgctl.slice/job", "supervisor": 42}
    )
    assert json.loads((tmp_path / "new" / "job.json").read_text())["supervisor"] == 42
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "new" / "job.json").stat().st_mode & 0o777 == 0o600
    held.release()


def test_clean_stale_removes_dead_runs_and_leaves_live_ones(tmp_path: Path) -> None:
    (tmp_path / "dead.json").write_text(json.dumps({"cgroup": ""}))
    (tmp_path / "live.json").write_text(json.dumps({"cgroup": ""}))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            HOLD + "print('held', flush=True); time.sleep(60)",
            str(tmp_path / "live.json"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout and holder.stdout.readline() == "held\n"
        assert state.clean_stale(tmp_path) == ["dead"]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["live.json"]
    finally:
        holder.kill()
        holder.wait()
    assert state.clean_stale(tmp_path) == ["live"]  # its holder died: now it is stale too


def test_state_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CGCTL_STATE_DIR", str(tmp_path))
    assert state.default_state_dir() == tmp_path


def test_live_records_are_the_locked_ones(tmp_path: Path) -> None:
    held = state.claim(tmp_path, "live", {"cgroup": ""})
    (tmp_path / "dead.json").write_text("{}")
    try:
        assert [path for path, _ in state.live_records(tmp_path)] == [tmp_path / "live.json"]
    finally:
        held.release()
    assert state.live_records(tmp_path) == []


def test_live_records_are_found_where_proc_locks_names_another_device(tmp_path: Path) -> None:
    """On overlayfs /proc/locks lists the lock on the real (upper) inode's device, not stat's: such a
    record is asked of the kernel with a lock probe instead of looking dead."""
    held = state.claim(tmp_path, "live", {"cgroup": ""})
    (tmp_path / "dead.json").write_text("{}")
    inode = held.path.stat().st_ino
    elsewhere = tmp_path / "locks"
    elsewhere.write_text(f"1: FLOCK  ADVISORY  WRITE {os.getpid()} 00:99:{inode} 0 EOF\n")
    try:
        assert [path for path, _ in state.live_records(tmp_path, elsewhere)] == [held.path]
    finally:
        held.release()
    assert state.live_records(tmp_path, elsewhere) == []


def test_updates_keep_the_locked_inode_and_are_never_seen_half_written(tmp_path: Path) -> None:
    held = state.claim(tmp_path, "job", {"spec": {"command": ["x" * 500]}})
    inode = held.path.stat().st_ino
    reader = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom cgctl import state\n"
         "for _ in range(3000): state.read(Path(sys.argv[1]))", str(held.path)],
    )  # fmt: skip
    for number in range(3000):
        state.update(held.path, pid=number, spec={"command": ["y"]} if number % 2 else None)
    assert reader.wait() == 0, "a reader saw the record empty or cut short"
    assert held.path.stat().st_ino == inode
    assert json.loads(held.path.read_text()) == {"pid": 2999, "spec": {"command": ["y"]}}
    held.release()
