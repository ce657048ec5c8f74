"""`cgctl run [OPTIONS] -- CMD [ARGS...]`: run a workload under limits and exit with its status."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from cgctl.cli.errors import fail, invalid_options, invalid_value

if TYPE_CHECKING:
    from cgctl.runtime.report import RunReport

# Which option fed each spec field, so that errors speak the user's language.
OPTION_FOR_FIELD: dict[tuple[str | int, ...], str] = {
    ("name",): "--name",
    ("command",): "CMD",
    ("limits", "memory", "max"): "--mem",
    ("limits", "memory", "high"): "--mem-high",
    ("limits", "memory", "low"): "--mem-low",
    ("limits", "memory", "min"): "--mem-min",
    ("limits", "memory", "swap_max"): "--swap",
    ("limits", "cpu", "cpus"): "--cpus",
    ("limits", "cpu", "weight"): "--cpu-weight",
    ("limits", "cpu", "cpuset"): "--cpuset",
    ("limits", "io", "max"): "--io-max",
    ("limits", "io", "weight"): "--io-weight",
    ("limits", "pids", "max"): "--pids",
    ("limits", "files"): "--cgroup-set",
    ("namespaces", "share"): "--share",
    ("hostname",): "--hostname",
    ("env",): "--env",
    ("workdir",): "--workdir",
    ("labels",): "--label",
}


def repeated(help: str) -> object:
    return typer.Option(help=f"{help} (repeatable)", show_default=False)


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_interspersed_args": False})(run)


def run(
    command: Annotated[
        list[str] | None, typer.Argument(help="the workload: -- CMD [ARGS...]", show_default=False)
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="unique name (default: generated); also the cgroup's name")
    ] = None,
    mem: Annotated[str | None, typer.Option("--mem", help="memory.max: 256M, 1.5G, bytes, or max")] = None,
    mem_high: Annotated[str | None, typer.Option(help="memory.high: throttle and reclaim above this")] = None,
    mem_low: Annotated[str | None, typer.Option(help="memory.low: best-effort reclaim protection")] = None,
    mem_min: Annotated[str | None, typer.Option(help="memory.min: hard reclaim protection")] = None,
    swap: Annotated[str | None, typer.Option("--swap", help="memory.swap.max")] = None,
    oom_group: Annotated[
        bool, typer.Option(help="memory.oom.group: an OOM kill takes the whole workload")
    ] = True,
    cpus: Annotated[
        str | None, typer.Option(help="CPU time in CPUs, e.g. 0.5 or 2 (cpu.max, 100 ms period)")
    ] = None,
    cpu_weight: Annotated[str | None, typer.Option(help="cpu.weight 1..10000 (default 100)")] = None,
    cpuset: Annotated[str | None, typer.Option(help="cpuset.cpus: CPUs it may use, e.g. 0-3,6")] = None,
    cpu_idle: Annotated[bool, typer.Option(help="cpu.idle: run only when the CPU is otherwise idle")] = False,
    io_max: Annotated[
        list[str] | None, repeated("io.max: DEV:rbps=N,wbps=N,riops=N,wiops=N; DEV a path or MAJ:MIN")
    ] = None,
    io_weight: Annotated[list[str] | None, repeated("io.weight: W for all devices, or DEV:W")] = None,
    pids: Annotated[str | None, typer.Option(help="pids.max: most processes and threads at once")] = None,
    cgroup_set: Annotated[list[str] | None, repeated("FILE=VALUE: any other cgroup interface file")] = None,
    share: Annotated[
        list[str] | None, repeated("keep the host's NS: cgroup, ipc, mnt, net, pid or uts")
    ] = None,
    userns: Annotated[bool, typer.Option(help="add a user namespace: root inside is you outside")] = False,
    hostname: Annotated[str | None, typer.Option(help="hostname inside (default: the name)")] = None,
    env: Annotated[list[str] | None, repeated("K=V in the environment; a bare K passes yours on")] = None,
    env_file: Annotated[list[Path] | None, repeated("a file of K=V lines; # starts a comment")] = None,
    workdir: Annotated[str | None, typer.Option(help="working directory (default: the current one)")] = None,
    label: Annotated[
        list[str] | None, repeated("K=V metadata for metrics and policies; never in the env")
    ] = None,
    init: Annotated[bool, typer.Option(help="a minimal reaper as pid 1 that forwards signals")] = False,
    report: Annotated[
        str | None, typer.Option(help="write a JSON report here when it ends (- = stderr)")
    ] = None,
    cgroup_root: Annotated[
        Path | None, typer.Option(envvar="CGCTL_CGROUP_ROOT", help="cgctl's cgroup subtree")
    ] = None,
) -> None:
    """Run CMD in new namespaces and its own cgroup, under the given limits.

    Exits with CMD's status; 125: cgctl error (nothing started); 126: not executable;
    127: not found; 128+N: killed by signal N.
    """
    from pydantic import ValidationError

    from cgctl import runtime
    from cgctl.cgroup.fs import CgroupError
    from cgctl.spec import SpecError, WorkloadSpec

    if not command:
        raise fail("no command given: cgctl run [OPTIONS] -- CMD [ARGS...]")
    fields = {
        "name": name,
        "command": command,
        "limits": {
            "memory": {
                "max": mem,
                "high": mem_high,
                "low": mem_low,
                "min": mem_min,
                "swap_max": swap,
                "oom_group": oom_group,
            },
            "cpu": {"cpus": cpus, "weight": cpu_weight, "cpuset": cpuset, "idle": cpu_idle},
            "io": {"max": io_max or [], "weight": io_weight or []},
            "pids": {"max": pids},
            "files": _pairs("--cgroup-set", cgroup_set),
        },
        "namespaces": {"share": share or [], "user": userns},
        "hostname": hostname,
        "env": {**_env_files(env_file or []), **_env(env or [])},
        "workdir": workdir,
        "labels": _pairs("--label", label),
        "init": init,
    }
    try:
        spec = WorkloadSpec.model_validate(fields)
    except ValidationError as error:
        raise invalid_options(error, OPTION_FOR_FIELD) from None
    try:
        result = runtime.run(spec, cgroup_root=cgroup_root)
    except SpecError as error:
        raise invalid_value(error, OPTION_FOR_FIELD) from None
    except CgroupError as error:
        raise fail(str(error)) from None
    except runtime.SpawnError as error:
        print(f"cgctl: {error}", file=sys.stderr)
        raise typer.Exit(error.exit_code) from None
    if report:
        _write_report(report, result.model_dump_json(indent=2))
    _explain_death(result)
    raise typer.Exit(result.exit_status)


def _explain_death(result: RunReport) -> None:
    from cgctl.spec import format_size

    if result.oom_killed:
        limit = result.memory_limit_bytes
        reached = "no memory.max was set" if limit is None else f"memory.max {format_size(limit)} reached"
        print(
            f"cgctl: {result.name} killed by the OOM killer: {reached} (oom_kill {result.oom_kills})",
            file=sys.stderr,
        )
    elif result.signal is not None:
        print(f"cgctl: {result.name} killed by {signal.Signals(result.signal).name}", file=sys.stderr)


def _write_report(destination: str, text: str) -> None:
    if destination == "-":
        print(text, file=sys.stderr)
        return
    path = Path(destination)
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text + "\n")
        temporary.replace(path)
    except OSError as error:
        print(f"cgctl: --report {destination}: cannot write the report: {error.strerror}", file=sys.stderr)


def _pairs(option: str, values: list[str] | None) -> dict[str, str]:
    pairs = {}
    for value in values or []:
        key, separator, content = value.partition("=")
        if not separator or not key:
            raise fail(f"invalid value {value!r} for {option}: expected KEY=VALUE")
        pairs[key] = content
    return pairs


def _env(values: list[str]) -> dict[str, str]:
    """K=V sets; a bare K passes the caller's value on, as docker does."""
    env = {}
    for value in values:
        key, separator, content = value.partition("=")
        if separator:
            env[key] = content
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def _env_files(paths: list[Path]) -> dict[str, str]:
    env: dict[str, str] = {}
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise fail(f"invalid value '{path}' for --env-file: {error.strerror}") from None
        env.update(
            _env([line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")])
        )
    return env
