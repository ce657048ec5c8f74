"""`cgctl run [OPTIONS] -- CMD [ARGS...]`: run a workload under limits and exit with its status."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

from cgctl.cli import connection, errors, limits
from cgctl.cli.errors import fail, invalid_options, invalid_value
from cgctl.cli.process import DetachKeys, environment

if TYPE_CHECKING:
    from cgctl.machine.instance import Machine
    from cgctl.runtime.api import Container
    from cgctl.runtime.interface import Runtime
    from cgctl.runtime.report import RunReport
    from cgctl.spec import WorkloadSpec

# Which option fed each spec field, so that errors speak the user's language.
OPTION_FOR_FIELD: dict[tuple[str | int, ...], str] = {
    ("name",): "--name",
    ("command",): "CMD",
    **{("limits", *field): option for field, option in limits.OPTION_FOR_FIELD.items()},
    ("namespaces", "share"): "--share",
    ("hostname",): "--hostname",
    ("env",): "--env",
    ("workdir",): "--workdir",
    ("labels",): "--label",
    ("user",): "--user",
    ("rootfs", "layers"): "--rootfs/--layer",
    ("rootfs", "upper"): "--upper",
    ("rootfs", "keep_upper"): "--keep-upper",
    ("volumes",): "--volume",
    ("security", "privileged"): "--privileged",
    ("security", "cap_add"): "--cap-add",
    ("security", "cap_drop"): "--cap-drop",
    ("security", "no_new_privileges"): "--allow-new-privileges",
    ("security", "seccomp"): "--seccomp",
    ("security", "devices"): "--device",
    ("network",): "--network",
    ("network", "mode"): "--network",
    ("network", "publish"): "--publish",
    ("network", "dns"): "--dns",
    ("network", "dns_search"): "--dns-search",
    ("network", "dns_options"): "--dns-option",
    ("network", "add_hosts"): "--add-host",
}


# Shared with `cgctl restore`, which supervises as run does.
Report = Annotated[str | None, typer.Option(help="write a JSON report here when it ends (- = stderr)")]
CgroupRoot = Annotated[Path | None, typer.Option(envvar="CGCTL_CGROUP_ROOT", help="cgctl's cgroup subtree")]


def register(app: typer.Typer) -> None:
    app.command(context_settings={"allow_interspersed_args": False})(limits.limit_options(run))
    app.command()(attach)


def attach(
    name: Annotated[str, typer.Argument(help="a container the daemon runs", show_default=False)],
    detach_keys: DetachKeys = None,
) -> None:
    """Attach your terminal to a running container's: its output, and with -i its stdin; with -t your
    terminal is in raw mode and its size followed. The detach keys (Ctrl-P Ctrl-Q) leave it running;
    otherwise this ends when the container does, with its status."""
    keys = errors.detach_keys(detach_keys)
    chosen = connection.runtime()
    try:
        spec = chosen.inspect(name).spec
    except connection.Failure as error:
        raise connection.failed(error) from None
    if spec.get("tty"):
        errors.require_terminal(bool(spec.get("interactive")), "attach")
    attach_to_end(chosen, name, None, keys, remove=False, tty=bool(spec.get("tty")))


def run(
    command: Annotated[
        list[str] | None, typer.Argument(help="the workload: -- CMD [ARGS...]", show_default=False)
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="unique name (default: generated); also the cgroup's name")
    ] = None,
    limit_fields: dict[str, dict[str, Any]] | None = None,
    share: Annotated[
        list[str] | None, limits.repeated("keep the host's NS: cgroup, ipc, mnt, net, pid or uts")
    ] = None,
    userns: Annotated[bool, typer.Option(help="add a user namespace: root inside is you outside")] = False,
    hostname: Annotated[str | None, typer.Option(help="hostname inside (default: the name)")] = None,
    env: Annotated[
        list[str] | None, limits.repeated("K=V in the environment; a bare K passes yours on")
    ] = None,
    env_file: Annotated[list[Path] | None, limits.repeated("a file of K=V lines; # starts a comment")] = None,
    workdir: Annotated[str | None, typer.Option(help="working directory (default: the current one)")] = None,
    label: Annotated[
        list[str] | None, limits.repeated("K=V metadata for metrics and policies; never in the env")
    ] = None,
    init: Annotated[bool, typer.Option(help="a minimal reaper as pid 1 that forwards signals")] = False,
    user: Annotated[
        str | None, typer.Option(help="USER[:GROUP] to run as (names from the root's /etc)")
    ] = None,
    image: Annotated[
        str | None, typer.Option(help="an imported image NAME[:TAG]: its layers and its config as defaults")
    ] = None,
    rootfs: Annotated[
        Path | None, typer.Option(help="a root of its own: DIR as its read-only bottom layer")
    ] = None,
    layer: Annotated[list[Path] | None, limits.repeated("a read-only layer over --rootfs, in order")] = None,
    upper: Annotated[
        Path | None, typer.Option(help="keep writes in DIR/upper (default: a tmpfs, gone at the end)")
    ] = None,
    keep_upper: Annotated[bool, typer.Option(help="keep --upper's DIR when it ends")] = False,
    read_only: Annotated[
        bool, typer.Option(help="a read-only root (/tmp and volumes stay writable)")
    ] = False,
    volume: Annotated[
        list[str] | None,
        typer.Option(
            "--volume",
            "-v",
            help="HOST:PATH[:ro] bind-mounted into the root (repeatable)",
            show_default=False,
        ),
    ] = None,
    privileged: Annotated[
        bool,
        typer.Option(
            help="turn the sandbox OFF: every capability, no seccomp, no_new_privs or masked kernel paths, "
            "every device, writable /proc/sys and cgroup files; the workload can own the host"
        ),
    ] = False,
    cap_add: Annotated[
        list[str] | None, limits.repeated("a capability over the default set, e.g. NET_ADMIN")
    ] = None,
    cap_drop: Annotated[list[str] | None, limits.repeated("a capability to drop, or ALL")] = None,
    seccomp: Annotated[
        str | None,
        typer.Option(help="seccomp profile: default, unconfined, or an OCI/docker JSON profile FILE"),
    ] = None,
    allow_new_privileges: Annotated[
        bool,
        typer.Option(
            help="leave no_new_privs off: setuid programs and file capabilities grant privileges on exec"
        ),
    ] = False,
    device: Annotated[
        list[str] | None, limits.repeated("HOST_PATH[:CONTAINER_PATH][:rwm]: a host device it may use")
    ] = None,
    network: Annotated[
        str | None,
        typer.Option(
            "--network",
            "--net",
            envvar="CGCTL_NETWORK",
            help="none, host, bridge, pasta, a network's NAME or container:NAME "
            "[default: bridge as root, pasta rootless]",
        ),
    ] = None,
    publish: Annotated[
        list[str] | None,
        typer.Option(
            "--publish",
            "-p",
            help="HOSTPORT:PORT, IP:HOSTPORT:PORT/udp or PORT: publish a port (repeatable, ranges too)",
            show_default=False,
        ),
    ] = None,
    publish_all: Annotated[
        bool, typer.Option("--publish-all", "-P", help="publish the image's exposed ports on free ports")
    ] = False,
    dns: Annotated[list[str] | None, limits.repeated("a nameserver for its resolv.conf")] = None,
    dns_search: Annotated[list[str] | None, limits.repeated("a search domain for its resolv.conf")] = None,
    dns_option: Annotated[list[str] | None, limits.repeated("a resolv.conf option, e.g. ndots:2")] = None,
    add_host: Annotated[list[str] | None, limits.repeated("NAME:IP, a line of its /etc/hosts")] = None,
    detach: Annotated[
        bool, typer.Option("--detach", "-d", help="run in the background under the daemon; print the name")
    ] = False,
    restart: Annotated[
        str | None, typer.Option(help="with the daemon: no, on-failure[:N], always or unless-stopped")
    ] = None,
    log_max_size: Annotated[
        str | None, typer.Option(help="with the daemon: rotate the output log at this size (default 10M)")
    ] = None,
    log_max_files: Annotated[
        int | None,
        typer.Option(help="with the daemon: log files kept, the current one included (default 3)"),
    ] = None,
    rm: Annotated[bool, typer.Option("--rm", help="with -d: remove the container once it has ended")] = False,
    interactive: Annotated[
        bool, typer.Option("--interactive", "-i", help="keep stdin open (through the daemon: attached)")
    ] = False,
    tty: Annotated[
        bool,
        typer.Option(
            "--tty", "-t", help="a terminal of its own, attached to yours (raw mode while attached)"
        ),
    ] = False,
    detach_keys: DetachKeys = None,
    report: Report = None,
    cgroup_root: CgroupRoot = None,
) -> None:
    """Run CMD in new namespaces and its own cgroup, under the given limits, sandboxed: a root CMD keeps
    only docker's default capabilities, runs with no_new_privs under a seccomp allowlist, and reaches
    no kernel path or device it has no business with (--privileged turns that off).

    With a daemon (--host, CGCTL_HOST or the default socket) it supervises the run: -d leaves it in
    the background; without -d, output is streamed, Ctrl-C is forwarded and its status returned.

    Exits with CMD's status; 125: cgctl error (nothing started); 126: not executable;
    127: not found; 128+N: killed by signal N.
    """
    from pydantic import ValidationError

    from cgctl.spec import WorkloadSpec

    keys = errors.detach_keys(detach_keys)
    if tty and not detach:
        errors.require_terminal(interactive, "run")
    chosen = connection.runtime()
    root = _root(image, rootfs, layer or [], upper, keep_upper, read_only)
    defaults = _image_defaults(image, rootfs, root, chosen) if image and root else {}
    command = [*defaults.get("Entrypoint", []), *(command or defaults.get("Cmd", []))]
    if not command:
        raise fail("no command given: cgctl run [OPTIONS] -- CMD [ARGS...]")
    image_env = dict(entry.partition("=")[::2] for entry in defaults.get("Env", []))
    fields = {
        "name": name,
        "command": command,
        "limits": limit_fields,
        "namespaces": {"share": share or [], "user": userns},
        "hostname": hostname,
        "env": {**image_env, **_env_files(env_file or []), **environment(env or [])},
        "workdir": workdir or defaults.get("WorkingDir"),
        "labels": limits.pairs("--label", label),
        "init": init,
        "user": user or defaults.get("User"),
        "rootfs": root,
        "volumes": volume or [],
        "security": {
            "privileged": privileged,
            "cap_add": cap_add or [],
            "cap_drop": cap_drop or [],
            "no_new_privileges": not allow_new_privileges,
            "seccomp": _seccomp_source(seccomp),
            "devices": device or [],
        },
        "tty": tty,
        "interactive": interactive,
        "network": _network_fields(
            network, publish, publish_all, defaults, dns, dns_search, dns_option, add_host
        ),
    }
    try:
        spec = WorkloadSpec.model_validate(fields)
    except ValidationError as error:
        raise invalid_options(error, OPTION_FOR_FIELD) from None
    if connection.machine is not None:
        _check_shared(spec, connection.machine)
    service = {"restart": restart, "log_max_size": log_max_size, "log_max_files": log_max_files, "rm": rm}
    if chosen.host:
        with _machine_ports(spec, detach):
            _through_daemon(chosen, spec, detach, service, report, keys)
    if detach or any(service.values()):
        from cgctl.runtime.local import needs_daemon

        given = "-d" if detach else "--" + next(k for k, v in service.items() if v).replace("_", "-")
        raise connection.failed(needs_daemon(f"`cgctl run {given}`"))
    _run_here(spec, cgroup_root, report)


def _network_fields(
    mode: str | None,
    publish: list[str] | None,
    publish_all: bool,
    image: dict[str, Any],
    dns: list[str] | None,
    dns_search: list[str] | None,
    dns_option: list[str] | None,
    add_host: list[str] | None,
) -> dict[str, Any]:
    """The spec's network from the options (-p and --add-host parsed here, to name the bad one); -P
    adds the image's exposed ports on free host ports."""
    from cgctl.netspec import PortMapping, parse_add_host, parse_publish

    ports: list[PortMapping] = []
    for text in publish or []:
        try:
            ports += parse_publish(text)
        except ValueError as error:
            raise fail(f"invalid value {text!r} for --publish: {error}") from None
    if publish_all:
        for exposed in image.get("ExposedPorts") or {}:
            port, _, protocol = str(exposed).partition("/")
            ports.append(PortMapping(host_port=0, container_port=int(port), protocol=protocol or "tcp"))
    hosts = []
    for text in add_host or []:
        try:
            hosts.append(parse_add_host(text))
        except ValueError as error:
            raise fail(f"invalid value {text!r} for --add-host: {error}") from None
    fields: dict[str, Any] = {"mode": mode, "publish": ports, "publish_all": publish_all, "add_hosts": hosts}
    return fields | {"dns": dns or [], "dns_search": dns_search or [], "dns_options": dns_option or []}


