"""`cgctl image save`: an image of the store as an OCI image layout in a tar, so it travels without a
registry (`cgctl image import`, `skopeo copy oci-archive:`, `podman load` read it back).

The blobs go in as stored (the manifest byte for byte, so the digest stays),
and the archive appears by rename once complete: never half a file at FILE.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path

from cgctl.images.importer import Progress
from cgctl.images.source import OCI_INDEX, OCI_MANIFEST
from cgctl.images.store import Store

REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"  # what `ctr import` and podman name it by


def save(reference: str, store: Store, path: Path, progress: Progress | None = None) -> int:
    """Write the image as an OCI layout tar at path; returns its size. LookupError (no such image, or
    its blobs are not kept), OSError."""
    record = store.load(reference)
    manifest_bytes = store.read_blob(record["manifest"])
    manifest = json.loads(manifest_bytes)
    digests = [record["manifest"], manifest["config"]["digest"], *(d["digest"] for d in manifest["layers"])]
    store.require_blobs(digests)  # all of them there before anything is written
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{
            "mediaType": manifest.get("mediaType") or OCI_MANIFEST,
            "digest": record["manifest"],
            "size": len(manifest_bytes),
            "annotations": {REF_NAME: record["tag"], CONTAINERD_NAME: f"{record['name']}:{record['tag']}"},
        }],
    }  # fmt: skip
    total = sum(store.blob(digest).stat().st_size for digest in dict.fromkeys(digests))
    done = 0
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with (
            os.fdopen(fd, "wb") as file,
            tarfile.open(fileobj=file, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            _add_bytes(tar, "index.json", json.dumps(index).encode())
            for digest in dict.fromkeys(digests):
                blob = store.blob(digest)
                member = tar.gettarinfo(blob, "blobs/" + digest.replace(":", "/"))
                member.uid = member.gid = 0
                member.uname = member.gname = ""
                with open(blob, "rb") as data:
                    tar.addfile(member, data)
                done += member.size
                if progress:
                    progress(done, total)
            tar.close()
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path.stat().st_size


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size, member.mode = len(data), 0o644
    tar.addfile(member, io.BytesIO(data))
