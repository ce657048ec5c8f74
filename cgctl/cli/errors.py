"""How the CLI reports cgctl's own errors: one line on stderr, exit status 125."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # imported by the verbs that need them: `cgctl --help` stays light
    from pydantic import ValidationError

    from cgctl.spec import SpecError

EXIT_CGCTL_ERROR = 125


def fail(message: str) -> typer.Exit:
    """Print a cgctl error; return the Exit to raise (status 125: nothing was started)."""
    print(f"cgctl: {message}", file=sys.stderr)
    return typer.Exit(EXIT_CGCTL_ERROR)


def option_for(location: tuple[str | int, ...], options: dict[tuple[str | int, ...], str]) -> str:
    """The option that fed a spec field (the most specific one), or the field's dotted path if none did."""
    fed = [loc for loc in options if location[: len(loc)] == loc]
    return options[max(fed, key=len)] if fed else ".".join(map(str, location))


def invalid_value(error: SpecError, options: dict[tuple[str | int, ...], str]) -> typer.Exit:
    """Report a value the host refused (a missing device, an unknown file) by its option."""
    return fail(f"invalid value {error.value!r} for {option_for(error.field, options)}: {error.reason}")


def invalid_options(error: ValidationError, options: dict[tuple[str | int, ...], str]) -> typer.Exit:
    """Report a spec validation error in terms of the command-line options that fed each field."""
    lines = []
    for detail in error.errors():
        option = option_for(tuple(detail["loc"]), options)
        given = detail.get("input")
        reason = detail["msg"].removeprefix("Value error, ")
        if not option:  # a rule across options (the whole spec's)
            lines.append(reason)
        elif isinstance(given, str | int):
            lines.append(f"invalid value {given!r} for {option}: {reason}")
        else:
            lines.append(f"invalid {option}: {reason}")
    return fail("\ncgctl: ".join(lines))


def require_terminal(interactive: bool, verb: str) -> None:
    """-t attaches the caller's terminal: refuse it, as docker does, when there is none to attach
    (with -i the keys come from stdin, which must be one; without, the output goes to stdout)."""
    import os

    fd, which = (0, "input") if interactive else (1, "output")
    if not os.isatty(fd):
        raise fail(
            f"-t: the {which} device is not a terminal ({'stdin' if fd == 0 else 'stdout'} is redirected): "
            f"drop -t, or run cgctl {verb} -t from a terminal"
        )


def detach_keys(text: str | None) -> bytes:
    """--detach-keys's value as bytes (None: docker's ctrl-p,ctrl-q), or exit 125 naming it."""
    from cgctl.runtime.terminal import DEFAULT_DETACH_KEYS, DetachKeysError, parse_detach_keys

    text = DEFAULT_DETACH_KEYS if text is None else text
    try:
        return parse_detach_keys(text)
    except DetachKeysError as error:
        raise fail(f"invalid value {text!r} for --detach-keys: {error}") from None
