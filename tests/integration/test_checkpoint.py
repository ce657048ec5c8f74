"""cgctl checkpoint / restore with CRIU, for real: processes, memory, cgroups, hooks, failures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl import state
from tests.integration.workloads import (
    CGCTL_ROOT,
    PYTHON,
    STATE_DIR,
    cgctl_in_process,
    wait_for,
    workload_pids,
)

pytestmark = pytest.mark.usefixtures("no_leaks")

COUNTER = "i=0; while :; do i=$((i+1)); echo $i > {file}; echo $i; sleep 0.05; done"
HOOK = """#!/bin/sh
echo "$CGCTL_HOOK_ACTION $CGCTL_CONTAINER $CGCTL_CHECKPOINT_DIR" >> {log}
[ "$CGCTL_HOOK_ACTION" = "{fail_at}" ] && exit 3
exit 0
"""


def cgctl(*args: str, **popen: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen([PYTHON, "-m", "cgctl", *args], **popen)  # type: ignore[call-overload]


def start(name: str, *args: str, **popen: object) -> subprocess.Popen[bytes]:
    """`cgctl run` with stdio CRIU can take along (not a terminal, not pytest's deleted capture file)."""
    stdio = {"stdin": subprocess.DEVNULL, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    supervisor = cgctl("run", "--name", name, *args, **stdio)
    wait_for(lambda: workload_pids(name), f"{name} to start")
    return supervisor


def counter(name: str, file: Path, *args: str) -> subprocess.Popen[bytes]:
    supervisor = start(name, *args, "--", "sh", "-c", COUNTER.format(file=file))
    wait_for(lambda: file.exists() and file.read_text().strip(), f"{name} to count")
    return supervisor


def count(file: Path) -> int:
    text = ""
    while not text.strip():  # caught between truncate and write
        text = file.read_text()
    return int(text)


def hook(tmp_path: Path, fail_at: str = "") -> tuple[Path, Path]:
    path, log = tmp_path / "hook", tmp_path / "hook.log"
    path.write_text(HOOK.format(log=log, fail_at=fail_at))
    path.chmod(0o755)
    return path, log


def host_cgroups(pids: list[int]) -> set[str]:
    """Where the processes are, as the host sees it."""
    seen = set()
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):  # a `sleep` of the counter that ended meanwhile
            seen.add(Path(f"/proc/{pid}/cgroup").read_text().strip())
    return seen


def sandbox_status(pid: int) -> dict[str, str]:
    """The sandbox as the kernel applies it to pid: capability sets, no_new_privs, seccomp filters."""
    keys = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Seccomp", "Seccomp_filters")
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: fields[key].strip() for key in keys}


def stop(*supervisors: subprocess.Popen[bytes], names: tuple[str, ...] = ()) -> None:
    for name in names:
        if (CGCTL_ROOT / name).exists():
            (CGCTL_ROOT / name / "cgroup.kill").write_text("1")
    for supervisor in supervisors:
        if supervisor.poll() is None:
            supervisor.wait(timeout=60)


@pytest.fixture
def cleanup() -> Iterator[list[str]]:
    """Names of containers to kill whatever happens."""
    names: list[str] = []
    yield names
    for name in names:
        if (CGCTL_ROOT / name).exists():
            (CGCTL_ROOT / name / "cgroup.kill").write_text("1")
    wait_for(lambda: not any((CGCTL_ROOT / name).exists() for name in names), "the containers to go")


