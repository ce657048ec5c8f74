"""How long does it take to start `true` under a 256 MiB memory limit and see it finish, cleanup included?

Why: cgctl's cost to start a workload should be judged against what it does (a cgroup, a limit,
namespaces, a fork and an exec), so this times cgctl's CLI and library next to a shell doing the
bare minimum (the floor) and next to the OCI runtimes runc and crun doing the same job. Each
result's ratio is its median over the floor's median measured in the same run; the peers take
turns run by run, so a change in the machine's load weighs on all of them alike. cgctl runs with
its default sandbox (capabilities, no_new_privs, seccomp, masked kernel paths, device program) and
with --privileged (none of it), so the sandbox's own cost is their ratio.

How: it writes to /sys/fs/cgroup, so it needs root and a pure cgroup v2 hierarchy; on this project's
development machines (cgroup v1) that means the micro-VM:

    .venv/bin/python tests/vm/microvm.py -- .venv/bin/python bench/spawn.py [--runs N]

runc and crun (apt-get install runc crun) are used with their cgroupfs driver on a busybox-static
bundle built under /tmp; a missing one is skipped with a note. Any failing command, or a cgroup
left behind after a run, aborts the benchmark. The last line is `BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from cgroup2_host import CGROUP_MOUNT, require_cgroup2_root
from figures import p90, positive_int

from cgctl import runtime
from cgctl.spec import WorkloadSpec

MEMORY_LIMIT = 256 * 1024 * 1024
WARMUP_RUNS = 2
FLOOR_CGROUP = CGROUP_MOUNT / "bench-floor"
OCI_CGROUPS_PATH = "/bench-oci"
# $1: the cgroup to create, $2: its memory.max. The unshare flags are runc's default namespaces.
FLOOR_SCRIPT = (
    'set -e; mkdir "$1"; echo "$2" >"$1/memory.max"; echo $$ >"$1/cgroup.procs"; '
    "exec unshare -pfmuin --fork true"
)
OCI_RUNTIMES = {"runc": ["runc"], "crun": ["crun", "--cgroup-manager=cgroupfs"]}
CGCTL_CLI = Path(sys.executable).parent / "cgctl"


@dataclass(frozen=True)
class Peer:
    name: str
    start_and_wait: Callable[[], None]


@dataclass(frozen=True)
class Result:
    name: str
    median_ms: float
    p90_ms: float
    ratio_to_floor: float


def check(argv: list[str], cwd: Path | None = None) -> None:
    """Run argv to completion; a non-zero status raises with its stderr."""
    done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"{shlex.join(argv)} exited with status {done.returncode}: {done.stderr.strip() or '(no stderr)'}"
        )


def run_floor() -> None:
    check(["sh", "-c", FLOOR_SCRIPT, "sh", str(FLOOR_CGROUP), str(MEMORY_LIMIT)])
    FLOOR_CGROUP.rmdir()


def oci_peer(name: str, bundle: Path) -> Peer:
    """`<runtime> run` with a fresh container id each time; without --keep it deletes the container."""
    argv = [*OCI_RUNTIMES[name], "run", "--bundle", str(bundle)]
    ids = itertools.count()
    return Peer(name, lambda: check([*argv, f"bench-{name}-{next(ids)}"]))


def cgctl_cli(*options: str) -> Callable[[], None]:
    return lambda: check([str(CGCTL_CLI), "run", "--mem", "256M", *options, "--", "true"])


def cgctl_library(privileged: bool) -> Callable[[], None]:
    spec = WorkloadSpec.model_validate(
        {"command": ["true"], "limits": {"memory": {"max": "256M"}}, "security": {"privileged": privileged}}
    )

    def run() -> None:
        result = runtime.run(spec)
        if result.exit_code != 0:
            raise RuntimeError(f"cgctl runtime.run(true) did not exit 0: {result}")

    return run


def build_bundle(bundle: Path, spec_tool: str) -> None:
    """A read-only busybox rootfs whose config runs /bin/true under the memory limit."""
    bin_dir = bundle / "rootfs" / "bin"
    bin_dir.mkdir(parents=True)
    busybox = shutil.which("busybox")
    if busybox is None:
        raise RuntimeError("busybox not found: apt-get install busybox-static")
    shutil.copy(busybox, bin_dir / "busybox")
    (bin_dir / "true").symlink_to("busybox")
    check([spec_tool, "spec"], cwd=bundle)
    config_file = bundle / "config.json"
    config = json.loads(config_file.read_text())
    config["process"]["args"] = ["/bin/true"]
    config["process"]["terminal"] = False
    config["root"]["readonly"] = True
    config["linux"]["resources"]["memory"] = {"limit": MEMORY_LIMIT}
    config["linux"]["cgroupsPath"] = OCI_CGROUPS_PATH
    config_file.write_text(json.dumps(config, indent=2))


def select_peers(workdir: Path) -> tuple[list[Peer], list[str]]:
    """The peers to measure, floor first, and the names of the OCI runtimes that are not installed."""
    present = [name for name in OCI_RUNTIMES if shutil.which(name)]
    missing = [name for name in OCI_RUNTIMES if name not in present]
    peers = [Peer("shell floor", run_floor)]
    if present:
        bundle = workdir / "bundle"
        build_bundle(bundle, spec_tool=present[0])
        peers += [oci_peer(name, bundle) for name in present]
    peers += [
        Peer("cgctl CLI", cgctl_cli()),
        Peer("cgctl CLI priv", cgctl_cli("--privileged")),
        Peer("cgctl library", cgctl_library(privileged=False)),
        Peer("cgctl lib priv", cgctl_library(privileged=True)),
    ]
    return peers, missing


def cgroup_tree() -> set[str]:
    return {os.path.relpath(directory, CGROUP_MOUNT) for directory, _, _ in os.walk(CGROUP_MOUNT)}


def time_rounds(peers: list[Peer], runs: int) -> dict[str, list[float]]:
    """Seconds per run, the peers interleaved round by round so that drifts in load hit them all alike."""
    for _ in range(WARMUP_RUNS):
        for peer in peers:
            peer.start_and_wait()
    baseline = cgroup_tree()
    timings: dict[str, list[float]] = {peer.name: [] for peer in peers}
    for _ in range(runs):
        for peer in peers:
            timings[peer.name].append(time_run(peer, baseline))
    return timings


def time_run(peer: Peer, baseline: set[str]) -> float:
    """Seconds for one run; afterwards the cgroup tree must be as the warm-ups left it."""
    started = time.perf_counter()
    peer.start_and_wait()
    elapsed = time.perf_counter() - started
    if (tree := cgroup_tree()) != baseline:
        raise RuntimeError(
            f"{peer.name} left the cgroup tree changed: added {sorted(tree - baseline)}, "
            f"removed {sorted(baseline - tree)}"
        )
    return elapsed


def summarize(timings: dict[str, list[float]]) -> list[Result]:
    """Milliseconds per peer; the first peer is the floor the ratios are taken against."""
    medians = {name: statistics.median(samples) for name, samples in timings.items()}
    floor = next(iter(medians.values()))
    return [
        Result(name, medians[name] * 1e3, p90(samples) * 1e3, medians[name] / floor)
        for name, samples in timings.items()
    ]


def report(results: list[Result], missing: list[str], runs: int) -> None:
    kernel = platform.release()
    print(f"start `true` under memory.max {MEMORY_LIMIT} and wait, cleanup included; kernel {kernel}")
    print(f"{runs} runs each after {WARMUP_RUNS} warm-ups, peers interleaved")
    for name in missing:
        print(f"note: {name} skipped: no {name} binary on PATH (apt-get install {name})")
    print(f"{'name':<16}{'median ms':>11}{'p90 ms':>10}{'x floor':>9}")
    for result in results:
        print(
            f"{result.name:<16}{result.median_ms:>11.1f}{result.p90_ms:>10.1f}{result.ratio_to_floor:>9.2f}"
        )
    medians = {result.name: result.median_ms for result in results}
    sandbox = {
        way: medians[f"cgctl {way}"] / medians[f"cgctl {short} priv"]
        for way, short in (("CLI", "CLI"), ("library", "lib"))
    }
    print(
        f"default sandbox vs --privileged: library {sandbox['library']:.3f}x, CLI {sandbox['CLI']:.3f}x "
        "(same run, same workload)"
    )
    summary = {
        "kernel": kernel,
        "sandbox_ratio": sandbox,
        "runs": runs,
        "warmup_runs": WARMUP_RUNS,
        "skipped": missing,
        "results": [asdict(result) for result in results],
    }
    print("BENCH_JSON " + json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, default=20, help="timed runs per peer (default 20)")
    args = parser.parse_args()
    require_cgroup2_root(".venv/bin/python tests/vm/microvm.py -- .venv/bin/python bench/spawn.py")
    with tempfile.TemporaryDirectory(prefix="bench-spawn-") as workdir:
        peers, missing = select_peers(Path(workdir))
        timings = time_rounds(peers, args.runs)
    report(summarize(timings), missing, args.runs)


if __name__ == "__main__":
    main()
