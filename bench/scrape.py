"""How long does one Prometheus scrape take, against just reading the cgroup files it reads?

Why: the exporter reads every cgroup's files at scrape time (nothing is cached), so a scrape can
never cost less than reading those files. This times a full scrape (ContainerCollector.render(),
native metrics: what `cgctl exporter` serves) next to two floors that read the same files raw,
with no parsing:

  (a) plain: each file opened by its full path and read to EOF, as issue #15 defines the floor
      ("plain open/read and no parsing"). The goal is a scrape of at most 2x this floor; above it,
      the exporter's own Python work (parsing, labels, text exposition) dominates what the
      kernel has to do.
  (b) tight: each cgroup's directory opened once and each file opened relative to it (openat)
      and read with a single read, which is how the exporter reads them now. The ratio to this
      one says how much of the scrape is Python work beyond the least possible system calls.

Two modes, each for every N:

  containers: N cgctl containers: N cgroups side by side, each with a live run record and its
      sleeper in a net namespace of its own, as cgctl's containers have. The scrape is
      ContainerCollector(state_dir).render(); both floors also list the state directory and read
      each run record, and each container's /proc/PID/net/dev (its network: accounting._network).
  hostwide: host-wide accounting (`cgctl exporter --all`) over a mixed tree of N leaf cgroups, a
      third each like systemd services (system.slice/svcNNNN.service), Kubernetes pods' containers
      (kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/
      cri-containerd-<id>.scope, three per pod) and podman containers (machine.slice/
      libpod-<id>.scope), the pods' and podman's sleepers each in a net namespace of its own,
      whose /proc/PID/net/dev both floors read too. The scrape is ContainerCollector(
      state_dir=<empty>, unified=/sys/fs/cgroup, selection=Selection(root=bench-scrape.slice))
      .render(): it walks the tree and accounts every
      cgroup in it, the slices and pods above the leaves included (the table's `cgroups`); the
      floors walk the same tree (a: os.walk, b: os.scandir on each directory's descriptor) and read
      the same files. The exposition must account every cgroup of the tree, and some series are
      checked to carry the labels their path implies (a pod's pod_uid and qos, a podman
      container's runtime...).

The scrape and the floors take turns round by round, so a change in the machine's load weighs on
all alike. Each row also reports this process's CPU time per scrape and what it would cost a
daemon scraped every 15 s (CPU per scrape / 15 s, as a fraction of one core), peak RSS and the size
of one exposition. At the largest N in hostwide mode it then measures a real exporter: it starts
`python -m cgctl exporter --all --cgroup-root bench-scrape.slice` on a free loopback port, scrapes
it over HTTP every 15 s for --daemon-seconds, and reports that process's CPU time (utime + stime
from /proc/PID/stat, idle time between scrapes included) over the wall time, and its RSS. An
exporter without --all (an older cgctl) is reported as not measured.

How: for each mode and N it creates the cgroups under /sys/fs/cgroup/bench-scrape.slice, each leaf
holding one `sleep` (moved in before it execs); in containers mode it claims one run record per
cgroup in a temporary state directory under /run (this process holds the flocks, so the exporter
sees them as live). It writes to /sys/fs/cgroup, so it needs root and a pure cgroup v2 hierarchy;
on this project's development machines (cgroup v1) that means the micro-VM, with memory for 1000
sleepers (one VM at a time: take the lock):

    .venv/bin/python -m compileall -q cgctl && flock /tmp/cgctl-vm.lock \\
        .venv/bin/python tests/vm/microvm.py --memory 4G --timeout 1800 -- .venv/bin/python \\
        bench/scrape.py [--counts 100,1000] [--scrapes N] [--mode containers|hostwide|both] \\
        [--daemon-seconds S] [--profile]

Python runs 10-30x slower in the VM (no KVM) than on the host: the ratios hold, the absolute times
and CPU fractions are the VM's. --profile prints cProfile's top functions of one render per mode
and N (by own time) to stderr.

Every cgroup and sleeper is killed and removed, every record released and the exporter stopped
after each N, and the cgroup tree must then be as it was before; anything else, a failing write,
a scrape that does not account exactly the cgroups there are, a wrong label or a counted error
aborts the benchmark. Every wait is bounded. The last line is `BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import platform
import pstats
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Literal

from cgroup2_host import CGROUP_MOUNT, require_cgroup2_root
from figures import p90, positive_int

from cgctl import accounting, state
from cgctl.cgroup import fs
from cgctl.discovery import Selection
from cgctl.metrics import ContainerCollector

Mode = Literal["containers", "hostwide"]
MODES: tuple[Mode, ...] = ("containers", "hostwide")
BENCH_SLICE = CGROUP_MOUNT / "bench-scrape.slice"
CONTROLLERS = ("cpu", "io", "memory", "pids")
# Every file accounting.read_snapshot reads in a cgroup, in its order (cgroup.procs for the first pid,
# whose net/dev it reads); the ones this kernel lacks are dropped.
SNAPSHOT_FILES = (*(name for name, _ in accounting.READERS), "io.stat", "cgroup.procs")
STATE_PARENT = Path("/run")  # a tmpfs, like cgctl's own /run/cgctl/runs
GOAL_RATIO = 2.0
WARMUP_ROUNDS = 2
PROGRESS_EVERY = 100
READ_CHUNK = 1 << 16
DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
CONTAINERS_PER_POD = 3
SCRAPE_INTERVAL = 15.0  # Prometheus' usual scrape interval, for the daemon's CPU
DAEMON_SECONDS = 120.0
DAEMON_START_TIMEOUT = 300.0  # the CLI's imports take a while in the VM
DAEMON_STOP_TIMEOUT = 30.0
HTTP_TIMEOUT = 120.0
SLEEPER_TIMEOUT = 30.0
PROFILE_TOP = 15
CPU_METRIC = "cgctl_container_cpu_usage_seconds_total"
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


@dataclass
class Fleet:
    """The cgroups below BENCH_SLICE, a sleeper in each leaf, and (containers mode) a live run record
    per leaf."""

    mode: Mode
    state_dir: Path
    groups: list[Path] = field(default_factory=list)  # every cgroup created, parents before children
    leaves: list[Path] = field(default_factory=list)  # the ones with a sleeper
    sleepers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    networked: list[int] = field(default_factory=list)  # the sleepers in a net namespace of their own
    claims: list[state.Claim] = field(default_factory=list)
    # hostwide: the labels some cgroups' series must carry, by cgroup name (as /proc/PID/cgroup says)
    expected_labels: dict[str, dict[str, str]] = field(default_factory=dict)

    def cgroups(self) -> int:
        """The cgroups a scrape accounts: containers mode the leaves, hostwide the slice and all below."""
        return len(self.leaves) if self.mode == "containers" else 1 + len(self.groups)


@dataclass(frozen=True)
class Result:
    mode: Mode
    leaves: int  # N: cgroups with a sleeper (containers mode: cgctl's containers)
    cgroups: int  # cgroups one scrape accounts (hostwide: the slices and pods above the leaves too)
    scrapes: int
    scrape_median_ms: float
    scrape_p90_ms: float
    scrape_cpu_ms: float  # median CPU time (user + system) of this process per scrape
    floor_plain_median_ms: float  # (a): full paths, read to EOF
    floor_plain_p90_ms: float
    floor_plain_cpu_ms: float
    floor_tight_median_ms: float  # (b): directory once, openat, one read
    floor_tight_p90_ms: float
    floor_tight_cpu_ms: float
    ratio_to_plain_floor: float
    ratio_to_tight_floor: float
    core_fraction_at_15s: float  # scrape_cpu_ms over SCRAPE_INTERVAL: one core = 1.0
    files_per_cgroup: int
    files_missing: list[str]  # snapshot files this kernel lacks: the exporter still tries each, per cgroup
    exposition_bytes: int
    series: int
    peak_rss_before_mib: float  # ru_maxrss once the fleet is up, before any scrape
    peak_rss_after_mib: float  # ru_maxrss after the scrapes; process-wide, so it never goes down


@dataclass(frozen=True)
class DaemonResult:
    """A real `cgctl exporter --all` process scraped over HTTP every interval_s."""

    argv: list[str]
    cgroups: int
    interval_s: float
    scrapes: int
    wall_s: float
    cpu_s: float  # utime + stime over wall_s, idle time between scrapes included
    core_fraction: float
    cpu_ms_per_scrape: float
    scrape_median_ms: float  # HTTP round trip
    start_s: float  # from exec until the first scrape was served
    rss_mib: float  # VmRSS after the scrapes
    peak_rss_mib: float  # VmHWM
    exposition_bytes: int


def check_write(path: Path, value: str) -> None:
    """Write value to a cgroup file; a failure raises naming the file."""
    fs.Cgroup(path.parent).write(path.name, value)


def raise_fd_limit(needed: int) -> None:
    """Each claim holds its record's fd open: make room for N of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY:
            hard = max(hard, needed)  # root may raise it
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def start_sleeper(group: Path, sleep: str, own_network: bool) -> subprocess.Popen[bytes]:
    """`sleep 3600` that joins its cgroup before it execs (with own_network, through `unshare --net`,
    which execs it in a new net namespace: the same pid); a failed join raises from Popen."""
    procs = str(group / "cgroup.procs")

    def join() -> None:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    return subprocess.Popen(
        ["unshare", "--net", sleep, "3600"] if own_network else [sleep, "3600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=join,
    )


def cgroup_name(group: Path) -> str:
    """The cgroup as /proc/PID/cgroup (and the exporter's `cgroup` label) names it."""
    return "/" + str(group.relative_to(CGROUP_MOUNT))


def fake_id(kind: str, index: int) -> str:
    """A runtime's 64-hex container id, the same at each run."""
    return hashlib.sha256(f"{kind}-{index}".encode()).hexdigest()


def hostwide_layout(count: int) -> tuple[list[str], list[str], dict[str, dict[str, str]]]:
    """(intermediate cgroups, leaf cgroups, expected labels) below BENCH_SLICE, parents first: a
    third of the count's leaves each systemd services, pods' containers and podman containers.
    The expected labels are by cgroup name, for the first cgroup of each kind."""
    kube = libpod = count // 3
    services = count - kube - libpod
    burstable = "kubepods.slice/kubepods-burstable.slice"
    parents = ["system.slice", "kubepods.slice", burstable, "machine.slice"]
    leaves = [f"system.slice/svc{index:04d}.service" for index in range(services)]
    prefix = cgroup_name(BENCH_SLICE)
    expected = {prefix: {"unit": BENCH_SLICE.name, "slice": "-.slice"}}
    if services:
        expected[f"{prefix}/{leaves[0]}"] = {"unit": "svc0000.service", "slice": "system.slice"}
    for index in range(kube):
        pod_uid = str(uuid.UUID(fake_id("pod", index // CONTAINERS_PER_POD)[:32]))
        pod = f"kubepods-burstable-pod{pod_uid.replace('-', '_')}.slice"
        if index % CONTAINERS_PER_POD == 0:
            parents.append(f"{burstable}/{pod}")
        container_id = fake_id("cri-containerd", index)
        scope = f"cri-containerd-{container_id}.scope"
        leaves.append(f"{burstable}/{pod}/{scope}")
        if index == 0:
            pod_labels = {"pod_uid": pod_uid, "qos": "burstable"}
            expected[f"{prefix}/{burstable}/{pod}"] = pod_labels
            expected[f"{prefix}/{leaves[-1]}"] = pod_labels | {
                "runtime": "containerd",
                "id": container_id[:12],
            }
    for index in range(libpod):
        container_id = fake_id("libpod", index)
        scope = f"libpod-{container_id}.scope"
        leaves.append(f"machine.slice/{scope}")
        if index == 0:
            expected[f"{prefix}/{leaves[-1]}"] = {"runtime": "podman", "id": container_id[:12]}
    return parents, leaves, expected


def start_fleet(fleet: Fleet, count: int) -> None:
    """Fill fleet with its cgroups, count sleepers and (containers mode) claims; on error, what exists
    is in fleet for cleanup."""
    sleep = shutil.which("sleep")
    if sleep is None:
        raise RuntimeError("no sleep binary on PATH (coreutils)")
    fs.enable_controllers(fs.Cgroup(CGROUP_MOUNT), CONTROLLERS)
    BENCH_SLICE.mkdir()
    fs.enable_controllers(fs.Cgroup(BENCH_SLICE), CONTROLLERS)
    parents: list[str] = []
    if fleet.mode == "containers":
        leaves = [f"c{index:05d}" for index in range(count)]
    else:
        parents, leaves, fleet.expected_labels = hostwide_layout(count)
    for relative in parents:
        group = BENCH_SLICE / relative
        group.mkdir()
        fleet.groups.append(group)
        fs.enable_controllers(fs.Cgroup(group), CONTROLLERS)
    started = time.perf_counter()
    for index, relative in enumerate(leaves):
        group = BENCH_SLICE / relative
        group.mkdir()
        fleet.groups.append(group)
        fleet.leaves.append(group)
        own_network = fleet.mode == "containers" or not relative.startswith("system.slice/")
        sleeper = start_sleeper(group, sleep, own_network)
        fleet.sleepers.append(sleeper)
        if own_network:
            fleet.networked.append(sleeper.pid)
        if (procs := (group / "cgroup.procs").read_text().split()) != [str(sleeper.pid)]:
            raise RuntimeError(f"{group}/cgroup.procs holds {procs}, expected the sleeper {sleeper.pid}")
        if fleet.mode == "containers":
            record = {
                "id": uuid.uuid4().hex,
                "cgroup": str(group),
                "started_at": time.time(),
                "spec": {"labels": {}},
            }
            fleet.claims.append(state.claim(fleet.state_dir, f"bench-{index:05d}", record))
        if (index + 1) % PROGRESS_EVERY == 0 or index + 1 == count:
            elapsed = time.perf_counter() - started
            print(
                f"  {index + 1}/{count} sleepers up, {len(fleet.groups) + 1} cgroups ({elapsed:.1f} s)",
                file=sys.stderr,
                flush=True,
            )


def stop_fleet(fleet: Fleet) -> None:
    """Kill the sleepers (cgroup.kill), reap them, remove the cgroups (children first) and the slice,
    release the claims."""
    problems = []
    for group in fleet.leaves:
        try:
            check_write(group / "cgroup.kill", "1")
        except fs.CgroupError as error:
            problems.append(str(error))
    for sleeper in fleet.sleepers:
        try:
            status = sleeper.wait(timeout=SLEEPER_TIMEOUT)
        except subprocess.TimeoutExpired:
            sleeper.kill()
            status = sleeper.wait(timeout=SLEEPER_TIMEOUT)
        if status != -signal.SIGKILL:
            problems.append(f"sleeper {sleeper.pid} ended with status {status}, not killed by SIGKILL")
    for group in reversed(fleet.groups):
        try:
            fs.remove(fs.Cgroup(group))
        except fs.CgroupError as error:
            problems.append(str(error))
    if BENCH_SLICE.exists():
        try:
            BENCH_SLICE.rmdir()
        except OSError as error:
            problems.append(f"{BENCH_SLICE}: cannot remove: {error.strerror}")
    for held in fleet.claims:
        held.release()
    if leftovers := sorted(path.name for path in fleet.state_dir.iterdir()):
        problems.append(f"{fleet.state_dir} still holds {leftovers[:5]}...")
    fleet.state_dir.rmdir()
    if problems:
        raise RuntimeError("cleanup failed: " + "; ".join(problems[:10]))


@contextmanager
def running_fleet(mode: Mode, count: int) -> Iterator[Fleet]:
    fleet = Fleet(mode, Path(tempfile.mkdtemp(prefix="bench-scrape-", dir=STATE_PARENT)))
    try:
        start_fleet(fleet, count)
        yield fleet
    finally:
        stop_fleet(fleet)


def present_files(group: Path) -> list[str]:
    """The snapshot's files this kernel has, in the order the exporter reads them."""
    return [name for name in SNAPSHOT_FILES if (group / name).exists()]


def read_plain(path: str) -> None:
    """Floor (a)'s read: open by full path, read to EOF."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.read(fd, READ_CHUNK):
            pass
    finally:
        os.close(fd)


def read_at(name: str, directory: int) -> None:
    """Floor (b)'s read: open relative to the directory's descriptor, one read (the files are small)."""
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=directory)
    try:
        os.read(fd, READ_CHUNK)
    finally:
        os.close(fd)


def make_floors(fleet: Fleet) -> tuple[Callable[[], None], Callable[[], None]]:
    """(floor a, floor b): the least a scrape must do, reading every file it reads, raw."""
    state_dir = str(fleet.state_dir)
    names = present_files(fleet.leaves[0])
    networks = [f"/proc/{pid}/net/dev" for pid in fleet.networked]  # not in a cgroup: by full path

    def read_networks() -> None:
        for path in networks:
            read_plain(path)

    if fleet.mode == "containers":
        groups = [str(group) for group in fleet.leaves]
        paths = [f"{group}/{name}" for group in groups for name in names]

        def plain() -> None:
            for entry in os.listdir(state_dir):
                read_plain(os.path.join(state_dir, entry))
            for path in paths:
                read_plain(path)
            read_networks()

        def tight() -> None:
            records = os.open(state_dir, DIRECTORY_FLAGS)
            try:
                for entry in os.listdir(records):
                    read_at(entry, records)
            finally:
                os.close(records)
            for group in groups:
                directory = os.open(group, DIRECTORY_FLAGS)
                try:
                    for name in names:
                        read_at(name, directory)
                finally:
                    os.close(directory)
            read_networks()

        return plain, tight

    root = str(BENCH_SLICE)

    def walk_plain() -> None:
        os.listdir(state_dir)  # empty: the exporter finds none of its own containers
        for group, _, _ in os.walk(root):
            for name in names:
                read_plain(f"{group}/{name}")
        read_networks()

    def walk_tight() -> None:
        os.listdir(state_dir)
        pending = [root]
        while pending:
            group = pending.pop()
            directory = os.open(group, DIRECTORY_FLAGS)
            try:
                for name in names:
                    read_at(name, directory)
                with os.scandir(directory) as entries:
                    pending.extend(
                        f"{group}/{entry.name}" for entry in entries if entry.is_dir(follow_symlinks=False)
                    )
            finally:
                os.close(directory)
        read_networks()

    return walk_plain, walk_tight


def make_collector(fleet: Fleet) -> ContainerCollector:
    """What `cgctl exporter` (hostwide: `cgctl exporter --all --cgroup-root bench-scrape.slice`) renders."""
    if fleet.mode == "containers":
        return ContainerCollector(state_dir=fleet.state_dir)
    return ContainerCollector(
        state_dir=fleet.state_dir, unified=CGROUP_MOUNT, selection=Selection(root=BENCH_SLICE)
    )


def sample_value(lines: list[str], name: str) -> float | None:
    """The value of an unlabelled sample, None if absent."""
    prefix = name + " "
    return next((float(line.split()[-1]) for line in lines if line.startswith(prefix)), None)


def series_labels(lines: list[str], metric: str) -> dict[str, dict[str, str]]:
    """The labels of each of metric's series, by their `cgroup` label."""
    head = metric + "{"
    found = {}
    for line in lines:
        if line.startswith(head):
            labels = dict(_LABEL.findall(line[len(head) : line.rindex("}")]))
            found[labels.get("cgroup", "")] = labels
    return found


def check_exposition(exposition: bytes, fleet: Fleet, collector: ContainerCollector | None) -> int:
    """The scrape must have accounted every cgroup (and container) without errors, and hostwide named
    them right; returns the number of series."""
    lines = exposition.decode().splitlines()
    own = len(fleet.leaves) if fleet.mode == "containers" else 0
    if (seen := sample_value(lines, "cgctl_exporter_containers")) != own:
        raise RuntimeError(f"the scrape saw {seen} running containers, expected {own}")
    if (accounted := sample_value(lines, "cgctl_exporter_cgroups")) != fleet.cgroups():
        raise RuntimeError(f"the scrape accounted {accounted} cgroups, expected {fleet.cgroups()}")
    errors = [line for line in lines if line.startswith("cgctl_exporter_part_errors_total{")]
    if not errors or any(float(line.split()[-1]) != 0 for line in errors):
        raise RuntimeError(f"the exposition counts errors: {errors}")
    if collector is not None and any(collector.errors.values()):
        raise RuntimeError(f"the collector counted errors: {collector.errors}")
    if fleet.mode == "hostwide":
        check_labels(lines, fleet)
    return sum(1 for line in lines if line and not line.startswith("#"))


def check_labels(lines: list[str], fleet: Fleet) -> None:
    """Every cgroup of the tree has a CPU series, and the sampled ones carry what their path says."""
    found = series_labels(lines, CPU_METRIC)
    tree = {cgroup_name(BENCH_SLICE), *(cgroup_name(group) for group in fleet.groups)}
    if set(found) != tree:
        raise RuntimeError(
            f"{CPU_METRIC} has series for cgroups not in the tree: {sorted(set(found) - tree)[:3]}, "
            f"and none for: {sorted(tree - set(found))[:3]}"
        )
    for cgroup, expected in fleet.expected_labels.items():
        wrong = {
            key: found[cgroup].get(key) for key, value in expected.items() if found[cgroup].get(key) != value
        }
        if wrong:
            raise RuntimeError(f"{cgroup}: labels {wrong}, expected {expected} (all: {found[cgroup]})")


def timed(action: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def profile_render(collector: ContainerCollector, fleet: Fleet) -> None:
    """cProfile's top functions of one render, by own time, on stderr."""
    profiler = cProfile.Profile()
    profiler.runcall(collector.render)
    print(
        f"--- cProfile of one render, {fleet.mode}, {fleet.cgroups()} cgroups, top {PROFILE_TOP} by tottime",
        file=sys.stderr,
    )
    pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(PROFILE_TOP)
    sys.stderr.flush()


def measure(
    mode: Mode, count: int, scrapes: int, daemon_seconds: float, profile: bool
) -> tuple[Result, DaemonResult | str | None]:
    """The scrape against both floors; with daemon_seconds, then a real exporter over the same tree
    (its result, or why it was not measured)."""
    daemon: DaemonResult | str | None = None
    with running_fleet(mode, count) as fleet:
        floor_plain, floor_tight = make_floors(fleet)
        collector = make_collector(fleet)

        def scrape() -> bytes:
            return collector.render().encode()

        series = check_exposition(scrape(), fleet, collector)
        actions = [("scrape", scrape), ("plain", floor_plain), ("tight", floor_tight)]
        for _ in range(WARMUP_ROUNDS):
            for _, action in actions:
                action()
        rss_before = peak_rss_mib()
        walls: dict[str, list[float]] = {name: [] for name, _ in actions}
        cpus: dict[str, list[float]] = {name: [] for name, _ in actions}
        for round_number in range(scrapes):
            shift = round_number % len(actions)  # each takes each place in turn
            for name, action in actions[shift:] + actions[:shift]:
                wall, cpu = timed(action)
                walls[name].append(wall)
                cpus[name].append(cpu)
        rss_after = peak_rss_mib()
        exposition = scrape()
        check_exposition(exposition, fleet, collector)
        if profile:
            profile_render(collector, fleet)
        if daemon_seconds > 0:
            daemon = measure_daemon(fleet, daemon_seconds)
        present = present_files(fleet.leaves[0])
        cgroups = fleet.cgroups()
    medians = {name: statistics.median(walls[name]) * 1e3 for name in walls}
    cpu_ms = {name: statistics.median(cpus[name]) * 1e3 for name in cpus}
    result = Result(
        mode=mode,
        leaves=count,
        cgroups=cgroups,
        scrapes=scrapes,
        scrape_median_ms=medians["scrape"],
        scrape_p90_ms=p90(walls["scrape"]) * 1e3,
        scrape_cpu_ms=cpu_ms["scrape"],
        floor_plain_median_ms=medians["plain"],
        floor_plain_p90_ms=p90(walls["plain"]) * 1e3,
        floor_plain_cpu_ms=cpu_ms["plain"],
        floor_tight_median_ms=medians["tight"],
        floor_tight_p90_ms=p90(walls["tight"]) * 1e3,
        floor_tight_cpu_ms=cpu_ms["tight"],
        ratio_to_plain_floor=medians["scrape"] / medians["plain"],
        ratio_to_tight_floor=medians["scrape"] / medians["tight"],
        core_fraction_at_15s=cpu_ms["scrape"] / 1e3 / SCRAPE_INTERVAL,
        files_per_cgroup=len(present),
        files_missing=[name for name in SNAPSHOT_FILES if name not in present],
        exposition_bytes=len(exposition),
        series=series,
        peak_rss_before_mib=rss_before,
        peak_rss_after_mib=rss_after,
    )
    return result, daemon


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of the process, all its threads (ended ones included), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # fields 14 and 15


def process_memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of the process."""
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    return tuple(int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
        if response.status != 200:
            raise RuntimeError(f"{url}: HTTP {response.status}")
        body: bytes = response.read()
        return body


def wait_listening(process: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    """True once something accepts on the port, False if the process exited first; bounded."""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return True
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the exporter did not listen on port {port} within {DAEMON_START_TIMEOUT:.0f} s")


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the exporter shuts its server down), SIGKILL if it takes longer than the bound."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=DAEMON_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=DAEMON_STOP_TIMEOUT)


def measure_daemon(fleet: Fleet, seconds: float) -> DaemonResult | str:
    """Run `cgctl exporter --all` restricted to the bench slice, scrape it every SCRAPE_INTERVAL for
    about `seconds`, and take its CPU time and RSS from /proc; a string says why it could not run."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "cgctl",
        "exporter",
        "--all",
        "--cgroup-root",
        str(BENCH_SLICE),
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(fleet.state_dir),
    ]
    url = f"http://127.0.0.1:{port}/metrics"
    print(f"  daemon: {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    with tempfile.TemporaryFile() as log:
        started = time.monotonic()
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            if not wait_listening(process, port, started + DAEMON_START_TIMEOUT):
                log.seek(0)
                said = log.read().decode(errors="replace").strip()
                if "no such option" in said.lower():
                    return f"`cgctl exporter` has no --all or --cgroup-root here ({said.splitlines()[-1]})"
                raise RuntimeError(f"the exporter exited with status {process.returncode}: {said[-2000:]}")
            check_exposition(get(url), fleet, None)  # the first scrape renders every label
            start_s = time.monotonic() - started
            rounds = max(1, round(seconds / SCRAPE_INTERVAL))
            walls = []
            body = b""
            cpu_before, wall_before = process_cpu_seconds(process.pid), time.monotonic()
            for index in range(rounds):
                time.sleep(max(0.0, wall_before + index * SCRAPE_INTERVAL - time.monotonic()))
                wall = time.perf_counter()
                body = get(url)
                walls.append(time.perf_counter() - wall)
            time.sleep(max(0.0, wall_before + rounds * SCRAPE_INTERVAL - time.monotonic()))
            cpu_s = process_cpu_seconds(process.pid) - cpu_before
            wall_s = time.monotonic() - wall_before
            rss, peak = process_memory_mib(process.pid)
            check_exposition(body, fleet, None)
            if process.poll() is not None:
                raise RuntimeError(f"the exporter exited with status {process.returncode} while scraped")
        finally:
            stop_process(process)
    return DaemonResult(
        argv=[".venv/bin/python", *argv[1:]],
        cgroups=fleet.cgroups(),
        interval_s=SCRAPE_INTERVAL,
        scrapes=rounds,
        wall_s=wall_s,
        cpu_s=cpu_s,
        core_fraction=cpu_s / wall_s,
        cpu_ms_per_scrape=cpu_s / rounds * 1e3,
        scrape_median_ms=statistics.median(walls) * 1e3,
        start_s=start_s,
        rss_mib=rss,
        peak_rss_mib=peak,
        exposition_bytes=len(body),
    )


def cgroup_tree() -> set[str]:
    return {os.path.relpath(directory, CGROUP_MOUNT) for directory, _, _ in os.walk(CGROUP_MOUNT)}


def measure_and_check_tree(
    mode: Mode, count: int, scrapes: int, daemon_seconds: float, profile: bool
) -> tuple[Result, DaemonResult | str | None]:
    """measure(), then the cgroup tree must be exactly as it was before."""
    baseline = cgroup_tree()
    measured = measure(mode, count, scrapes, daemon_seconds, profile)
    if (tree := cgroup_tree()) != baseline:
        raise RuntimeError(
            f"{mode} N={count} left the cgroup tree changed: added {sorted(tree - baseline)[:5]}, "
            f"removed {sorted(baseline - tree)[:5]}"
        )
    return measured


def report(results: list[Result], daemon: DaemonResult | str | None, scrapes: int) -> None:
    kernel = platform.release()
    client = version("prometheus-client")
    print(
        f"one scrape (ContainerCollector.render, native metrics) vs reading the same files raw; "
        f"kernel {kernel}, Python {platform.python_version()}, prometheus_client {client}"
    )
    print(
        f"{scrapes} rounds each after {WARMUP_ROUNDS} warm-ups, scrape and both floors interleaved; "
        f"goal <= {GOAL_RATIO:g}x floor (a)"
    )
    print(
        "floor (a): each file opened by its full path, read to EOF; floor (b): each cgroup's directory "
        "opened once, each file openat'd and read once (as the exporter does)"
    )
    header = (
        f"{'mode':<11}{'N':>5}{'cgroups':>8}{'scrape ms':>10}{'p90':>8}{'cpu ms':>8}"
        f"{'(a) ms':>8}{'x (a)':>7}{'(b) ms':>8}{'x (b)':>7}{'files':>6}{'bytes':>9}{'series':>7}"
        f"{'rss MiB':>8}{'core@15s':>9}"
    )
    print(header)
    for r in results:
        print(
            f"{r.mode:<11}{r.leaves:>5}{r.cgroups:>8}{r.scrape_median_ms:>10.1f}{r.scrape_p90_ms:>8.1f}"
            f"{r.scrape_cpu_ms:>8.1f}{r.floor_plain_median_ms:>8.1f}{r.ratio_to_plain_floor:>7.2f}"
            f"{r.floor_tight_median_ms:>8.1f}{r.ratio_to_tight_floor:>7.2f}{r.files_per_cgroup:>6}"
            f"{r.exposition_bytes:>9}{r.series:>7}{r.peak_rss_after_mib:>8.1f}"
            f"{r.core_fraction_at_15s:>9.2%}"
        )
    print(
        "N: cgroups with a sleeper; cgroups: accounted per scrape (hostwide: the slices and pods above "
        "too); files: cgroup files read per cgroup; bytes/series: one exposition; rss MiB: peak RSS of "
        "this process after the scrapes (ru_maxrss, process-wide); core@15s: cpu ms / 15 s"
    )
    if results and (missing := results[0].files_missing):
        print(
            f"this kernel lacks {', '.join(missing)}; the exporter still tries to open each in every cgroup"
        )
    for r in results:
        verdict = "within" if r.ratio_to_plain_floor <= GOAL_RATIO else "ABOVE"
        print(
            f"{r.mode} N={r.leaves} ({r.cgroups} cgroups): scrape {r.ratio_to_plain_floor:.2f}x floor (a), "
            f"{verdict} the {GOAL_RATIO:g}x goal; {r.ratio_to_tight_floor:.2f}x floor (b); "
            f"{r.scrape_median_ms / r.cgroups * 1e3:.0f} us per cgroup; scraped every "
            f"{SCRAPE_INTERVAL:g} s: {r.core_fraction_at_15s:.2%} of a core "
            f"({r.core_fraction_at_15s / r.cgroups * 1000:.2%} per 1,000 cgroups); peak RSS "
            f"{r.peak_rss_before_mib:.1f} MiB before the scrapes, {r.peak_rss_after_mib:.1f} after"
        )
    if isinstance(daemon, DaemonResult):
        print(
            f"daemon `{' '.join(daemon.argv[1:])}` over {daemon.cgroups} cgroups, scraped over HTTP every "
            f"{daemon.interval_s:g} s ({daemon.scrapes} scrapes, {daemon.wall_s:.1f} s): "
            f"{daemon.cpu_s:.2f} s CPU = {daemon.core_fraction:.2%} of a core "
            f"({daemon.cpu_ms_per_scrape:.0f} ms per scrape, idle included); scrape round trip "
            f"{daemon.scrape_median_ms:.0f} ms median; RSS {daemon.rss_mib:.1f} MiB "
            f"(peak {daemon.peak_rss_mib:.1f}); first scrape served {daemon.start_s:.1f} s after exec"
        )
    elif daemon is not None:
        print(f"daemon: not measured: {daemon}")
    summary = {
        "kernel": kernel,
        "python": platform.python_version(),
        "prometheus_client": client,
        "scrapes": scrapes,
        "warmup_rounds": WARMUP_ROUNDS,
        "goal_ratio": GOAL_RATIO,
        "scrape_interval_s": SCRAPE_INTERVAL,
        "results": [asdict(result) for result in results],
        "daemon": asdict(daemon) if isinstance(daemon, DaemonResult) else daemon,
    }
    print("BENCH_JSON " + json.dumps(summary))


def counts(text: str) -> list[int]:
    try:
        return [positive_int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of counts") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--counts",
        type=counts,
        default=[100, 1000],
        help="leaf cgroups with a sleeper (containers mode: cgctl's containers), comma-separated "
        "(default 100,1000)",
    )
    parser.add_argument(
        "--scrapes", type=positive_int, default=20, help="timed rounds per count (default 20)"
    )
    parser.add_argument(
        "--mode",
        choices=(*MODES, "both"),
        default="both",
        help="cgctl's containers, host-wide accounting of a mixed tree, or both (default)",
    )
    parser.add_argument(
        "--daemon-seconds",
        type=float,
        default=DAEMON_SECONDS,
        help=f"scrape a real `cgctl exporter --all` every {SCRAPE_INTERVAL:g} s for this long, at the "
        f"largest count in hostwide mode; 0 skips it (default {DAEMON_SECONDS:g})",
    )
    parser.add_argument(
        "--profile", action="store_true", help="print cProfile's top functions of one render to stderr"
    )
    args = parser.parse_args()
    require_cgroup2_root(
        "flock /tmp/cgctl-vm.lock .venv/bin/python tests/vm/microvm.py --memory 4G --timeout 1800 -- "
        ".venv/bin/python bench/scrape.py"
    )
    raise_fd_limit(max(args.counts) + 256)
    modes = MODES if args.mode == "both" else (args.mode,)
    results = []
    daemon: DaemonResult | str | None = None
    for mode in modes:
        for count in args.counts:
            print(
                f"{mode} N={count}: starting {count} sleepers in their cgroups", file=sys.stderr, flush=True
            )
            wants_daemon = mode == "hostwide" and count == max(args.counts)
            result, measured = measure_and_check_tree(
                mode, count, args.scrapes, args.daemon_seconds if wants_daemon else 0.0, args.profile
            )
            results.append(result)
            daemon = measured if wants_daemon else daemon
    report(results, daemon, args.scrapes)


if __name__ == "__main__":
    main()
