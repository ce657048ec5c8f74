"""The kernel-path masks: the lists, and read_only/mask on real mounts in a throwaway user and mount
namespace of a forked child (the host's mounts are never touched)."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from cgctl import syscalls
from cgctl.ns import user
from cgctl.sandbox import paths


def test_the_lists_cover_what_reaches_the_kernel() -> None:
    assert {"/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/sys/firmware"} <= set(
        paths.MASKED
    )
    assert {"/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus", "/sys"} <= set(paths.READ_ONLY)
    assert not set(paths.MASKED) & set(paths.READ_ONLY)
    assert all(path.startswith(("/proc/", "/sys")) for path in (*paths.MASKED, *paths.READ_ONLY))


def in_namespaces(check: Callable[[], None]) -> None:
    """Run check in a forked child inside new user and mount namespaces; fail with what it raised."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        try:
            user.enter(os.geteuid(), os.getegid())
            syscalls.unshare(syscalls.CLONE_NEWNS)
            syscalls.mount("none", "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
            check()
        except BaseException as error:
            os.write(write_end, repr(error).encode())
            os._exit(1)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as reader:
        failure = reader.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, failure


def expect_errno(code: int, action: Callable[[], object]) -> None:
    try:
        action()
    except OSError as error:
        assert error.errno == code, error
    else:
        raise AssertionError(f"{action} succeeded; expected errno {errno.errorcode[code]}")


def without_mount_setattr(path: str) -> None:
    """read_only as on kernels before 5.12."""
    syscalls.mount(path, path, None, syscalls.MS_BIND | syscalls.MS_REC)
    paths.remount_each_read_only(path)


@pytest.mark.parametrize("read_only", [paths.read_only, without_mount_setattr], ids=["setattr", "remount"])
def test_read_only_covers_the_path_and_every_mount_under_it(
    tmp_path: Path, read_only: Callable[[str], None]
) -> None:
    top, inner = tmp_path / "top", tmp_path / "top" / "inner"

    def check() -> None:
        top.mkdir()
        syscalls.mount("tmpfs", str(top), "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NODEV)
        (top / "file").write_text("before")
        inner.mkdir()
        syscalls.mount("tmpfs", str(inner), "tmpfs", syscalls.MS_NOEXEC)
        read_only(str(top))
        expect_errno(errno.EROFS, lambda: (top / "file").write_text("after"))
        expect_errno(errno.EROFS, lambda: (inner / "new").write_text("x"))
        assert (top / "file").read_text() == "before"
        # Not a mount point itself (as /proc/sys is not): it becomes one.
        plain = tmp_path / "plain"
        plain.mkdir()
        read_only(str(plain))
        expect_errno(errno.EROFS, lambda: (plain / "x").write_text("x"))
        (tmp_path / "beside").write_text("still writable")

    in_namespaces(check)


def test_mask_hides_files_and_directories(tmp_path: Path) -> None:
    secret, folder = tmp_path / "secret", tmp_path / "folder"
    secret.write_text("kernel memory")
    folder.mkdir()
    (folder / "inside").write_text("x")

    def check() -> None:
        paths.mask(str(secret))
        paths.mask(str(folder))
        paths.mask(str(tmp_path / "missing"))  # nothing to hide: nothing done
        assert secret.read_text() == ""
        assert list(folder.iterdir()) == []
        expect_errno(errno.EROFS, lambda: (folder / "new").write_text("x"))
        assert not (tmp_path / "missing").exists()

    in_namespaces(check)
    assert secret.read_text() == "kernel memory"  # outside, nothing changed
    assert (folder / "inside").exists()


@pytest.mark.parametrize("name", ["with space", "tab\there", "back\\slash"])
def test_mount_points_with_odd_names_are_found(tmp_path: Path, name: str) -> None:
    odd = tmp_path / name

    def check() -> None:
        odd.mkdir()
        syscalls.mount("tmpfs", str(odd), "tmpfs", syscalls.MS_NOSUID)
        assert str(odd) in paths._mounts()
        paths.remount_each_read_only(str(odd))
        expect_errno(errno.EROFS, lambda: (odd / "x").write_text("x"))

    in_namespaces(check)


def test_mounts_hidden_by_a_later_mount_are_not_touched(tmp_path: Path) -> None:
    # A fresh sysfs over the host's /sys hides the host's /sys/fs/cgroup, which mountinfo still lists.
    top = tmp_path / "sys"

    def check() -> None:
        top.mkdir()
        syscalls.mount("tmpfs", str(top), "tmpfs", 0)
        (top / "cgroup").mkdir()
        syscalls.mount("tmpfs", str(top / "cgroup"), "tmpfs", 0)
        syscalls.mount("tmpfs", str(top), "tmpfs", 0)  # the fresh one, with a plain directory of that name
        (top / "cgroup").mkdir()
        assert str(top / "cgroup") not in paths._mounts()
        paths.remount_each_read_only(str(top))
        expect_errno(errno.EROFS, lambda: (top / "cgroup" / "x").write_text("x"))

    in_namespaces(check)
