"""How long do containerd and its shim take to run `true` through cgctl-oci, and how long does each verb
the shim calls for every container (state, kill, delete) take?

Why: Kubernetes and podman reach an OCI runtime through its command line, once per verb per container,
so cgctl-oci is judged against runc and crun doing the same job in the same run. Two parts:

- `ctr run --rm --rootfs --runc-binary RUNTIME DIR ID /bin/true` through a containerd started here
  (its own root, state and socket on tmpfs under /run, no CRI plugin), for runc, crun and
  cgctl-oci: containerd's runc v2 shim calls the runtime's create, start, state, kill and delete.
  Ratios are to runc's median in the same run.
- `RUNTIME state ID`, `RUNTIME kill ID KILL` and `RUNTIME delete ID` on a container made for the
  round (`run -d` of `sleep` on a busybox bundle, untimed), against `python3 -c pass` (the floor: the
  interpreter cgctl-oci runs on, starting and doing nothing). Ratios are to the floor's median.

Each round runs every peer once, in turn, so a change in the machine's load weighs on all alike; the
medians and 90th percentiles come from the timed rounds after two warm-up rounds. This process is a
child subreaper, as containerd's shim and conmon are: containers whose runtime exited are its
children, and it reaps them. After each run the cgroup tree must be as the warm-ups left it and no
shim may be left; anything else aborts the benchmark.

How: it writes to /sys/fs/cgroup, so it needs root and a pure cgroup v2 hierarchy; on this project's
development machines (cgroup v1) that means the micro-VM:

    .venv/bin/python tests/vm/microvm.py --timeout 3000 -- .venv/bin/python bench/oci.py [--runs N]

containerd, runc and crun come from Debian (apt-get install containerd runc crun); cgctl-oci is the
console script beside this Python. A missing runtime is skipped with a note. The last line is
`BENCH_JSON {...}`.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from cgroup2_host import CGROUP_MOUNT, require_cgroup2_root
from figures import p90, positive_int
from spawn import build_bundle, check

WARMUP_RUNS = 2
CGCTL_OCI = Path(sys.executable).parent / "cgctl-oci"
FLOOR = [sys.executable, "-c", "pass"]
NAMESPACE = "bench"
READY_TIMEOUT = 120.0  # seconds for containerd to answer, and for a container to start or stop
_PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True)
class Result:
    name: str
    median_ms: float
    p90_ms: float
    ratio: float  # to runc's median (ctr run) or the floor's (verbs), measured in the same run


def runtimes() -> tuple[dict[str, str], list[str]]:
    """The runtimes present (name -> binary), and the names of those missing."""
    found = {"runc": shutil.which("runc"), "crun": shutil.which("crun")}
    found["cgctl-oci"] = str(CGCTL_OCI) if CGCTL_OCI.exists() else None
    return {name: path for name, path in found.items() if path}, [
        name for name, path in found.items() if not path
    ]


def version(binary: str) -> str:
    done = subprocess.run([binary, "--version"], capture_output=True, text=True)
    return (done.stdout.splitlines() or [f"{binary}: no --version"])[0]


def shims() -> list[int]:
    """containerd shims alive now (reap() first: exited ones are this subreaper's zombies until then):
    one would be left by a container containerd did not clean up."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and (entry / "comm").read_text().startswith("containerd-shim"):
                found.append(int(entry.name))
    return found


def cgroup_tree() -> set[str]:
    return {os.path.relpath(directory, CGROUP_MOUNT) for directory, _, _ in os.walk(CGROUP_MOUNT)}


def reap() -> None:
    """Collect every exited child (containers orphaned to this subreaper) without blocking."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


@contextlib.contextmanager
def containerd(workdir: Path) -> Iterator[str]:
    """A containerd of this benchmark's own, stopped on exit; yields its socket's address."""
    address = str(workdir / "containerd.sock")
    config = workdir / "containerd.toml"
    config.write_text(
        "version = 2\n"
        f'root = "{workdir / "root"}"\nstate = "{workdir / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{address}"\n'
    )
    log = (workdir / "containerd.log").open("w")
    process = subprocess.Popen(
        ["containerd", "--config", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while subprocess.run(["ctr", "--address", address, "version"], capture_output=True).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"containerd did not start: {(workdir / 'containerd.log').read_text()[-2000:]}"
                )
            time.sleep(0.2)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(READY_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def ctr_run(address: str, rootfs: Path, name: str, binary: str) -> Callable[[], None]:
    ids = itertools.count()
    base = ["ctr", "--address", address, "--namespace", NAMESPACE, "run", "--rm", "--rootfs"]
    return lambda: check(
        [*base, "--runc-binary", binary, str(rootfs), f"bench-{name}-{next(ids)}", "/bin/true"]
    )


def time_ctr(address: str, rootfs: Path, present: dict[str, str], runs: int) -> dict[str, list[float]]:
    """Seconds per `ctr run --rm`, the runtimes interleaved; nothing may be left after any run."""
    peers = {name: ctr_run(address, rootfs, name, binary) for name, binary in present.items()}
    for _ in range(WARMUP_RUNS):
        for run in peers.values():
            run()
    baseline = cgroup_tree()
    timings: dict[str, list[float]] = {name: [] for name in peers}
    for _ in range(runs):
        for name, run in peers.items():
            started = time.perf_counter()
            run()
            timings[name].append(time.perf_counter() - started)
            reap()  # the shim daemonizes, so it exits as this subreaper's child
            if (tree := cgroup_tree()) != baseline or (left := shims()):
                raise RuntimeError(
                    f"ctr run with {name} left: cgroups {sorted(tree ^ baseline)}, shims {shims()}"
                    if tree != baseline
                    else f"ctr run with {name} left shims {left}"
                )
    return timings


class Verbs:
    """A runtime's state, kill and delete, each timed on a container made for the round."""

    def __init__(self, name: str, binary: str, workdir: Path, rootfs: Path, template: dict) -> None:
        self.name, self.workdir, self.rootfs, self.template = name, workdir, rootfs, template
        self.argv = [binary, "--root", str(workdir / f"root-{name}")]
        self.ids = itertools.count()

    def round(self) -> dict[str, float]:
        """Start a `sleep` container (untimed), then time state, kill KILL and delete on it."""
        container = f"bench-{self.name}-{next(self.ids)}"
        bundle = self.workdir / container
        bundle.mkdir()
        config = json.loads(json.dumps(self.template))
        config["root"]["path"] = str(self.rootfs)
        config["linux"]["cgroupsPath"] = f"/{NAMESPACE}/{container}"  # nested, as containerd's are
        (bundle / "config.json").write_text(json.dumps(config))
        with (self.workdir / f"{container}.log").open("w") as stderr:  # the container keeps run's stdio
            argv = [*self.argv, "run", "--detach", "--bundle", str(bundle), container]
            if subprocess.run(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr
            ).returncode:
                raise RuntimeError(
                    f"{' '.join(argv)} failed: {(self.workdir / f'{container}.log').read_text()}"
                )
        times = {}
        started = time.perf_counter()
        done = subprocess.run([*self.argv, "state", container], capture_output=True, text=True, check=True)
        times["state"] = time.perf_counter() - started
        found = json.loads(done.stdout)
        if found["status"] != "running":
            raise RuntimeError(f"{self.name} state {container}: {found['status']}, not running")
        times["kill"] = timed([*self.argv, "kill", container, "KILL"])
        self.wait_stopped(container, found["pid"])
        times["delete"] = timed([*self.argv, "delete", container])
        shutil.rmtree(bundle)
        if (group := CGROUP_MOUNT / NAMESPACE / container).exists():
            raise RuntimeError(f"{self.name} delete {container} left its cgroup {group}")
        return times

    def wait_stopped(self, container: str, pid: int) -> None:
        """Reap the killed init (this process is its subreaper) and wait for `state` to say stopped."""
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            reap()
            done = subprocess.run(
                [*self.argv, "state", container], capture_output=True, text=True, check=True
            )
            if json.loads(done.stdout)["status"] == "stopped" and not Path(f"/proc/{pid}").exists():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} container {container} (pid {pid}) not stopped after KILL")
            time.sleep(0.05)


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    check(argv)
    return time.perf_counter() - started


