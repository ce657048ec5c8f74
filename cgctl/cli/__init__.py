"""The `cgctl` command: a thin typer layer over the library, one module per verb group.

Every cgctl error, usage errors included, exits 125 (as docker does) so that
the workload's own exit codes stay unambiguous.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from cgctl.cli import check as check_verb
from cgctl.cli import checkpoint as checkpoint_verbs
from cgctl.cli import connection
from cgctl.cli import containers as container_verbs
from cgctl.cli import control as control_verbs
from cgctl.cli import daemon as daemon_verbs
from cgctl.cli import exporter as exporter_verb
from cgctl.cli import image as image_verbs
from cgctl.cli import machine as machine_verbs
from cgctl.cli import policy as policy_verbs
from cgctl.cli import registry as registry_verbs
from cgctl.cli import run as run_verb
from cgctl.cli import stats as stats_verb
from cgctl.cli.errors import EXIT_CGCTL_ERROR

app = typer.Typer(name="cgctl", add_completion=False, pretty_exceptions_enable=False)
run_verb.register(app)
container_verbs.register(app)
stats_verb.register(app)
control_verbs.register(app)
checkpoint_verbs.register(app)
image_verbs.register(app)
registry_verbs.register(app)
exporter_verb.register(app)
check_verb.register(app)
daemon_verbs.register(app)
machine_verbs.register(app)
policy_verbs.register(app)


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