def _run_here(spec: WorkloadSpec, cgroup_root: Path | None, report: str | None) -> NoReturn:
    """Run in this process (no daemon): it supervises the workload and ends with it."""
    import secrets

    from cgctl import policy, runtime
    from cgctl.cgroup.fs import CgroupError
    from cgctl.spec import SpecError

    try:
        policies = policy.load_directory(policy.default_directory())
    except policy.PolicyError as error:
        raise fail(
            f"nothing was run: the policy directory has errors (`cgctl policy validate`):\n{error}"
        ) from None
    if spec.name is None:
        spec = spec.model_copy(update={"name": f"run-{secrets.token_hex(4)}"})
    subject = policy.Subject.of(spec.model_dump(mode="json"), str(spec.name))
    acting = [p.source for p in policies.policies if p.policy.actions and policy.matches(p, subject)]
    if acting:
        print(f"cgctl: only the daemon (cgctld) takes the actions of {', '.join(acting)}; this run gets "
              "their limits", file=sys.stderr)  # fmt: skip
    from cgctl import network

    try:
        result = runtime.run(spec, cgroup_root=cgroup_root, policies=policies)
    except SpecError as error:
        raise invalid_value(error, OPTION_FOR_FIELD) from None
    except (CgroupError, network.NetworkError, network.cni.CniError) as error:
        raise fail(str(error)) from None
    except runtime.SpawnError as error:
        print(f"cgctl: {error}", file=sys.stderr)
        raise typer.Exit(error.exit_code) from None
    end_as(result, report)


