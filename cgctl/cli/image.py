"""`cgctl image import|ls|rm|inspect`: the image store; the daemon's (through its API) when the verbs
act through one (--host, a `cgctl machine`, a local daemon) and no --store is given."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli import connection
from cgctl.cli.errors import fail
from cgctl.cli.table import render_table

if TYPE_CHECKING:  # the verbs import what they use: `cgctl --help` stays light
    from cgctl.images import Store
    from cgctl.images.importer import Progress
    from cgctl.runtime.interface import Runtime

StoreDir = Annotated[
    Path | None, typer.Option("--store", envvar="CGCTL_IMAGE_STORE", help="the image store directory")
]
Reference = Annotated[str, typer.Argument(help="NAME[:TAG] (default tag: latest)")]
StateDir = Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")]

app = typer.Typer(help="Import, save, list, inspect and remove images (OCI layouts, docker save archives).")


def register(parent: typer.Typer) -> None:
    parent.add_typer(app, name="image")
    parent.command()(commit)


def store_at(root: Path | None) -> Store:
    from cgctl.images import Store, default_root

    return Store(root or default_root())


def daemon_for(store: Path | None) -> Runtime | None:
    """The runtime of the daemon whose store the verbs act on; None for this host's store (--store
    names one, or no daemon answers)."""
    if store is not None:
        return None
    chosen = connection.runtime()
    return chosen if chosen.host else None


@app.command("import")
def import_(
    archive: Annotated[
        Path, typer.Argument(help="an OCI image layout (directory or tar) or a docker save tar")
    ],
    reference: Reference,
    store: StoreDir = None,
) -> None:
    """Verify and unpack an image's layers into the store (each layer once), and record it as NAME[:TAG]."""
    from cgctl.images import ImageError, LayerError, import_image
    from cgctl.spec import format_size

    started = time.monotonic()
    if daemon := daemon_for(store):
        print(f"cgctl: importing {archive} through the daemon at {daemon.host}", file=sys.stderr)
        try:
            record = daemon.import_image(str(archive.absolute()), reference)
        except connection.Failure as error:
            raise connection.failed(error) from None
    else:
        try:
            record = import_image(archive, reference, store_at(store), progress_bar())
        except ValueError as error:
            raise fail(f"invalid value for NAME[:TAG]: {error}") from None
        except (ImageError, LayerError, OSError) as error:
            end_bar()
            raise fail(f"{archive}: not imported: {error}") from None
        end_bar()
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
        images = daemon.images() if (daemon := daemon_for(store)) else list(store_at(store).images())
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
    from cgctl.images import parse_reference

    try:
        if daemon := daemon_for(store):
            name, tag = parse_reference(reference)
            found = [i for i in daemon.images() if (i["name"], i["tag"]) == (name, tag)]
            if not found:
                raise LookupError(f"no image {name}:{tag} in the daemon's store at {daemon.host}")
            record = found[0]
        else:
            record = store_at(store).load(reference)
    except (LookupError, ValueError) as error:
        raise fail(str(error)) from None
    except connection.Failure as error:
        raise connection.failed(error) from None
    print(json.dumps(record, indent=2))


@app.command()
def rm(reference: Reference, store: StoreDir = None, state_dir: StateDir = None) -> None:
    """Remove an image, and the layers no other image uses; refused while a container runs it."""
    from cgctl import state
    from cgctl.images import parse_reference

    try:
        name, tag = parse_reference(reference)
        wanted = f"{name}:{tag}"
        if daemon := daemon_for(store):
            removed = daemon.remove_image(reference)
            print(f"{wanted}: removed, with {len(removed)} layer(s) no other image uses")
            return
        for path, _ in state.live_records(state_dir or state.default_state_dir()):
            with_image = ((state.read(path).get("spec") or {}).get("rootfs") or {}).get("image")
            if with_image == wanted:
                raise fail(f"{wanted} is in use by the running container {path.stem}: stop it first")
        removed = store_at(store).remove(reference)
    except (LookupError, ValueError) as error:
        raise fail(str(error)) from None
    except connection.Failure as error:
        raise connection.failed(error) from None
    print(f"{wanted}: removed, with {len(removed)} layer(s) no other image uses")


@app.command()
def save(
    reference: Reference,
    archive: Annotated[Path, typer.Argument(help="the OCI layout tar to write")],
    store: StoreDir = None,
) -> None:
    """Write an image as an OCI image layout tar (`image import`, `skopeo copy oci-archive:`, `podman load`
    read it back): its blobs as stored, so its digest stays."""
    from cgctl.images.save import save as save_image
    from cgctl.spec import format_size

    try:
        if daemon := daemon_for(store):
            size = int(daemon.save_image(reference, str(archive.absolute()))["size"])
        else:
            size = save_image(reference, store_at(store), archive, progress_bar())
    except connection.Failure as error:
        raise connection.failed(error) from None
    except (LookupError, ValueError, OSError) as error:
        end_bar()
        raise fail(f"{reference}: not saved to {archive}: {error}") from None
    end_bar()
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


def progress_bar() -> Progress | None:
    """A bar redrawn on stderr if it is a terminal; nothing otherwise."""
    if not sys.stderr.isatty():
        return None

    def show(done: int, total: int) -> None:
        from cgctl.spec import format_size

        share = done / total if total else 1.0
        bar = "#" * int(share * 30)
        print(f"\r[{bar:<30}] {share:4.0%} {format_size(done)}\033[K", end="", file=sys.stderr, flush=True)

    return show


def end_bar() -> None:
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)
