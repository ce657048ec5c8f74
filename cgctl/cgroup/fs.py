"""The cgroup v2 filesystem: find the unified root, refuse unusable hosts, create and remove groups.

Every read and write goes through `Cgroup`, so an error always names the
interface file it came from. Paths are injectable (mountinfo, root) so the
parsers can be unit-tested against a recorded tree; everything that changes
the kernel's state is tested in the micro-VM.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = Path("/proc/self/mountinfo")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
DEFAULT_ROOT_NAME = "cgctl.slice"
# Where cgctl moves itself when it lives in the cgroup it manages (a delegated subtree), so that
# controllers can be enabled there without breaking the no-internal-processes rule.
SUPERVISOR_LEAF = "cgctl-supervisor"
# The controllers cgctl applies limits with; a host lacking any of them cannot run every spec.
SUPPORTED_CONTROLLERS = ("cpu", "io", "memory", "pids")
V1_NAMES = {"io": "blkio"}  # cgroup v1 called the io controller blkio
READ_SIZE = 65536
FIX_UNIFIED = (
    "boot the kernel with 'systemd.unified_cgroup_hierarchy=1 cgroup_no_v1=all' on its "
    "command line (any distribution with systemd >= 226), or use a distribution that "
    "defaults to cgroup v2 (Debian 11+, Ubuntu 21.10+, Fedora 31+, RHEL 9)"
)


class CgroupError(Exception):
    """A cgroup operation failed; the message starts with the file it concerns."""


class HostNotSupported(CgroupError):
    """This host has no cgroup v2 that cgctl can use; the message says what is missing and the fix."""


@dataclass(frozen=True)
class Cgroup:
    """One cgroup directory; all file access names the file on error."""

    path: Path

    def file(self, name: str) -> Path:
        return self.path / name

    def has(self, name: str) -> bool:
        return self.file(name).exists()

    def read(self, name: str) -> str:
        text = self.read_optional(name)
        if text is None:
            raise CgroupError(f"{self.path}/{name}: cannot read: No such file or directory")
        return text

    def read_optional(self, name: str) -> str | None:
        """The file's text, or None where this kernel lacks the file (memory.peak, pids.peak, ...)."""
        path = f"{self.path}/{name}"
        try:
            return read_fd(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except FileNotFoundError:
            return None
        except OSError as error:  # ENODEV: the cgroup was removed while we read it
            raise CgroupError(f"{path}: cannot read: {error.strerror}") from None

    def write(self, name: str, value: str) -> None:
        try:
            with self.file(name).open("w") as handle:
                handle.write(value)
        except OSError as error:
            raise CgroupError(f"{self.file(name)}: cannot write {value!r}: {error.strerror}") from None

    def read_keyed(self, name: str) -> dict[str, int]:
        return {key: int(value) for key, value in parse_keyed(self.read(name)).items()}

    def controllers(self) -> set[str]:
        return set(self.read("cgroup.controllers").split())

    def populated(self) -> bool:
        return self.read_keyed("cgroup.events").get("populated", 0) == 1

    def child(self, name: str) -> Cgroup:
        return Cgroup(self.path / name)

    def pids(self) -> list[int]:
        """The processes of this cgroup and of every cgroup below it (the workload may nest its own):
        os.walk, as it skips a nested cgroup removed meanwhile rather than fail."""
        return [
            int(pid)
            for directory, _, _ in os.walk(self.path)
            for pid in (Cgroup(Path(directory)).read_optional("cgroup.procs") or "").split()
        ]


def read_fd(fd: int) -> str:
    """The whole text of the interface file open at fd, which is closed after."""
    try:
        data = os.read(fd, READ_SIZE)
        if len(data) == READ_SIZE:  # interface files are small: one read, almost always
            while more := os.read(fd, READ_SIZE):
                data += more
        return data.decode()
    finally:
        os.close(fd)


def parse_keyed(text: str) -> dict[str, float]:
    """A flat-keyed file such as memory.events or cpu.stat: 'key value' per line."""
    words = iter(text.split())
    return {key: float(value) for key, value in zip(words, words, strict=True)}


def parse_nested(text: str) -> dict[str, dict[str, float]]:
    """A nested-keyed file such as io.stat or cpu.pressure: 'key sub=value sub=value' per line."""
    nested = {}
    for line in text.splitlines():
        key, *pairs = line.split()
        nested[key] = {sub: float(value) for sub, _, value in (pair.partition("=") for pair in pairs)}
    return nested


def find_unified_mount(mountinfo: Path = MOUNTINFO) -> tuple[Path | None, dict[str, Path]]:
    """(the cgroup2 mount point, {v1 controller: its mount point}) from mountinfo.

    A later mount on the same point hides an earlier one, so the last entry for a point wins.
    """
    mounts: dict[Path, tuple[str, str]] = {}
    for line in mountinfo.read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        mounts[Path(fields[4])] = (fields[separator + 1], fields[separator + 3])
    unified = sorted(
        (point for point, (fstype, _) in mounts.items() if fstype == "cgroup2"),
        key=lambda point: point != Path("/sys/fs/cgroup"),
    )
    v1: dict[str, Path] = {}
    for point, (fstype, options) in mounts.items():
        if fstype == "cgroup":
            for option in options.split(","):
                v1.setdefault(option, point)
    return (unified[0] if unified else None), v1


def open_unified_root(controllers: Iterable[str], mountinfo: Path = MOUNTINFO) -> Cgroup:
    """The cgroup v2 root, after checking that it offers `controllers`; else HostNotSupported."""
    wanted = sorted(controllers)
    unified, v1 = find_unified_mount(mountinfo)
    if unified is None:
        raise HostNotSupported(
            f"{mountinfo}: no cgroup2 filesystem is mounted, so cgroup v2 limits "
            f"cannot be applied. Fix: {FIX_UNIFIED}"
        )
    root = Cgroup(unified)
    missing = sorted(set(wanted) - root.controllers())
    if missing:
        held = [
            f"{name} (at {v1[V1_NAMES.get(name, name)]})"
            for name in missing
            if V1_NAMES.get(name, name) in v1
        ]
        where = (
            f"they are bound to cgroup v1 hierarchies: {', '.join(held)} (a hybrid setup)"
            if held
            else "the kernel does not offer them (built without them, or disabled)"
        )
        raise HostNotSupported(
            f"{root.file('cgroup.controllers')}: the cgroup v2 controller(s) {', '.join(missing)} "
            f"that cgctl needs are not available: {where}. Fix: {FIX_UNIFIED}"
        )
    return root


def own_cgroup(unified: Cgroup, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> Cgroup:
    for line in proc_self_cgroup.read_text().splitlines():
        if line.startswith("0::"):
            return Cgroup(unified.path / line[3:].strip().lstrip("/"))
    raise CgroupError(f"{proc_self_cgroup}: this process is in no cgroup v2 group")


def is_delegated(group: Cgroup) -> bool:
    """systemd marks a delegated cgroup (Delegate=yes) with a delegate xattr; a rootless one is ours."""
    for attribute in ("trusted.delegate", "user.delegate"):
        try:
            if os.getxattr(group.path, attribute) == b"1":
                return True
        except OSError:
            pass
    return os.geteuid() != 0 and group.path.stat().st_uid == os.geteuid()


def choose_root(unified: Cgroup, explicit: Path | None = None) -> Path:
    """cgctl's root: explicit, else the delegated cgroup cgctl runs in, else <unified>/cgctl.slice."""
    if explicit is not None:
        return explicit
    own = own_cgroup(unified)
    if own.path.name == SUPERVISOR_LEAF:
        own = Cgroup(own.path.parent)
    if own.path != unified.path and is_delegated(own):
        return own.path
    return unified.path / DEFAULT_ROOT_NAME


def check_host(cgroup_root: Path | None = None, mountinfo: Path = MOUNTINFO) -> tuple[Cgroup, Path]:
    """(the unified root, cgctl's root) if cgctl can work here; else HostNotSupported saying why."""
    unified = open_unified_root(SUPPORTED_CONTROLLERS, mountinfo)
    target = choose_root(unified, cgroup_root)
    existing = next(path for path in (target, *target.parents) if path.exists())
    if not os.access(existing, os.W_OK):
        raise HostNotSupported(_permission_hint(existing, PermissionError(errno.EACCES, "not writable")))
    return unified, target


def enable_controllers(group: Cgroup, controllers: Iterable[str]) -> None:
    """Enable controllers for group's children (its subtree_control), skipping ones already on."""
    needed = sorted(set(controllers) - set(group.read("cgroup.subtree_control").split()))
    if needed:
        group.write("cgroup.subtree_control", " ".join(f"+{name}" for name in needed))


def open_cgctl_root(unified: Cgroup, controllers: Iterable[str], root: Path) -> Cgroup:
    """cgctl's own subtree, created with `controllers` enabled along it.

    Processes live only in its leaves (the no-internal-processes rule): if cgctl
    itself runs in `root` (a delegated cgroup), it first moves into a leaf of its own.
    """
    try:
        relative = root.relative_to(unified.path)
    except ValueError:
        raise CgroupError(
            f"{root}: cgctl's cgroup root must be inside the cgroup v2 mount {unified.path}"
        ) from None
    if root != unified.path and own_cgroup(unified).path == root:  # the root cgroup may hold processes
        supervisor = root / SUPERVISOR_LEAF
        supervisor.mkdir(exist_ok=True)
        Cgroup(supervisor).write("cgroup.procs", "0")
    controllers = list(controllers)
    group = unified
    for part in relative.parts:
        enable_controllers(group, controllers)
        group = group.child(part)
        try:
            group.path.mkdir(exist_ok=True)
        except OSError as error:
            raise CgroupError(_permission_hint(group.path, error)) from None
    enable_controllers(group, controllers)
    return group


def create(parent: Cgroup, name: str) -> Cgroup:
    group = parent.child(name)
    try:
        group.path.mkdir()
    except FileExistsError:
        raise CgroupError(
            f"{group.path}: a cgroup with the name {name!r} already exists; choose another --name"
        ) from None
    except OSError as error:
        raise CgroupError(_permission_hint(group.path, error)) from None
    return group


def kill_all(group: Cgroup, timeout: float = 10.0) -> None:
    """Kill every process in the group, then wait until it is empty (cgroup.kill: forking escapes nothing)."""
    if group.populated():
        group.write("cgroup.kill", "1")
        wait_for_event(group, "populated", 0, timeout)


def remove(group: Cgroup, timeout: float = 10.0) -> None:
    """Kill every process left in the group, wait until it is empty, and remove it."""
    if not group.path.exists():
        return
    kill_all(group, timeout)
    try:
        group.path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as error:
        raise CgroupError(f"{group.path}: cannot remove: {error.strerror}") from None


def wait_for_event(group: Cgroup, key: str, value: int, timeout: float) -> None:
    """Block until cgroup.events shows key == value; the kernel signals changes with POLLPRI."""
    events = group.file("cgroup.events")
    deadline = time.monotonic() + timeout
    fd = os.open(events, os.O_RDONLY)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            os.lseek(fd, 0, os.SEEK_SET)
            state = dict(line.split() for line in os.read(fd, 4096).decode().splitlines())
            if int(state.get(key, -1)) == value:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CgroupError(f"{events}: {key} did not become {value} within {timeout:.0f}s")
            poller.poll(remaining * 1000)
    finally:
        os.close(fd)


def _permission_hint(path: Path, error: OSError) -> str:
    message = f"{path}: cannot create cgroups here: {error.strerror}"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message += (
            ". Run cgctl as root, or inside a cgroup delegated to you, e.g. "
            "'systemd-run --user --scope -p Delegate=yes cgctl ...'"
        )
    return message
