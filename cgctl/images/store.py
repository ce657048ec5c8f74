"""The image store: each layer unpacked once, named by its digest, and small image records.

    <store>/layers/sha256/<hex>/        a layer, named by the digest of its uncompressed tar
    <store>/blobs/sha256/<hex>          a blob as a registry serves it: a manifest, a config, a
                                        layer as compressed (what push and save send on)
    <store>/blobs/sha256/.partial-<hex> the bytes of a blob fetched so far (a pull resumes there)
    <store>/images/<name>/<tag>.json    an image: its layers (bottom first), config and manifest

Layers appear by rename from a temporary directory once complete, verified
and on disk (syncfs), and image records by rename once all their layers are
there (fsync): a reader never sees half of either, even after the machine
crashes mid-import. Temporary directories left by a crash are removed by the
next import. Layers no image uses are removed with the last image that used
them, and blobs with them.

Layers hold overlayfs's whiteouts, 0/0 character devices, so the store must be
on a filesystem that takes them (tmpfs, ext4, xfs, btrfs); overlayfs itself
does not, which is where a cgctl running in a container finds /var/lib.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgctl import durable
from cgctl.images import reference as references
from cgctl.images.source import sha256_digest

PARTIAL_KEPT = 24 * 3600  # seconds an interrupted pull's bytes wait for it to resume


class StoreError(OSError):
    """The store cannot hold images where it is; the message names the cause and the fix."""


def default_root() -> Path:
    if explicit := os.environ.get("CGCTL_IMAGE_STORE"):
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/lib/cgctl/images")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "cgctl" / "images"


def parse_reference(reference: str) -> tuple[str, str]:
    """'busybox' -> ('busybox', 'latest'); '127.0.0.1:5000/team/app:1.2' -> ('127.0.0.1:5000/team/app',
    '1.2'); a reference by digest alone gets the tag its pull stored it under. ValueError if malformed."""
    parsed = references.parse(reference)
    return parsed.name, parsed.store_tag


@dataclass(frozen=True)
class Store:
    root: Path

    def layer(self, diff_id: str) -> Path:
        return self.root / "layers" / diff_id.replace(":", "/")

    def record(self, name: str, tag: str) -> Path:
        return self.root / "images" / name / f"{tag}.json"

    def blob(self, digest: str) -> Path:
        return self.root / "blobs" / digest.replace(":", "/")

    def partial_blob(self, digest: str) -> Path:
        final = self.blob(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        return final.with_name(f".partial-{final.name}")

    def load(self, reference: str) -> dict[str, Any]:
        """The image record (NAME[:TAG] or NAME@DIGEST); LookupError if there is none."""
        parsed = references.parse(reference)
        name, tag = parsed.name, parsed.store_tag
        try:
            return dict(json.loads(self.record(name, tag).read_text()))
        except FileNotFoundError:
            if parsed.digest:  # pulled by tag, asked for by digest
                for path in sorted(self.record(name, tag).parent.glob("*.json")):
                    record = json.loads(path.read_text())
                    if record.get("digest") == parsed.digest and record["name"] == name:
                        return dict(record)
            raise LookupError(f"no image {name}:{tag} in {self.root} (cgctl image ls lists them)") from None

    def images(self) -> Iterator[dict[str, Any]]:
        for path in sorted((self.root / "images").rglob("*.json")):
            yield json.loads(path.read_text())

    def save(self, record: dict[str, Any]) -> None:
        path = self.record(record["name"], record["tag"])
        path.parent.mkdir(parents=True, exist_ok=True)
        durable.write_json(path, record, mode=0o644)

    def put_blob(self, data: bytes) -> str:
        """Keep a small blob (a manifest, a config); returns its digest."""
        digest = sha256_digest(data)
        if not self.blob(digest).exists():
            partial = self.partial_blob(digest)
            with open(partial, "wb") as file:
                file.write(data)
            self.commit_blob(partial, digest)
        return digest

    def require_blobs(self, digests: list[str]) -> None:
        """LookupError, with the reason and the fix, unless the store has every one of the blobs."""
        for digest in digests:
            if not self.blob(digest).exists():
                self.read_blob(digest)

    def read_blob(self, digest: str) -> bytes:
        """A small blob's bytes; LookupError naming the digest if the store lacks it."""
        try:
            return self.blob(digest).read_bytes()
        except FileNotFoundError:
            raise LookupError(
                f"the store {self.root} lacks the blob {digest} (images imported before cgctl kept blobs "
                "lack them: import or pull the image again)"
            ) from None

    def commit_blob(self, partial: Path, digest: str) -> Path:
        """Put a complete, verified blob in place: its bytes on disk first, then its name."""
        final = self.blob(digest)
        with open(partial, "rb+") as file:
            os.fsync(file.fileno())
        partial.rename(final)
        durable.sync_directory(final.parent)
        return final

    def new_layer_dir(self, diff_id: str) -> Path:
        """A temporary directory to unpack a layer into, beside where it will be renamed to; named
        after this boot and process, so that a later import knows it for a crash's leftover."""
        final = self.layer(diff_id)
        final.parent.mkdir(parents=True, exist_ok=True)
        return Path(
            tempfile.mkdtemp(prefix=f".{final.name[:12]}-{_BOOT_ID}-{os.getpid()}-", dir=final.parent)
        )

    def commit_layer(self, work: Path, diff_id: str) -> Path:
        """Put an unpacked layer in place: its files on disk first, then its name."""
        final = self.layer(diff_id)
        _syncfs(work)
        work.rename(final)
        durable.sync_directory(final.parent)
        return final

    def remove_leftovers(self) -> None:
        """Remove the temporary layer directories of imports that died (another boot, or a dead pid)."""
        for work in (self.root / "layers" / "sha256").glob(".*-*-*-*"):
            _, boot, pid, _ = work.name.split("-", 3)
            if boot != _BOOT_ID or not _alive(int(pid)):
                shutil.rmtree(work, ignore_errors=True)

    def check_filesystem(self) -> None:
        """OSError naming the real cause and the fix if the store's filesystem refuses whiteouts."""
        self.root.mkdir(parents=True, exist_ok=True)
        probe = self.root / f".whiteout-probe-{os.getpid()}"
        try:
            os.mknod(probe, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        except OSError as error:
            raise StoreError(
                f"the image store {self.root} is on a filesystem of type {_filesystem_type(self.root)}, "
                f"which refuses the 0/0 character devices that mark deleted files in image layers "
                f"({error.strerror}); put the store on another filesystem (tmpfs, ext4, xfs, btrfs) "
                "with --store DIR or CGCTL_IMAGE_STORE=DIR"
            ) from None
        probe.unlink()

    def remove(self, reference: str) -> list[str]:
        """Forget the image and remove the layers no other image uses; returns their digests."""
        record = self.load(reference)
        name = record["name"]
        path = self.record(name, record["tag"])
        path.unlink()
        for directory in [*path.parents][: len(Path(name).parts)]:  # empty name directories
            if directory == self.root / "images" or any(directory.iterdir()):
                break
            directory.rmdir()
        images = list(self.images())
        used = {diff_id for image in images for diff_id in image["layers"]}
        removed = []
        for layer in sorted((self.root / "layers" / "sha256").glob("*")):
            if f"sha256:{layer.name}" not in used and not layer.name.startswith("."):
                shutil.rmtree(layer)
                removed.append(f"sha256:{layer.name}")
        kept = {digest for image in images for digest in image.get("blobs", [])}
        for blob in (self.root / "blobs" / "sha256").glob("*"):
            partial = blob.name.startswith(".partial-")
            if partial and time.time() - blob.stat().st_mtime < PARTIAL_KEPT:
                continue  # a pull may be under way, or about to resume
            if f"sha256:{blob.name.removeprefix('.partial-')}" not in kept:
                blob.unlink(missing_ok=True)
        return removed


def _read_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")[:8]
    except OSError:
        return "noboot00"


_BOOT_ID = _read_boot_id()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _syncfs(path: Path) -> None:
    """Write the dirty data of the filesystem holding path to disk (syncfs(2): one call for a
    whole unpacked layer, where an fsync per file would cost one disk flush each)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            number = ctypes.get_errno()
            raise OSError(number, f"{path}: syncfs: {os.strerror(number)}")
    finally:
        os.close(fd)


def _filesystem_type(path: Path) -> str:
    """The filesystem type of the mount holding path (from /proc/self/mountinfo, by device number)."""
    device = os.stat(path).st_dev
    wanted = f"{os.major(device)}:{os.minor(device)}"
    try:
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            fields = line.split()
            if fields[2] == wanted:
                return fields[fields.index("-") + 1]
    except OSError:
        pass
    return "unknown"
