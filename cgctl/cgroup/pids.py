"""The pids controller: pids.max."""

from __future__ import annotations

from cgctl.spec import PidsLimits

CONTROLLER = "pids"


def settings(limits: PidsLimits) -> list[tuple[str, str]]:
    return [] if limits.max is None else [("pids.max", str(limits.max))]
