"""Bandwidth as a resource: --egress-bandwidth and --ingress-bandwidth hold a real TCP transfer (iperf3)
from and to a container on the default bridge within 15%, `cgctl update` changes a rate live (measured
again), the run report shows the rates in force, and bad rates or a container without a network of its
own are refused by the option's name, nothing made. All traffic stays in the VM: the server listens on
the bridge's gateway address."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cgctl.network.store import Paths, get
from cgctl.spec import Limits
from tests.integration.workloads import PYTHON, STATE_DIR, cgctl_in_process, wait_for

pytestmark = pytest.mark.usefixtures("no_leaks")
PORT = 5201
SECONDS = 5
TOLERANCE = 0.15
# The workload: for each round N, wait for DIR/goN (its text: more iperf3 options, -R to receive), send
# (or receive) for SECONDS to the server on the gateway, and leave iperf3's JSON in DIR/outN.
ROUNDS = (
    "i=0; while [ $i -lt {rounds} ]; do i=$((i+1)); "
    "while [ ! -e {dir}/go$i ]; do sleep 0.1; done; "
    "iperf3 -c {gateway} -p {port} -t {seconds} -J $(cat {dir}/go$i) >{dir}/out$i.tmp 2>&1; "
    "mv {dir}/out$i.tmp {dir}/out$i; done"
)


def links() -> list[str]:
    """The VM's network interfaces by name (veths, ifbs, bridges): none may be left behind."""
    found = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return sorted(line.split(": ")[1].split("@")[0] for line in found.splitlines())


@pytest.fixture
def no_interfaces_left() -> Iterator[None]:
    before = [name for name in links() if not name.startswith("cgctl")]  # a bridge stays, as docker0 does
    yield
    assert [name for name in links() if not name.startswith("cgctl")] == before


class Sender:
    """A container on the default bridge running ROUNDS, and the iperf3 server it talks to."""

    def __init__(self, directory: Path, name: str, rounds: int, *options: str) -> None:
        self.directory, self.name, self.round = directory, name, 0
        self.report = directory / "report.json"
        gateway = get(Paths.default(), "bridge").gateway
        script = ROUNDS.format(rounds=rounds, dir=directory, gateway=gateway, port=PORT, seconds=SECONDS)
        argv = [PYTHON, "-m", "cgctl", "run", "--name", name, "--network", "bridge", "--report"]
        self.supervisor = subprocess.Popen(
            [*argv, str(self.report), *options, "--", "sh", "-c", script], stderr=subprocess.PIPE, text=True
        )
        wait_for(lambda: "address" in self.record().get("network", {}), f"{name} on the bridge", 300)

    def record(self) -> dict[str, Any]:
        found = record_of(self.name)
        assert found or self.supervisor.poll() is None, self.supervisor.communicate()[1]
        return found

    def measure(self, *options: str) -> float:
        """One round: the bits per second the receiving end counted."""
        self.round += 1
        server = subprocess.Popen(["iperf3", "-s", "-1", "-p", str(PORT)], stdout=subprocess.DEVNULL)
        try:
            wait_for(lambda: f":{PORT:04X} " in Path("/proc/net/tcp").read_text() + _tcp6(), "iperf3 -s", 30)
            (self.directory / f"go{self.round}").write_text(" ".join(options))
            out = self.directory / f"out{self.round}"
            wait_for(out.exists, f"round {self.round} of {self.name}", 120)
            result = json.loads(out.read_text())
            assert "error" not in result, result["error"]
            measured = float(result["end"]["sum_received"]["bits_per_second"])
            print(f"{self.name} round {self.round} {' '.join(options)}: {measured / 1e6:.2f} Mbit/s")
            return measured
        finally:
            server.kill()
            server.wait(timeout=30)

    def end(self) -> dict[str, Any]:
        _, err = self.supervisor.communicate(timeout=120)
        assert self.supervisor.returncode == 0, err
        return dict(json.loads(self.report.read_text()))

    def kill(self) -> None:
        if self.supervisor.poll() is None:
            subprocess.run([PYTHON, "-m", "cgctl", "kill", self.name], capture_output=True, timeout=120)
            self.supervisor.communicate(timeout=120)


def record_of(name: str) -> dict[str, Any]:
    """A run record as it is now ({} before it is written, or after)."""
    try:
        return dict(json.loads((STATE_DIR / f"{name}.json").read_text()))
    except (OSError, ValueError):
        return {}


def _tcp6() -> str:
    try:
        return Path("/proc/net/tcp6").read_text()
    except OSError:
        return ""


