"""The service's request and response models: the daemon serves them (and its OpenAPI description is
made from them), the remote runtime parses them, the CLI prints them. Requests refuse unknown fields."""

from __future__ import annotations

import re
import signal as signals
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    computed_field,
    field_validator,
    model_validator,
)

from cgctl.netspec import PortMapping
from cgctl.runtime.report import RunReport
from cgctl.spec import NAME_PATTERN, ExecSpec, WorkloadSpec, parse_size

ContainerState = Literal["running", "frozen", "restarting", "exited"]
EventType = Literal[
    "create", "start", "exit", "oom", "freeze", "thaw", "update", "restart", "checkpoint", "restore",
    "remove", "policy-reload", "policy-action", "policy-drift", "commit", "pull", "push",
]  # fmt: skip
RESTART_POLICIES = ("no", "on-failure", "always", "unless-stopped")


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RestartPolicy(_Request):
    """docker's policies: on-failure after a failed or unknown end (at most max_retries times);
    always and unless-stopped after any end, until a kill with SIGKILL/TERM/INT or rm (docs/daemon.md)."""

    name: Literal["no", "on-failure", "always", "unless-stopped"] = "no"
    max_retries: int | None = Field(None, ge=1, description="on-failure only: give up after this many")

    @model_validator(mode="before")
    @classmethod
    def _from_text(cls, value: object) -> object:
        """'on-failure:3' as on the command line."""
        if not isinstance(value, str):
            return value
        name, _, retries = value.partition(":")
        if name not in RESTART_POLICIES:
            raise ValueError(
                f"{value!r} is not a restart policy: no, on-failure[:N], always or unless-stopped"
            )
        if retries and (name != "on-failure" or not retries.isdigit()):
            raise ValueError(f"{value!r}: only on-failure takes a count of retries, e.g. on-failure:3")
        return {"name": name, "max_retries": int(retries) if retries else None}

    @model_validator(mode="after")
    def _retries_need_on_failure(self) -> RestartPolicy:
        if self.max_retries is not None and self.name != "on-failure":
            raise ValueError("max_retries is only for the on-failure policy")
        return self

    def __str__(self) -> str:
        return self.name + (f":{self.max_retries}" if self.max_retries else "")


def _size(value: object) -> int:
    size = parse_size(value)
    if size == "max":
        raise ValueError("a log needs a size limit")
    return size


class LogOptions(_Request):
    """The container's stdout and stderr, kept in files of at most max_size, max_files of them."""

    max_size: Annotated[int, BeforeValidator(_size), Field(ge=4096, le=2**40)] = 10 * 2**20
    max_files: int = Field(3, ge=1, le=100)


# A terminal's (rows, columns), as TIOCSWINSZ takes them.
ConsoleSize = tuple[Annotated[int, Field(ge=0, le=65535)], Annotated[int, Field(ge=0, le=65535)]]


class CreateRequest(_Request):
    """Run a workload detached: supervised by the daemon, output to its log files."""

    spec: WorkloadSpec
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    log: LogOptions = Field(default_factory=LogOptions)
    auto_remove: bool = Field(False, description="remove the container when it ends (run without -d)")
    console_size: ConsoleSize | None = Field(None, description="with spec.tty: its terminal's size at start")


class ExecRequest(_Request):
    """The first message of an exec stream (`/v1/containers/{name}/exec`)."""

    spec: ExecSpec
    console_size: ConsoleSize | None = Field(None, description="with spec.tty: its terminal's size at start")


class KillRequest(_Request):
    signal: str = Field("KILL", description="a name (TERM, SIGTERM) or a number")

    @field_validator("signal")
    @classmethod
    def _known(cls, value: str) -> str:
        return parse_signal(value).name


class FreezeRequest(_Request):
    timeout: float = Field(10.0, gt=0, le=600, description="seconds to wait for the kernel")


class UpdateRequest(_Request):
    limits: dict[str, dict[str, Any]] = Field(description="the fields of spec.limits to change")


class ImportRequest(_Request):
    path: str = Field(description="an OCI layout (dir or tar) or a docker save tarball on the daemon's host")
    reference: str = Field(description="NAME[:TAG]")


class RegistryAuth(_Request):
    """Credentials for one registry, from the client's `cgctl login` (or docker's) file."""

    username: str = Field(max_length=1024)
    password: SecretStr = Field(max_length=4096, description="never logged or shown")


class RegistryRequest(_Request):
    tls_ca: str | None = Field(None, pattern=r"^/", description="a CA certificate file on the daemon's host")
    insecure_registries: list[str] = Field(default_factory=list, description="domains allowed plain HTTP")
    auth: RegistryAuth | None = None


