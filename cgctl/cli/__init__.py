"""The `cgctl` command: a thin typer layer over the library, one module per verb group.

Every cgctl error, usage errors included, exits 125 (as docker does) so that
the workload's own exit codes stay unambiguous.

A verb's module is imported, and its command built, only when the verb runs (or a typo is matched):
`cgctl --help` lists the verbs from a table, and `cgctl ps` does not pay for `run`'s options or the
daemon's imports (bench/startup.py times it).
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
    from typer._click import Command, Context, HelpFormatter

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
    **dict.fromkeys(("network", "port"), "network"),
    "machine": "machine",
    "policy": "policy",
    "oci": "oci_verb",
}

# `cgctl --help`: every verb (dial-stdio, hidden, aside) in one group, as docker's help groups them, with
# one line each; the detail is in `cgctl VERB --help`. Kept here, not read from the verbs' modules, so
# that `cgctl --help` imports none of them (tests/unit/test_cli_help.py keeps it true to VERBS).
HELP_GROUPS: dict[str, dict[str, str]] = {
    "Containers": {
        "run": "Run a command in its own cgroup and namespaces, under limits",
        "exec": "Run one more command in a running container",
        "attach": "Attach your terminal to a running container",
        "ps": "List containers",
        "inspect": "Show everything known of containers",
        "logs": "Print a detached container's output",
        "wait": "Wait for containers to end; print their exit statuses",
        "top": "List a container's processes",
        "update": "Change a running container's limits",
        "freeze": "Freeze every process of a container",
        "thaw": "Let a frozen container run again",
        "pause": "Alias of freeze",
        "unpause": "Alias of thaw",
        "kill": "Signal every process of a container (default SIGKILL)",
        "rm": "Remove containers: their state and logs",
        "checkpoint": "Dump a container's process tree with CRIU",
        "restore": "Restore a checkpoint as a new container",
    },
    "Images and registries": {
        "image": "Import, save, list, inspect and remove images",
        "pull": "Pull an image from a registry",
        "push": "Push an image to a registry",
        "commit": "Make a container's writes a new image",
        "login": "Keep credentials for a registry",
        "logout": "Forget the credentials kept for a registry",
    },
    "Networks": {
        "network": "Create, list, inspect and remove networks",
        "port": "List a container's published ports",
    },
    "Daemon and machine": {
        "daemon": "Run the daemon: detached containers and the API",
        "events": "Stream the daemon's events",
        "machine": "A cgroup v2 VM running the daemon, for hosts without cgroup v2",
        "check": "Check that this host can run cgctl, and say what is missing",
        "oci": "runc's command line (cgctl-oci), for containerd and podman",
    },
    "Policies and metrics": {
        "policy": "Validate, preview, apply and explain policy files",
        "stats": "Show live CPU, memory, IO, pids and pressure of containers",
        "exporter": "Serve Prometheus metrics of containers or of every cgroup",
    },
}


class LazyVerbs(TyperGroup):
    """The root command. A verb's module is imported, and its commands built (by typer, from its
    register() as ever), when one of them is first looked up: to run it, or to match a typo against it."""

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        """Plain text in docker's layout: the verbs by group, then the options."""
        self.format_usage(ctx, formatter)
        self.format_help_text(ctx, formatter)
        self.format_commands(ctx, formatter)
        self.format_options(ctx, formatter)
        formatter.write_paragraph()
        formatter.write_text("Run 'cgctl COMMAND --help' for more information on a command.")

    def format_commands(self, ctx: Context, formatter: HelpFormatter) -> None:
        width = max(len(verb) for verbs in HELP_GROUPS.values() for verb in verbs)
        for group, verbs in HELP_GROUPS.items():
            with formatter.section(group):  # the one-line helps in one column across the groups
                formatter.write_dl(list(verbs.items()), col_spacing=2 + width - max(map(len, verbs)))

    def format_options(self, ctx: Context, formatter: HelpFormatter) -> None:
        records = [param.get_help_record(ctx) for param in self.get_params(ctx)]
        with formatter.section("Options"):
            formatter.write_dl([record for record in records if record])

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
