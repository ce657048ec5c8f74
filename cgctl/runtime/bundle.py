"""An OCI bundle's config.json as cgctl's own WorkloadSpec, so `cgctl-oci` runs it down `cgctl run`'s path.

The runtime specification says what a container is, field by field; each field either becomes a
field of the one schema (cgctl/spec.py) or is refused by name (`BundleError`, before anything is
created): a setting cgctl would silently drop is worse than a clear no. What the spec has no
field for and only the OCI lifecycle needs (hooks, cgroupsPath, annotations) comes back beside
it, in `Bundle`.

Where OCI and cgctl differ in defaults, OCI's apply, since the config is explicit: no seccomp
filter unless `linux.seccomp` is given, no_new_privileges only if asked, exactly the capabilities
listed, the environment as given (nothing of the caller's).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cgctl.runtime.hooks import Hook
from cgctl.spec import WorkloadSpec

OCI_VERSION = "1.0.2"
# The OCI names of namespaces, as cgctl's spec names them.
NAMESPACE_NAMES = {
    "pid": "pid",
    "network": "net",
    "mount": "mnt",
    "ipc": "ipc",
    "uts": "uts",
    "cgroup": "cgroup",
}
HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
# Annotations that become labels (Kubernetes' names of a container and its pod, as the CRI sets them).
LABELLED_ANNOTATIONS = (
    "io.kubernetes.pod.name",
    "io.kubernetes.pod.namespace",
    "io.kubernetes.pod.uid",
    "io.kubernetes.container.name",
    "io.kubernetes.cri.sandbox-name",
    "io.kubernetes.cri.sandbox-namespace",
    "io.kubernetes.cri.container-name",
    "io.kubernetes.cri.container-type",
)


# The devices runc allows after the config's own rules, whatever they say (specconv's AllowedDevices):
# mknod of any node, the harmless character devices, and the container's ptys.
RUNC_ALLOWED_DEVICES = (
    {"allow": True, "type": "c", "access": "m"},
    {"allow": True, "type": "b", "access": "m"},
    *({"allow": True, "type": "c", "major": major, "minor": minor, "access": "rwm"}
      for major, minor in ((1, 3), (1, 8), (1, 7), (5, 0), (1, 5), (1, 9), (136, -1), (5, 2))),
)  # fmt: skip


class BundleError(ValueError):
    """config.json asks for something cgctl cannot do, or says it badly; the message names the field."""


@dataclass
class Bundle:
    """A container as config.json describes it: the spec, and what only the OCI lifecycle needs."""

    spec: WorkloadSpec
    directory: Path
    root: Path  # root.path, made absolute against the bundle
    cgroups_path: str  # linux.cgroupsPath as given ("" if none)
    seccomp: dict[str, Any] | None  # linux.seccomp, written where spec.security.seccomp points
    config: dict[str, Any] = field(default_factory=dict)  # as read (CRIU's external mounts come from it)
    hooks: dict[str, list[Hook]] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def load(directory: Path, container_id: str, seccomp_file: Path) -> Bundle:
    """The bundle at directory; its seccomp profile (if any) will be at seccomp_file (the caller
    writes it there before the sandbox is planned). Raises BundleError."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no such file: a bundle is a directory with config.json") from None
    except (OSError, ValueError) as error:
        raise BundleError(f"{path}: cannot read it as JSON: {error}") from None
    if not isinstance(config, dict):
        raise BundleError(f"{path}: not a JSON object")
    return translate(config, directory.resolve(), container_id, seccomp_file)


