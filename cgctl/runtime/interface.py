"""One runtime interface, two implementations: LocalRuntime (the library on this host's cgroup tree
and run records) and RemoteRuntime (a daemon's API). The CLI picks one with `connect` and is the
same thin layer over either."""

from __future__ import annotations

import builtins
import os
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # the models are pydantic's, slow to import: a CLI with no daemon rarely needs them
    from cgctl.accounting import Usage
    from cgctl.images.importer import Progress as ImageProgress
    from cgctl.netspec import PortMapping
    from cgctl.runtime.api import (
        CheckpointRequest,
        CheckpointResult,
        Container,
        CreateRequest,
        Event,
        Explanation,
        HostWide,
        NetworkInfo,
        PolicyPlan,
        PolicyStatus,
        ProcessRow,
        PullRequest,
        PushRequest,
        PushResult,
        RestoreRequest,
    )
    from cgctl.runtime.checkpoint import Progress
    from cgctl.runtime.logs import LogLine
    from cgctl.spec import ExecSpec

SYSTEM_SOCKET = Path("/run/cgctl/cgctl.sock")


class Runtime(Protocol):
    """What every verb acts through. What only a daemon can do, the local runtime refuses with one
    error (cgctl.runtime.local.needs_daemon) that says how to start one."""

    @property
    def host(self) -> str | None:
        """The daemon's address (unix://, tcp://, ssh://), or None: no daemon, this host's records."""
        ...

    @property
    def paths_are_here(self) -> bool:
        """Whether the paths a call names are this host's own (no daemon, or one on this host's
        socket), so that what they name can also be done here, under the calling command."""
        ...

    def list(self, all: bool = False, labels: dict[str, str] | None = None) -> list[Container]: ...
    def inspect(self, name: str) -> Container: ...
    def create(self, request: CreateRequest) -> Container: ...
    def freeze(self, name: str, timeout: float = 10.0) -> bool: ...
    def thaw(self, name: str, timeout: float = 10.0) -> bool: ...
    def kill(self, name: str, signal_name: str = "KILL") -> int: ...
    def update(self, name: str, limits: dict[str, dict[str, Any]]) -> dict[str, str]: ...
    def remove(self, name: str, force: bool = False) -> None: ...
    def wait(self, name: str, timeout: float | None = None) -> Container: ...
    def attach(self, name: str, detach_keys: bytes = b"", replay: bool = False) -> bool: ...
    def logs(
        self, name: str, tail: int | None = None, since: datetime | None = None, follow: bool = False
    ) -> Iterator[LogLine]: ...
    def events(self, since: float | None = None, until: float | None = None) -> Iterator[Event]: ...
    def stats(
        self,
        names: builtins.list[str] | None = None,
        interval: float = 1.0,
        stream: bool = False,
        hostwide: HostWide | None = None,
    ) -> Iterator[builtins.list[Usage]]: ...
    def policy_diff(self, directory: str | None = None) -> builtins.list[PolicyPlan]: ...
    def policy_apply(self) -> builtins.list[PolicyPlan]: ...
    def explain(self, name: str) -> Explanation: ...
    def commit(self, name: str, reference: str, message: str = "") -> dict[str, Any]: ...
    def top(self, name: str) -> builtins.list[ProcessRow]: ...
    def exec(self, name: str, spec: ExecSpec, detach_keys: bytes = b"") -> int: ...
    def checkpoint(
        self, name: str, request: CheckpointRequest, progress: Progress | None = None
    ) -> CheckpointResult: ...
    def restore(self, request: RestoreRequest) -> Container: ...
    def policy_status(self) -> PolicyStatus: ...
    def images(self) -> builtins.list[dict[str, Any]]: ...
    def inspect_image(self, reference: str) -> dict[str, Any]: ...
    def import_image(
        self, path: str, reference: str, progress: ImageProgress | None = None
    ) -> dict[str, Any]: ...
    def pull(self, request: PullRequest, progress: ImageProgress | None = None) -> dict[str, Any]: ...
    def push(self, request: PushRequest, progress: ImageProgress | None = None) -> PushResult: ...
    def save_image(
        self, reference: str, path: str, progress: ImageProgress | None = None
    ) -> dict[str, Any]: ...
    def remove_image(self, reference: str) -> builtins.list[str]: ...
    def port(self, name: str) -> builtins.list[PortMapping]: ...
    def networks(self) -> builtins.list[NetworkInfo]: ...
    def inspect_network(self, name: str) -> NetworkInfo: ...
    def create_network(
        self, name: str, subnet: str | None = None, gateway: str | None = None, internal: bool = False
    ) -> NetworkInfo: ...
    def remove_network(self, name: str) -> None: ...


def default_sockets() -> list[Path]:
    """Where a daemon may answer for this user: the system's (root, or its group), and for others
    their own rootless daemon's first."""
    if os.geteuid() == 0:
        return [SYSTEM_SOCKET]
    runtime_dir = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}")
    return [runtime_dir / "cgctl" / "cgctl.sock", SYSTEM_SOCKET]


def answers(path: Path) -> bool:
    """Whether a daemon accepts connections at path (a left-over socket file does not)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def connect(
    host: str | None = None, state_dir: Path | None = None, image_store: Path | None = None
) -> Runtime:
    """The remote runtime for --host/CGCTL_HOST (tcp:// with the token in $CGCTL_TOKEN_FILE), else
    for a daemon answering at a default socket, else the local runtime (no daemon: the library on
    this host). An image_store (`--store DIR`) is this host's, whatever daemon answers: the local
    runtime on it."""
    if image_store is not None:
        from cgctl.runtime.local import LocalRuntime

        return LocalRuntime(state_dir, image_store)
    host = host or os.environ.get("CGCTL_HOST")
    if not host:
        host = next((f"unix://{path}" for path in default_sockets() if answers(path)), None)
    if host:
        from cgctl.runtime.remote import RemoteRuntime

        token_file = os.environ.get("CGCTL_TOKEN_FILE")
        return RemoteRuntime(host, token=Path(token_file).read_text().strip() if token_file else None)
    from cgctl.runtime.local import LocalRuntime

    return LocalRuntime(state_dir)
