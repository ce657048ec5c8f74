"""Options about the process itself that `run` and `exec` (and `attach`) share."""

from __future__ import annotations

import os
from typing import Annotated

import typer

DetachKeys = Annotated[
    str | None,
    typer.Option(
        help="through the daemon with -t: keys that leave the container running (ctrl-X or characters, "
        'comma-separated; "" for none) [default: ctrl-p,ctrl-q]',
        show_default=False,
    ),
]


def environment(values: list[str]) -> dict[str, str]:
    """--env's K=V sets; a bare K passes the caller's value on, as docker does."""
    env = {}
    for value in values:
        key, separator, content = value.partition("=")
        if separator:
            env[key] = content
        elif key in os.environ:
            env[key] = os.environ[key]
    return env
