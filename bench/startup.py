"""How long does each `cgctl` verb take to start, against the interpreter starting and doing nothing?

Why: cgctl is a CLI a user types and scripts call in loops, so a verb that reads one directory
should not cost many times what Python itself costs to start. Each verb is timed end to end as a
new user runs it: the console script `cgctl` next to the interpreter (what `pip install` puts on
PATH, site and the editable-install finder included), with its bytecode caches written (by the
warm-up rounds, as by a user's first run), a private empty state directory, image store, policy
directory and machine directory, CGCTL_HOST unset and no daemon to talk to. The floor
is `python -c pass` with the interpreter the console script starts; each ratio is a verb's median
over the floor's median measured in the same run, the verbs taking turns round by round, so a
change in the machine's load weighs on all of them alike. The goal (issue #15) is at most 3x the
floor for `run`, `ps` and `stats --no-stream`. `stats --no-stream` samples twice, --interval (1 s)
apart, when a container runs; with none (as here) it answers at once.

How: .venv/bin/python bench/startup.py [--runs N]. It needs no root and no cgroup v2: where the
host lacks cgroup v2, `run` stops at its cgroup check with status 125, the path a new user hits
there, and is timed all the same; every verb's exit statuses are reported. A verb that dies with a
traceback aborts the benchmark, and so does a daemon answering at a socket cgctl would pick up (the
system one cannot be moved). The last line is `BENCH_JSON {...}` for machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from figures import p90, positive_int

from cgctl.runtime.interface import answers, default_sockets

CGCTL_CLI = Path(sys.executable).parent / "cgctl"
FLOOR = "python -c pass"
VERBS: dict[str, list[str]] = {
    "cgctl --help": ["--help"],
    "cgctl --version": ["--version"],
    "cgctl run --mem 256M -- true": ["run", "--mem", "256M", "--", "true"],
    "cgctl ps": ["ps"],
    "cgctl ps --json": ["ps", "--json"],
    "cgctl stats --no-stream": ["stats", "--no-stream"],
    "cgctl image ls": ["image", "ls"],
}
GOAL_VERBS = ("cgctl run --mem 256M -- true", "cgctl ps", "cgctl stats --no-stream")
GOAL_RATIO = 3.0
WARMUP_ROUNDS = 2


@dataclass
class Samples:
    seconds: list[float] = field(default_factory=list)
    statuses: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class Result:
    name: str
    exit_statuses: list[int]
    median_ms: float
    p90_ms: float
    ratio_to_floor: float
    goal_met: bool | None  # None: not a goal verb


def interpreter(script: Path) -> str:
    """The interpreter on the console script's #! line: the floor must start the same one."""
    first = script.read_text().splitlines()[0]
    if not first.startswith("#!"):
        raise RuntimeError(f"{script} has no #! line")
    return first.removeprefix("#!").strip()


def use_private_environment(workdir: Path) -> None:
    """Give this process and the verbs it starts private, empty cgctl directories and no daemon to find."""
    # PYTHONDONTWRITEBYTECODE would have every run compile cgctl anew: a user's first run writes the
    # bytecode caches (here the warm-ups do), and pip's install compiles them.
    for variable in ("CGCTL_HOST", "CGCTL_TOKEN_FILE", "PYTHONDONTWRITEBYTECODE"):
        os.environ.pop(variable, None)
    for variable, name in (
        ("CGCTL_STATE_DIR", "state"),
        ("CGCTL_IMAGE_STORE", "images"),
        ("CGCTL_POLICY_DIR", "policies.d"),
        ("CGCTL_MACHINE_DIR", "machine"),
        ("XDG_RUNTIME_DIR", "runtime"),  # where a rootless daemon's socket would be
    ):
        os.environ[variable] = str(workdir / name)
    (workdir / "state").mkdir()
    found = [path for path in default_sockets() if answers(path)]
    if found:  # the system socket cannot be moved
        raise RuntimeError(f"a cgctl daemon answers at {found[0]}: stop it, or the verbs would go through it")


def time_run(argv: list[str]) -> tuple[float, int]:
    """Seconds for one run and its exit status; a traceback on stderr raises."""
    started = time.perf_counter()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if "Traceback (most recent call last)" in done.stderr:
        raise RuntimeError(f"{shlex.join(argv)} crashed with status {done.returncode}:\n{done.stderr}")
    return elapsed, done.returncode


def time_rounds(commands: dict[str, list[str]], runs: int) -> dict[str, Samples]:
    """Each command's runs, interleaved round by round so that drifts in load hit them all alike."""
    for _ in range(WARMUP_ROUNDS):
        for argv in commands.values():
            time_run(argv)
    samples = {name: Samples() for name in commands}
    for _ in range(runs):
        for name, argv in commands.items():
            seconds, status = time_run(argv)
            samples[name].seconds.append(seconds)
            samples[name].statuses.add(status)
    return samples


def summarize(samples: dict[str, Samples]) -> list[Result]:
    """Milliseconds per command, the floor's median the ratios' denominator."""
    floor = statistics.median(samples[FLOOR].seconds)
    results = []
    for name, sample in samples.items():
        median = statistics.median(sample.seconds)
        ratio = median / floor
        results.append(
            Result(
                name,
                sorted(sample.statuses),
                median * 1e3,
                p90(sample.seconds) * 1e3,
                ratio,
                ratio <= GOAL_RATIO if name in GOAL_VERBS else None,
            )
        )
    return results


def report(results: list[Result], floor_argv: list[str], runs: int) -> None:
    print(
        f"start-up of the console script {CGCTL_CLI} against {shlex.join(floor_argv)} "
        f"(Python {platform.python_version()})"
    )
    print(
        f"{runs} runs each after {WARMUP_ROUNDS} warm-up rounds, interleaved; private empty state, no daemon"
    )
    width = max(len(result.name) for result in results) + 2
    print(
        f"{'command':<{width}}{'exit':>6}{'median ms':>11}{'p90 ms':>9}{'x floor':>9}  goal <={GOAL_RATIO:g}x"
    )
    for result in results:
        goal = "" if result.goal_met is None else "met" if result.goal_met else "MISSED"
        statuses = ",".join(map(str, result.exit_statuses))
        print(
            f"{result.name:<{width}}{statuses:>6}{result.median_ms:>11.1f}{result.p90_ms:>9.1f}"
            f"{result.ratio_to_floor:>9.2f}  {goal}"
        )
    summary = {
        "python": platform.python_version(),
        "cli": str(CGCTL_CLI),
        "floor": shlex.join(floor_argv),
        "goal_ratio": GOAL_RATIO,
        "runs": runs,
        "warmup_rounds": WARMUP_ROUNDS,
        "results": [asdict(result) for result in results],
    }
    print("BENCH_JSON " + json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=positive_int, default=20, help="timed runs per command (default 20)")
    args = parser.parse_args()
    floor_argv = [interpreter(CGCTL_CLI), "-c", "pass"]
    commands = {FLOOR: floor_argv, **{name: [str(CGCTL_CLI), *argv] for name, argv in VERBS.items()}}
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as workdir:
        use_private_environment(Path(workdir))
        samples = time_rounds(commands, args.runs)
    report(summarize(samples), floor_argv, args.runs)


if __name__ == "__main__":
    main()
