"""Checkpoint and restore of an OCI container with CRIU: what `cgctl-oci checkpoint` and `restore` run.

The options are runc's (--image-path, --work-path, --leave-running, --tcp-established, --ext-unix-sk,
--shell-job, --file-locks, --pre-dump, --parent-path, --auto-dedup, --empty-ns network), and so is what
the images directory holds besides CRIU's images: descriptors.json, the init's stdin, stdout and stderr
as /proc/PID/fd names them, which restore hands CRIU new pipes for (containerd's shim and conmon give
the restored container new ones). There is no manifest: the bundle's config.json, given again at
restore, is the spec. CRIU works as in cgctl's own checkpoint (checkpoint.py): it freezes the cgroup to
dump, and restores with --manage-cgroups=ignore inside a cgroup the caller has made from config.json
with its limits written, so every restored process is born there.

External mounts, as runc marks them: every bind mount of config.json (restored from the restore
bundle's source), every masked file (a bind of /dev/null) and every device node; the rest of what
cgctl binds in (its default device nodes) CRIU finds itself (--ext-mount-map auto). A network or pid
namespace joined by path (a pod's) is external too: CRIU leaves it out of the images and the restore
rejoins the one config.json names.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cgctl.cgroup import freezer, fs
from cgctl.runtime.checkpoint import (
    EXTERNAL_MOUNTS,
    CheckpointError,
    _criu,
    _hook_env,
    _inherit_stdio,
    _run_criu,
)

DESCRIPTORS = "descriptors.json"  # runc's name and format: a list of three strings
DUMPED = "cgctl-oci.json"  # the dumped init's pid, for the restore's network unlock (criu-action.sh)
# config.json namespace type -> CRIU's name for it and runc's key for an external one
EXTERNAL_NAMESPACES = {"network": ("net", "extRootNetNS"), "pid": ("pid", "extRootPidNS")}
EMPTY_NAMESPACES = {"network": "net"}  # what --empty-ns takes, as runc: restore it without its contents


@dataclass(frozen=True)
class CriuOptions:
    """runc's checkpoint and restore options that cgctl-oci supports (the others it refuses by name)."""

    image_path: Path
    work_path: Path | None = None  # CRIU's logs and work files; the image path without it
    leave_running: bool = False
    tcp_established: bool = False
    ext_unix_sk: bool = False
    shell_job: bool = False
    file_locks: bool = False
    pre_dump: bool = False
    parent_path: str | None = None  # the previous (pre-)dump's images, relative to image_path
    auto_dedup: bool = False
    empty_ns: tuple[str, ...] = ()  # config.json's names: network

    def __post_init__(self) -> None:
        if unknown := [name for name in self.empty_ns if name not in EMPTY_NAMESPACES]:
            raise ValueError(
                f"--empty-ns {unknown[0]}: only {', '.join(EMPTY_NAMESPACES)} can be restored empty"
            )

    def common_args(self, log: str) -> list[str]:
        return [
            "--images-dir", str(self.image_path),
            *(["--work-dir", str(self.work_path)] if self.work_path else []),
            "--log-file", log, "-v4",
            "--manage-cgroups=ignore",
            *(["--tcp-established"] if self.tcp_established else []),
            *(["--ext-unix-sk"] if self.ext_unix_sk else []),
            *(["--shell-job"] if self.shell_job else []),
            *(["--file-locks"] if self.file_locks else []),
            *(["--auto-dedup"] if self.auto_dedup else []),
        ]  # fmt: skip

    def log(self, name: str) -> Path:
        return (self.work_path or self.image_path) / name


def dump_args(
    criu: str, pid: int, group: fs.Cgroup, root: Path, config: dict[str, Any], options: CriuOptions
) -> list[str]:
    """CRIU's command line to dump the container whose init is pid (root: its root as this host sees it)."""
    linux = config.get("linux") or {}
    args = [
        criu,
        "pre-dump" if options.pre_dump else "dump",
        "--tree", str(pid),
        "--root", str(root),
        "--freeze-cgroup", str(group.path),
        "--network-lock", "nftables",
        *options.common_args("dump.log"),
        *(["--leave-running"] if options.leave_running and not options.pre_dump else []),
        *(["--prev-images-dir", options.parent_path, "--track-mem"] if options.parent_path else []),
        *(["--track-mem"] if options.pre_dump and not options.parent_path else []),
    ]  # fmt: skip
    for destination in _bind_destinations(config):
        args += ["--ext-mount-map", f"{destination}:{destination}"]
    for path in linux.get("maskedPaths") or []:
        masked = Path(f"/proc/{pid}/root{path}")
        if masked.exists() and not masked.is_dir():  # a masked directory is a tmpfs of the container's own
            args += ["--ext-mount-map", f"{path}:/dev/null"]
    for device in linux.get("devices") or []:
        args += ["--ext-mount-map", f"{device['path']}:{device['path']}"]
    for kind, path in _joined_namespaces(config).items():
        name, key = EXTERNAL_NAMESPACES[kind]
        args += ["--external", f"{name}[{os.stat(path).st_ino}]:{key}"]
    return [*args, *EXTERNAL_MOUNTS]


