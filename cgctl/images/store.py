"""The image store: each layer unpacked once, named by its digest, and small image records.

    <store>/layers/sha256/<hex>/        a layer, named by the digest of its uncompressed tar
    <store>/images/<name>/<tag>.json    an image: its layers (bottom first) and its config

Layers appear by rename from a temporary directory once complete and
verified, and image records by rename once all their layers are there: a
reader never sees half of either. Layers no image uses are removed with the
last image that used them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[a-z0-9]+(?:[._/-][a-z0-9]+)*$")
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def default_root() -> Path:
    if explicit := os.environ.get("CGCTL_IMAGE_STORE"):
        return Path(explicit)
    if os.geteuid() == 0:
        return Path("/var/lib/cgctl/images")
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "cgctl" / "images"


def parse_reference(reference: str) -> tuple[str, str]:
    """'busybox' -> ('busybox', 'latest'); 'team/app:1.2' -> ('team/app', '1.2'). ValueError if malformed."""
    name, _, tag = reference.rpartition(":") if ":" in reference else (reference, "", "latest")
    if not NAME.match(name) or len(name) > 128:
        raise ValueError(f"{reference!r}: not an image name (lowercase letters, digits, '.', '_', '-', '/')")
    if not TAG.match(tag):
        raise ValueError(f"{reference!r}: not a tag (letters, digits, '_', '.', '-'; at most 128)")
    return name, tag


@dataclass(frozen=True)
class Store:
    root: Path

    def layer(self, diff_id: str) -> Path:
        return self.root / "layers" / diff_id.replace(":", "/")

    def record(self, name: str, tag: str) -> Path:
        return self.root / "images" / name / f"{tag}.json"

    def load(self, reference: str) -> dict[str, Any]:
        """The image record; LookupError if there is none."""
        name, tag = parse_reference(reference)
        try:
            return dict(json.loads(self.record(name, tag).read_text()))
        except FileNotFoundError:
            raise LookupError(f"no image {name}:{tag} in {self.root} (cgctl image ls lists them)") from None

    def images(self) -> Iterator[dict[str, Any]]:
        for path in sorted((self.root / "images").rglob("*.json")):
            yield json.loads(path.read_text())

    def save(self, record: dict[str, Any]) -> None:
        path = self.record(record["name"], record["tag"])
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp")
        temporary.write_text(json.dumps(record, indent=2) + "\n")
        temporary.replace(path)

    def remove(self, reference: str) -> list[str]:
        """Forget the image and remove the layers no other image uses; returns their digests."""
        name, tag = parse_reference(reference)
        self.load(reference)
        path = self.record(name, tag)
        path.unlink()
        for directory in [*path.parents][: len(Path(name).parts)]:  # empty name directories
            if directory == self.root / "images" or any(directory.iterdir()):
                break
            directory.rmdir()
        used = {diff_id for image in self.images() for diff_id in image["layers"]}
        removed = []
        for layer in sorted((self.root / "layers" / "sha256").glob("*")):
            if f"sha256:{layer.name}" not in used and not layer.name.startswith("."):
                shutil.rmtree(layer)
                removed.append(f"sha256:{layer.name}")
        return removed
