"""One attempt of a detached container: its cgroup and run record made and the keeper asked to start
it (or to restore a checkpoint as it), and at its end its final accounting and how it ended."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal as signals
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgctl import network, policy, state
from cgctl.cgroup import fs
from cgctl.daemon.keeper import KeeperClient
from cgctl.daemon.managed import Managed
from cgctl.network.files import Directory
from cgctl.runtime import supervisor
from cgctl.runtime.api import Attempt, ContainerNetwork
from cgctl.runtime.report import RunReport
from cgctl.runtime.spawn import SpawnError

if TYPE_CHECKING:
    from cgctl.runtime.checkpoint import Restoring
    from cgctl.spec import WorkloadSpec

log = logging.getLogger("cgctld")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def start(
    keeper: KeeperClient,
    managed: Managed,
    cgroup_root: Path | None,
    state_dir: Path,
    active: policy.PolicySet,
    restoring: Restoring | None,
) -> tuple[int, supervisor.Created, contextlib.ExitStack, ContainerNetwork | None]:
    """Have the keeper start the next attempt, with the `active` policies, or restore a checkpoint as
    it. Returns its pid, its cgroup and run record, what its own root holds on the host, and its
    network. Raises SpecError, SpawnError, NetworkError, CniError, Failure, fs.CgroupError; nothing is
    left of a start that failed."""
    name = managed.info.name
    spec = managed.request.spec.model_copy(update={"name": name})
    record: dict[str, Any] = {"detached": True}
    wired: network.Plan | None
    if restoring:  # its limits are the dumped container's, policies and all; its network as dumped
        from cgctl.runtime.checkpoint import restored_network

        record["restored_from"] = str(restoring.directory)
        wired = restored_network(restoring)
    else:  # the network first, as a run's: policies' bandwidth reaches only a network of its own
        wired = _plan_network(spec, managed)
        spec = spec.model_copy(update={"network": wired.spec})
        spec, noted = policy.apply_to(spec, name, active)
        record.update(noted)
    confinement = None if restoring else supervisor.plan_sandbox(spec)
    joined = None if wired is None else supervisor.container_netns(wired, state_dir)
    if wired is not None:
        spec = supervisor.with_network_files(spec, wired)
    root = contextlib.ExitStack()
    try:
        plan = root.enter_context(supervisor.prepared_root(spec))
        with policy.blamed(record):
            created = supervisor.create(spec, cgroup_root, state_dir, record=record)
    except BaseException:
        root.close()
        if wired is not None:
            Directory(wired.files_dir(name)).remove()
        raise
    try:
        attached = supervisor.attach_network(created, wired)
    except BaseException:
        _undo(created, root)
        raise
    how: dict[str, Any]
    if confinement is None:
        how = {"op": "restore", "restoring": restoring, "root": plan, "cgroup": str(created.group.path),
               "netns": attached.path if attached is not None else None}  # fmt: skip
    else:
        env = {"PATH": DEFAULT_PATH, **spec.env}
        size = managed.request.console_size
        netns = attached.path if attached is not None else joined
        launch = supervisor.launch_for(spec, name, created.group, confinement, plan, env, size, netns)
        how = {
            "op": "start",
            "launch": dataclasses.replace(launch, workdir=spec.workdir or "/"),
            "tty": spec.tty,
            "interactive": spec.interactive,
        }
    try:
        reply = keeper.request(
            {
                **how,
                "name": name,
                "attempt": len(managed.info.attempts) + 1,
                "exit_path": str(managed.exit_path),
                "log": {
                    "path": str(managed.log_path),
                    "max_bytes": managed.request.log.max_size,
                    "max_files": managed.request.log.max_files,
                },
            },
            fds=(created.claim.fd,),
        )
    except BaseException:
        reply = {"ok": False, "error": "the keeper is gone", "exit_code": 125}
    finally:
        if attached is not None:
            attached.close()  # the workload holds its namespace now (or never will)
    if not reply["ok"]:
        _undo(created, root, attached.record if attached is not None else None)
        raise SpawnError(reply["error"], reply.get("exit_code", 125))
    os.close(created.claim.fd)  # the keeper holds the record's lock now
    pid = int(reply["pid"])
    state.update(created.claim.path, pid=pid, written=created.written)
    view = None if wired is None else ContainerNetwork.of(wired.mode, attached.record if attached else None)
    return pid, created, root, view


def _plan_network(spec: WorkloadSpec, managed: Managed) -> network.Plan:
    """The attempt's network, planned (the default resolved here, by the daemon's environment). A
    restart publishes the ports the last attempt was given, so that -p PORT and -P keep theirs."""
    last = managed.info.network
    if last is not None and last.ports:
        spec = spec.model_copy(update={"network": spec.network.model_copy(update={"publish": last.ports})})
    return supervisor.plan_network(spec)


def _undo(
    created: supervisor.Created, root: contextlib.ExitStack, attachment: dict[str, Any] | None = None
) -> None:
    """Remove what a start that failed made: its cgroup, its network, its run record and root (each
    tried, whatever the one before raised)."""
    with contextlib.ExitStack() as undo:
        undo.callback(root.close)
        undo.callback(created.claim.release)
        if attachment is not None:
            undo.callback(network.detach, attachment)
        fs.remove(created.group)


def final_report(managed: Managed, status: dict[str, Any], state_dir: Path) -> RunReport | None:
    """The ended attempt's final accounting (none if its status is unknown); its cgroup and run
    record are removed."""
    name = managed.info.name
    code, signal_number = status.get("exit_code"), status.get("signal")
    wait_status = signal_number if signal_number is not None else (code or 0) << 8
    report = None
    record = state.record_path(state_dir, name)
    state.wait_for_checkpoint(record)  # a dump that ended it finishes its record first
    if managed.group is not None and managed.group.path.exists():
        try:
            if "unknown" not in status:
                wall = time.monotonic() - managed.started
                report = supervisor.final(
                    managed.request.spec, name, managed.group, record, wait_status, wall, managed.written
                )
        except (fs.CgroupError, OSError, ValueError) as error:
            log.warning("%s: no final accounting: %s", name, error)
        try:
            fs.remove(managed.group)
        except fs.CgroupError as error:
            log.error("%s: %s", name, error)
    detach_network(name, record)
    record.unlink(missing_ok=True)
    return report


def detach_network(name: str, record: Path) -> None:
    """Take down the network the run record says the attempt had (its namespace died with its
    processes: its lease, port rules and claims go here); a failure is logged, never raised."""
    try:
        attachment = state.read(record).get("network")
    except (OSError, ValueError):
        return
    if attachment:
        try:
            network.detach(attachment)
        except (network.NetworkError, network.cni.CniError, OSError) as error:
            log.error("%s: its network was not wholly taken down: %s", name, error)


def record_end(attempt: Attempt, status: dict[str, Any], report: RunReport | None) -> None:
    """Note in the attempt how it ended: the keeper's status (or why it is unknown) and its report."""
    attempt.finished_at = status.get("exited_at", time.time())
    attempt.exit_code, attempt.signal = status.get("exit_code"), status.get("signal")
    attempt.oom_killed = bool(report and report.oom_killed)
    attempt.status_known = "unknown" not in status
    attempt.ended = _ended(attempt, status.get("unknown"))
    if report is not None and report.checkpointed_to:  # by the API or by `cgctl checkpoint` alike
        attempt.ended = f"checkpointed to {report.checkpointed_to}"


def exit_attributes(attempt: Attempt) -> dict[str, str]:
    attributes = {"reason": attempt.ended, "status_known": str(attempt.status_known).lower()}
    if attempt.exit_code is not None:
        attributes["exit_code"] = str(attempt.exit_code)
    if attempt.signal is not None:
        attributes["signal"] = str(attempt.signal)
    if attempt.oom_killed:
        attributes["oom_killed"] = "true"
    return attributes


def _ended(attempt: Attempt, unknown: str | None) -> str:
    if unknown:
        return f"exit status unknown: {unknown}"
    if attempt.oom_killed:
        return "OOM killed" + (f" (exit status {attempt.exit_status})" if attempt.exit_status else "")
    if attempt.signal is not None:
        return f"killed by {signals.Signals(attempt.signal).name}"
    return f"exited with {attempt.exit_code}"