def within(measured: float, rate: float) -> bool:
    return abs(measured - rate) <= TOLERANCE * rate


@pytest.mark.usefixtures("no_interfaces_left")
def test_egress_and_ingress_limits_hold_and_an_update_changes_the_egress_live(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    options = ("--egress-bandwidth", "10mbit", "--ingress-bandwidth", "20M")
    sender = Sender(tmp_path, "shaped", 3, *options)
    try:
        assert sender.record()["network"]["bandwidth"] == {"egress": 10_000_000, "ingress": 20_000_000}
        egress = sender.measure()
        assert within(egress, 10e6), f"egress at 10mbit measured {egress / 1e6:.2f} Mbit/s"
        ingress = sender.measure("-R")
        assert within(ingress, 20e6), f"ingress at 20M measured {ingress / 1e6:.2f} Mbit/s"

        status, out, err = cgctl_in_process(capfd, "update", "shaped", "--egress-bandwidth", "5mbit")
        assert status == 0, err
        assert "shaped: network.egress = 5mbit" in out.splitlines()
        record = sender.record()
        assert record["network"]["bandwidth"] == {"egress": 5_000_000, "ingress": 20_000_000}
        assert record["spec"]["limits"]["network"] == {"egress": 5_000_000, "ingress": 20_000_000}
        assert Limits.model_validate(record["explicit"]).network.egress == 5_000_000  # the user's now
        slower = sender.measure()
        assert within(slower, 5e6), f"egress updated to 5mbit measured {slower / 1e6:.2f} Mbit/s"
        report = sender.end()
        assert report["limits"]["network.egress"] == "5mbit"
        assert report["limits"]["network.ingress"] == "20mbit"
    finally:
        sender.kill()


@pytest.mark.usefixtures("no_interfaces_left")
def test_an_unshaped_container_gets_a_limit_live(capfd: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    sender = Sender(tmp_path, "unshaped", 1)
    try:
        assert sender.record()["network"]["bandwidth"] == {}
        status, out, err = cgctl_in_process(capfd, "update", "unshaped", "--egress-bandwidth", "8mbit")
        assert status == 0 and out == "unshaped: network.egress = 8mbit\n", err
        measured = sender.measure()
        assert within(measured, 8e6), f"egress set live to 8mbit measured {measured / 1e6:.2f} Mbit/s"
        assert sender.end()["limits"]["network.egress"] == "8mbit"
    finally:
        sender.kill()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--network", "bridge", "--egress-bandwidth", "10apples"],
            "invalid value '10apples' for --egress-bandwidth: not a rate",
        ),
        (
            ["--network", "bridge", "--ingress-bandwidth", "0"],
            "invalid value '0' for --ingress-bandwidth: '0': a rate must be at least 1 bit per second",
        ),
        (
            ["--network", "none", "--egress-bandwidth", "10mbit"],
            "invalid value '10mbit' for --egress-bandwidth: --egress-bandwidth needs a network of its own: "
            "--network bridge or a network's name",
        ),
        (
            ["--network", "host", "--ingress-bandwidth", "1gbit"],
            "invalid value '1gbit' for --ingress-bandwidth: --ingress-bandwidth needs a network of its own",
        ),
    ],
)
@pytest.mark.usefixtures("no_interfaces_left")
def test_bad_rates_and_a_container_without_a_network_are_refused_by_name(
    capfd: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    status, _, err = cgctl_in_process(capfd, "run", "--name", "refused", *args, "--", "true")
    assert status == 125, err
    assert message in err


@pytest.mark.usefixtures("no_interfaces_left")
def test_update_refuses_a_bad_rate_and_a_container_without_a_network(
    capfd: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    supervisor = subprocess.Popen(
        [PYTHON, "-m", "cgctl", "run", "--name", "alone", "--network", "none", "--", "sleep", "600"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: "pid" in record_of("alone"), "alone to start", 120)
        status, _, err = cgctl_in_process(capfd, "update", "alone", "--egress-bandwidth", "fast")
        assert status == 125 and "invalid value 'fast' for --egress-bandwidth: not a rate" in err
        status, _, err = cgctl_in_process(capfd, "update", "alone", "--egress-bandwidth", "5mbit")
        assert status == 125
        assert (
            "invalid value '5mbit' for --egress-bandwidth: --egress-bandwidth needs a network of its own"
            in err
        )
        record = record_of("alone")
        assert record["spec"]["limits"]["network"] == {"ingress": None, "egress": None}
    finally:
        subprocess.run([PYTHON, "-m", "cgctl", "kill", "alone"], capture_output=True, timeout=120)
        supervisor.communicate(timeout=120)
