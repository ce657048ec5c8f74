"""Durable file writes: what a crash of the process or of the machine leaves is the old file or the
new one, never a torn or empty one. Run records, image records, credentials and exit statuses are
written this way; the module sits at the bottom so that every layer can use it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: Path, data: dict[str, Any], mode: int = 0o600) -> None:
    """Write JSON to path through a temporary file, fsynced and renamed into place."""
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, json.dumps(data).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    temporary.replace(path)
    sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    """fsync a directory: the names created, renamed or removed in it are on disk."""
    directory = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
