"""`cgctl-oci update`'s flags as OCI LinuxResources, so flags and `--resources FILE` take one path.

The flags are runc's, with runc's value syntax: byte sizes in docker's units (binary, "256m",
"1.5GiB", "-1" for unlimited), microseconds and shares as whole numbers. Only the flags given
appear in the result: runc's "unchanged values can be omitted" holds for both ways in.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

# go-units' RAMInBytes: a number, an optional binary unit, an optional i, an optional b.
_RAM = re.compile(r"^(\d+(?:\.\d+)*) ?([kmgtp])?i?b?$", re.IGNORECASE)
_UNITS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5}
_INT64_MAX = 2**63 - 1


def update_flags_to_resources(flags: Mapping[str, str | None]) -> dict[str, Any]:
    """LinuxResources from runc update's flags ({"memory": "256m", "cpu-quota": "50000"}; None or
    absent: not given). ValueError names the flag, the value and the syntax expected."""
    resources: dict[str, dict[str, Any]] = {}
    for flag, text in flags.items():
        if text is None:
            continue
        if flag not in FLAGS:
            raise ValueError(
                f"--{flag}: not a flag of update (it takes {', '.join(f'--{f}' for f in FLAGS)})"
            )
        section, field, parse = FLAGS[flag]
        resources.setdefault(section, {})[field] = parse(flag, text.strip())
    return resources


def _bytes(flag: str, text: str) -> int:
    if text == "-1":
        return -1
    match = _RAM.match(text)
    try:
        if match is None:
            raise InvalidOperation
        size = int(Decimal(match.group(1)) * 1024 ** _UNITS[(match.group(2) or "").lower()])
    except InvalidOperation:  # 1.2.3 passes the pattern, as with go-units, but is no number
        raise ValueError(
            f"invalid value for --{flag}: {text!r} is not a size: use bytes or k/m/g/t with an optional b "
            "(268435456, 256m, 1.5g), or -1 for unlimited"
        ) from None
    return _in_int64(flag, text, size)


def _signed(flag: str, text: str) -> int:
    if not re.fullmatch(r"[-+]?\d+", text):
        raise ValueError(f"invalid value for --{flag}: {text!r} is not a whole number")
    return _in_int64(flag, text, int(text))


def _unsigned(flag: str, text: str) -> int:
    if not re.fullmatch(r"\d+", text):
        raise ValueError(f"invalid value for --{flag}: {text!r} is not a whole number of 0 or more")
    return _in_int64(flag, text, int(text))


def _weight(flag: str, text: str) -> int:
    weight = _unsigned(flag, text)
    if not 10 <= weight <= 1000:
        raise ValueError(f"invalid value for --{flag}: {text!r} is out of range: a weight is 10 to 1000")
    return weight


def _in_int64(flag: str, text: str, value: int) -> int:
    if abs(value) > _INT64_MAX:
        raise ValueError(f"invalid value for --{flag}: {text!r} is out of range (at most {_INT64_MAX})")
    return value


# flag -> where its value goes in LinuxResources, and how its text is read
FLAGS: dict[str, tuple[str, str, Callable[[str, str], int | str]]] = {
    "memory": ("memory", "limit", _bytes),
    "memory-reservation": ("memory", "reservation", _bytes),
    "memory-swap": ("memory", "swap", _bytes),
    "cpu-share": ("cpu", "shares", _unsigned),
    "cpu-quota": ("cpu", "quota", _signed),
    "cpu-period": ("cpu", "period", _unsigned),
    "cpuset-cpus": ("cpu", "cpus", lambda flag, text: text),
    "cpuset-mems": ("cpu", "mems", lambda flag, text: text),
    "pids-limit": ("pids", "limit", _signed),
    "blkio-weight": ("blockIO", "weight", _weight),
}
