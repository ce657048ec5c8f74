"""`cgctl image import`: verify and unpack an image archive's layers into the store, then record it.

Each layer is streamed once: its bytes are hashed as they are read (the blob's
digest), decompressed if gzip, hashed again (the tar's digest, the config's
diff_id) and unpacked safely (layer.py) into a temporary directory that is
renamed into place only if both digests match. A layer already in the store
is not read at all. If anything fails, the layers this import added are
removed and no image record is written: no partial image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from cgctl.images import layer as layers
from cgctl.images.source import Image, ImageError, Layer, open_image
from cgctl.images.store import Store, parse_reference

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CONFIG_KEYS = ("Env", "Cmd", "Entrypoint", "WorkingDir", "User")
# Reports (bytes read, bytes in all the layers to read) as an import goes.
Progress = Callable[[int, int], None]


class _Hashing(io.RawIOBase):
    """Reads through to `inner`, hashing and counting every byte."""

    def __init__(self, inner: IO[bytes], on_read: Callable[[int], None] | None = None) -> None:
        self.inner, self.on_read = inner, on_read
        self.sha256 = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.inner.read(len(buffer))
        buffer[: len(data)] = data
        self.sha256.update(data)
        if self.on_read:
            self.on_read(len(data))
        return len(data)

    def digest(self) -> str:
        return f"sha256:{self.sha256.hexdigest()}"


def import_image(
    archive: Path, reference: str, store: Store, progress: Progress | None = None
) -> dict[str, Any]:
    """Import the image at archive (OCI layout directory or tar, or docker save) as reference
    (NAME[:TAG]); returns its record. Raises ValueError (a bad reference), ImageError or
    layers.LayerError; the store is then as it was."""
    name, tag = parse_reference(reference)
    as_root = os.geteuid() == 0
    added: list[Path] = []
    try:
        with open_image(archive) as image:
            missing = [layer for layer in image.layers if not store.layer(layer.diff_id).exists()]
            if missing:
                store.remove_leftovers()
                if as_root:  # rootless stores hold no whiteouts: layer.py refuses them
                    store.check_filesystem()
            total, done = sum(layer.size for layer in missing), 0

            def count(read: int) -> None:
                nonlocal done
                done += read
                if progress:
                    progress(done, total)

            for layer in missing:
                if not store.layer(layer.diff_id).exists():  # a layer twice in one image
                    added.append(_import_layer(layer, store, as_root, count))
            record = _record(name, tag, image, store, archive)
            store.save(record)
            return record
    except BaseException:
        for path in added:
            shutil.rmtree(path, ignore_errors=True)
        raise


def _import_layer(layer: Layer, store: Store, as_root: bool, count: Callable[[int], None]) -> Path:
    work = store.new_layer_dir(layer.diff_id)
    try:
        with layer.open() as raw:
            blob = _Hashing(raw, count)
            buffered = io.BufferedReader(blob, 1 << 20)
            magic = buffered.peek(4)[:4]
            if magic == ZSTD_MAGIC:
                raise ImageError(
                    f"layer {layer.diff_id}: zstd compression is not supported; use gzip or none"
                )
            compressed = magic[:2] == GZIP_MAGIC
            tar = _Hashing(gzip.GzipFile(fileobj=buffered) if compressed else buffered)  # type: ignore[arg-type]
            try:
                os.chmod(work, 0o755)
                layers.unpack(tar, work, as_root)  # type: ignore[arg-type]
                _drain(tar)  # the tar's end padding, and gzip's trailer: the digests cover every byte
                _drain(buffered)
            except (EOFError, OSError) as error:  # gzip's, while draining
                raise layers.LayerError(f"the layer is cut short or corrupt: {error}") from None
        if layer.digest is not None and blob.digest() != layer.digest:
            raise ImageError(f"layer {layer.digest}: the blob's content does not match its digest")
        if tar.digest() != layer.diff_id:
            raise ImageError(f"layer {layer.diff_id}: the unpacked tar does not match the config's diff_id")
        return store.commit_layer(work, layer.diff_id)
    except BaseException as error:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(error, layers.LayerError):
            raise layers.LayerError(f"layer {layer.diff_id}: {error}") from None
        raise


def _drain(stream: IO[bytes] | io.RawIOBase) -> None:
    while stream.read(1 << 20):
        pass


def _record(name: str, tag: str, image: Image, store: Store, archive: Path) -> dict[str, Any]:
    config = image.config.get("config") or {}
    return {
        "name": name,
        "tag": tag,
        "id": image.config_digest,
        "format": image.format,
        "layers": [layer.diff_id for layer in image.layers],
        "size": sum(
            _tree_size(store.layer(diff_id)) for diff_id in {layer.diff_id for layer in image.layers}
        ),
        "config": {key: config[key] for key in CONFIG_KEYS if config.get(key)},
        "created": image.config.get("created"),
        "imported_at": time.time(),
        "source": str(archive.absolute()),
    }


def _tree_size(path: Path) -> int:
    return sum(os.lstat(entry).st_size for entry in path.rglob("*"))
