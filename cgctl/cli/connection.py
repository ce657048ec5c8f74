"""Which runtime the verbs act through (cgctl.runtime.interface.connect): --host or CGCTL_HOST, else
a daemon answering at the default socket, else this host's run records (no daemon)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from cgctl.runtime.interface import Runtime
    from cgctl.runtime.models import Failure

host: str | None = None  # set by the root callback from --host


def runtime(state_dir: Path | None = None) -> Runtime:
    from cgctl.runtime.interface import connect
    from cgctl.runtime.models import Failure

    try:
        return connect(host, state_dir)
    except Failure as error:
        raise failed(error) from None


def failed(error: Failure) -> typer.Exit:
    """Print a runtime failure; return the Exit to raise (125, or 126/127 for a command that cannot run)."""
    print(f"cgctl: {error}", file=sys.stderr)
    return typer.Exit(error.exit_code)
