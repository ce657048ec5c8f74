"""The terminal plumbing on this host's own ptys: a pty taken in a child (as the workload does), its
size, the master's output copied out, keystrokes and the detach keys."""

from __future__ import annotations

import os
import subprocess

import pytest

from cgctl.ns import console
from cgctl.runtime import terminal


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("ctrl-p,ctrl-q", b"\x10\x11"),
        ("ctrl-a", b"\x01"),
        ("a,ctrl-@", b"a\x00"),
        ("", b""),
        ("CTRL-X,z", b"\x18z"),
    ],
)
def test_detach_keys_parse_as_docker_does(text: str, keys: bytes) -> None:
    assert terminal.parse_detach_keys(text) == keys


@pytest.mark.parametrize("text", ["ctrl-", "ctrl-1", "ab", "ctrl-pp", "é"])
def test_bad_detach_keys_are_refused_by_name(text: str) -> None:
    with pytest.raises(terminal.DetachKeysError, match=r"ctrl-X|control key"):
        terminal.parse_detach_keys(text)


def test_detach_sequence_is_found_across_reads_and_held_keys_go_on() -> None:
    watch = terminal._DetachWatch(b"\x10\x11")
    assert watch.feed(b"ls\x10") == (b"ls", False)  # Ctrl-P held back: it may start the sequence
    assert watch.feed(b"x") == (b"\x10x", False)  # it did not: both go on
    assert watch.feed(b"\x10") == (b"", False)
    assert watch.feed(b"\x11rest") == (b"", True)
    assert terminal._DetachWatch(b"").feed(b"\x10\x11") == (b"\x10\x11", False)


def _in_child_terminal(argv: list[str], size: tuple[int, int]) -> tuple[int, int]:
    """(pid, master) of argv started as the workload starts: a session leader that takes a pty."""
    ours, theirs = console.channel()
    pid = os.fork()
    if pid == 0:
        try:
            ours.close()
            os.setsid()
            console.take_terminal(theirs.fileno(), size)
            theirs.close()
            os.execvp(argv[0], argv)
        finally:
            os._exit(127)
    theirs.close()
    master = console.receive_master(ours)
    ours.close()
    assert master is not None
    return pid, master


def _output(master: int) -> bytes:
    out_r, out_w = os.pipe()
    copier = terminal.Output(master, out_w)
    copier.start()
    copier.join(timeout=30)
    os.close(out_w)
    with os.fdopen(out_r, "rb") as out:
        data = out.read()
    os.close(copier.ended)
    return data


def test_a_taken_terminal_is_the_controlling_one_at_the_given_size() -> None:
    pid, master = _in_child_terminal(["sh", "-c", "tty; stty size; ps -o tty= -p $$"], (33, 111))
    text = _output(master).decode()
    os.waitpid(pid, 0)
    os.close(master)
    lines = text.split()
    assert lines[0].startswith("/dev/pts/"), text
    assert lines[1:3] == ["33", "111"], text
    assert lines[3] == lines[0].removeprefix("/dev/"), text  # it is the shell's controlling terminal


def test_resizing_the_master_signals_the_foreground() -> None:
    pid, master = _in_child_terminal(
        ["sh", "-c", "trap 'stty size; exit 0' WINCH; echo ready; while :; do sleep 0.1; done"], (10, 20)
    )
    copied = b""
    while b"ready" not in copied:
        copied += os.read(master, 1024)
    console.set_size(master, (44, 55))
    assert console.get_size(master) == (44, 55)
    text = _output(master).decode()
    os.waitpid(pid, 0)
    os.close(master)
    assert "44 55" in text


def test_pump_sends_keys_and_resizes_until_the_output_ends() -> None:
    """pump reads fd 0: run it in a child whose stdin is a pipe we write keys into."""
    keys_r, keys_w = os.pipe()
    sent_r, sent_w = os.pipe()
    finished_r, finished_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.dup2(keys_r, 0)
            closed: list[bool] = []
            detached = terminal.pump(
                finished_r, lambda data: os.write(sent_w, data), close_input=lambda: closed.append(True),
                detach_keys=b"\x10\x11",
            )  # fmt: skip
            os.write(sent_w, f"|{detached}|{closed}".encode())
        finally:
            os._exit(0)
    os.write(keys_w, b"echo hi\r\x10\x11ignored")
    os.waitpid(pid, 0)
    os.close(sent_w)
    with os.fdopen(sent_r, "rb") as sent:
        assert sent.read() == b"echo hi\r|True|[]"
    for fd in (keys_r, keys_w, finished_r, finished_w):
        os.close(fd)


def test_raw_mode_is_undone_on_the_way_out() -> None:
    master, slave = os.openpty()
    before = subprocess.run(["stty", "-a"], stdin=slave, capture_output=True, text=True).stdout
    with pytest.raises(RuntimeError), terminal.raw(slave):
        assert "-icanon" in subprocess.run(["stty", "-a"], stdin=slave, capture_output=True, text=True).stdout
        raise RuntimeError("an error while attached")
    assert subprocess.run(["stty", "-a"], stdin=slave, capture_output=True, text=True).stdout == before
    os.close(master)
    os.close(slave)
