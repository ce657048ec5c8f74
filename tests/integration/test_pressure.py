"""PSI triggers on a real cgroup v2 kernel: a memory-starved cgroup's trigger fires through
TriggerPoller, an idle one's does not, and a removed cgroup's trigger is dropped without a call.

The measured delays are printed (pytest -rA shows them): the kernel's behaviour, not cgctl's, sets them.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Hashable, Iterator
from pathlib import Path

import pytest

from cgctl.cgroup import fs
from cgctl.cgroup.pressure import KINDS, RESOURCES, open_trigger
from cgctl.daemon.triggers import TriggerPoller
from tests.integration.conftest import ScratchCgroup

pytestmark = pytest.mark.integration

MiB = 1 << 20
STRESS_NG = Path("/usr/bin/stress-ng")
HOG_SECONDS = 30
FIRE_TIMEOUT = 20.0
STALL_US, WINDOW_US = 100_000, 1_000_000  # 100 ms of stall in any 1 s


def memory_hog() -> list[str]:
    """Touches 64 MiB over and over: far above a 16 MiB memory.high, so the kernel throttles it."""
    if STRESS_NG.exists():
        return [str(STRESS_NG), "--vm", "1", "--vm-bytes", "64M", "--timeout", f"{HOG_SECONDS}s"]
    code = (
        "import time\n"
        f"memory = bytearray({64 * MiB}); end = time.monotonic() + {HOG_SECONDS}\n"
        "while time.monotonic() < end:\n"
        "    for page in range(0, len(memory), 4096): memory[page] += 1\n"
    )
    return [sys.executable, "-S", "-c", code]


class Fired:
    """on_fire: when each call came (time.monotonic), by key."""

    def __init__(self) -> None:
        self.calls: list[tuple[Hashable, float]] = []
        self.changed = threading.Condition()

    def __call__(self, key: Hashable) -> None:
        with self.changed:
            self.calls.append((key, time.monotonic()))
            self.changed.notify_all()

    def times(self, key: Hashable) -> list[float]:
        with self.changed:
            return [at for fired, at in self.calls if fired == key]

    def wait_for(self, key: Hashable, count: int, timeout: float) -> list[float]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.times(key)) >= count, timeout=timeout)
        return self.times(key)


@pytest.fixture
def fired() -> Fired:
    return Fired()


@pytest.fixture
def poller(fired: Fired) -> Iterator[TriggerPoller]:
    started = TriggerPoller(fired)
    yield started
    started.close()


@pytest.fixture
def child(scratch_cgroup: ScratchCgroup) -> Iterator[ScratchCgroup]:
    """A cgroup with the memory controller below the scratch cgroup, which a test may remove itself."""
    scratch_cgroup.write("cgroup.subtree_control", "+memory")
    group = ScratchCgroup(scratch_cgroup.path / "workload")
    group.path.mkdir()
    try:
        yield group
    finally:
        if group.path.exists():
            remove(group)


def remove(group: ScratchCgroup) -> None:
    if group.keyed("cgroup.events")["populated"]:
        group.write("cgroup.kill", "1")
        group.wait_events("populated", 0)
    group.path.rmdir()


def test_a_memory_starved_cgroup_fires_its_trigger_once_per_window(
    child: ScratchCgroup, poller: TriggerPoller, fired: Fired
) -> None:
    child.write("memory.max", str(256 * MiB))
    child.write("memory.high", str(16 * MiB))
    poller.add("starved", open_trigger(fs.Cgroup(child.path), "memory", "some", STALL_US, WINDOW_US))
    started = time.monotonic()
    hog = child.spawn(memory_hog())
    try:
        first = fired.wait_for("starved", 1, FIRE_TIMEOUT)
        assert first, f"memory some {STALL_US} {WINDOW_US} did not fire within {FIRE_TIMEOUT:.0f}s"
        times = fired.wait_for("starved", 4, 10.0)
        stall = child.read("memory.pressure").splitlines()[0]
        assert hog.poll() is None, "the hog ended early: the kernel killed it or it could not start"
    finally:
        hog.kill()
        hog.wait()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    print(f"{memory_hog()[0]}: first fire {times[0] - started:.2f}s after start; gaps {gaps}; {stall}")
    assert len(times) >= 4, f"the trigger fired {len(times)} times in 10s of sustained pressure: {gaps}"
    # At most one event per window: consecutive calls come a window apart, less the poller's own delays.
    assert min(gaps) > 0.5 * WINDOW_US / 1e6, gaps


def test_an_idle_cgroup_does_not_fire(child: ScratchCgroup, poller: TriggerPoller, fired: Fired) -> None:
    child.write("memory.high", str(16 * MiB))
    sleeper = child.spawn(["sleep", "60"])
    try:
        poller.add("idle", open_trigger(fs.Cgroup(child.path), "memory", "some", STALL_US, WINDOW_US))
        time.sleep(3)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert fired.calls == []


def test_removing_the_cgroup_drops_its_trigger_without_a_call(
    child: ScratchCgroup, poller: TriggerPoller, fired: Fired, caplog: pytest.LogCaptureFixture
) -> None:
    sleeper = child.spawn(["sleep", "60"])
    poller.add("removed", open_trigger(fs.Cgroup(child.path), "memory", "some", STALL_US, WINDOW_US))
    with caplog.at_level(logging.INFO, logger="cgctld"):
        remove(child)
        removed_at = time.monotonic()
        sleeper.wait()
        while poller.keys():  # "removed" is its only key
            assert time.monotonic() < removed_at + 10, "the poller still watches a removed cgroup's trigger"
            time.sleep(0.01)
    print(f"dropped within {time.monotonic() - removed_at:.3f}s of the rmdir: {caplog.text.strip()}")
    assert "its cgroup is gone" in caplog.text
    assert fired.calls == []


def test_a_removed_cgroups_trigger_reports_pollerr(child: ScratchCgroup) -> None:
    fd = open_trigger(fs.Cgroup(child.path), "io", "full", STALL_US, WINDOW_US)
    try:
        remove(child)
        waiter = select.poll()
        waiter.register(fd, select.POLLPRI)
        events = waiter.poll(5000)
        with pytest.raises(OSError) as read_error:
            os.read(fd, 4096)
    finally:
        os.close(fd)
    print(f"poll after rmdir: {events}; read: {errno.errorcode[read_error.value.errno or 0]}")
    assert events and events[0][1] & select.POLLERR, events


def test_a_window_over_ten_seconds_is_refused(child: ScratchCgroup) -> None:
    with pytest.raises(ValueError, match="pressure window 20000000 us"):
        open_trigger(fs.Cgroup(child.path), "memory", "some", STALL_US, 20_000_000)


def test_a_trigger_on_a_removed_cgroup_is_refused(child: ScratchCgroup) -> None:
    group = fs.Cgroup(child.path)
    remove(child)
    with pytest.raises(fs.CgroupError, match=r"memory\.pressure: cannot arm .*: No such file or directory"):
        open_trigger(group, "memory", "some", STALL_US, WINDOW_US)


def test_every_resource_and_kind_can_be_armed_on_one_cgroup(child: ScratchCgroup) -> None:
    """One trigger per open file, but any number of open files of one cgroup."""
    group = fs.Cgroup(child.path)
    fds = [
        open_trigger(group, resource, kind, STALL_US, WINDOW_US) for resource in RESOURCES for kind in KINDS
    ]
    for fd in fds:
        os.close(fd)
