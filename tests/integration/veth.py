"""A veth pair between the VM and a container's net namespace, made by hand with ip(8): a network
for the accounting tests that does not depend on how cgctl sets networks up."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SYS_NET = Path("/sys/class/net")
# What the kernel counts for a UDP datagram on an Ethernet device beyond its payload: the Ethernet
# header (14, no FCS on a veth), IPv4 (20) and UDP (8).
UDP_OVERHEAD = 42


def _ip(*args: str, netns_of: int | None = None) -> None:
    command = ["ip", *args] if netns_of is None else ["nsenter", "-t", str(netns_of), "-n", "ip", *args]
    subprocess.run(command, check=True, capture_output=True, timeout=30)


def _no_ipv6(interface: str, netns_of: int | None = None) -> None:
    """IPv6's own chatter (router solicitations, DAD) would add bytes nobody sent."""
    setting = f"/proc/sys/net/ipv6/conf/{interface}/disable_ipv6"
    command = ["sh", "-c", f"[ ! -e {setting} ] || echo 1 > {setting}"]
    if netns_of is not None:
        command = ["nsenter", "-t", str(netns_of), "-n", *command]
    subprocess.run(command, check=True, timeout=30)


def own_net_namespace(pid: int) -> bool:
    """Whether pid is in a net namespace other than the VM's (a container's, once its init made it)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/1/ns/net").st_ino


@contextmanager
def veth_into(pid: int, outside: str, inside: str, outside_ip: str, inside_ip: str) -> Iterator[None]:
    """A veth pair: `outside` stays here with outside_ip/30, `inside` moves into pid's net namespace
    with inside_ip/30. Both ends are gone afterwards (deleting one deletes its peer; the namespace's
    end goes with the namespace)."""
    deadline = time.monotonic() + 30
    while not own_net_namespace(pid):
        assert time.monotonic() < deadline, f"{pid} never got a net namespace of its own"
        time.sleep(0.05)
    _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
    try:
        _no_ipv6(outside)
        _no_ipv6(inside)
        _ip("link", "set", inside, "netns", str(pid))
        _ip("addr", "add", f"{inside_ip}/30", "dev", inside, netns_of=pid)
        _ip("link", "set", inside, "up", netns_of=pid)
        _ip("addr", "add", f"{outside_ip}/30", "dev", outside)
        _ip("link", "set", outside, "up")
        yield
    finally:
        if (SYS_NET / outside).exists():
            _ip("link", "del", outside)


def counter(interface: str, name: str) -> int:
    """An interface's own statistics, here (e.g. tx_bytes)."""
    return int((SYS_NET / interface / "statistics" / name).read_text())


def send_udp(address: str, port: int, datagrams: int, payload: int) -> int:
    """Send datagrams of payload bytes, paced so that no queue drops any; the bytes the receiving
    interface counts for them."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        data = b"x" * payload
        for index in range(datagrams):
            sender.sendto(data, (address, port))
            if index % 50 == 49:
                time.sleep(0.01)
    return datagrams * (payload + UDP_OVERHEAD)


def resolve(address: str, port: int, timeout: float = 30) -> None:
    """One datagram until the neighbour is known (its ARP answered), so that a burst is not queued
    behind the resolution and partly dropped."""
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        while True:
            sender.sendto(b"?", (address, port))
            neighbours = subprocess.run(
                ["ip", "neigh", "show", address], check=True, capture_output=True, text=True, timeout=30
            ).stdout
            if "REACHABLE" in neighbours or "STALE" in neighbours or "DELAY" in neighbours:
                return
            assert time.monotonic() < deadline, f"{address} never answered ARP: {neighbours!r}"
            time.sleep(0.1)


# A workload that receives UDP on port SINK_PORT forever, so the datagrams meet a socket, not an ICMP
# port unreachable (which the container would send back)
SINK_PORT = 9999
SINK = (
    "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    f"s.bind(('0.0.0.0', {SINK_PORT}))\nwhile True: s.recv(65536)\n"
)
