"""`cgctl pull`, `push`, `login`, `logout`: images from and to registries (the OCI distribution API).

Like `image import`, they act on the store of the runtime the verbs go through: a
daemon's (then the client's credentials for that registry travel in the request,
and the daemon's host does the fetching), or this host's.
"""

from __future__ import annotations

import getpass
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cgctl.cli import connection
from cgctl.cli.errors import fail
from cgctl.cli.image import StoreDir, progress_bar

if TYPE_CHECKING:
    from cgctl.images.importer import Progress
    from cgctl.images.registry import Options
    from cgctl.runtime.api import PullRequest
    from cgctl.runtime.interface import Runtime

TlsCa = Annotated[
    Path | None,
    typer.Option(
        "--tls-ca", envvar="CGCTL_TLS_CA", help="a PEM CA certificate to trust for the registry's TLS"
    ),
]
Insecure = Annotated[
    list[str] | None,
    typer.Option(
        "--insecure-registry",
        envvar="CGCTL_INSECURE_REGISTRIES",
        help="a registry (HOST[:PORT]) allowed plain HTTP; repeatable (loopback ones always are)",
    ),
]


def register(parent: typer.Typer) -> None:
    for verb in (pull, push, login, logout):
        parent.command()(verb)


def pull(
    reference: Annotated[
        str, typer.Argument(help="[REGISTRY/]NAME[:TAG][@sha256:DIGEST] (default registry docker.io)")
    ],
    store: StoreDir = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = None,
) -> None:
    """Pull an image from a registry: this machine's platform, layers verified as they stream in, the ones
    the store has not fetched again, an interrupted pull resumed."""
    from cgctl.runtime.api import PullRequest
    from cgctl.spec import format_size

    started = time.monotonic()
    chosen = connection.runtime(store=store)
    if chosen.host:
        print(f"cgctl: pulling {reference} through the daemon at {chosen.host}", file=sys.stderr)
    try:
        request = PullRequest(reference=reference, **_registry_fields(tls_ca, insecure, reference))
        with progress_bar() as progress:
            if connection.machine is not None:
                record = _pull_into_machine(connection.machine.share, chosen, request, progress)
            else:
                record = chosen.pull(request, progress)
    except connection.Failure as error:
        raise connection.failed(error) from None
    except ValueError as error:
        raise fail(f"invalid value {reference!r} for REFERENCE: {error}") from None
    size, seconds = format_size(record["size"]), time.monotonic() - started
    layers = len(record["layers"])
    print(
        f"{record['name']}:{record['tag']}: pulled {layers} layer(s), {size}, in {seconds:.1f} s "
        f"({record['digest']})"
    )


def _pull_into_machine(
    share: Path, machine: Runtime, request: PullRequest, progress: Progress | None
) -> dict[str, Any]:
    """A pull for a machine, whose guest reaches no registry (its network is restricted): fetched
    here into an OCI layout in the machine's read-write share (each layer checked against its digest,
    an interrupted fetch resumed from its kept bytes), then imported by the machine's daemon, which
    checks every digest again. The layout is kept for a resume until the import has been tried."""
    import hashlib
    import shutil

    from cgctl.images import ImageError
    from cgctl.images.pull import fetch
    from cgctl.images.registry import RegistryError
    from cgctl.runtime.local import registry_options

    directory = share / "pulls" / hashlib.sha256(request.reference.encode()).hexdigest()[:16]
    print(f"cgctl: pulling {request.reference} on this host for the machine", file=sys.stderr)
    try:
        name, digest = fetch(request.reference, directory, registry_options(request), progress)
    except RegistryError as error:
        raise fail(f"not pulled: {error}") from None
    except (ImageError, OSError) as error:
        raise fail(f"{request.reference}: not pulled: {error}") from None
    try:
        record = machine.import_image(str(directory), name)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return record | {"digest": digest, "source": request.reference}


