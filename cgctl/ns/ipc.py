"""The IPC namespace: System V IPC objects and POSIX message queues of its own; nothing to set up."""

from __future__ import annotations

from cgctl import syscalls

FLAG = syscalls.CLONE_NEWIPC
in_child = None
in_init = None
