"""--network pasta: a rootless container's network through pasta (Debian's passt package), as podman
5's default. No root is needed: pasta runs as the caller, joins the workload's own user and net
namespaces by its pid (they exist once the setup child has made them, before the workload goes on),
puts a tap interface there with the host's address, routes and MTU, and carries the container's
traffic through ordinary sockets of the host. A published port is a socket pasta listens on in the
host's namespace (-t/-u); the container reaches the host's loopback at its gateway's address.

pasta outlives its target (a namespace joined by pid is held open, not watched), so cgctl ends it:
at the end of the run, and after a SIGKILL of cgctl at once through PR_SET_PDEATHSIG (rootless; a
root pasta drops to nobody, which clears it) and at the latest by the next cgctl's clean-up, which
finds its pid and start time in the run record.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cgctl import syscalls
from cgctl.netspec import PortMapping
from cgctl.network import ports

INSTALL = "install Debian's passt package (apt-get install passt)"
IFNAME = "eth0"
READY_TIMEOUT = 60.0  # seconds for pasta to configure the namespace: milliseconds, but a loaded VM is slow


class PastaError(RuntimeError):
    """pasta could not give the container its network; the message carries pasta's own words."""


def find() -> str | None:
    return shutil.which("pasta")


def has_route() -> bool:
    """Whether this host has a default route (IPv4 or IPv6): pasta copies the addresses and routes of
    that interface into the container, and refuses to start without one."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 2 and fields[1] == "00000000" and fields[0] != "lo":
                return True
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/ipv6_route").read_text().splitlines():
            fields = line.split()
            if len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[9] != "lo":
                return True
    return False


def port_options(mappings: list[PortMapping]) -> list[str]:
    """pasta's -t/-u for the published ports (ADDRESS/HOSTPORT:PORT); `none` for a protocol with none,
    since pasta's default would forward every port the container binds, and -T/-U none, since its
    default would show the host's loopback ports on the container's loopback."""
    options = []
    for protocol, flag in (("tcp", "-t"), ("udp", "-u")):
        chosen = [m for m in mappings if m.protocol == protocol]
        for m in chosen:
            address = f"{m.host_ip}/" if m.host_ip else ""
            options += [flag, f"{address}{m.host_port}:{m.container_port}"]
        if not chosen:
            options += [flag, "none"]
    return [*options, "-T", "none", "-U", "none"]


def start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat's 22nd field), which tells
    a recorded pid from a later process that reused it; None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def attach(
    target: int, mappings: list[PortMapping], note: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """Start pasta on the net namespace of process `target` with the mappings published (a free host
    port where one is 0) and return once the namespace is configured; `note(record)` saves the record
    (pasta's pid first). PastaError if pasta fails; then nothing of it is left."""
    program = find()
    if program is None:
        raise PastaError(f"pasta is not installed: {INSTALL}")
    chosen = [m if m.host_port else m.model_copy(update={"host_port": ports.free_port(m)}) for m in mappings]
    record: dict[str, Any] = {"mode": "pasta", "ports": [m.model_dump(mode="json") for m in chosen]}
    with tempfile.TemporaryDirectory(prefix="cgctl-pasta-") as scratch:
        pidfile, log = Path(scratch) / "pid", Path(scratch) / "log"
        with open(log, "wb") as errors:
            process = subprocess.Popen(
                [
                    program,
                    "--config-net",
                    "--foreground",
                    "--quiet",
                    "--ns-ifname",
                    IFNAME,
                    "--pid",
                    str(pidfile),
                    *port_options(chosen),
                    str(target),
                ],
                stdin=subprocess.DEVNULL,
                stdout=errors,
                stderr=errors,
                preexec_fn=_die_with_us,
            )
        record |= {"pid": process.pid, "start_time": start_time(process.pid)}
        note(record)
        deadline = time.monotonic() + READY_TIMEOUT
        # pasta writes its pid file in the foreground only once the namespace and its ports are ready.
        while not _read(pidfile) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.poll() is not None or not _read(pidfile):
            stop(record)
            said = " ".join(line for line in _read(log).splitlines() if "syslog" not in line)
            why = f"exit status {process.returncode}" if process.returncode is not None else "no answer"
            raise PastaError(f"pasta failed ({why}): {said or 'it said nothing'}")
    return record


def _read(path: Path) -> str:
    with contextlib.suppress(OSError):
        return path.read_text().strip()
    return ""


def _die_with_us() -> None:
    """In pasta's process before exec: SIGKILL when cgctl dies, even by SIGKILL."""
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)


def stop(record: dict[str, Any]) -> None:
    """End the recorded pasta if it still runs (the same pid and start time), and reap it if it is
    this process's child. Idempotent."""
    pid = record.get("pid")
    if not pid or start_time(pid) is None or start_time(pid) != record.get("start_time"):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
