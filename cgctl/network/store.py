"""Networks: each a bridge, a subnet and a CNI conflist, kept as one JSON file per network.

Bridges, subnets and forwarding rules are the host's, so the store is the host's too (not a
daemon's): /var/lib/cgctl/networks holds the definitions, /run/cgctl/networks what lives only as
long as the containers (IP leases, port claims, each container's /etc/hosts). The default
network, `bridge` (bridge cgctl0, 10.91.0.0/16), is made on first use, as docker's is there from
the start; user networks take a /24 of 10.92.0.0/16 unless given a subnet. Traffic between two
networks' bridges is dropped by cgctl's own nftables table (`inet cgctl`), written whole from the
definitions each time one changes; nothing else on the host is flushed or changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cgctl import durable
from cgctl.netspec import NETWORK_NAME, SPECIAL_MODES

DEFAULT = "bridge"
DEFAULT_SUBNET = "10.91.0.0/16"
POOL = ipaddress.ip_network("10.92.0.0/16")
TABLE = "cgctl"  # the nftables table (family inet) that isolates networks from each other


class NetworkError(ValueError):
    """Bad input or a refusal: `option` and `value` are what the user gave (for the CLI's message)."""

    def __init__(self, option: str, value: str, reason: str) -> None:
        super().__init__(f"invalid value {value!r} for {option}: {reason}")
        self.option, self.value, self.reason = option, value, reason


@dataclass(frozen=True)
class Network:
    """One network as `network inspect` shows it and the conflist is drawn from."""

    name: str
    subnet: str
    gateway: str
    bridge: str
    internal: bool = False
    created: float = 0.0

    def conflist(self, paths: Paths) -> dict[str, Any]:
        """The CNI conflist: bridge (with host-local leases under paths.leases), portmap, firewall
        and bandwidth; an internal network has no gateway on the host, no route and no ports."""
        ipam: dict[str, Any] = {
            "type": "host-local",
            "ranges": [[{"subnet": self.subnet, "gateway": self.gateway}]],
            "dataDir": str(paths.leases),
        }
        if not self.internal:
            ipam["routes"] = [{"dst": "0.0.0.0/0"}]
        plugins: list[dict[str, Any]] = [
            {
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": not self.internal,
                "ipMasq": False,  # one rule per network in cgctl's table, not one per container
                "hairpinMode": True,
                "ipam": ipam,
            }
        ]
        if not self.internal:
            plugins += [
                {"type": "portmap", "capabilities": {"portMappings": True}},
                {"type": "firewall", "backend": "iptables"},
            ]
        plugins.append({"type": "bandwidth", "capabilities": {"bandwidth": True}})
        return {"cniVersion": "1.0.0", "name": self.name, "plugins": plugins}


@dataclass(frozen=True)
class Paths:
    definitions: Path  # one NAME.json per network
    runtime: Path  # leases/, ports/, members/, containers/: gone at reboot with the containers

    @property
    def leases(self) -> Path:
        return self.runtime / "leases"

    @classmethod
    def default(cls) -> Paths:
        """/var/lib/cgctl/networks and /run/cgctl/networks; $CGCTL_NETWORK_DIR holds both (tests)."""
        if explicit := os.environ.get("CGCTL_NETWORK_DIR"):
            return cls(Path(explicit), Path(explicit) / "run")
        return cls(Path("/var/lib/cgctl/networks"), Path("/run/cgctl/networks"))


@contextlib.contextmanager
def locked(paths: Paths) -> Iterator[None]:
    """The store's lock: creating, removing and joining networks one at a time."""
    paths.definitions.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd = os.open(paths.definitions / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def load_all(paths: Paths) -> list[Network]:
    """Every network, the default one included (saved or not yet)."""
    saved = (
        [_load(path) for path in sorted(paths.definitions.glob("*.json"))]
        if paths.definitions.is_dir()
        else []
    )
    return sorted(
        [*saved, *([] if any(n.name == DEFAULT for n in saved) else [get(paths, DEFAULT)])],
        key=lambda n: n.name,
    )


def _load(path: Path) -> Network:
    return Network(**json.loads(path.read_text()))


def get(paths: Paths, name: str) -> Network:
    """The network called name (the default one even before it is saved); NetworkError if none."""
    path = paths.definitions / f"{name}.json"
    if path.exists():
        return _load(path)
    if name == DEFAULT:
        return Network(DEFAULT, DEFAULT_SUBNET, _gateway_of(DEFAULT_SUBNET), "cgctl0", False, time.time())
    known = ", ".join(n.name for n in load_all(paths)) or "none yet"
    raise NetworkError(
        "--network", name, f"no such network (networks: {known}); make it with `cgctl network create {name}`"
    )


def ensure(paths: Paths, network: Network) -> None:
    """Save a network not saved yet (the default, on its first container) with its nftables rules:
    only an attachment makes it, never a plan that may yet be refused."""
    if (paths.definitions / f"{network.name}.json").exists():
        return
    with locked(paths):
        if not (paths.definitions / f"{network.name}.json").exists():
            _save(paths, network)


def create(
    paths: Paths, name: str, subnet: str | None = None, gateway: str | None = None, internal: bool = False
) -> Network:
    """Define a network; its bridge appears with its first container. NetworkError for a taken or
    reserved name, a malformed or overlapping subnet, or a gateway outside it."""
    if not re.match(NETWORK_NAME, name) or name in (*SPECIAL_MODES, "container"):
        raise NetworkError(
            "NAME",
            name,
            "a network's name is [A-Za-z0-9][A-Za-z0-9_.-]*, not none, host, bridge or container",
        )
    with locked(paths):
        if (paths.definitions / f"{name}.json").exists():
            raise NetworkError("NAME", name, "a network of that name exists (cgctl network ls)")
        existing = load_all(paths)
        chosen = _free_subnet(existing) if subnet is None else _checked_subnet(subnet, existing)
        gateway = _checked_gateway(gateway, chosen)
        taken = {n.bridge for n in existing} | {"cgctl0"}
        bridge = next(f"cgctl{i}" for i in range(1, 10_000) if f"cgctl{i}" not in taken)
        network = Network(name, str(chosen), gateway, bridge, internal, time.time())
        _save(paths, network)
    return network


def remove(paths: Paths, name: str, members: list[str]) -> None:
    """Remove a network no container uses (members: those that do); its bridge goes with it."""
    with locked(paths):
        network = get(paths, name)
        if members:
            raise NetworkError("NAME", name, f"in use by {', '.join(sorted(members))}: remove them first")
        (paths.definitions / f"{name}.json").unlink()
        _delete_link(network.bridge)
        shutil.rmtree(paths.leases / name, ignore_errors=True)
        write_isolation(load_all(paths))


def _save(paths: Paths, network: Network) -> None:
    durable.write_json(paths.definitions / f"{network.name}.json", asdict(network))
    write_isolation(load_all(paths))


def _gateway_of(subnet: str) -> str:
    return str(next(ipaddress.ip_network(subnet).hosts()))


def _checked_subnet(text: str, existing: list[Network]) -> ipaddress.IPv4Network:
    try:
        subnet = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise NetworkError("--subnet", text, "not a subnet in CIDR notation, e.g. 10.93.0.0/24") from None
    if subnet.version != 4:
        raise NetworkError("--subnet", text, "only IPv4 subnets for now")
    if str(subnet) != text.strip():
        raise NetworkError("--subnet", text, f"host bits are set: did you mean {subnet}?")
    if subnet.prefixlen > 29:
        raise NetworkError("--subnet", text, "too small: give at least a /29")
    for network in existing:
        if subnet.overlaps(ipaddress.ip_network(network.subnet)):
            raise NetworkError("--subnet", text, f"overlaps the network {network.name} ({network.subnet})")
    for route in host_routes():
        if subnet.overlaps(route):
            raise NetworkError("--subnet", text, f"overlaps this host's route to {route}")
    return subnet  # type: ignore[return-value]


def _free_subnet(existing: list[Network]) -> ipaddress.IPv4Network:
    used = [ipaddress.ip_network(n.subnet) for n in existing] + host_routes()
    for candidate in POOL.subnets(new_prefix=24):
        if not any(candidate.overlaps(other) for other in used):
            return candidate  # type: ignore[return-value]
    raise NetworkError("--subnet", "", f"every /24 of {POOL} is in use: give one with --subnet")


def _checked_gateway(text: str | None, subnet: ipaddress.IPv4Network) -> str:
    if text is None:
        return str(next(subnet.hosts()))
    try:
        gateway = ipaddress.ip_address(text)
    except ValueError:
        raise NetworkError("--gateway", text, "not an IP address") from None
    if gateway not in subnet or gateway in (subnet.network_address, subnet.broadcast_address):
        raise NetworkError("--gateway", text, f"not a host address of the subnet {subnet}")
    return str(gateway)


def host_routes() -> list[ipaddress.IPv4Network]:
    """This host's IPv4 routes other than the default and those through cgctl's bridges."""
    routes = []
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/route").read_text().splitlines()[1:]:
            fields = line.split()
            interface, destination, mask = fields[0], int(fields[1], 16), int(fields[7], 16)
            if mask == 0 or interface.startswith("cgctl"):
                continue
            address = ipaddress.IPv4Address(destination.to_bytes(4, "little"))
            prefix = bin(mask).count("1")
            routes.append(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
    return routes  # type: ignore[return-value]


def write_isolation(networks: list[Network]) -> None:
    """cgctl's nftables table, whole: traffic from one network's bridge to another's is dropped, and
        an internal network's bridge forwards nothing in or out; the others' traffic out is masqueraded,
    one rule per network (the bridge plugin's ipMasq would leave a chain per container behind whenever
    its DEL comes after the namespace is gone). Written atomically by one `nft -f`."""
    if not networks:
        subprocess.run(["nft", "delete", "table", "inet", TABLE], capture_output=True, timeout=60)
        return
    forward, postrouting = [], []
    for network in networks:
        bridge = network.bridge
        if network.internal:
            forward += [
                f'iifname "{bridge}" oifname != "{bridge}" drop',
                f'oifname "{bridge}" iifname != "{bridge}" drop',
            ]
        else:
            forward.append(f'iifname "{bridge}" oifname != "{bridge}" oifname "cgctl*" drop')
            postrouting.append(f'ip saddr {network.subnet} oifname != "{bridge}" masquerade')
    script = (
        f"table inet {TABLE} {{}}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n"
        "  chain forward {\n    type filter hook forward priority filter - 1; policy accept;\n"
        + "".join(f"    {rule}\n" for rule in forward)
        + "  }\n  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        + "".join(f"    {rule}\n" for rule in postrouting)
        + "  }\n}\n"
    )
    try:
        subprocess.run(["nft", "-f", "-"], input=script.encode(), check=True, capture_output=True, timeout=60)
    except FileNotFoundError:
        raise NetworkError("--network", "", "nft is missing: install Debian's nftables package") from None
    except subprocess.CalledProcessError as error:
        reason = error.stderr.decode(errors="replace").strip()
        raise NetworkError(
            "--network", "", f"writing the nftables table inet {TABLE} failed: {reason}"
        ) from None


def _delete_link(name: str) -> None:
    """Delete a bridge if it is there (pyroute2: plain netlink, no `ip` to parse)."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ip:
        found = ip.link_lookup(ifname=name)
        if found:
            with contextlib.suppress(NetlinkError):
                ip.link("del", index=found[0])
