"""Every limit cgctl sets, one row each: its option, its place in the spec, who applies it (the
cgroup's interface file, or the network), the kernel's default and how its values are read and written.

`cgctl run` and `cgctl update` build their options from this table, the controllers take their
files and values from it, `update` its resets, the policy engine the file behind each leaf, and
docs/run.md's table of limits is drawn from it (tests/unit/test_limits.py keeps them in step),
so adding a limit is a row here, and a parser when its syntax is new. Plain Python, no pydantic:
the CLI reads it at start-up. The spec (cgctl.spec) holds the values' types and checks.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

MAX: Literal["max"] = "max"
NOT_A_SIZE = "not a size: use bytes or K/M/G/T with an optional iB (256M, 256MiB, 1.5G), or max"
PERIOD_USEC = 100_000  # cpu.max's period: 100 ms, as docker and systemd use
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?$", re.IGNORECASE)
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}
_PAGE_SIZE = re.compile(r"^(\d+)([KMG])B?$", re.IGNORECASE)


def parse_size(value: object) -> int | Literal["max"]:
    """Bytes from '256M', '256MiB', '1.5G', '4096' or 'max' (binary units, as docker and systemd)."""
    if isinstance(value, bool):
        raise ValueError(NOT_A_SIZE)
    if isinstance(value, int):
        if value < 0:
            raise ValueError(NOT_A_SIZE)
        return value
    text = str(value).strip()
    if text.lower() in ("max", "infinity"):
        return MAX
    match = _SIZE.match(text)
    if not match or (match.group(3) and not match.group(2)):
        raise ValueError(NOT_A_SIZE)
    number, unit, _ = match.groups()
    size = Decimal(number) * 1024 ** _UNITS[unit.upper()]
    if not unit and size != size.to_integral_value():
        raise ValueError("a size in bytes must be a whole number")
    return int(size)


NOT_A_RATE = (
    "not a rate: bits per second as tc writes them (500kbit, 10mbit, 1gbit; kbps is kilobytes) "
    "or as Kubernetes does (10M, 1G, 512Ki)"
)
_TC_RATE = re.compile(r"^(\d+(?:\.\d+)?)\s*([kmgt]i?)?(bit|bps)$", re.IGNORECASE)
_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(k|M|G|T|Ki|Mi|Gi|Ti)?$")


def parse_rate(value: object) -> int:
    """Bits per second from tc's '500kbit', '10mbit', '1gbit', '1mibit', '100kbps' (bytes), or
    Kubernetes' '10M', '512Ki', '1G' (its annotations' bandwidth), or a number of bits per second."""
    if isinstance(value, bool):
        raise ValueError(NOT_A_RATE)
    text = str(value).strip()
    tc, quantity = _TC_RATE.match(text), _QUANTITY.match(text)
    if tc is not None:
        number, prefix, unit = tc.group(1), (tc.group(2) or "").lower(), tc.group(3).lower()
        base = 1024 if prefix.endswith("i") else 1000
        scale = base ** ("kmgt".index(prefix[0]) + 1 if prefix else 0) * (8 if unit == "bps" else 1)
    elif quantity is not None:
        number, suffix = quantity.group(1), quantity.group(2) or ""
        base = 1024 if suffix.endswith("i") else 1000
        scale = base ** ("KMGT".index(suffix[0].upper()) + 1 if suffix else 0)
    else:
        raise ValueError(NOT_A_RATE)
    exact = Decimal(number) * scale
    if exact != exact.to_integral_value():
        raise ValueError(f"{text!r}: a rate is a whole number of bits per second")
    rate = int(exact)
    if rate < 1:
        raise ValueError(f"{text!r}: a rate must be at least 1 bit per second")
    return rate


def format_rate(bits: int) -> str:
    """'10mbit', '1.5gbit', '800bit': a rate as tc shows it."""
    for exponent, unit in ((3, "gbit"), (2, "mbit"), (1, "kbit")):
        if bits >= 1000**exponent:
            return f"{bits / 1000**exponent:.4g}{unit}"
    return f"{bits}bit"


def parse_count(value: object) -> int | Literal["max"]:
    """A whole number of things (IOPS, pids), or max."""
    if isinstance(value, str) and value.strip().lower() == "max":
        return MAX
    if isinstance(value, bool) or not str(value).strip().isdigit():
        raise ValueError("not a whole number, or max")
    return int(str(value).strip())


def parse_page_size(value: str) -> str:
    """A huge page size as the kernel names it in hugetlb.<size>.max: '2MB' from '2MB', '2M' or '2mb'."""
    match = _PAGE_SIZE.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not a huge page size as the kernel names them (e.g. 2MB, 1GB, 64KB)")
    return f"{int(match.group(1))}{match.group(2).upper()}B"


def key_values(separator: str, syntax: str) -> Callable[[list[str]], dict[str, str]]:
    """A parser of repeated KEY<separator>VALUE options into a dict; a bad one raises
    ValueError(value, reason), `syntax` naming the form in the reason."""

    def parse(values: list[str]) -> dict[str, str]:
        found = {}
        for value in values:
            key, given, content = value.partition(separator)
            if not given or not key:
                raise ValueError(value, f"expected {syntax}")
            found[key] = content
        return found

    return parse


def _cpu_max(cpus: Decimal) -> str:
    return f"{int(cpus * PERIOD_USEC)} {PERIOD_USEC}"


def _switch(on: bool) -> str:
    return "1" if on else "0"


def _only_on(on: bool) -> str | None:
    return "1" if on else None


# Who applies a limit: the kernel, through the cgroup interface file the row names; or the network
# (cgctl.network: the CNI bandwidth plugin's token bucket on the host's end of the container's
# interface), for a container with a network of its own. Only cgroup rows have a file.
Applier = Literal["cgroup", "network"]

# How the value of an option reaches the spec: one text, an on/off flag, a repeatable option
# whose values form a list, or a repeatable KEY:VALUE option whose values form a dict (`parse`).
Kind = Literal["value", "flag", "list", "map"]


@dataclass(frozen=True)
class Limit:
    """One limit. `field` is its place under the spec's `limits` (a map's is its whole section);
    `file` its interface file, `{key}` standing for a map's key ("" for one the network applies);
    `default` what a new cgroup's file holds, which `update` writes back when the limit is no longer
    given (None: left as it is, or for the network's, no limit)."""

    option: str  # a flag's as --on/--off
    field: tuple[str, ...]
    file: str
    default: str | None
    help: str
    metavar: str = ""  # what docs/run.md shows after the option
    note: str = ""  # what docs/run.md adds to the help
    kind: Kind = "value"
    parse: Callable[[list[str]], dict[str, str]] | None = None  # a map's values to its dict
    write: Callable[[Any], str | None] = str  # the spec's value as the file takes it (None: not written)
    by: Applier = "cgroup"

    @property
    def name(self) -> str:
        """The option as errors name it: --oom-group for --oom-group/--no-oom-group."""
        return self.option.partition("/")[0]

    @property
    def parameter(self) -> str:
        """The Python parameter the CLI hands it in."""
        return self.name.lstrip("-").replace("-", "_")

    @property
    def controller(self) -> str:
        return self.file.partition(".")[0]


# In the order the CLI lists them, and each controller's files in the order they are written
# (protections before limits).
LIMITS: tuple[Limit, ...] = (
    Limit("--mem-min", ("memory", "min"), "memory.min", "0", "memory.min: hard reclaim protection", "SIZE"),
    Limit(
        "--mem-low",
        ("memory", "low"),
        "memory.low",
        "0",
        "memory.low: best-effort protection",
        "SIZE",
    ),
    Limit(
        "--mem-high",
        ("memory", "high"),
        "memory.high",
        MAX,
        "memory.high: throttle and reclaim above this",
        "SIZE",
    ),
    Limit("--mem", ("memory", "max"), "memory.max", MAX, "memory.max: 256M, 1.5G, bytes, or max", "SIZE"),
    Limit(
        "--swap", ("memory", "swap_max"), "memory.swap.max", MAX, "memory.swap.max: swap it may use", "SIZE"
    ),
    Limit(
        "--memory-zswap-max",
        ("memory", "zswap_max"),
        "memory.zswap.max",
        MAX,
        "memory.zswap.max: compressed swap (zswap) it may use",
        "SIZE",
        note="Linux 5.19+ with zswap, else refused",
    ),
    Limit(
        "--oom-group/--no-oom-group",
        ("memory", "oom_group"),
        "memory.oom.group",
        None,
        "memory.oom.group: an OOM kill takes the whole workload (default on)",
        kind="flag",
        write=_switch,
    ),
    Limit(
        "--cpus",
        ("cpu", "cpus"),
        "cpu.max",
        f"max {PERIOD_USEC}",
        "CPU time in CPUs, e.g. 0.5 or 2 (cpu.max, 100 ms period)",
        "N",
        note="`N*100000 100000`, at least 0.01, at most the CPUs it can run on",
        write=_cpu_max,
    ),
    Limit("--cpu-weight", ("cpu", "weight"), "cpu.weight", "100", "cpu.weight: 1..10000", "W"),
    Limit(
        "--cpuset",
        ("cpu", "cpuset"),
        "cpuset.cpus",
        "\n",
        "cpuset.cpus: CPUs it may use, e.g. 0-3,6",
        "LIST",
        note="checked against the CPUs the parent offers",
    ),  # empty: the parent's CPUs
    Limit(
        "--cpu-idle/--no-cpu-idle",
        ("cpu", "idle"),
        "cpu.idle",
        "0",
        "cpu.idle: run only when the CPU is otherwise idle",
        kind="flag",
        write=_only_on,
    ),
    Limit(
        "--io-max",
        ("io", "max"),
        "io.max",
        None,  # per device: runtime/update.py
        "io.max: DEV:rbps=N,wbps=N,riops=N,wiops=N; DEV a path or MAJ:MIN",
        "DEV:KEY=N,...",
        kind="list",
        note="whole disks only; sizes accepted for bps",
    ),
    Limit(
        "--io-weight",
        ("io", "weight"),
        "io.weight",
        None,  # per device: runtime/update.py
        "io.weight: W for all devices, or DEV:W",
        "[DEV:]W",
        kind="list",
        note="per device it needs io.cost enabled on it (the error says how)",
    ),
    Limit("--pids", ("pids", "max"), "pids.max", MAX, "pids.max: most processes and threads at once", "N"),
    Limit(
        "--hugetlb",
        ("hugetlb",),
        "hugetlb.{key}.max",
        MAX,
        "hugetlb.<size>.max: huge pages of a size it may use, SIZE:LIMIT (e.g. 2MB:64M)",
        "SIZE:LIMIT",
        kind="map",
        note="the hugetlb controller is enabled for it; a size this host lacks is refused",
        parse=key_values(":", "PAGE_SIZE:LIMIT (e.g. 2MB:64M)"),
    ),
    Limit(
        "--cgroup-set",
        ("files",),
        "{key}",
        None,  # no known default: stays as it is
        "any other cgroup interface file, as FILE=VALUE",
        "FILE=VALUE",
        kind="map",
        note="writable, offered by this kernel for the enabled controllers, not one cgctl manages",
        parse=key_values("=", "KEY=VALUE"),
    ),
    Limit(
        "--ingress-bandwidth",
        ("network", "ingress"),
        "",
        None,
        "bits per second into the container: 10mbit, 500kbit, 1gbit, or 10M as Kubernetes writes it",
        "RATE",
        note="needs a network of its own (--network bridge or a network's name); tc's kbps and mbps are "
        "bytes; the bucket holds 100 ms at the rate, at least 64 KiB",
        by="network",
    ),
    Limit(
        "--egress-bandwidth",
        ("network", "egress"),
        "",
        None,
        "bits per second out of the container, as --ingress-bandwidth",
        "RATE",
        note="needs a network of its own",
        by="network",
    ),
)
_BY_FIELD = {row.field: row for row in LIMITS}


def row(*field: str) -> Limit:
    """The row of a spec field under `limits` (a map's section alone)."""
    return _BY_FIELD[field]


def is_map(section: str) -> bool:
    """Whether a section of the spec's limits is one map keyed by file or page size (files, hugetlb)."""
    return (section,) in _BY_FIELD


def settings(controller: str, values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(interface file, value) for the controller's one-value limits among `values` (one section of
    the spec's limits, by field name), in the table's order; None is not given."""
    found = []
    for limit in LIMITS:
        by_file = limit.by == "cgroup" and len(limit.field) == 2 and limit.kind in ("value", "flag")
        if by_file and limit.controller == controller:
            value = values.get(limit.field[1])
            text = None if value is None else limit.write(value)
            if text is not None:
                found.append((limit.file, text))
    return found


def file_row(file: str) -> tuple[Limit, str] | None:
    """The row that writes an interface file, and the key it stands for (a page size), if any."""
    for limit in LIMITS:
        if limit.by != "cgroup":
            continue
        if "{key}" not in limit.file:
            if limit.file == file:
                return limit, ""
        elif limit.file != "{key}":
            before, _, after = limit.file.partition("{key}")
            if file.startswith(before) and file.endswith(after) and len(file) > len(before) + len(after):
                return limit, file[len(before) : len(file) - len(after)]
    return None


# One limit as policies resolve it: (section, field) as memory.max, (section, field, device) for a
# list's entry as io.max of one device, (section, key) for a map's entry as one page size of hugetlb.
Leaf = tuple[str, ...]


def _is_list(section: str, field: str) -> bool:
    found = _BY_FIELD.get((section, field))
    return found is not None and found.kind == "list"


def leaves(fields: Mapping[str, Any]) -> dict[Leaf, Any]:
    """Limits as JSON (all, or only those given) flattened to one entry per limit: a list's entries
    per device (io), a map's per key (hugetlb, files)."""
    found: dict[Leaf, Any] = {}
    for section, values in fields.items():
        for key, value in values.items():
            if _is_list(section, key):
                for entry in value:
                    found[(section, key, entry.get("device") or "default")] = entry
            else:
                found[(section, key)] = value
    return found


def unleaf(found: Mapping[Leaf, Any]) -> dict[str, Any]:
    """Leaves back to limits as JSON."""
    fields: dict[str, Any] = {}
    for leaf, value in found.items():
        if len(leaf) == 3:
            fields.setdefault(leaf[0], {}).setdefault(leaf[1], []).append(value)
        else:
            fields.setdefault(leaf[0], {})[leaf[1]] = value
    return fields


def leaf_name(leaf: Leaf) -> str:
    """memory.max, io.max[/dev/vda], hugetlb[2MB], files[memory.swap.high]: how explain and records
    name a limit (leaf_file reads these names)."""
    if len(leaf) == 3:
        return f"{leaf[0]}.{leaf[1]}[{leaf[2]}]"
    if is_map(leaf[0]):
        return f"{leaf[0]}[{leaf[1]}]"
    return ".".join(leaf)


def leaf_file(leaf: str) -> str | None:
    """The interface file behind a limit as explain and run records name it (memory.max,
    io.max[/dev/vda], hugetlb[2MB], files[memory.swap.high]); None for one the network applies."""
    name, _, key = leaf.partition("[")
    limit = row(*name.split("."))
    return limit.file.replace("{key}", key[:-1]) if limit.by == "cgroup" else None


def applied_by(leaf: Leaf) -> Applier:
    """Who applies a limit (leaves as `leaves` gives them)."""
    return (row(leaf[0]) if is_map(leaf[0]) else row(*leaf[:2])).by


def by_network(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The limits the network applies among limits as JSON, by field ({"egress": 10000000}), as
    cgctl.network takes them; those not given are left out."""
    return {
        limit.field[1]: value
        for limit in LIMITS
        if limit.by == "network" and (value := fields.get(limit.field[0], {}).get(limit.field[1])) is not None
    }


def shown_rates(rates: Mapping[str, int]) -> dict[str, str]:
    """The network's limits (by_network's) as the run report and `update` show them, beside the
    files: {"network.egress": "10mbit"}; 0 is no limit, "max"."""
    return {f"network.{direction}": format_rate(rate) if rate else MAX for direction, rate in rates.items()}


def markdown_rows() -> list[str]:
    """docs/run.md's table rows for the limits: option, then file and effect."""
    rows = []
    for limit in LIMITS:
        option = limit.option.replace("/", " / ")
        given = f"`{option} {limit.metavar}`" if limit.metavar else f"`{option}`"
        if limit.by == "network":
            file = "the CNI bandwidth plugin"
        else:
            file = "`" + limit.file.replace("{key}", re.split("[:=]", limit.metavar)[0]) + "`"
        effect = re.sub(r"^[a-z]+\.[\w.<>]+: ", "", limit.help)  # the file, shown already
        repeat = " (repeatable)" if limit.kind in ("list", "map") else ""
        note = f"; {limit.note}" if limit.note else ""
        default = f"; default `{limit.default}`" if limit.default not in (None, "\n") else ""
        rows.append(f"| {given} | {file}: {effect}{repeat}{note}{default} |")
    return rows
