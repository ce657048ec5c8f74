"""The UTS namespace: the workload's own hostname (by default its name) and NIS domain name."""

from __future__ import annotations

import socket

from cgctl import syscalls
from cgctl.ns.context import Context

FLAG = syscalls.CLONE_NEWUTS


def in_child(context: Context) -> None:
    socket.sethostname(context.hostname)
    if context.domainname is not None:
        syscalls.setdomainname(context.domainname)


in_init = None