def test_restored_counter_continues_in_a_new_cgroup_under_its_limits(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, cleanup: list[str]
) -> None:
    cleanup += ["counting", "resumed", "copy"]
    file = tmp_path / "count"
    original = counter("counting", file, "--mem", "64M", "--pids", "50", "--label", "team=ops")
    images, hook_path, hook_log = tmp_path / "images", *hook(tmp_path)
    sandboxed = sandbox_status(state.read(STATE_DIR / "counting.json")["pid"])
    assert sandboxed["Seccomp"] == "2" and sandboxed["NoNewPrivs"] == "1", sandboxed

    status, out, err = cgctl_in_process(capfd, "checkpoint", "counting", "--dir", str(images))
    assert status == 0, err
    assert out.startswith(f"counting: checkpointed to {images} (") and out.endswith("; stopped)\n")
    assert original.wait(timeout=60) == 128 + signal.SIGKILL
    assert original.stdout is not None and original.stderr is not None
    said = original.stderr.read().decode()
    assert f"counting was checkpointed to {images}; cgctl restore --dir {images} resumes it" in said
    printed = original.stdout.read().decode().split()
    assert not (CGCTL_ROOT / "counting").exists()
    stopped_at = count(file)
    last_printed = int(printed[-1])  # the dump may have frozen it between its two echos
    assert last_printed in (stopped_at - 1, stopped_at)
    time.sleep(0.5)
    assert count(file) == stopped_at, "something still counts after the dump"
    manifest = (images / "cgctl.json").read_text()
    assert '"team": "ops"' in manifest and '"max": 67108864' in manifest

    restored = cgctl(
        "restore", "--dir", str(images), "--name", "resumed", "--hook", str(hook_path),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert restored.stdout is not None
    first = int(restored.stdout.readline())  # the workload's stdout is now the restorer's
    assert first == last_printed + 1, "the counter did not continue from where it was"
    pids = workload_pids("resumed")
    assert pids and host_cgroups(pids) == {"0::/cgctl.slice/resumed"}
    group = CGCTL_ROOT / "resumed"
    assert (group / "memory.max").read_text() == f"{64 << 20}\n"
    assert (group / "pids.max").read_text() == "50\n"
    record = STATE_DIR / "resumed.json"
    wait_for(lambda: "pid" in state.read(record), "the restorer to record the pid")
    init = state.read(record)["pid"]
    assert init in pids and host_cgroups([init]) == {"0::/cgctl.slice/resumed"}
    assert sandbox_status(init) == sandboxed, "CRIU did not restore the sandbox (capabilities, seccomp)"
    mounts = {f[4]: f[5] for f in map(str.split, Path(f"/proc/{init}/mountinfo").read_text().splitlines())}
    assert "/proc/kcore" in mounts and mounts["/proc/sys"].startswith("ro,"), "the masks were not restored"
    assert Path(f"/proc/{init}/status").read_text().split("NSpid:")[1].split("\n")[0].split()[-1] == "1"
    assert Path(f"/proc/{init}/ns/pid").resolve() != Path("/proc/self/ns/pid").resolve()
    inside = ["nsenter", "--cgroup", "--target", str(init), "cat", "/proc/self/cgroup"]
    assert subprocess.run(inside, capture_output=True, text=True).stdout == "0::/\n"  # its own cgroup ns
    tables = subprocess.run(
        ["nsenter", "--net", "--target", str(init), "nft", "list", "tables"], capture_output=True, text=True
    )
    assert tables.returncode == 0 and "CRIU" not in tables.stdout, "CRIU's network lock was left in place"
    wait_for(lambda: count(file) > first + 2, "the restored counter to count on")

    # The name is taken while it runs: a second restore under it is refused and changes nothing.
    status, _, err = cgctl_in_process(capfd, "restore", "--dir", str(images), "--name", "resumed")
    assert status == 125 and "already in use" in err, err
    assert init in workload_pids("resumed")

    assert cgctl_in_process(capfd, "kill", "resumed")[0] == 0
    assert restored.wait(timeout=60) == 128 + signal.SIGKILL
    assert restored.stderr is not None
    assert f"restored resumed from {images}" in restored.stderr.read().decode()
    assert hook_log.read_text().split("\n")[:2] == [
        f"pre-restore resumed {images}",
        f"post-restore resumed {images}",
    ]


def test_leave_running_keeps_the_original_and_the_copy_runs_beside_it(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, cleanup: list[str]
) -> None:
    cleanup += ["original", "copy"]
    file = tmp_path / "count"
    original = counter("original", file)
    images = tmp_path / "images"
    status, out, err = cgctl_in_process(
        capfd, "checkpoint", "original", "--dir", str(images), "--leave-running", "--json"
    )
    assert status == 0, err
    result = json.loads(out)
    assert result["directory"] == str(images) and result["left_running"] is True
    assert result["image_bytes"] > 0 and result["seconds"] > 0
    before = count(file)
    wait_for(lambda: count(file) > before + 2, "the original to count on")
    assert original.poll() is None
    record = (STATE_DIR / "original.json").read_text()
    assert "checkpoint" not in record

    copy = cgctl("restore", "--dir", str(images), "--name", "copy", stdout=subprocess.PIPE)
    assert copy.stdout is not None
    assert int(copy.stdout.readline()) > 0
    assert workload_pids("original") and workload_pids("copy")
    assert set(workload_pids("original")).isdisjoint(workload_pids("copy"))
    stop(original, copy, names=("original", "copy"))


def test_a_256_mib_workload_round_trips_with_its_memory_intact(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, cleanup: list[str]
) -> None:
    cleanup.append("big")
    code = (
        "import hashlib, os, signal\n"
        "block = os.urandom(1 << 20)\n"
        "data = bytearray(block) * 256\n"
        "report = lambda *_: print(hashlib.sha256(data).hexdigest(), flush=True)\n"
        "signal.signal(signal.SIGUSR1, report)\n"
        "report()\n"
        "while True: signal.pause()\n"
    )
    original = start("big", "--mem", "512M", "--", PYTHON, "-S", "-c", code)
    assert original.stdout is not None
    digest = original.stdout.readline().decode().strip()
    images = tmp_path / "images"
    status, _, err = cgctl_in_process(capfd, "checkpoint", "big", "--dir", str(images))
    assert status == 0, err
    original.wait(timeout=120)
    assert sum(p.stat().st_size for p in images.glob("pages-*.img")) >= 256 << 20

    restored = cgctl("restore", "--dir", str(images), stdout=subprocess.PIPE)
    wait_for(lambda: workload_pids("big"), "the restored workload", timeout=120)
    wait_for(lambda: '"pid"' in (STATE_DIR / "big.json").read_text(), "the restore to finish", timeout=120)
    assert int((CGCTL_ROOT / "big" / "memory.current").read_text()) >= 256 << 20
    assert cgctl_in_process(capfd, "kill", "--signal", "USR1", "big")[0] == 0
    assert restored.stdout is not None
    assert restored.stdout.readline().decode().strip() == digest
    stop(restored, names=("big",))


def test_a_failing_pre_dump_hook_leaves_the_container_running_and_thawed(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, cleanup: list[str]
) -> None:
    cleanup.append("hooked")
    file = tmp_path / "count"
    original = counter("hooked", file)
    hook_path, hook_log = hook(tmp_path, fail_at="pre-dump")
    images = tmp_path / "images"
    status, _, err = cgctl_in_process(
        capfd, "checkpoint", "hooked", "--dir", str(images), "--hook", str(hook_path)
    )
    assert status == 125
    assert f"the pre-dump hook {hook_path} exited 3" in err and "hooked is still running" in err, err
    assert str(images / "dump.log") in err
    assert hook_log.read_text().splitlines() == [
        f"pre-dump hooked {images}",
        f"failure hooked {images}",
    ]
    assert (CGCTL_ROOT / "hooked" / "cgroup.events").read_text().splitlines()[1] == "frozen 0"
    before = count(file)
    wait_for(lambda: count(file) > before + 2, "the container to count on")
    assert not (images / "cgctl.json").exists()
    assert "checkpoint" not in (STATE_DIR / "hooked.json").read_text()

    # A working hook sees both dump steps, and the dump then goes ahead.
    (tmp_path / "ok").mkdir()
    hook_path, hook_log = hook(tmp_path / "ok")
    images = tmp_path / "images2"
    status, _, err = cgctl_in_process(
        capfd, "checkpoint", "hooked", "--dir", str(images), "--hook", str(hook_path), "--leave-running"
    )
    assert status == 0, err
    assert hook_log.read_text().splitlines() == [f"pre-dump hooked {images}", f"post-dump hooked {images}"]
    stop(original, names=("hooked",))


@pytest.mark.parametrize("fail_at", ["pre-restore", "post-restore"])
def test_a_failing_restore_leaves_no_cgroup_and_no_process(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, cleanup: list[str], fail_at: str
) -> None:
    cleanup += ["source", "doomed"]
    file = tmp_path / "count"
    original = counter("source", file)
    images = tmp_path / "images"
    assert cgctl_in_process(capfd, "checkpoint", "source", "--dir", str(images))[0] == 0
    original.wait(timeout=60)
    hook_path, hook_log = hook(tmp_path, fail_at=fail_at)
    status, _, err = cgctl_in_process(
        capfd, "restore", "--dir", str(images), "--name", "doomed", "--hook", str(hook_path)
    )
    assert status == 125
    assert f"the {fail_at} hook {hook_path} exited 3" in err and str(images / "restore.log") in err, err
    assert hook_log.read_text().splitlines()[-1] == f"failure doomed {images}"
    assert not (CGCTL_ROOT / "doomed").exists()
    stopped_at = count(file)
    time.sleep(0.5)
    assert count(file) == stopped_at, "a process of the failed restore is counting"


def test_a_terminal_is_refused_before_anything_is_dumped(
    capfd: pytest.CaptureFixture[str], tmp_path: Path, cleanup: list[str]
) -> None:
    cleanup.append("interactive")
    master, terminal = os.openpty()
    original = cgctl(
        "run", "--name", "interactive", "--", "sleep", "1000",
        stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
    )  # fmt: skip
    os.close(terminal)
    wait_for(lambda: workload_pids("interactive"), "interactive to start")
    images = tmp_path / "images"
    status, _, err = cgctl_in_process(capfd, "checkpoint", "interactive", "--dir", str(images))
    assert status == 125
    assert "stdout is a terminal (/dev/pts/" in err and "</dev/null >job.log 2>&1" in err, err
    assert not any(images.iterdir())
    assert workload_pids("interactive") and original.poll() is None
    stop(original, names=("interactive",))
    os.close(master)


def test_bad_arguments_change_nothing(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("mine")
    cases = [
        (("checkpoint", "nosuch", "--dir", str(tmp_path / "a")), "no running container named 'nosuch'"),
        (("restore", "--dir", str(tmp_path)), "no cgctl checkpoint here"),
        (("restore", "--dir", str(tmp_path), "--hook", str(full / "something")), "not an executable file"),
    ]
    for args, message in cases:
        status, _, err = cgctl_in_process(capfd, *args)
        assert status == 125 and message in err, (args, err)
    assert (full / "something").read_text() == "mine"
    assert not (tmp_path / "a").exists()
