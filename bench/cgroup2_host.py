"""What every benchmark here checks first: it writes to /sys/fs/cgroup, so it needs a pure cgroup v2 root."""

from __future__ import annotations

import os
import sys
from pathlib import Path

CGROUP_MOUNT = Path("/sys/fs/cgroup")


def require_cgroup2_root(how_to_run: str) -> None:
    """Exit with how_to_run unless this is root on a pure cgroup v2 hierarchy (never the v1 host's)."""
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    pure_cgroup2 = any(line.split()[1:3] == [str(CGROUP_MOUNT), "cgroup2"] for line in mounts)
    if not pure_cgroup2 or os.geteuid() != 0:
        sys.exit(
            f"{sys.argv[0]} needs root and a pure cgroup v2 hierarchy at {CGROUP_MOUNT}; on a host without "
            f"one, run it in the micro-VM: {how_to_run}"
        )
