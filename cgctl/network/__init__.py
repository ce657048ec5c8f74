"""Container networks: a container's net namespace, its interface on a network's bridge (through the
CNI plugins), its published ports, bandwidth and /etc files; and taking all of it down again.

The run's order (runtime/supervisor.py, daemon/attempts.py): `plan` checks everything a user can
get wrong before anything exists; `Files` are written before the root is prepared (they are bound
into it); `attach` notes the attachment in the run record first, so that whoever finds the record
of a dead run (state.clean_stale, the daemon's recovery) can `detach` it, then claims the ports,
makes the namespace and ADDs it; the workload joins that namespace by path. `--network pasta`
(rootless) makes nothing there: `join` starts pasta on the workload's own namespace once it exists
(network/pasta.py). `detach` is idempotent and goes on past errors, so a retry after a crash
finishes the job.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgctl.limits import format_rate, row
from cgctl.netspec import NetworkSpec, PortMapping
from cgctl.network import cni, netns, pasta, ports, store
from cgctl.network.files import Directory, Members
from cgctl.network.store import DEFAULT, Network, NetworkError, Paths, get

__all__ = ["Attached", "NetworkError", "Plan", "attach", "default_mode", "detach", "join", "plan", "reshape"]
IFNAME = "eth0"


@dataclass(frozen=True)
class Plan:
    """Where a container's network comes from: mode none, host, container:NAME, or `network`."""

    mode: str
    spec: NetworkSpec
    paths: Paths
    network: Network | None = None
    note: str | None = None  # why a default of bridge became none on this host
    address: str | None = None  # the address to ask for (a restore's: its TCP connections keep it)
    # Whose /etc files to write and bind: a restore's are the dumped container's, at the paths its
    # mounts, which CRIU restores, were bound from.
    files_of: str | None = None

    def files_dir(self, name: str) -> Path:
        return self.paths.runtime / "containers" / (self.files_of or name)


def default_mode() -> tuple[str, str | None]:
    """--network's default: $CGCTL_NETWORK, else bridge as root on a host with the plugins, pasta
    rootless on a host with pasta and a default route (as podman 5's), else none (with a note)."""
    if explicit := os.environ.get("CGCTL_NETWORK"):
        return explicit, None
    if os.geteuid() != 0:
        if pasta.find() is None:
            return "none", f"no pasta: the container has no network but its loopback; {pasta.INSTALL}"
        if not pasta.has_route():
            return "none", "this host has no default route for pasta: the container has only its loopback"
        return "pasta", None
    lacking = [
        plugin
        for plugin in ("bridge", "host-local", "portmap", "firewall", "bandwidth")
        if cni.find(plugin) is None
    ]
    if lacking:
        return "none", (
            f"no CNI plugin {', '.join(lacking)} in {':'.join(cni.plugin_path())}: the container has no "
            f"network but its loopback (--network none); for docker's default bridge, {cni.INSTALL}"
        )
    return "bridge", None


def plan(
    spec: NetworkSpec,
    joined_net: bool = False,
    paths: Paths | None = None,
    bandwidth: dict[str, int] | None = None,
) -> Plan:
    """Resolve the mode (the default when unset; a joined net namespace is none's) and check it:
    NetworkError names the option and the value for an unknown network, missing plugins, ports or
    a `bandwidth` (limits.by_network's) without a network that carries them, or a rootless bridge."""
    paths = paths or Paths.default()
    mode, note = (
        (spec.mode, None) if spec.mode is not None else ("none", None) if joined_net else default_mode()
    )
    resolved = spec.model_copy(update={"mode": mode})
    if mode in ("none", "host") or mode.startswith("container:"):
        if spec.publish or spec.publish_all:
            raise NetworkError(
                "--publish",
                str(spec.publish[0]) if spec.publish else "-P",
                f"--network {mode} cannot carry published ports: use --network bridge or a network's name",
            )
        _refuse_bandwidth(mode, bandwidth)
        return Plan(mode, resolved, paths, note=note)
    if mode == "pasta":
        _refuse_bandwidth(mode, bandwidth)
        if joined_net:
            raise NetworkError("--network", mode, "pasta needs a net namespace of the container's own")
        _check_pasta(resolved)
        return Plan(mode, resolved, paths, note=note)
    if os.geteuid() != 0:
        raise NetworkError(
            "--network", mode, "a bridge needs root: rootless, use --network pasta, none or host"
        )
    network = get(paths, DEFAULT if mode == "bridge" else mode)
    lacking = cni.missing(network.conflist(paths))
    if lacking:
        raise NetworkError(
            "--network",
            mode,
            f"no CNI plugin {', '.join(lacking)} in {':'.join(cni.plugin_path())}: {cni.INSTALL}",
        )
    if network.internal and spec.publish:
        raise NetworkError(
            "--publish",
            str(spec.publish[0]),
            f"the network {network.name} is internal: nothing reaches it from the host",
        )
    return Plan(mode, resolved, paths, network)


