"""Run a workload on this host, from spec to report.

Order matters and is the whole point: check the host, validate everything the
host must confirm (devices, CPUs, interface files), claim the name, create the
cgroup, write every limit, and only then start the workload, which joins the
cgroup before exec. When its main process ends, whatever it left is killed
with cgroup.kill and the cgroup is removed after its final accounting is read.
Any failure before the start removes what was made: never a half-applied run.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from cgctl import accounting, network, ns, policy, sandbox, state, syscalls
from cgctl import limits as table
from cgctl.cgroup import cpu, cpuset, devices, fs, hugetlb, io, memory, pids
from cgctl.network.files import Directory
from cgctl.ns import console, mounts, rootfs, user
from cgctl.policy import PolicySet
from cgctl.runtime import spawn, terminal
from cgctl.runtime.report import RunReport, final_report
from cgctl.spec import Limits, SpecError, Volume, WorkloadSpec

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
# Interface files --cgroup-set must not touch: they move or kill processes or reshape the tree.
RESERVED_FILES = {
    "cgroup.procs",
    "cgroup.threads",
    "cgroup.kill",
    "cgroup.subtree_control",
    "cgroup.type",
    "cgroup.freeze",
}


@dataclass(frozen=True)
class Host:
    """Where runs go on this host: cgctl's cgroup subtree, and the run records."""

    root: fs.Cgroup
    state_dir: Path


def prepare_host(
    spec: WorkloadSpec, cgroup_root: Path | None = None, state_dir: Path | None = None
) -> tuple[Host, list[tuple[str, str]]]:
    """Check the host and every value it must confirm, then open cgctl's subtree and clean up dead runs.

    Returns the host and every (interface file, value) to write. A spec that does
    not fit raises SpecError before anything is created (a cgctl root made only to
    look at its interface files is removed again).
    """
    limits = spec.limits
    unified = fs.open_unified_root(base_controllers(limits))
    controllers = needed_controllers(limits, unified)
    root_path = fs.choose_root(unified, cgroup_root)
    settings = limit_settings(limits, unified, root_path)
    root_existed = root_path.exists()
    root = fs.open_cgctl_root(unified, controllers, root_path)
    try:
        check_files(settings, root)
        settings += interface_file_settings(limits.files, root)
    except SpecError:
        if not root_existed:
            fs.remove(root)
        raise
    host = Host(root, state_dir or state.default_state_dir())
    state.clean_stale(host.state_dir)
    return host, settings


def base_controllers(limits: Limits) -> set[str]:
    """The controllers every run needs (for its limits and its accounting), and cpuset if asked for."""
    return set(fs.SUPPORTED_CONTROLLERS) | ({cpuset.CONTROLLER} if limits.cpu.cpuset is not None else set())


def needed_controllers(limits: Limits, unified: fs.Cgroup) -> set[str]:
    """base_controllers, hugetlb if asked for and there (limit_settings refuses it by name if not),
    and those whose files --cgroup-set names (hugetlb, misc, ...)."""
    asked = {hugetlb.CONTROLLER} & unified.controllers() if limits.hugetlb else set()
    return (
        base_controllers(limits)
        | asked
        | ({name.split(".")[0] for name in limits.files} & unified.controllers())
    )


def limit_settings(limits: Limits, unified: fs.Cgroup, parent: Path) -> list[tuple[str, str]]:
    """Every (interface file, value) the controllers' limits ask for, checked against this host
    (devices, CPUs the parent offers); --cgroup-set files are checked by interface_file_settings."""
    nearest = [fs.Cgroup(path) for path in (parent, *parent.parents) if path.exists()]
    return [
        *cpuset.settings(limits.cpu, next((g for g in nearest if g.has("cpuset.cpus.effective")), unified)),
        *memory.settings(limits.memory),
        *cpu.settings(limits.cpu),
        *io.settings(limits.io, unified),
        *pids.settings(limits.pids),
        *hugetlb.settings(limits.hugetlb, unified),
    ]


def check_files(settings: list[tuple[str, str]], group: fs.Cgroup) -> None:
    """Refuse, by its option, a limit whose interface file this kernel lacks where the workload's
    cgroup goes (an older kernel, or one built without it: memory.zswap.max, cpu.idle)."""
    for file, value in settings:
        found = table.file_row(file)
        if found is not None and not group.offers(file):
            limit, key = found
            raise SpecError(
                ("limits", *limit.field, *([key] if key else [])),
                value,
                f"this kernel has no {file} ({group.path}): it is older than that file or built without "
                f"it; leave {limit.name} out",
            )


