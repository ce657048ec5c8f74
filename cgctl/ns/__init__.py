"""Linux namespaces, one module each, in nsjail's shape: every module has a FLAG and two steps.

- in_child: runs in the process that unshared the namespace, before it forks
  the workload's first process (hostname, loopback, mount propagation).
- in_init: runs in the workload's first process (pid 1 of a new pid
  namespace) just before exec: what must be done from inside (/proc, /sys,
  the cgroup namespace, which must follow joining the cgroup).

The user namespace is not in this table: it is opt-in and must come before
all the others (see user.py). A namespace joined by path (setns, as runc's
namespaces[].path) is entered in the setup child instead of being unshared,
and gets none of its steps but the init's mounts.
"""

from __future__ import annotations

import os
from types import ModuleType

from cgctl import syscalls
from cgctl.ns import cgroup, ipc, mnt, net, pid, uts
from cgctl.ns.context import Context

# Steps run in this order: propagation made private before anything is mounted, a fresh /sys
# before cgroup2 is mounted on it.
STEPS: dict[str, ModuleType] = {"mnt": mnt, "uts": uts, "ipc": ipc, "net": net, "cgroup": cgroup, "pid": pid}

# The order to join namespaces in: the user namespace first (it owns the others), mnt before cgroup.
JOIN_ORDER = ("user", "ipc", "uts", "net", "pid", "mnt", "cgroup")

__all__ = ["JOIN_ORDER", "Context", "child_steps", "init_steps", "init_unshare", "join", "unshare_flags"]


def _new(context: Context) -> list[str]:
    return [name for name in STEPS if name in context.private and name not in context.joined]


def unshare_flags(context: Context) -> int:
    """The CLONE_NEW* flags to unshare together, before the fork into the new pid namespace."""
    flags = 0
    for name in _new(context):
        if not getattr(STEPS[name], "UNSHARE_IN_INIT", False):
            flags |= STEPS[name].FLAG
    return flags


def join(context: Context) -> None:
    """setns into every joined namespace, in JOIN_ORDER (pid applies to the children forked next)."""
    fds = {kind: os.open(context.joined[kind], os.O_RDONLY | os.O_CLOEXEC) for kind in context.joined}
    try:
        for kind in JOIN_ORDER:
            if kind in fds:
                syscalls.setns(fds[kind])
    finally:
        for fd in fds.values():
            os.close(fd)


def child_steps(context: Context) -> None:
    for name in _new(context):
        if STEPS[name].in_child:
            STEPS[name].in_child(context)


def init_unshare(context: Context) -> None:
    """In the init, right after it joined its cgroup: the namespaces whose root is that (cgroup), before
    any mount (a spec's own cgroup2 mount must show only the workload's subtree)."""
    for name in _new(context):
        if getattr(STEPS[name], "UNSHARE_IN_INIT", False):
            syscalls.unshare(STEPS[name].FLAG)


def init_steps(context: Context) -> None:
    for name, module in STEPS.items():
        if name in context.private and module.in_init:
            module.in_init(context)
