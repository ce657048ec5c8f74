"""`cgctl commit`: a container's writes (its overlayfs upper directory) as a new layer on its image.

The upper directory is packed into a tar (layer.pack: whiteouts and opaque
directories as image layers spell them), gzipped, and then imported like any
layer (importer.py), which unpacks it into the store and checks both digests:
the new image is the parent's layers plus this one, with a config whose
diff_ids and history say so and a manifest of the parent's flavour.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from cgctl.images import layer as layers
from cgctl.images.importer import store_image
from cgctl.images.source import DOCKER_MANIFEST, Image, Layer, parse_json, sha256_digest
from cgctl.images.store import Store, parse_reference

GZIP_LAYER = {"oci": "application/vnd.oci.image.layer.v1.tar+gzip",
              "docker": "application/vnd.docker.image.rootfs.diff.tar.gzip"}  # fmt: skip


class _Digesting:
    """A write-only stream that hashes and counts what passes through to `out`."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out, self.sha256, self.size = out, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()

    def digest(self) -> str:
        return f"sha256:{self.sha256.hexdigest()}"


def commit(
    upper: Path, parent: str, reference: str, store: Store, created_by: str, comment: str = ""
) -> dict[str, Any]:
    """Record the image `parent` plus the layer of `upper` as `reference`; returns its record.
    LookupError if the parent or its blobs are missing, ValueError for a bad reference."""
    name, tag = parse_reference(reference)
    base = store.load(parent)
    base_manifest = json.loads(store.read_blob(base["manifest"]))
    config = parse_json(base["id"], store.read_blob(base["id"]))
    flavour = "docker" if base_manifest.get("mediaType") == DOCKER_MANIFEST else "oci"
    blobs = store.root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    fd, packed = tempfile.mkstemp(prefix=".commit-", dir=blobs)
    try:
        with os.fdopen(fd, "wb") as file:
            blob = _Digesting(file)
            with gzip.GzipFile(fileobj=blob, mode="wb", mtime=0) as compressed:  # type: ignore[arg-type]
                tar = _Digesting(compressed)  # type: ignore[arg-type]
                layers.pack(upper, tar)  # type: ignore[arg-type]
        partial = store.partial_blob(blob.digest())
        os.replace(packed, partial)  # the importer finds it whole and reads it from there
    except BaseException:
        Path(packed).unlink(missing_ok=True)
        raise
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    config["created"] = created
    config.setdefault("rootfs", {"type": "layers"}).setdefault("diff_ids", []).append(tar.digest())
    config.setdefault("history", []).append(
        {"created": created, "created_by": created_by, "comment": comment}
    )
    config_bytes = json.dumps(config, separators=(",", ":")).encode()
    new_layer = Layer(tar.digest(), blob.digest(), blob.size, _kept)
    config_descriptor = {
        "digest": sha256_digest(config_bytes),
        "size": len(config_bytes),
    }
    new_descriptor = {"mediaType": GZIP_LAYER[flavour], "digest": blob.digest(), "size": blob.size}
    manifest = {**base_manifest, "config": {**base_manifest["config"], **config_descriptor},
                "layers": [*base_manifest["layers"], new_descriptor]}  # fmt: skip
    parents = [
        Layer(d, b["digest"], int(b["size"]), _kept)
        for d, b in zip(base["layers"], base_manifest["layers"], strict=True)
    ]
    image = Image(
        base["format"],
        config,
        config_bytes,
        json.dumps(manifest, separators=(",", ":")).encode(),
        [*parents, new_layer],
    )
    extra: dict[str, Any] = {
        "source": f"commit of {created_by.removeprefix('cgctl commit ')}",
        "parent": f"{base['name']}:{base['tag']}",
        **{key: base[key] for key in ("registry", "repository") if key in base},  # push mounts its layers
    }
    try:
        return store_image(image, name, tag, store, extra)
    finally:  # left there if the store had the layer already, or the import failed: never resumed
        partial.unlink(missing_ok=True)


def _kept(offset: int) -> IO[bytes]:
    raise AssertionError("the store has this blob (the parent's layers, or the new one as a whole partial)")