def interface_file_settings(files: dict[str, str], root: fs.Cgroup) -> list[tuple[str, str]]:
    """--cgroup-set: any writable interface file this kernel offers cgctl's workloads."""
    for name, value in files.items():
        field = ("limits", "files", name)
        if name in RESERVED_FILES:
            raise SpecError(field, f"{name}={value}", "cgctl manages this file itself")
        if not root.offers(name):
            raise SpecError(
                field,
                f"{name}={value}",
                f"this kernel has no such file for the enabled controllers ({root.path})",
            )
        if root.has(name) and not os.stat(root.file(name)).st_mode & 0o200:
            raise SpecError(field, f"{name}={value}", "a read-only file")
    return list(files.items())


# Starts the workload in its cgroup (given its name, the cgroup with every limit written, the path of
# the net namespace to join, if one was made for it, and what to do once its namespaces exist, before
# it goes on: spawn.start's before_go).
Starter = Callable[[str, fs.Cgroup, str | None, Callable[[int], None] | None], spawn.Started]


def run(
    spec: WorkloadSpec,
    cgroup_root: Path | None = None,
    state_dir: Path | None = None,
    policies: PolicySet | None = None,
) -> RunReport:
    """Run spec to completion and return its report. The limits it gives go over those of the
    policies that match it (None: the policy directory's, docs/policies.md).

    Raises fs.CgroupError (host or kernel trouble), SpecError (the spec does not
    fit this host), spawn.SpawnError (the command could not be started) or
    policy.PolicyError (a policy file is bad); in every case nothing is left behind.
    """
    if policies is None:
        policies = policy.load_directory(policy.default_directory())
    if spec.name is None:
        spec = spec.model_copy(update={"name": f"run-{secrets.token_hex(4)}"})
    wired = plan_network(spec)  # first: policies' bandwidth reaches only a network of its own
    spec = spec.model_copy(update={"network": wired.spec})
    spec, noted = policy.apply_to(spec, str(spec.name), policies)
    confinement = plan_sandbox(spec)
    spec = with_network_files(spec, wired)
    joined = container_netns(wired, state_dir or state.default_state_dir())
    with prepared_root(spec) as root, policy.blamed(noted):
        # The caller's environment is passed on, unless an image brings its own.
        env = spec.env if spec.rootfs and spec.rootfs.image else {**os.environ, **spec.env}

        def start(
            name: str, group: fs.Cgroup, netns: str | None, before_go: Callable[[int], None] | None
        ) -> spawn.Started:
            size = terminal.size() if spec.tty else None
            launch = launch_for(spec, name, group, confinement, root, env, size, netns or joined)
            return spawn.start(launch, before_go=before_go)

        return supervise(spec, start, cgroup_root, state_dir, noted, wired)


def plan_network(spec: WorkloadSpec) -> network.Plan:
    """The spec's network resolved and checked (NetworkError before anything exists: a bandwidth
    without a network of its own, too); the default's fallback to none is said on stderr.
    container:NAME is checked to be a running container."""
    bandwidth = table.by_network(spec.limits.model_dump(mode="json"))
    wired = network.plan(spec.network, "net" in spec.namespaces.join, bandwidth=bandwidth)
    if wired.note:
        print(f"cgctl: {wired.note}", file=sys.stderr)
    return wired


def container_netns(wired: network.Plan, state_dir: Path) -> str | None:
    """--network container:NAME: the net namespace of that running container (SpecError if none)."""
    target = wired.spec.joins
    if target is None:
        return None
    path = state.record_path(state_dir, target)
    pid = state.read(path).get("pid") if path.exists() else None
    if not pid or not os.path.exists(f"/proc/{pid}/ns/net"):
        raise SpecError(("network", "mode"), wired.mode, f"no running container {target} (cgctl ps)")
    return f"/proc/{pid}/ns/net"


def with_network_files(spec: WorkloadSpec, wired: network.Plan) -> WorkloadSpec:
    """The spec (its network resolved by `wired` already) with, given a root of its own and a network
    made for it, its /etc/resolv.conf, /etc/hosts and /etc/hostname written and bound in (as docker's)."""
    if wired.network is None or spec.rootfs is None:
        return spec
    files = Directory(wired.files_dir(str(spec.name)))
    files.write(spec.hostname or str(spec.name), wired.spec)
    binds = [Volume(source=source, target=target) for source, target in files.binds()]
    taken = {volume.target for volume in spec.volumes}
    return spec.model_copy(update={"volumes": [*spec.volumes, *(b for b in binds if b.target not in taken)]})


