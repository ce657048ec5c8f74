"""Every cgroup under a root, named as ops know it: systemd units and slices, other runtimes'
containers, Kubernetes pods.

Host-wide accounting (`cgctl stats --all`, `cgctl exporter --all`, `cgctld --metrics-all`) walks
the tree at each scrape, so cgroups created or removed between scrapes appear and vanish. The
labels come from the cgroup's path alone, as cAdvisor's do: a component may name a container of
docker, podman, containerd or CRI-O (`runtime` and the 12-character `id`), a Kubernetes pod
(`pod_uid`, `qos`), or else a systemd unit (`unit`, and its enclosing `slice`); a cgroup nested below
one inherits its labels. Only names that are bounded by what runs go in labels: never a pid, a command
line or an environment variable.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cgctl.cgroup import fs

UNIT_SUFFIXES = (".service", ".scope", ".slice", ".socket", ".mount", ".swap")
# systemd's scope (or cgroupfs directory) of a container, by runtime: the conmon scopes that podman
# and CRI-O put beside each container (libpod-conmon-<id>.scope) do not match, as they are no container.
_CONTAINER = re.compile(r"(docker|libpod|cri-containerd|crio)-([0-9a-f]{64})(?:\.scope)?")
_RUNTIMES = {"docker": "docker", "libpod": "podman", "cri-containerd": "containerd", "crio": "crio"}
_BARE_ID = re.compile(r"[0-9a-f]{64}")  # cgroupfs drivers: /docker/<id>, /kubepods/burstable/pod<uid>/<id>
# kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, _ for ->.slice (systemd driver) or
# kubepods/burstable/pod<uid> (cgroupfs); guaranteed pods sit directly below kubepods.
_POD_SLICE = re.compile(r"kubepods(?:-(burstable|besteffort))?-pod([0-9a-f_]{36})\.slice")
_POD_DIR = re.compile(r"pod([0-9a-f-]{36})")
_QOS_SLICE = re.compile(r"kubepods-(burstable|besteffort)\.slice")


@dataclass(frozen=True)
class Selection:
    """Which cgroups host-wide accounting covers: those below root (itself included), at most max_depth
    levels down, whose path (as /proc/PID/cgroup names it) matches an include glob (all if none) and no
    exclude glob. Globs are fnmatch's, and `*` matches across `/`: `/kubepods.slice*` is a subtree."""

    root: Path
    max_depth: int | None = None
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def wants(self, path: str) -> bool:
        return (
            not self.include or any(fnmatch.fnmatchcase(path, glob) for glob in self.include)
        ) and not any(fnmatch.fnmatchcase(path, glob) for glob in self.exclude)


