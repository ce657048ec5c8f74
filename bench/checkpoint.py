"""Freeze latency, and what cgctl adds to CRIU when it checkpoints and restores a 256 MiB workload.

Why: freezing is how cgctl stops a container in place (and how CRIU collects one), so its latency
for 1 and 100 processes is measured from the write to cgroup.freeze to the kernel's "frozen 1",
as cgctl waits for it (POLLPRI on cgroup.events) next to the floor of re-reading cgroup.events
in a busy loop. Checkpoint and restore are mostly CRIU's work; what matters is cgctl's overhead
on top: each round checkpoints and restores a workload holding 256 MiB with cgctl (library calls:
what the CLI does without Python's start-up), then dumps and restores the very same restored
tree with criu by hand, with the same options, and prints cgctl's time over criu's.

How: it needs root, criu and a pure cgroup v2 hierarchy; on this project's development machines
(cgroup v1) that means the micro-VM:

    .venv/bin/python tests/vm/microvm.py -- .venv/bin/python bench/checkpoint.py [--rounds N]

One round is run first and not counted (CRIU's first run probes the kernel). The last line is
`BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from cgroup2_host import CGROUP_MOUNT, require_cgroup2_root

from cgctl import state
from cgctl.cgroup import freezer, fs
from cgctl.runtime import checkpoint

HOW_TO_RUN = ".venv/bin/python tests/vm/microvm.py -- .venv/bin/python bench/checkpoint.py"
# CRIU's first run on a boot probes the kernel (~1 s in the VM) and caches it in /run/criu.kdat.
WARMUP_ROUNDS = 1
SCRATCH = CGROUP_MOUNT / "bench-freeze"
CGCTL_ROOT = CGROUP_MOUNT / "cgctl.slice"
WORKLOAD = (
    "import os, signal\n"
    "data = bytearray(os.urandom(1 << 20)) * 256\n"
    "print('ready', flush=True)\n"
    "while True: signal.pause()\n"
)


def freeze_latencies(processes: int, rounds: int) -> tuple[list[float], list[float]]:
    """(cgctl's set_frozen, busy re-read floor) in ms, alternating, for `processes` busy shells."""
    SCRATCH.mkdir()
    group = fs.Cgroup(SCRATCH)
    join = f"echo $$ > {SCRATCH}/cgroup.procs; exec sh -c 'while :; do :; done'"
    workers = [subprocess.Popen(["sh", "-c", join]) for _ in range(processes)]
    try:
        while len(group.read("cgroup.procs").split()) < processes:
            time.sleep(0.05)
        cgctl_ms, floor_ms = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            freezer.set_frozen(group, True)
            cgctl_ms.append((time.perf_counter() - started) * 1000)
            freezer.set_frozen(group, False)
            started = time.perf_counter()
            group.write("cgroup.freeze", "1")
            while "frozen 1" not in group.read("cgroup.events"):
                pass
            floor_ms.append((time.perf_counter() - started) * 1000)
            freezer.set_frozen(group, False)
        return cgctl_ms, floor_ms
    finally:
        fs.remove(group)
        for worker in workers:
            worker.wait()


def criu(*args: str, cgroup: Path | None = None) -> float:
    """Run criu (in `cgroup` if given) with the options cgctl gives it; seconds taken."""
    started = time.perf_counter()
    subprocess.run(
        ["criu", *args, "--manage-cgroups=ignore", *checkpoint.EXTERNAL_MOUNTS],
        check=True,
        stdin=subprocess.DEVNULL,
        preexec_fn=(lambda: (cgroup / "cgroup.procs").write_text("0")) if cgroup else None,  # type: ignore[operator]
    )
    return time.perf_counter() - started


def checkpoint_round(scratch: Path) -> dict[str, float]:
    """One round: cgctl checkpoint + restore, then criu dump + restore of the restored tree."""
    workload = subprocess.Popen(
        [sys.executable, "-m", "cgctl", "run", "--name", "big", "--mem", "1G", "--", sys.executable, "-S",
         "-c", WORKLOAD],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert workload.stdout is not None and workload.stdout.readline() == b"ready\n"
    times: dict[str, float] = {}
    times["cgctl checkpoint"] = checkpoint.checkpoint("big", scratch / "cgctl").seconds
    workload.wait()

    restored = threading.Event()

    def on_restored(_name: str, _criu_seconds: float) -> None:
        # From the call: name, host checks, cgroup, limits and CRIU.
        times["cgctl restore"] = time.perf_counter() - restore_started
        restored.set()

    report: list[object] = []
    supervisor = threading.Thread(
        target=lambda: report.append(checkpoint.restore(scratch / "cgctl", on_restored=on_restored)),
        daemon=True,
    )
    restore_started = time.perf_counter()
    supervisor.start()
    restored.wait(600)
    group = CGCTL_ROOT / "big"
    record = Path("/run/cgctl/runs/big.json")
    while "pid" not in (fields := state.read(record)):  # recorded right after the restore
        time.sleep(0.01)
    init = int(fields["pid"])
    shutil.rmtree(scratch / "cgctl")  # memory for the next images
    raw = scratch / "criu"
    raw.mkdir()
    times["criu dump"] = criu("dump", "-t", str(init), "-D", str(raw), "-o", "dump.log",
                              "--freeze-cgroup", str(group), "--network-lock", "nftables")  # fmt: skip
    supervisor.join()
    started = time.perf_counter()
    target = fs.Cgroup(CGROUP_MOUNT / "bench-restore")
    target.path.mkdir()
    target.write("memory.max", str(1 << 30))
    pidfile = scratch / "pid"
    criu("restore", "-D", str(raw), "-o", "restore.log", "-d", "--restore-sibling",
         "--root", "/", "--pidfile", str(pidfile), cgroup=target.path)  # fmt: skip
    times["criu restore"] = time.perf_counter() - started
    fs.remove(target)
    os.waitpid(int(pidfile.read_text()), 0)  # our child, as cgctl's restored init is cgctl's
    pidfile.unlink()
    shutil.rmtree(raw)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="checkpoint/restore rounds (default 3)")
    parser.add_argument("--freezes", type=int, default=30, help="freezes per process count (default 30)")
    args = parser.parse_args()
    require_cgroup2_root(HOW_TO_RUN)
    results: dict[str, object] = {}
    print("freeze latency (write to 'frozen 1'), median ms:")
    print(f"{'processes':>10} {'cgctl':>8} {'floor':>8} {'x floor':>8}")
    for processes in (1, 100):
        cgctl_ms, floor_ms = freeze_latencies(processes, args.freezes)
        ours, floor = statistics.median(cgctl_ms), statistics.median(floor_ms)
        print(f"{processes:>10} {ours:>8.2f} {floor:>8.2f} {ours / floor:>8.2f}")
        results[f"freeze_{processes}"] = {"cgctl_ms": ours, "floor_ms": floor}
    rounds = []
    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as scratch:
        for number in range(WARMUP_ROUNDS + args.rounds):
            times = checkpoint_round(Path(scratch))
            print(f"round {number + 1}: " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))
            if number >= WARMUP_ROUNDS:
                rounds.append(times)
    print("256 MiB checkpoint and restore, median s:")
    for step in ("checkpoint", "restore"):
        ours = statistics.median(r[f"cgctl {step}"] for r in rounds)
        raw = statistics.median(r[f"criu {'dump' if step == 'checkpoint' else 'restore'}"] for r in rounds)
        print(f"  {step:<10} cgctl {ours:.2f}  criu by hand {raw:.2f}  x {ours / raw:.2f}")
        results[step] = {"cgctl_s": ours, "criu_s": raw}
    print("BENCH_JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
