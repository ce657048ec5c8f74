"""How long does one Prometheus scrape of N running containers take, against just reading their files?

Why: the exporter reads every container's cgroup files at scrape time (nothing is cached), so a
scrape can never cost less than reading those files. This times a full scrape
(ContainerCollector.render(), native metrics: what `cgctl exporter` serves) next to that floor: the same
cgroup files read raw in one loop, plus listing the state directory and reading each run record,
with no parsing. The goal is a scrape of at most 2x the floor; above it, the exporter's own Python
work (parsing, metric objects, text exposition) dominates what the kernel has to do. The two take
turns round by round, so a change in the machine's load weighs on both alike. It also reports the
exporter's CPU time per scrape, the process's peak RSS and the size of one exposition.

How: for each N it creates N cgroups under /sys/fs/cgroup/bench-scrape.slice, each holding one
`sleep` (moved in before it execs), and claims one run record per cgroup in a temporary state
directory under /run (this process holds the flocks, so the exporter sees them as live). It
writes to /sys/fs/cgroup, so it needs root and a pure cgroup v2 hierarchy; on this project's
development machines (cgroup v1) that means the micro-VM, with memory for 1000 sleepers:

    .venv/bin/python tests/vm/microvm.py --memory 4G -- .venv/bin/python bench/scrape.py \
        [--counts 100,1000] [--scrapes N]

Every cgroup and sleeper is killed and removed and every record released after each N, and the
cgroup tree must then be as it was before; anything else, a failing write, or a scrape that does
not see exactly N containers aborts the benchmark. The last line is `BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

from cgroup2_host import CGROUP_MOUNT, require_cgroup2_root

from cgctl import accounting, state
from cgctl.cgroup import fs
from cgctl.metrics import ContainerCollector

BENCH_SLICE = CGROUP_MOUNT / "bench-scrape.slice"
CONTROLLERS = ("cpu", "io", "memory", "pids")
# Every file accounting.read_snapshot reads, in its order; the ones this kernel lacks are dropped.
SNAPSHOT_FILES = (*(name for name, _ in accounting.READERS), "io.stat")
STATE_PARENT = Path("/run")  # a tmpfs, like cgctl's own /run/cgctl/runs
GOAL_RATIO = 2.0
WARMUP_ROUNDS = 2
PROGRESS_EVERY = 100
READ_CHUNK = 1 << 16


@dataclass
class Fleet:
    """N cgroups, each with one sleeper and one live run record."""

    state_dir: Path
    groups: list[Path] = field(default_factory=list)
    sleepers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    claims: list[state.Claim] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    containers: int
    scrapes: int
    scrape_median_ms: float
    scrape_p90_ms: float
    scrape_cpu_ms: float  # median CPU time (user + system) of this process per scrape
    floor_median_ms: float
    floor_p90_ms: float
    floor_cpu_ms: float
    ratio_to_floor: float
    files_per_container: int
    exposition_bytes: int
    series: int
    peak_rss_before_mib: float  # ru_maxrss once the fleet is up, before any scrape
    peak_rss_after_mib: float  # ru_maxrss after the scrapes; process-wide, so it never goes down


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


def start_sleeper(group: Path, sleep: str) -> subprocess.Popen[bytes]:
    """`sleep 3600` that joins its cgroup before it execs; a failed join raises from Popen."""
    procs = str(group / "cgroup.procs")

    def join() -> None:
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)

    return subprocess.Popen(
        [sleep, "3600"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=join,
    )


def start_fleet(fleet: Fleet, count: int) -> None:
    """Fill fleet with count cgroups, sleepers and claims; on error, what exists is in fleet for cleanup."""
    sleep = shutil.which("sleep")
    if sleep is None:
        raise RuntimeError("no sleep binary on PATH (coreutils)")
    fs.enable_controllers(fs.Cgroup(CGROUP_MOUNT), CONTROLLERS)
    BENCH_SLICE.mkdir()
    fs.enable_controllers(fs.Cgroup(BENCH_SLICE), CONTROLLERS)
    started = time.perf_counter()
    for index in range(count):
        group = BENCH_SLICE / f"c{index:05d}"
        group.mkdir()
        fleet.groups.append(group)
        sleeper = start_sleeper(group, sleep)
        fleet.sleepers.append(sleeper)
        if (procs := (group / "cgroup.procs").read_text().split()) != [str(sleeper.pid)]:
            raise RuntimeError(f"{group}/cgroup.procs holds {procs}, expected the sleeper {sleeper.pid}")
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
                f"  {index + 1}/{count} sleepers and records up ({elapsed:.1f} s)",
                file=sys.stderr,
                flush=True,
            )


def stop_fleet(fleet: Fleet) -> None:
    """Kill the sleepers (cgroup.kill), reap them, remove the cgroups and the slice, release the claims."""
    problems = []
    for group in fleet.groups:
        try:
            check_write(group / "cgroup.kill", "1")
        except fs.CgroupError as error:
            problems.append(str(error))
    for sleeper in fleet.sleepers:
        try:
            status = sleeper.wait(timeout=30)
        except subprocess.TimeoutExpired:
            sleeper.kill()
            status = sleeper.wait()
        if status != -signal.SIGKILL:
            problems.append(f"sleeper {sleeper.pid} ended with status {status}, not killed by SIGKILL")
    for group in fleet.groups:
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
def running_fleet(count: int) -> Iterator[Fleet]:
    fleet = Fleet(Path(tempfile.mkdtemp(prefix="bench-scrape-", dir=STATE_PARENT)))
    try:
        start_fleet(fleet, count)
        yield fleet
    finally:
        stop_fleet(fleet)


def snapshot_files(fleet: Fleet) -> list[str]:
    """Every cgroup file the exporter reads, as paths, for all containers (those this kernel has)."""
    present = [name for name in SNAPSHOT_FILES if (fleet.groups[0] / name).exists()]
    return [str(group / name) for group in fleet.groups for name in present]


def make_floor(fleet: Fleet) -> Callable[[], None]:
    """The least a scrape must do: list the state dir, read each record and every cgroup file, raw."""
    state_dir = str(fleet.state_dir)
    cgroup_files = snapshot_files(fleet)

    def read_raw(path: str) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while os.read(fd, READ_CHUNK):
                pass
        finally:
            os.close(fd)

    def floor() -> None:
        for entry in os.listdir(state_dir):
            read_raw(os.path.join(state_dir, entry))
        for path in cgroup_files:
            read_raw(path)

    return floor


def make_scrape(fleet: Fleet) -> tuple[Callable[[], bytes], ContainerCollector]:
    """What `cgctl exporter` serves for its containers at each scrape: the collector's rendered text."""
    collector = ContainerCollector(state_dir=fleet.state_dir)
    return (lambda: collector.render().encode()), collector


