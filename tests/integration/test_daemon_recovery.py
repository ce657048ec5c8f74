"""Faults lose nothing: a SIGKILLed daemon finds every container again, with the real exit status of
those that ended while it was down; a dead keeper's containers are reported unknown, not made up."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cgctl.runtime.api import CreateRequest
from cgctl.runtime.remote import UnixConnection
from tests.integration.daemon import Daemon
from tests.integration.workloads import CGCTL_ROOT, spec, wait_for

pytestmark = pytest.mark.usefixtures("no_leaks")


@pytest.fixture
def own_daemon(tmp_path: Path) -> Iterator[Daemon]:
    started = Daemon(tmp_path)
    started.start()
    try:
        yield started
    finally:
        started.clean_up()


def run_detached(daemon: Daemon, name: str, *command: str, **fields: object) -> int:
    created = daemon.api.create(
        CreateRequest.model_validate({"spec": spec(list(command), name=name), **fields})
    )
    assert created.pid is not None
    return created.pid


def test_sigkilled_daemon_finds_every_container_and_exit_status(
    capfd: pytest.CaptureFixture[str], own_daemon: Daemon
) -> None:
    daemon = own_daemon
    keepers = [f"keep-{index}" for index in range(10)]
    pids = {name: run_detached(daemon, name, "sleep", "1000") for name in keepers}
    go = daemon.directory / "go"
    leaver = run_detached(daemon, "leaver", "sh", "-c", f"until [ -e {go} ]; do sleep 0.1; done; exit 42")
    run_detached(daemon, "early", "sh", "-c", "exit 5")
    wait_for(lambda: daemon.api.inspect("early").state == "exited", "early to exit")
    daemon.kill()
    assert all(Path(f"/proc/{pid}").exists() for pid in [*pids.values(), leaver]), "one died with the daemon"
    go.touch()
    wait_for(lambda: not Path(f"/proc/{leaver}").exists(), "leaver to exit while the daemon is down")
    stale = CGCTL_ROOT / "stale-empty"
    stale.mkdir()

    daemon.start()
    listed = {c.name: c for c in daemon.api.list()}
    assert {name: c.pid for name, c in listed.items()} == pids
    assert all(c.state == "running" for c in listed.values())
    ended = daemon.api.inspect("leaver")
    assert (ended.state, ended.last.exit_code, ended.last.status_known) == ("exited", 42, True)  # type: ignore[union-attr]
    assert daemon.api.inspect("early").last.exit_code == 5  # type: ignore[union-attr]
    assert not stale.exists(), "a stale empty cgroup was left"
    assert daemon.cli(capfd, "freeze", "keep-0")[:2] == (0, "keep-0: frozen\n")
    assert daemon.cli(capfd, "thaw", "keep-0")[:2] == (0, "keep-0: running\n")
    connection = UnixConnection(str(daemon.socket), timeout=120)
    connection.request("GET", "/metrics")
    metrics = connection.getresponse().read().decode()
    connection.close()
    for name in keepers:
        assert f'container="{name}"' in metrics, f"{name} is missing from /metrics after the restart"
    assert daemon.cli(capfd, "kill", "keep-1")[0] == 0
    assert daemon.cli(capfd, "wait", "keep-1")[:2] == (0, "137\n")


def test_sigterm_leaves_containers_running(own_daemon: Daemon) -> None:
    daemon = own_daemon
    pid = run_detached(daemon, "stays", "sleep", "1000")
    assert daemon.stop() == 0
    assert Path(f"/proc/{pid}").exists(), "a graceful stop of the daemon stopped a container"
    daemon.start()
    assert daemon.api.inspect("stays").pid == pid


def test_stop_containers_on_sigterm_when_asked(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path)
    daemon.start("--stop-containers", "--stop-timeout", "5")
    try:
        # pid 1 of its namespace: without a handler it would ignore SIGTERM and be killed after the grace.
        pid = run_detached(daemon, "goes", "sh", "-c", "trap 'exit 3' TERM; while :; do sleep 0.1; done")
        assert daemon.stop() == 0
        wait_for(lambda: not Path(f"/proc/{pid}").exists(), "the container to be stopped with the daemon")
        daemon.start()
        info = daemon.api.inspect("goes")
        assert (info.state, info.last.exit_code) == ("exited", 3)  # type: ignore[union-attr]
    finally:
        daemon.clean_up()


def test_dead_keeper_means_unknown_status_and_restart(own_daemon: Daemon) -> None:
    daemon = own_daemon
    first = run_detached(daemon, "orphan", "sleep", "1000", restart="always")
    os.kill(daemon.keeper_pid(), signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{first}").exists(), "the keeper's container to die with it")
    wait_for(lambda: len(daemon.api.inspect("orphan").attempts) == 2, "orphan to be restarted")
    info = daemon.api.inspect("orphan")
    lost = info.attempts[0]
    assert (lost.status_known, lost.exit_code, lost.signal) == (False, None, None)
    assert "keeper" in lost.ended
    wait_for(lambda: daemon.api.inspect("orphan").state == "running", "orphan to run again")
    assert daemon.api.inspect("orphan").pid != first
