"""What the benchmarks here share besides the cgroup2 check: how a run's samples are summarised and
how a count is read from the command line."""

from __future__ import annotations

import argparse
import math


def p90(samples: list[float]) -> float:
    """Nearest-rank 90th percentile."""
    return sorted(samples)[math.ceil(0.9 * len(samples)) - 1]


def positive_int(text: str) -> int:
    """argparse's type for a count (of runs, of containers...)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive number")
    return value