class PullRequest(RegistryRequest):
    reference: str = Field(max_length=1024, description="[REGISTRY/]NAME[:TAG][@DIGEST]")


class PushRequest(RegistryRequest):
    source: str = Field(max_length=1024, description="the image in the daemon's store")
    destination: str | None = Field(None, max_length=1024, description="where to push it (default: source)")


class PushResult(BaseModel):
    reference: str
    digest: str
    sent: int
    mounted: int
    present: int


class SaveRequest(_Request):
    reference: str = Field(max_length=1024)
    path: str = Field(pattern=r"^/", description="the archive to write, on the daemon's host")


class CommitRequest(_Request):
    reference: str = Field(max_length=1024, description="the new image's NAME[:TAG]")
    message: str = Field("", max_length=4096, description="the comment of its history entry")


class CheckpointRequest(_Request):
    dir: str = Field(pattern=r"^/", description="a new or empty directory on the daemon's host")
    leave_running: bool = False
    tcp_established: bool = False
    hook: str | None = Field(
        None,
        pattern=r"^/",
        description="an executable on the daemon's host run at each stage (docs/checkpoint.md)",
    )


class RestoreRequest(_Request):
    dir: str = Field(pattern=r"^/", description="a checkpoint directory on the daemon's host")
    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="the new container's name (default: the dumped one's)"
    )
    hook: str | None = Field(None, pattern=r"^/", description="an executable on the daemon's host")


class CheckpointResult(BaseModel):
    dir: str
    seconds: float
    image_bytes: int
    left_running: bool
    notes: list[str]  # what the images do not hold


class Attempt(BaseModel):
    """One start of a container and how it ended."""

    started_at: float
    pid: int | None = None
    finished_at: float | None = None
    exit_code: int | None = None  # None while it runs, when killed by a signal, or when unknown
    signal: int | None = None
    oom_killed: bool = False
    status_known: bool = True  # False: the exit status could not be learnt (say why in `ended`)
    ended: str = ""  # why it ended, in words: "exited", "killed by SIGKILL", "OOM killed", ...

    @property
    def exit_status(self) -> int | None:
        """As a shell reports it: the code, or 128+N for signal N; None if unknown or running."""
        if self.signal is not None:
            return 128 + self.signal
        return self.exit_code


class ContainerNetwork(BaseModel):
    """Where a container's network is, as `inspect` shows it (docker's NetworkSettings, smaller)."""

    mode: str = Field(description="none, host, bridge, a network's name or container:NAME")
    network: str | None = Field(None, description="the network its interface is on (bridge, NAME)")
    address: str | None = Field(None, description="its IPv4 address on that network")
    ports: list[PortMapping] = Field(default_factory=list, description="published ports, host ports chosen")

    @classmethod
    def of(cls, mode: str, attachment: dict[str, Any] | None) -> ContainerNetwork:
        """From the resolved mode and the attachment network.attach noted in the run record."""
        if not attachment:
            return cls(mode=mode)
        return cls(
            mode=mode,
            network=attachment.get("network"),
            address=attachment.get("address"),
            ports=[PortMapping.model_validate(p) for p in attachment.get("ports", [])],
        )


class Container(BaseModel):
    """A container as `ps` and `inspect` show it. Its environment is never shown."""

    name: str
    id: str
    state: ContainerState
    detached: bool  # False: a foreground `cgctl run`, supervised by that process
    pid: int | None
    cgroup: str
    image: str = ""
    command: list[str]
    labels: dict[str, str]
    created_at: float
    restart_policy: RestartPolicy = Field(default_factory=RestartPolicy)
    restart_count: int = 0
    attempts: list[Attempt] = Field(default_factory=list)
    report: RunReport | None = None  # the final accounting of the last attempt that ended
    spec: dict[str, Any]  # the spec as given, without env
    policies: list[str] = Field(default_factory=list, description="the policies applied (FILE:NAME)")
    network: ContainerNetwork | None = Field(None, description="its current (or last) attempt's network")

    @property
    def last(self) -> Attempt | None:
        return self.attempts[-1] if self.attempts else None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def exit_code(self) -> int | None:
        """The last attempt's status as docker reports it (128+N when killed by signal N); None while
        it runs or when it is unknown."""
        last = self.last
        return last.exit_status if last is not None and last.status_known else None


class NetworkCreateRequest(_Request):
    """`cgctl network create`: a bridge and a subnet (a free /24 of 10.92.0.0/16 unless given)."""

    name: str = Field(
        max_length=64, description="[A-Za-z0-9][A-Za-z0-9_.-]*; not none, host, bridge or container"
    )
    subnet: str | None = Field(None, max_length=64, description="IPv4 CIDR, e.g. 10.93.0.0/24")
    gateway: str | None = Field(None, max_length=64, description="the bridge's address (default: the first)")
    internal: bool = Field(False, description="no route out of its bridge, no published ports")


