"""The pids controller: pids.max."""

from __future__ import annotations

from cgctl import limits as table
from cgctl.spec import PidsLimits

CONTROLLER = "pids"


def settings(limits: PidsLimits) -> list[tuple[str, str]]:
    return table.settings(CONTROLLER, dict(limits))
