"""`cgctl top` on a real kernel (the cgroup's processes, nested cgroups included, and their pids in the
container's pid namespace), locally and through the daemon; the host capacity checks of --cpus and
--mem for run, update, the API and policies; the daemon's /metrics of its own and its keeper's
processes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from cgctl.runtime.remote import UnixConnection
from tests.integration.daemon import Daemon
from tests.integration.workloads import CGCTL_ROOT, PYTHON, cgctl_in_process

pytestmark = pytest.mark.usefixtures("no_leaks")
NESTED = "/sys/fs/cgroup/nested"
# Its init (pid 1 inside) puts a sleep in a cgroup of its own making and says the two sleeps' pids
# as it sees them; on SIGTERM it takes the nested cgroup down again, which cgctl's removal needs.
WORKLOAD = (
    f"mkdir {NESTED} || exit 1; sh -c 'echo 0 > {NESTED}/cgroup.procs && exec sleep 1000' & n=$!; "
    f"trap 'kill $n; wait $n; rmdir {NESTED}; exit 0' TERM; "
    "sleep 1000 & s=$!; "
    f"until grep -qx $n {NESTED}/cgroup.procs; do kill -0 $n || exit 1; done; "
    'echo "$n $s"; wait $s'
)
HUGE_POLICY = (
    "policies:\n  - name: huge\n    match: {labels: {size: huge}}\n    limits: {memory: {max: 64T}}\n"
)


@pytest.fixture(scope="module")
def policy_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Path, int]]:
    """A daemon with a policy directory of its own and /metrics on TCP too."""
    directory = tmp_path_factory.mktemp("top-daemon")
    policies = directory / "policies.d"
    policies.mkdir()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = Daemon(directory)
    started.start("--policy-dir", str(policies), "--metrics", f"127.0.0.1:{port}")
    try:
        yield started, policies, port
    finally:
        started.clean_up()


@pytest.fixture
def nested() -> Iterator[tuple[str, list[int]]]:
    """A foreground run whose tree spans its cgroup and one nested below it: its name and the two
    sleeps' pids inside its pid namespace (nested, then not)."""
    supervisor = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "run", "--name", "topped", "--privileged", "--", "sh", "-c", WORKLOAD],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert supervisor.stdout is not None
    inside = [int(pid) for pid in supervisor.stdout.readline().split()]
    assert len(inside) == 2, "the workload did not start"
    yield "topped", inside
    supervisor.send_signal(signal.SIGTERM)
    assert supervisor.wait(timeout=120) == 0


def procs(name: str) -> list[int]:
    """The pids in the cgroup.procs of the container's cgroup and of those below it."""
    files = (CGCTL_ROOT / name).rglob("cgroup.procs")
    return sorted(int(pid) for file in files for pid in file.read_text().split())


def test_top_lists_the_cgroups_processes_with_their_pids_inside(
    capfd: pytest.CaptureFixture[str], nested: tuple[str, list[int]], policy_daemon: tuple[Daemon, Path, int]
) -> None:
    name, inside = nested
    status, out, err = cgctl_in_process(capfd, "top", name, "--json")
    assert status == 0, err
    local = json.loads(out)
    assert [row["pid"] for row in local] == procs(name)
    assert {row["nspid"] for row in local} >= {1, *inside}
    in_nested = int((CGCTL_ROOT / name / "nested" / "cgroup.procs").read_text())
    assert {row["pid"]: row["nspid"] for row in local}[in_nested] == inside[0]
    assert next(row for row in local if row["nspid"] == 1)["command"] == ["sh", "-c", WORKLOAD]
    assert {row["user"] for row in local} == {"root"}
    # Through the daemon (a foreground run: the daemon sees it by its run record).
    daemon = policy_daemon[0]
    status, out, err = daemon.cli(capfd, "top", name, "--json")
    assert status == 0, err
    remote = json.loads(out)
    assert [(r["pid"], r["nspid"], r["command"]) for r in remote] == [
        (r["pid"], r["nspid"], r["command"]) for r in local
    ]
    status, out, err = daemon.cli(capfd, "top", name)
    assert status == 0, err
    header, *lines = out.splitlines()
    assert header.split()[:3] == ["PID", "NSPID", "USER"] and len(lines) == len(local)


def test_top_of_a_detached_container_and_of_none(
    capfd: pytest.CaptureFixture[str], policy_daemon: tuple[Daemon, Path, int]
) -> None:
    daemon = policy_daemon[0]
    status, _, err = daemon.cli(capfd, "run", "-d", "--name", "dtop", "--", "sleep", "1000")
    assert status == 0, err
    try:
        status, out, err = daemon.cli(capfd, "top", "dtop", "--json")
        assert status == 0, err
        (row,) = json.loads(out)
        assert (row["nspid"], row["command"]) == (1, ["sleep", "1000"])
        assert [row["pid"]] == procs("dtop")
    finally:
        assert daemon.cli(capfd, "rm", "-f", "dtop")[0] == 0
    for through in ((), ("--host", daemon.host)):
        status, out, err = cgctl_in_process(capfd, *through, "top", "ghost")
        assert (status, out, err) == (125, "", "cgctl: no running container named 'ghost'\n")