def check_exposition(exposition: bytes, count: int, collector: ContainerCollector) -> int:
    """The scrape must have seen every container without errors; returns the number of series."""
    lines = exposition.decode().splitlines()
    seen = next(
        (float(line.split()[-1]) for line in lines if line.startswith("cgctl_exporter_containers ")), None
    )
    if seen != count:
        raise RuntimeError(f"the scrape saw {seen} running containers, expected {count}")
    if any(collector.errors.values()):
        raise RuntimeError(f"the collector counted errors: {collector.errors}")
    return sum(1 for line in lines if line and not line.startswith("#"))


def timed(action: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) for one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    action()
    return time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def p90(samples: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    return sorted(samples)[math.ceil(0.9 * len(samples)) - 1]


def measure(count: int, scrapes: int) -> Result:
    with running_fleet(count) as fleet:
        floor = make_floor(fleet)
        scrape, collector = make_scrape(fleet)
        series = check_exposition(scrape(), count, collector)
        for _ in range(WARMUP_ROUNDS):
            scrape()
            floor()
        rss_before = peak_rss_mib()
        walls: dict[str, list[float]] = {"scrape": [], "floor": []}
        cpus: dict[str, list[float]] = {"scrape": [], "floor": []}
        for round_number in range(scrapes):
            pair = [("scrape", scrape), ("floor", floor)]
            for name, action in pair if round_number % 2 == 0 else reversed(pair):
                wall, cpu = timed(action)
                walls[name].append(wall)
                cpus[name].append(cpu)
        rss_after = peak_rss_mib()
        exposition = scrape()
        check_exposition(exposition, count, collector)
        files = len(snapshot_files(fleet)) // count
    scrape_ms, floor_ms = (statistics.median(walls[name]) * 1e3 for name in ("scrape", "floor"))
    return Result(
        containers=count,
        scrapes=scrapes,
        scrape_median_ms=scrape_ms,
        scrape_p90_ms=p90(walls["scrape"]) * 1e3,
        scrape_cpu_ms=statistics.median(cpus["scrape"]) * 1e3,
        floor_median_ms=floor_ms,
        floor_p90_ms=p90(walls["floor"]) * 1e3,
        floor_cpu_ms=statistics.median(cpus["floor"]) * 1e3,
        ratio_to_floor=scrape_ms / floor_ms,
        files_per_container=files,
        exposition_bytes=len(exposition),
        series=series,
        peak_rss_before_mib=rss_before,
        peak_rss_after_mib=rss_after,
    )


def cgroup_tree() -> set[str]:
    return {os.path.relpath(directory, CGROUP_MOUNT) for directory, _, _ in os.walk(CGROUP_MOUNT)}


def measure_and_check_tree(count: int, scrapes: int) -> Result:
    """measure(), then the cgroup tree must be exactly as it was before."""
    baseline = cgroup_tree()
    result = measure(count, scrapes)
    if (tree := cgroup_tree()) != baseline:
        raise RuntimeError(
            f"N={count} left the cgroup tree changed: added {sorted(tree - baseline)[:5]}, "
            f"removed {sorted(baseline - tree)[:5]}"
        )
    return result


def report(results: list[Result], scrapes: int) -> None:
    kernel = platform.release()
    client = version("prometheus-client")
    print(
        f"one scrape (ContainerCollector.render, native metrics) vs reading the same files raw; "
        f"kernel {kernel}, Python {platform.python_version()}, prometheus_client {client}"
    )
    print(
        f"{scrapes} rounds each after {WARMUP_ROUNDS} warm-ups, scrape and floor interleaved; "
        f"goal <= {GOAL_RATIO:g}x"
    )
    header = (
        f"{'containers':>10}{'scrape ms':>11}{'p90':>9}{'cpu ms':>9}{'floor ms':>10}{'p90':>9}"
        f"{'cpu ms':>9}{'x floor':>9}{'files':>7}{'bytes':>10}{'series':>8}{'rss MiB':>9}"
    )
    print(header)
    for r in results:
        print(
            f"{r.containers:>10}{r.scrape_median_ms:>11.1f}{r.scrape_p90_ms:>9.1f}{r.scrape_cpu_ms:>9.1f}"
            f"{r.floor_median_ms:>10.1f}{r.floor_p90_ms:>9.1f}{r.floor_cpu_ms:>9.1f}{r.ratio_to_floor:>9.2f}"
            f"{r.files_per_container:>7}{r.exposition_bytes:>10}{r.series:>8}{r.peak_rss_after_mib:>9.1f}"
        )
    print(
        "files: cgroup files read per container (plus its record); bytes/series: one exposition; "
        "rss MiB: peak RSS of this process after the scrapes (ru_maxrss, process-wide)"
    )
    for r in results:
        verdict = "within" if r.ratio_to_floor <= GOAL_RATIO else "ABOVE"
        print(
            f"N={r.containers}: scrape {r.ratio_to_floor:.2f}x the floor, "
            f"{verdict} the {GOAL_RATIO:g}x goal; "
            f"{r.scrape_median_ms / r.containers * 1e3:.0f} us per container; peak RSS "
            f"{r.peak_rss_before_mib:.1f} MiB before the scrapes, {r.peak_rss_after_mib:.1f} after"
        )
    summary = {
        "kernel": kernel,
        "python": platform.python_version(),
        "prometheus_client": client,
        "scrapes": scrapes,
        "warmup_rounds": WARMUP_ROUNDS,
        "goal_ratio": GOAL_RATIO,
        "results": [asdict(result) for result in results],
    }
    print("BENCH_JSON " + json.dumps(summary))


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value


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
        help="running containers, comma-separated (default 100,1000)",
    )
    parser.add_argument(
        "--scrapes", type=positive_int, default=20, help="timed rounds per count (default 20)"
    )
    args = parser.parse_args()
    require_cgroup2_root(
        ".venv/bin/python tests/vm/microvm.py --memory 4G -- .venv/bin/python bench/scrape.py"
    )
    raise_fd_limit(max(args.counts) + 256)
    results = []
    for count in args.counts:
        print(f"N={count}: starting {count} sleepers in their cgroups", file=sys.stderr, flush=True)
        results.append(measure_and_check_tree(count, args.scrapes))
    report(results, args.scrapes)


if __name__ == "__main__":
    main()
