"""Waits on every armed PSI trigger in one thread: a trigger fires as POLLPRI on its fd, so one epoll
set covers any number of containers, and an idle daemon sleeps in epoll_wait until the kernel reports
a stall or another thread changes the set (the eventfd wakes it).

Fds are closed only by the poller thread, between two waits: a number closed elsewhere could be
reused by a new trigger while the thread still holds an event for the old one, and that event would
then reach the wrong key.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable, Hashable

log = logging.getLogger("cgctld")

# Edge-triggered: one call per kernel notification even for a source whose POLLPRI stays set.
WATCHED = select.EPOLLPRI | select.EPOLLET
GONE = select.EPOLLERR | select.EPOLLHUP  # the kernel reports POLLERR once the trigger's cgroup is removed
JOIN_TIMEOUT = 5.0


class TriggerPoller:
    """Calls on_fire(key) from its own thread each time the trigger fd added under key fires.

    An fd whose cgroup is removed is dropped and closed without a call. on_fire must not block for
    long: every other trigger waits meanwhile. A call for a key can still be under way when
    remove(key) returns in another thread, never after the poller has next waited.
    """

    def __init__(self, on_fire: Callable[[Hashable], None]) -> None:
        self.on_fire = on_fire
        self.lock = threading.Lock()
        self.fds: dict[Hashable, int] = {}
        self.keys_by_fd: dict[int, Hashable] = {}
        self.closing: list[int] = []  # removed from the set, closed by the thread before it next waits
        self.closed = False
        self.epoll = select.epoll()
        self.wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.epoll.register(self.wake, select.EPOLLIN)
        self.thread = threading.Thread(target=self._run, name="pressure-triggers", daemon=True)
        self.thread.start()

    def add(self, key: Hashable, fd: int) -> None:
        """Watch fd under key, owning it from now on; an fd already under key is closed."""
        with self.lock:
            if self.closed:
                os.close(fd)
                raise RuntimeError("the trigger poller is closed")
            old = self.fds.get(key)
            if old == fd:
                return
            if fd in self.keys_by_fd or fd in self.closing:
                raise ValueError(f"fd {fd} belongs to the poller already (under {self.keys_by_fd.get(fd)!r})")
            try:
                self.epoll.register(fd, WATCHED)
            except OSError:
                with contextlib.suppress(OSError):
                    os.close(fd)
                raise
            if old is not None:
                self._forget(old)
            self.fds[key] = fd
            self.keys_by_fd[fd] = key
            self._wake()

    def remove(self, key: Hashable) -> None:
        """Stop watching key and close its fd; an unknown key is fine (its cgroup may be gone already)."""
        with self.lock:
            fd = self.fds.get(key)
            if fd is not None:
                self._forget(fd)
                self._wake()

    def keys(self) -> set[Hashable]:
        with self.lock:
            return set(self.fds)

    def close(self) -> None:
        """Close every fd and stop the thread (waiting for it at most JOIN_TIMEOUT seconds)."""
        with self.lock:
            if not self.closed:
                self.closed = True
                self._wake()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=JOIN_TIMEOUT)
            if self.thread.is_alive():
                log.warning(
                    "pressure triggers: on_fire still runs after %.0fs; its fds close after it", JOIN_TIMEOUT
                )

    def _run(self) -> None:
        try:
            while self._wait_and_dispatch():
                pass
        except Exception:
            log.exception("pressure triggers: the poller stopped; no trigger is watched any more")
        finally:
            with self.lock:
                self.closed = True
                for fd in self.fds.values():
                    self.closing.append(fd)
                self.fds.clear()
                self.keys_by_fd.clear()
                self._close_forgotten()
                self.epoll.close()
                os.close(self.wake)

    def _wait_and_dispatch(self) -> bool:
        """One epoll_wait and its events; False once close() was called."""
        with self.lock:
            self._close_forgotten()
            if self.closed:
                return False
        for fd, mask in self.epoll.poll():  # no timeout: an idle poller costs no CPU
            if fd == self.wake:
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.wake)
                continue
            with self.lock:
                key = self.keys_by_fd.get(fd)
                if key is None:  # removed since the wait returned
                    continue
                if mask & GONE:
                    log.info("pressure trigger %r: its cgroup is gone (events %#x); dropped", key, mask)
                    self._forget(fd)
                    continue
            if mask & select.EPOLLPRI:
                try:
                    self.on_fire(key)
                except Exception:
                    log.exception("pressure trigger %r: on_fire failed", key)
        return True

    def _forget(self, fd: int) -> None:
        """Under the lock: take fd out of the set now, close it before the next wait."""
        key = self.keys_by_fd.pop(fd)
        del self.fds[key]
        with contextlib.suppress(OSError):  # closing an fd drops it from the set too
            self.epoll.unregister(fd)
        self.closing.append(fd)

    def _close_forgotten(self) -> None:
        for fd in self.closing:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.closing.clear()

    def _wake(self) -> None:
        os.eventfd_write(self.wake, 1)