def test_capacity_checks_refuse_what_the_host_has_not(
    capfd: pytest.CaptureFixture[str], policy_daemon: tuple[Daemon, Path, int]
) -> None:
    daemon, _, _ = policy_daemon
    cpus = len(os.sched_getaffinity(0))
    total = psutil.virtual_memory().total
    too_many = f"range of CPUs is from 0.01 to {cpus}.00, as there are only {cpus} CPUs available"
    too_big = "this host has only "
    for through in ((), ("--host", daemon.host)):
        status, _, err = cgctl_in_process(capfd, *through, "run", "--cpus", str(cpus + 1), "--", "true")
        assert status == 125 and f"'{cpus + 1}' for " in err and too_many in err, err
        status, _, err = cgctl_in_process(
            capfd, *through, "run", "--mem", f"{total + (1 << 30)}", "--", "true"
        )
        assert status == 125 and too_big in err and f"({total} bytes)" in err, err
    status, _, err = cgctl_in_process(capfd, "run", "--cpus", str(cpus + 1), "--", "true")
    assert f"invalid value '{cpus + 1}' for --cpus: {too_many} on this host" in err
    # update: a running container keeps its limits.
    status, _, err = daemon.cli(capfd, "run", "-d", "--name", "sized", "--cpus", "1", "--", "sleep", "1000")
    assert status == 0, err
    try:
        for option, value, reason in (("--cpus", str(cpus + 1), too_many), ("--mem", "64T", too_big)):
            status, _, err = daemon.cli(capfd, "update", "sized", option, value)
            assert status == 125 and reason in err, err
            status, _, err = cgctl_in_process(capfd, "update", "sized", option, value)
            assert status == 125 and f" for {option}: {reason}" in err, err
        assert (CGCTL_ROOT / "sized" / "cpu.max").read_text() == "100000 100000\n"
        assert (CGCTL_ROOT / "sized" / "memory.max").read_text() == "max\n"
    finally:
        daemon.cli(capfd, "rm", "-f", "sized")


def test_a_policy_above_the_host_is_refused_where_it_applies(
    capfd: pytest.CaptureFixture[str], policy_daemon: tuple[Daemon, Path, int], tmp_path: Path
) -> None:
    daemon, policies, _ = policy_daemon
    status, _, err = daemon.cli(
        capfd, "run", "-d", "--name", "big", "--label", "size=huge", "--", "sleep", "1000"
    )
    assert status == 0, err
    try:
        (policies / "50-huge.yaml").write_text(HUGE_POLICY)
        (plan,) = [p for p in daemon.api.policy_apply() if p.name == "big"]
        assert plan.error and "this host has only" in plan.error, plan
        assert (CGCTL_ROOT / "big" / "memory.max").read_text() == "max\n"
        status, _, err = daemon.cli(capfd, "run", "-d", "--label", "size=huge", "--", "true")
        assert status == 125 and "policy 50-huge.yaml:huge" in err and "this host has only" in err, err
        assert daemon.api.ping()["pid"] == daemon.process.pid  # type: ignore[union-attr]
    finally:
        (policies / "50-huge.yaml").unlink()
        daemon.cli(capfd, "rm", "-f", "big")
    # A foreground run reads the directory itself.
    (tmp_path / "50-huge.yaml").write_text(HUGE_POLICY)
    env = {**os.environ, "CGCTL_POLICY_DIR": str(tmp_path)}
    done = subprocess.run(
        [PYTHON, "-m", "cgctl", "run", "--label", "size=huge", "--", "true"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 125 and "policy 50-huge.yaml:huge" in done.stderr, done.stderr


def scrape(daemon: Daemon) -> str:
    connection = UnixConnection(str(daemon.socket), 60)
    connection.request("GET", "/metrics")
    return connection.getresponse().read().decode()


def samples(text: str) -> dict[str, float]:
    return {
        line.split()[0]: float(line.split()[1])
        for line in text.splitlines()
        if line.startswith("cgctl_process_")
    }


def test_the_daemon_metrics_show_its_own_and_its_keepers_process(
    policy_daemon: tuple[Daemon, Path, int],
) -> None:
    daemon, _, port = policy_daemon
    assert daemon.process is not None
    pids = {"daemon": daemon.process.pid, "keeper": daemon.keeper_pid()}
    for text in (scrape(daemon), _tcp_scrape(port)):
        found = samples(text)
        for who, pid in pids.items():
            process = psutil.Process(pid)
            assert found[f'cgctl_process_start_time_seconds{{process="{who}"}}'] == process.create_time()
            assert found[f'cgctl_process_threads{{process="{who}"}}'] >= 1
            assert found[f'cgctl_process_open_fds{{process="{who}"}}'] >= 3
            assert found[f'cgctl_process_resident_memory_bytes{{process="{who}"}}'] > 1 << 20
            assert found[f'cgctl_process_cpu_seconds_total{{process="{who}"}}'] > 0
        assert "cgctl_exporter_process_" not in text  # the daemon's own is cgctl_process_{process="daemon"}
        assert text.count("# TYPE cgctl_process_cpu_seconds_total counter") == 1


def _tcp_scrape(port: int) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    connection.request("GET", "/metrics")
    return connection.getresponse().read().decode()