def end_as(result: RunReport, report: str | None) -> NoReturn:
    """End as the run supervised here did (run, restore): its report written if asked for, why it
    ended said, and its exit status ours."""
    if report:
        write_report(report, result.model_dump_json(indent=2))
    explain_end(result)
    raise typer.Exit(result.exit_status)


@contextlib.contextmanager
def _machine_ports(spec: WorkloadSpec, detach: bool) -> Iterator[None]:
    """A foreground run through a machine: its published host ports forwarded from this host's
    loopback into the machine while it runs (a -d container's are not: nothing here outlives it)."""
    machine = connection.machine
    ports = [(p.host_port, p.protocol) for p in spec.network.publish if p.host_port]
    if machine is None or detach or not ports:
        yield
        return
    from cgctl.machine.instance import MachineError

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(machine.forwarded(ports))
        except MachineError as error:
            raise fail(f"invalid value for --publish: {error}") from None
        yield


def _through_daemon(
    chosen: Runtime,
    spec: WorkloadSpec,
    detach: bool,
    service: dict[str, Any],
    report: str | None,
    detach_keys: bytes,
) -> NoReturn:
    """Create the container under the daemon; without -d, attach: stream its output (with -i or -t,
    its stdin and terminal too), forward Ctrl-C and SIGTERM, and end with its status (the container
    is then removed)."""
    from pydantic import ValidationError

    from cgctl.runtime.api import CreateRequest
    from cgctl.runtime.terminal import size

    fields: dict[str, Any] = {"spec": spec, "auto_remove": service["rm"]}
    if spec.tty:
        fields["console_size"] = size()
    if service["restart"]:
        fields["restart"] = service["restart"]
    log = {"max_size": service["log_max_size"], "max_files": service["log_max_files"]}
    fields["log"] = {key: value for key, value in log.items() if value is not None}
    try:
        request = CreateRequest.model_validate(fields)
    except ValidationError as error:
        raise invalid_options(error, DAEMON_OPTIONS) from None
    try:
        created = chosen.create(request)
    except connection.Failure as error:
        raise connection.failed(error) from None
    if detach:
        print(created.name)
        raise typer.Exit(0)
    keys = detach_keys if spec.tty or spec.interactive else None
    attach_to_end(chosen, created.name, report, keys, replay=True, tty=spec.tty)


