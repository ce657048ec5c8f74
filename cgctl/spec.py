"""The workload spec: one pydantic schema shared by the CLI, the API and policy files.

Values arrive as text from humans ("256M", "1.5", "/dev/vda:wbps=10M") and
leave as the exact strings the kernel's interface files take, so parsing
lives here, in validators, and every error names the value. Checks that need
the host (does the device exist, does this kernel expose that file) happen
when the spec is applied, before anything is created, and raise SpecError
with the field they concern.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from cgctl.limits import MAX, parse_count, parse_page_size, parse_rate, parse_size
from cgctl.netspec import NetworkSpec

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
NAMESPACES = ("cgroup", "ipc", "mnt", "net", "pid", "uts")
_CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_./-]{0,62}$")
# Linux capabilities, index = number (linux/capability.h); a kernel may know fewer (cap_last_cap).
_CAPABILITY_NAMES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)  # fmt: skip
CAPABILITIES = tuple(f"CAP_{name}" for name in _CAPABILITY_NAMES)
# What a root workload keeps by default: docker's set, enough to own files, switch users and serve on port 80.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)  # fmt: skip


class SpecError(ValueError):
    """A value that is well-formed but does not fit this host; `field` is its place in the spec."""

    def __init__(self, field: tuple[str | int, ...], value: object, reason: str) -> None:
        super().__init__(f"{'.'.join(map(str, field))}={value!r}: {reason}")
        self.field, self.value, self.reason = field, value, reason


def format_size(size: int | Literal["max"]) -> str:
    """'64 MiB', '1.5 GiB', '512 B', 'max': what humans read in messages and tables."""
    if size == MAX:
        return MAX
    for exponent, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if size >= 1024**exponent:
            return f"{size / 1024**exponent:.4g} {unit}"
    return f"{size} B"


Size = Annotated[int | Literal["max"], BeforeValidator(parse_size)]
PageSize = Annotated[str, BeforeValidator(lambda value: parse_page_size(str(value)))]
Count = Annotated[int | Literal["max"], BeforeValidator(parse_count)]
Rate = Annotated[int, BeforeValidator(parse_rate)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemoryLimits(_Model):
    """memory.* interface files; None leaves the kernel's default."""

    max: Size | None = Field(None, description="memory.max: hard limit; over it the OOM killer runs")
    high: Size | None = Field(None, description="memory.high: throttle and reclaim above this")
    low: Size | None = Field(None, description="memory.low: best-effort protection from reclaim")
    min: Size | None = Field(None, description="memory.min: hard protection from reclaim")
    swap_max: Size | None = Field(None, description="memory.swap.max: swap the workload may use")
    zswap_max: Size | None = Field(None, description="memory.zswap.max: compressed swap it may use")
    oom_group: bool = Field(True, description="memory.oom.group: an OOM kills the whole workload")


