"""A spec's own mounts (OCI mounts[]) into the workload's root, in order, as runc mounts them.

The supervisor turns each Mount's options into flags, propagation and data (plan: a bad option or a
missing bind source is a SpecError before anything exists); the workload's init, in its private
mount namespace and before pivot_root, resolves every destination inside the root (a symlink in
the root is followed as if the root were /, so it can never lead out) and mounts it there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cgctl import syscalls
from cgctl.spec import Mount, SpecError

MS_SYNCHRONOUS, MS_DIRSYNC, MS_STRICTATIME = 16, 128, 1 << 24
MS_UNBINDABLE, MS_SLAVE, MS_SHARED = 1 << 17, 1 << 19, 1 << 20
# option -> (flags set, flags cleared)
FLAGS = {
    "ro": (syscalls.MS_RDONLY, 0), "rw": (0, syscalls.MS_RDONLY),
    "nosuid": (syscalls.MS_NOSUID, 0), "suid": (0, syscalls.MS_NOSUID),
    "nodev": (syscalls.MS_NODEV, 0), "dev": (0, syscalls.MS_NODEV),
    "noexec": (syscalls.MS_NOEXEC, 0), "exec": (0, syscalls.MS_NOEXEC),
    "noatime": (syscalls.MS_NOATIME, 0), "atime": (0, syscalls.MS_NOATIME),
    "nodiratime": (syscalls.MS_NODIRATIME, 0), "diratime": (0, syscalls.MS_NODIRATIME),
    "relatime": (syscalls.MS_RELATIME, 0), "norelatime": (0, syscalls.MS_RELATIME),
    "strictatime": (MS_STRICTATIME, 0), "nostrictatime": (0, MS_STRICTATIME),
    "sync": (MS_SYNCHRONOUS, 0), "async": (0, MS_SYNCHRONOUS), "dirsync": (MS_DIRSYNC, 0),
    "bind": (syscalls.MS_BIND, 0), "rbind": (syscalls.MS_BIND | syscalls.MS_REC, 0), "defaults": (0, 0),
}  # fmt: skip
PROPAGATION = {
    "private": syscalls.MS_PRIVATE, "rprivate": syscalls.MS_PRIVATE | syscalls.MS_REC,
    "slave": MS_SLAVE, "rslave": MS_SLAVE | syscalls.MS_REC,
    "shared": MS_SHARED, "rshared": MS_SHARED | syscalls.MS_REC,
    "unbindable": MS_UNBINDABLE, "runbindable": MS_UNBINDABLE | syscalls.MS_REC,
}  # fmt: skip
# runc's extensions cgctl does not implement: refused rather than passed to the kernel as data.
UNSUPPORTED = ("tmpcopyup", "idmap", "ridmap", "rro", "rrw", "rnosuid", "rnodev", "rnoexec", "ratime",
               "rnoatime", "rrelatime", "rstrictatime", "rnosymfollow", "nosymfollow", "remount")  # fmt: skip
# Flags a bind mount keeps from its source on remount (in a user namespace the kernel locks them).
_STATVFS_FLAGS = {os.ST_NOSUID: syscalls.MS_NOSUID, os.ST_NODEV: syscalls.MS_NODEV,
                  os.ST_NOEXEC: syscalls.MS_NOEXEC, os.ST_NOATIME: syscalls.MS_NOATIME,
                  os.ST_NODIRATIME: syscalls.MS_NODIRATIME, os.ST_RELATIME: syscalls.MS_RELATIME}  # fmt: skip
_LINK_LIMIT = 255


@dataclass(frozen=True)
class Step:
    """One mount, as the init makes it."""

    destination: str
    source: str
    fstype: str | None  # None for a bind
    flags: int
    data: str | None
    propagation: tuple[int, ...]
    source_is_dir: bool = True  # for a bind: a directory or a file mount point


def plan(mounts: list[Mount]) -> tuple[Step, ...]:
    """The steps for mounts, checked: SpecError names the mount (mounts.N) and what is wrong."""
    return tuple(_step(index, mount) for index, mount in enumerate(mounts))


def _step(index: int, mount: Mount) -> Step:
    field = ("mounts", index)
    flags, data, propagation = 0, [], []
    for option in mount.options:
        if option in UNSUPPORTED:
            raise SpecError(
                field, mount.destination, f"the mount option {option!r} is not supported by cgctl"
            )
        if option in FLAGS:
            on, off = FLAGS[option]
            flags = (flags | on) & ~off
        elif option in PROPAGATION:
            propagation.append(PROPAGATION[option])
        elif option:
            data.append(option)  # filesystem options: size=64m, mode=755, newinstance, gid=5, ...
    if mount.type == "bind":
        flags |= syscalls.MS_BIND
    bind = bool(flags & syscalls.MS_BIND)
    if bind:
        if not mount.source or not mount.source.startswith("/"):
            raise SpecError(
                field, mount.source, f"the bind mount on {mount.destination} needs an absolute source"
            )
        if not os.path.exists(mount.source):
            reason = f"the source of the bind mount on {mount.destination} does not exist on the host"
            raise SpecError(field, mount.source, reason)
    elif not mount.type:
        raise SpecError(
            field, mount.destination, "give the filesystem type (tmpfs, proc, ...) or a bind option"
        )
    fstype = None if bind else ("cgroup2" if mount.type == "cgroup" else mount.type)
    return Step(
        destination=mount.destination,
        source=mount.source or str(fstype),
        fstype=fstype,
        flags=flags,
        data=",".join(data) or None,
        propagation=tuple(propagation),
        source_is_dir=not bind or os.path.isdir(str(mount.source)),
    )


def resolve(root: str, path: str) -> str:
    """path inside root, every symlink on the way followed as if root were / (securejoin's rule: '..'
    at the root stays there): the host path that the workload will see as `path`."""
    parts = [part for part in path.split("/") if part]
    resolved: list[str] = []
    links = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate):
            links += 1
            if links > _LINK_LIMIT:
                raise OSError(40, f"{path}: too many levels of symbolic links in the root")  # ELOOP
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def mount_all(root: str, steps: tuple[Step, ...]) -> None:
    """Mount each step into root, in order (a later one may go on an earlier one)."""
    for step in steps:
        target = resolve(root, step.destination)
        _mount_point(target, step.source_is_dir)
        if step.fstype is None:
            syscalls.mount(step.source, target, None, step.flags & (syscalls.MS_BIND | syscalls.MS_REC))
            extra = step.flags & ~(syscalls.MS_BIND | syscalls.MS_REC)
            if extra:  # a bind takes no flags of its own: a remount sets them, keeping the locked ones
                kept = _flags_of(target)
                syscalls.mount("none", target, None, syscalls.MS_REMOUNT | syscalls.MS_BIND | extra | kept)
        else:
            syscalls.mount(step.source, target, step.fstype, step.flags, step.data)
        for propagation in step.propagation:
            syscalls.mount("none", target, None, propagation)


def _mount_point(target: str, directory: bool) -> None:
    if directory:
        os.makedirs(target, exist_ok=True)
    elif not os.path.lexists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "x").close()


def _flags_of(path: str) -> int:
    flags = os.statvfs(path).f_flag
    return sum(ms for st, ms in _STATVFS_FLAGS.items() if flags & st)
