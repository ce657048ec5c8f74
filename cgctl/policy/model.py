"""The policy file schema: which containers a policy matches, the limits it gives them (the very
`Limits` model of `cgctl run`, so a limit has one spelling everywhere), its priority class, and
the actions it takes on the kernel's events."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from cgctl.cgroup.pressure import WINDOW_MAX_US, WINDOW_MIN_US
from cgctl.spec import NAME_PATTERN, Limits, Rate, Size

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$")
_DURATION_UNITS = {
    "ms": Decimal("0.001"),
    "s": Decimal(1),
    "m": Decimal(60),
    "h": Decimal(3600),
    None: Decimal(1),
}
WINDOW_MIN, WINDOW_MAX = WINDOW_MIN_US / 1e6, WINDOW_MAX_US / 1e6  # the kernel's, in seconds


def parse_duration(value: object) -> float:
    """Seconds from '30s', '500ms', '2m', '1h' or a number of seconds."""
    if isinstance(value, bool):
        raise ValueError("not a duration")
    match = _DURATION.match(str(value).strip())
    if not match:
        raise ValueError("not a duration: give seconds, or a number with ms, s, m or h (500ms, 30s, 2m)")
    return float(Decimal(match.group(1)) * _DURATION_UNITS[match.group(2)])


def parse_percent(value: object) -> float:
    """A share of time from '40%' or 40 (per cent, above 0 and at most 100)."""
    text = str(value).strip().removesuffix("%")
    try:
        percent = float(text)
    except ValueError:
        raise ValueError("not a percentage: give e.g. 40% or 40") from None
    if isinstance(value, bool) or not 0 < percent <= 100:
        raise ValueError("a percentage above 0 and at most 100")
    return percent


Duration = Annotated[float, BeforeValidator(parse_duration)]
Percent = Annotated[float, BeforeValidator(parse_percent)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Choice(_Model):
    """A mapping that gives exactly one of its fields: the kind of event, or of action."""

    CHOICE: ClassVar[str]

    def _given(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name) not in (None, False)]

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        given = self._given()
        if len(given) != 1:
            names = ", ".join(type(self).model_fields)
            raise ValueError(f"give exactly one {self.CHOICE} of: {names} (got {', '.join(given) or 'none'})")
        return self

    def kind(self) -> str:
        return self._given()[0]


def _shorthand(value: object, flags: tuple[str, ...]) -> object:
    """'restart' for {restart: true}: the flag-like choices may be written as a bare word."""
    if isinstance(value, str) and value in flags:
        return {value: True}
    return value


class Match(_Model):
    """Which containers a policy applies to: every condition given must hold (none: all containers)."""

    name: str | None = Field(None, description="a glob on the container's name (web-*)")
    labels: dict[str, str] = Field(default_factory=dict, description="label -> glob on its value")
    image: str | None = Field(None, description="a glob on NAME:TAG, or on NAME if it has no ':'")
    user: str | None = Field(None, description="the user the workload runs as (name or id)")
    command: str | None = Field(None, description="a glob on the command's basename")

    def conditions(self) -> int:
        """How specific the match is: the number of conditions (each label counts)."""
        return sum(x is not None for x in (self.name, self.image, self.user, self.command)) + len(self.labels)


class PriorityClass(_Model):
    """A named preset of the knobs that share contended resources."""

    cpu_weight: int | None = Field(None, ge=1, le=10000, description="cpu.weight")
    io_weight: int | None = Field(None, ge=1, le=10000, description="io.weight (all devices)")
    memory_low: Size | None = Field(None, description="memory.low: protection from reclaim")
    cpu_idle: bool | None = Field(None, description="cpu.idle: run only when the CPU is otherwise idle")
    ingress_bandwidth: Rate | None = Field(None, description="bits/s into a container with a network")
    egress_bandwidth: Rate | None = Field(None, description="bits/s out of a container with a network")

    def limits(self) -> dict[str, Any]:
        """The class as `limits` fields."""
        fields: dict[str, Any] = {"cpu": {}, "memory": {}, "io": {}, "network": {}}
        for direction in ("ingress", "egress"):
            if (rate := getattr(self, f"{direction}_bandwidth")) is not None:
                fields["network"][direction] = rate
        if self.cpu_weight is not None:
            fields["cpu"]["weight"] = self.cpu_weight
        if self.cpu_idle is not None:
            fields["cpu"]["idle"] = self.cpu_idle
        if self.memory_low is not None:
            fields["memory"]["low"] = self.memory_low
        if self.io_weight is not None:
            fields["io"]["weight"] = [{"device": None, "weight": self.io_weight}]
        return {section: values for section, values in fields.items() if values}


# docs/policies.md documents these numbers; a policy file's `priority_classes` overrides them by name.
DEFAULT_CLASSES: dict[str, PriorityClass] = {
    "critical": PriorityClass(cpu_weight=400, io_weight=400, memory_low="max"),
    "default": PriorityClass(cpu_weight=100, io_weight=100),
    "batch": PriorityClass(cpu_weight=25, io_weight=25),
    "idle": PriorityClass(cpu_weight=1, io_weight=1, cpu_idle=True),
}


class Pressure(_Model):
    """A PSI trigger: more than `above` of `window` stalled on `resource` (the kernel polls for it)."""

    resource: Literal["cpu", "memory", "io"]
    kind: Literal["some", "full"] = Field("some", description="some: any task stalled; full: all of them")
    above: Percent = Field(description="the share of the window spent stalled, e.g. 40%")
    window: Duration = Field(2.0, description="0.5 s to 10 s (the kernel's range for triggers)")

    @field_validator("window")
    @classmethod
    def _kernel_window(cls, window: float) -> float:
        if not WINDOW_MIN <= window <= WINDOW_MAX:
            raise ValueError(
                f"the kernel's pressure triggers take a window of {WINDOW_MIN} s to {WINDOW_MAX:g} s"
            )
        return window


class When(_Choice):
    """The event an action fires on."""

    CHOICE = "event"

    pressure: Pressure | None = None
    oom_kill: bool = Field(False, description="the OOM killer killed a process of the container")
    memory_high: bool = Field(False, description="memory.events high grew: the container was throttled")
    exit: bool = Field(False, description="the container's attempt ended (any status)")

    @model_validator(mode="before")
    @classmethod
    def _word(cls, value: object) -> object:
        return _shorthand(value, ("oom_kill", "memory_high", "exit"))


class Do(_Choice):
    """What an action does to the container."""

    CHOICE = "action"

    set: Limits | None = Field(None, description="limits to set, as `cgctl update` would")
    freeze: bool = False
    thaw: bool = False
    kill: str | None = Field(None, description="a signal to send every process (KILL, TERM, ...)")
    restart: bool = Field(False, description="kill it and start a new attempt (detached containers)")
    run: list[str] | None = Field(None, min_length=1, description="argv; the event as JSON on its stdin")

    @model_validator(mode="before")
    @classmethod
    def _word(cls, value: object) -> object:
        if value == "kill":
            return {"kill": "KILL"}
        return _shorthand(value, ("freeze", "thaw", "restart"))

    @field_validator("run")
    @classmethod
    def _absolute(cls, argv: list[str] | None) -> list[str] | None:
        if argv is not None and not argv[0].startswith("/"):
            raise ValueError("the command must be an absolute path (the daemon has no PATH of yours)")
        return argv

    @field_validator("kill")
    @classmethod
    def _signal(cls, name: str | None) -> str | None:
        import signal

        if name is None:
            return None
        full = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
        if full not in signal.Signals.__members__:
            raise ValueError(f"{name!r} is not a signal name (KILL, TERM, INT, HUP, USR1, ...)")
        return full


class Action(_Model):
    when: When
    do: Do
    at_most_every: Duration = Field(60.0, description="rate limit per container: at most once per this")


class Policy(_Model):
    name: str = Field(pattern=NAME_PATTERN, description="unique in the policy directory")
    match: Match = Field(default_factory=Match)
    priority: str | None = Field(None, description="a priority class: critical, default, batch, idle, ...")
    limits: Limits = Field(default_factory=Limits, description="any limit of `cgctl run`")
    actions: list[Action] = Field(default_factory=list)


class PolicyFile(_Model):
    """One YAML file of the policy directory."""

    policies: list[Policy] = Field(default_factory=list)
    priority_classes: dict[str, PriorityClass] = Field(
        default_factory=dict, description="override or add priority classes by name"
    )

    @field_validator("priority_classes")
    @classmethod
    def _class_names(cls, classes: dict[str, PriorityClass]) -> dict[str, PriorityClass]:
        for name in classes:
            if not re.match(NAME_PATTERN, name):
                raise ValueError(f"{name!r} is not a class name (letters, digits, _ . -)")
        return classes