def attach_to_end(
    chosen: Runtime,
    name: str,
    report: str | None,
    detach_keys: bytes | None = None,
    replay: bool = False,
    remove: bool = True,
    tty: bool = False,
) -> NoReturn:
    """Attach to a container started through the daemon and exit with its status once it ends (and,
    with remove, is removed). With detach_keys, through an attach stream (its terminal or stdio, its
    stdin: docs/daemon.md), where those keys leave it running; else its output is streamed from the
    log. Without a terminal, Ctrl-C, SIGTERM and SIGHUP are forwarded to it (docker's sig-proxy)."""
    try:
        with contextlib.nullcontext() if tty else _signals_forwarded(chosen, name):
            if detach_keys is None:
                ended = _follow(chosen, name)
            elif chosen.attach(name, detach_keys, replay):
                print(
                    f"cgctl: detached from {name}, which runs on: `cgctl attach {name}` to come back",
                    file=sys.stderr,
                )
                raise typer.Exit(0)
            else:
                ended = chosen.wait(name)
        if remove:
            chosen.remove(name)
    except connection.Failure as error:
        raise connection.failed(error) from None
    if report and ended.report is not None:
        write_report(report, ended.report.model_dump_json(indent=2))
    last = ended.last
    if last is None or not last.status_known:
        print(f"cgctl: {ended.name}: {last.ended if last else 'never started'}", file=sys.stderr)
        raise typer.Exit(125)
    if ended.report is not None:
        explain_end(ended.report)
    raise typer.Exit(last.exit_status or 0)