class NetworkInfo(BaseModel):
    """A network as `network ls` and `network inspect` show it."""

    name: str
    subnet: str
    gateway: str
    bridge: str
    internal: bool
    created: float = Field(description="unix time")
    containers: list[str] = Field(default_factory=list, description="the running containers on it")


class Event(BaseModel):
    time: float
    type: EventType
    name: str
    attributes: dict[str, str] = Field(default_factory=dict)


class LimitChange(BaseModel):
    limit: str = Field(description="memory.max, io.max[/dev/vda], files[memory.swap.high], ...")
    old: Any
    new: Any
    source: str = Field(description="the policy (FILE:NAME) that sets the new value, or explicit/default")


class PolicyPlan(BaseModel):
    """What policies change (or changed) on one running container."""

    name: str
    policies: list[str]
    changes: list[LimitChange]
    error: str | None = None


class HostWide(_Request):
    """What host-wide accounting covers (`cgctl stats --all`): every cgroup below `cgroup_root` (a path on
    the daemon's host; default the whole cgroup2 hierarchy), at most `max_depth` levels down, whose
    path as /proc/PID/cgroup writes it matches an `include` glob (all if none) and no `exclude` glob."""

    cgroup_root: str | None = None
    max_depth: Annotated[int, Field(ge=0)] | None = None
    include: list[str] = []
    exclude: list[str] = []


class DiffRequest(_Request):
    directory: str | None = Field(
        None, pattern=r"^/", description="policy files to compare on the daemon's host (default: its own)"
    )


class PolicyStatus(BaseModel):
    directory: str
    files: list[str]
    policies: list[str]
    reloaded_at: float | None = None
    ok: bool = True
    problems: list[str] = Field(default_factory=list, description="why the last reload was refused")


class ReloadResult(BaseModel):
    status: PolicyStatus
    containers: list[PolicyPlan]


class Overridden(BaseModel):
    value: Any
    source: str


class ExplainedLimit(BaseModel):
    limit: str
    value: Any
    source: str = Field(description="FILE:NAME of the policy, 'explicit' (run, update), or 'action'")
    overridden: list[Overridden] = Field(
        default_factory=list, description="what it won over, strongest first"
    )


class Explanation(BaseModel):
    name: str
    policies: list[str] = Field(description="every matching policy, weakest first")
    limits: list[ExplainedLimit]
    actions: list[str] = Field(description="the armed actions (daemon), as POLICY: WHEN -> DO")


class Info(BaseModel):
    version: str
    pid: int
    containers: int
    running: int
    cgroup_root: str


class ProcessRow(BaseModel):
    """One process of a container, as `cgctl top` shows it (read by cgctl.processes)."""

    pid: int = Field(description="the pid on the host (the daemon's pid namespace)")
    nspid: int = Field(description="the pid inside the container's pid namespace (1: its init)")
    user: str = Field(description="the host's name for uid, or uid itself if it has none")
    uid: int = Field(description="the effective uid, as the host knows it")
    cpu_percent: float = Field(description="share of one CPU used over the last 0.5 s (2 CPUs: 200)")
    rss_bytes: int = Field(description="resident memory")
    started_at: float = Field(description="unix time")
    command: list[str] = Field(description="its argv, or [NAME] if it has none")


class ApiError(BaseModel):
    message: str
    exit_code: int = 125  # what the CLI exits with: 125, or 126/127 when the command cannot run


def parse_signal(text: str) -> signals.Signals:
    """'KILL', 'SIGKILL', 'kill' or '9'; ValueError otherwise."""
    text = text.strip()
    try:
        if re.fullmatch(r"\d+", text):
            return signals.Signals(int(text))
        return signals.Signals["SIG" + text.upper().removeprefix("SIG")]
    except (KeyError, ValueError):
        raise ValueError(f"{text!r} is not a signal name or number (e.g. TERM, SIGUSR1, 9)") from None


class Failure(Exception):
    """Why a runtime call failed, with the HTTP status the API answers with and the exit status the
    CLI ends with (125 for cgctl's own errors; 126/127 when the command cannot be run)."""

    status = 500

    def __init__(self, message: str, exit_code: int = 125) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Invalid(Failure):
    status = 400


class BadGateway(Failure):
    """A registry refused, or cannot be reached."""

    status = 502


class NotFound(Failure):
    status = 404


class Conflict(Failure):
    status = 409


class NeedsDaemon(Failure):
    status = 501
