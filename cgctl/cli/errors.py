"""How the CLI reports cgctl's own errors: one line on stderr, exit status 125."""

from __future__ import annotations

import sys

import typer
from pydantic import ValidationError

EXIT_CGCTL_ERROR = 125


def fail(message: str) -> typer.Exit:
    """Print a cgctl error; return the Exit to raise (status 125: nothing was started)."""
    print(f"cgctl: {message}", file=sys.stderr)
    return typer.Exit(EXIT_CGCTL_ERROR)


def invalid_options(error: ValidationError, options: dict[tuple[str | int, ...], str]) -> typer.Exit:
    """Report a spec validation error in terms of the command-line options that fed each field."""
    lines = []
    for detail in error.errors():
        location = tuple(detail["loc"])
        option = next(
            (opt for loc, opt in options.items() if location[: len(loc)] == loc), ".".join(map(str, location))
        )
        given = detail.get("input")
        reason = detail["msg"].removeprefix("Value error, ")
        lines.append(
            f"invalid value {given!r} for {option}: {reason}"
            if isinstance(given, str | int)
            else f"invalid {option}: {reason}"
        )
    return fail("\ncgctl: ".join(lines))
