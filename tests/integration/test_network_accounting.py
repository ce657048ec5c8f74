"""Network accounting on a veth pair made by hand (tests/integration/veth.py): the bytes sent to a
container are counted on its interface by the exporter (native and cAdvisor's names), `cgctl stats`
and accounting.network_totals, within 1% of what was sent; a container on the host's network has no
network at all."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from cgctl import accounting
from cgctl.metrics import ContainerCollector
from tests.integration.veth import (
    SINK,
    SINK_PORT,
    SYS_NET,
    counter,
    own_net_namespace,
    resolve,
    send_udp,
    veth_into,
)
from tests.integration.workloads import PYTHON, Background, cgctl_in_process, workload_pids

OUTSIDE, INSIDE = "nsacct-h0", "nsacct-c0"
OUTSIDE_IP, INSIDE_IP = "10.200.0.1", "10.200.0.2"
DATAGRAMS, PAYLOAD = 2000, 1000


@pytest.fixture
def background() -> Iterator[Background]:
    workloads = Background()
    yield workloads
    workloads.stop()


def scrape() -> str:
    return ContainerCollector(compat=("cadvisor",)).render()


def value(text: str, metric: str, labels: str) -> float:
    match = re.search(rf"^{metric}{{{re.escape(labels)}}} (\S+)$", text, re.MULTILINE)
    assert match, f"no {metric}{{{labels}}} in:\n" + "\n".join(
        line for line in text.splitlines() if "network" in line
    )
    return float(match.group(1))


def stats_row(capfd: pytest.CaptureFixture[str], name: str) -> dict[str, object]:
    status, out, err = cgctl_in_process(capfd, "stats", "--no-stream", "--json", "--interval", "0.2", name)
    assert status == 0, err
    (row,) = json.loads(out)
    return row  # type: ignore[no-any-return]


def test_bytes_sent_to_a_container_are_counted_on_its_interface(
    background: Background, capfd: pytest.CaptureFixture[str]
) -> None:
    background.start("net-sink", [PYTHON, "-S", "-c", SINK])
    pid = workload_pids("net-sink")[0]
    native = f'container="net-sink",interface="{INSIDE}"'
    cadvisor = f'id="/cgctl.slice/net-sink",image="",name="net-sink",interface="{INSIDE}"'
    try:
        with veth_into(pid, OUTSIDE, INSIDE, OUTSIDE_IP, INSIDE_IP):
            resolve(INSIDE_IP, SINK_PORT)
            text = scrape()
            before = {
                "exporter": value(text, "cgctl_container_network_receive_bytes_total", native),
                "cadvisor": value(text, "container_network_receive_bytes_total", cadvisor),
                "packets": value(text, "cgctl_container_network_receive_packets_total", native),
                "stats": float(stats_row(capfd, "net-sink")["net_rx_bytes"]),  # type: ignore[arg-type]
                "kernel": counter(OUTSIDE, "tx_bytes"),
            }
            expected = send_udp(INSIDE_IP, SINK_PORT, DATAGRAMS, PAYLOAD)
            text = scrape()
            after = {
                "exporter": value(text, "cgctl_container_network_receive_bytes_total", native),
                "cadvisor": value(text, "container_network_receive_bytes_total", cadvisor),
                "packets": value(text, "cgctl_container_network_receive_packets_total", native),
                "stats": float(stats_row(capfd, "net-sink")["net_rx_bytes"]),  # type: ignore[arg-type]
                "kernel": counter(OUTSIDE, "tx_bytes"),
            }
            totals = accounting.network_totals(pid)
            counted = {key: after[key] - before[key] for key in before}
            print(f"sent {expected} bytes in {DATAGRAMS} datagrams; counted {counted}")
            for key in ("exporter", "cadvisor", "stats", "kernel"):
                assert counted[key] == pytest.approx(expected, rel=0.01), key
            assert counted["packets"] == pytest.approx(DATAGRAMS, rel=0.01)
            assert totals is not None and totals["rx_bytes"] >= after["exporter"]
            for metric in ("transmit_bytes", "receive_errors", "receive_packets_dropped"):
                value(text, f"cgctl_container_network_{metric}_total", native)
                value(text, f"container_network_{metric}_total", cadvisor)
            assert 'interface="lo"' not in text
    finally:
        assert not (SYS_NET / OUTSIDE).exists(), f"{OUTSIDE} left behind"


def test_a_container_on_the_hosts_network_has_none(
    background: Background, capfd: pytest.CaptureFixture[str]
) -> None:
    """--share net (--network host): the VM's NICs are not the container's, as with cAdvisor."""
    background.start("on-host", ["sleep", "30"], namespaces={"share": ["net"]})
    pid = workload_pids("on-host")[0]
    assert not own_net_namespace(pid)
    text = scrape()
    assert 'container="on-host"' in text  # accounted, but for the network
    assert not [line for line in text.splitlines() if "network" in line and "on-host" in line]
    row = stats_row(capfd, "on-host")
    assert row["net_rx_bytes"] is None and row["net_tx_bytes"] is None
    status, out, _ = cgctl_in_process(capfd, "stats", "--no-stream", "--interval", "0.2", "on-host")
    assert status == 0 and "NET I/O" in out.splitlines()[0]
    assert accounting.network_totals(pid) is None
