"""Finding the cgroup v2 root and refusing hosts that cannot enforce limits, from recorded mount tables."""

from __future__ import annotations

from pathlib import Path

import pytest

from cgctl.cgroup.fs import (
    Cgroup,
    CgroupError,
    HostNotSupported,
    find_unified_mount,
    open_unified_root,
)

DATA = Path(__file__).parent / "data"


def recorded_mountinfo(tmp_path: Path, name: str, unified_at: str | None = None) -> Path:
    """A recorded mountinfo, with the cgroup2 mount point moved to tmp_path (a fake root for the parser)."""
    text = (DATA / name).read_text()
    if unified_at:
        text = text.replace(f" {unified_at} ", f" {tmp_path} ")
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(text)
    return mountinfo


def test_unified_host_finds_the_cgroup2_mount() -> None:
    unified, v1 = find_unified_mount(DATA / "mountinfo-unified")
    assert unified == Path("/sys/fs/cgroup")
    assert v1 == {}


def test_hybrid_host_sees_v1_controllers_and_the_unified_mount() -> None:
    unified, v1 = find_unified_mount(DATA / "mountinfo-hybrid")
    assert unified == Path("/sys/fs/cgroup/unified")
    assert v1["memory"] == Path("/sys/fs/cgroup/memory")
    assert v1["name=systemd"] == Path("/sys/fs/cgroup/systemd")


def test_hybrid_host_is_refused_naming_the_v1_hierarchy_and_the_fix(tmp_path: Path) -> None:
    mountinfo = recorded_mountinfo(tmp_path, "mountinfo-hybrid", "/sys/fs/cgroup/unified")
    (tmp_path / "cgroup.controllers").write_text("\n")
    with pytest.raises(HostNotSupported) as error:
        open_unified_root(["memory", "pids"], mountinfo)
    message = str(error.value)
    assert message.startswith(f"{tmp_path}/cgroup.controllers: ")
    assert "memory, pids" in message
    assert "memory (at /sys/fs/cgroup/memory)" in message
    assert "cgroup_no_v1=all" in message and "systemd.unified_cgroup_hierarchy=1" in message


def test_legacy_host_is_refused_for_want_of_cgroup2(tmp_path: Path) -> None:
    mountinfo = recorded_mountinfo(tmp_path, "mountinfo-legacy")
    with pytest.raises(HostNotSupported, match=r"no cgroup2 filesystem is mounted.*Fix: boot the kernel"):
        open_unified_root(["memory"], mountinfo)


def test_missing_controller_without_v1_says_the_kernel_lacks_it(tmp_path: Path) -> None:
    mountinfo = recorded_mountinfo(tmp_path, "mountinfo-unified", "/sys/fs/cgroup")
    (tmp_path / "cgroup.controllers").write_text("cpu io memory\n")
    with pytest.raises(HostNotSupported, match=r"pids that cgctl needs .* the kernel does not offer them"):
        open_unified_root(["memory", "pids"], mountinfo)


def test_unified_host_with_the_controllers_is_accepted(tmp_path: Path) -> None:
    mountinfo = recorded_mountinfo(tmp_path, "mountinfo-unified", "/sys/fs/cgroup")
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    assert open_unified_root(["memory", "pids"], mountinfo) == Cgroup(tmp_path)


def test_keyed_files_parse_and_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "memory.events").write_text("low 0\nhigh 3\nmax 7\noom 1\noom_kill 1\n")
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("4096\n")
    group = Cgroup(tmp_path)
    assert group.read_keyed("memory.events") == {"low": 0, "high": 3, "max": 7, "oom": 1, "oom_kill": 1}
    assert group.read("memory.current") == "4096\n"
    assert group.read_optional("memory.swap.peak") is None
    with pytest.raises(CgroupError, match=f"^{tmp_path}/memory.peak: cannot read"):
        group.read("memory.peak")