def time_verbs(verbs: list[Verbs], runs: int) -> dict[str, list[float]]:
    """Seconds per verb and runtime ("runc state", ...) and the floor's, interleaved round by round."""
    timings: dict[str, list[float]] = {"python3 -c pass": []}
    for number in range(WARMUP_RUNS + runs):
        floor = timed(FLOOR)
        for runtime in verbs:
            for verb, seconds in runtime.round().items():
                if number >= WARMUP_RUNS:
                    timings.setdefault(f"{runtime.name} {verb}", []).append(seconds)
        if number >= WARMUP_RUNS:
            timings["python3 -c pass"].append(floor)
    return timings


def summarize(timings: dict[str, list[float]], reference: str) -> list[Result]:
    medians = {name: statistics.median(samples) for name, samples in timings.items()}
    return [
        Result(name, medians[name] * 1e3, p90(samples) * 1e3, medians[name] / medians[reference])
        for name, samples in timings.items()
    ]


def table(title: str, results: list[Result], ratio: str) -> None:
    print(title)
    print(f"{'name':<20}{'median ms':>11}{'p90 ms':>10}{ratio:>10}")
    for result in results:
        print(f"{result.name:<20}{result.median_ms:>11.1f}{result.p90_ms:>10.1f}{result.ratio:>10.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, default=15, help="timed rounds per part (default 15)")
    args = parser.parse_args()
    require_cgroup2_root(
        ".venv/bin/python tests/vm/microvm.py --timeout 3000 -- .venv/bin/python bench/oci.py"
    )
    present, missing = runtimes()
    if "runc" not in present:
        sys.exit("bench/oci.py needs runc, the reference: apt-get install runc")
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a timeout still stops containerd
    before = cgroup_tree()
    # Under /run (tmpfs), as containerd's own state is, and as a runtime's --root is by default.
    with tempfile.TemporaryDirectory(prefix="bench-oci-", dir="/run") as workdir_name:
        workdir = Path(workdir_name)
        build_bundle(workdir / "bundle", spec_tool="runc")
        rootfs = workdir / "bundle" / "rootfs"
        (rootfs / "bin" / "sleep").symlink_to("busybox")
        template = json.loads((workdir / "bundle" / "config.json").read_text())
        template["process"]["args"] = ["/bin/sleep", "100000"]
        with containerd(workdir) as address:
            ctr_timings = time_ctr(address, rootfs, present, args.runs)
        reap()
        verbs = [Verbs(name, binary, workdir, rootfs, template) for name, binary in present.items()]
        verb_timings = time_verbs(verbs, args.runs)
    reap()
    if NAMESPACE not in before:  # the containers' parent (/bench/ID, as ctr's), which runtimes leave
        (CGROUP_MOUNT / NAMESPACE).rmdir()
    if (left := cgroup_tree() - before) or shims():
        raise RuntimeError(f"left behind: cgroups {sorted(left)}, shims {shims()}")
    kernel = platform.release()
    print(f"kernel {kernel}; {args.runs} timed rounds after {WARMUP_RUNS} warm-ups, peers interleaved")
    found = {name: version(binary) for name, binary in present.items()}
    for line in found.values():
        print(line)
    for name in missing:
        print(
            f"note: {name} skipped: not installed"
            + (" (not on this branch yet)" if name == "cgctl-oci" else "")
        )
    ctr_results = summarize(ctr_timings, "runc")
    verb_results = summarize(verb_timings, "python3 -c pass")
    table("ctr run --rm of /bin/true through containerd", ctr_results, "x runc")
    table("the shim's per-container verbs", verb_results, "x floor")
    summary = {
        "kernel": kernel,
        "runs": args.runs,
        "warmup_runs": WARMUP_RUNS,
        "skipped": missing,
        "versions": found,
        "ctr_run": [asdict(result) for result in ctr_results],
        "verbs": [asdict(result) for result in verb_results],
    }
    print("BENCH_JSON " + json.dumps(summary))


if __name__ == "__main__":
    main()
