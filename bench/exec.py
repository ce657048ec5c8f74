"""How long does it take to start `true` in an already-running container and see it finish?

Why: `cgctl exec` should be judged against what it does (join the container's cgroup, setns into
its namespaces, fork into its pid namespace, enter its sandbox, exec), so this times cgctl's CLI
and library next to a shell doing the bare minimum (the floor) and next to `runc exec` and
`crun exec`. Each peer has its own container running `sleep 100000`, started once before the timed
runs and removed after them. Each result's ratio is its median over the floor's median measured in
the same run; the peers take turns run by run, so a change in the machine's load weighs on all of
them alike.

The floor joins a cgctl container (the same namespaces cgctl exec joins) as a shell would by hand:
`echo $$ >cgroup.procs; exec nsenter --target PID --all --root --wd true`: the cgroup, every
namespace of the container's init that differs from ours, its root and working directory, and
(nsenter forks after joining a pid namespace) a fork and an exec. It skips what cgctl exec adds:
reading the run record and the container's environment, and the sandbox (capabilities,
no_new_privs, seccomp).

How: it writes to /sys/fs/cgroup, so it needs root and a pure cgroup v2 hierarchy; on this project's
development machines (cgroup v1) that means the micro-VM:

    .venv/bin/python tests/vm/microvm.py -- .venv/bin/python bench/exec.py [--runs N]

runc and crun (apt-get install runc crun) run their containers with `run -d` on the busybox-static
bundle bench/spawn.py builds, cgroupfs driver; a missing one is skipped with a note. cgctl's
containers are foreground `cgctl run --name NAME -- sleep 100000` (default sandbox) with a private
state directory. Any failing command, a process or cgroup left behind after a run, or anything left
after the containers are removed, aborts the benchmark. The last line is `BENCH_JSON {...}`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from cgroup2_host import CGROUP_MOUNT, require_cgroup2_root
from figures import positive_int
from spawn import OCI_RUNTIMES, Peer, Result, build_bundle, cgroup_tree, check, summarize

from cgctl import state
from cgctl.runtime import exec as execution
from cgctl.spec import ExecSpec

WARMUP_RUNS = 2
READY_TIMEOUT = 300.0  # seconds for `cgctl run` to start its workload (Python is slow in the VM)
CGCTL = [sys.executable, "-m", "cgctl"]
TRUE = ExecSpec(command=["true"])
# $1: the container cgroup's cgroup.procs, $2: its init's pid (as this host numbers it).
FLOOR_SCRIPT = 'echo $$ >"$1"; exec nsenter --target "$2" --all --root --wd true'

Snapshot = tuple[set[str], dict[str, set[str]]]  # the cgroup tree, each container's processes


class Containers:
    """The long-running containers the peers exec into, each with its cgroup.procs; removed on exit."""

    def __init__(self, workdir: Path, stack: contextlib.ExitStack) -> None:
        self.workdir, self.stack = workdir, stack
        self.state_dir = workdir / "state"
        self.procs: dict[str, Path] = {}

    def start_cgctl(self, name: str) -> execution.Target:
        """A foreground `cgctl run` in the background; its Target once its workload runs."""
        log = self.workdir / f"{name}.log"
        with log.open("w") as stderr:
            process = subprocess.Popen(
                [*CGCTL, "run", "--name", name, "--", "sleep", "100000"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        self.stack.callback(self._stop_cgctl, name, process)
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                target = execution.prepare(self.state_dir, name, TRUE)
                break
            except (LookupError, execution.ExecError):
                if process.poll() is not None:
                    raise RuntimeError(f"cgctl run {name} exited: {log.read_text().strip()}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cgctl run {name} not running after {READY_TIMEOUT} s") from None
                time.sleep(0.05)
        self.procs[name] = Path(target.cgroup_procs)
        return target

    def _stop_cgctl(self, name: str, process: subprocess.Popen[bytes]) -> None:
        """Kill the container's cgroup; `cgctl run` then removes it and its record, and exits."""
        try:
            cgroup = Path(state.read(state.record_path(self.state_dir, name))["cgroup"])
            (cgroup / "cgroup.kill").write_text("1")
        except (OSError, ValueError, KeyError):  # no record or cgroup yet (a failed setup)
            process.kill()
        process.wait()

    def start_oci(self, runtime: str) -> str:
        """`<runtime> run -d` on a bundle of its own (one cgroup each); the container's id."""
        name = f"bench-exec-{runtime}"
        bundle = self.workdir / name
        build_bundle(bundle, spec_tool=runtime)
        (bundle / "rootfs" / "bin" / "sleep").symlink_to("busybox")
        config_file = bundle / "config.json"
        config = json.loads(config_file.read_text())
        config["process"]["args"] = ["/bin/sleep", "100000"]
        config["linux"]["cgroupsPath"] = f"/{name}"
        config_file.write_text(json.dumps(config, indent=2))
        # The container keeps run's stdio: a pipe would never end, so its stderr goes to a file.
        log = self.workdir / f"{name}.log"
        with log.open("w") as stderr:
            argv = [*OCI_RUNTIMES[runtime], "run", "-d", "--bundle", str(bundle), name]
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr)
        if done.returncode != 0:
            raise RuntimeError(f"{runtime} run -d exited with {done.returncode}: {log.read_text().strip()}")
        self.stack.callback(check, [*OCI_RUNTIMES[runtime], "delete", "--force", name])
        self.procs[name] = CGROUP_MOUNT / name / "cgroup.procs"
        return name

    def snapshot(self) -> Snapshot:
        return cgroup_tree(), {name: set(procs.read_text().split()) for name, procs in self.procs.items()}


