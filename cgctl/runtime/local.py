"""The local runtime: the library acting on this host's cgroup tree and run records, with no daemon.

It sees and controls every running container: foreground `cgctl run`s, and detached ones while the
daemon's keeper holds their records. What needs a supervisor that outlives the CLI (detached
runs, their logs, wait, events, removal) needs the daemon, and says how to start it.
"""

from __future__ import annotations

import builtins
import dataclasses
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgctl import state
from cgctl.cgroup import freezer, fs

if TYPE_CHECKING:  # the models are imported where used: `cgctl ps` with nothing running needs none
    from cgctl.accounting import Usage
    from cgctl.images import Store
    from cgctl.images.importer import Progress as ImageProgress
    from cgctl.images.registry import Options
    from cgctl.netspec import PortMapping
    from cgctl.network.store import Network
    from cgctl.policy import PolicySet
    from cgctl.runtime.api import (
        CheckpointRequest,
        CheckpointResult,
        Container,
        CreateRequest,
        Event,
        Explanation,
        HostWide,
        NeedsDaemon,
        NetworkInfo,
        PolicyPlan,
        PolicyStatus,
        ProcessRow,
        PullRequest,
        PushRequest,
        PushResult,
        RegistryRequest,
        RestoreRequest,
    )
    from cgctl.runtime.checkpoint import Progress
    from cgctl.runtime.logs import LogLine
    from cgctl.spec import ExecSpec

START_DAEMON = "start the daemon first: `systemctl start cgctld`, or `cgctld &` as root"


def needs_daemon(what: str, why: str = "") -> NeedsDaemon:
    """The one error of what cannot be done without a daemon when none answers: what it was (a verb,
    an option), why if it is not plain, and how to start one."""
    from cgctl.runtime.api import NeedsDaemon

    because = f" ({why})" if why else ""
    return NeedsDaemon(f"{what} needs the cgctl daemon{because}, and none answers: {START_DAEMON}")


def record_container(path: Path) -> Container | None:
    """A running container as its run record tells (None if it ended meanwhile)."""
    from cgctl.runtime.api import Attempt, Container, ContainerNetwork

    try:
        record = state.read(path)
    except (OSError, ValueError):
        return None
    spec = record.get("spec", {})
    frozen = "frozen 1" in (fs.Cgroup(Path(record["cgroup"])).read_optional("cgroup.events") or "")
    started = float(record.get("started_at", 0.0))
    return Container(
        name=path.stem,
        id=record.get("id", ""),
        state="frozen" if frozen else "running",
        detached=bool(record.get("detached")),
        pid=record.get("pid"),
        cgroup=record["cgroup"],
        image=(spec.get("rootfs") or {}).get("image") or "",
        command=spec.get("command", []),
        labels=spec.get("labels", {}),
        created_at=started,
        attempts=[Attempt(started_at=started, pid=record.get("pid"))],
        spec=spec,
        policies=(record.get("policy") or {}).get("applied", []),
        network=ContainerNetwork.of(mode, record.get("network")) if (mode := _mode(spec)) else None,
    )


def _mode(spec: dict[str, Any]) -> str | None:
    """The run's network mode as its recorded spec has it (resolved by the run: never the default's None)."""
    return (spec.get("network") or {}).get("mode")


def network_users(state_dirs: set[Path]) -> dict[str, builtins.list[str]]:
    """The running containers on each network, by the attachments their live run records hold (those
    of the daemon's containers too, which its keeper keeps locked)."""
    users: dict[str, builtins.list[str]] = {}
    for state_dir in state_dirs:
        for path, _ in state.live_records(state_dir):
            try:
                attachment = state.read(path).get("network") or {}
            except (OSError, ValueError):
                continue
            if attachment.get("network"):
                users.setdefault(attachment["network"], []).append(path.stem)
    return users


def network_info(network: Network, users: dict[str, builtins.list[str]]) -> NetworkInfo:
    from cgctl.runtime.api import NetworkInfo

    return NetworkInfo(
        name=network.name,
        subnet=network.subnet,
        gateway=network.gateway,
        bridge=network.bridge,
        internal=network.internal,
        created=network.created,
        containers=sorted(users.get(network.name, [])),
    )