def restore_args(
    criu: str,
    root_mount: Path,
    pidfile: Path,
    config: dict[str, Any],
    options: CriuOptions,
    inherited: dict[int, str],
) -> list[str]:
    """CRIU's command line to restore into root_mount (a mount point: CRIU's --root must be one);
    inherited maps fds CRIU is given to what they stand for (a pipe of descriptors.json, a key of
    EXTERNAL_NAMESPACES)."""
    linux = config.get("linux") or {}
    args = [
        criu,
        "restore",
        "--root", str(root_mount),
        "--restore-detached",
        "--restore-sibling",
        "--pidfile", str(pidfile),
        *options.common_args("restore.log"),
        *(arg for name in options.empty_ns for arg in ("--empty-ns", EMPTY_NAMESPACES[name])),
    ]  # fmt: skip
    for mount in config.get("mounts") or []:
        if _is_bind(mount):
            args += ["--ext-mount-map", f"{os.path.normpath(mount['destination'])}:{mount['source']}"]
    if linux.get("maskedPaths"):
        args += ["--ext-mount-map", "/dev/null:/dev/null"]
    for device in linux.get("devices") or []:
        args += ["--ext-mount-map", f"{device['path']}:{device['path']}"]
    for fd, key in inherited.items():
        args += ["--inherit-fd", f"fd[{fd}]:{key}"]
    return [*args, *EXTERNAL_MOUNTS]


def checkpoint(pid: int, group: fs.Cgroup, root: Path, config: dict[str, Any], options: CriuOptions) -> None:
    """Dump the container into options.image_path (made if need be). Without leave_running (or
    pre_dump) its processes end once the images are complete. CheckpointError if CRIU fails: the
    container runs on, thawed."""
    criu = _criu()
    for directory in (options.image_path, options.work_path):
        if directory:
            directory.mkdir(parents=True, exist_ok=True)
    if not options.pre_dump:
        descriptors = [_readlink(f"/proc/{pid}/fd/{fd}") for fd in (0, 1, 2)]
        (options.image_path / DESCRIPTORS).write_text(json.dumps(descriptors))
        (options.image_path / DUMPED).write_text(json.dumps({"init_pid": pid}))
    args = dump_args(criu, pid, group, root, config, options)
    try:
        _run_criu(
            args, options.log("dump.log"), _hook_env(None, "", options.image_path), lambda: (0, None), None
        )
    except CheckpointError as error:
        if group.path.exists():
            freezer.set_frozen(group, False)  # CRIU thaws what it froze; make sure
        raise CheckpointError(f"{error}; the container is still running") from None


def restore(
    group: fs.Cgroup, root: Path, config: dict[str, Any], options: CriuOptions, stdio: dict[int, int]
) -> int:
    """Restore the images of options.image_path inside group (made from config.json, limits written),
    on the container root `root`, and return the restored init's pid. It is the caller's child
    (--restore-sibling); its stdin, stdout and stderr are stdio's fds (0, 1, 2 -> ours) where they were
    pipes, sockets or files. CheckpointError if CRIU fails; the caller then removes the cgroup."""
    criu = _criu()
    try:
        descriptors = json.loads((options.image_path / DESCRIPTORS).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{options.image_path}: no checkpoint of cgctl-oci or runc here ({error})"
        ) from None
    with ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cgctl-oci-restore-")))
        root_mount, pidfile = scratch / "root", scratch / "pid"
        root_mount.mkdir()
        inherited = _inherit_stdio({str(fd): name for fd, name in enumerate(descriptors)}, stdio, stack)
        for kind, path in _joined_namespaces(config).items():
            namespace = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            stack.callback(os.close, namespace)
            inherited[namespace] = EXTERNAL_NAMESPACES[kind][1]
        env = _hook_env(None, "", options.image_path)
        if (options.image_path / DUMPED).exists():
            env["CGCTL_DUMPED_INIT_PID"] = str(
                json.loads((options.image_path / DUMPED).read_text())["init_pid"]
            )
        args = restore_args(criu, root_mount, pidfile, config, options, inherited)
        _run_criu(
            args,
            options.log("restore.log"),
            env,
            lambda: (0, None),
            None,
            cgroup=group,
            pass_fds=tuple(inherited),
            bind_root=(str(root), str(root_mount)),
            no_new_privs=bool((config.get("process") or {}).get("noNewPrivileges")),
        )
        return int(pidfile.read_text())


def _is_bind(mount: dict[str, Any]) -> bool:
    return mount.get("type") == "bind" or bool({"bind", "rbind"} & set(mount.get("options") or []))


def _bind_destinations(config: dict[str, Any]) -> list[str]:
    return [os.path.normpath(mount["destination"]) for mount in config.get("mounts") or [] if _is_bind(mount)]


def _joined_namespaces(config: dict[str, Any]) -> dict[str, str]:
    """The network and pid namespaces config.json joins by path: type -> path."""
    namespaces = (config.get("linux") or {}).get("namespaces") or []
    return {
        ns["type"]: ns["path"] for ns in namespaces if ns.get("path") and ns["type"] in EXTERNAL_NAMESPACES
    }


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except FileNotFoundError:  # closed
        return "/dev/null"
