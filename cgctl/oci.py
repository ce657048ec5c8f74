"""`cgctl-oci`: runc's command line over cgctl's runtime, so containerd's shim, conmon (podman, CRI-O) and
through them Kubernetes run containers with cgctl (docs/oci.md).

Parsed with argparse, not typer: callers spell runc's flags exactly (global options before the verb,
`--log-format=json`, `-b`), and a shim calls `state`, `kill` and `delete` for every container, so
start-up must stay a few tens of milliseconds (bench/oci.py). Errors go to stderr and, with --log,
into that file (as JSON lines with --log-format json: containerd shows the last msg), exit status 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from cgctl.cgroup import fs
from cgctl.runtime import container as oci
from cgctl.runtime.container import OciError

if TYPE_CHECKING:
    from cgctl.runtime.oci_checkpoint import CriuOptions

USAGE = "cgctl-oci [global options] COMMAND [options] ID"
# runc update's flags (runtime/oci_update.py reads their values)
UPDATE_FLAGS = ("memory", "memory-reservation", "memory-swap", "cpu-share", "cpu-quota", "cpu-period",
                "cpuset-cpus", "cpuset-mems", "pids-limit", "blkio-weight")  # fmt: skip


def main(argv: list[str] | None = None) -> NoReturn:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "verb", None):
        parser.print_help(sys.stderr)
        sys.exit(1)
    log = _Log(args.log, args.log_format, args.debug)
    log.debug(f"{args.verb} {' '.join(sys.argv[1:] if argv is None else argv)}")
    try:
        status = args.handler(args) or 0
    except OciError as error:
        log.error(str(error))
        status = 1
    except KeyboardInterrupt:
        status = 130
    sys.exit(status)


class _Log:
    """runc's --log: logrus lines, text (time="..." level=... msg="...") or JSON."""

    def __init__(self, path: str | None, form: str, debug: bool) -> None:
        self.path, self.form, self.debugging = path, form, debug

    def error(self, message: str) -> None:
        print(message, file=sys.stderr)
        self._write("error", message)

    def debug(self, message: str) -> None:
        if self.debugging:
            self._write("debug", message)

    def _write(self, level: str, message: str) -> None:
        if not self.path:
            return
        import datetime

        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        if self.form == "json":
            line = json.dumps({"level": level, "msg": message, "time": now})
        else:
            line = f"time={json.dumps(now)} level={level} msg={json.dumps(message)}"
        try:
            with open(self.path, "a") as file:
                file.write(line + "\n")
        except OSError as error:
            print(f"cgctl-oci: --log {self.path}: {error.strerror}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cgctl-oci",
        usage=USAGE,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--root", type=Path, default=None, help="state directory (default /run/cgctl-oci)")
    parser.add_argument("--log", help="append errors (and --debug lines) to this file")
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--debug", action="store_true", help="log each command too")
    parser.add_argument("--systemd-cgroup", action="store_true", help='cgroupsPath is "slice:prefix:name"')
    parser.add_argument(
        "--cgroup-manager", choices=("cgroupfs", "systemd", "disabled"), help="crun's spelling"
    )
    parser.add_argument("--criu", default="criu", help="the criu binary for checkpoint and restore")
    parser.add_argument(
        "--rootless", default="auto", help="accepted for runc's callers; cgctl decides by euid"
    )
    parser.add_argument("-v", "--version", action="version", version=_version())
    verbs = parser.add_subparsers(dest="verb", metavar="COMMAND")

    def verb(
        name: str, handler: Callable[[argparse.Namespace], int | None], text: str
    ) -> argparse.ArgumentParser:
        sub = verbs.add_parser(name, help=text, description=text)
        sub.set_defaults(handler=handler)
        return sub

    def with_id(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("id", metavar="ID")
        return sub

    for name, handler, text in (
        ("create", _create, "Create a container from a bundle: ready, its process not started"),
        ("run", _run, "Create and start a container; wait for it unless --detach"),
    ):
        sub = verb(name, handler, text)
        sub.add_argument("-b", "--bundle", type=Path, default=Path("."))
        sub.add_argument("--console-socket", help="a unix socket to send the terminal's master to")
        sub.add_argument("--pid-file", type=Path)
        sub.add_argument("--no-pivot", action="store_true", help="accepted; cgctl always pivots")
        sub.add_argument("--no-new-keyring", action="store_true", help="accepted; cgctl makes no keyring")
        sub.add_argument("--preserve-fds", type=int, default=0)
        if name == "run":
            sub.add_argument("-d", "--detach", action="store_true")
            sub.add_argument("--keep", action="store_true", help="do not delete the container when it ends")
        with_id(sub)
    with_id(verb("start", _start, "Start a created container's process"))
    with_id(verb("state", _state, "Print a container's state as JSON"))
    sub = with_id(verb("kill", _kill, "Send a signal to a container's init (default SIGTERM)"))
    sub.add_argument("signal", nargs="?", default="SIGTERM")
    sub.add_argument("-a", "--all", action="store_true", help="every process of the container")
    sub = with_id(verb("delete", _delete, "Delete a stopped container (--force: any)"))
    sub.add_argument("-f", "--force", action="store_true")
    with_id(verb("pause", _pause, "Freeze every process of a container"))
    with_id(verb("resume", _resume, "Thaw a paused container"))
    sub = verb("ps", _ps, "List a container's processes")
    sub.add_argument("-f", "--format", choices=("table", "json"), default="table")
    with_id(sub)
    sub.add_argument("ps_args", nargs=argparse.REMAINDER, help="options for ps(1), default -ef")
    sub = verb("list", _list, "List containers")
    sub.add_argument("-f", "--format", choices=("table", "json"), default="table")
    sub.add_argument("-q", "--quiet", action="store_true", help="ids only")
    sub = verb("exec", _exec, "Run a process in a running container")
    sub.add_argument("-p", "--process", type=Path, help="the process as OCI process JSON")
    sub.add_argument("--console-socket")
    sub.add_argument("--cwd")
    sub.add_argument("-e", "--env", action="append", default=[])
    sub.add_argument("-t", "--tty", action="store_true")
    sub.add_argument("-u", "--user", help="UID[:GID]")
    sub.add_argument("-d", "--detach", action="store_true")
    sub.add_argument("--pid-file", type=Path)
    sub.add_argument("--preserve-fds", type=int, default=0)
    with_id(sub)
    sub.add_argument("command", nargs=argparse.REMAINDER)
    for name, handler, text in (
        ("checkpoint", _checkpoint, "Dump a running container with CRIU"),
        ("restore", _restore, "Restore a checkpoint as a new container from a bundle"),
    ):
        sub = verb(name, handler, text)
        sub.add_argument("--image-path", type=Path, default=Path("checkpoint"))
        sub.add_argument("--work-path", type=Path, help="CRIU's logs and work files")
        sub.add_argument("--tcp-established", action="store_true")
        sub.add_argument("--ext-unix-sk", action="store_true")
        sub.add_argument("--shell-job", action="store_true")
        sub.add_argument("--file-locks", action="store_true")
        sub.add_argument("--auto-dedup", action="store_true")
        sub.add_argument(
            "--empty-ns", action="append", default=[], help="restore this namespace empty: network"
        )
        sub.add_argument(
            "--manage-cgroups-mode", default="ignore", help="ignore or soft (cgctl makes the cgroups)"
        )
        for unsupported in ("--lazy-pages", "--page-server", "--status-fd"):
            sub.add_argument(unsupported, nargs="?", const=True, default=None, help=argparse.SUPPRESS)
        if name == "checkpoint":
            sub.add_argument("--leave-running", action="store_true")
            sub.add_argument("--pre-dump", action="store_true")
            sub.add_argument("--parent-path", help="the previous pre-dump's images, relative to --image-path")
        else:
            sub.add_argument("-b", "--bundle", type=Path, default=Path("."))
            sub.add_argument("--console-socket")
            sub.add_argument("-d", "--detach", action="store_true")
            sub.add_argument("--pid-file", type=Path)
            sub.add_argument("--no-subreaper", action="store_true", help="accepted")
            sub.add_argument("--no-pivot", action="store_true", help="accepted")
            sub.add_argument("--keep", action="store_true", help="do not delete the container when it ends")
        with_id(sub)
    sub = verb("update", _update, "Change a running container's resources")
    sub.add_argument("-r", "--resources", help="OCI LinuxResources JSON from this file, or - for stdin")
    for flag in UPDATE_FLAGS:
        sub.add_argument(f"--{flag}")
    for refused in ("--kernel-memory", "--kernel-memory-tcp", "--l3-cache-schema", "--mem-bw-schema"):
        sub.add_argument(refused, help=argparse.SUPPRESS)
    with_id(sub)
    sub = verb("events", _events, "Print a container's stats (and OOM kills) as JSON lines")
    sub.add_argument("--stats", action="store_true", help="print one stats event and exit")
    sub.add_argument("--interval", default="5s", help="between stats events (5s, 500ms)")
    with_id(sub)
    verb("features", _features, "Print what this runtime supports, as runc's JSON")
    sub = verb("spec", _spec, "Write a default config.json into the bundle")
    sub.add_argument("-b", "--bundle", type=Path, default=Path("."))
    sub.add_argument("--rootless", action="store_true")
    return parser


def _version() -> str:
    from cgctl import __version__

    return f"cgctl-oci version {__version__}\nspec: {oci.OCI_VERSION}"


def _root(args: argparse.Namespace) -> Path:
    return args.root or oci.default_root()


def _options(args: argparse.Namespace, adopt: bool = False) -> oci.Options:
    if getattr(args, "preserve_fds", 0):
        raise OciError("--preserve-fds: passing extra file descriptors is not supported by cgctl-oci")
    return oci.Options(
        console_socket=args.console_socket,
        pid_file=args.pid_file,
        systemd_cgroup=bool(args.systemd_cgroup or args.cgroup_manager == "systemd"),
        adopt=adopt,
    )


def _create(args: argparse.Namespace) -> None:
    oci.create(_root(args), args.id, args.bundle, _options(args))


def _run(args: argparse.Namespace) -> int:
    container, master = oci.create(_root(args), args.id, args.bundle, _options(args, adopt=not args.detach))
    try:
        oci.start(container)
    except OciError:
        oci.delete(container, force=True)
        raise
    return 0 if args.detach else _attend(container, master, args.keep)


def _attend(container: oci.Container, master: int | None, keep: bool) -> int:
    """Wait for the container's init, our child, passing our signals on (and relaying its terminal);
    return its exit status, and delete it unless keep."""
    from cgctl.runtime.supervisor import FORWARDED_SIGNALS  # loaded already: create needed it

    pid = int(container.saved()["pid"])
    previous = {
        sig: signal.signal(sig, lambda received, _frame: _forward(pid, received)) for sig in FORWARDED_SIGNALS
    }
    try:
        if master is None:
            status = _wait(pid)
        else:
            from cgctl.runtime import terminal

            status = terminal.relay_until_exit(master, True, lambda: _wait(pid))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not keep:
        oci.delete(container, force=True)
    return status


def _criu_options(args: argparse.Namespace) -> CriuOptions:
    """runc's checkpoint and restore flags; those cgctl does not implement are refused by name."""
    from cgctl.runtime.oci_checkpoint import CriuOptions

    for unsupported in ("lazy_pages", "page_server", "status_fd"):
        if getattr(args, unsupported) is not None:
            raise OciError(
                f"--{unsupported.replace('_', '-')}: not supported by cgctl-oci's checkpoint and restore"
            )
    if args.manage_cgroups_mode not in ("ignore", "soft"):
        raise OciError(
            f"--manage-cgroups-mode {args.manage_cgroups_mode}: cgctl makes the cgroups; use ignore"
        )
    try:
        return CriuOptions(
            image_path=args.image_path.resolve(),
            work_path=args.work_path.resolve() if args.work_path else None,
            leave_running=getattr(args, "leave_running", False),
            tcp_established=args.tcp_established,
            ext_unix_sk=args.ext_unix_sk,
            shell_job=args.shell_job,
            file_locks=args.file_locks,
            pre_dump=getattr(args, "pre_dump", False),
            parent_path=getattr(args, "parent_path", None),
            auto_dedup=args.auto_dedup,
            empty_ns=tuple(args.empty_ns),
        )
    except ValueError as error:
        raise OciError(str(error)) from None


def _checkpoint(args: argparse.Namespace) -> None:
    from cgctl.runtime import checkpoint, oci_checkpoint

    container = oci.open_container(_root(args), args.id)
    saved = container.saved()
    if container.status(saved) != "running":
        raise OciError("container not running")
    options = _criu_options(args)
    try:
        config = json.loads(Path(saved["bundle"], "config.json").read_text())
        oci_checkpoint.checkpoint(int(saved["pid"]), container.cgroup, Path(saved["rootfs"]), config, options)
    except (OSError, ValueError) as error:
        raise OciError(f"{saved['bundle']}/config.json: {error}") from None
    except checkpoint.CheckpointError as error:
        raise OciError(str(error)) from None


def _restore(args: argparse.Namespace) -> int:
    options = _criu_options(args)
    container, _ = oci.create(
        _root(args), args.id, args.bundle, _options(args, adopt=not args.detach), options
    )
    return 0 if args.detach else _attend(container, None, args.keep)


def _update(args: argparse.Namespace) -> None:
    from pydantic import ValidationError

    from cgctl.runtime import update
    from cgctl.runtime.bundle import BundleError, limits_from_resources
    from cgctl.runtime.oci_update import update_flags_to_resources
    from cgctl.spec import SpecError

    for refused in ("kernel_memory", "kernel_memory_tcp", "l3_cache_schema", "mem_bw_schema"):
        if getattr(args, refused) is not None:
            raise OciError(f"--{refused.replace('_', '-')}: cgroup v2 has no such limit (or cgctl no RDT)")
    container = oci.open_container(_root(args), args.id)
    if container.status() not in ("created", "running", "paused"):
        raise OciError("container not running")
    try:
        if args.resources is not None:  # as runc: the file replaces the flags
            text = sys.stdin.read() if args.resources == "-" else Path(args.resources).read_text()
            resources = json.loads(text)
        else:
            flags = {flag: getattr(args, flag.replace("-", "_")) for flag in UPDATE_FLAGS}
            resources = update_flags_to_resources(flags)
        update.update(container.id, limits_from_resources(resources))
    except OSError as error:
        raise OciError(f"--resources {args.resources}: {error.strerror}") from None
    except (ValueError, BundleError, SpecError, LookupError) as error:
        if isinstance(error, ValidationError):
            raise OciError(f"update: {error.errors()[0]['loc']}: {error.errors()[0]['msg']}") from None
        raise OciError(str(error)) from None


def _events(args: argparse.Namespace) -> int:
    """runc's events: stats every --interval (once with --stats), an "oom" event for each OOM kill,
    until the container stops."""
    import time

    from cgctl.runtime.oci_stats import stats

    container = oci.open_container(_root(args), args.id)
    interval = _duration(args.interval)
    group = container.cgroup
    kills = _oom_kills(group)
    while container.status() != "stopped":
        if (now := _oom_kills(group)) > kills:
            print(json.dumps({"type": "oom", "id": container.id}), flush=True)
            kills = now
        event = stats(container.id, group)
        if event is None:
            break
        print(json.dumps(event, separators=(",", ":")), flush=True)
        if args.stats:
            return 0
        time.sleep(interval)
    if args.stats:
        raise OciError("container not running")
    return 0


def _oom_kills(group: fs.Cgroup) -> int:
    events = group.read_optional("memory.events") or ""
    return next((int(line.split()[1]) for line in events.splitlines() if line.startswith("oom_kill ")), 0)


def _duration(text: str) -> float:
    """Go's durations as runc takes them: 5s, 500ms, 1m, 1.5s."""
    for unit, seconds in (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0)):
        if text.endswith(unit):
            try:
                value = float(text[: -len(unit)]) * seconds
            except ValueError:
                break
            if value > 0:
                return value
    raise OciError(f"--interval {text}: not a duration (e.g. 5s, 500ms)")


def _features(args: argparse.Namespace) -> None:
    from cgctl.runtime.oci_info import features

    print(json.dumps(features(), indent="    "))


def _spec(args: argparse.Namespace) -> None:
    from cgctl.runtime.oci_info import default_spec

    path = args.bundle / "config.json"
    if path.exists():
        raise OciError(f"File {path} exists. Remove it first")
    try:
        path.write_text(json.dumps(default_spec(rootless=args.rootless), indent="\t"))
    except OSError as error:
        raise OciError(f"{path}: {error.strerror}") from None


def _forward(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait(pid: int) -> int:
    from cgctl.runtime.spawn import exit_status

    while True:
        try:
            return exit_status(os.waitpid(pid, 0)[1])
        except InterruptedError:
            continue


def _start(args: argparse.Namespace) -> None:
    oci.start(oci.open_container(_root(args), args.id))


def _state(args: argparse.Namespace) -> None:
    print(json.dumps(oci.open_container(_root(args), args.id).state(), indent=2))


def _kill(args: argparse.Namespace) -> None:
    oci.kill(oci.open_container(_root(args), args.id), oci.parse_signal(args.signal), args.all)


def _delete(args: argparse.Namespace) -> None:
    try:
        container = oci.open_container(_root(args), args.id)
    except OciError:
        if args.force:
            return  # runc: deleting what is not there, with --force, is no error
        raise
    oci.delete(container, args.force)


def _pause(args: argparse.Namespace) -> None:
    oci.set_paused(oci.open_container(_root(args), args.id), True)


def _resume(args: argparse.Namespace) -> None:
    oci.set_paused(oci.open_container(_root(args), args.id), False)


def _ps(args: argparse.Namespace) -> int:
    container = oci.open_container(_root(args), args.id)
    pids = oci.pids(container)
    if args.format == "json":
        print(json.dumps(pids))
        return 0
    import subprocess

    listing = subprocess.run(["ps", *(args.ps_args or ["-ef"])], capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise OciError(f"ps {' '.join(args.ps_args)}: {listing.stderr.strip()}")
    lines = listing.stdout.splitlines()
    if not lines:
        return 0
    header = lines[0].split()
    if "PID" not in header:
        raise OciError("ps's output has no PID column: give options that print one")
    column = header.index("PID")
    print(lines[0])
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column and fields[column].isdigit() and int(fields[column]) in pids:
            print(line)
    return 0


def _list(args: argparse.Namespace) -> None:
    entries = []
    for container in oci.containers(_root(args)):
        try:
            entries.append(container.state())
        except OciError:
            continue  # deleted meanwhile
    if args.quiet:
        for entry in entries:
            print(entry["id"])
    elif args.format == "json":
        print(
            json.dumps(
                [
                    {
                        key: entry[key]
                        for key in (
                            "ociVersion",
                            "id",
                            "pid",
                            "status",
                            "bundle",
                            "rootfs",
                            "created",
                            "owner",
                        )
                    }
                    for entry in entries
                ]
            )
        )
    else:
        rows = [("ID", "PID", "STATUS", "BUNDLE", "CREATED", "OWNER")]
        rows += [
            (e["id"], str(e["pid"]), e["status"], e["bundle"], e["created"], e["owner"]) for e in entries
        ]
        widths = [max(len(row[index]) for row in rows) for index in range(len(rows[0]))]
        for row in rows:
            print("   ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())


def _exec(args: argparse.Namespace) -> int:
    if args.preserve_fds:
        raise OciError("--preserve-fds: passing extra file descriptors is not supported by cgctl-oci")
    container = oci.open_container(_root(args), args.id)
    process: dict[str, Any] = {}
    if args.process is not None:
        try:
            process = json.loads(args.process.read_text())
        except (OSError, ValueError) as error:
            raise OciError(f"--process {args.process}: cannot read it as JSON: {error}") from None
    command = (args.command[1:] if args.command[:1] == ["--"] else args.command) or process.get("args") or []
    if not command:
        raise OciError("exec: the command to run is missing (give it after the id, or in --process)")
    user = process.get("user") or {}
    return oci_exec(
        container,
        command=list(command),
        env=[*(process.get("env") or []), *args.env],
        cwd=args.cwd or process.get("cwd"),
        user=args.user or (f"{user.get('uid', 0)}:{user.get('gid', 0)}" if user else None),
        tty=args.tty or bool(process.get("terminal")),
        console_socket=args.console_socket,
        detach=args.detach,
        pid_file=args.pid_file,
    )


def oci_exec(
    container: oci.Container,
    *,
    command: list[str],
    env: list[str],
    cwd: str | None,
    user: str | None,
    tty: bool,
    console_socket: str | None,
    detach: bool,
    pid_file: Path | None,
) -> int:
    """The process joins the container; detached it goes to our subreaper (the shim), else we wait."""
    from pydantic import ValidationError

    from cgctl import state
    from cgctl.runtime import exec as execs
    from cgctl.runtime import spawn
    from cgctl.spec import ExecSpec

    status = container.status()
    if status != "running":
        raise OciError(
            f"cannot exec in a {status} container" if status != "stopped" else "container not running"
        )
    if tty and console_socket is None and detach:
        raise OciError("cannot allocate tty if runc will detach without setting console socket")
    try:
        spec = ExecSpec(
            command=command,
            env=dict(entry.partition("=")[::2] for entry in env),
            workdir=cwd,
            user=user,
            tty=tty,
            interactive=True,
        )
        target = execs.prepare(state.default_state_dir(), container.id, spec)
        started = execs.start(target, adopt=not detach)
    except ValidationError as error:
        raise OciError(f"exec: {error.errors()[0]['loc']}: {error.errors()[0]['msg']}") from None
    except (LookupError, spawn.SpawnError) as error:
        raise OciError(str(error)) from None
    if pid_file is not None:
        oci.write_pid_file(pid_file, started.pid)
    if started.master is not None and console_socket is not None:
        try:
            oci.send_console(console_socket, started.master)
        finally:
            os.close(started.master)
        if detach:
            return 0
        return _wait(started.pid)
    if detach:
        return 0
    if started.master is not None:
        from cgctl.runtime import terminal

        return terminal.relay_until_exit(started.master, True, lambda: _wait(started.pid))
    return _wait(started.pid)


if __name__ == "__main__":  # python -m cgctl.oci
    main()