def has_labels(container: Container, labels: dict[str, str] | None) -> bool:
    return all(container.labels.get(key) == value for key, value in (labels or {}).items())


def signal_cgroup(group: fs.Cgroup, sig: signal.Signals) -> int:
    """Send sig to every process of the group and its sub-cgroups (SIGKILL through cgroup.kill, which
    no fork escapes); returns how many processes there were."""
    pids = group.pids()
    if sig == signal.SIGKILL:
        group.write("cgroup.kill", "1")
        return len(pids)
    signalled = 0
    for pid in pids:
        try:
            os.kill(pid, sig)
            signalled += 1
        except ProcessLookupError:
            pass  # exited meanwhile
    return signalled


def registry_options(request: RegistryRequest) -> Options:
    """How a request reaches registries: its CA and insecure list, and the credentials it carries,
    else those this user keeps (`cgctl login`)."""
    from cgctl.images import auth
    from cgctl.images.registry import Options

    given = request.auth
    sent = (given.username, given.password.get_secret_value()) if given else None
    return Options(
        tls_ca=Path(request.tls_ca) if request.tls_ca else None,
        insecure=frozenset(request.insecure_registries),
        credentials=lambda registry: sent or auth.lookup(registry),
    )


class LocalRuntime:
    """The runtime interface (see cgctl.runtime.connect) over this host's run records, and its image
    store: `image_store`, else the default one."""

    host = None  # no daemon
    paths_are_here = True

    def __init__(self, state_dir: Path | None = None, image_store: Path | None = None) -> None:
        self.state_dir = state_dir or state.default_state_dir()
        self.image_store = image_store

    def list(self, all: bool = False, labels: dict[str, str] | None = None) -> list[Container]:
        found = (record_container(path) for path, _ in state.live_records(self.state_dir))
        return [c for c in found if c is not None and has_labels(c, labels)]

    def inspect(self, name: str) -> Container:
        from cgctl.runtime.api import NotFound

        container = record_container(state.record_path(self.state_dir, name))
        if container is None or not any(path.stem == name for path, _ in state.live_records(self.state_dir)):
            raise NotFound(f"no running container named {name!r}")
        return container

    def group(self, name: str) -> fs.Cgroup:
        return fs.Cgroup(Path(self.inspect(name).cgroup))

    def freeze(self, name: str, timeout: float = 10.0) -> bool:
        """Freeze every process; False if it already was."""
        return self._set_frozen(name, True, timeout)

    def thaw(self, name: str, timeout: float = 10.0) -> bool:
        return self._set_frozen(name, False, timeout)

    def _set_frozen(self, name: str, frozen: bool, timeout: float) -> bool:
        from cgctl.runtime.api import Failure

        try:
            return freezer.set_frozen(self.group(name), frozen, timeout)
        except fs.CgroupError as error:
            raise Failure(str(error)) from None

    def kill(self, name: str, signal_name: str = "KILL") -> int:
        from cgctl.runtime.api import Failure, Invalid, parse_signal

        try:
            sig = parse_signal(signal_name)
        except ValueError as error:
            raise Invalid(f"invalid value {signal_name!r} for signal: {error}") from None
        try:
            return signal_cgroup(self.group(name), sig)
        except fs.CgroupError as error:
            raise Failure(str(error)) from None

    def update(self, name: str, limits: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Change limits live (see runtime.update); raises pydantic's ValidationError or SpecError for
        bad values, which the CLI and the API name by their option or field."""
        from cgctl.network import NetworkError
        from cgctl.runtime.api import Failure, NotFound
        from cgctl.runtime.update import update

        try:
            return update(name, limits, self.state_dir)
        except LookupError as error:
            raise NotFound(str(error)) from None
        except (fs.CgroupError, NetworkError) as error:  # NetworkError: the bandwidth plugin failed
            raise Failure(str(error)) from None

    def stats(
        self,
        names: builtins.list[str] | None = None,
        interval: float = 1.0,
        stream: bool = False,
        hostwide: HostWide | None = None,
    ) -> Iterator[builtins.list[Usage]]:
        """Usage of the running containers (or those named; host-wide, of every selected cgroup) over
        each interval, as `cgctl stats` shows it: one list per interval, forever if stream."""
        from cgctl.accounting import read_snapshot, running_containers, usage

        if hostwide is not None:
            if names:
                from cgctl.runtime.api import Invalid

                raise Invalid("name a container or ask for every cgroup (all), not both")
            yield from self._hostwide_stats(hostwide, interval, stream)
            return

        wanted = set(names or [])
        before = {
            c.name: snap
            for c in running_containers(self.state_dir)
            if (not wanted or c.name in wanted) and (snap := read_snapshot(c))
        }
        missing = wanted - set(before)
        if missing:
            from cgctl.runtime.api import NotFound

            raise NotFound(f"no running container named {', '.join(sorted(missing))}")
        if not before and not stream:
            yield []  # nothing to sample: no interval to wait for
            return
        while True:
            time.sleep(interval)
            after = {name: now for name, then in before.items() if (now := read_snapshot(then.container))}
            yield [usage(before[name], after[name]) for name in sorted(after)]
            if not stream:
                return
            before = after

    def _hostwide_stats(
        self, hostwide: HostWide, interval: float, stream: bool
    ) -> Iterator[builtins.list[Usage]]:
        """Every cgroup the selection covers, walked anew each interval: a cgroup shows from the first
        interval it lived through whole, and goes when it is gone."""
        from cgctl import discovery
        from cgctl.accounting import Snapshot, host_cgroups, read_snapshot, usage
        from cgctl.runtime.api import Failure, Invalid

        try:
            mount, selection = discovery.select_on_host(
                None if hostwide.cgroup_root is None else Path(hostwide.cgroup_root),
                hostwide.max_depth,
                tuple(hostwide.include),
                tuple(hostwide.exclude),
            )
        except discovery.SelectionError as error:
            raise Invalid(str(error)) from None
        except fs.HostNotSupported as error:
            raise Failure(str(error)) from None

        def sample() -> dict[Path, Snapshot]:
            snaps = {}
            for cgroup in host_cgroups(selection, mount, self.state_dir):
                try:
                    if snap := read_snapshot(cgroup):
                        snaps[cgroup.cgroup] = snap
                except fs.CgroupError:
                    continue  # unreadable to this user
            return snaps

        before = sample()
        while True:
            time.sleep(interval)
            after = sample()
            yield [usage(before[key], snap) for key, snap in after.items() if key in before]
            if not stream:
                return
            before = after

    def policy_diff(self, directory: str | None = None) -> builtins.list[PolicyPlan]:
        """What the policy files in `directory` (default: the policy directory) would change on each
        running container; nothing is written."""
        from cgctl.runtime import policies

        return policies.diff(self._policies(Path(directory) if directory else None), self.state_dir)

    def policy_apply(self) -> builtins.list[PolicyPlan]:
        """The policy directory applied once to every running container (the daemon keeps it applied)."""
        from cgctl.runtime import policies

        active = self._policies()
        return [policies.apply(name, active, self.state_dir) for name in policies.running(self.state_dir)]

    def explain(self, name: str) -> Explanation:
        from cgctl.runtime import policies
        from cgctl.runtime.api import NotFound

        try:
            return policies.explain(name, self._policies(), self.state_dir)
        except LookupError as error:
            raise NotFound(str(error)) from None

    def _policies(self, directory: Path | None = None) -> PolicySet:
        from cgctl import policy
        from cgctl.runtime.api import Invalid

        try:
            return policy.load_directory(
                directory or policy.default_directory(), must_exist=directory is not None
            )
        except policy.PolicyError as error:
            raise Invalid(f"{directory or policy.default_directory()} has errors:\n{error}") from None

    def commit(self, name: str, reference: str, message: str = "") -> dict[str, Any]:
        """A new image in this host's store: the running container's image plus its writes."""
        from cgctl.runtime.commit import commit

        return commit(self.inspect(name), reference, message)

    def top(self, name: str) -> builtins.list[ProcessRow]:
        """The running container's processes, those of the cgroups it made below its own included."""
        from cgctl import processes
        from cgctl.runtime.api import Failure, ProcessRow

        try:
            return [ProcessRow.model_validate(row) for row in processes.sample(self.group(name).pids())]
        except (OSError, fs.CgroupError) as error:
            raise Failure(str(error)) from None

    def exec(self, name: str, spec: ExecSpec, detach_keys: bytes = b"") -> int:
        """Run spec's process in the running container, attached to this process's stdio or terminal
        (runtime/exec.py), and return its exit status. Detaching needs a daemon to leave it with, so
        detach_keys are not looked for here."""
        from cgctl.runtime import exec as execution
        from cgctl.runtime.api import Failure, NotFound
        from cgctl.runtime.spawn import SpawnError

        try:
            return execution.run_attached(execution.prepare(self.state_dir, name, spec))
        except LookupError as error:
            raise NotFound(str(error)) from None
        except SpawnError as error:
            raise Failure(str(error), error.exit_code) from None

    def checkpoint(
        self, name: str, request: CheckpointRequest, progress: Progress | None = None
    ) -> CheckpointResult:
        """Dump the running container with CRIU into request.dir (runtime/checkpoint.py); raises
        SpecError for a bad directory or hook, which the CLI and the API name by their option or field."""
        from cgctl.runtime.api import CheckpointResult, Failure, NotFound
        from cgctl.runtime.checkpoint import CheckpointError, checkpoint

        try:
            done = checkpoint(
                name,
                Path(request.dir),
                leave_running=request.leave_running,
                tcp_established=request.tcp_established,
                hook=Path(request.hook) if request.hook else None,
                state_dir=self.state_dir,
                progress=progress,
            )
        except LookupError as error:
            raise NotFound(str(error)) from None
        except CheckpointError as error:
            raise Failure(str(error)) from None
        return CheckpointResult(
            dir=str(done.directory),
            seconds=done.seconds,
            image_bytes=done.image_bytes,
            left_running=done.left_running,
            notes=list(done.notes),
        )

    def port(self, name: str) -> builtins.list[PortMapping]:
        """The running container's published ports, with the host ports chosen for -p PORT and -P."""
        network = self.inspect(name).network
        return network.ports if network else []

    def _network_users(self) -> dict[str, builtins.list[str]]:
        """Users of each network among this host's runs: the state directory's, and the default one's
        (foreground runs') when this is a daemon's own."""
        return network_users({self.state_dir, state.default_state_dir()})

    def networks(self) -> builtins.list[NetworkInfo]:
        from cgctl.network import store

        users = self._network_users()
        return [network_info(network, users) for network in store.load_all(store.Paths.default())]

    def inspect_network(self, name: str) -> NetworkInfo:
        from cgctl.runtime.api import NotFound

        found = [network for network in self.networks() if network.name == name]
        if not found:
            raise NotFound(f"no network named {name!r} (cgctl network ls)")
        return found[0]

    def create_network(
        self, name: str, subnet: str | None = None, gateway: str | None = None, internal: bool = False
    ) -> NetworkInfo:
        """Define a network (store.create); Invalid names the option and the value it refuses."""
        from cgctl.network import store
        from cgctl.runtime.api import Invalid

        try:
            return network_info(store.create(store.Paths.default(), name, subnet, gateway, internal), {})
        except store.NetworkError as error:
            raise Invalid(str(error)) from None

    def remove_network(self, name: str) -> None:
        """Remove a network and its bridge; Conflict while a running container is on it."""
        from cgctl.network import store
        from cgctl.runtime.api import Conflict, Invalid

        if name == store.DEFAULT:
            raise Invalid(f"{name} is the default network: it cannot be removed")
        users = self.inspect_network(name).containers
        try:
            store.remove(store.Paths.default(), name, users)
        except store.NetworkError as error:
            raise Conflict(str(error)) from None

    def create(self, request: CreateRequest) -> Container:
        raise needs_daemon("`cgctl run -d`")

    def restore(self, request: RestoreRequest) -> Container:
        raise needs_daemon("`cgctl restore -d`")

    def remove(self, name: str, force: bool = False) -> None:
        raise needs_daemon("`cgctl rm`")

    def wait(self, name: str, timeout: float | None = None) -> Container:
        raise needs_daemon("`cgctl wait`")

    def attach(self, name: str, detach_keys: bytes = b"", replay: bool = False) -> bool:
        raise needs_daemon("`cgctl attach`", "a foreground run's terminal is its own `cgctl run`'s")

    def logs(
        self, name: str, tail: int | None = None, since: datetime | None = None, follow: bool = False
    ) -> Iterator[LogLine]:
        raise needs_daemon("`cgctl logs`")

    def events(self, since: float | None = None, until: float | None = None) -> Iterator[Event]:
        raise needs_daemon("`cgctl events`")

    def policy_status(self) -> PolicyStatus:
        raise needs_daemon("`cgctl policy status`", "the active policy set is the daemon's")

    def _store(self) -> Store:
        from cgctl.images import Store, default_root

        return Store(self.image_store or default_root())

    def images(self) -> builtins.list[dict[str, Any]]:
        return list(self._store().images())

    def inspect_image(self, reference: str) -> dict[str, Any]:
        from cgctl.runtime.api import Invalid, NotFound

        try:
            return self._store().load(reference)
        except ValueError as error:
            raise Invalid(str(error)) from None
        except LookupError as error:
            raise NotFound(str(error)) from None

    def import_image(
        self, path: str, reference: str, progress: ImageProgress | None = None
    ) -> dict[str, Any]:
        """Import the image at `path` (an OCI layout, directory or tar, or a docker save tar)."""
        from cgctl.images import ImageError, LayerError, import_image
        from cgctl.runtime.api import Invalid

        try:
            return import_image(Path(path), reference, self._store(), progress)
        except ValueError as error:
            raise Invalid(f"invalid value for NAME[:TAG]: {error}") from None
        except (ImageError, LayerError, OSError) as error:
            raise Invalid(f"{path}: not imported: {error}") from None

    def pull(self, request: PullRequest, progress: ImageProgress | None = None) -> dict[str, Any]:
        from cgctl.images import ImageError, LayerError
        from cgctl.images.pull import pull
        from cgctl.images.registry import RegistryError
        from cgctl.runtime.api import BadGateway, Invalid

        reference = request.reference
        try:
            return pull(reference, self._store(), registry_options(request), progress)
        except ValueError as error:
            raise Invalid(f"invalid value {reference!r} for REFERENCE: {error}") from None
        except RegistryError as error:  # it names the reference
            raise BadGateway(f"not pulled: {error}") from None
        except (ImageError, LayerError, OSError) as error:
            raise Invalid(f"{reference}: not pulled: {error}") from None

    def push(self, request: PushRequest, progress: ImageProgress | None = None) -> PushResult:
        from cgctl.images.push import push
        from cgctl.images.registry import RegistryError
        from cgctl.runtime.api import BadGateway, Failure, Invalid, PushResult

        source, target = request.source, request.destination or request.source
        try:
            pushed = push(source, request.destination, self._store(), registry_options(request), progress)
        except ValueError as error:
            raise Invalid(f"invalid value {target!r} for the image: {error}") from None
        except RegistryError as error:
            raise BadGateway(f"not pushed: {error}") from None
        except (LookupError, OSError) as error:
            raise Failure(f"{source}: not pushed: {error}") from None
        return PushResult(**dataclasses.asdict(pushed))

    def save_image(self, reference: str, path: str, progress: ImageProgress | None = None) -> dict[str, Any]:
        """Write the image as an OCI layout tar at `path`."""
        from cgctl.images.save import save
        from cgctl.runtime.api import Failure

        try:
            return {"path": path, "size": save(reference, self._store(), Path(path), progress)}
        except (LookupError, ValueError, OSError) as error:
            raise Failure(f"{reference}: not saved to {path}: {error}") from None

    def remove_image(self, reference: str) -> builtins.list[str]:
        """Remove an image and the layers no other image uses; refused while a container runs it."""
        from cgctl.images import parse_reference
        from cgctl.runtime.api import Conflict, Invalid, NotFound

        try:
            name, tag = parse_reference(reference)
            users = [c.name for c in self.list() if c.image == f"{name}:{tag}"]
            if users:
                raise Conflict(f"{name}:{tag} is in use by the running container {users[0]}: stop it first")
            return self._store().remove(reference)
        except ValueError as error:
            raise Invalid(str(error)) from None
        except LookupError as error:
            raise NotFound(str(error)) from None
