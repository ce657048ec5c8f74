"""Where the daemon keeps things, as root and rootless: one place, so the CLI that starts the daemon
finds its directories without importing the service."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from cgctl import state


@dataclasses.dataclass(frozen=True)
class Paths:
    """Where the daemon keeps things: the runtime dir (sockets, run records) and the data dir."""

    runtime_dir: Path
    data_dir: Path
    state_dir: Path
    cgroup_root: Path | None = None
    policy_dir: Path | None = None  # default: policy.default_directory()

    @property
    def socket(self) -> Path:
        return self.runtime_dir / "cgctl.sock"

    @property
    def keeper_socket(self) -> Path:
        return self.runtime_dir / "keeper.sock"

    @property
    def containers(self) -> Path:
        return self.data_dir / "containers"


def default_paths() -> Paths:
    """/run/cgctl and /var/lib/cgctl as root; $XDG_RUNTIME_DIR/cgctl and ~/.local/share/cgctl rootless."""
    if os.geteuid() == 0:
        runtime, data = Path("/run/cgctl"), Path("/var/lib/cgctl")
    else:
        runtime = Path(os.environ.get("XDG_RUNTIME_DIR") or f"/run/user/{os.geteuid()}") / "cgctl"
        data = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "cgctl"
    return Paths(runtime, data, state.default_state_dir())