def plan_sandbox(spec: WorkloadSpec) -> sandbox.Plan:
    """The sandbox plan, after checking that the namespaces asked for can be made by this user."""
    private = spec.namespaces.private()
    if os.geteuid() != 0 and private and not spec.namespaces.user:
        raise spawn.SpawnError(
            f"creating the {', '.join(private)} namespaces needs root: run as root, or add --userns to run "
            "rootless (in a delegated cgroup)",
            125,
        )
    for kind, path in spec.namespaces.join.items():
        if not os.path.exists(path):
            raise SpecError(
                ("namespaces", "join", kind), path, "no such namespace file (is its process gone?)"
            )
    return sandbox.plan(spec.security)


def launch_for(
    spec: WorkloadSpec,
    name: str,
    group: fs.Cgroup,
    confinement: sandbox.Plan,
    root: rootfs.Plan | None,
    env: dict[str, str],
    terminal_size: tuple[int, int] | None = None,
    netns: str | None = None,
) -> spawn.Launch:
    """The launch of spec's workload; with spec.tty its terminal starts at terminal_size (rows, columns);
    netns: a net namespace made for it (network.attach) to join."""
    spaces = spec.namespaces
    joined = {str(kind): path for kind, path in spaces.join.items()} | ({"net": netns} if netns else {})
    id_maps = None
    if spaces.uid_mappings:
        id_maps = tuple(
            user.map_text([(m.container_id, m.host_id, m.size) for m in mappings])
            for mappings in (spaces.uid_mappings, spaces.gid_mappings)
        )
    return spawn.Launch(
        argv=spec.command,
        env=env,
        workdir=spec.workdir,
        cgroup_procs=str(group.file("cgroup.procs")),
        namespaces=ns.Context(
            private=frozenset(spaces.private()),
            hostname=spec.hostname or name,
            joined=joined,
            own_mounts=spec.mounts is not None,
            domainname=spec.domainname,
        ),
        user_namespace=spaces.user,
        init=spec.init,
        sandbox=confinement,
        root=root,
        user=spec.user,
        terminal=(terminal_size or console.UNKNOWN_SIZE) if spec.tty else None,
        rlimits=rlimits(spec),
        groups=tuple(dict.fromkeys(spec.additional_gids)),
        umask=spec.umask,
        oom_score_adj=spec.oom_score_adj,
        sysctl=tuple(spec.security.sysctl.items()),
        personality=None if spec.personality is None else syscalls.PERSONALITIES[spec.personality],
        id_maps=id_maps,  # type: ignore[arg-type]
    )


def rlimits(spec: WorkloadSpec) -> tuple[tuple[int, int, int], ...]:
    """The spec's rlimits as (resource, soft, hard) for setrlimit."""
    return tuple((getattr(resource, limit.type), limit.soft, limit.hard) for limit in spec.rlimits)


@contextlib.contextmanager
def prepared_root(spec: WorkloadSpec) -> Iterator[rootfs.Plan | None]:
    """The plan of the spec's own root (None for the host's), with what it needs on the host made
    (a staging directory; --upper's upper/ and work/) and removed again at the end, unless
    --keep-upper. Missing layers, root, volume or bind sources, bad mount options and device nodes
    the host lacks (when they must be bound) raise SpecError before anything is made."""
    if spec.rootfs is None:
        yield None
        return
    for index, layer in enumerate(spec.rootfs.layers):
        if not os.path.isdir(layer):
            raise SpecError(("rootfs", "layers", index), layer, "not a directory")
    if spec.rootfs.path is not None and not os.path.isdir(spec.rootfs.path):
        raise SpecError(("rootfs", "path"), spec.rootfs.path, "not a directory")
    for index, volume in enumerate(spec.volumes):
        if not os.path.exists(volume.source):
            raise SpecError(("volumes", index), volume.source, "no such file or directory on the host")
    steps = None if spec.mounts is None else mounts.plan(spec.mounts)
    # mknod only as root in the host's user namespace: elsewhere the kernel refuses usable nodes.
    mknod = os.geteuid() == 0 and not spec.namespaces.user and "user" not in spec.namespaces.join
    for index, node in enumerate(spec.security.device_nodes):
        if not mknod and node.type != "p" and not os.path.exists(node.path):
            reason = (
                "cannot be made here (rootless or a user namespace) and the host has no such node to bind"
            )
            raise SpecError(("security", "device_nodes", index), node.path, reason)
    with tempfile.TemporaryDirectory(prefix="cgctl-root-") as staging, contextlib.ExitStack() as cleanup:
        upper = spec.rootfs.upper
        if upper is not None:
            made = not os.path.exists(upper)
            try:
                for part in ("upper", "work"):
                    os.makedirs(f"{upper}/{part}", mode=0o755, exist_ok=True)
            except OSError as error:
                reason = f"cannot make its upper/ and work/: {error.strerror}"
                raise SpecError(("rootfs", "upper"), upper, reason) from None
            if not spec.rootfs.keep_upper:
                cleanup.callback(_remove_upper, upper, made)
        yield rootfs.Plan(
            lowers=tuple(spec.rootfs.layers),
            upper=upper,
            staging=staging,
            read_only=spec.rootfs.read_only,
            volumes=tuple(spec.volumes),
            private=frozenset(spec.namespaces.private()),
            devices=tuple((device.path, device.target or device.path) for device in spec.security.devices),
            path=spec.rootfs.path,
            mounts=steps,
            device_nodes=tuple(spec.security.device_nodes),
            mknod=mknod,
        )


