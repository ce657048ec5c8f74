"""One detached container as the daemon holds it: what is persisted of it and what lives only in the
daemon. Its own module, below the service and the policy engine, which both handle it."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path

from cgctl import durable
from cgctl.cgroup import fs
from cgctl.runtime.api import Container, CreateRequest


class Managed:
    """A detached container: what is persisted (info, request) and what lives only in the daemon."""

    def __init__(self, info: Container, request: CreateRequest, directory: Path) -> None:
        self.info, self.request, self.dir = info, request, directory
        self.lock = threading.RLock()  # held while it starts or ends: an exit waits for its start
        self.group: fs.Cgroup | None = None
        self.written: list[str] = []
        self.root = contextlib.ExitStack()  # what its own root needs on the host while it runs
        self.started = 0.0  # monotonic
        self.stopping = False  # stopped or removed by the user: no restart
        self.backoff = 0.0
        self.timer: threading.Timer | None = None
        self.oom_kills = 0
        self.restart_requested = False  # by a policy's action: restart whatever its restart policy

    @property
    def log_path(self) -> Path:
        return self.dir / "container.log"

    @property
    def exit_path(self) -> Path:
        return self.dir / "exit.json"

    def save(self) -> None:
        durable.write_json(self.dir / "container.json", self.info.model_dump(mode="json"))

    def save_request(self) -> None:
        """request.json keeps only what was given (exclude_unset): its explicit limits stay told apart
        from its policies' across daemon restarts."""
        durable.write_json(
            self.dir / "request.json", self.request.model_dump(mode="json", exclude_unset=True)
        )