def floor(target: execution.Target) -> Callable[[], None]:
    argv = ["sh", "-c", FLOOR_SCRIPT, "sh", target.cgroup_procs, str(target.pid)]
    return lambda: check(argv)


def oci_exec(runtime: str, name: str) -> Callable[[], None]:
    argv = [*OCI_RUNTIMES[runtime], "exec", name, "/bin/true"]
    return lambda: check(argv)


def cgctl_library(state_dir: Path, name: str, null: int) -> Callable[[], None]:
    def run() -> None:
        started = execution.start(execution.prepare(state_dir, name, TRUE), stdio=(null, null, null))
        if (status := execution.wait(started.pid)) != 0:
            raise RuntimeError(f"cgctl exec.start(true) in {name} exited with status {status}")

    return run


def select_peers(containers: Containers, null: int) -> tuple[list[Peer], list[str]]:
    """The peers to measure, floor first, each with its container started; and the missing runtimes."""
    present = [name for name in OCI_RUNTIMES if shutil.which(name)]
    missing = [name for name in OCI_RUNTIMES if name not in present]
    peers = [Peer("shell floor", floor(containers.start_cgctl("bench-exec-floor")))]
    for runtime in present:
        name = containers.start_oci(runtime)
        peers.append(Peer(runtime, oci_exec(runtime, name)))
    containers.start_cgctl("bench-exec-cli")
    peers.append(Peer("cgctl CLI", lambda: check([*CGCTL, "exec", "bench-exec-cli", "--", "true"])))
    containers.start_cgctl("bench-exec-lib")
    peers.append(Peer("cgctl library", cgctl_library(containers.state_dir, "bench-exec-lib", null)))
    return peers, missing


def time_rounds(peers: list[Peer], runs: int, snapshot: Callable[[], Snapshot]) -> dict[str, list[float]]:
    """Seconds per run, the peers interleaved round by round so that drifts in load hit them all alike;
    after each run the cgroup tree and every container's processes must be as the warm-ups left them."""
    for _ in range(WARMUP_RUNS):
        for peer in peers:
            peer.start_and_wait()
    baseline = snapshot()
    timings: dict[str, list[float]] = {peer.name: [] for peer in peers}
    for _ in range(runs):
        for peer in peers:
            started = time.perf_counter()
            peer.start_and_wait()
            timings[peer.name].append(time.perf_counter() - started)
            if (after := snapshot()) != baseline:
                raise RuntimeError(f"{peer.name} left something behind: {changes(baseline, after)}")
    return timings


def changes(baseline: Snapshot, after: Snapshot) -> str:
    (tree, procs), (new_tree, new_procs) = baseline, after
    moved = {name: f"{sorted(pids)} -> {sorted(new_procs[name])}" for name, pids in procs.items()}
    return f"cgroups added {sorted(new_tree - tree)}, removed {sorted(tree - new_tree)}; processes {moved}"


def versions(runtimes: list[str]) -> dict[str, str]:
    """Each OCI runtime's `--version` first line, for the record."""
    return {
        name: subprocess.run([name, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        for name in runtimes
    }


def report(results: list[Result], missing: list[str], runs: int) -> None:
    kernel = platform.release()
    print(f"start `true` in a running container and wait for it; kernel {kernel}")
    print(f"{runs} runs each after {WARMUP_RUNS} warm-ups, peers interleaved")
    found = versions([name for name in OCI_RUNTIMES if name not in missing])
    for line in found.values():
        print(line)
    for name in missing:
        print(f"note: {name} skipped: no {name} binary on PATH (apt-get install {name})")
    print(f"{'name':<16}{'median ms':>11}{'p90 ms':>10}{'x floor':>9}")
    for result in results:
        print(
            f"{result.name:<16}{result.median_ms:>11.1f}{result.p90_ms:>10.1f}{result.ratio_to_floor:>9.2f}"
        )
    summary = {
        "kernel": kernel,
        "runs": runs,
        "warmup_runs": WARMUP_RUNS,
        "skipped": missing,
        "versions": found,
        "results": [asdict(result) for result in results],
    }
    print("BENCH_JSON " + json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, default=20, help="timed runs per peer (default 20)")
    args = parser.parse_args()
    require_cgroup2_root(".venv/bin/python tests/vm/microvm.py -- .venv/bin/python bench/exec.py")
    # In /run, a tmpfs as cgctl's default state dir is: on the VM's overlay root (/tmp), /proc/locks
    # names a record's lock by another device than stat does, so cgctl would see no running container.
    with (
        tempfile.TemporaryDirectory(prefix="bench-exec-", dir="/run") as workdir,
        contextlib.ExitStack() as stack,
    ):
        containers = Containers(Path(workdir), stack)
        os.environ["CGCTL_STATE_DIR"] = str(containers.state_dir)  # for `cgctl run` and `cgctl exec`
        null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        stack.callback(os.close, null)
        peers, missing = select_peers(containers, null)
        timings = time_rounds(peers, args.runs, containers.snapshot)
    if left := [str(procs.parent) for procs in containers.procs.values() if procs.parent.exists()]:
        raise RuntimeError(f"containers' cgroups left behind: {left}")
    report(summarize(timings), missing, args.runs)


if __name__ == "__main__":
    main()
