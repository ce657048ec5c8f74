"""What a daemon that starts finds of the containers it had (see service.py's docstring): their
persisted state, how an attempt that ended meanwhile ended, and the empty cgroups a crash left."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cgctl.cgroup import fs
from cgctl.daemon.managed import Managed
from cgctl.runtime.api import Container, CreateRequest

log = logging.getLogger("cgctld")


def load(containers: Path) -> Iterator[Managed]:
    """Every container persisted under `containers`; one whose files cannot be read is logged and
    left as it is."""
    for directory in sorted(containers.iterdir()):
        try:
            info = Container.model_validate_json((directory / "container.json").read_text())
            request = CreateRequest.model_validate_json((directory / "request.json").read_text())
        except (OSError, ValueError) as error:
            log.error("%s: cannot read this container's state, left as it is: %s", directory, error)
            continue
        yield Managed(info, request, directory)


def ended_status(managed: Managed) -> dict[str, Any]:
    """How its current attempt ended while the daemon was away: the keeper's exit.json if it is this
    attempt's, else unknown (never made up)."""
    try:
        status = dict(json.loads(managed.exit_path.read_text()))
    except (OSError, ValueError):
        status = {}
    if status.get("attempt") == len(managed.info.attempts):
        return status
    return {"unknown": "it ended while neither the daemon nor its keeper was running"}


def remove_stale_cgroups(cgroup_root: Path | None, named: set[str]) -> None:
    """Empty cgroups in cgctl's subtree that no run record names (left by a crash) are removed."""
    try:
        unified = fs.open_unified_root(fs.SUPPORTED_CONTROLLERS)
        root = fs.Cgroup(fs.choose_root(unified, cgroup_root))
    except fs.CgroupError:
        return
    if not root.path.is_dir():
        return
    for child in root.path.iterdir():
        if not child.is_dir() or child.name == fs.SUPERVISOR_LEAF or str(child) in named:
            continue
        with contextlib.suppress(OSError, fs.CgroupError):
            if not fs.Cgroup(child).populated() and not any(p.is_dir() for p in child.iterdir()):
                child.rmdir()
                log.info("removed the stale empty cgroup %s", child)
