"""PSI triggers without a cgroup v2 kernel: open_trigger's checks and errors on a fake cgroup directory,
and TriggerPoller's bookkeeping on fds that report POLLPRI (TCP urgent data) or POLLHUP (a pipe).

That a real trigger fires, and what the kernel reports when its cgroup goes, is tested in the micro-VM
(tests/integration/test_pressure.py).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path

import pytest

from cgctl.cgroup import fs
from cgctl.cgroup.pressure import WINDOW_MAX_US, WINDOW_MIN_US, open_trigger
from cgctl.daemon.triggers import TriggerPoller

TIMEOUT = 5.0


@pytest.fixture
def group(tmp_path: Path) -> fs.Cgroup:
    """A directory standing in for a cgroup, its pressure files plain (and empty) files."""
    for resource in ("cpu", "memory", "io"):
        (tmp_path / f"{resource}.pressure").write_text("")
    return fs.Cgroup(tmp_path)


def open_fds() -> set[int]:
    return {int(name) for name in os.listdir("/proc/self/fd")}


@pytest.mark.parametrize(
    ("resource", "kind", "stall_us", "window_us", "message"),
    [
        ("irq", "some", 100_000, 1_000_000, "pressure resource 'irq': must be one of cpu, memory, io"),
        ("memory", "most", 100_000, 1_000_000, "pressure kind 'most': must be one of some, full"),
        ("memory", "some", 100_000, WINDOW_MAX_US + 1, "pressure window 10000001 us: must be from 500000 us"),
        ("memory", "some", 100, WINDOW_MIN_US - 1, "pressure window 499999 us: must be from 500000 us"),
        (
            "memory",
            "some",
            2_000_000,
            1_000_000,
            "pressure stall 2000000 us: must be more than 0 and at most",
        ),
        ("memory", "some", 0, 1_000_000, "pressure stall 0 us: must be more than 0"),
    ],
)
def test_open_trigger_refuses_bad_values_before_opening_anything(
    group: fs.Cgroup, resource: str, kind: str, stall_us: int, window_us: int, message: str
) -> None:
    before = open_fds()
    with pytest.raises(ValueError, match=message):
        open_trigger(group, resource, kind, stall_us, window_us)
    assert open_fds() == before
    assert all(path.read_text() == "" for path in group.path.iterdir())


def test_window_limits_themselves_are_accepted(group: fs.Cgroup) -> None:
    for window in (WINDOW_MIN_US, WINDOW_MAX_US):
        os.close(open_trigger(group, "cpu", "some", window, window))


def test_open_trigger_writes_the_trigger_with_its_nul(group: fs.Cgroup) -> None:
    fd = open_trigger(group, "memory", "full", 150_000, 1_000_000)
    try:
        assert os.get_inheritable(fd) is False
        assert os.get_blocking(fd) is False
    finally:
        os.close(fd)
    assert group.file("memory.pressure").read_bytes() == b"full 150000 1000000\0"


def test_missing_pressure_file_names_the_file_the_trigger_and_a_fix(tmp_path: Path) -> None:
    gone = fs.Cgroup(tmp_path / "removed")
    with pytest.raises(fs.CgroupError) as raised:
        open_trigger(gone, "io", "some", 100_000, 2_000_000)
    message = str(raised.value)
    assert message.startswith(
        f"{gone.path}/io.pressure: cannot arm the pressure trigger 'some 100000 2000000'"
    )
    assert "No such file or directory" in message
    assert "Fix:" in message


def test_a_refused_write_closes_the_fd(group: fs.Cgroup) -> None:
    group.file("memory.pressure").unlink()
    group.file("memory.pressure").symlink_to("/dev/full")  # every write fails with ENOSPC
    before = open_fds()
    with pytest.raises(
        fs.CgroupError, match=re.escape("memory.pressure: cannot arm the pressure trigger 'some 1 500000'")
    ):
        open_trigger(group, "memory", "some", 1, 500_000)
    assert open_fds() == before


class Fired:
    """on_fire for the tests: records the keys, optionally runs `then` on the poller thread."""

    def __init__(self, then: Callable[[Hashable], None] | None = None) -> None:
        self.keys: list[Hashable] = []
        self.then = then
        self.changed = threading.Condition()

    def __call__(self, key: Hashable) -> None:
        with self.changed:
            self.keys.append(key)
            self.changed.notify_all()
        if self.then:
            self.then(key)

    def wait_for(self, count: int) -> list[Hashable]:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.keys) >= count, timeout=TIMEOUT), self.keys
            return list(self.keys)


@pytest.fixture
def fired() -> Fired:
    return Fired()


@pytest.fixture
def poller(fired: Fired) -> Iterator[TriggerPoller]:
    started = TriggerPoller(fired)
    yield started
    started.close()
    assert not started.thread.is_alive()


def is_closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.005)


def urgent_pair() -> tuple[socket.socket, int]:
    """(sender, receiver's fd): urgent (out-of-band) TCP data makes the receiver report EPOLLPRI."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        sender = socket.create_connection(listener.getsockname())
        receiver, _ = listener.accept()
    return sender, receiver.detach()


def test_add_remove_and_keys(poller: TriggerPoller) -> None:
    first, second = os.eventfd(0), os.eventfd(0)
    poller.add("a", first)
    poller.add(("b", 2), second)
    assert poller.keys() == {"a", ("b", 2)}
    poller.remove("a")
    poller.remove("never added")
    assert poller.keys() == {("b", 2)}
    wait_until(lambda: is_closed(first), "the removed fd is closed")
    assert not is_closed(second)


def test_adding_under_a_used_key_replaces_and_closes_the_old_fd(poller: TriggerPoller) -> None:
    old, new = os.eventfd(0), os.eventfd(0)
    poller.add("a", old)
    poller.add("a", new)
    poller.add("a", new)  # the same fd again changes nothing
    assert poller.keys() == {"a"}
    wait_until(lambda: is_closed(old), "the replaced fd is closed")
    assert not is_closed(new)


def test_one_fd_under_two_keys_is_refused(poller: TriggerPoller) -> None:
    fd = os.eventfd(0)
    poller.add("a", fd)
    with pytest.raises(ValueError, match="belongs to the poller already"):
        poller.add("b", fd)
    assert poller.keys() == {"a"}


def test_close_closes_every_fd_and_stops_the_thread(fired: Fired) -> None:
    before = open_fds()
    poller = TriggerPoller(fired)
    fds = [os.eventfd(0) for _ in range(3)]
    for number, fd in enumerate(fds):
        poller.add(number, fd)
    poller.close()
    assert not poller.thread.is_alive()
    assert open_fds() == before
    poller.close()  # twice is fine
    late = os.eventfd(0)
    with pytest.raises(RuntimeError, match="closed"):
        poller.add("late", late)
    assert is_closed(late)


def settled(fired: Fired, at_least: int) -> int:
    """How many calls there were once they stopped coming (50 ms without one, bounded by TIMEOUT)."""
    count = len(fired.wait_for(at_least))
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if len(fired.keys) == count:
            return count
        count = len(fired.keys)
    raise AssertionError(f"on_fire still being called after {TIMEOUT} s: {len(fired.keys)} calls")


def test_urgent_data_calls_on_fire_once_per_event(poller: TriggerPoller, fired: Fired) -> None:
    """Edge-triggered: an event is reported when it happens, not again while it stays set. TCP's
    urgent byte wakes the socket's waiters twice on arrival (its urgent mark, then its data), so a
    poller that runs between the two reports it twice; a PSI trigger wakes them once."""
    sender, receiver = urgent_pair()
    with sender:
        poller.add("tcp", receiver)
        sender.send(b"x", socket.MSG_OOB)
        first = settled(fired, 1)
        assert first in (1, 2), fired.keys
        time.sleep(0.2)  # the urgent byte stays unread: POLLPRI stays set, and no more calls
        assert len(fired.keys) == first
        sender.send(b"y", socket.MSG_OOB)
        assert settled(fired, first + 1) - first in (1, 2), fired.keys
        assert set(fired.keys) == {"tcp"}


def test_hangup_drops_the_fd_without_calling_on_fire(poller: TriggerPoller, fired: Fired) -> None:
    read_end, write_end = os.pipe()
    poller.add("pipe", read_end)
    os.close(write_end)
    wait_until(lambda: not poller.keys(), "the hung-up fd is dropped")
    wait_until(lambda: is_closed(read_end), "the hung-up fd is closed")
    assert fired.keys == []


def test_a_failing_on_fire_is_logged_and_the_poller_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    def fail(key: Hashable) -> None:
        raise RuntimeError(f"cannot handle {key}")

    fired = Fired(then=fail)
    poller = TriggerPoller(fired)
    sender, receiver = urgent_pair()
    try:
        poller.add("tcp", receiver)
        with caplog.at_level(logging.ERROR, logger="cgctld"):
            sender.send(b"x", socket.MSG_OOB)
            fired.wait_for(1)
            sender.send(b"y", socket.MSG_OOB)
            fired.wait_for(2)
        assert poller.thread.is_alive()
        assert "pressure trigger 'tcp': on_fire failed" in caplog.text
        assert "cannot handle tcp" in caplog.text
    finally:
        sender.close()
        poller.close()


def test_on_fire_may_remove_its_key_and_close_the_poller() -> None:
    poller: TriggerPoller

    def stop(key: Hashable) -> None:
        poller.remove(key)
        poller.close()

    fired = Fired(then=stop)
    poller = TriggerPoller(fired)
    sender, receiver = urgent_pair()
    with sender:
        poller.add("tcp", receiver)
        sender.send(b"x", socket.MSG_OOB)
        fired.wait_for(1)
        poller.thread.join(TIMEOUT)
    assert not poller.thread.is_alive()
    assert is_closed(receiver)


def test_adds_and_removes_from_many_threads_leak_nothing(fired: Fired) -> None:
    before = open_fds()
    poller = TriggerPoller(fired)

    def churn(worker: int) -> None:
        for round_ in range(200):
            key = (worker, round_ % 5)
            poller.add(key, os.eventfd(0))
            if round_ % 3 == 0:
                poller.remove(key)

    workers = [threading.Thread(target=churn, args=(worker,)) for worker in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(TIMEOUT)
    last_rounds = range(195, 200)  # the last round of each key decides whether it is still watched
    assert poller.keys() == {
        (worker, round_ % 5) for worker in range(4) for round_ in last_rounds if round_ % 3
    }
    poller.close()
    assert open_fds() == before
    assert fired.keys == []


def thread_cpu_ticks(thread: threading.Thread) -> int:
    """utime + stime of a thread of this process, in clock ticks (/proc/<pid>/task/<tid>/stat)."""
    stat = Path(f"/proc/self/task/{thread.native_id}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5), counted from after the name


def test_an_idle_poller_uses_no_cpu(poller: TriggerPoller) -> None:
    poller.add("idle", os.eventfd(0))
    time.sleep(0.05)  # let the thread reach epoll_wait
    before = thread_cpu_ticks(poller.thread)
    time.sleep(1.0)
    assert thread_cpu_ticks(poller.thread) - before <= 1
