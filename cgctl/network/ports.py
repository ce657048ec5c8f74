"""Published ports: a free one chosen for -p PORT, and each claimed before its DNAT rule exists.

A claim is a file made with O_EXCL under the runtime directory, so two containers cannot publish
one port even between the check and the rule; a port a host process holds is refused by trying to
bind it, naming that process when /proc shows it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from pathlib import Path

from cgctl.netspec import PortMapping


class PortBusy(ValueError):
    """The port cannot be published: the message names it and its holder."""


def _claim_path(directory: Path, mapping: PortMapping) -> Path:
    return directory / f"{mapping.protocol}-{mapping.host_ip or 'any'}-{mapping.host_port}"


def claim(directory: Path, mappings: list[PortMapping], owner: str) -> list[PortMapping]:
    """Claim every mapping's host port for owner (a free one where it is 0), all or none; the
    mappings with their ports. PortBusy if one is taken, by a container or by a host process."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    made: list[Path] = []
    chosen = []
    try:
        for mapping in mappings:
            for _ in range(20):  # a free port may be taken between choosing and claiming it
                port = (
                    mapping
                    if mapping.host_port
                    else mapping.model_copy(update={"host_port": free_port(mapping)})
                )
                path = _claim_path(directory, port)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:
                    if mapping.host_port:
                        holder = path.read_text().strip() or "another container"
                        raise PortBusy(f"{port.host_port}/{port.protocol} is published by {holder}") from None
                    continue
                with os.fdopen(fd, "w") as file:
                    file.write(owner)
                made.append(path)
                check_bindable(port)
                chosen.append(port)
                break
            else:
                raise PortBusy(f"found no free port for {mapping.container_port}/{mapping.protocol}")
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise
    return chosen


def release(directory: Path, mappings: list[PortMapping], owner: str) -> None:
    """Drop owner's claims (another's claim of the same port is left alone)."""
    for mapping in mappings:
        path = _claim_path(directory, mapping)
        with contextlib.suppress(OSError):
            if path.read_text().strip() == owner:
                path.unlink()


def _probe(mapping: PortMapping) -> socket.socket:
    """An unbound socket of the mapping's protocol and address family."""
    kind = socket.SOCK_STREAM if mapping.protocol == "tcp" else socket.SOCK_DGRAM
    return socket.socket(socket.AF_INET6 if ":" in mapping.host_ip else socket.AF_INET, kind)


def free_port(mapping: PortMapping) -> int:
    """A port no one holds now on the mapping's address (it may be taken before it is bound)."""
    with _probe(mapping) as probe:
        probe.bind((mapping.host_ip, 0))
        return int(probe.getsockname()[1])


def check_bindable(mapping: PortMapping) -> None:
    """PortBusy, naming the port and its holder, if the mapping's port cannot be bound here."""
    with _probe(mapping) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((mapping.host_ip, mapping.host_port))
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise PortBusy(f"{mapping.host_ip or '*'}:{mapping.host_port}: {error.strerror}") from None
            raise PortBusy(
                f"{mapping.host_port}/{mapping.protocol} is in use on this host{_holder(mapping)}"
            ) from None


def _holder(mapping: PortMapping) -> str:
    """' by PROGRAM (pid N)' for the process holding the port, from /proc; '' if not found."""
    tables = [f"/proc/net/{mapping.protocol}", f"/proc/net/{mapping.protocol}6"]
    inodes = set()
    for table in tables:
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rsplit(":", 1)[1], 16) == mapping.host_port:
                    inodes.add(f"socket:[{fields[9]}]")
    for pid in filter(str.isdigit, os.listdir("/proc")) if inodes else ():
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        name = Path(f"/proc/{pid}/comm").read_text().strip()
                        return f" by {name} (pid {pid})"
    return ""
