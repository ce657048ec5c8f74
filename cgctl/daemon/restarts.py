"""Restarts of the daemon's containers: after an exit, as their restart policy says, with a backoff
that doubles for each quick failure; at once, by a policy's restart action; and of those the daemon
finds restarting when it starts."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable

from cgctl.cgroup import fs
from cgctl.daemon.managed import Managed
from cgctl.runtime.api import Attempt, EventType, parse_signal
from cgctl.runtime.local import signal_cgroup

log = logging.getLogger("cgctld")
BACKOFF_FIRST = 0.1  # seconds before the first restart; doubled for each quick failure after it
BACKOFF_CAP = 30.0
RESET_AFTER = 10.0  # an attempt that ran this long starts the backoff over
STOPPING_SIGNALS = {"SIGKILL", "SIGTERM", "SIGINT"}  # a kill with these is a stop: no restart


class Restarts:
    """`start` starts a container's next attempt, `give_up` ends it for good (one that could not
    start), `current` says whether it may still be restarted (not stopped, still in the table, the
    daemon not closing)."""

    def __init__(
        self,
        start: Callable[[Managed], None],
        give_up: Callable[[Managed], None],
        current: Callable[[Managed], bool],
        emit: Callable[[EventType, str, dict[str, str]], None],
    ) -> None:
        self.start, self.give_up, self.current, self.emit = start, give_up, current, emit

    def after_exit(self, managed: Managed, attempt: Attempt, closing: bool) -> bool:
        """Schedule the next attempt if its restart policy (or a policy's action) wants one (call with
        managed.lock held); False if it ended for good."""
        if not _should_restart(managed, attempt, closing):
            return False
        quick = time.monotonic() - managed.started < RESET_AFTER
        managed.backoff = (
            min(managed.backoff * 2, BACKOFF_CAP) if quick and managed.backoff else BACKOFF_FIRST
        )
        managed.info.state = "restarting"
        managed.save()
        self.schedule(managed, managed.backoff, attempt.ended)
        return True

    def schedule(self, managed: Managed, delay: float, reason: str) -> None:
        managed.timer = threading.Timer(delay, self._restart, (managed, reason))
        managed.timer.daemon = True
        managed.timer.start()

    @staticmethod
    def cancel(managed: Managed) -> None:
        if managed.timer is not None:
            managed.timer.cancel()
            managed.timer = None

    def now(self, managed: Managed) -> None:
        """A policy's restart action: end the running attempt and start the next, whatever the restart
        policy; a container that has already ended is started again."""
        with managed.lock:
            if not self.current(managed):
                return
            if managed.info.state in ("running", "frozen") and managed.group is not None:
                managed.restart_requested = True
                with contextlib.suppress(fs.CgroupError):
                    signal_cgroup(managed.group, parse_signal("KILL"))
            elif managed.info.state == "exited":
                managed.info.state = "restarting"
                managed.save()
                self.schedule(managed, 0, "a policy's restart action")

    def _restart(self, managed: Managed, reason: str) -> None:
        with managed.lock:
            if not self.current(managed):
                return
            managed.info.restart_count += 1
            self.emit(
                "restart",
                managed.info.name,
                {
                    "reason": reason,
                    "backoff_seconds": f"{managed.backoff:g}",
                    "restart_count": str(managed.info.restart_count),
                },
            )
            try:
                self.start(managed)
            except Exception as error:
                log.error("%s: restart failed: %s", managed.info.name, error)
                managed.info.attempts.append(
                    Attempt(
                        started_at=time.time(),
                        finished_at=time.time(),
                        status_known=False,
                        ended=f"could not start: {error}",
                    )
                )
                self.give_up(managed)


def _should_restart(managed: Managed, attempt: Attempt, closing: bool) -> bool:
    restart = managed.info.restart_policy
    requested, managed.restart_requested = managed.restart_requested, False
    if managed.stopping or closing:
        return False
    if requested or restart.name == "always" or restart.name == "unless-stopped":
        return True
    if restart.name == "on-failure":
        failed = attempt.exit_status != 0
        return failed and (restart.max_retries is None or managed.info.restart_count < restart.max_retries)
    return False
