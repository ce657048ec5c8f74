"""Read an image archive: an OCI image layout (a directory or a tar of one) or a `docker save` tarball.

Both come down to the same thing: the image config (Env, Cmd, Entrypoint,
WorkingDir, User, and rootfs.diff_ids: the digest of each layer's tar) and
the layer blobs, bottom first, each with the digest it must have. Small blobs
(index, manifest, config) are checked against their digests here; layers are
checked while they are unpacked (see importer.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

MANIFEST_TYPES = {
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
}
INDEX_TYPES = {
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
}
ARCHITECTURES = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ImageError(Exception):
    """The archive is not an image cgctl can import, or does not match its own digests."""


@dataclass(frozen=True)
class Layer:
    diff_id: str  # sha256:... of the uncompressed tar, from the config
    digest: str | None  # sha256:... of the blob as stored (None: the blob is the tar, checked by diff_id)
    size: int  # of the blob, for progress
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class Image:
    format: str  # "oci" or "docker"
    config: dict[str, Any]
    config_digest: str
    layers: list[Layer]


@contextlib.contextmanager
def open_image(path: Path) -> Iterator[Image]:
    """The image in the archive or directory at path."""
    with _files(path) as (names, open_file):
        if "index.json" in names:
            yield _oci(names, open_file)
        elif "manifest.json" in names:
            yield _docker(names, open_file)
        else:
            raise ImageError(
                f"{path}: neither an OCI image layout (index.json) nor a docker save (manifest.json)"
            )


@contextlib.contextmanager
def _files(path: Path) -> Iterator[tuple[set[str], Callable[[str], IO[bytes]]]]:
    """The archive's file names and a way to open one, for a directory or a tar (optionally compressed)."""
    if path.is_dir():
        names = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
        yield names, lambda name: (path / name).open("rb")
        return
    try:
        archive = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by the with below)
    except (OSError, tarfile.TarError) as error:
        raise ImageError(f"{path}: cannot read it as a directory or a tar archive: {error}") from None
    with archive:
        members = {
            member.name.removeprefix("./"): member for member in archive.getmembers() if member.isfile()
        }

        def open_member(name: str) -> IO[bytes]:
            data = archive.extractfile(members[name])
            assert data is not None
            return data

        yield set(members), open_member


def _read_json(open_file: Callable[[str], IO[bytes]], name: str, digest: str | None = None) -> Any:
    try:
        with open_file(name) as file:
            data = file.read()
    except (KeyError, FileNotFoundError):
        raise ImageError(f"{name} is missing from the archive") from None
    except (OSError, tarfile.TarError, EOFError) as error:
        raise ImageError(f"{name}: cannot be read (is the archive cut short?): {error}") from None
    if digest is not None and f"sha256:{hashlib.sha256(data).hexdigest()}" != digest:
        raise ImageError(f"{name}: its content does not match its digest {digest}")
    try:
        return json.loads(data)
    except ValueError as error:
        raise ImageError(f"{name}: not JSON: {error}") from None


def _blob_name(digest: str) -> str:
    if not DIGEST.match(digest):
        raise ImageError(f"{digest!r}: not a sha256 digest")
    return "blobs/" + digest.replace(":", "/")


def _oci(names: set[str], open_file: Callable[[str], IO[bytes]]) -> Image:
    descriptor = _pick(_read_json(open_file, "index.json"), open_file)
    manifest = _read_json(open_file, _blob_name(descriptor["digest"]), descriptor["digest"])
    config_digest = manifest["config"]["digest"]
    config = _read_json(open_file, _blob_name(config_digest), config_digest)
    diff_ids = _diff_ids(config, len(manifest["layers"]))
    layers = []
    for blob, diff_id in zip(manifest["layers"], diff_ids, strict=True):
        name = _blob_name(blob["digest"])
        if name not in names:
            raise ImageError(f"{name} (a layer) is missing from the archive")
        layers.append(Layer(diff_id, blob["digest"], int(blob.get("size", 0)), _opener(open_file, name)))
    return Image("oci", config, config_digest, layers)


def _pick(index: dict[str, Any], open_file: Callable[[str], IO[bytes]]) -> dict[str, Any]:
    """The image manifest for this machine's architecture, following nested indexes."""
    manifests = index.get("manifests") or []
    architecture = ARCHITECTURES.get(platform.machine(), platform.machine())
    for descriptor in manifests:
        if descriptor.get("platform", {}).get("architecture", architecture) != architecture:
            continue
        if descriptor.get("mediaType") in INDEX_TYPES:
            nested = _read_json(open_file, _blob_name(descriptor["digest"]), descriptor["digest"])
            return _pick(nested, open_file)
        if descriptor.get("mediaType", next(iter(MANIFEST_TYPES))) in MANIFEST_TYPES:
            return dict(descriptor)
    raise ImageError(f"index.json lists no image manifest for {architecture}")


def _docker(names: set[str], open_file: Callable[[str], IO[bytes]]) -> Image:
    entries = _read_json(open_file, "manifest.json")
    if not isinstance(entries, list) or not entries:
        raise ImageError("manifest.json lists no image")
    entry = entries[0]
    config_name = entry["Config"]
    hex_name = re.search(r"([0-9a-f]{64})(\.json)?$", config_name)
    config_digest = f"sha256:{hex_name.group(1)}" if hex_name else None
    config = _read_json(open_file, config_name, config_digest)
    diff_ids = _diff_ids(config, len(entry["Layers"]))
    layers = []
    for name, diff_id in zip(entry["Layers"], diff_ids, strict=True):
        if name not in names:
            raise ImageError(f"{name} (a layer) is missing from the archive")
        layers.append(Layer(diff_id, None, 0, _opener(open_file, name)))
    digest = config_digest or f"sha256:{hashlib.sha256(json.dumps(config).encode()).hexdigest()}"
    return Image("docker", config, digest, layers)


def _opener(open_file: Callable[[str], IO[bytes]], name: str) -> Callable[[], IO[bytes]]:
    return lambda: open_file(name)


def _diff_ids(config: dict[str, Any], count: int) -> list[str]:
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != count or not all(DIGEST.match(d) for d in diff_ids):
        raise ImageError(f"the config's rootfs.diff_ids do not describe its {count} layer(s)")
    return list(diff_ids)
