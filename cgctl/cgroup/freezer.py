"""The cgroup v2 freezer: stop every process of a workload at once, and let them go again.

Writing cgroup.freeze only asks; the group is frozen when cgroup.events says
"frozen 1", which the kernel announces with POLLPRI, so we wait on that file
rather than sleep and re-read.
"""

from __future__ import annotations

from cgctl.cgroup.fs import Cgroup, wait_for_event


def frozen(group: Cgroup) -> bool:
    return group.read_keyed("cgroup.events").get("frozen", 0) == 1


def set_frozen(group: Cgroup, freeze: bool, timeout: float = 10.0) -> bool:
    """Freeze or thaw the group and wait until the kernel says it is done; returns whether it changed."""
    if frozen(group) == freeze:
        return False
    group.write("cgroup.freeze", "1" if freeze else "0")
    wait_for_event(group, "frozen", int(freeze), timeout)
    return True
