"""The workload spec: one pydantic schema shared by the CLI, the API and policy files.

Values arrive as text from humans ("256M", "1.5GiB", "max") and leave as the
exact strings the kernel's interface files take, so parsing lives here, in
validators, and every error names the field and the value.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

MAX: Literal["max"] = "max"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?$", re.IGNORECASE)
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(value: object) -> int | Literal["max"]:
    """Bytes from '256M', '256MiB', '1.5G', '4096' or 'max' (binary units, as docker and systemd)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative; give a size such as 256M, or max")
        return value
    text = str(value).strip()
    if text.lower() in ("max", "infinity"):
        return MAX
    match = _SIZE.match(text)
    if not match:
        raise ValueError(
            f"{text!r} is not a size; use bytes or K/M/G/T with optional iB (256M, 256MiB, 1.5G), or max"
        )
    number, unit, binary = match.groups()
    if binary and not unit:
        raise ValueError(f"{text!r} is not a size; use bytes or K/M/G/T (256M, 1.5G), or max")
    size = Decimal(number) * 1024 ** _UNITS[unit.upper()]
    if not unit and size != size.to_integral_value():
        raise ValueError(f"{text!r}: a size in bytes must be a whole number")
    return int(size)


def format_size(size: int | Literal["max"]) -> str:
    """'64 MiB', '1.5 GiB', '512 B', 'max': what humans read in messages and tables."""
    if size == MAX:
        return MAX
    for exponent, unit in ((4, "TiB"), (3, "GiB"), (2, "MiB"), (1, "KiB")):
        if size >= 1024**exponent:
            return f"{size / 1024**exponent:.4g} {unit}"
    return f"{size} B"


Size = Annotated[int | Literal["max"], BeforeValidator(parse_size)]


class MemoryLimits(BaseModel):
    """memory.* interface files; None leaves the kernel's default."""

    model_config = ConfigDict(extra="forbid")

    max: Size | None = Field(None, description="memory.max: hard limit; over it the OOM killer runs")
    oom_group: bool = Field(True, description="memory.oom.group: an OOM kills the whole workload")


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    memory: MemoryLimits = Field(default_factory=MemoryLimits)


class WorkloadSpec(BaseModel):
    """What to run and within which limits."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None, pattern=NAME_PATTERN, description="unique name; also the cgroup's directory name"
    )
    command: list[str] = Field(min_length=1, description="argv of the workload")
    limits: Limits = Field(default_factory=Limits)

    @field_validator("command")
    @classmethod
    def _command_not_blank(cls, command: list[str]) -> list[str]:
        if not command[0]:
            raise ValueError("the command is empty")
        return command
