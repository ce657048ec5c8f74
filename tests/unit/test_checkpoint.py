"""The parts of checkpoint/restore that need no kernel: CRIU's log, the manifest, stdio hand-over."""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from cgctl.runtime import checkpoint
from cgctl.spec import SpecError

DUMP_LOG = """\
(00.010000) Error (criu/util.c:627): execvp("iptables-save", ...) failed: No such file or directory
(00.010100) Error (criu/util.c:642): exited, status=1
Error (criu/tun.c:85): tun: Unable to create tun: No such file or directory
(00.300000) Error (criu/files-reg.c:1710): Can't lookup mount=29 for fd=2 path=/tmp/x (deleted)
(00.300100) Error (criu/cr-dump.c:1635): Dump files (pid: 134) failed with -1
(00.310000) Error (criu/cr-dump.c:2053): Dumping FAILED.
"""


def test_the_error_shown_is_the_first_that_tells(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(DUMP_LOG)
    assert checkpoint._last_error(log) == "Can't lookup mount=29 for fd=2 path=/tmp/x (deleted)"


def test_a_failed_hook_is_named_before_criu_errors(tmp_path: Path) -> None:
    log = tmp_path / "dump.log"
    log.write_text(DUMP_LOG + "cgctl: the pre-dump hook /h exited 3\n(00.4) Error (x.c:1): Script exited\n")
    assert checkpoint._last_error(log) == "the pre-dump hook /h exited 3"


def test_a_missing_log_or_one_without_errors(tmp_path: Path) -> None:
    assert checkpoint._last_error(tmp_path / "none.log") == "no log was written"
    (tmp_path / "quiet.log").write_text("(00.1) Starting\n(00.2) Done badly\n")
    assert checkpoint._last_error(tmp_path / "quiet.log") == "(00.2) Done badly"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "no cgctl checkpoint here"),
        ("{not json", "cannot read"),
        (json.dumps({"version": 99}), "not a cgctl manifest of version 1"),
    ],
)
def test_a_directory_without_a_usable_manifest_is_refused(
    tmp_path: Path, content: str | None, reason: str
) -> None:
    if content is not None:
        (tmp_path / checkpoint.MANIFEST).write_text(content)
    with pytest.raises(SpecError, match=reason) as raised:
        checkpoint._read_manifest(tmp_path)
    assert raised.value.field == ("dir",)


def test_a_directory_that_holds_anything_is_never_dumped_into(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("mine")
    with pytest.raises(SpecError, match="not empty"):
        checkpoint._empty_directory(tmp_path)
    made = checkpoint._empty_directory(tmp_path / "new" / "dir")
    assert made.is_dir() and made.is_absolute()


def test_a_hook_must_be_an_executable_file(tmp_path: Path) -> None:
    script = tmp_path / "hook"
    script.write_text("#!/bin/sh\n")
    with pytest.raises(SpecError, match="not an executable file"):
        checkpoint._checked_hook(script)
    script.chmod(0o755)
    assert checkpoint._checked_hook(script) == script.resolve()
    assert checkpoint._checked_hook(None) is None


def test_stdio_is_handed_over_for_pipes_and_files_once_each() -> None:
    stdio = {"0": "/dev/null", "1": "pipe:[4242]", "2": "pipe:[4242]"}
    with ExitStack() as stack:
        inherited = checkpoint._inherit_stdio(stdio, {0: 0, 1: 1, 2: 2}, stack)
        ((copy, key),) = inherited.items()
        assert key == "pipe:[4242]" and copy > 2
        assert os.path.sameopenfile(copy, 1)
    with pytest.raises(OSError):
        os.fstat(copy)  # closed with the stack
    with ExitStack() as stack:
        files = {"0": "socket:[7]", "1": "/var/log/job.log", "2": "/tmp/gone (deleted)"}
        assert sorted(checkpoint._inherit_stdio(files, {0: 0, 1: 1, 2: 2}, stack).values()) == [
            "socket:[7]",
            "var/log/job.log",
        ]


def test_stdio_copies_never_overwrite_the_callers_fds() -> None:
    """The keeper restores with many fds open: the copies must be new ones, and only of what it gives."""
    busy = [os.open(os.devnull, os.O_RDONLY) for _ in range(120)]
    read, write = os.pipe()
    try:
        before = {fd: os.fstat(fd).st_ino for fd in busy}
        with ExitStack() as stack:
            inherited = checkpoint._inherit_stdio(
                {"0": "pipe:[1]", "1": "pipe:[2]", "2": "pipe:[3]"}, {1: write}, stack
            )
            assert list(inherited.values()) == ["pipe:[2]"]
            assert next(iter(inherited)) not in busy
            assert {fd: os.fstat(fd).st_ino for fd in busy} == before
    finally:
        for fd in (*busy, read, write):
            os.close(fd)


def test_progress_is_reported_while_criu_works() -> None:
    seen: list[tuple[int, int | None]] = []
    with checkpoint._reporting(lambda: (5, 10), lambda done, expected: seen.append((done, expected))):
        time.sleep(1.2)
    assert seen and set(seen) == {(5, 10)}


def test_without_criu_nothing_is_tried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(checkpoint, "CRIU_PATHS", ())
    with pytest.raises(checkpoint.CheckpointError, match=r"criu is not installed: .*apt-get install criu"):
        checkpoint.checkpoint("job", tmp_path / "images")
    assert not (tmp_path / "images").exists()
