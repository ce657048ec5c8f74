"""`cgctl image import|ls|rm|inspect`: the image store; the daemon's (through its API) when the verbs
act through one (--host, a `cgctl machine`, a local daemon) and no --store is given."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli import connection
from cgctl.cli.errors import fail
from cgctl.cli.table import render_table

if TYPE_CHECKING:  # the verbs import what they use: `cgctl --help` stays light
    from cgctl.images.importer import Progress

StoreDir = Annotated[
    Path | None, typer.Option("--store", envvar="CGCTL_IMAGE_STORE", help="the image store directory")
]
Reference = Annotated[str, typer.Argument(help="NAME[:TAG] (default tag: latest)")]
StateDir = Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")]

app = typer.Typer(help="Import, save, list, inspect and remove images (OCI layouts, docker save archives).")


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="image")
    parent.command()(commit)


@app.command("import")
def import_(
    archive: Annotated[
        Path, typer.Argument(help="an OCI image layout (directory or tar) or a docker save tar")
    ],
    reference: Reference,
    store: StoreDir = None,
) -> None:
    """Verify and unpack an image's layers into the store (each layer once), and record it as NAME[:TAG]."""
    from cgctl.spec import format_size

    started = time.monotonic()
    chosen = connection.runtime(store=store)
    if chosen.host:
        print(f"cgctl: importing {archive} through the daemon at {chosen.host}", file=sys.stderr)
    try:
        with progress_bar() as progress:
            record = chosen.import_image(str(archive), reference, progress)
    except connection.Failure as error:
        raise connection.failed(error) from None
    seconds = time.monotonic() - started
    print(
        f"{record['name']}:{record['tag']}: imported {len(record['layers'])} layer(s), "
        f"{format_size(record['size'])}, in {seconds:.1f} s ({record['id'][:19]})"
    )


@app.command("ls")
def list_(
    store: StoreDir = None,
    json_output: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """List the images in the store."""
    from cgctl.spec import format_size

    try:
        images = connection.runtime(store=store).images()
    except connection.Failure as error:
        raise connection.failed(error) from None
    if json_output:
        print(json.dumps(images))
        return
    rows = [("IMAGE", "ID", "LAYERS", "SIZE")]
    rows += [
        (f"{i['name']}:{i['tag']}", i["id"].removeprefix("sha256:")[:12], str(len(i["layers"])),
         format_size(i["size"]))
        for i in images
    ]  # fmt: skip
    print(render_table(rows))


@app.command()
def inspect(reference: Reference, store: StoreDir = None) -> None:
    """Print an image's record: its layers and its config (Env, Cmd, Entrypoint, WorkingDir, User)."""
    try:
        record = connection.runtime(store=store).inspect_image(reference)
    except connection.Failure as error:
        raise connection.failed(error) from None
    print(json.dumps(record, indent=2))


@app.command()
def rm(reference: Reference, store: StoreDir = None, state_dir: StateDir = None) -> None:
    """Remove an image, and the layers no other image uses; refused while a container runs it."""
    from cgctl.images import parse_reference

    try:
        name, tag = parse_reference(reference)
    except ValueError as error:
        raise fail(str(error)) from None
    try:
        removed = connection.runtime(state_dir, store).remove_image(reference)
    except connection.Failure as error:
        raise connection.failed(error) from None
    print(f"{name}:{tag}: removed, with {len(removed)} layer(s) no other image uses")


@app.command()
def save(
    reference: Reference,
    archive: Annotated[Path, typer.Argument(help="the OCI layout tar to write")],
    store: StoreDir = None,
) -> None:
    """Write an image as an OCI image layout tar (`image import`, `skopeo copy oci-archive:`, `podman load`
    read it back): its blobs as stored, so its digest stays."""
    from cgctl.spec import format_size

    chosen = connection.runtime(store=store)
    try:
        with progress_bar() as progress:
            size = int(chosen.save_image(reference, str(archive), progress)["size"])
    except connection.Failure as error:
        raise connection.failed(error) from None
    print(f"{reference}: saved to {archive} ({format_size(size)})")


def commit(
    name: Annotated[str, typer.Argument(help="the container")],
    reference: Annotated[str, typer.Argument(help="the new image, NAME[:TAG]")],
    message: Annotated[str, typer.Option("--message", "-m", help="the comment of its history entry")] = "",
) -> None:
    """Make a container's writes a new layer on top of its image, recorded as NAME[:TAG] (the container
    needs --upper DIR; a running one is frozen for the moment of the copy)."""
    from cgctl.spec import format_size

    try:
        record = connection.runtime().commit(name, reference, message)
    except connection.Failure as error:
        raise connection.failed(error) from None
    except (LookupError, ValueError, OSError) as error:
        raise fail(f"{name}: not committed: {error}") from None
    print(
        f"{record['name']}:{record['tag']}: {name}'s writes as layer {len(record['layers'])}, "
        f"{format_size(record['size'])} in all ({record['id'][:19]})"
    )


@contextlib.contextmanager
def progress_bar() -> Iterator[Progress | None]:
    """A bar redrawn on stderr while the block runs if it is a terminal (nothing otherwise), cleared
    when the block ends, before an error is told."""
    if not sys.stderr.isatty():
        yield None
        return

    def show(done: int, total: int) -> None:
        from cgctl.spec import format_size

        share = done / total if total else 1.0
        bar = "#" * int(share * 30)
        print(f"\r[{bar:<30}] {share:4.0%} {format_size(done)}\033[K", end="", file=sys.stderr, flush=True)

    try:
        yield show
    finally:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
