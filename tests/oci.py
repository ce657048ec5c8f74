"""Build image archives for tests and benchmarks: OCI layouts (directory or tar) and docker save tars.

Layers are given as lists of (TarInfo, data) pairs, so that tests can write
exactly the members they mean, malicious ones included.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

Member = tuple[tarfile.TarInfo, bytes | None]
BUSYBOX = Path("/bin/busybox")
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
APPLETS = ("sh", "cat", "ls", "echo", "touch", "id", "sleep", "mount", "grep", "test", "true", "pwd", "env")


def file(name: str, data: bytes = b"", mode: int = 0o644) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def directory(name: str, mode: int = 0o755) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, mode
    return info, None


def link(name: str, target: str, hard: bool = False) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = (tarfile.LNKTYPE if hard else tarfile.SYMTYPE), target
    return info, None


def device(name: str, major: int = 1, minor: int = 3, block: bool = False) -> Member:
    info = tarfile.TarInfo(name)
    info.type = tarfile.BLKTYPE if block else tarfile.CHRTYPE
    info.devmajor, info.devminor, info.mode = major, minor, 0o666
    return info, None


def busybox_layer(*extra: Member) -> list[Member]:
    """A root with a static busybox, its applets as symlinks, an /etc/passwd and `extra`."""
    return [
        directory("bin"),
        file("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        *(link(f"bin/{applet}", "busybox") for applet in APPLETS),
        directory("etc"),
        file("etc/passwd", b"root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n"),
        file("etc/group", b"root:x:0:\nnogroup:x:65534:\n"),
        *extra,
    ]


def tar_bytes(members: list[Member]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if data is not None else None)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def image_config(
    layers: list[bytes], config: dict[str, object], platform: str = "linux/amd64"
) -> dict[str, object]:
    system, architecture = platform.split("/")
    return {
        "architecture": architecture,
        "os": system,
        "created": "2026-11-28T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [sha256(layer) for layer in layers]},
    }


def put_blob(directory: Path, data: bytes) -> str:
    """Store data under its digest in the layout at directory; the digest."""
    digest = sha256(data)
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest.split(":")[1]).write_bytes(data)
    return digest


def put_image(
    directory: Path,
    layers: list[list[Member]],
    config: dict[str, object],
    compress: bool = True,
    platform: str = "linux/amd64",
) -> dict[str, object]:
    """One image's layers, config and manifest as blobs in the layout at directory; its descriptor."""
    tars = [tar_bytes(members) for members in layers]
    layer_blobs = [gzip.compress(tar, mtime=0) if compress else tar for tar in tars]
    config_data = json.dumps(image_config(tars, config, platform)).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": put_blob(directory, config_data), "size": len(config_data)},
        "layers": [
            {"mediaType": "application/vnd.oci.image.layer.v1.tar" + ("+gzip" if compress else ""),
             "digest": put_blob(directory, blob), "size": len(blob)}
            for blob in layer_blobs
        ],
    }  # fmt: skip
    manifest_data = json.dumps(manifest).encode()
    return {"mediaType": MANIFEST, "digest": put_blob(directory, manifest_data), "size": len(manifest_data)}


def write_index(directory: Path, descriptor: dict[str, object]) -> None:
    """index.json listing descriptor, and the oci-layout marker."""
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [descriptor]}))
    (directory / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')


def write_oci_layout(
    directory: Path, layers: list[list[Member]], compress: bool = True, **config: object
) -> None:
    """An OCI image layout in directory: gzip layers by default, one manifest in index.json."""
    directory.mkdir(parents=True, exist_ok=True)
    write_index(directory, put_image(directory, layers, config, compress))


def write_multiplatform_layout(
    directory: Path, platforms: dict[str, list[list[Member]]], tag: str = "latest", **config: object
) -> None:
    """An OCI layout whose index.json lists one image index (tagged `tag`, for `oci:DIR:TAG`) of one
    image per "os/architecture" in platforms, as registries serve multi-platform images."""
    directory.mkdir(parents=True, exist_ok=True)
    manifests = []
    for platform, layers in platforms.items():
        system, architecture = platform.split("/")
        descriptor = put_image(directory, layers, config, platform=platform)
        manifests.append({**descriptor, "platform": {"architecture": architecture, "os": system}})
    index_data = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": manifests}).encode()
    descriptor = {"mediaType": INDEX, "digest": put_blob(directory, index_data), "size": len(index_data)}
    write_index(directory, {**descriptor, "annotations": {"org.opencontainers.image.ref.name": tag}})


def write_docker_save(path: Path, layers: list[list[Member]], **config: object) -> None:
    """A `docker save` tarball (the legacy layout: <id>/layer.tar, <config hex>.json, manifest.json)."""
    tars = [tar_bytes(members) for members in layers]
    config_data = json.dumps(image_config(tars, config)).encode()
    config_name = sha256(config_data).split(":")[1] + ".json"
    layer_names = [f"{sha256(tar).split(':')[1]}/layer.tar" for tar in tars]
    manifest = [{"Config": config_name, "RepoTags": ["test:latest"], "Layers": layer_names}]
    with tarfile.open(path, "w") as archive:
        for name, data in [(config_name, config_data), *zip(layer_names, tars, strict=True),
                           ("manifest.json", json.dumps(manifest).encode())]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))


def tar_directory(source: Path, path: Path) -> None:
    """Pack an OCI layout directory into a tar, as `skopeo copy oci-archive:` would."""
    with tarfile.open(path, "w") as archive:
        for entry in sorted(source.rglob("*")):
            archive.add(entry, entry.relative_to(source).as_posix(), recursive=False)
