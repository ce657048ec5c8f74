"""What `cgctl machine` costs and saves, on a host without a usable cgroup v2: creating it, its first
and later starts, its stop, and a run through it against today's alternative, one throwaway
micro-VM per command (tests/vm/microvm.py, what scripts/cgctl did before the machine).

Why: the machine exists so that state survives between commands; the price is a long-lived VM, and
the gain is that a command no longer pays a boot. Each figure is wall time of separate CLI
invocations, as a user types them, measured in the same run: `cgctl run -- true` through the
started machine (HTTP over the forwarded loopback port, the daemon creates and starts it in the
VM, the CLI waits for its end) against `microvm.py -- cgctl run -- true` (a boot, the same run in
the VM with no daemon, a poweroff); and `cgctl ps` through the machine against `cgctl --version`
on the host (Python's and typer's start-up, which every call pays).

How, on the host (it boots its own machine in a temporary directory and removes it at the end):

    .venv/bin/python bench/machine.py [--runs N]

The last line is `BENCH_JSON {...}` for machines.
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
import time
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
CGCTL = [sys.executable, "-m", "cgctl"]


def timed(argv: list[str]) -> float:
    started = time.monotonic()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"bench: {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return time.monotonic() - started


def median(argv: list[str], runs: int) -> float:
    return statistics.median(timed(argv) for _ in range(runs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs of each per-command measure (default 5)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="cgctl-bench-machine-"))
    os.environ["CGCTL_MACHINE_DIR"] = str(home / "machine")
    try:
        figures = {
            "init_s": timed([*CGCTL, "machine", "init", "--share", str(home)]),
            "first_start_s": timed([*CGCTL, "machine", "start"]),
            "run_true_through_machine_s": median([*CGCTL, "run", "--", "true"], args.runs),
            "ps_through_machine_s": median([*CGCTL, "ps", "-a"], args.runs),
            "cli_start_up_s": median([*CGCTL, "--version"], args.runs),
            "stop_s": timed([*CGCTL, "machine", "stop"]),
            "later_start_s": timed([*CGCTL, "machine", "start"]),
        }
        figures["stop_again_s"] = timed([*CGCTL, "machine", "stop"])
        one_shot = [sys.executable, str(CHECKOUT / "tests/vm/microvm.py"), "--", *CGCTL, "run", "--", "true"]
        figures["run_true_one_shot_vm_s"] = median(one_shot, max(2, args.runs // 2))
    finally:
        subprocess.run([*CGCTL, "machine", "rm", "--force"], capture_output=True, timeout=300)
        shutil.rmtree(home, ignore_errors=True)
    through = figures["run_true_through_machine_s"]
    figures["one_shot_over_machine"] = figures["run_true_one_shot_vm_s"] / through
    print(f"machine init:                      {figures['init_s']:.2f} s")
    print(f"first start (boot to daemon):      {figures['first_start_s']:.1f} s")
    print(f"later start:                       {figures['later_start_s']:.1f} s")
    print(f"stop (no containers running):      {figures['stop_s']:.1f} s")
    print(
        f"run -- true, through the machine:  {figures['run_true_through_machine_s']:.2f} s  vs one-shot VM "
        f"{figures['run_true_one_shot_vm_s']:.1f} s ({figures['one_shot_over_machine']:.1f}x faster)"
    )
    print(
        f"ps -a through the machine:         {figures['ps_through_machine_s']:.2f} s  vs cgctl --version "
        f"{figures['cli_start_up_s']:.2f} s on the host"
    )
    print("BENCH_JSON " + json.dumps(figures))


if __name__ == "__main__":
    main()
