"""`cgctl exec [OPTIONS] NAME -- CMD [ARGS...]`: run one more process in a running container."""

from __future__ import annotations

from typing import Annotated

import typer

from cgctl.cli import connection, errors
from cgctl.cli.errors import fail, invalid_options
from cgctl.cli.process import DetachKeys, environment

# Which option fed each ExecSpec field, so that errors speak the user's language.
OPTION_FOR_FIELD: dict[tuple[str | int, ...], str] = {
    ("command",): "CMD",
    ("env",): "--env",
    ("user",): "--user",
    ("workdir",): "--workdir",
}


def register(app: typer.Typer) -> None:
    app.command("exec", context_settings={"allow_interspersed_args": False})(exec_)


def exec_(
    name: Annotated[str, typer.Argument(help="a running container", show_default=False)],
    command: Annotated[
        list[str] | None, typer.Argument(help="the process: -- CMD [ARGS...]", show_default=False)
    ] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="keep stdin open")] = False,
    tty: Annotated[
        bool,
        typer.Option("--tty", "-t", help="a terminal of its own, attached to yours (raw mode with -i)"),
    ] = False,
    user: Annotated[
        str | None,
        typer.Option("--user", "-u", help="USER[:GROUP] to run as (default: the container's)"),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            "-e",
            help="K=V over the container's environment; a bare K passes yours on (repeatable)",
            show_default=False,
        ),
    ] = None,
    workdir: Annotated[
        str | None,
        typer.Option("--workdir", "-w", help="working directory (default: the container's, else /)"),
    ] = None,
    privileged: Annotated[
        bool, typer.Option(help="allowed only in a container started with --privileged (whose it is then)")
    ] = False,
    detach_keys: DetachKeys = None,
) -> None:
    """Run CMD in a running container: in its cgroup (counted against its limits), its namespaces, its
    root, as its user and in its sandbox (the same capabilities, no_new_privs and seccomp filter).

    Exits with CMD's status; 125: cgctl error (nothing started); 126: not executable;
    127: not found; 128+N: killed by signal N.
    """
    from pydantic import ValidationError

    from cgctl.spec import ExecSpec

    keys = errors.detach_keys(detach_keys)
    if command and command[0] == "--":  # options end at NAME, so click keeps the `--` that follows it
        command = command[1:]
    if not command:
        raise fail(f"no command given: cgctl exec [OPTIONS] {name} -- CMD [ARGS...]")
    if tty:
        errors.require_terminal(interactive, "exec")
    fields = {
        "command": command,
        "env": environment(env or []),
        "user": user,
        "workdir": workdir,
        "tty": tty,
        "interactive": interactive,
        "privileged": privileged,
    }
    try:
        spec = ExecSpec.model_validate(fields)
    except ValidationError as error:
        raise invalid_options(error, OPTION_FOR_FIELD) from None
    try:
        status = connection.runtime().exec(name, spec, keys)
    except connection.Failure as error:
        raise connection.failed(error) from None
    raise typer.Exit(status)