def translate(config: dict[str, Any], directory: Path, container_id: str, seccomp_file: Path) -> Bundle:
    """config.json (as parsed) as a Bundle; see the module's docstring."""
    _refuse_unsupported(config)
    process = _section(config, "process")
    linux = _section(config, "linux")
    root = _section(config, "root")
    if not root.get("path"):
        raise BundleError("root.path: missing: the container's root directory must be given")
    root_path = (directory / root["path"]).resolve()
    if not root_path.is_dir():
        raise BundleError(f"root.path: {root_path} is not a directory")
    seccomp = as_libseccomp_keeps(linux["seccomp"]) if linux.get("seccomp") else None
    user = process.get("user") or {}
    resources = linux.get("resources") or {}
    spec_fields: dict[str, Any] = {
        "name": container_id,
        "command": process.get("args") or [],
        "env": _environment(process.get("env") or []),
        "workdir": process.get("cwd") or "/",
        "user": _user(user),
        "additional_gids": user.get("additionalGids") or [],
        "umask": user.get("umask"),
        "tty": bool(process.get("terminal", False)),
        "rlimits": process.get("rlimits") or [],
        "oom_score_adj": process.get("oomScoreAdj"),
        "hostname": config.get("hostname") or None,
        "domainname": config.get("domainname") or None,
        "personality": _personality(linux.get("personality")),
        "labels": {key: value for key, value in (config.get("annotations") or {}).items()
                   if key in LABELLED_ANNOTATIONS},
        "rootfs": {"path": str(root_path), "read_only": bool(root.get("readonly", False))},
        "mounts": config.get("mounts") or [],
        "namespaces": (namespaces := _namespaces(linux)),
        # The caller (containerd's CNI, podman's netavark) makes the network, as with runc.
        "network": {"mode": "host" if "net" in namespaces["share"] else "none"},
        "limits": limits_from_resources(resources),
        "security": {
            "no_new_privileges": bool(process.get("noNewPrivileges", False)),
            "seccomp": str(seccomp_file) if seccomp else "unconfined",
            "capability_sets": _capability_sets(process.get("capabilities") or {}),
            "masked_paths": linux.get("maskedPaths") or [],
            "readonly_paths": linux.get("readonlyPaths") or [],
            "sysctl": linux.get("sysctl") or {},
            "device_nodes": [_device_node(node) for node in linux.get("devices") or []],
            "device_rules": [*(resources.get("devices") or []), *RUNC_ALLOWED_DEVICES],
        },
    }  # fmt: skip
    try:
        spec = WorkloadSpec.model_validate(spec_fields)
    except ValidationError as error:
        first = error.errors()[0]
        where = "".join(f"{part}: " for part in [".".join(str(part) for part in first["loc"])] if part)
        raise BundleError(f"config.json: {where}{first['msg'].removeprefix('Value error, ')}") from None
    return Bundle(
        spec=spec,
        directory=directory,
        root=root_path,
        cgroups_path=str(linux.get("cgroupsPath") or ""),
        seccomp=seccomp,
        config=config,
        hooks=_hooks(config.get("hooks") or {}),
        annotations={str(key): str(value) for key, value in (config.get("annotations") or {}).items()},
    )


def as_libseccomp_keeps(profile: dict[str, Any]) -> dict[str, Any]:
    """The profile as runc's filter holds it. libseccomp keeps one of two rules for a system call whose
    actions differ when either applies to any arguments (the first of two such, the one for any
    arguments over one with args); cgctl's compiler refuses such pairs in a profile a user wrote, but
    a config.json's (podman's default lists setns both allowed and refused) must mean what it means
    under runc."""
    entries = [{**entry, "names": list(entry.get("names") or [])} for entry in profile.get("syscalls") or []]
    seen: dict[str, list[tuple[int, tuple[Any, Any], bool]]] = {}
    for index, entry in enumerate(entries):
        action, has_args = (entry.get("action"), entry.get("errnoRet")), bool(entry.get("args"))
        kept = []
        for name in entry["names"]:
            rivals = [r for r in seen.get(name, []) if r[1] != action and not (r[2] and has_args)]
            if rivals and (has_args or any(not r[2] for r in rivals)):
                continue  # an earlier rule for any arguments wins
            for rival, _, _ in rivals:  # earlier rules with args lose to this one for any arguments
                entries[rival]["names"].remove(name)
            seen[name] = [r for r in seen.get(name, []) if r not in rivals] + [(index, action, has_args)]
            kept.append(name)
        entry["names"] = kept
    return {**profile, "syscalls": [entry for entry in entries if entry["names"]]}


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name) or {}
    if not isinstance(value, dict):
        raise BundleError(f"{name}: not a JSON object")
    return value


