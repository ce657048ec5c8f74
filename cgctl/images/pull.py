"""`cgctl pull`: an image from a registry, through the same verify-and-unpack path as `image import`.

The manifest is fetched by tag or digest (an image index leads to this
machine's platform), checked against the digest asked for, and the config
against the manifest's. Layers the store lacks are streamed straight from the
registry into importer.py, a few at a time, each resumed from its kept bytes
if an earlier pull was interrupted; layers (and a config) already in the store
are not fetched at all, so pulling an image again fetches its manifest only.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cgctl.images import reference as references
from cgctl.images.importer import Progress, store_image
from cgctl.images.registry import Client, Options, RegistryError
from cgctl.images.source import (
    DIGEST,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    MANIFEST_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    ImageError,
    Layer,
    check_digest,
    choose_manifest,
    diff_ids,
    parse_json,
    sha256_digest,
)
from cgctl.images.store import Store

PARALLEL = 3  # layers fetched at once, as docker does


def pull(
    text: str, store: Store, options: Options, progress: Progress | None = None, parallel: int = PARALLEL
) -> dict[str, Any]:
    """Pull the image `text` names into the store; returns its record. ValueError (a bad reference),
    RegistryError, ImageError or LayerError; the store is then as it was (but for the kept bytes of
    an interrupted layer)."""
    reference = references.parse(text)
    with Client(reference, options) as client:
        image, digest = _resolve(client, reference, store)
        extra = {"source": str(reference), "digest": digest, "registry": reference.registry,
                 "repository": reference.repository}  # fmt: skip
        return store_image(image, reference.name, reference.store_tag, store, extra, progress, parallel)


def fetch(text: str, directory: Path, options: Options, progress: Progress | None = None) -> tuple[str, str]:
    """Fetch the image `text` names into an OCI image layout at directory, for a store this process
    cannot write (a machine's, which imports the layout): the manifest and config checked as `pull`
    checks them, each layer hashed against its digest as it arrives and kept as `.partial-HEX` until
    it matches, so that an interrupted fetch resumes with `Range`. Returns (NAME:TAG to import it
    as, the manifest's digest). ValueError, RegistryError or ImageError."""
    reference = references.parse(text)
    layout = Store(directory)
    with Client(reference, options) as client:
        image, digest = _resolve(client, reference, layout)
        total, done = sum(layer.size for layer in image.layers), 0
        for layer in image.layers:
            _fetch_blob(layout, layer)
            done += layer.size
            if progress is not None:
                progress(done, total)
    manifest = sha256_digest(image.manifest)
    for data in (image.config_bytes, image.manifest):
        _write(layout.blob(sha256_digest(data)), data)
    media_type = DOCKER_MANIFEST if image.format == "docker" else OCI_MANIFEST
    index = {"schemaVersion": 2, "manifests": [
        {"mediaType": media_type, "digest": manifest, "size": len(image.manifest)}
    ]}  # fmt: skip
    _write(directory / "index.json", json.dumps(index).encode())
    _write(directory / "oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
    return f"{reference.name}:{reference.store_tag}", digest


def _fetch_blob(layout: Store, layer: Layer) -> None:
    """The layer's blob in the layout, from what is kept of it on: ImageError (and the kept bytes
    dropped) if the whole does not hash to its digest."""
    if layout.blob(layer.digest).exists():
        return  # renamed into place only once it matched
    partial = layout.partial_blob(layer.digest)
    hashed = hashlib.sha256()
    with open(partial, "ab+") as out:
        out.seek(0)
        while chunk := out.read(1 << 20):
            hashed.update(chunk)
        if not layer.size or out.tell() < layer.size:
            with layer.open(out.tell()) as source:
                while chunk := source.read(1 << 20):
                    out.write(chunk)
                    hashed.update(chunk)
        out.flush()
        os.fsync(out.fileno())
    if f"sha256:{hashed.hexdigest()}" != layer.digest:
        partial.unlink()
        raise ImageError(f"{layer.digest}: the registry's bytes do not match the layer's digest")
    partial.rename(layout.blob(layer.digest))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _resolve(client: Client, reference: references.Reference, store: Store) -> tuple[Image, str]:
    """The image for this machine and its manifest's digest (its config from the store if kept there)."""
    data, media_type = client.manifest(reference.digest or reference.tag or "latest")
    digest = sha256_digest(data)
    if reference.digest:
        check_digest(str(reference), data, reference.digest)
    if media_type in (OCI_INDEX, DOCKER_LIST) or (not media_type and b'"manifests"' in data):

        def read_index(descriptor: dict[str, Any]) -> dict[str, Any]:
            nested, _ = client.manifest(descriptor["digest"])
            check_digest(descriptor["digest"], nested, descriptor["digest"])
            return dict(parse_json(descriptor["digest"], nested))

        chosen = choose_manifest(str(reference), parse_json(str(reference), data), read_index)
        data, media_type = client.manifest(_checked(chosen.get("digest"), reference))
        check_digest(f"{reference} ({chosen['digest']})", data, chosen["digest"])
        digest = chosen["digest"]
    manifest = parse_json(str(reference), data)
    media_type = media_type or manifest.get("mediaType", "")
    if media_type not in MANIFEST_TYPES or not isinstance(manifest.get("layers"), list):
        raise ImageError(f"{reference}: the registry sent a {media_type or 'manifest'} cgctl cannot run "
                         "(image manifests of OCI or docker v2 schema 2 only)")  # fmt: skip
    config_digest = _checked((manifest.get("config") or {}).get("digest"), reference)
    kept = store.blob(config_digest)
    config_bytes = kept.read_bytes() if kept.exists() else b""
    if sha256_digest(config_bytes) != config_digest:  # not kept (or not intact): the registry's
        config_bytes = client.blob_bytes(config_digest)
    check_digest(f"{reference}'s config", config_bytes, config_digest)
    config = parse_json(config_digest, config_bytes)
    layers = []
    for blob, diff_id in zip(manifest["layers"], diff_ids(config, len(manifest["layers"])), strict=True):
        blob_digest = _checked(blob.get("digest"), reference)
        layers.append(Layer(diff_id, blob_digest, int(blob.get("size", 0)), _opener(client, blob_digest)))
    kind = "docker" if "docker" in media_type else "oci"
    return Image(kind, config, config_bytes, data, layers), digest


def _opener(client: Client, digest: str) -> Any:
    return lambda offset: client.open_blob(digest, offset)


def _checked(digest: object, reference: references.Reference) -> str:
    """A digest from the registry's JSON, checked before it names a URL or a file in the store."""
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise ImageError(f"{reference}: the registry's manifest names {digest!r}, not a sha256 digest")
    return digest


__all__ = ["RegistryError", "fetch", "pull"]
