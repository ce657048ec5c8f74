"""`cgctl push`: an image of the store into a registry, blobs first, then its manifest.

A blob the repository has is not sent again (so a second push sends nothing);
one that another repository of the same registry has (the one it was pulled
from) is mounted rather than uploaded; the rest go up in one PUT, or in
PATCHed chunks when large. The manifest is sent as stored, byte for byte, so
the image keeps its digest from registry to registry.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from cgctl.images import reference as references
from cgctl.images.importer import Progress
from cgctl.images.registry import Client, Options
from cgctl.images.source import OCI_MANIFEST
from cgctl.images.store import Store


@dataclass(frozen=True)
class Pushed:
    reference: str  # where it went
    digest: str  # its manifest's digest there
    sent: int  # blobs uploaded
    mounted: int  # blobs mounted from another repository
    present: int  # blobs the repository had


def push(
    source: str, destination: str | None, store: Store, options: Options, progress: Progress | None = None
) -> Pushed:
    """Push the store's image `source` to `destination` (default: the same name). ValueError,
    LookupError (no such image, or its blobs are not kept), RegistryError."""
    record = store.load(source)
    target = references.parse(destination or source)
    manifest_bytes = store.read_blob(record["manifest"])
    manifest = json.loads(manifest_bytes)
    descriptors = [manifest["config"], *manifest["layers"]]
    store.require_blobs([d["digest"] for d in descriptors])  # all of them here before anything is sent
    same_registry = record.get("registry") == target.registry
    mount_from = (
        record.get("repository") if same_registry and record.get("repository") != target.repository else None
    )
    total, done, counts = (
        sum(int(d.get("size", 0)) for d in descriptors),
        0,
        {"sent": 0, "mounted": 0, "present": 0},
    )

    def counted(read: Callable[[int], bytes]) -> Callable[[int], bytes]:
        def read_counting(size: int) -> bytes:
            nonlocal done
            data = read(size)
            done += len(data)
            if progress:
                progress(done, total)
            return data

        return read_counting

    with Client(target, options, push=True, mount_from=mount_from) as client:
        for descriptor in descriptors:
            digest, size = descriptor["digest"], int(descriptor["size"])
            if client.has_blob(digest):
                counts["present"] += 1
                continue
            location = client.start_upload(digest, mount_from)
            if location is None:
                counts["mounted"] += 1
                continue
            with open(store.blob(digest), "rb") as blob:
                client.upload(location, digest, size, counted(blob.read))
            counts["sent"] += 1
        media_type = manifest.get("mediaType") or OCI_MANIFEST
        digest = client.put_manifest(target.digest or target.tag or "latest", manifest_bytes, media_type)
    return Pushed(str(target), digest, **counts)