# Fields cgctl does not implement, refused when set (to anything but their empty value).
_UNSUPPORTED = {
    ("linux", "intelRdt"): "Intel RDT (resctrl) is not supported by cgctl",
    ("linux", "mountLabel"): "SELinux labels are not supported by cgctl",
    ("linux", "timeOffsets"): "time namespace offsets are not supported by cgctl",
    ("linux", "rootfsPropagation"): "cgctl keeps the root's mounts private; leave rootfsPropagation out",
    ("process", "selinuxLabel"): "SELinux labels are not supported by cgctl",
    ("process", "apparmorProfile"): "AppArmor profiles are not supported by cgctl",
    ("process", "ioPriority"): "process.ioPriority is not supported by cgctl",
    ("process", "scheduler"): "process.scheduler is not supported by cgctl",
    ("process", "execCPUAffinity"): "process.execCPUAffinity is not supported by cgctl",
    ("solaris",): "not a Linux container",
    ("windows",): "not a Linux container",
    ("vm",): "virtual-machine containers are not supported by cgctl",
    ("linux", "resources", "network"): "classID and priorities are cgroup v1's; cgroup v2 has no such files",
    ("linux", "resources", "rdma"): "the rdma controller is not supported by cgctl",
}  # fmt: skip


def _refuse_unsupported(config: dict[str, Any]) -> None:
    for keys, reason in _UNSUPPORTED.items():
        value: Any = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value not in (None, "", [], {}):
            raise BundleError(f"{'.'.join(keys)}: {reason}")
    for kind in config.get("hooks") or {}:
        if kind == "createContainer" and config["hooks"][kind]:
            raise BundleError(
                "hooks.createContainer: not supported by cgctl-oci (it would have to run in the container's "
                "mount namespace before pivot_root); use createRuntime or startContainer"
            )
        if kind not in HOOK_KINDS:
            raise BundleError(f"hooks.{kind}: not a hook this runtime knows ({', '.join(HOOK_KINDS)})")


def _environment(entries: list[str]) -> dict[str, str]:
    env = {}
    for entry in entries:
        name, equals, value = str(entry).partition("=")
        if not equals:
            raise BundleError(f"process.env: {entry!r} is not NAME=VALUE")
        env[name] = value
    return env


def _user(user: dict[str, Any]) -> str | None:
    if user.get("username"):
        raise BundleError("process.user.username: Windows only; give uid and gid")
    return f"{int(user.get('uid', 0))}:{int(user.get('gid', 0))}"


def _namespaces(linux: dict[str, Any]) -> dict[str, Any]:
    """The namespaces config.json lists are the container's own (new, or joined by path); the others
    are shared with the host."""
    private, join = set(), {}
    user = False
    for index, entry in enumerate(linux.get("namespaces") or []):
        kind = entry.get("type")
        name = "user" if kind == "user" else NAMESPACE_NAMES.get(kind)
        if name is None:
            raise BundleError(f"linux.namespaces[{index}].type: {kind!r} is not a namespace cgctl can create")
        if entry.get("path"):
            join[name] = entry["path"]
        elif name == "user":
            user = True
        else:
            private.add(name)
    return {
        "share": [name for name in NAMESPACE_NAMES.values() if name not in private and name not in join],
        "user": user,
        "join": join,
        "uid_mappings": [_mapping(entry) for entry in linux.get("uidMappings") or []],
        "gid_mappings": [_mapping(entry) for entry in linux.get("gidMappings") or []],
    }


def _capability_sets(sets: dict[str, list[str]]) -> dict[str, list[str]]:
    """The five sets as listed, but for ambient capabilities outside inheritable or permitted: the
    kernel cannot raise those, and runc leaves them out (`runc spec`'s own config lists three)."""
    ambient = (
        set(sets.get("ambient") or []) & set(sets.get("inheritable") or []) & set(sets.get("permitted") or [])
    )
    return {**sets, "ambient": [name for name in sets.get("ambient") or [] if name in ambient]}


def _mapping(entry: dict[str, Any]) -> dict[str, Any]:
    return {
        "container_id": entry.get("containerID"),
        "host_id": entry.get("hostID"),
        "size": entry.get("size"),
    }


def _device_node(node: dict[str, Any]) -> dict[str, Any]:
    keys = {"path": "path", "type": "type", "major": "major", "minor": "minor", "fileMode": "file_mode",
            "uid": "uid", "gid": "gid"}  # fmt: skip
    return {ours: node[theirs] for theirs, ours in keys.items() if theirs in node}


def _personality(personality: dict[str, Any] | None) -> str | None:
    if not personality:
        return None
    if personality.get("flags"):
        raise BundleError("linux.personality.flags: not supported by cgctl")
    return str(personality.get("domain", "")).removeprefix("PER_") or None


