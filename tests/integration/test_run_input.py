"""Bad input and unusable hosts: exit 125, a message naming the option and the value, and nothing created."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.workloads import PYTHON, STATE_DIR, cgctl_in_process

DISK = os.environ.get("CGCTL_VM_DISK", "/dev/vda")
UNIFIED = Path("/sys/fs/cgroup")


def everything_cgctl_made() -> tuple[list[str], list[str]]:
    cgroups = sorted(str(p) for p in UNIFIED.rglob("*") if p.is_dir())
    return cgroups, sorted(p.name for p in STATE_DIR.glob("*")) if STATE_DIR.exists() else []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mem", "256Q"], "invalid value '256Q' for --mem"),
        (["--mem", "-1"], "invalid value '-1' for --mem"),
        (["--cpus", "0"], "invalid value '0' for --cpus"),
        (["--cpus", "-2"], "invalid value '-2' for --cpus"),
        (["--cpu-weight", "0"], "invalid value '0' for --cpu-weight"),
        (["--cpu-weight", "10001"], "invalid value '10001' for --cpu-weight"),
        (["--io-weight", "0"], "invalid value 0 for --io-weight: Input should be greater than or equal to 1"),
        (["--pids", "-3"], "invalid value '-3' for --pids"),
        (["--cpuset", "0-99"], "invalid value '0-99' for --cpuset: CPU(s) 2,3"),
        (["--io-max", "/dev/nope:wbps=1M"], "invalid value '/dev/nope' for --io-max: cannot use the device"),
        (
            ["--io-max", "/etc/hostname:wbps=1M"],
            "invalid value '/etc/hostname' for --io-max: not a block device",
        ),
        (["--io-max", "7:99999:wbps=1M"], "invalid value '7:99999' for --io-max: no block device 7:99999"),
        ([f"--io-max={DISK}:speed=1M"], "for --io-max: 'speed=1M' is not one of rbps="),
        (["--io-weight", "/dev/nope:100"], "invalid value '/dev/nope' for --io-weight"),
        (["--io-weight", f"{DISK}:100"], "needs the io.cost controller on"),
        (
            ["--cgroup-set", "memory.bogus=1"],
            "invalid value 'memory.bogus=1' for --cgroup-set: this kernel has no such",
        ),
        (
            ["--cgroup-set", "memory.current=1"],
            "invalid value 'memory.current=1' for --cgroup-set: a read-only file",
        ),
        (["--cgroup-set", "cgroup.procs=1"], "for --cgroup-set: cgctl manages this file itself"),
        (["--cgroup-set", "nonsense"], "invalid value 'nonsense' for --cgroup-set: expected KEY=VALUE"),
        (["--share", "time"], "invalid value 'time' for --share"),
        (["--name", "../x"], "invalid value '../x' for --name"),
        (["--name", "a" * 65], "for --name"),
        (["--env", "1BAD=x"], "--env: '1BAD' is not an environment variable name"),
        (["--workdir", "relative"], "invalid value 'relative' for --workdir"),
        (["--env-file", "/nonexistent"], "invalid value '/nonexistent' for --env-file: No such file"),
        (["--cap-add", "SYS_WIZARD"], "invalid value 'SYS_WIZARD' for --cap-add: not a Linux capability"),
        (["--device", "/dev/nope"], "invalid value '/dev/nope' for --device: /dev/nope: no such device node"),
        (["--device", "/etc/hostname:r"], "for --device: /etc/hostname: not a device node: it is a regular"),
        (["--seccomp", "/nonexistent.json"], "invalid value '/nonexistent.json' for --seccomp: /nonexistent"),
        (["--seccomp", "/etc/hostname"], "for --seccomp: /etc/hostname: not valid JSON at line 1"),
        (["--share", "mnt"], "--share mnt needs --privileged"),
    ],
)
def test_bad_input_exits_125_and_creates_nothing(
    capfd: pytest.CaptureFixture[str], args: list[str], message: str, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    before = everything_cgctl_made()
    status, _, err = cgctl_in_process(capfd, "run", *args, "--", "touch", str(marker))
    assert status == 125
    assert message in err
    assert not marker.exists()
    assert everything_cgctl_made() == before


def test_no_command_exits_125(capfd: pytest.CaptureFixture[str]) -> None:
    status, _, err = cgctl_in_process(capfd, "run", "--mem", "1G")
    assert status == 125 and "no command given" in err


def run_elsewhere(shell: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", shell], capture_output=True, text=True, env={**os.environ, **env})


def test_host_without_cgroup2_is_refused_and_nothing_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    hide = f"mount -t tmpfs none /sys/fs/cgroup && exec {PYTHON} -m cgctl run --mem 64M -- touch {marker}"
    done = subprocess.run(["unshare", "--mount", "sh", "-c", hide], capture_output=True, text=True)
    assert done.returncode == 125
    assert "no cgroup2 filesystem is mounted" in done.stderr and "cgroup_no_v1=all" in done.stderr
    assert not marker.exists()


@pytest.fixture
def delegated_cgroup() -> Iterator[Path]:
    """A cgroup delegated the way systemd does it (Delegate=yes): marked with trusted.delegate."""
    group = UNIFIED / "delegated.scope"
    group.mkdir()
    os.setxattr(group, "trusted.delegate", b"1")
    try:
        yield group
    finally:
        for leaf in sorted(group.iterdir(), reverse=True):
            if leaf.is_dir():
                leaf.rmdir()
        group.rmdir()


def test_inside_a_delegated_cgroup_cgctl_uses_it_as_its_root(delegated_cgroup: Path) -> None:
    enter = (
        f"echo $$ > {delegated_cgroup}/cgroup.procs && exec {PYTHON} -m cgctl run --name d1 --share cgroup"
    )
    done = run_elsewhere(f"{enter} -- cat /proc/self/cgroup")
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"0::/{delegated_cgroup.name}/d1\n"
    assert sorted(p.name for p in delegated_cgroup.iterdir() if p.is_dir()) == ["cgctl-supervisor"]


@pytest.fixture
def unprivileged_delegation() -> Iterator[Path]:
    """A cgroup delegated to uid 65534, as systemd's user manager hands one out, and a Python it can run."""
    parent = UNIFIED / "user-test.slice"
    parent.mkdir()
    parent.joinpath("cgroup.subtree_control").write_text("+memory +cpu +io +pids")
    group = parent / "delegated.scope"
    group.mkdir()
    for path in (
        group,
        *(group / name for name in ("cgroup.procs", "cgroup.subtree_control", "cgroup.threads")),
    ):
        os.chown(path, 65534, 65534)
    opened = open_to_others(Path.cwd(), Path(PYTHON).resolve(), Path(sys.prefix), Path(sys.base_prefix))
    try:
        yield group
    finally:
        for directory, mode in opened.items():
            directory.chmod(mode)
        for leaf in sorted(group.iterdir(), reverse=True):
            if leaf.is_dir():
                leaf.rmdir()
        group.rmdir()
        parent.rmdir()


