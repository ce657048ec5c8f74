"""A root of the workload's own: overlayfs layers (or a prepared directory), pivot_root into them,
and what a root needs.

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

A prepared root (OCI root.path) is bound at merged/ instead of the overlay and used as it is. A spec
with its own mounts (ns/mounts.py) gets exactly those instead of /dev, /tmp and the namespace
steps' /proc, /sys and cgroup2, plus runc's default device nodes and links in its /dev unless it
binds one from the host.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from cgctl import syscalls
from cgctl.ns import mounts
from cgctl.spec import DeviceNode, Volume

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}  # fmt: skip
NOSUID_NODEV = syscalls.MS_NOSUID | syscalls.MS_NODEV


@dataclass(frozen=True)
class Plan:
    """Everything the workload's init needs to build its root, decided by the supervisor."""

    lowers: tuple[str, ...]  # bottom layer first (none with a prepared root)
    upper: str | None  # a directory holding upper/ and work/, or None for a tmpfs upper
    staging: str  # an empty directory to assemble the root in
    read_only: bool
    volumes: tuple[Volume, ...]
    private: frozenset[str]  # the workload's own namespaces: the host's /proc or /sys otherwise
    devices: tuple[tuple[str, str], ...] = ()  # (host node, path inside) bound into the root
    path: str | None = None  # a prepared root, used as it is instead of the layers
    mounts: tuple[mounts.Step, ...] | None = None  # exactly these, instead of the built-in set
    device_nodes: tuple[DeviceNode, ...] = ()  # made in the root's /dev
    mknod: bool = False  # make device_nodes (else bind the host's node at the same path)


def enter(plan: Plan) -> None:
    """Mount the root described by plan and make it the process's root."""
    root = mount_layers(plan)
    if plan.mounts is None:
        _dev(f"{root}/dev")
    else:
        mounts.mount_all(root, plan.mounts)
        if not any(step.destination.rstrip("/") == "/dev" and step.fstype is None for step in plan.mounts):
            _default_devices(mounts.resolve(root, "/dev"))
    for made in plan.device_nodes:
        _device_node(root, made, plan.mknod)
    for node, target in plan.devices:  # bound, not made: mknod is not ours in a user namespace
        _bind_node(node, mounts.resolve(root, target))
    if plan.mounts is None:
        syscalls.mount("tmpfs", f"{root}/tmp", "tmpfs", NOSUID_NODEV, "mode=1777")
        if "pid" not in plan.private:
            _bind("/proc", f"{root}/proc", read_only=False)
        if "net" not in plan.private:
            _bind("/sys", f"{root}/sys", read_only=True)
    for volume in plan.volumes:
        _bind(volume.source, mounts.resolve(root, volume.target), volume.read_only)
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
    root = f"{plan.staging}/merged"
    os.mkdir(root, 0o755)
    if plan.path is not None:
        syscalls.mount(plan.path, root, None, syscalls.MS_BIND | syscalls.MS_REC)
    else:
        _overlay(plan, root)
    if plan.mounts is None:
        for directory in ("proc", "sys", "dev", "tmp"):  # mount points, made in the root if missing
            os.makedirs(f"{root}/{directory}", exist_ok=True)
    for volume in plan.volumes:
        target = mounts.resolve(root, volume.target)
        if os.path.isdir(volume.source):
            os.makedirs(target, exist_ok=True)
        elif not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "x").close()
    return root


def _overlay(plan: Plan, root: str) -> None:
    if plan.upper is None:
        upper, work = f"{plan.staging}/upper", f"{plan.staging}/work"
        os.mkdir(upper, 0o755)
        os.mkdir(work, 0o700)
    else:
        upper, work = f"{plan.upper}/upper", f"{plan.upper}/work"
    lowers = ":".join(reversed(plan.lowers))  # overlayfs lists the top layer first
    syscalls.mount("overlay", root, "overlay", 0, f"lowerdir={lowers},upperdir={upper},workdir={work}")


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


def _default_devices(dev: str) -> None:
    """runc's default /dev for a spec's own mounts: the harmless host nodes bound in and the usual
    links (/dev/ptmx always pointing into the devpts, which the mounts may give)."""
    os.makedirs(dev, exist_ok=True)
    for node in DEVICES:
        _bind_node(f"/dev/{node}", f"{dev}/{node}")
    for name, target in DEV_LINKS.items():
        if name == "ptmx" and os.path.lexists(f"{dev}/ptmx"):
            os.unlink(f"{dev}/ptmx")
        if not os.path.lexists(f"{dev}/{name}"):
            os.symlink(target, f"{dev}/{name}")


def _device_node(root: str, node: DeviceNode, mknod: bool) -> None:
    """An OCI linux.devices node: made (as root outside a user namespace) or the host's bound."""
    inside = mounts.resolve(root, node.path)
    if not mknod and node.type != "p":
        _bind_node(node.path, inside)
        return
    os.makedirs(os.path.dirname(inside), exist_ok=True)
    if os.path.lexists(inside):
        os.unlink(inside)
    kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[node.type]
    mode = 0o666 if node.file_mode is None else node.file_mode
    os.mknod(inside, kind | mode, os.makedev(node.major, node.minor))
    os.chmod(inside, mode)  # mknod's mode passes through the umask
    os.chown(inside, -1 if node.uid is None else node.uid, -1 if node.gid is None else node.gid)


def _bind_node(node: str, inside: str) -> None:
    os.makedirs(os.path.dirname(inside), exist_ok=True)
    if not os.path.exists(inside):
        open(inside, "x").close()
    syscalls.mount(node, inside, None, syscalls.MS_BIND)


def _bind(source: str, target: str, read_only: bool) -> None:
    syscalls.mount(source, target, None, syscalls.MS_BIND | syscalls.MS_REC)
    if read_only:
        syscalls.mount("none", target, None, syscalls.MS_REMOUNT | syscalls.MS_BIND | syscalls.MS_RDONLY)