def _remove_upper(upper: str, made: bool) -> None:
    for part in ("upper", "work"):
        shutil.rmtree(f"{upper}/{part}", ignore_errors=True)
    if made:
        with contextlib.suppress(OSError):
            os.rmdir(upper)


@dataclass
class Created:
    """A workload's claimed name and its cgroup with every limit written, not yet started."""

    spec: WorkloadSpec
    name: str
    group: fs.Cgroup
    claim: state.Claim
    written: list[str]  # the interface files written, read back into the report at the end


def create(
    spec: WorkloadSpec,
    cgroup_root: Path | None = None,
    state_dir: Path | None = None,
    record: dict[str, object] | None = None,
    cgroup_name: str | None = None,
) -> Created:
    """Claim the name and make the cgroup (cgroup_name below cgroup_root, default the name) with every
    limit and the device program; on any failure nothing is left. `record` adds fields to the run
    record (`cgctl restore` notes where it came from, `cgctl-oci` where its OCI state is)."""
    # Rootless, the kernel itself refuses device nodes (user namespaces cannot create or reach them):
    # only root may, and must, attach a device program.
    rules = sandbox.device_rules(spec.security) if os.geteuid() == 0 else None
    host, settings = prepare_host(spec, cgroup_root, state_dir)
    name = spec.name or f"run-{secrets.token_hex(4)}"
    group = host.root.child(cgroup_name or name)
    claim = state.claim(
        host.state_dir,
        name,
        {
            "id": secrets.token_hex(6),
            "cgroup": str(group.path),
            "supervisor": os.getpid(),
            "started_at": time.time(),
            "spec": spec.model_dump(mode="json", exclude={"env"}),
            **(record or {}),
        },
    )
    try:
        fs.create(host.root, cgroup_name or name)
        try:
            for file, value in settings:
                group.write(file, value)
            if rules is not None:
                devices.attach(group, rules)
        except BaseException:
            fs.remove(group)
            raise
    except BaseException:
        claim.release()
        raise
    return Created(spec, name, group, claim, [file for file, _ in settings])


def final(
    spec: WorkloadSpec,
    name: str,
    group: fs.Cgroup,
    record_path: Path,
    status: int,
    wall: float,
    written: list[str],
    network_totals: dict[str, int] | None = None,
) -> RunReport:
    """Kill what the workload left behind and read its final report from the cgroup (which stays);
    network_totals: its interfaces' counters, read by whoever held its net namespace."""
    fs.kill_all(group)
    record = state.read(record_path)
    written = written + record.get("written", [])  # what `cgctl update` changed
    applied = {file: group.read(file).strip() for file in dict.fromkeys(written)}
    applied |= table.shown_rates((record.get("network") or {}).get("bandwidth") or {})
    report = final_report(name, group, status, wall, applied, spec, network_totals)
    checkpoint = record.get("checkpoint") or {}
    if checkpoint.get("complete") and not checkpoint.get("leave_running"):
        report.checkpointed_to = checkpoint["dir"]
    return report


def supervise(
    spec: WorkloadSpec,
    start: Starter,
    cgroup_root: Path | None = None,
    state_dir: Path | None = None,
    record: dict[str, object] | None = None,
    wired: network.Plan | None = None,
) -> RunReport:
    """Create the workload (see create), attach its network (if wired makes one), start it with
    `start`, wait for it, and return its report; whatever happens, the network, the cgroup and the
    claim are gone at the end."""
    created = create(spec, cgroup_root, state_dir, record)
    try:
        attached = attach_network(created, wired)
        try:
            return _wait(created, start, attached, wired)
        finally:
            if attached is not None:  # held until now: the DEL finds the namespace, and removes the veth
                try:
                    network.detach(attached.record, wired.paths if wired else None, attached.path)
                finally:
                    attached.close()
            elif noted := state.read(created.claim.path).get("network"):  # pasta's (network.join)
                network.detach(noted, wired.paths if wired else None)
    finally:
        try:
            fs.remove(created.group)
        finally:
            created.claim.release()