def open_to_others(*paths: Path) -> dict[Path, int]:
    """Let nobody reach the checkout and this Python, wherever they are (a clone under /root, which is
    0700, or in a private temporary directory): every directory above them gets o+rx. Only in the
    micro-VM, whose root is a throwaway overlay; returns the modes to put back."""
    assert os.environ.get("CGCTL_VM") == "1", "this test changes directory modes: run it in the micro-VM"
    opened = {}
    for path in paths:
        for directory in (path, *path.parents) if path.is_dir() else path.parents:
            mode = directory.stat().st_mode & 0o7777
            if mode & 0o005 != 0o005 and directory not in opened:
                opened[directory] = mode
                directory.chmod(mode | 0o005)
    return opened


def as_nobody_in(group: Path | None, cgctl_args: str) -> subprocess.CompletedProcess[str]:
    enter = f"echo $$ > {group}/cgroup.procs && " if group else ""
    drop = "setpriv --reuid 65534 --regid 65534 --clear-groups"
    state = tempfile.mkdtemp(prefix="cgctl-nobody-")
    os.chmod(state, 0o777)
    try:
        return run_elsewhere(
            f"{enter}exec {drop} {PYTHON} -m cgctl {cgctl_args}",
            CGCTL_STATE_DIR=state,
            PYTHONPATH=os.getcwd(),
        )
    finally:
        shutil.rmtree(state)


def test_rootless_in_a_delegated_cgroup_with_userns(unprivileged_delegation: Path) -> None:
    # HOME stays root's (as with sudo -u without -H), whose config directory nobody may read: its
    # default policy directory and credentials file are then not this user's, and not an error.
    private = Path.home() / ".config" / "cgctl"
    made = not private.exists()
    private.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        done = as_nobody_in(unprivileged_delegation, "run --userns --mem 64M -- cat /proc/self/uid_map")
    finally:
        if made:
            private.rmdir()
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["0", "65534", "1"]
    assert sorted(p.name for p in unprivileged_delegation.iterdir() if p.is_dir()) == ["cgctl-supervisor"]


def test_rootless_without_userns_is_refused(unprivileged_delegation: Path) -> None:
    done = as_nobody_in(unprivileged_delegation, "run -- true")
    assert done.returncode == 125
    assert "needs root: run as root, or add --userns" in done.stderr


def test_not_root_and_not_delegated_is_refused(unprivileged_delegation: Path) -> None:
    done = as_nobody_in(None, "run --userns -- true")
    assert done.returncode == 125
    assert "Permission denied" in done.stderr and "Delegate=yes" in done.stderr
