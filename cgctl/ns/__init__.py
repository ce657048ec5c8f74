"""Linux namespaces, one module each, in nsjail's shape: every module has a FLAG and two steps.

- in_child: runs in the process that unshared the namespace, before it forks
  the workload's first process (hostname, loopback, mount propagation).
- in_init: runs in the workload's first process (pid 1 of a new pid
  namespace) just before exec: what must be done from inside (/proc, /sys,
  the cgroup namespace, which must follow joining the cgroup).

The user namespace is not in this table: it is opt-in and must come before
all the others (see user.py).
"""

from __future__ import annotations

from types import ModuleType

from cgctl.ns import cgroup, ipc, mnt, net, pid, uts
from cgctl.ns.context import Context

# Steps run in this order: propagation made private before anything is mounted, a fresh /sys
# before cgroup2 is mounted on it.
STEPS: dict[str, ModuleType] = {"mnt": mnt, "uts": uts, "ipc": ipc, "net": net, "cgroup": cgroup, "pid": pid}

__all__ = ["Context", "child_steps", "init_steps", "unshare_flags"]


def unshare_flags(context: Context) -> int:
    """The CLONE_NEW* flags to unshare together, before the fork into the new pid namespace."""
    flags = 0
    for name, module in STEPS.items():
        if name in context.private and not getattr(module, "UNSHARE_IN_INIT", False):
            flags |= module.FLAG
    return flags


def child_steps(context: Context) -> None:
    for name, module in STEPS.items():
        if name in context.private and module.in_child:
            module.in_child(context)


def init_steps(context: Context) -> None:
    for name, module in STEPS.items():
        if name in context.private and module.in_init:
            module.in_init(context)
