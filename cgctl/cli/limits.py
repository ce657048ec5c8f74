"""The limit options `cgctl run` and `cgctl update` share, and the spec fields they feed.

Each option is declared once here; a value left out is None and means "not given", so
`run` falls back on the spec's defaults and `update` leaves that limit as it is.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cgctl.cli.errors import fail


def repeated(help: str) -> typer.models.OptionInfo:
    return typer.Option(help=f"{help} (repeatable)", show_default=False)


Mem = Annotated[str | None, typer.Option("--mem", help="memory.max: 256M, 1.5G, bytes, or max")]
MemHigh = Annotated[str | None, typer.Option(help="memory.high: throttle and reclaim above this")]
MemLow = Annotated[str | None, typer.Option(help="memory.low: best-effort reclaim protection")]
MemMin = Annotated[str | None, typer.Option(help="memory.min: hard reclaim protection")]
Swap = Annotated[str | None, typer.Option("--swap", help="memory.swap.max")]
OomGroup = Annotated[
    bool | None,
    typer.Option(
        "--oom-group/--no-oom-group",
        help="memory.oom.group: an OOM kill takes the whole workload (default on)",
        show_default=False,
    ),
]
Cpus = Annotated[str | None, typer.Option(help="CPU time in CPUs, e.g. 0.5 or 2 (cpu.max, 100 ms period)")]
CpuWeight = Annotated[str | None, typer.Option(help="cpu.weight 1..10000 (default 100)")]
Cpuset = Annotated[str | None, typer.Option(help="cpuset.cpus: CPUs it may use, e.g. 0-3,6")]
CpuIdle = Annotated[
    bool | None,
    typer.Option(
        "--cpu-idle/--no-cpu-idle",
        help="cpu.idle: run only when the CPU is otherwise idle",
        show_default=False,
    ),
]
IoMax = Annotated[
    list[str] | None, repeated("io.max: DEV:rbps=N,wbps=N,riops=N,wiops=N; DEV a path or MAJ:MIN")
]
IoWeight = Annotated[list[str] | None, repeated("io.weight: W for all devices, or DEV:W")]
Pids = Annotated[str | None, typer.Option(help="pids.max: most processes and threads at once")]
CgroupSet = Annotated[list[str] | None, repeated("FILE=VALUE: any other cgroup interface file")]

# Which option fed each spec field (under "limits"), so that errors speak the user's language.
OPTION_FOR_FIELD: dict[tuple[str | int, ...], str] = {
    ("memory", "max"): "--mem",
    ("memory", "high"): "--mem-high",
    ("memory", "low"): "--mem-low",
    ("memory", "min"): "--mem-min",
    ("memory", "swap_max"): "--swap",
    ("memory", "oom_group"): "--oom-group",
    ("cpu", "cpus"): "--cpus",
    ("cpu", "weight"): "--cpu-weight",
    ("cpu", "cpuset"): "--cpuset",
    ("cpu", "idle"): "--cpu-idle",
    ("io", "max"): "--io-max",
    ("io", "weight"): "--io-weight",
    ("pids", "max"): "--pids",
    ("files",): "--cgroup-set",
}


def limit_fields(
    mem: str | None,
    mem_high: str | None,
    mem_low: str | None,
    mem_min: str | None,
    swap: str | None,
    oom_group: bool | None,
    cpus: str | None,
    cpu_weight: str | None,
    cpuset: str | None,
    cpu_idle: bool | None,
    io_max: list[str] | None,
    io_weight: list[str] | None,
    pids: str | None,
    cgroup_set: list[str] | None,
) -> dict[str, dict[str, Any]]:
    """The spec's `limits` fields for the options given; the ones not given are left out."""
    sections: dict[str, dict[str, Any]] = {
        "memory": {
            "max": mem,
            "high": mem_high,
            "low": mem_low,
            "min": mem_min,
            "swap_max": swap,
            "oom_group": oom_group,
        },
        "cpu": {"cpus": cpus, "weight": cpu_weight, "cpuset": cpuset, "idle": cpu_idle},
        "io": {"max": io_max, "weight": io_weight},
        "pids": {"max": pids},
        "files": pairs("--cgroup-set", cgroup_set),
    }
    return {
        section: {key: value for key, value in fields.items() if value is not None}
        for section, fields in sections.items()
    }


def pairs(option: str, values: list[str] | None) -> dict[str, str]:
    """KEY=VALUE options (--cgroup-set, --label) as a dict."""
    found = {}
    for value in values or []:
        key, separator, content = value.partition("=")
        if not separator or not key:
            raise fail(f"invalid value {value!r} for {option}: expected KEY=VALUE")
        found[key] = content
    return found