DAEMON_OPTIONS: dict[tuple[str | int, ...], str] = {
    ("restart",): "--restart",
    ("log", "max_size"): "--log-max-size",
    ("log", "max_files"): "--log-max-files",
    **{("spec", *field): option for field, option in OPTION_FOR_FIELD.items()},
}


@contextlib.contextmanager
def _signals_forwarded(chosen: Runtime, name: str) -> Iterator[None]:
    import threading

    def forward(received: int, _frame: object) -> None:
        threading.Thread(target=chosen.kill, args=(name, signal.Signals(received).name), daemon=True).start()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _follow(chosen: Runtime, name: str) -> Container:
    """Stream the container's output from its log until it ends; return how it ended."""
    import threading

    from cgctl.cli.containers import print_log_line

    def stream() -> None:
        try:
            for line in chosen.logs(name, follow=True):
                print_log_line(line)
        except BrokenPipeError:  # our reader went away (| head): the rest goes to the log only
            for out in (sys.stdout, sys.stderr):
                try:
                    out.flush()  # what did not fit in the broken pipe is still buffered
                except BrokenPipeError:
                    os.dup2(os.open(os.devnull, os.O_WRONLY), out.fileno())

    printer = threading.Thread(target=stream, daemon=True)
    printer.start()
    ended = chosen.wait(name)
    printer.join(timeout=10)  # the stream ends with the container; what is left is flushed by then
    return ended