def _hooks(hooks: dict[str, list[dict[str, Any]]]) -> dict[str, list[Hook]]:
    found: dict[str, list[Hook]] = {}
    for kind, entries in hooks.items():
        for index, entry in enumerate(entries or []):
            path = entry.get("path")
            if not path or not os.path.isabs(path):
                raise BundleError(f"hooks.{kind}[{index}].path: {path!r} is not an absolute path")
            timeout = entry.get("timeout")
            if timeout is not None and int(timeout) <= 0:
                raise BundleError(f"hooks.{kind}[{index}].timeout: {timeout!r} must be more than 0")
            found.setdefault(kind, []).append(
                Hook(path, list(entry.get("args") or [path]), list(entry.get("env") or []),
                     None if timeout is None else int(timeout))
            )  # fmt: skip
    return found


def limits_from_resources(resources: dict[str, Any]) -> dict[str, Any]:
    """OCI LinuxResources as the fields of cgctl's Limits (what `update --resources` takes too), with
    runc's conversions of cgroup v1 values to v2 (shares to weight, blkio weight to io weight)."""
    limits: dict[str, Any] = {}
    memory = resources.get("memory") or {}
    if memory:
        section: dict[str, Any] = {}
        if (limit := memory.get("limit")) is not None:
            section["max"] = _bytes(limit)
        if (reservation := memory.get("reservation")) is not None:
            section["low"] = _bytes(reservation)
        if (swap := memory.get("swap")) is not None:
            # OCI's swap is memory plus swap (v1's memsw); v2 limits swap alone.
            if swap == -1 or limit in (None, -1):
                section["swap_max"] = "max" if swap == -1 else swap
            else:
                section["swap_max"] = max(0, int(swap) - int(limit))
        if memory.get("disableOOMKiller"):
            raise BundleError(
                "linux.resources.memory.disableOOMKiller: cgroup v2 cannot turn the OOM killer off"
            )
        limits["memory"] = section
    cpu = resources.get("cpu") or {}
    if cpu:
        section = {}
        if shares := cpu.get("shares"):
            section["weight"] = 1 + (int(shares) - 2) * 9999 // 262142
        quota, period = cpu.get("quota"), cpu.get("period") or 100000
        if quota is not None and int(quota) > 0:
            section["cpus"] = str(Decimal(int(quota)) / Decimal(int(period)))
        if cpu.get("cpus"):
            section["cpuset"] = cpu["cpus"]
        if cpu.get("idle"):
            section["idle"] = True
        if cpu.get("realtimeRuntime") or cpu.get("realtimePeriod"):
            raise BundleError(
                "linux.resources.cpu.realtimeRuntime: cgroup v2 has no real-time bandwidth files"
            )
        if cpu.get("mems"):
            limits.setdefault("files", {})["cpuset.mems"] = cpu["mems"]
        limits["cpu"] = section
    pids = resources.get("pids") or {}
    if "limit" in pids:
        limits["pids"] = {"max": "max" if int(pids["limit"]) <= 0 else int(pids["limit"])}
    block = resources.get("blockIO") or {}
    if block:
        limits["io"] = _io(block)
    hugepages = resources.get("hugepageLimits") or []
    if hugepages:
        limits["hugetlb"] = {entry["pageSize"]: entry["limit"] for entry in hugepages}
    if resources.get("unified"):
        limits.setdefault("files", {}).update(resources["unified"])
    return limits


def _bytes(value: int) -> int | str:
    return "max" if int(value) == -1 else int(value)


def _io(block: dict[str, Any]) -> dict[str, Any]:
    def v2_weight(weight: int) -> int:
        return 1 + (int(weight) - 10) * 9999 // 990

    weights: list[dict[str, Any]] = [{"weight": v2_weight(block["weight"])}] if block.get("weight") else []
    weights += [
        {"device": f"{entry['major']}:{entry['minor']}", "weight": v2_weight(entry["weight"])}
        for entry in block.get("weightDevice") or []
        if entry.get("weight")
    ]
    caps: dict[str, dict[str, Any]] = {}
    for key, name in (("throttleReadBpsDevice", "rbps"), ("throttleWriteBpsDevice", "wbps"),
                      ("throttleReadIOPSDevice", "riops"), ("throttleWriteIOPSDevice", "wiops")):  # fmt: skip
        for entry in block.get(key) or []:
            device = f"{entry['major']}:{entry['minor']}"
            caps.setdefault(device, {"device": device})[name] = entry["rate"]
    return {"weight": weights, "max": list(caps.values())}