def push(
    source: Annotated[str, typer.Argument(help="the image in the store, NAME[:TAG]")],
    destination: Annotated[
        str | None, typer.Argument(help="REGISTRY/NAME[:TAG] to push it to (default: SOURCE itself)")
    ] = None,
    store: StoreDir = None,
    tls_ca: TlsCa = None,
    insecure: Insecure = None,
) -> None:
    """Push an image to a registry: the blobs it lacks (mounted from the repository it came from when the
    registry has them), then the manifest, byte for byte. Pushing again sends nothing."""
    from cgctl.runtime.api import PushRequest

    target = destination or source
    chosen = connection.runtime(store=store)
    if chosen.host:
        print(f"cgctl: pushing {source} through the daemon at {chosen.host}", file=sys.stderr)
    try:
        fields = _registry_fields(tls_ca, insecure, target)
        with progress_bar() as progress:
            pushed = chosen.push(PushRequest(source=source, destination=destination, **fields), progress)
    except connection.Failure as error:
        raise connection.failed(error) from None
    except ValueError as error:
        raise fail(f"invalid value {target!r} for the image: {error}") from None
    print(
        f"{pushed.reference}: {pushed.digest} (blobs: {pushed.sent} sent, {pushed.mounted} mounted, "
        f"{pushed.present} already there)"
    )


def login(
    registry: Annotated[str, typer.Argument(help="HOST[:PORT] of the registry")] = "docker.io",
    username: Annotated[str | None, typer.Option("--username", "-u", help="default: asked for")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="read the password from stdin")
    ] = False,
    tls_ca: TlsCa = None,
    insecure: Insecure = None,
) -> None:
    """Check credentials against a registry and keep them (0600) for pull and push; the password is
    never shown."""
    from cgctl.images import auth
    from cgctl.images import reference as references
    from cgctl.images.registry import Client, Options, RegistryError

    if not references.DOMAIN.match(registry):
        raise fail(f"invalid value {registry!r} for REGISTRY: not HOST or HOST:PORT")
    if username is None:
        if not sys.stdin.isatty():
            raise fail("no --username, and stdin is not a terminal to ask on")
        username = input("Username: ")
    if password_stdin:
        password = sys.stdin.read().rstrip("\r\n")
    elif sys.stdin.isatty():
        password = getpass.getpass("Password: ")
    else:
        raise fail("stdin is not a terminal: give the password on it with --password-stdin")
    if not username or not password:
        raise fail("a user name and a password are both needed")
    options = _options(tls_ca, insecure)
    given = Options(options.tls_ca, options.insecure, lambda _: (username, password))
    try:
        with Client(references.Reference(registry, "login-check"), given, push=False) as client:
            client.check_login()
        path = auth.save(registry, username, password)
    except RegistryError as error:
        raise fail(f"login to {registry} failed: {error}") from None
    except (OSError, ValueError) as error:
        raise fail(f"login to {registry} succeeded, but the credentials could not be kept: {error}") from None
    print(f"Login Succeeded (credentials for {registry} in {path})")


def logout(
    registry: Annotated[str, typer.Argument(help="HOST[:PORT] of the registry")] = "docker.io",
) -> None:
    """Forget the credentials `cgctl login` kept for a registry."""
    from cgctl.images import auth

    try:
        removed = auth.remove(registry)
    except (OSError, ValueError) as error:
        raise fail(str(error)) from None
    print(f"Removed the credentials for {registry}" if removed else f"Not logged in to {registry}")


def _options(tls_ca: Path | None, insecure: list[str] | None) -> Options:
    from cgctl.images import auth
    from cgctl.images.registry import Options

    return Options(tls_ca=tls_ca, insecure=frozenset(_insecure(insecure)), credentials=auth.lookup)


def _insecure(given: list[str] | None) -> list[str]:
    """--insecure-registry values, with the comma-separated lists CGCTL_INSECURE_REGISTRIES gives."""
    return [domain.strip() for value in given or [] for domain in value.split(",") if domain.strip()]


def _registry_fields(tls_ca: Path | None, insecure: list[str] | None, text: str) -> dict[str, Any]:
    """A registry request's fields: the CA as an absolute path (a daemon's host, or a machine,
    shares this host's), the insecure registries, and this user's credentials for the registry text
    names, for a daemon to use on their behalf. ValueError for a malformed text."""
    from cgctl.images import auth
    from cgctl.images import reference as references
    from cgctl.runtime.api import RegistryAuth

    found = auth.lookup(references.parse(text).registry)
    return {
        "tls_ca": str(tls_ca.absolute()) if tls_ca else None,
        "insecure_registries": _insecure(insecure),
        "auth": RegistryAuth(username=found[0], password=found[1]) if found else None,  # type: ignore[arg-type]
    }
