"""The `cgctl` command: a thin typer layer over the library, one module per verb group.

Every cgctl error, usage errors included, exits 125 (as docker does) so that
the workload's own exit codes stay unambiguous.

A verb's module is imported, and its command built, only when the verb runs or help lists it:
`cgctl ps` does not pay for `run`'s options or the daemon's imports (bench/startup.py times it).
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Annotated

import typer
import typer.main
from typer.core import TyperGroup

from cgctl.cli import connection
from cgctl.cli.errors import EXIT_CGCTL_ERROR

if TYPE_CHECKING:  # the click that typer vendors, whose types TyperGroup's methods take and return
    from typer._click import Command, Context

# Each verb, in `cgctl --help`'s order, and the module of cgctl.cli whose register() defines it.
VERBS: dict[str, str] = {
    **dict.fromkeys(("run", "attach"), "run"),
    "exec": "exec",
    **dict.fromkeys(("ps", "inspect", "logs", "wait", "rm", "events"), "containers"),
    "stats": "stats",
    "top": "top",
    **dict.fromkeys(("freeze", "thaw", "pause", "unpause", "kill", "update"), "control"),
    **dict.fromkeys(("checkpoint", "restore"), "checkpoint"),
    "commit": "image",
    **dict.fromkeys(("pull", "push", "login", "logout"), "registry"),
    "exporter": "exporter",
    "check": "check",
    **dict.fromkeys(("daemon", "dial-stdio"), "daemon"),
    "image": "image",
    "machine": "machine",
    "policy": "policy",
}


class LazyVerbs(TyperGroup):
    """The root command. A verb's module is imported, and its commands built (by typer, from its
    register() as ever), when one of them is first looked up: to run it, or to list it in help."""

    def list_commands(self, ctx: Context) -> list[str]:
        return list(VERBS)

    def get_command(self, ctx: Context, cmd_name: str) -> Command | None:
        if cmd_name in VERBS and cmd_name not in self.commands:
            verbs = typer.Typer()
            importlib.import_module(f"cgctl.cli.{VERBS[cmd_name]}").register(verbs)
            self.commands.update(typer.main.get_group(verbs).commands)
        return self.commands.get(cmd_name)

    def resolve_command(self, ctx: Context, args: list[str]) -> tuple[str | None, Command | None, list[str]]:
        if args and args[0] not in VERBS:  # a typo: typer suggests the verbs close to it in self.commands
            for name in VERBS:
                self.get_command(ctx, name)
        return super().resolve_command(ctx, args)


app = typer.Typer(name="cgctl", cls=LazyVerbs, add_completion=False, pretty_exceptions_enable=False)


def _print_version(wanted: bool) -> None:
    if wanted:
        from cgctl import __version__

        print(f"cgctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print the version and exit"),
    ] = False,
    host: Annotated[
        str | None,
        typer.Option(
            "--host",
            "-H",
            envvar="CGCTL_HOST",
            help="the daemon: unix:///PATH, or ssh://USER@HOST:PORT/SOCKET (USER, PORT and SOCKET optional); "
            "default: the local daemon's socket if one answers, else none",
        ),
    ] = None,
) -> None:
    """Run workloads in their own cgroup v2 with memory, CPU, IO and pids limits."""
    connection.host = host


def main() -> None:
    try:
        code = app(args=sys.argv[1:] or ["--help"], prog_name="cgctl", standalone_mode=False)
    except typer.TyperException as error:  # usage errors: bad option, missing value, ...
        show = getattr(error, "show", None)
        if show:
            show()
        else:
            print(f"cgctl: {error.format_message()}", file=sys.stderr)
        code = EXIT_CGCTL_ERROR
    except typer.Abort:
        code = EXIT_CGCTL_ERROR
    except typer.Exit as error:
        code = error.exit_code
    sys.exit(code or 0)
