"""The device program on a real kernel: what a process in the cgroup may open and create.

Each probe is one Python process started inside a scratch cgroup (it joins between fork and
exec) that tries every operation and reports the errno of each; Python starts slowly in the VM,
so one process answers a whole list.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cgctl.cgroup import devices
from cgctl.cgroup.devices import DEFAULT_RULES, attach, attached, rule_for
from cgctl.cgroup.fs import Cgroup, CgroupError
from tests.integration.conftest import UNIFIED, ScratchCgroup

PYTHON = sys.executable
DISK = os.environ.get("CGCTL_VM_DISK", "/dev/vda")
PROBE = r"""
import errno, json, os, stat, sys
results = {}
for name, action, path, device in json.loads(sys.argv[1]):
    try:
        if action == "mknod":
            os.mknod(path, stat.S_IFBLK | 0o600, device)
        else:
            fd = os.open(path, {"read": os.O_RDONLY, "write": os.O_WRONLY}[action])
            if action == "read":
                os.read(fd, 512)
            os.close(fd)
        results[name] = "ok"
    except OSError as error:
        results[name] = errno.errorcode[error.errno]
print(json.dumps(results))
"""

Operation = tuple[str, str, str, int]  # name, action (read, write, mknod), path, device number


def probe(group: Cgroup, operations: list[Operation]) -> dict[str, str]:
    """{name: "ok" or the errno's name} for each operation, tried by a process inside `group`."""
    process = ScratchCgroup(group.path).spawn(
        [PYTHON, "-S", "-c", PROBE, json.dumps(operations)], stdout=subprocess.PIPE
    )
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0
    results: dict[str, str] = json.loads(out)
    return results


@pytest.fixture
def make_cgroup() -> Iterator[Callable[[Cgroup | None], Cgroup]]:
    """Scratch cgroups under /sys/fs/cgroup (or a given parent), removed again deepest first."""
    made: list[Cgroup] = []

    def make(parent: Cgroup | None = None) -> Cgroup:
        group = (parent or Cgroup(UNIFIED)).child(f"devtest-{secrets.token_hex(4)}")
        group.path.mkdir()
        made.append(group)
        return group

    yield make
    for group in reversed(made):
        if group.populated():
            group.write("cgroup.kill", "1")
            ScratchCgroup(group.path).wait_events("populated", 0)
        group.path.rmdir()


@pytest.fixture
def tmpfs_dir() -> Iterator[Path]:
    """A directory on a tmpfs that allows device nodes (/dev/shm in the VM; /tmp is the overlay)."""
    path = Path(tempfile.mkdtemp(prefix="devtest-", dir="/dev/shm"))
    yield path
    shutil.rmtree(path)


@pytest.fixture
def disk() -> int:
    """The VM's scratch disk's device number."""
    info = os.stat(DISK)
    assert stat.S_ISBLK(info.st_mode), f"{DISK} is not a block device"
    return info.st_rdev


def test_default_rules_allow_the_basic_nodes_and_refuse_the_disk(
    make_cgroup: Callable[..., Cgroup], tmpfs_dir: Path, disk: int
) -> None:
    group = make_cgroup()
    attach(group, DEFAULT_RULES)
    node = str(tmpfs_dir / "disk")
    results = probe(
        group,
        [
            ("null", "read", "/dev/null", 0),
            ("null-write", "write", "/dev/null", 0),
            ("urandom", "read", "/dev/urandom", 0),
            ("disk", "read", DISK, 0),
            ("mem", "read", "/dev/mem", 0),
            ("mknod", "mknod", node, disk),
            ("mknod-open", "read", node, 0),
        ],
    )
    assert results == {
        "null": "ok",
        "null-write": "ok",
        "urandom": "ok",
        "disk": "EPERM",
        "mem": "EPERM",
        "mknod": "ok",  # creating a node is allowed ...
        "mknod-open": "EPERM",  # ... opening it is not
    }
    assert stat.S_ISBLK(os.stat(node).st_mode) and os.stat(node).st_rdev == disk
    os.close(os.open(node, os.O_RDONLY))  # the test itself, outside the cgroup, is unaffected
    os.close(os.open(DISK, os.O_RDONLY))


def test_a_granted_disk_is_readable_but_not_writable(make_cgroup: Callable[..., Cgroup]) -> None:
    group = make_cgroup()
    attach(group, (*DEFAULT_RULES, rule_for(DISK, "r")))
    results = probe(group, [("read", "read", DISK, 0), ("write", "write", DISK, 0)])
    assert results == {"read": "ok", "write": "EPERM"}


def test_a_child_cgroup_inherits_the_restriction(make_cgroup: Callable[..., Cgroup]) -> None:
    parent = make_cgroup()
    attach(parent, DEFAULT_RULES)
    child = make_cgroup(parent)
    assert probe(child, [("null", "read", "/dev/null", 0), ("disk", "read", DISK, 0)]) == {
        "null": "ok",
        "disk": "EPERM",
    }
    # Programs are attached to the parent only; the child runs them as inherited (effective) ones.
    ids = attached(parent)
    assert len(ids) == 1
    assert attached(child) == []
    assert attached(child, effective=True) == ids


def test_a_child_cannot_widen_what_its_parent_allows(make_cgroup: Callable[..., Cgroup]) -> None:
    parent = make_cgroup()
    attach(parent, DEFAULT_RULES)
    child = make_cgroup(parent)
    attach(child, (*DEFAULT_RULES, rule_for(DISK, "r")))  # BPF_F_ALLOW_MULTI: both programs run
    assert len(attached(child, effective=True)) == 2
    assert probe(child, [("disk", "read", DISK, 0)]) == {"disk": "EPERM"}


def test_load_is_possible_here_and_refused_without_root() -> None:
    assert devices.problem() is None
    # A forked child that gave up root asks again (no exec: the interpreter lives under /root).
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setuid(65534)
            os.write(write_end, str(devices.problem()).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        answer = reader.read()
    os.waitpid(pid, 0)
    assert "Operation not permitted" in answer
    assert "needs root: CAP_SYS_ADMIN" in answer


def test_attach_errors_name_the_cgroup(tmp_path: Path) -> None:
    missing = Cgroup(UNIFIED / f"devtest-missing-{secrets.token_hex(4)}")
    with pytest.raises(CgroupError, match=rf"^{missing.path}: cannot open the cgroup: No such file"):
        attach(missing, DEFAULT_RULES)
    with pytest.raises(
        CgroupError, match=rf"^{tmp_path}: cannot attach the device program: bpf\(BPF_PROG_ATTACH"
    ):
        attach(Cgroup(tmp_path), DEFAULT_RULES)  # a directory, but not a cgroup


def test_a_program_the_verifier_refuses_comes_with_its_log(
    make_cgroup: Callable[..., Cgroup], monkeypatch: pytest.MonkeyPatch
) -> None:
    group = make_cgroup()
    reads_unset_register = devices.mov_reg(devices.R0, 2) + devices.exit_()
    monkeypatch.setattr(devices, "program", lambda rules: reads_unset_register)
    with pytest.raises(CgroupError) as error:
        # Rules of its own: attach loads each set of rules once per process, and DEFAULT_RULES is loaded.
        attach(group, (devices.Rule("c", 4, 64, "r"),))
    message = str(error.value)
    assert message.startswith(f"{group.path}: cannot load the device program: bpf(BPF_PROG_LOAD")
    assert "the verifier's log:" in message and "R2 !read_ok" in message
    assert "CONFIG_CGROUP_BPF" not in message
    assert attached(group) == []
