"""Read an image archive: an OCI image layout (a directory or a tar of one) or a `docker save` tarball.

Both come down to the same thing (and so does a registry's, see pull.py): the
image config (Env, Cmd, Entrypoint, WorkingDir, User, and rootfs.diff_ids: the
digest of each layer's tar), its manifest, and the layer blobs, bottom first,
each with the digest it must have. Small blobs (index, manifest, config) are
checked against their digests here; layers are checked while they are
unpacked (see importer.py).
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

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}
INDEX_TYPES = {OCI_INDEX, DOCKER_LIST}
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
# This machine's platform as image indexes name it: (architecture, variant).
PLATFORMS = {
    "x86_64": ("amd64", None),
    "aarch64": ("arm64", "v8"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
}
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class ImageError(Exception):
    """The archive is not an image cgctl can import, or does not match its own digests."""


@dataclass(frozen=True)
class Layer:
    diff_id: str  # sha256:... of the uncompressed tar, from the config
    digest: str  # sha256:... of the blob as stored (the tar's own for docker save: then diff_id)
    size: int  # of the blob, for progress (0: unknown)
    open: Callable[[int], IO[bytes]]  # the blob from that offset on (a pull resumes there)


@dataclass(frozen=True)
class Image:
    format: str  # "oci" or "docker"
    config: dict[str, Any]
    config_bytes: bytes  # as stored: its digest is the image's id
    manifest: bytes  # as stored (made for a docker save, which has none): what push and save send
    layers: list[Layer]

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config_bytes)


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
def _files(path: Path) -> Iterator[tuple[dict[str, int], Callable[[str], IO[bytes]]]]:
    """The archive's files (name: size) and a way to open one, for a directory or a tar (optionally
    compressed)."""
    if path.is_dir():
        names = {str(p.relative_to(path)): p.stat().st_size for p in path.rglob("*") if p.is_file()}
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

        yield {name: member.size for name, member in members.items()}, open_member


def _read(open_file: Callable[[str], IO[bytes]], name: str, digest: str | None = None) -> bytes:
    try:
        with open_file(name) as file:
            data = file.read()
    except (KeyError, FileNotFoundError):
        raise ImageError(f"{name} is missing from the archive") from None
    except (OSError, tarfile.TarError, EOFError) as error:
        raise ImageError(f"{name}: cannot be read (is the archive cut short?): {error}") from None
    check_digest(name, data, digest)
    return data


def sha256_digest(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def check_digest(name: str, data: bytes, digest: str | None) -> None:
    if digest is not None and sha256_digest(data) != digest:
        raise ImageError(f"{name}: its content does not match its digest {digest}")


def parse_json(name: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as error:
        raise ImageError(f"{name}: not JSON: {error}") from None


def _read_json(open_file: Callable[[str], IO[bytes]], name: str, digest: str | None = None) -> Any:
    return parse_json(name, _read(open_file, name, digest))


def _blob_name(digest: str) -> str:
    if not DIGEST.match(digest):
        raise ImageError(f"{digest!r}: not a sha256 digest")
    return "blobs/" + digest.replace(":", "/")


def _oci(names: dict[str, int], open_file: Callable[[str], IO[bytes]]) -> Image:
    def read_index(descriptor: dict[str, Any]) -> dict[str, Any]:
        return dict(_read_json(open_file, _blob_name(descriptor["digest"]), descriptor["digest"]))

    descriptor = choose_manifest("index.json", _read_json(open_file, "index.json"), read_index)
    manifest_bytes = _read(open_file, _blob_name(descriptor["digest"]), descriptor["digest"])
    manifest = parse_json(descriptor["digest"], manifest_bytes)
    config_digest = manifest["config"]["digest"]
    config_bytes = _read(open_file, _blob_name(config_digest), config_digest)
    config = parse_json(config_digest, config_bytes)
    layers = []
    for blob, diff_id in zip(manifest["layers"], diff_ids(config, len(manifest["layers"])), strict=True):
        name = _blob_name(blob["digest"])
        if name not in names:
            raise ImageError(f"{name} (a layer) is missing from the archive")
        layers.append(Layer(diff_id, blob["digest"], int(blob.get("size", 0)), _opener(open_file, name)))
    return Image("oci", config, config_bytes, manifest_bytes, layers)


def choose_manifest(
    where: str, index: dict[str, Any], read_index: Callable[[dict[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    """The descriptor of the image manifest for this machine's OS, architecture and variant in an
    image index (a manifest list), following nested indexes (read with read_index)."""
    architecture, variant = PLATFORMS.get(platform.machine(), (platform.machine(), None))
    offered = []
    for descriptor in index.get("manifests") or []:
        wanted = descriptor.get("platform") or {}
        offered.append(
            "/".join(filter(None, (wanted.get("os"), wanted.get("architecture"), wanted.get("variant"))))
        )
        if wanted.get("os", "linux") != "linux" or wanted.get("architecture", architecture) != architecture:
            continue
        if variant and wanted.get("variant", variant) != variant:
            continue
        if descriptor.get("mediaType") in INDEX_TYPES:
            return choose_manifest(descriptor["digest"], read_index(descriptor), read_index)
        if descriptor.get("mediaType", OCI_MANIFEST) in MANIFEST_TYPES:
            return dict(descriptor)
    mine = "/".join(filter(None, ("linux", architecture, variant)))
    raise ImageError(f"{where} lists no image for {mine} (it has: {', '.join(offered) or 'none'})")


def _docker(names: dict[str, int], open_file: Callable[[str], IO[bytes]]) -> Image:
    entries = _read_json(open_file, "manifest.json")
    if not isinstance(entries, list) or not entries:
        raise ImageError("manifest.json lists no image")
    entry = entries[0]
    config_name = entry["Config"]
    hex_name = re.search(r"([0-9a-f]{64})(\.json)?$", config_name)
    config_bytes = _read(open_file, config_name, f"sha256:{hex_name.group(1)}" if hex_name else None)
    config = parse_json(config_name, config_bytes)
    layers = []
    for name, diff_id in zip(entry["Layers"], diff_ids(config, len(entry["Layers"])), strict=True):
        if name not in names:
            raise ImageError(f"{name} (a layer) is missing from the archive")
        layers.append(Layer(diff_id, diff_id, names[name], _opener(open_file, name)))
    return Image("docker", config, config_bytes, oci_manifest(config_bytes, layers, OCI_LAYER_TAR), layers)


def oci_manifest(config_bytes: bytes, layers: list[Layer], media_type: str) -> bytes:
    """An OCI image manifest for a config and layer blobs of one media type (canonical JSON: the same
    image gives the same bytes, so the same digest, every time)."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": OCI_CONFIG,
            "digest": sha256_digest(config_bytes),
            "size": len(config_bytes),
        },
        "layers": [{"mediaType": media_type, "digest": layer.digest, "size": layer.size} for layer in layers],
    }
    return json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()


def _opener(open_file: Callable[[str], IO[bytes]], name: str) -> Callable[[int], IO[bytes]]:
    def open_at(offset: int) -> IO[bytes]:
        stream = open_file(name)
        if offset:
            stream.seek(offset)  # tar members and files both seek
        return stream

    return open_at


def diff_ids(config: dict[str, Any], count: int) -> list[str]:
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != count or not all(DIGEST.match(d) for d in diff_ids):
        raise ImageError(f"the config's rootfs.diff_ids do not describe its {count} layer(s)")
    return list(diff_ids)