def _check_pasta(spec: NetworkSpec) -> None:
    """What --network pasta needs of this host, and its published ports free (pasta binds them)."""
    if pasta.find() is None:
        raise NetworkError("--network", "pasta", f"pasta is not installed: {pasta.INSTALL}")
    if not pasta.has_route():
        raise NetworkError(
            "--network", "pasta", "this host has no default route, whose interface pasta copies: use none"
        )
    for mapping in spec.publish:
        if mapping.host_port:
            try:
                ports.check_bindable(mapping)
            except ports.PortBusy as error:
                raise NetworkError("--publish", str(mapping), str(error)) from None


def _refuse_bandwidth(mode: str, bandwidth: dict[str, int] | None) -> None:
    """A rate needs an interface on the host to shape: a bridge's veth (pasta's tap is in the container)."""
    for direction, rate in (bandwidth or {}).items():
        option = row("network", direction).name
        raise NetworkError(
            option,
            format_rate(rate),
            f"{option} needs a network of its own: --network bridge or a network's name "
            f"(--network {mode} has no interface to shape)",
        )


@dataclass
class Attached:
    """A namespace on its network, held by `fd` until closed: by the daemon once the workload is in it,
    by `cgctl run` at the end (its counters are read and its DEL finds it there)."""

    fd: int
    record: dict[str, Any]

    @property
    def path(self) -> str:
        return netns.path(self.fd)

    def close(self) -> None:
        os.close(self.fd)


def attach(
    planned: Plan,
    name: str,
    container_id: str,
    hostname: str,
    note: Callable[[dict[str, Any]], None],
    bandwidth: dict[str, int] | None = None,
) -> Attached | None:
    """Attach a new net namespace to the planned network (None for the modes that make none here:
    none, host, container:NAME). `note(record)` saves the attachment in the run record, first
    before anything is made and again once it is whole. On failure all of it is undone."""
    network = planned.network
    if network is None:
        return None
    record: dict[str, Any] = {
        "network": network.name,
        "container_id": f"cgctl-{container_id}",
        "ifname": IFNAME,
        "name": name,
        "ports": [],
        "member": network.name != DEFAULT,
        "files": str(planned.files_dir(name)),
        "bandwidth": bandwidth or {},
    }
    note(record)
    fd = None
    try:
        try:
            claimed = ports.claim(planned.paths.runtime / "ports", planned.spec.publish, name)
        except ports.PortBusy as error:
            raise NetworkError("--publish", str(error).split(" ")[0], str(error)) from None
        record["ports"] = [p.model_dump(mode="json") for p in claimed]
        note(record)
        store.ensure(planned.paths, network)
        fd = netns.create()
        record["result"] = cni.add(
            network.conflist(planned.paths),
            record["container_id"],
            netns.path(fd),
            IFNAME,
            _runtime_config(record),
            planned.address,
        )
        record["address"] = _address(record["result"])
        files = Directory(planned.files_dir(name))
        if record["member"]:
            with contextlib.suppress(OSError):
                Members(planned.paths.runtime / "members" / network.name).join(
                    name, record["address"], files.root / "hosts", hostname, planned.spec
                )
        elif files.root.is_dir():  # made for a root of its own (supervisor.with_network_files)
            files.write_hosts(hostname, record["address"], planned.spec)
        note(record)
    except BaseException:
        detach(record, planned.paths)
        if fd is not None:
            os.close(fd)
        raise
    return Attached(fd, record)


def join(planned: Plan, pid: int, note: Callable[[dict[str, Any]], None]) -> None:
    """What a mode does once the workload's namespaces exist (process pid), before it goes on: pasta
    attaches to them. `note(record)` saves the attachment in the run record (for detach)."""
    if planned.mode != "pasta":
        return
    try:
        pasta.attach(pid, planned.spec.publish, note)
    except pasta.PastaError as error:
        raise NetworkError("--network", "pasta", str(error)) from None