class CpuLimits(_Model):
    cpus: Decimal | None = Field(None, description="CPUs' worth of time per period (cpu.max), e.g. 1.5")
    weight: int | None = Field(None, ge=1, le=10000, description="cpu.weight: share under contention")
    cpuset: str | None = Field(None, description="cpuset.cpus: the CPUs it may run on, e.g. 0-3,6")
    idle: bool = Field(False, description="cpu.idle: run only when nothing else wants the CPU")

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, value: object) -> Decimal | None:
        if value is None:
            return None
        try:
            cpus = Decimal(str(value).strip())
        except InvalidOperation:
            raise ValueError("not a number of CPUs (e.g. 0.5, 2)") from None
        if not cpus.is_finite() or cpus < Decimal("0.01"):
            raise ValueError("give at least 0.01 CPUs (cpu.max's quota is at least 1 ms)")
        return cpus

    @field_validator("cpuset")
    @classmethod
    def _cpuset(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _CPU_LIST.match(value):
            raise ValueError("not a CPU list (e.g. 0, 0-3, 0,2-5)")
        for part in value.split(","):
            low, _, high = part.partition("-")
            if high and int(high) < int(low):
                raise ValueError(f"the range {part} runs backwards")
        return value


class IoDeviceLimit(_Model):
    """One io.max line: a device (block device path or MAJ:MIN) and its bandwidth and IOPS caps."""

    device: str
    rbps: Size | None = None
    wbps: Size | None = None
    riops: Count | None = None
    wiops: Count | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        """'DEV:rbps=N,wbps=N,riops=N,wiops=N', as on the command line."""
        if not isinstance(value, str):
            return value
        if "=" not in value or ":" not in value[: value.index("=")]:
            raise ValueError("not DEV:KEY=VALUE[,...] (e.g. /dev/sda:wbps=10M,riops=100)")
        device = value[: value.index("=")].rpartition(":")[0]
        fields: dict[str, str] = {"device": device}
        for setting in value[len(device) + 1 :].split(","):
            key, _, amount = setting.partition("=")
            if key not in ("rbps", "wbps", "riops", "wiops") or not amount:
                raise ValueError(f"{setting!r} is not one of rbps=, wbps=, riops=, wiops=")
            fields[key] = amount
        return fields

    @model_validator(mode="after")
    def _something_set(self) -> IoDeviceLimit:
        if not self.device:
            raise ValueError("no device given")
        if (self.rbps, self.wbps, self.riops, self.wiops) == (None, None, None, None):
            raise ValueError(f"{self.device}: give at least one of rbps, wbps, riops, wiops")
        return self


class IoWeight(_Model):
    """io.weight for all devices (device None) or one device."""

    device: str | None = None
    weight: int = Field(ge=1, le=10000)

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        """'W' or 'DEV:W', as on the command line."""
        if isinstance(value, int | str) and not isinstance(value, bool):
            device, _, weight = str(value).rpartition(":")
            if not weight.strip().isdigit():
                raise ValueError("not a weight 1..10000, or DEV:WEIGHT")
            return {"device": device or None, "weight": int(weight)}
        return value


class IoLimits(_Model):
    max: list[IoDeviceLimit] = Field(default_factory=list, description="io.max, one entry per device")
    weight: list[IoWeight] = Field(default_factory=list, description="io.weight: default and per device")


class PidsLimits(_Model):
    max: Count | None = Field(None, description="pids.max: the most processes and threads at once")

    @field_validator("max")
    @classmethod
    def _at_least_one(cls, value: int | Literal["max"] | None) -> int | Literal["max"] | None:
        if value == 0:
            raise ValueError("0 would forbid the workload itself; give at least 1")
        return value


class NetworkLimits(_Model):
    """Bandwidth, through the CNI bandwidth plugin (a token bucket on the container's host-side
    interface): not a cgroup's, but as much a resource as the others."""

    ingress: Rate | None = Field(None, description="bits per second into the container")
    egress: Rate | None = Field(None, description="bits per second out of the container")


class Limits(_Model):
    memory: MemoryLimits = Field(default_factory=MemoryLimits)
    cpu: CpuLimits = Field(default_factory=CpuLimits)
    io: IoLimits = Field(default_factory=IoLimits)
    pids: PidsLimits = Field(default_factory=PidsLimits)
    network: NetworkLimits = Field(default_factory=NetworkLimits)
    hugetlb: dict[PageSize, Size] = Field(
        default_factory=dict, description="hugetlb.<size>.max: page size (2MB, 1GB) -> huge pages' bytes"
    )
    files: dict[str, str] = Field(
        default_factory=dict, description="any other interface file: name -> value (the escape hatch)"
    )

    @field_validator("files")
    @classmethod
    def _file_names(cls, files: dict[str, str]) -> dict[str, str]:
        for name in files:
            if "/" in name or "." not in name or name.startswith("."):
                raise ValueError(f"{name!r} is not a cgroup interface file name (e.g. memory.swap.high)")
        return files


class IdMapping(_Model):
    """One line of a user namespace's uid_map or gid_map (OCI linux.uidMappings/gidMappings)."""

    container_id: int = Field(ge=0, lt=1 << 32)
    host_id: int = Field(ge=0, lt=1 << 32)
    size: int = Field(ge=1, lt=1 << 32)


NamespaceKind = Literal["cgroup", "ipc", "mnt", "net", "pid", "uts"]


class Namespaces(_Model):
    """New namespaces by default; `share` keeps the host's; `join` enters existing ones by path;
    `user` adds a user namespace."""

    share: list[NamespaceKind] = Field(default_factory=list)
    user: bool = Field(False, description="a user namespace mapping root inside to the caller outside")
    join: dict[NamespaceKind | Literal["user"], str] = Field(
        default_factory=dict, description="kind -> a namespace file (/proc/PID/ns/KIND) to setns into"
    )
    uid_mappings: list[IdMapping] = Field(
        default_factory=list, description="the new user namespace's uid_map (default: root -> the caller)"
    )
    gid_mappings: list[IdMapping] = Field(default_factory=list, description="its gid_map, likewise")

    def private(self) -> list[str]:
        """The namespaces the workload does not share with the host: new ones and joined ones."""
        return [name for name in NAMESPACES if name not in self.share]

    @model_validator(mode="after")
    def _consistent(self) -> Namespaces:
        for kind, path in self.join.items():
            _absolute(path)
            if kind in self.share:
                raise ValueError(f"the {kind} namespace cannot be both shared and joined ({path})")
        if "user" in self.join and self.user:
            raise ValueError(f"join a user namespace ({self.join['user']}) or make one (user), not both")
        if (self.uid_mappings or self.gid_mappings) and not self.user:
            raise ValueError("uid/gid mappings are for a new user namespace: set user too")
        if bool(self.uid_mappings) != bool(self.gid_mappings):
            raise ValueError("give both uid_mappings and gid_mappings, or neither")
        return self


def _absolute(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"{path!r} is not an absolute path")
    return path


def _inside_root(path: str) -> str:
    """An absolute path in the workload's root that cannot climb out of it."""
    if ".." in path.split("/"):
        raise ValueError(f"{path!r}: '..' could leave the root")
    return _absolute(path)


class Volume(_Model):
    """A host path bind-mounted into the container's root: HOST:PATH[:ro]."""

    source: str = Field(description="absolute path on the host")
    target: str = Field(description="absolute path in the container")
    read_only: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        parts = value.split(":")
        if len(parts) == 3 and parts[2] in ("ro", "rw"):
            return {"source": parts[0], "target": parts[1], "read_only": parts[2] == "ro"}
        if len(parts) == 2:
            return {"source": parts[0], "target": parts[1]}
        raise ValueError("not HOST:PATH or HOST:PATH:ro")

    @field_validator("source", "target")
    @classmethod
    def _absolute_paths(cls, path: str) -> str:
        return _absolute(path)


class RootFs(_Model):
    """A root of the workload's own: overlayfs over read-only layers, writes to an upper layer; or a
    prepared directory used as it is (OCI root.path)."""

    layers: list[str] = Field(default_factory=list, description="lower layer directories, bottom first")
    path: str | None = Field(None, description="a prepared root directory, used as it is (no overlay)")
    upper: str | None = Field(None, description="a directory for the upper layer (default: tmpfs)")
    keep_upper: bool = Field(False, description="keep the upper directory when the container ends")
    read_only: bool = Field(False, description="mount the root read-only (/tmp and volumes excepted)")
    image: str | None = Field(None, description="the image NAME:TAG the layers come from")

    @field_validator("layers")
    @classmethod
    def _layer_paths(cls, layers: list[str]) -> list[str]:
        for layer in layers:
            _absolute(layer)
            if ":" in layer or "," in layer:  # overlayfs's option syntax
                raise ValueError(f"{layer!r}: overlayfs cannot take a layer path with ':' or ','")
        return layers

    @field_validator("upper")
    @classmethod
    def _upper_path(cls, upper: str | None) -> str | None:
        return None if upper is None else cls._layer_paths([upper])[0]

    @field_validator("path")
    @classmethod
    def _root_path(cls, path: str | None) -> str | None:
        return None if path is None else _absolute(path)

    @model_validator(mode="after")
    def _keep_needs_upper(self) -> RootFs:
        if bool(self.layers) == (self.path is not None):
            raise ValueError("give exactly one of layers (an overlay) and path (a prepared root)")
        if self.path is not None and self.upper is not None:
            raise ValueError("a prepared root (path) is used as it is: it takes no upper directory")
        if self.keep_upper and self.upper is None:
            raise ValueError("keep_upper needs an upper directory (--upper DIR): a tmpfs cannot be kept")
        return self


class Mount(_Model):
    """One mount into the workload's root, in order (OCI mounts[]): options as mount(8) and runc take
    them (bind, rbind, ro, nosuid, rprivate, size=64m, ...)."""

    destination: str = Field(description="absolute path in the container")
    type: str | None = Field(None, description="filesystem type (tmpfs, proc, bind, ...)")
    source: str | None = Field(None, description="a host path for binds, else the device name")
    options: list[str] = Field(default_factory=list)

    @field_validator("destination")
    @classmethod
    def _inside(cls, destination: str) -> str:
        return _inside_root(destination)


# setrlimit(2)'s resources, as OCI names them.
RLIMITS = ("RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
           "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC",
           "RLIMIT_RSS", "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK")  # fmt: skip


class Rlimit(_Model):
    """A resource limit set before exec (OCI process.rlimits[]); 2**64-1 is unlimited."""

    type: Literal[RLIMITS]  # type: ignore[valid-type]
    soft: int = Field(ge=0, lt=1 << 64)
    hard: int = Field(ge=0, lt=1 << 64)

    @model_validator(mode="after")
    def _soft_under_hard(self) -> Rlimit:
        if self.soft > self.hard:
            raise ValueError(f"{self.type}: the soft limit {self.soft} is over the hard limit {self.hard}")
        return self


def capability_name(name: str) -> str:
    """'CAP_SYS_ADMIN' from 'sys_admin', 'SYS_ADMIN' or 'cap_sys_admin'; 'ALL' stays 'ALL'."""
    upper = name.strip().upper()
    if upper == "ALL":
        return upper
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full not in CAPABILITIES:
        raise ValueError("not a Linux capability (e.g. NET_ADMIN, CAP_SYS_PTRACE, ALL)")
    return full


Capability = Annotated[str, BeforeValidator(lambda value: capability_name(str(value)))]


class Device(_Model):
    """A host device node the workload may use: HOST_PATH[:CONTAINER_PATH][:rwm]."""

    path: str = Field(description="the device node on the host")
    target: str | None = Field(None, description="where it appears in the container (default: path)")
    access: str = Field("rwm", description="r, w and/or m (mknod)")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        parts = value.split(":")
        access = parts.pop() if len(parts) > 1 and not parts[-1].startswith("/") else None
        if not 1 <= len(parts) <= 2:
            raise ValueError("not HOST_PATH[:CONTAINER_PATH][:rwm]")
        target = parts[1] if len(parts) == 2 else None
        return {"path": parts[0], "target": target, "access": "rwm" if access is None else access}

    @field_validator("path", "target")
    @classmethod
    def _absolute_paths(cls, path: str | None) -> str | None:
        return None if path is None else _absolute(path)

    @field_validator("access")
    @classmethod
    def _access(cls, access: str) -> str:
        if not access or set(access) - set("rwm") or len(set(access)) != len(access):
            raise ValueError(f"{access!r} is not an access mode: r, w and/or m, each once (e.g. rw)")
        return access


class CapabilitySets(_Model):
    """Exactly these capabilities in each set (OCI process.capabilities), whatever the user."""

    bounding: list[Capability] = Field(default_factory=list)
    effective: list[Capability] = Field(default_factory=list)
    inheritable: list[Capability] = Field(default_factory=list)
    permitted: list[Capability] = Field(default_factory=list)
    ambient: list[Capability] = Field(default_factory=list)

    @model_validator(mode="after")
    def _subsets(self) -> CapabilitySets:
        for name in ("bounding", "effective", "inheritable", "permitted", "ambient"):
            if "ALL" in getattr(self, name):
                raise ValueError(f"{name}: name each capability (ALL is for cap_drop)")
        for name, within in (
            ("effective", "permitted"),
            ("ambient", "permitted"),
            ("ambient", "inheritable"),
        ):
            extra = set(getattr(self, name)) - set(getattr(self, within))
            if extra:
                raise ValueError(f"{name} holds {', '.join(sorted(extra))}, which {within} lacks")
        return self

    def mask(self, name: str) -> int:
        """The set as bits (bit N = capability N)."""
        return sum(1 << CAPABILITIES.index(cap) for cap in set(getattr(self, name)))


class DeviceNode(_Model):
    """A device node made in the container's /dev (OCI linux.devices[]); it is allowed rwm too."""

    path: str = Field(description="absolute path in the container")
    type: Literal["c", "b", "u", "p"]
    major: int = Field(0, ge=0, lt=1 << 12)
    minor: int = Field(0, ge=0, lt=1 << 20)
    file_mode: int | None = Field(None, ge=0, le=0o7777, description="permission bits (default 0666)")
    uid: int | None = Field(None, ge=0)
    gid: int | None = Field(None, ge=0)

    @field_validator("path")
    @classmethod
    def _in_dev(cls, path: str) -> str:
        return _inside_root(path)


class DeviceRule(_Model):
    """One cgroup device rule (OCI linux.resources.devices[]): None or -1 is any major or minor."""

    allow: bool
    type: Literal["a", "c", "b"] = "a"
    major: int | None = Field(None, ge=-1, lt=1 << 31)
    minor: int | None = Field(None, ge=-1, lt=1 << 31)
    access: str = "rwm"

    @field_validator("major", "minor")
    @classmethod
    def _any(cls, number: int | None) -> int | None:
        return None if number == -1 else number

    @field_validator("access")
    @classmethod
    def _access(cls, access: str) -> str:
        return Device._access(access)


class Security(_Model):
    """The default sandbox and its exceptions: what the workload may ask of the kernel and the host."""

    privileged: bool = Field(
        False, description="turn the sandbox off: every capability, no seccomp, all devices, writable /proc"
    )
    cap_add: list[Capability] = Field(default_factory=list, description="capabilities over the default set")
    cap_drop: list[Capability] = Field(default_factory=list, description="capabilities to drop; ALL for all")
    no_new_privileges: bool = Field(True, description="setuid and file capabilities grant nothing on exec")
    seccomp: str = Field(
        "default", description="default, unconfined, or an absolute path to an OCI/docker JSON profile"
    )
    devices: list[Device] = Field(default_factory=list, description="host device nodes it may use")
    capability_sets: CapabilitySets | None = Field(
        None, description="exactly these capability sets (instead of the default set, cap_add, cap_drop)"
    )
    masked_paths: list[str] | None = Field(None, description="kernel paths to hide (None: the defaults)")
    readonly_paths: list[str] | None = Field(None, description="paths made read-only (None: the defaults)")
    sysctl: dict[str, str] = Field(default_factory=dict, description="namespaced /proc/sys values to set")
    device_nodes: list[DeviceNode] = Field(default_factory=list, description="nodes made in its /dev")
    device_rules: list[DeviceRule] | None = Field(
        None, description="the cgroup device rules in order, over deny-all (None: the default rules)"
    )

    @field_validator("masked_paths", "readonly_paths")
    @classmethod
    def _absolute_list(cls, paths: list[str] | None) -> list[str] | None:
        for path in paths or []:
            _absolute(path)
        return paths

    @field_validator("sysctl")
    @classmethod
    def _sysctl_names(cls, values: dict[str, str]) -> dict[str, str]:
        for key in values:
            if sysctl_namespace(key) is None:
                raise ValueError(
                    f"sysctl {key!r} is not namespaced (only kernel.msg*, kernel.sem, kernel.shm*, "
                    "fs.mqueue.*, net.*, kernel.hostname, kernel.domainname): it would change the host"
                )
        return values

    @model_validator(mode="after")
    def _sets_alone(self) -> Security:
        if self.capability_sets is not None and (self.cap_add or self.cap_drop or self.privileged):
            raise ValueError(
                "capability_sets says every set exactly: leave out cap_add, cap_drop, privileged"
            )
        return self

    @field_validator("cap_add")
    @classmethod
    def _no_add_all(cls, names: list[str]) -> list[str]:
        if "ALL" in names:
            raise ValueError("adding ALL capabilities is --privileged's job (or name each one)")
        return names

    @field_validator("seccomp")
    @classmethod
    def _seccomp_source(cls, source: str) -> str:
        if source not in ("default", "unconfined") and not source.startswith("/"):
            raise ValueError("give default, unconfined, or an absolute path to a JSON profile")
        return source

    def capabilities(self) -> list[str]:
        """The capability set a root workload keeps, in the kernel's order (the bounding set when the
        sets are explicit)."""
        if self.capability_sets is not None:
            return [name for name in CAPABILITIES if name in self.capability_sets.bounding]
        if self.privileged:
            return list(CAPABILITIES)
        kept = set() if "ALL" in self.cap_drop else set(DEFAULT_CAPABILITIES) - set(self.cap_drop)
        kept |= set(self.cap_add)
        return [name for name in CAPABILITIES if name in kept]


_IPC_SYSCTLS = ("kernel.sem", "kernel.msgmax", "kernel.msgmnb", "kernel.msgmni", "kernel.shmall",
                "kernel.shmmax", "kernel.shmmni", "kernel.shm_rmid_forced")  # fmt: skip


def sysctl_namespace(key: str) -> str | None:
    """The namespace that owns a sysctl (ipc, net, uts), or None for one the host shares."""
    if key in _IPC_SYSCTLS or key.startswith("fs.mqueue."):
        return "ipc"
    if key.startswith("net.") and "/" not in key and ".." not in key:
        return "net"
    if key in ("kernel.hostname", "kernel.domainname"):
        return "uts"
    return None


def _command_not_blank(command: list[str]) -> list[str]:
    if not command[0]:
        raise ValueError("the command is empty")
    return command


def _env_names(env: dict[str, str]) -> dict[str, str]:
    for name in env:
        if not _ENV_NAME.match(name):
            raise ValueError(f"{name!r} is not an environment variable name")
    return env


# The parts of a process that WorkloadSpec and ExecSpec share, with one check each.
Command = Annotated[list[str], Field(min_length=1, description="argv"), AfterValidator(_command_not_blank)]
Environment = Annotated[dict[str, str], AfterValidator(_env_names)]
WorkDir = Annotated[str, AfterValidator(_absolute)] | None
User = Annotated[
    str | None,
    Field(
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?$",
        description="USER[:GROUP], names or ids, looked up in the root's /etc/passwd and /etc/group",
    ),
]


class WorkloadSpec(_Model):
    """What to run, where, and within which limits."""

    name: str | None = Field(None, pattern=NAME_PATTERN, description="unique name; also the cgroup's name")
    command: Command
    limits: Limits = Field(default_factory=Limits)
    namespaces: Namespaces = Field(default_factory=Namespaces)
    hostname: str | None = Field(None, min_length=1, max_length=64, description="default: the name")
    env: Environment = Field(default_factory=dict, description="added to the caller's environment")
    workdir: WorkDir = Field(None, description="working directory (default: the caller's)")
    labels: dict[str, str] = Field(default_factory=dict, description="metadata; never in the environment")
    init: bool = Field(False, description="run a minimal reaper as pid 1 that forwards signals")
    user: User = None
    rootfs: RootFs | None = Field(None, description="a root of its own; default: the host's")
    volumes: list[Volume] = Field(default_factory=list, description="bind mounts into its root")
    security: Security = Field(default_factory=Security)
    tty: bool = Field(False, description="a terminal of its own (a pty from its devpts) as its stdio")
    interactive: bool = Field(False, description="keep its stdin open, for `attach` through the daemon")
    mounts: list[Mount] | None = Field(
        None, description="exactly these mounts into its root, in order (None: /dev, /tmp, /proc, /sys...)"
    )
    rlimits: list[Rlimit] = Field(default_factory=list, description="resource limits set before exec")
    additional_gids: list[Annotated[int, Field(ge=0, lt=1 << 32)]] = Field(
        default_factory=list, description="supplementary groups (default: none)"
    )
    umask: int | None = Field(None, ge=0, le=0o777, description="its umask (default: the caller's)")
    oom_score_adj: int | None = Field(None, ge=-1000, le=1000, description="/proc/self/oom_score_adj")
    domainname: str | None = Field(None, min_length=1, max_length=64, description="its NIS domain name")
    personality: Literal["LINUX", "LINUX32"] | None = Field(None, description="personality(2) domain")
    network: NetworkSpec = Field(default_factory=NetworkSpec, description="its network (docs/network.md)")

    @model_validator(mode="after")
    def _inside_fits(self) -> WorkloadSpec:
        """The container's inside asks for namespaces and a root it has."""
        private = set(self.namespaces.private())
        if self.mounts is not None and self.rootfs is None:
            raise ValueError("mounts go into a root of its own: give rootfs too")
        if self.domainname is not None and "uts" not in private:
            raise ValueError("a domain name needs its own uts namespace: drop --share uts")
        for key in self.security.sysctl:
            owner = sysctl_namespace(key)
            if owner not in private:
                raise ValueError(f"sysctl {key!r} needs its own {owner} namespace: the host's would change")
        names = [limit.type for limit in self.rlimits]
        if len(set(names)) != len(names):
            raise ValueError("each rlimit type once")
        if self.security.device_nodes and self.rootfs is None:
            raise ValueError("device nodes are made in a root of its own: give rootfs too")
        return self

    @model_validator(mode="after")
    def _host_network(self) -> WorkloadSpec:
        """--share net is --network host: one of them says it, and the other follows."""
        shared, mode = "net" in self.namespaces.share, self.network.mode
        if shared and mode not in (None, "host"):
            raise ValueError(f"--share net is --network host, not --network {mode}")
        if shared and mode is None:
            self.network.mode = "host"
        if mode == "host" and not shared:
            self.namespaces.share.append("net")
        if self.network.mode is not None and self.network.mode != "none" and "net" in self.namespaces.join:
            raise ValueError(f"joining a net namespace ({self.namespaces.join['net']}) is --network none's")
        return self

    @model_validator(mode="after")
    def _root_needs_mount_namespace(self) -> WorkloadSpec:
        if self.rootfs is not None and "mnt" in self.namespaces.share:
            raise ValueError("a root of its own needs its own mount namespace: drop --share mnt")
        if self.volumes and self.rootfs is None:
            raise ValueError("volumes need a root of its own (--rootfs, --layer or --image)")
        if "mnt" in self.namespaces.share and not self.security.privileged:
            raise ValueError(
                "the sandbox masks kernel paths in the workload's own mount namespace: "
                "--share mnt needs --privileged"
            )
        for device in self.security.devices:
            if device.target not in (None, device.path) and self.rootfs is None:
                raise ValueError(
                    f"--device {device.path}:{device.target}: a path of its own needs a root of its own"
                )
        return self

    @field_validator("labels")
    @classmethod
    def _label_keys(cls, labels: dict[str, str]) -> dict[str, str]:
        for key in labels:
            if not _LABEL_KEY.match(key):
                raise ValueError(
                    f"{key!r} is not a label key ([A-Za-z_][A-Za-z0-9_./-]*, at most 63 characters)"
                )
        return labels


class ExecSpec(_Model):
    """A process to start in a running container (`cgctl exec`): it joins the container's namespaces,
    cgroup, root and sandbox; what it leaves unset is the container's."""

    command: Command
    env: Environment = Field(default_factory=dict, description="over the container's environment")
    user: User = None
    workdir: WorkDir = Field(None, description="default: the container's, else /")
    tty: bool = Field(False, description="a terminal of its own, from the container's devpts")
    interactive: bool = Field(False, description="keep its stdin open")
    privileged: bool = Field(False, description="allowed only for a --privileged container, which it then is")