def walk(selection: Selection, mount: Path) -> Iterator[tuple[Path, str]]:
    """(directory, path below the cgroup2 mount) of each selected cgroup, parents before children.

    A cgroup removed while being listed is skipped with what is below it.
    """
    relative = os.path.relpath(selection.root, mount)
    pending = [(str(selection.root), "/" if relative == "." else f"/{relative}", 0)]
    while pending:
        directory, path, depth = pending.pop()
        if selection.wants(path):
            yield Path(directory), path
        if selection.max_depth is not None and depth >= selection.max_depth:
            continue
        try:
            with os.scandir(directory) as entries:
                children = sorted(entry.name for entry in entries if entry.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            continue
        prefix = "" if path == "/" else path
        pending.extend((f"{directory}/{name}", f"{prefix}/{name}", depth + 1) for name in reversed(children))


@functools.lru_cache(maxsize=1 << 16)
def labels(path: str) -> dict[str, str]:
    """What the cgroup at path (below the mount, e.g. /system.slice/foo.service) is, as labels.

    Kept per path, as every scrape asks again for every cgroup: callers must not change the dict."""
    found: dict[str, str] = {}
    slices: list[str] = []
    parent = ""
    in_kubepods = False
    for name in path.strip("/").split("/") if path != "/" else ():
        if name.endswith(UNIT_SUFFIXES):
            found["unit"] = name
            found["slice"] = slices[-1] if slices else "-.slice"
            if name.endswith(".slice"):
                slices.append(name)
        in_kubepods = in_kubepods or name in ("kubepods", "kubepods.slice")
        if in_kubepods:
            found |= _pod_labels(name, parent)
        if match := _CONTAINER.fullmatch(name):
            found["runtime"] = _RUNTIMES[match[1]]
            found["id"] = match[2][:12]
        elif _BARE_ID.fullmatch(name):
            found["id"] = name[:12]
            if parent == "docker":
                found["runtime"] = "docker"
        parent = name
    if "id" in found or "pod_uid" in found:  # what they are says more than the unit systemd made for them
        found.pop("unit", None)
        found.pop("slice", None)
    return found


def _pod_labels(name: str, parent: str) -> dict[str, str]:
    if match := _POD_SLICE.fullmatch(name):
        return {"pod_uid": match[2].replace("_", "-"), "qos": match[1] or "guaranteed"}
    if match := _QOS_SLICE.fullmatch(name):
        return {"qos": match[1]}
    if parent == "kubepods" and name in ("burstable", "besteffort"):
        return {"qos": name}
    if match := _POD_DIR.fullmatch(name):
        return {"pod_uid": match[1], "qos": "guaranteed" if parent == "kubepods" else parent}
    return {}


def is_container(path: str) -> bool:
    """Whether the cgroup at path is another runtime's container itself (not a cgroup nested in one)."""
    name = path.rsplit("/", 1)[-1]
    return bool(_CONTAINER.fullmatch(name) or _BARE_ID.fullmatch(name))


def display_name(found: dict[str, str]) -> str:
    """What `cgctl stats --all` calls a cgroup beside its path: the runtime's container, else the pod,
    else the unit."""
    if "id" in found:
        return f"{found.get('runtime', 'container')}:{found['id']}"
    if "pod_uid" in found:
        return f"pod:{found['pod_uid']}"
    return found.get("unit", "")


class SelectionError(ValueError):
    """A selection that cannot be walked; the message names the option as the CLI spells it (the
    API's query parameters are the same names with _), the value and the reason."""

    def __init__(self, option: str, value: object, reason: str) -> None:
        super().__init__(f"invalid value {value!r} for --{option}: {reason}")


def select(
    mount: Path,
    root: Path | None = None,
    max_depth: int | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> Selection:
    """A checked Selection: root (default the whole hierarchy) must be a cgroup at or below the
    cgroup2 mount, and globs must be able to match a path as /proc/PID/cgroup writes it."""
    where = mount if root is None else Path(os.path.realpath(root))
    if not where.is_relative_to(mount) or not (where / "cgroup.procs").is_file():
        hint = mount / str(root).lstrip("/")
        fix = (
            f"; did you mean {hint}?"
            if root is not None and not str(root).startswith(str(mount)) and (hint / "cgroup.procs").is_file()
            else ""
        )
        raise SelectionError(
            "cgroup-root", str(root), f"not a cgroup of the cgroup2 hierarchy mounted at {mount}{fix}"
        )
    if max_depth is not None and max_depth < 0:
        raise SelectionError("max-depth", max_depth, "a depth is 0 (the root alone) or more")
    for option, globs in (("include", include), ("exclude", exclude)):
        for glob in globs:
            if not glob.startswith(("/", "*", "?", "[")):
                raise SelectionError(
                    option,
                    glob,
                    "cgroup paths start with / as /proc/PID/cgroup writes them, e.g. '/system.slice/*'",
                )
    return Selection(where, max_depth, tuple(include), tuple(exclude))


def select_on_host(
    root: Path | None = None,
    max_depth: int | None = None,
    include: tuple[str, ...] = (),
    exclude: tuple[str, ...] = (),
) -> tuple[Path, Selection]:
    """(this host's cgroup2 mount, the checked selection below it); HostNotSupported without one."""
    mount, _ = fs.find_unified_mount()
    if mount is None:
        raise fs.HostNotSupported(
            f"{fs.MOUNTINFO}: no cgroup2 filesystem is mounted on this host; fix: {fs.FIX_UNIFIED}"
        )
    return mount, select(mount, root, max_depth, include, exclude)
