"""What `cgctl-oci features` and `cgctl-oci spec` print: the runtime's abilities and a bundle's template.

Both follow runc 1.1's output field for field (tests/unit/data holds runc's own, which the tests
compare against), so tools that read runc's JSON read cgctl's. `features` is truthful about cgctl
rather than a copy of runc's: capabilities from spec.CAPABILITIES, seccomp actions, operators and
architectures from the profile parser (minus those this libseccomp does not know), mount options
from ns/mounts.py, hooks as bundle.py takes them, no AppArmor, SELinux or cgroup v1. `spec` is runc's
template exactly, so a bundle made with either runs on both.
"""

from __future__ import annotations

import os
from typing import Any

from cgctl import __version__
from cgctl.ns import mounts
from cgctl.runtime import bundle
from cgctl.sandbox import libseccomp, seccomp_profile
from cgctl.spec import CAPABILITIES

OCI_VERSION_MIN = "1.0.0"
# runc 1.1's template says so; kept, so that the template is runc's byte for byte.
TEMPLATE_OCI_VERSION = "1.0.2-dev"
# bundle.py refuses createContainer hooks (they would run in the container's mount namespace).
HOOKS = tuple(kind for kind in bundle.HOOK_KINDS if kind != "createContainer")
# config.json's namespace types, in runc's order.
NAMESPACES = ("cgroup", "ipc", "mount", "network", "pid", "user", "uts")
LIBSECCOMP_VERSION_ANNOTATION = "io.github.seccomp.libseccomp.version"
VERSION_ANNOTATION = "cgctl.version"

_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SPEC_CAPABILITIES = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
_NOSUID_NOEXEC_NODEV = ["nosuid", "noexec", "nodev"]
_MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
]  # fmt: skip
_READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]


def features() -> dict[str, Any]:
    """runc's `features` document, for what cgctl-oci supports on this host."""
    linux: dict[str, Any] = {
        "namespaces": list(NAMESPACES),
        "capabilities": list(CAPABILITIES),
        "cgroup": {"v1": False, "v2": True, "systemd": True, "systemdUser": False},
    }
    annotations = {VERSION_ANNOTATION: __version__}
    version = libseccomp.version()
    if version is not None:  # runc leaves seccomp out when built without it
        linux["seccomp"] = {
            "enabled": True,
            # SCMP_ACT_NOTIFY needs a listener, which cgctl has not: the profile parser refuses it.
            "actions": sorted(seccomp_profile.ACTIONS),
            "operators": sorted(seccomp_profile.OPS),
            "archs": sorted(name for name in seccomp_profile.ARCHES if _libseccomp_knows(name)),
        }
        annotations[LIBSECCOMP_VERSION_ANNOTATION] = version
    linux["apparmor"] = {"enabled": False}
    linux["selinux"] = {"enabled": False}
    return {
        "ociVersionMin": OCI_VERSION_MIN,
        "ociVersionMax": bundle.OCI_VERSION,
        "hooks": list(HOOKS),
        # what ns/mounts.py turns into flags and propagation (filesystem data such as size= is not listed)
        "mountOptions": sorted([*mounts.FLAGS, *mounts.PROPAGATION]),
        "linux": linux,
        "annotations": dict(sorted(annotations.items())),
    }


def _libseccomp_knows(oci_name: str) -> bool:
    lib = libseccomp.library()
    return lib is not None and lib.seccomp_arch_resolve_name(seccomp_profile.ARCHES[oci_name].encode()) != 0


def default_spec(rootless: bool = False, uid: int | None = None, gid: int | None = None) -> dict[str, Any]:
    """The config.json `runc spec [--rootless]` writes (json.dumps with indent="\\t" gives its bytes).

    Rootless, as runc makes it: a user namespace mapping root inside to the caller's effective uid
    and gid (`uid`, `gid` default to them), no network namespace (an unprivileged user could not
    configure one), /sys bound from the host (sysfs cannot be mounted without owning the network
    namespace), no gid=5 for devpts (that group is not mapped) and no device rules (a user
    namespace cannot create devices anyway).
    """
    sys_mount: dict[str, Any] = (
        {
            "destination": "/sys",
            "type": "none",
            "source": "/sys",
            "options": ["rbind", *_NOSUID_NOEXEC_NODEV, "ro"],
        }
        if rootless
        else {
            "destination": "/sys",
            "type": "sysfs",
            "source": "sysfs",
            "options": [*_NOSUID_NOEXEC_NODEV, "ro"],
        }
    )
    devpts_options = ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]
    linux: dict[str, Any] = {}
    if rootless:
        uid = os.geteuid() if uid is None else uid
        gid = os.getegid() if gid is None else gid
        linux["uidMappings"] = [{"containerID": 0, "hostID": uid, "size": 1}]
        linux["gidMappings"] = [{"containerID": 0, "hostID": gid, "size": 1}]
    else:
        devpts_options.append("gid=5")
        linux["resources"] = {"devices": [{"allow": False, "access": "rwm"}]}
    namespaces = (
        ["pid", "ipc", "uts", "mount", "user"] if rootless else ["pid", "network", "ipc", "uts", "mount"]
    )
    linux["namespaces"] = [{"type": kind} for kind in namespaces]
    linux["maskedPaths"] = list(_MASKED_PATHS)
    linux["readonlyPaths"] = list(_READONLY_PATHS)
    return {
        "ociVersion": TEMPLATE_OCI_VERSION,
        "process": {
            "terminal": True,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": [_PATH, "TERM=xterm"],
            "cwd": "/",
            "capabilities": {
                kind: list(_SPEC_CAPABILITIES) for kind in ("bounding", "effective", "permitted", "ambient")
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": True},
        "hostname": "runc",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
            },
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": devpts_options},
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": [*_NOSUID_NOEXEC_NODEV, "mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": list(_NOSUID_NOEXEC_NODEV),
            },
            sys_mount,
            {
                "destination": "/sys/fs/cgroup",
                "type": "cgroup",
                "source": "cgroup",
                "options": [*_NOSUID_NOEXEC_NODEV, "relatime", "ro"],
            },
        ],
        "linux": linux,
    }
