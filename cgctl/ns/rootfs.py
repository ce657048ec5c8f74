"""A root of the workload's own: overlayfs layers, pivot_root into them, and what a root needs.

Run in the workload's first process, inside its private mount namespace, after
it joined its cgroup and before the namespace steps mount /proc, /sys and
cgroup2 (which then land in the new root). Nothing here is visible outside the
mount namespace, and it all goes away with it: only an --upper directory,
which the supervisor made, outlives the workload.

    staging (tmpfs) ── upper/ work/   (the writable layer, unless --upper DIR)
                    └─ merged/        overlay: lowerdir=top:...:bottom, upperdir, workdir
                                      + /dev (tmpfs, host nodes bound), /dev/pts, /dev/shm,
                                        --device nodes, /tmp (tmpfs), volumes, then read-only
                                        if asked;
                                      pivot_root(merged), old root detached
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from cgctl import syscalls
from cgctl.spec import Volume

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}  # fmt: skip
NOSUID_NODEV = syscalls.MS_NOSUID | syscalls.MS_NODEV


@dataclass(frozen=True)
class Plan:
    """Everything the workload's init needs to build its root, decided by the supervisor."""

    lowers: tuple[str, ...]  # bottom layer first
    upper: str | None  # a directory holding upper/ and work/, or None for a tmpfs upper
    staging: str  # an empty directory to assemble the root in
    read_only: bool
    volumes: tuple[Volume, ...]
    private: frozenset[str]  # the workload's own namespaces: the host's /proc or /sys otherwise
    devices: tuple[tuple[str, str], ...] = ()  # (host node, path inside) bound into the root


def enter(plan: Plan) -> None:
    """Mount the root described by plan and make it the process's root."""
    root = mount_layers(plan)
    _dev(f"{root}/dev")
    for node, target in plan.devices:  # bound, not made: mknod is not ours in a user namespace
        inside = f"{root}/{target.lstrip('/')}"
        os.makedirs(os.path.dirname(inside), exist_ok=True)
        if not os.path.exists(inside):
            open(inside, "x").close()
        syscalls.mount(node, inside, None, syscalls.MS_BIND)
    syscalls.mount("tmpfs", f"{root}/tmp", "tmpfs", NOSUID_NODEV, "mode=1777")
    if "pid" not in plan.private:
        _bind("/proc", f"{root}/proc", read_only=False)
    if "net" not in plan.private:
        _bind("/sys", f"{root}/sys", read_only=True)
    for volume in plan.volumes:
        _bind(volume.source, f"{root}/{volume.target.lstrip('/')}", volume.read_only)
    if plan.read_only:
        syscalls.mount("none", root, None, syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY)
    os.chdir(root)
    syscalls.pivot_root(".", ".")  # the old root ends up stacked under the new one...
    syscalls.umount(".", syscalls.MNT_DETACH)  # ...and is detached from it
    os.chdir("/")


def mount_layers(plan: Plan) -> str:
    """The overlay with its mount points, at <staging>/merged (returned): what `cgctl restore` gives
    CRIU as the root to restore the container's other mounts onto."""
    syscalls.mount("tmpfs", plan.staging, "tmpfs", NOSUID_NODEV, "mode=0755")
    if plan.upper is None:
        upper, work = f"{plan.staging}/upper", f"{plan.staging}/work"
        os.mkdir(upper, 0o755)
        os.mkdir(work, 0o700)
    else:
        upper, work = f"{plan.upper}/upper", f"{plan.upper}/work"
    root = f"{plan.staging}/merged"
    os.mkdir(root, 0o755)
    lowers = ":".join(reversed(plan.lowers))  # overlayfs lists the top layer first
    syscalls.mount("overlay", root, "overlay", 0, f"lowerdir={lowers},upperdir={upper},workdir={work}")
    for directory in ("proc", "sys", "dev", "tmp"):  # mount points, made in the upper layer if missing
        os.makedirs(f"{root}/{directory}", exist_ok=True)
    for volume in plan.volumes:
        target = f"{root}/{volume.target.lstrip('/')}"
        if os.path.isdir(volume.source):
            os.makedirs(target, exist_ok=True)
        elif not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "x").close()
    return root


def _dev(dev: str) -> None:
    """A minimal /dev: the harmless host nodes bound in (mknod needs privileges a user namespace
    lacks), a private devpts, /dev/shm, and the usual links."""
    syscalls.mount("tmpfs", dev, "tmpfs", syscalls.MS_NOSUID | syscalls.MS_NOEXEC, "mode=0755")
    for node in DEVICES:
        open(f"{dev}/{node}", "x").close()
        syscalls.mount(f"/dev/{node}", f"{dev}/{node}", None, syscalls.MS_BIND)
    os.mkdir(f"{dev}/pts")
    syscalls.mount(
        "devpts",
        f"{dev}/pts",
        "devpts",
        syscalls.MS_NOSUID | syscalls.MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )
    os.mkdir(f"{dev}/shm", 0o1777)
    syscalls.mount("shm", f"{dev}/shm", "tmpfs", NOSUID_NODEV | syscalls.MS_NOEXEC, "mode=1777")
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{dev}/{name}")


def _bind(source: str, target: str, read_only: bool) -> None:
    syscalls.mount(source, target, None, syscalls.MS_BIND | syscalls.MS_REC)
    if read_only:
        syscalls.mount("none", target, None, syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY)
