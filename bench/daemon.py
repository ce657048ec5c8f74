"""What the daemon costs: starting containers through its API, and its CPU and memory while they run.

Why: the daemon (cgctld) and its keeper are the long-lived part of cgctl, so they are judged on
what a user pays for them. Starting: each `api.create` of `sleep 1000` is timed from the request
until the daemon answers that the workload has exec'd (HTTP, validation, cgroup, limits, sandbox
plan, the keeper's fork and exec); it keeps running and is removed only after the timed loop.
Next to it, in the same rounds: the library's foreground run of `true` (`cgctl.runtime.run`: no
HTTP, no daemon, but its time includes the workload's end, final accounting and cgroup removal)
and `crun run -d` of `sleep 1000` (a new crun process; crun's default `crun spec` config: five
namespaces, no seccomp filter; `crun delete -f` after the loop). A burst of 20 creates from 20
threads shows how far the daemon serves concurrent starts. At rest: the CPU time of the daemon
and of the keeper over an idle window and their memory (VmRSS, Pss), with 0 containers as the
floor and with 100 running `sleep`s, so the growth per container can be set next to conmon's
(one process per container, ~1 MB each: quoted, not measured here). Last, `cgctl ps` with 100
containers against Python's own start-up, which every CLI call pays.

How: it writes to /sys/fs/cgroup, so it needs root and a pure cgroup v2 hierarchy; on this project's
development machines (cgroup v1) that means the micro-VM:

    .venv/bin/python tests/vm/microvm.py --memory 3G -- .venv/bin/python bench/daemon.py [--quick]

It starts its own daemon (socket, runtime and data directories in a temporary directory; its log,
the daemon's stderr, is printed if anything fails) and stops it and its keeper at the end. The
last line is `BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from cgroup2_host import require_cgroup2_root
from spawn import OCI_RUNTIMES, build_bundle, check

from cgctl import runtime
from cgctl.runtime.api import CreateRequest
from cgctl.runtime.interface import answers
from cgctl.runtime.remote import RemoteRuntime
from cgctl.spec import WorkloadSpec

HOW_TO_RUN = ".venv/bin/python tests/vm/microvm.py --memory 3G -- .venv/bin/python bench/daemon.py"
PYTHON = sys.executable
CGCTL_CLI = Path(PYTHON).parent / "cgctl"
CRUN = OCI_RUNTIMES["crun"]
WARMUP_ROUNDS = 2
BURST = 20
IDLE_CONTAINERS = 100
PS_RUNS = 5
CONMON_KIB = 1000  # "~1 MB per container": quoted (cgctl/daemon/keeper.py, podman's docs), not measured
DAEMON_START_TIMEOUT = 300.0  # seconds: Python under software emulation imports slowly
API_TIMEOUT = 120.0  # per API call
SUBPROCESS_TIMEOUT = 120.0
STOP_TIMEOUT = 60.0
SETTLE = 2.0  # seconds of quiet before a resting measurement
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class Daemon:
    """A daemon of our own in `directory`, its stderr (its log) in directory/daemon.log."""

    def __init__(self, directory: Path) -> None:
        self.socket = directory / "cgctl.sock"
        self.runtime_dir = directory / "run"
        self.data_dir = directory / "data"
        self.log = directory / "daemon.log"
        self.host = f"unix://{self.socket}"
        self.api = RemoteRuntime(self.host, timeout=API_TIMEOUT)
        self.process: subprocess.Popen[bytes] | None = None
        self.keeper = 0

    def start(self, *options: str) -> tuple[float, float]:
        """Start it; seconds until its socket accepts a connection, and until it answers a request.

        The socket listens before the daemon has started its keeper, so the keeper is looked for
        only once a request has been answered (the keeper's first process forks and exits by then)."""
        started = time.perf_counter()
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [PYTHON, "-m", "cgctl", "daemon", "--socket", str(self.socket), "--runtime-dir",
                 str(self.runtime_dir), "--data-dir", str(self.data_dir), *options],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while not answers(self.socket):
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited with status {self.process.returncode} on start")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon did not answer within {DAEMON_START_TIMEOUT:.0f} s")
            time.sleep(0.05)
        accepts = time.perf_counter() - started
        self.api.ping()
        serves = time.perf_counter() - started
        self.keeper = self.find_keeper()
        if not self.keeper:
            raise RuntimeError("the daemon answers but no keeper process was found")
        return accepts, serves

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def find_keeper(self) -> int:
        """The pid of this daemon's keeper (0 if none runs)."""
        socket = str(self.runtime_dir / "keeper.sock").encode()
        for proc in Path("/proc").iterdir():
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"cgctl.daemon.keeper" in argv and socket in argv:
                return int(proc.name)
        return 0

    def alive(self) -> None:
        """Raise if the daemon or its keeper is gone."""
        if self.process is None or self.process.poll() is not None:
            raise RuntimeError("the daemon died")
        if not Path(f"/proc/{self.keeper}").exists():
            raise RuntimeError(f"the keeper (pid {self.keeper}) died")

    def remove_all(self) -> None:
        for container in self.api.list(all=True):
            if container.detached:
                self.api.remove(container.name, force=True)

    def stop(self) -> list[str]:
        """SIGTERM the daemon, then the keeper, each waited for in bounded time; what went wrong."""
        problems = []
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problems.append(f"the daemon did not end within {STOP_TIMEOUT:.0f} s of SIGTERM: SIGKILLed")
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        if self.process is not None and self.process.returncode not in (0, None):
            problems.append(f"the daemon exited with status {self.process.returncode}")
        keeper = self.find_keeper()
        if keeper:
            os.kill(keeper, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while Path(f"/proc/{keeper}").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            if Path(f"/proc/{keeper}").exists():
                problems.append(f"the keeper did not end within {STOP_TIMEOUT:.0f} s of SIGTERM: SIGKILLed")
                os.kill(keeper, signal.SIGKILL)
        return problems


def sleeper(name: str, seconds: int) -> CreateRequest:
    return CreateRequest(spec=WorkloadSpec.model_validate({"name": name, "command": ["sleep", str(seconds)]}))


def create(api: RemoteRuntime, name: str, seconds: int) -> None:
    container = api.create(sleeper(name, seconds))
    if container.state != "running" or not container.pid:
        raise RuntimeError(f"create {name}: answered state {container.state!r}, pid {container.pid}")


class Crun:
    """`crun run -d` of `sleep 1000` in a busybox bundle, each container in a cgroup of its own."""

    def __init__(self, workdir: Path) -> None:
        self.bundle = workdir / "bundle"
        build_bundle(self.bundle, spec_tool="crun")
        (self.bundle / "rootfs" / "bin" / "sleep").symlink_to("busybox")
        self.config_file = self.bundle / "config.json"
        self.config = json.loads(self.config_file.read_text())
        self.config["process"]["args"] = ["/bin/sleep", "1000"]
        self.config["linux"]["resources"].pop("memory", None)  # as the cgctl workloads: no limit
        self.errors = workdir / "crun.err"
        self.started: list[str] = []

    def start(self, name: str) -> Callable[[], None]:
        """Write this container's config (untimed) and return the timed part: `crun run -d`."""
        self.config["linux"]["cgroupsPath"] = f"/bench-daemon-{name}"
        self.config_file.write_text(json.dumps(self.config))

        def run() -> None:
            # The detached container inherits crun's stdio: no pipes, or waiting on them would wait for it.
            with self.errors.open("wb") as errors:
                done = subprocess.run(
                    [*CRUN, "run", "-d", "--bundle", str(self.bundle), name],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors,
                    timeout=SUBPROCESS_TIMEOUT,
                )  # fmt: skip
            self.started.append(name)
            if done.returncode != 0:
                raise RuntimeError(f"crun run -d {name}: status {done.returncode}: {self.errors.read_text()}")

        return run

    def delete_all(self) -> None:
        while self.started:
            check([*CRUN, "delete", "-f", self.started.pop()])


def library_run() -> None:
    report = runtime.run(WorkloadSpec.model_validate({"command": ["true"]}))
    if report.exit_code != 0:
        raise RuntimeError(f"cgctl.runtime.run(true) did not exit 0: {report}")


def timed(action: Callable[[], None]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def percentile(samples: list[float], q: float) -> float:
    """Nearest rank: with fewer than 100 samples, p99 is the largest."""
    return sorted(samples)[math.ceil(q / 100 * len(samples)) - 1]


@dataclass(frozen=True)
class Latency:
    name: str
    p50_ms: float
    p99_ms: float
    per_second: float  # 1 / mean


def latency(name: str, samples: list[float]) -> Latency:
    return Latency(
        name, percentile(samples, 50) * 1e3, percentile(samples, 99) * 1e3, len(samples) / sum(samples)
    )


def sequential_starts(daemon: Daemon, crun: Crun, runs: int) -> list[Latency]:
    """The three peers, interleaved round by round; the API's and crun's containers run until the end."""
    timings: dict[str, list[float]] = {"API create": [], "library run": [], "crun run -d": []}
    try:
        for number in range(WARMUP_ROUNDS + runs):
            name = f"seq-{number}"
            rounds = {
                "API create": timed(functools.partial(create, daemon.api, name, 1000)),
                "library run": timed(library_run),
                "crun run -d": timed(crun.start(name)),
            }
            if number >= WARMUP_ROUNDS:
                for peer, seconds in rounds.items():
                    timings[peer].append(seconds)
    finally:
        try:
            daemon.remove_all()
        finally:
            crun.delete_all()
    return [latency(name, samples) for name, samples in timings.items()]


def burst(daemon: Daemon) -> float:
    """Seconds from releasing BURST threads at once until the last one's create has answered."""
    gate = threading.Barrier(BURST + 1, timeout=API_TIMEOUT)

    def one(number: int) -> None:
        gate.wait()
        create(daemon.api, f"burst-{number}", 1000)

    try:
        with ThreadPoolExecutor(BURST) as pool:
            futures = [pool.submit(one, number) for number in range(BURST)]
            gate.wait()
            started = time.perf_counter()
            for future in futures:
                future.result(timeout=API_TIMEOUT * 2)
            return time.perf_counter() - started
    finally:
        daemon.remove_all()


def cpu_ticks(pid: int) -> int:
    """utime + stime of all the process's threads, in clock ticks."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def kib(path: str, key: str) -> int:
    line = next(line for line in Path(path).read_text().splitlines() if line.startswith(f"{key}:"))
    return int(line.split()[1])


@dataclass(frozen=True)
class Rest:
    """The daemon's and the keeper's CPU (% of one CPU) over an idle window, and their memory in KiB."""

    containers: int
    daemon_cpu: float
    keeper_cpu: float
    daemon_rss: int
    keeper_rss: int
    daemon_pss: int
    keeper_pss: int


def at_rest(daemon: Daemon, containers: int, window: float) -> Rest:
    time.sleep(SETTLE)
    pids = (daemon.pid, daemon.keeper)
    before = [cpu_ticks(pid) for pid in pids]
    started = time.monotonic()
    time.sleep(window)
    after = [cpu_ticks(pid) for pid in pids]
    elapsed = time.monotonic() - started
    cpu = [(b - a) / CLOCK_TICKS / elapsed * 100 for a, b in zip(before, after, strict=True)]
    rss = [kib(f"/proc/{pid}/status", "VmRSS") for pid in pids]
    pss = [kib(f"/proc/{pid}/smaps_rollup", "Pss") for pid in pids]
    daemon.alive()
    return Rest(containers, cpu[0], cpu[1], rss[0], rss[1], pss[0], pss[1])


def start_idle_containers(daemon: Daemon) -> float:
    """Start IDLE_CONTAINERS `sleep 100000`s and check that all run; seconds taken."""
    started = time.perf_counter()
    for number in range(IDLE_CONTAINERS):
        create(daemon.api, f"idle-{number:03}", 100000)
    elapsed = time.perf_counter() - started
    running = sum(c.state == "running" for c in daemon.api.list())
    if running != IDLE_CONTAINERS:
        raise RuntimeError(f"{running} containers run, not {IDLE_CONTAINERS}")
    return elapsed


def wall(argv: list[str], expect_lines: int = 0) -> float:
    """Seconds for argv to run to completion (it must exit 0 and print at least expect_lines lines)."""
    started = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, timeout=SUBPROCESS_TIMEOUT)
    elapsed = time.perf_counter() - started
    if done.returncode != 0 or len(done.stdout.splitlines()) < expect_lines:
        raise RuntimeError(
            f"{argv}: status {done.returncode}, {len(done.stdout.splitlines())} lines (wanted "
            f">= {expect_lines}): {done.stderr.decode(errors='replace').strip()}"
        )
    return elapsed


def cli_startup(daemon: Daemon) -> dict[str, float]:
    """Median seconds of `cgctl ps` and of the interpreter's floors, interleaved after one warm-up each."""
    commands = {
        "python -S -c pass": ([PYTHON, "-S", "-c", "pass"], 0),
        "python -c pass": ([PYTHON, "-c", "pass"], 0),
        "cgctl ps": ([str(CGCTL_CLI), "--host", daemon.host, "ps"], IDLE_CONTAINERS + 1),
    }
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for number in range(1 + PS_RUNS):
        for name, (argv, lines) in commands.items():
            seconds = wall(argv, lines)
            if number:
                samples[name].append(seconds)
    return {name: statistics.median(values) for name, values in samples.items()}


def report_starts(sequential: list[Latency], runs: int, burst_s: float) -> None:
    print(f"1. starting a workload, {runs} rounds after {WARMUP_ROUNDS} warm-ups, peers interleaved")
    print("   API create   POST until the daemon answers that `sleep 1000` has exec'd (detached, left")
    print("                running; removed after the loop, untimed)")
    print("   library run  cgctl.runtime.run(true) in this process: start AND end, final accounting and")
    print("                cgroup removal included; no HTTP, no daemon")
    print("   crun run -d  a crun process starting `sleep 1000` detached (crun delete -f after, untimed)")
    crun = next(result for result in sequential if result.name == "crun run -d")
    print(f"   {'':<14}{'p50 ms':>9}{'p99 ms':>9}{'starts/s':>10}{'x crun':>8}")
    for result in sequential:
        print(
            f"   {result.name:<14}{result.p50_ms:>9.1f}{result.p99_ms:>9.1f}{result.per_second:>10.2f}"
            f"{result.p50_ms / crun.p50_ms:>8.2f}"
        )
    api, library = sequential[0], sequential[1]
    print(f"   (p99 is nearest-rank: of {runs} samples, the largest; starts/s is 1 / mean)")
    print(f"   API create p50 / library run p50: {api.p50_ms / library.p50_ms:.2f}")
    rate = BURST / burst_s
    print(
        f"   burst: {BURST} creates from {BURST} threads at once: {burst_s * 1e3:.0f} ms wall, "
        f"{rate:.2f} starts/s = {rate / api.per_second:.2f}x the sequential API rate"
    )


def report_rest(rests: list[Rest], window: float) -> dict[str, float]:
    print(f"2. idle CPU over a {window:.0f} s window, % of one CPU (clock tick {1e3 / CLOCK_TICKS:.0f} ms)")
    print(f"   {'containers':>10}{'daemon':>9}{'keeper':>9}")
    for rest in rests:
        print(f"   {rest.containers:>10}{rest.daemon_cpu:>9.2f}{rest.keeper_cpu:>9.2f}")
    print("3. memory, KiB (at 0: after the starts above, so the daemon's code paths are loaded)")
    columns = ("RSS daemon", "keeper", "total", "Pss daemon", "keeper", "total")
    print(f"   {'containers':>10}" + "".join(f"{column:>{len(column) + 3}}" for column in columns))
    for r in rests:
        rss, pss = (r.daemon_rss, r.keeper_rss), (r.daemon_pss, r.keeper_pss)
        values = (*rss, sum(rss), *pss, sum(pss))
        cells = "".join(f"{value:>{len(column) + 3}}" for value, column in zip(values, columns, strict=True))
        print(f"   {r.containers:>10}{cells}")
    empty, full = rests
    per_rss = (full.daemon_rss + full.keeper_rss - empty.daemon_rss - empty.keeper_rss) / IDLE_CONTAINERS
    per_pss = (full.daemon_pss + full.keeper_pss - empty.daemon_pss - empty.keeper_pss) / IDLE_CONTAINERS
    print(
        f"   per container, (total at {IDLE_CONTAINERS} - total at 0) / {IDLE_CONTAINERS}: "
        f"RSS {per_rss:.1f} KiB, Pss {per_pss:.1f} KiB (the sleeps' own memory not counted)"
    )
    ratio = f"{CONMON_KIB / per_rss:.0f}x cgctl's RSS growth" if per_rss > 0 else "cgctl's RSS did not grow"
    print(f"   reference: conmon ~1 MB (~{CONMON_KIB} KiB) per container, quoted, not measured: {ratio}")
    if per_pss <= 0:
        print("   (Pss did not grow: one sample at each count, so its growth is within the noise)")
    return {"rss_kib_per_container": per_rss, "pss_kib_per_container": per_pss}


def report_cli(medians: dict[str, float]) -> None:
    print(f"4. `cgctl --host unix://S ps` with {IDLE_CONTAINERS} containers: median of {PS_RUNS}, 1 warm-up")
    floor = medians["python -c pass"]
    print(f"   {'':<18}{'ms':>9}{'x python -c pass':>18}")
    for name, seconds in medians.items():
        print(f"   {name:<18}{seconds * 1e3:>9.1f}{seconds / floor:>18.2f}")


@contextlib.contextmanager
def running_daemon(directory: Path) -> Iterator[Daemon]:
    """A daemon of our own; on the way out its containers are removed and it and its keeper stopped,
    and if anything failed its log is printed."""
    daemon = Daemon(directory)
    failed = True
    try:
        yield daemon
        failed = False
    finally:
        problems = []
        if daemon.process is not None and daemon.process.poll() is None:
            try:
                daemon.remove_all()
            except Exception as error:
                problems.append(f"removing the containers failed: {error}")
        problems += daemon.stop()
        if failed or problems:
            for problem in problems:
                print(f"cleanup: {problem}", file=sys.stderr)
            print(f"--- the daemon's log ({daemon.log}) ---", file=sys.stderr)
            print(
                daemon.log.read_text(errors="replace") if daemon.log.exists() else "(none)", file=sys.stderr
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="10 sequential starts and a 5 s idle window")
    args = parser.parse_args()
    require_cgroup2_root(HOW_TO_RUN)
    if not shutil.which(CRUN[0]):
        sys.exit("crun not found on PATH (apt-get install crun)")
    runs, window = (10, 5.0) if args.quick else (30, 20.0)
    print(f"cgctl daemon benchmark; kernel {platform.release()}, {os.cpu_count()} CPUs, python {PYTHON}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-daemon-") as workdir,
        running_daemon(Path(workdir)) as daemon,
    ):
        crun = Crun(Path(workdir))
        accepts, serves = daemon.start()
        print(
            f"daemon pid {daemon.pid}: its socket accepted a connection after {accepts:.1f} s, it answered "
            f"GET /v1/info after {serves:.1f} s; keeper pid {daemon.keeper}"
        )
        sequential = sequential_starts(daemon, crun, runs)
        burst_s = burst(daemon)
        daemon.alive()
        report_starts(sequential, runs, burst_s)
        rests = [at_rest(daemon, 0, window)]
        filled = start_idle_containers(daemon)
        print(f"   ({IDLE_CONTAINERS} containers of `sleep 100000` started one by one in {filled:.1f} s)")
        rests.append(at_rest(daemon, IDLE_CONTAINERS, window))
        memory = report_rest(rests, window)
        medians = cli_startup(daemon)
        report_cli(medians)
        daemon.alive()
    summary = {
        "kernel": platform.release(),
        "runs": runs,
        "warmup_rounds": WARMUP_ROUNDS,
        "idle_window_s": window,
        "starts": [asdict(result) for result in sequential],
        "burst": {"threads": BURST, "wall_s": burst_s, "starts_per_s": BURST / burst_s},
        "rest": [asdict(rest) for rest in rests],
        **memory,
        "cli_startup_median_s": medians,
    }
    print("BENCH_JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
