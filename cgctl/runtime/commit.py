"""`cgctl commit NAME REF`: a container's writes become a layer of their own on top of its image.

The writes are its overlayfs upper directory, which cgctl can read only where
the host can see it: an `--upper DIR` (a tmpfs upper lives in the container's
own mount namespace, detached from every path). A running container is
frozen for the moment of the copy, so the layer is one instant of it; an
exited one can be committed if its upper was kept (`--keep-upper`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cgctl.cgroup import freezer, fs
from cgctl.images import Store, default_root
from cgctl.images.commit import commit as commit_layer
from cgctl.runtime.api import Conflict, Container, Invalid


def commit(
    container: Container, reference: str, message: str = "", store: Store | None = None
) -> dict[str, Any]:
    """Record `container`'s image plus its writes as `reference`; returns the new image's record.
    Invalid or Conflict (with the reason and the fix), LookupError, ValueError."""
    root = container.spec.get("rootfs") or {}
    if not root.get("image"):
        raise Invalid(
            f"{container.name} was not run from an image (--image): there is no image to add a layer to"
        )
    if not root.get("upper"):
        raise Invalid(
            f"{container.name} writes to a tmpfs that only its own mount namespace sees, so its writes "
            "cannot be read from outside: run it with --upper DIR (and --keep-upper to commit it once ended)"
        )
    upper = Path(root["upper"]) / "upper"
    running = container.state in ("running", "frozen")
    if not running and not (root.get("keep_upper") and upper.is_dir()):
        raise Conflict(
            f"{container.name} has ended and its upper directory {root['upper']} went with it: "
            "run it with --keep-upper to commit it after it ends"
        )
    created_by = f"cgctl commit {container.name}"  # never its command line: it may hold secrets
    with _frozen(Path(container.cgroup) if running else None):
        return commit_layer(
            upper, root["image"], reference, store or Store(default_root()), created_by, message
        )


@contextlib.contextmanager
def _frozen(group: Path | None) -> Iterator[None]:
    """The container frozen (unless it already was, or has ended) while the block runs."""
    froze = group is not None and freezer.set_frozen(fs.Cgroup(group), True)
    try:
        yield
    finally:
        if froze and group is not None:
            with contextlib.suppress(fs.CgroupError):
                freezer.set_frozen(fs.Cgroup(group), False)
