"""Accounting: one raw snapshot per running container, read from its cgroup v2 files.

Everything that reports usage (the run report, `cgctl stats`, the Prometheus
collector) reads through here, addressing values as (file, key): flat-keyed
files by their keys (cpu.stat usage_usec), single-value files by "" (memory.current),
cpu.max by "quota"/"period", pressure files by "some.total", "full.avg10"...,
io.stat per device. Files this kernel lacks are left out; a container that
vanishes while being read is skipped, never an error. Network counters are the one thing a
cgroup does not hold: they are read from /proc/PID/net/dev of one of its processes (see _network).
"""

from __future__ import annotations

import errno
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from cgctl import discovery, state, syscalls
from cgctl.cgroup import fs, io


def _keyed(text: str) -> dict[str, str]:
    words = iter(text.split())
    return dict(zip(words, words, strict=True))


def _single(text: str) -> dict[str, str]:
    value = text.strip()
    return {} if value == "max" else {"": value}


def _cpu_max(text: str) -> dict[str, str]:
    quota, period = text.split()
    return {"period": period} | ({} if quota == "max" else {"quota": quota})


def _pressure(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        for pair in pairs:
            key, _, value = pair.partition("=")
            values[f"{kind}.{key}"] = value
    return values


MEMINFO = Path("/proc/meminfo")
PROC = "/proc"
# /proc/PID/net/dev's columns after "NAME:" that are kept, by position: receive's eight come first,
# then transmit's (bytes packets errs drop fifo frame compressed multicast | bytes packets errs drop ...).
NET_COUNTERS = {
    "rx_bytes": 0,
    "rx_packets": 1,
    "rx_errors": 2,
    "rx_dropped": 3,
    "tx_bytes": 8,
    "tx_packets": 9,
    "tx_errors": 10,
    "tx_dropped": 11,
}

# Every file a snapshot reads, with the parser that turns it into {key: value text}; values are
# converted only when asked for, as a scrape needs a third of memory.stat's.
READERS: tuple[tuple[str, Callable[[str], dict[str, str]]], ...] = (
    *((name, _keyed) for name in ("cpu.stat", "memory.stat", "memory.events", "pids.events")),
    *(
        (name, _single)
        for name in (
            "memory.current",
            "memory.peak",
            "memory.swap.current",
            "memory.swap.peak",
            "memory.max",
            "memory.high",
            "memory.swap.max",
            "pids.current",
            "pids.peak",
            "pids.max",
            "cpu.weight",
        )
    ),
    ("cpu.max", _cpu_max),
    *((f"{resource}.pressure", _pressure) for resource in ("cpu", "memory", "io")),
)


@dataclass(frozen=True)
class Container:
    """A cgroup to account: a running workload as the run records know it, or (host-wide) any cgroup,
    with what its path says it is (`found`: see discovery.labels)."""

    name: str
    id: str
    cgroup: Path
    started_at: float | None
    labels: dict[str, str] = field(default_factory=dict)
    image: str = ""
    policy: str = ""
    own: bool = True  # one of cgctl's containers, with a run record
    found: dict[str, str] = field(default_factory=dict)
    path: str = ""  # host-wide: the cgroup as /proc/PID/cgroup names it


@dataclass
class Snapshot:
    container: Container
    taken_at: float
    files: dict[str, dict[str, str]]  # file -> key -> value as the kernel wrote it; "max" limits left out
    devices: dict[str, dict[str, float]]  # io.stat: device name (vda, or MAJ:MIN) -> key -> value
    # interface (lo left out) -> NET_COUNTERS key -> value; None: no network of its own (see _network)
    interfaces: dict[str, dict[str, float]] | None = None

    def entries(self, label: str) -> dict[str, dict[str, float]]:
        """The per-device or per-interface counters, by the label their rows carry."""
        return self.devices if label == "device" else self.interfaces or {}

    def value(self, file: str, key: str = "") -> float | None:
        text = self.files.get(file, {}).get(key)
        return None if text is None else float(text)

    def oom_kills(self) -> float | None:
        """Processes the OOM killer killed: with memory.oom.group the kernel counts the victim twice in
        oom_kill (once as the victim, once as a member of the group), so each group kill is taken off."""
        kills = self.value("memory.events", "oom_kill")
        return None if kills is None else kills - (self.value("memory.events", "oom_group_kill") or 0.0)

    def working_set(self) -> float | None:
        """memory.current minus inactive page cache, floored at 0: what cannot be reclaimed cheaply."""
        current = self.value("memory.current")
        return (
            None
            if current is None
            else max(0.0, current - (self.value("memory.stat", "inactive_file") or 0.0))
        )


def running_containers(
    state_dir: Path | None = None, known: dict[Path, tuple[object, Container]] | None = None
) -> list[Container]:
    """Containers whose supervisor is alive (it holds the lock on the run record).

    `known` caches parsed records across calls, keyed on each file's identity, so a scrape
    re-reads only the records that changed.
    """
    directory = state_dir or state.default_state_dir()
    known = {} if known is None else known
    containers = []
    live = state.live_records(directory)
    for path, identity in live:
        key = (identity.st_ino, identity.st_mtime_ns, identity.st_size)
        if path in known and known[path][0] == key:
            containers.append(known[path][1])
            continue
        try:
            record = state.read(path)
        except (OSError, ValueError):
            continue  # ended meanwhile, or not yet written
        container = Container(
            name=path.stem,
            id=record.get("id", ""),
            cgroup=Path(record["cgroup"]),
            started_at=record.get("started_at", 0.0),
            labels=record.get("spec", {}).get("labels", {}),
            image=((record.get("spec", {}).get("rootfs") or {}).get("image")) or "",
            policy=",".join((record.get("policy") or {}).get("applied", [])),
        )
        known[path] = (key, container)
        containers.append(container)
    for gone in known.keys() - {path for path, _ in live}:
        del known[gone]
    return containers


def host_cgroups(
    selection: discovery.Selection,
    mount: Path,
    state_dir: Path | None = None,
    known: dict[Path, tuple[object, Container]] | None = None,
) -> list[Container]:
    """Every cgroup the selection covers, parents first: cgctl's running containers as their records
    say (with what their path says besides), the others as their path says."""
    own = {container.cgroup: container for container in running_containers(state_dir, known)}
    found = []
    for directory, path in discovery.walk(selection, mount):
        labels = discovery.labels(path)
        if (container := own.get(directory)) is not None:
            found.append(replace(container, found=labels | {"container": container.name}, path=path))
        else:
            name = discovery.display_name(labels)
            found.append(
                Container(name, labels.get("id", ""), directory, None, own=False, found=labels, path=path)
            )
    return found


def find_container(name: str, state_dir: Path | None = None) -> Container:
    """The running container called name; LookupError if there is none."""
    for container in running_containers(state_dir):
        if container.name == name:
            return container
    raise LookupError(f"no running container named {name!r}")


def read_snapshot(
    container: Container, sys_dev_block: Path = io.SYS_DEV_BLOCK, device_names: dict[str, str] | None = None
) -> Snapshot | None:
    """Everything the container's cgroup reports, or None if it vanished meanwhile.

    `device_names` caches MAJ:MIN -> name lookups (one /sys read each) for the caller's round. The
    files are opened relative to the cgroup's directory (openat), which spares the kernel a path
    walk per file: a host-wide scrape reads some twenty thousand of them.
    """
    names = {} if device_names is None else device_names
    try:
        directory = os.open(container.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        return None
    files = {}
    try:
        for name, parse in READERS:
            if (text := _read(name, directory)) is not None:
                files[name] = parse(text)
        io_stat = _read("io.stat", directory) or ""
        interfaces = _network(directory)
    except OSError as error:  # not one of a vanishing cgroup (see _read): EACCES, say
        raise fs.CgroupError(f"{container.cgroup}/{error.filename}: cannot read: {error.strerror}") from None
    finally:
        os.close(directory)
    if "cpu.stat" not in files:  # every cgroup has one: this one is gone
        return None
    if container.path == "/" and "memory.current" not in files and (used := _meminfo_used()) is not None:
        files["memory.current"] = {"": used}
    devices = {}
    for number, values in fs.parse_nested(io_stat).items():
        if number not in names:
            names[number] = io.device_name(number, sys_dev_block) or number
        devices[names[number]] = values
    return Snapshot(container, time.time(), files, devices, interfaces)


def _read(name: str, directory: int) -> str | None:
    """The text of the file called name in directory; None if it is not there (this kernel or this
    cgroup's controllers lack it) or is being removed (ENODEV: its controller was just turned off in
    the parent's cgroup.subtree_control, or its cgroup removed). Other errors name the file."""
    try:
        return fs.read_fd(os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory))
    except OSError as error:
        if error.errno in (errno.ENOENT, errno.ENODEV):
            return None
        error.filename = name
        raise


def _network(directory: int) -> dict[str, dict[str, float]] | None:
    """The interfaces of the net namespace of the cgroup's first process (the kernel shows a process's
    own in /proc/PID/net): per cgroup, cgroup.procs' first line, a stat and one read of net/dev more.
    None without a process (or see _interfaces)."""
    try:
        fd = os.open("cgroup.procs", os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory)
        try:
            pid = os.read(fd, 32).split(b"\n", 1)[0]  # the first pid is all that is needed
        finally:
            os.close(fd)
    except OSError:  # gone, or a threaded cgroup's (EOPNOTSUPP)
        return None
    return _interfaces(int(pid)) if pid else None


def _interfaces(pid: int) -> dict[str, dict[str, float]] | None:
    """/proc/PID/net/dev parsed; None when pid is gone, unreadable to us, or in this host's net
    namespace: a container sharing it (--network host) would report the host's NICs as its own, so it
    reports no network, as cAdvisor does for host-network containers."""
    try:
        namespace = os.stat(f"{PROC}/{pid}/ns/net")
        if (namespace.st_dev, namespace.st_ino) == _host_net_namespace(PROC):
            return None
        return parse_net_dev(fs.read_fd(os.open(f"{PROC}/{pid}/net/dev", os.O_RDONLY | os.O_CLOEXEC)))
    except OSError:
        return None


@functools.cache
def _host_net_namespace(proc: str) -> tuple[int, int]:
    """The host's net namespace: pid 1's, or (unprivileged, pid 1 cannot be inspected) our own."""
    try:
        namespace = os.stat(f"{proc}/1/ns/net")
    except OSError:
        namespace = os.stat(f"{proc}/self/ns/net")
    return namespace.st_dev, namespace.st_ino


def parse_net_dev(text: str) -> dict[str, dict[str, float]]:
    """/proc/net/dev: two header lines, then `NAME: counters` per interface, the name right-aligned
    and the first counter glued to the colon once it is long (`  eth0:1234567890 ...`); lo left out.
    Names cannot hold a colon (the kernel refuses them), so the first one ends the name."""
    interfaces = {}
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        name = name.strip()
        if name != "lo" and counters:
            values = counters.split()
            interfaces[name] = {key: float(values[index]) for key, index in NET_COUNTERS.items()}
    return interfaces


def network_totals(pid: int) -> dict[str, int] | None:
    """rx/tx bytes and packets over pid's net namespace's interfaces (lo left out), for the run report:
    whoever tears a container's network down calls this first, while the namespace has a process.
    None when pid is gone or shares this host's namespace."""
    interfaces = _interfaces(pid)
    return None if interfaces is None else totals(interfaces)


def namespace_totals(netns: int) -> dict[str, int] | None:
    """network_totals of a net namespace held by an fd, whose processes may all be gone (the run
    report's, read at the end): a child joins it and reads its /proc/thread-self/net/dev."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            os.close(read_end)
            syscalls.setns(netns, syscalls.CLONE_NEWNET)
            with open("/proc/thread-self/net/dev", "rb") as counters:
                os.write(write_end, counters.read())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        text = reader.read().decode(errors="replace")
    os.waitpid(child, 0)
    return totals(parse_net_dev(text)) if text else None


def totals(interfaces: dict[str, dict[str, float]]) -> dict[str, int]:
    """Bytes and packets received and sent, summed over the interfaces."""
    keys = ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")
    return {key: int(sum(counters[key] for counters in interfaces.values())) for key in keys}


def _meminfo_used() -> str | None:
    """The machine's memory in use (MemTotal - MemFree, bytes) for the root cgroup, which has no
    memory.current: what runc and cAdvisor report for it, so `id="/"` has a memory total."""
    try:
        fields = dict(line.split(":", 1) for line in MEMINFO.read_text().splitlines() if ":" in line)
        return str((int(fields["MemTotal"].split()[0]) - int(fields["MemFree"].split()[0])) * 1024)
    except (OSError, KeyError, ValueError):
        return None


def snapshots(state_dir: Path | None = None) -> list[Snapshot]:
    return [snap for container in running_containers(state_dir) if (snap := read_snapshot(container))]


@dataclass(frozen=True)
class Usage:
    """What `cgctl stats` shows for one container, over the interval between two snapshots."""

    name: str  # host-wide, what the cgroup is (discovery.display_name) where it is not cgctl's
    cpu_percent: float  # of one CPU
    memory_bytes: int
    memory_limit_bytes: int | None
    working_set_bytes: int
    read_bytes: int
    write_bytes: int
    pids: int
    pids_limit: int | None
    throttled_percent: float  # of the cpu.max periods in the interval
    pressure_cpu: float | None  # some avg10, percent
    pressure_memory: float | None
    pressure_io: float | None
    io_bytes_per_second: float = 0.0  # read and written over the interval
    cgroup: str = ""  # host-wide: the cgroup's path below the cgroup2 mount
    # bytes received and sent over its interfaces (lo left out); None with no network of its own
    # (the host's, or no process left to ask)
    net_rx_bytes: int | None = None
    net_tx_bytes: int | None = None


def usage(before: Snapshot, after: Snapshot) -> Usage:
    def delta(file: str, key: str) -> float:
        return (after.value(file, key) or 0.0) - (before.value(file, key) or 0.0)

    def whole(value: float | None) -> int | None:
        return None if value is None else int(value)

    seconds = max(after.taken_at - before.taken_at, 1e-9)
    network = None if after.interfaces is None else totals(after.interfaces)
    periods = delta("cpu.stat", "nr_periods")
    return Usage(
        name=after.container.name,
        cpu_percent=delta("cpu.stat", "usage_usec") / 1e6 / seconds * 100,
        memory_bytes=int(after.value("memory.current") or 0.0),
        memory_limit_bytes=whole(after.value("memory.max")),
        working_set_bytes=int(after.working_set() or 0.0),
        read_bytes=int(sum(values.get("rbytes", 0) for values in after.devices.values())),
        write_bytes=int(sum(values.get("wbytes", 0) for values in after.devices.values())),
        pids=int(after.value("pids.current") or 0),
        pids_limit=whole(after.value("pids.max")),
        throttled_percent=delta("cpu.stat", "nr_throttled") / periods * 100 if periods else 0.0,
        pressure_cpu=after.value("cpu.pressure", "some.avg10"),
        pressure_memory=after.value("memory.pressure", "some.avg10"),
        pressure_io=after.value("io.pressure", "some.avg10"),
        io_bytes_per_second=max(0.0, io_bytes(after) - io_bytes(before)) / seconds,
        cgroup=after.container.path,
        net_rx_bytes=None if network is None else network["rx_bytes"],
        net_tx_bytes=None if network is None else network["tx_bytes"],
    )


def io_bytes(snap: Snapshot) -> float:
    return sum(values.get("rbytes", 0) + values.get("wbytes", 0) for values in snap.devices.values())
