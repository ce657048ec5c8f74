"""The limit options `cgctl run` and `cgctl update` share, and the spec fields they feed.

Each option is a row of cgctl.limits.LIMITS: `limit_options` gives a command one parameter per
row and hands it the spec's `limits` fields of those given. A value left out is None and means
"not given", so `run` falls back on the spec's defaults and `update` leaves that limit as it is.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer

from cgctl.cli.errors import fail
from cgctl.limits import LIMITS, Limit, key_values

Command = TypeVar("Command", bound=Callable[..., Any])
LIMIT_FIELDS = "limit_fields"  # the parameter of a command that `limit_options` hands the fields in

# Which option fed each spec field (under "limits"), so that errors speak the user's language.
OPTION_FOR_FIELD: dict[tuple[str | int, ...], str] = {limit.field: limit.name for limit in LIMITS}


def repeated(help: str) -> typer.models.OptionInfo:
    return typer.Option(help=f"{help} (repeatable)", show_default=False)


def _parameter(limit: Limit) -> inspect.Parameter:
    if limit.kind == "flag":
        option: Any = Annotated[bool | None, typer.Option(limit.option, help=limit.help, show_default=False)]
    elif limit.kind == "value":
        option = Annotated[str | None, typer.Option(limit.option, help=limit.help, show_default=False)]
    else:
        option = Annotated[list[str] | None, typer.Option(limit.option, help=f"{limit.help} (repeatable)")]
    return inspect.Parameter(limit.parameter, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=option)


def limit_options(command: Command) -> Command:
    """A command with an option per limit in place of its `limit_fields` parameter, which it is
    called with: the spec's `limits` fields of the options given."""
    signature = inspect.signature(command, eval_str=True)
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        if parameter.name == LIMIT_FIELDS:
            parameters += map(_parameter, LIMITS)
        else:
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

    @functools.wraps(command)
    def with_limits(**options: Any) -> Any:
        given = {limit: options.pop(limit.parameter) for limit in LIMITS}
        return command(**options, **{LIMIT_FIELDS: limit_fields(given)})

    with_limits.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return with_limits  # type: ignore[return-value]


def limit_fields(given: dict[Limit, Any]) -> dict[str, dict[str, Any]]:
    """The spec's `limits` fields for the options given; the ones not given are left out."""
    sections: dict[str, dict[str, Any]] = {}
    for limit, value in given.items():
        section = sections.setdefault(limit.field[0], {})
        if limit.kind == "map":
            try:
                section.update(limit.parse(value or []) if limit.parse else {})
            except ValueError as error:
                raise _invalid(limit.name, error) from None
        elif value is not None:
            section[limit.field[1]] = value
    return sections


def pairs(option: str, values: list[str] | None) -> dict[str, str]:
    """KEY=VALUE options (--label) as a dict."""
    try:
        return key_values("=", "KEY=VALUE")(values or [])
    except ValueError as error:
        raise _invalid(option, error) from None


def _invalid(option: str, error: ValueError) -> typer.Exit:
    value, reason = error.args
    return fail(f"invalid value {value!r} for {option}: {reason}")
