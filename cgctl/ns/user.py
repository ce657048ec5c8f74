"""The user namespace: root inside maps to the caller outside (one id, no helper binaries needed).

The mapping is written by the process itself right after unshare, which the
kernel allows for exactly one id: the caller's own. That is all `--userns`
promises, and it works unprivileged. A spec's own mappings (OCI uidMappings,
gidMappings: several ranges) must be written from outside, as runc does: the
process unshares, the supervisor writes its maps, then it becomes root inside.
"""

from __future__ import annotations

import os
from pathlib import Path

from cgctl import syscalls

FLAG = syscalls.CLONE_NEWUSER


def enter(outer_uid: int, outer_gid: int) -> None:
    syscalls.unshare(FLAG)
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"0 {outer_uid} 1")
    Path("/proc/self/gid_map").write_text(f"0 {outer_gid} 1")


def enter_mapped(unshared_w: int, mapped_r: int) -> None:
    """Unshare, let the supervisor write the maps, and become root inside (which they must map)."""
    syscalls.unshare(FLAG)
    os.write(unshared_w, b"u")
    if os.read(mapped_r, 1) != b"m":
        raise OSError("the supervisor did not write the user namespace's maps")
    os.close(unshared_w)
    os.close(mapped_r)
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


def map_text(mappings: list[tuple[int, int, int]]) -> str:
    """uid_map's or gid_map's text for (inside, outside, count) ranges."""
    return "".join(f"{inside} {outside} {count}\n" for inside, outside, count in mappings)
