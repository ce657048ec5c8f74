"""The container's /etc/resolv.conf, /etc/hosts and /etc/hostname, written on the host and bound into
its root, as docker writes them.

Names on a user network resolve through /etc/hosts: each member's file lists every member, and is
rewritten in place (the same inode, which its bind mount shows at once) whenever a member joins or
leaves. No resolver runs and no loopback resolver is copied in: a nameserver of the host's on
127.0.0.0/8 or ::1 cannot be reached from the container's namespace, so it is left out.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
from pathlib import Path

from cgctl.netspec import NetworkSpec

HOST_RESOLV_CONF = Path("/etc/resolv.conf")
# What the host's resolv.conf points to when it names only systemd-resolved's stub.
RESOLVED_UPSTREAM = Path("/run/systemd/resolve/resolv.conf")
FALLBACK_NAMESERVERS = ("8.8.8.8", "8.8.4.4")  # docker's, when the host gives none usable
HOSTS_HEADER = (
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
)


def resolv_conf(spec: NetworkSpec) -> str:
    """The host's resolv.conf without loopback nameservers, with --dns, --dns-search and
    --dns-option in place of its own."""
    host = _read(HOST_RESOLV_CONF)
    servers, search, options = _parse(host)
    if not [s for s in servers if not _loopback(s)] and RESOLVED_UPSTREAM.exists():
        servers, search, options = _parse(_read(RESOLVED_UPSTREAM))
    usable = [server for server in servers if not _loopback(server)]
    lines = [f"nameserver {server}" for server in (spec.dns or usable or FALLBACK_NAMESERVERS)]
    if spec.dns_search or search:
        lines.insert(0, "search " + " ".join(spec.dns_search or search))
    if spec.dns_options or options:
        lines.append("options " + " ".join(spec.dns_options or options))
    return "\n".join(lines) + "\n"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _parse(text: str) -> tuple[list[str], list[str], list[str]]:
    servers, search, options = [], [], []
    for line in text.splitlines():
        words = line.split("#")[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            servers.append(words[1])
        elif words and words[0] in ("search", "domain"):
            search = words[1:]
        elif words and words[0] == "options":
            options = words[1:]
    return servers, search, options


def _loopback(server: str) -> bool:
    try:
        return ipaddress.ip_address(server.split("%")[0]).is_loopback
    except ValueError:
        return True  # unparsable: not copied


def hosts(hostname: str, address: str | None, spec: NetworkSpec, peers: dict[str, str]) -> str:
    """docker's /etc/hosts: localhost and the IPv6 names, --add-host's lines, the container's own
    address and name, then the other members of its network by name."""
    text = HOSTS_HEADER + "".join(f"{entry.ip}\t{entry.name}\n" for entry in spec.add_hosts)
    if address:
        text += f"{address}\t{hostname}\n"
    text += "".join(f"{ip}\t{name}\n" for name, ip in sorted(peers.items()) if name != hostname)
    return text


def write_in_place(path: Path, text: str) -> None:
    """Rewrite a file without replacing it: a bind mount of it shows the new text."""
    with open(path, "r+" if path.exists() else "w") as file:
        file.write(text)
        file.truncate()


class Directory:
    """A container's files under the runtime directory: hosts, resolv.conf, hostname."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def write(self, hostname: str, spec: NetworkSpec) -> None:
        """Before the container's address is known: its own line comes with write_hosts."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o755)
        write_in_place(self.root / "resolv.conf", resolv_conf(spec))
        self.write_hosts(hostname, None, spec)
        write_in_place(self.root / "hostname", hostname + "\n")

    def write_hosts(self, hostname: str, address: str | None, spec: NetworkSpec) -> None:
        write_in_place(self.root / "hosts", hosts(hostname, address, spec, {}))

    def binds(self) -> list[tuple[str, str]]:
        """(file on the host, path in the container) for each."""
        return [(str(self.root / name), f"/etc/{name}") for name in ("resolv.conf", "hosts", "hostname")]

    def remove(self) -> None:
        for name in ("hosts", "resolv.conf", "hostname"):
            (self.root / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.root.rmdir()


class Members:
    """Who is on a user network, by name and address, for each other's /etc/hosts: one JSON file
    per member under runtime/members/NETWORK (callers hold the store's lock)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def join(self, name: str, address: str, hosts_file: Path, hostname: str, spec: NetworkSpec) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        entry = {
            "address": address,
            "hosts": str(hosts_file),
            "hostname": hostname,
            "spec": spec.model_dump(mode="json"),
        }
        (self.directory / f"{name}.json").write_text(json.dumps(entry))
        self._rewrite()

    def leave(self, name: str) -> None:
        (self.directory / f"{name}.json").unlink(missing_ok=True)
        self._rewrite()

    def names(self) -> list[str]:
        return sorted(path.stem for path in self.directory.glob("*.json")) if self.directory.is_dir() else []

    def _rewrite(self) -> None:
        entries = {}
        for path in self.directory.glob("*.json") if self.directory.is_dir() else ():
            with contextlib.suppress(OSError, ValueError):
                entries[path.stem] = json.loads(path.read_text())
        peers = {name: entry["address"] for name, entry in entries.items()}
        for name, entry in entries.items():
            others = {peer: ip for peer, ip in peers.items() if peer != name}
            spec = NetworkSpec.model_validate(entry["spec"])
            with contextlib.suppress(OSError):
                write_in_place(Path(entry["hosts"]), hosts(entry["hostname"], entry["address"], spec, others))
