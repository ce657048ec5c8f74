"""`cgctl oci ...`: cgctl-oci's command line (cgctl/oci.py), passed through whole, for those who reach
everything through `cgctl`."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    app.command(
        "oci",
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
        add_help_option=False,
    )(oci)


def oci(ctx: typer.Context) -> None:
    """The OCI runtime with runc's command line (cgctl-oci): `cgctl oci --help`."""
    from cgctl.oci import main

    main(list(ctx.args))