def attach_network(created: Created, wired: network.Plan | None) -> network.Attached | None:
    """The created workload's net namespace on its network, noted in its run record (for
    state.clean_stale, should this process die) before anything is made."""
    if wired is None:
        return None
    record = state.read(created.claim.path)
    bandwidth = table.by_network(created.spec.limits.model_dump(mode="json"))
    return network.attach(
        wired,
        created.name,
        str(record["id"]),
        created.spec.hostname or created.name,
        lambda attachment: state.update(created.claim.path, network=attachment),
        bandwidth,
    )


def _wait(
    created: Created,
    start: Starter,
    attached: network.Attached | None = None,
    wired: network.Plan | None = None,
) -> RunReport:
    spec, name, group, claim = created.spec, created.name, created.group, created.claim

    def join_network(pid: int) -> None:  # pasta, on the workload's own namespaces
        if wired is not None:
            network.join(wired, pid, lambda attachment: state.update(claim.path, network=attachment))

    started = time.monotonic()
    with SignalForwarder(name, group, namespace_init="pid" in spec.namespaces.private()) as forwarder:
        pid, alive_fd, master = start(name, group, attached.path if attached else None, join_network)
        state.update(claim.path, pid=pid)  # what `cgctl checkpoint` dumps
        forwarder.start(pid, hang_up=(lambda: terminal.hang_up(master)) if master is not None else None)
        try:
            status = (
                _wait_for(pid)
                if master is None
                else terminal.relay_until_exit(master, spec.interactive, lambda: _wait_for(pid))
            )
        finally:
            if alive_fd is not None:
                os.close(alive_fd)
    wall = time.monotonic() - started
    state.wait_for_checkpoint(claim.path)  # a checkpoint that ended the workload finishes its record first
    counted = accounting.namespace_totals(attached.fd) if attached is not None else None
    return final(spec, name, group, claim.path, status, wall, created.written, counted)


def _wait_for(pid: int) -> int:
    return os.waitpid(pid, 0)[1]


class SignalForwarder:
    """Passes the supervisor's signals on to the workload (or to a process `cgctl exec` started).

    The kernel drops a signal sent to the init of a pid namespace that has no
    handler for it (docker has the same trap; --init avoids it). Rather than let
    Ctrl-C do nothing, cgctl says so and kills the workload on a second SIGINT
    or SIGTERM. With a terminal (-t), SIGHUP says the caller's terminal is gone:
    the workload's is hung up as the kernel hangs up a terminal (its reads end, its
    session gets SIGHUP), and an init that would drop that SIGHUP is killed.
    """

    def __init__(self, name: str, group: fs.Cgroup, namespace_init: bool) -> None:
        self.name, self.group, self.namespace_init = name, group, namespace_init
        self.pid: int | None = None
        self.hang_up: Callable[[], None] | None = None
        self.pending: list[int] = []
        self.warned = False
        self.previous: dict[int, object] = {}

    def __enter__(self) -> SignalForwarder:
        if threading.current_thread() is threading.main_thread():  # only it can handle signals
            self.previous = {sig: signal.signal(sig, self.forward) for sig in FORWARDED_SIGNALS}
        return self

    def __exit__(self, *_: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    def start(self, pid: int, hang_up: Callable[[], None] | None = None) -> None:
        """Forward to pid from now on; hang_up hangs up its terminal (-t)."""
        self.pid, self.hang_up = pid, hang_up
        for received in self.pending:
            self.forward(received, None)

    def forward(self, received: int, _frame: object) -> None:
        if self.pid is None:
            self.pending.append(received)
        elif received == signal.SIGHUP and self.hang_up is not None:
            self.hang_up()
            if self.namespace_init and not _catches(self.pid, received):
                self.group.write("cgroup.kill", "1")
        elif (
            received in (signal.SIGINT, signal.SIGTERM)
            and self.namespace_init
            and not _catches(self.pid, received)
        ):
            if self.warned:
                self.group.write("cgroup.kill", "1")
                return
            self.warned = True
            ignored = signal.Signals(received).name
            print(
                f"cgctl: {self.name} runs as pid 1 of its namespace and ignores {ignored}; "
                "send it again to kill it (--init avoids this)",
                file=sys.stderr,
            )
        else:
            os.kill(self.pid, received)


def _catches(pid: int, sig: int) -> bool:
    """Whether the process has a handler for sig (SigCgt in /proc/PID/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True  # gone: nothing to warn about
    caught = next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught, 16) >> (sig - 1) & 1)
