"""`cgctl top` and the daemon's process metrics on this host's real processes, in a fake cgroup tree
(tmp_path) whose cgroup.procs files name them: psutil reads the processes, never /sys/fs/cgroup.
The same through a real kernel's cgroups, a pid namespace and the daemon: tests/integration/test_top.py.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cgctl import metrics, processes, state
from cgctl.cgroup.fs import Cgroup
from cgctl.cli import main
from cgctl.runtime.api import NotFound, ProcessRow
from cgctl.runtime.local import LocalRuntime

SLEEP = [sys.executable, "-c", "import time; time.sleep(600)", "sleeper"]
SPIN = [sys.executable, "-c", "while True: pass", "spinner"]


@pytest.fixture
def workload(tmp_path: Path) -> Iterator[tuple[Path, list[subprocess.Popen[bytes]]]]:
    """A container's cgroup with a sleeper in it and a spinner in a cgroup nested below, and its
    live run record (this test holds the lock, as a supervisor would)."""
    children = [subprocess.Popen(SLEEP), subprocess.Popen(SPIN)]
    group = tmp_path / "cgroup" / "web"
    (group / "nested").mkdir(parents=True)
    (group / "cgroup.procs").write_text(f"{children[0].pid}\n")
    (group / "nested" / "cgroup.procs").write_text(f"{children[1].pid}\n")
    claim = state.claim(tmp_path / "state", "web", {"cgroup": str(group), "spec": {"command": SLEEP}})
    yield tmp_path / "state", children
    claim.release()
    for child in children:
        child.kill()
        child.wait()


def test_a_cgroups_pids_include_its_nested_cgroups(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "cgroup.procs").write_text("1\n2\n")
    (tmp_path / "a" / "cgroup.procs").write_text("")
    (tmp_path / "a" / "b" / "cgroup.procs").write_text("3\n")
    assert sorted(Cgroup(tmp_path).pids()) == [1, 2, 3]
    assert Cgroup(tmp_path / "gone").pids() == []


def test_top_lists_every_process_of_the_tree(
    workload: tuple[Path, list[subprocess.Popen[bytes]]],
) -> None:
    state_dir, (sleeper, spinner) = workload
    rows = LocalRuntime(state_dir).top("web")
    assert [row.pid for row in rows] == sorted([sleeper.pid, spinner.pid])
    by_pid = {row.pid: row for row in rows}
    assert by_pid[sleeper.pid].command == SLEEP
    assert by_pid[spinner.pid].cpu_percent > 20 > by_pid[sleeper.pid].cpu_percent
    for row in rows:
        assert row.nspid == row.pid  # this pid namespace is theirs too
        assert (row.uid, row.user) == (os.geteuid(), pwd.getpwuid(os.geteuid()).pw_name)
        assert row.rss_bytes > 1 << 20
        assert time.time() - 120 < row.started_at <= time.time()


def test_a_process_that_exits_meanwhile_is_left_out() -> None:
    leaving, staying = subprocess.Popen(SLEEP), subprocess.Popen(SLEEP)
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process
    threading.Timer(0.1, leaving.kill).start()
    try:
        rows = processes.sample([gone.pid, leaving.pid, staying.pid], interval=0.5)
        assert [row["pid"] for row in rows] == [staying.pid]
    finally:
        for child in (leaving, staying):
            child.kill()
            child.wait()


def test_the_cli_shows_a_table_and_json(
    workload: tuple[Path, list[subprocess.Popen[bytes]]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    state_dir, (sleeper, _) = workload
    monkeypatch.setenv("CGCTL_STATE_DIR", str(state_dir))
    monkeypatch.setattr("cgctl.runtime.interface.default_sockets", lambda: [])
    assert cgctl(monkeypatch, "top", "web") == 0
    header, *lines = capsys.readouterr().out.splitlines()
    assert header.split() == ["PID", "NSPID", "USER", "CPU", "%", "RSS", "STARTED", "COMMAND"]
    mine = next(line for line in lines if line.startswith(f"{sleeper.pid} "))
    assert mine.endswith(" ".join(SLEEP)) and " MiB " in mine
    assert cgctl(monkeypatch, "top", "web", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 and set(rows[0]) == set(ProcessRow.model_fields)
    assert isinstance(rows[0]["rss_bytes"], int)


def test_an_unknown_container_exits_125(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CGCTL_STATE_DIR", str(tmp_path))
    monkeypatch.setattr("cgctl.runtime.interface.default_sockets", lambda: [])
    assert cgctl(monkeypatch, "top", "ghost") == 125
    assert capsys.readouterr().err == "cgctl: no running container named 'ghost'\n"
    with pytest.raises(NotFound):
        LocalRuntime(tmp_path).top("ghost")


def test_process_metrics_of_the_daemon_and_its_keeper() -> None:
    keeper = subprocess.Popen(SLEEP)
    try:
        text = metrics.render_processes({"daemon": os.getpid(), "keeper": keeper.pid, "absent": None})
    finally:
        keeper.kill()
        keeper.wait()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert set(families) == {
        "cgctl_process_cpu_seconds",  # the parser drops a counter's _total
        "cgctl_process_resident_memory_bytes",
        "cgctl_process_open_fds",
        "cgctl_process_threads",
        "cgctl_process_start_time_seconds",
    }
    for family in families.values():
        assert [sample.labels for sample in family.samples] == [{"process": "daemon"}, {"process": "keeper"}]
    threads = {s.labels["process"]: s.value for s in families["cgctl_process_threads"].samples}
    assert threads["keeper"] == 1 and threads["daemon"] >= 1
    started = families["cgctl_process_start_time_seconds"].samples[1].value
    assert abs(started - time.time()) < 60
    assert processes.resources(keeper.pid) is None  # gone: no rows, never an error


def cgctl(monkeypatch: pytest.MonkeyPatch, *args: str) -> int:
    monkeypatch.setattr("sys.argv", ["cgctl", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return int(exit_.value.code or 0)
