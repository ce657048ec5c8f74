"""`cgctl checkpoint NAME --dir DIR` and `cgctl restore --dir DIR`: CRIU, with hooks and progress."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from cgctl.cli import connection
from cgctl.cli.errors import fail, invalid_value
from cgctl.cli.run import CgroupRoot, Report, end_as

if TYPE_CHECKING:
    from cgctl.runtime.checkpoint import Progress
    from cgctl.runtime.interface import Runtime

Directory = Annotated[Path, typer.Option("--dir", help="the checkpoint directory (images, logs, manifest)")]
Hook = Annotated[
    Path | None,
    typer.Option(help="an executable run at pre-dump, post-dump, pre-restore, post-restore and failure"),
]
StateDir = Annotated[Path | None, typer.Option(envvar="CGCTL_STATE_DIR", help="the run records")]
# Which option fed each field a SpecError names.
OPTION_FOR_FIELD: dict[tuple[str | int, ...], str] = {
    ("dir",): "--dir",
    ("hook",): "--hook",
    ("name",): "--name",
}


def register(app: typer.Typer) -> None:
    app.command()(checkpoint)
    app.command()(restore)


def checkpoint(
    name: Annotated[str, typer.Argument(help="the container's name")],
    directory: Directory,
    leave_running: Annotated[bool, typer.Option(help="keep the container running after the dump")] = False,
    tcp_established: Annotated[bool, typer.Option(help="dump established TCP connections too")] = False,
    hook: Hook = None,
    json_output: Annotated[bool, typer.Option("--json", help="print the result as JSON")] = False,
    state_dir: StateDir = None,
) -> None:
    """Dump the container's whole process tree with CRIU into DIR (new or empty).

    The container ends once its images are complete (its `cgctl run` says where it
    went), unless --leave-running. If anything fails it keeps running, thawed.
    """
    from cgctl.runtime.api import CheckpointRequest
    from cgctl.spec import SpecError, format_size

    chosen = connection.runtime(state_dir)
    request = CheckpointRequest(
        dir=str(_on_machine_share(directory)),
        leave_running=leave_running,
        tcp_established=tcp_established,
        hook=str(hook.absolute()) if hook else None,
    )
    if chosen.host:
        print(f"cgctl: checkpointing {name} through the daemon at {chosen.host}", file=sys.stderr)
    try:
        result = chosen.checkpoint(name, request, _progress(f"checkpointing {name}"))
    except SpecError as error:
        raise invalid_value(error, OPTION_FOR_FIELD) from None
    except connection.Failure as error:
        raise connection.failed(error) from None
    _end_progress()
    for note in result.notes:
        print(f"cgctl: note: {note}", file=sys.stderr)
    if json_output:
        print(json.dumps({"name": name, "directory": result.dir, **result.model_dump(exclude={"dir"})}))
        return
    after = "left running" if leave_running else "stopped"
    print(
        f"{name}: checkpointed to {result.dir} "
        f"({format_size(result.image_bytes)} of memory images in {result.seconds:.1f} s; {after})"
    )


def restore(
    directory: Directory,
    name: Annotated[
        str | None, typer.Option(help="the new container's name (default: the dumped one's)")
    ] = None,
    hook: Hook = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="restore it under the daemon, in the background")
    ] = False,
    report: Report = None,
    cgroup_root: CgroupRoot = None,
    state_dir: StateDir = None,
) -> None:
    """Restore a checkpoint as a new container in a new cgroup with the limits it had, and supervise
    it as `cgctl run` does: its stdio becomes this command's, and this command exits with its status.

    Through a daemon on another host (a `cgctl machine`, --host tcp:// or ssh://), or with -d, the
    daemon restores it as a detached container: -d prints its name, otherwise its output is
    streamed here and this command exits with its status."""
    from cgctl import network
    from cgctl.cgroup.fs import CgroupError
    from cgctl.runtime.checkpoint import CheckpointError
    from cgctl.runtime.checkpoint import restore as undump
    from cgctl.spec import SpecError

    chosen = connection.runtime(state_dir)
    if detach or not chosen.paths_are_here:
        _restore_through(chosen, directory, name, hook, detach, report)

    def restored(name: str, seconds: float) -> None:
        _end_progress()
        print(f"cgctl: restored {name} from {directory} in {seconds:.1f} s", file=sys.stderr)

    try:
        result = undump(
            directory,
            name=name,
            hook=hook,
            cgroup_root=cgroup_root,
            state_dir=state_dir,
            progress=_progress(f"restoring {name or directory}"),
            on_restored=restored,
        )
    except SpecError as error:
        raise invalid_value(error, OPTION_FOR_FIELD) from None
    except (CheckpointError, CgroupError, network.NetworkError, network.cni.CniError) as error:
        _end_progress()
        raise fail(str(error)) from None
    end_as(result, report)


def _restore_through(
    daemon: Runtime,
    directory: Path,
    name: str | None,
    hook: Path | None,
    detach: bool,
    report: str | None,
) -> NoReturn:
    """The daemon restores the checkpoint (a directory on its host) as a detached container (without
    one, the local runtime says how to start one)."""
    from cgctl.cli.run import attach_to_end
    from cgctl.runtime.api import RestoreRequest

    target = _on_machine_share(directory)
    request = RestoreRequest(dir=str(target), name=name, hook=str(hook.absolute()) if hook else None)
    started = time.monotonic()
    try:
        restored = daemon.restore(request)
    except connection.Failure as error:
        raise connection.failed(error) from None
    print(
        f"cgctl: restored {restored.name} from {target} in {time.monotonic() - started:.1f} s "
        f"through the daemon at {daemon.host}",
        file=sys.stderr,
    )
    if detach:
        print(restored.name)
        raise typer.Exit(0)
    attach_to_end(daemon, restored.name, report)


def _on_machine_share(directory: Path) -> Path:
    """The directory's absolute path; through a machine, it must be one the machine shares
    read-write (CRIU writes its logs there), not one whose writes would stay in the VM."""
    machine = connection.machine
    if machine is not None and not machine.writes_reach_the_host(directory):
        raise fail(
            f"invalid value '{directory}' for --dir: the machine shares {', '.join(machine.config().shares)} "
            "read-write, and a checkpoint elsewhere would stay in the VM. Fix: a --dir under one of them"
        )
    return directory.absolute()


def _progress(doing: str) -> Progress:
    """On a terminal, a line redrawn in place; elsewhere a line every 5 s, so short dumps print nothing."""
    from cgctl.spec import format_size

    terminal = sys.stderr.isatty()
    last = time.monotonic()

    def show(done: int, expected: int | None) -> None:
        nonlocal last
        if not terminal and time.monotonic() - last < 5:
            return
        last = time.monotonic()
        of = f" of ~{format_size(expected)}" if expected else ""
        line = f"cgctl: {doing}: {format_size(done)}{of}"
        print(
            f"\r{line}\033[K" if terminal else line, end="" if terminal else "\n", file=sys.stderr, flush=True
        )

    return show


def _end_progress() -> None:
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)