def _image_defaults(image: str, rootfs: Path | None, root: dict[str, Any], chosen: Runtime) -> dict[str, Any]:
    """Put the image's layers (in the store of the daemon, if the run goes through one) under root's
    (--layer adds layers over an image; --upper and --read-only apply), and return its config:
    Env, Cmd, Entrypoint, WorkingDir, User."""
    from cgctl.images import Store, default_root, parse_reference

    if rootfs:
        raise fail("--image and --rootfs both name the bottom layer: add layers over an image with --layer")
    try:
        if chosen.host:
            name, tag = parse_reference(image)
            digest = image.partition("@")[2]
            found = [
                i for i in chosen.images()
                if i["name"] == name and (i["tag"] == tag or (digest and i.get("digest") == digest))
            ]  # fmt: skip
            if not found:
                raise LookupError(f"no image {name}:{tag} in the store of the daemon at {chosen.host}")
            record, layers = found[0], found[0]["layer_dirs"]
        else:
            store = Store(default_root())
            record = store.load(image)
            layers = [str(store.layer(diff_id)) for diff_id in record["layers"]]
    except (LookupError, ValueError) as error:
        raise fail(f"invalid value {image!r} for --image: {error}") from None
    except connection.Failure as error:
        raise connection.failed(error) from None
    root["layers"] = layers + root["layers"]
    root["image"] = f"{record['name']}:{record['tag']}"
    return dict(record["config"])


def _check_shared(spec: WorkloadSpec, machine: Machine) -> None:
    """Through a machine, a read-write volume must be a path the machine shares read-write."""
    for volume in spec.volumes:
        if volume.read_only or machine.writes_reach_the_host(Path(volume.source)):
            continue
        shared = ", ".join(machine.config().shares) or "nothing"
        raise fail(
            f"invalid value '{volume.source}:{volume.target}' for --volume: the machine shares "
            f"{shared} read-write, not {volume.source}, so the container's "
            f"writes would stay in the VM. Fix: add :ro, or `cgctl machine stop && cgctl machine set "
            f"--share {volume.source} && cgctl machine start`"
        )


def _seccomp_source(value: str | None) -> str:
    """--seccomp's value for the spec: default, unconfined, or the profile's absolute path."""
    if value is None:
        return "default"
    return value if value in ("default", "unconfined") else str(Path(value).absolute())


def _root(
    image: str | None,
    rootfs: Path | None,
    layers: list[Path],
    upper: Path | None,
    keep_upper: bool,
    read_only: bool,
) -> dict[str, Any] | None:
    """The spec's rootfs from --rootfs/--layer/--upper/--keep-upper/--read-only (paths made absolute)."""
    lowers = [str(path.absolute()) for path in ([rootfs] if rootfs else []) + layers]
    if not lowers and not image:
        if upper or keep_upper or read_only:
            raise fail(
                "--upper, --keep-upper and --read-only need a root of its own: --rootfs, --layer or --image"
            )
        return None
    return {
        "layers": lowers,
        "upper": str(upper.absolute()) if upper else None,
        "keep_upper": keep_upper,
        "read_only": read_only,
    }


def explain_end(result: RunReport) -> None:
    """Say on stderr why a workload ended, when it was not by itself: a checkpoint, OOM, a signal."""
    from cgctl.spec import format_size

    if result.checkpointed_to:
        print(
            f"cgctl: {result.name} was checkpointed to {result.checkpointed_to}; "
            f"cgctl restore --dir {result.checkpointed_to} resumes it",
            file=sys.stderr,
        )
    elif result.oom_killed:
        limit = result.memory_limit_bytes
        reached = "no memory.max was set" if limit is None else f"memory.max {format_size(limit)} reached"
        print(
            f"cgctl: {result.name} killed by the OOM killer: {reached} (oom_kill {result.oom_kills})",
            file=sys.stderr,
        )
    elif result.signal is not None:
        print(f"cgctl: {result.name} killed by {signal.Signals(result.signal).name}", file=sys.stderr)


def write_report(destination: str, text: str) -> None:
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


def _env_files(paths: list[Path]) -> dict[str, str]:
    env: dict[str, str] = {}
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except OSError as error:
            raise fail(f"invalid value '{path}' for --env-file: {error.strerror}") from None
        entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        env.update(environment(entries))
    return env