def detach(record: dict[str, Any], paths: Paths | None = None, netns_path: str = "") -> None:
    """Take an attachment down: pasta's process; or its name off its network's hosts files, the CNI
    DEL (its lease, port rules, bandwidth device; its veth too when the namespace is still held at
    netns_path, else the veth went with the namespace), its port claims. Idempotent; the first error
    is raised at the end."""
    if record.get("mode") == "pasta":
        pasta.stop(record)
        return
    paths = paths or Paths.default()
    failure: BaseException | None = None
    if record.get("member"):
        Members(paths.runtime / "members" / record["network"]).leave(record["name"])
    try:
        network = get(paths, record["network"])
        cni.delete(
            network.conflist(paths),
            record["container_id"],
            netns_path,
            record["ifname"],
            _runtime_config(record),
            record.get("result"),
        )
    except (cni.CniError, NetworkError) as error:
        failure = error
    ports.release(
        paths.runtime / "ports",
        [PortMapping.model_validate(p) for p in record.get("ports", [])],
        record["name"],
    )
    Directory(Path(record.get("files") or paths.runtime / "containers" / record["name"])).remove()
    if failure is not None:
        raise failure


def reshape(
    record: dict[str, Any], bandwidth: dict[str, int], netns_path: str, paths: Paths | None = None
) -> dict[str, Any]:
    """Shape a running container's attachment anew (bandwidth: limits.by_network's; {}: no limit)
    and return the attachment as it now is. The bandwidth plugin alone is DELeted and ADDed again
    with the attachment's cached result, after the host's end of its interface is cleared of the
    qdiscs the plugin's DEL leaves (it expects the interface to go with the namespace). If that
    fails the old rates are put back and NetworkError names the limit and the rate."""
    paths = paths or Paths.default()
    conflist = get(paths, record["network"]).conflist(paths)
    alone = {**conflist, "plugins": [p for p in conflist["plugins"] if p["type"] == "bandwidth"]}
    new = {**record, "bandwidth": bandwidth}
    try:
        _shape(alone, new, netns_path)
    except (cni.CniError, OSError, subprocess.SubprocessError) as error:
        with contextlib.suppress(cni.CniError, OSError, subprocess.SubprocessError):
            _shape(alone, record, netns_path)
        direction, rate = next(iter(bandwidth.items()), ("egress", 0))
        raise NetworkError(
            row("network", direction).name,
            format_rate(rate) if rate else "",
            f"the bandwidth plugin could not shape {record['name']}: {error}; its rates are as they were",
        ) from None
    return new


def _shape(alone: dict[str, Any], record: dict[str, Any], netns_path: str) -> None:
    for interface in record["result"].get("interfaces", []):
        name = interface["name"]
        if not interface.get("sandbox") and _is_veth(name):
            for parent in ("root", "ingress"):  # ingress: the redirect of egress into the plugin's ifb
                subprocess.run(["tc", "qdisc", "del", "dev", name, parent], capture_output=True, timeout=60)
    args = (record["container_id"], netns_path, record["ifname"], _runtime_config(record))
    cni.delete(alone, *args, record["result"])
    cni.add(alone, *args, prev_result=record["result"])


def _is_veth(name: str) -> bool:
    """The host's end of a veth pair: its peer (iflink) is another interface, in another namespace."""
    link = Path("/sys/class/net", name)
    try:
        return (link / "iflink").read_text() != (link / "ifindex").read_text()
    except OSError:
        return False


def _runtime_config(record: dict[str, Any]) -> dict[str, Any]:
    """What portmap and bandwidth are given (CNI's runtimeConfig, by their capabilities)."""
    mappings = [
        {
            "hostPort": p["host_port"],
            "containerPort": p["container_port"],
            "protocol": p["protocol"],
            "hostIP": p["host_ip"],
        }
        for p in record.get("ports", [])
    ]
    config: dict[str, Any] = {"portMappings": mappings}
    rates = record.get("bandwidth") or {}
    if rates:
        bandwidth = {}
        for direction in ("ingress", "egress"):
            if rates.get(direction):
                bandwidth[f"{direction}Rate"] = rates[direction]
                bandwidth[f"{direction}Burst"] = burst(rates[direction])
        config["bandwidth"] = bandwidth
    return config


def burst(rate: int) -> int:
    """The token bucket's size in bits: 100 ms at the rate, at least 64 KiB (a few full-size packets)."""
    return max(rate // 10, 64 * 1024 * 8)


def _address(result: dict[str, Any]) -> str | None:
    for entry in result.get("ips", []):
        return str(entry["address"]).split("/")[0]
    return None
