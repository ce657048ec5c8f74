"""`cgctl image import` and `cgctl pull`: verify and unpack an image's layers into the store, then record it.

Each layer is streamed once: its bytes are hashed as they are read (the blob's
digest) and kept as the store's copy of the blob, decompressed if gzip or zstd,
hashed again (the tar's digest, the config's diff_id) and unpacked safely
(layer.py) into a temporary directory that is renamed into place only if both
digests match. A layer already in the store is not read at all. If anything
fails, the layers this import added are removed and no image record is
written: no partial image. The blob's bytes read so far stay (as a partial
blob) unless they were wrong, so an interrupted pull resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import io
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
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


class Stopped(Exception):
    """Another layer of the same import failed: this one stops too."""


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


class _Kept(io.RawIOBase):
    """A blob read from what is kept of it (the partial file), then from its source at that offset,
    each new byte appended to the partial file: an interruption loses nothing already read."""

    def __init__(self, partial: Path, out: IO[bytes], layer: Layer, stop: threading.Event) -> None:
        self.out, self.layer, self.stop = out, layer, stop
        self.kept = os.fstat(out.fileno()).st_size
        self.prefix: IO[bytes] | None = open(partial, "rb") if self.kept else None  # noqa: SIM115
        self.source: IO[bytes] | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self.stop.is_set():
            raise Stopped()
        if self.prefix is not None:
            data = self.prefix.read(len(buffer))
            if data:
                buffer[: len(data)] = data
                return len(data)
            self.prefix.close()
            self.prefix = None
        if self.source is None:
            if self.layer.size and self.kept >= self.layer.size:
                return 0  # all of it was kept
            self.source = self.layer.open(self.kept)
        data = self.source.read(len(buffer))
        self.out.write(data)
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.out.flush()
        for stream in (self.prefix, self.source):
            if stream is not None:
                stream.close()
        super().close()


def import_image(
    archive: Path, reference: str, store: Store, progress: Progress | None = None
) -> dict[str, Any]:
    """Import the image at archive (OCI layout directory or tar, or docker save) as reference
    (NAME[:TAG]); returns its record. Raises ValueError (a bad reference), ImageError or
    layers.LayerError; the store is then as it was."""
    name, tag = parse_reference(reference)
    with open_image(archive) as image:
        return store_image(image, name, tag, store, {"source": str(archive.absolute())}, progress)


def store_image(
    image: Image,
    name: str,
    tag: str,
    store: Store,
    extra: dict[str, Any],
    progress: Progress | None = None,
    parallel: int = 1,
) -> dict[str, Any]:
    """Unpack the image's missing layers (`parallel` at a time), keep its blobs and record it as
    NAME:TAG with `extra` fields; returns the record. All of it, or the store as it was."""
    as_root = os.geteuid() == 0
    added: list[Path] = []
    missing = list({
        layer.diff_id: layer for layer in image.layers
        if not store.layer(layer.diff_id).exists() or not store.blob(layer.digest).exists()
    }.values())  # fmt: skip
    if missing:
        store.remove_leftovers()
        if as_root:  # rootless stores hold no whiteouts: layer.py refuses them
            store.check_filesystem()
    total, done, lock, stop = sum(layer.size for layer in missing), 0, threading.Lock(), threading.Event()

    def count(read: int) -> None:
        nonlocal done
        with lock:
            done += read
            if progress:
                progress(done, total)

    def one(layer: Layer) -> None:
        try:
            paths = _import_layer(layer, store, as_root, count, stop)
        except BaseException:
            stop.set()
            raise
        with lock:
            added.extend(paths)

    try:
        if parallel > 1 and len(missing) > 1:
            with ThreadPoolExecutor(min(parallel, len(missing)), thread_name_prefix="layer") as pool:
                futures = [pool.submit(one, layer) for layer in missing]
            errors = [error for f in futures if (error := f.exception()) and not isinstance(error, Stopped)]
            if errors:
                raise errors[0]
        else:
            for layer in missing:
                one(layer)
        blobs = [store.put_blob(image.manifest), store.put_blob(image.config_bytes)]
        record = _record(name, tag, image, store, blobs + [layer.digest for layer in image.layers], extra)
        store.save(record)
        return record
    except BaseException:
        stop.set()  # a Ctrl-C in this thread stops the other layers' threads at their next read
        for path in added:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise


def _import_layer(
    layer: Layer, store: Store, as_root: bool, count: Callable[[int], None], stop: threading.Event
) -> list[Path]:
    """Unpack a layer into the store (from the store's copy of its blob if it has one, else from its
    source, keeping the blob); returns what this added (its directory, its blob). A kept partial blob
    that turns out wrong is dropped and the layer read once more from the start."""
    partial = store.partial_blob(layer.digest)
    for attempt in (1, 2):
        with _claimed(store, layer.digest) as out:
            raw = open(store.blob(layer.digest), "rb") if out is None else _Kept(partial, out, layer, stop)  # noqa: SIM115
            resumed = isinstance(raw, _Kept) and raw.kept > 0
            try:
                with raw:
                    added = _unpack(layer, raw, store, as_root, count)  # type: ignore[arg-type]
            except (ImageError, layers.LayerError):
                if out is not None:
                    partial.unlink(missing_ok=True)  # wrong bytes: never resumed from
                if attempt == 1 and resumed:
                    continue
                raise
            paths = [] if added is None else [added]
            if out is not None:
                paths.append(store.commit_blob(partial, layer.digest))
            return paths
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _claimed(store: Store, digest: str) -> Iterator[IO[bytes] | None]:
    """The blob's partial file, open to append and locked (another import of the same blob, say a
    second `cgctl pull` of the image, waits for this one); None once the store has the blob whole."""
    partial = store.partial_blob(digest)
    while not store.blob(digest).exists():
        out = open(partial, "ab")  # noqa: SIM115 (closed below)
        try:
            fcntl.flock(out, fcntl.LOCK_EX)
            try:
                current = os.stat(partial).st_ino == os.fstat(out.fileno()).st_ino
            except FileNotFoundError:
                current = False  # the holder finished the blob, or dropped it: look again
            if current:
                yield out
                return
        finally:
            out.close()
    yield None


def _unpack(
    layer: Layer, raw: IO[bytes], store: Store, as_root: bool, count: Callable[[int], None]
) -> Path | None:
    work = store.new_layer_dir(layer.diff_id)
    try:
        blob = _Hashing(raw, count)
        buffered = io.BufferedReader(blob, 1 << 20)
        tar = _Hashing(_decompressed(buffered))  # type: ignore[arg-type]
        try:
            os.chmod(work, 0o755)
            layers.unpack(tar, work, as_root)  # type: ignore[arg-type]
            _drain(tar)  # the tar's end padding, and the compressor's trailer: the digests cover every byte
            _drain(buffered)
        except (EOFError, OSError) as error:  # the decompressor's, while draining
            raise layers.LayerError(f"the layer is cut short or corrupt: {error}") from None
        if blob.digest() != layer.digest:
            raise ImageError(f"layer {layer.digest}: the blob's content does not match its digest")
        if tar.digest() != layer.diff_id:
            raise ImageError(f"layer {layer.diff_id}: the unpacked tar does not match the config's diff_id")
        if not store.layer(layer.diff_id).exists():
            try:
                return store.commit_layer(work, layer.diff_id)
            except OSError:
                if not store.layer(layer.diff_id).exists():
                    raise
        shutil.rmtree(work, ignore_errors=True)  # another import put the same layer in place meanwhile
        return None
    except BaseException as error:
        shutil.rmtree(work, ignore_errors=True)
        if isinstance(error, layers.LayerError):
            raise layers.LayerError(f"layer {layer.diff_id}: {error}") from None
        raise


def _decompressed(buffered: io.BufferedReader) -> IO[bytes]:
    """The tar inside a layer blob: gzip and zstd by their magic numbers, else the blob itself."""
    magic = buffered.peek(4)[:4]
    if magic == ZSTD_MAGIC:
        import zstandard

        return zstandard.ZstdDecompressor().stream_reader(buffered, read_across_frames=True)  # type: ignore[return-value]
    if magic[:2] == GZIP_MAGIC:
        return gzip.GzipFile(fileobj=buffered)  # type: ignore[return-value]
    return buffered


def _drain(stream: IO[bytes] | io.RawIOBase) -> None:
    while stream.read(1 << 20):
        pass


def _record(
    name: str, tag: str, image: Image, store: Store, blobs: list[str], extra: dict[str, Any]
) -> dict[str, Any]:
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
        "manifest": blobs[0],
        "blobs": blobs,
        **extra,
    }


def _tree_size(path: Path) -> int:
    return sum(os.lstat(entry).st_size for entry in path.rglob("*"))
