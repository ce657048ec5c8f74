"""The kernel's own notifications for running containers: inotify on cgroup.events (populated,
frozen), memory.events (oom, oom_kill, high) and the limit files policies guard. The kernel signals
a change of any of them as a modification, so an idle daemon sleeps in one read() however many
containers run, and an OOM kill reaches it as soon as the kernel counts it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from inotify_simple import INotify, flags

from cgctl.cgroup import fs

WATCHED = ("cgroup.events", "memory.events")


class CgroupWatcher:
    """Calls on_change(name, file) from its own thread when a watched file of a container changes."""

    def __init__(self, on_change: Callable[[str, str], None]) -> None:
        self.on_change = on_change
        self.inotify = INotify()
        self.lock = threading.Lock()
        self.watches: dict[int, tuple[str, str]] = {}  # watch descriptor -> (container, file)
        self.closed = False
        self.thread = threading.Thread(target=self._loop, name="cgroup-watcher", daemon=True)
        self.thread.start()

    def add(self, name: str, group: fs.Cgroup, files: tuple[str, ...] = ()) -> None:
        """Watch the container's events, and `files` (policy-guarded limits: any write to an interface
        file is reported, so a change by hand is seen at once)."""
        with self.lock:
            for file in (*WATCHED, *files):
                with contextlib.suppress(OSError):  # memory.events is missing if memory is not enabled
                    self.watches[self.inotify.add_watch(group.file(file), flags.MODIFY)] = (name, file)

    def remove(self, name: str) -> None:
        with self.lock:
            for descriptor, (watched, _) in list(self.watches.items()):
                if watched == name:
                    del self.watches[descriptor]
                    with contextlib.suppress(OSError):  # gone with its cgroup already
                        self.inotify.rm_watch(descriptor)

    def close(self) -> None:
        self.closed = True
        self.thread.join(timeout=2)
        self.inotify.close()

    def _loop(self) -> None:
        while not self.closed:
            for event in self.inotify.read(timeout=1000):  # the timeout only bounds how long close() waits
                with self.lock:
                    target = self.watches.get(event.wd)
                if target is not None:
                    self.on_change(*target)
