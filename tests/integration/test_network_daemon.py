"""Networks through the daemon: a detached container's published port served on the VM's loopback,
`cgctl port`, the same ports after a restart, the network verbs through the API, `network rm`
refused while in use, and nothing left (veth, lease, port claim, iptables rule) after the daemon is
SIGKILLed while publishing containers run and end. Every container asks for --network explicitly:
the suite's default is none (conftest.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.integration.daemon import Daemon
from tests.integration.workloads import PYTHON, wait_for

pytestmark = pytest.mark.usefixtures("no_leaks")
NETWORKS = Path("/run/cgctl/networks")
# The portmap and firewall plugins' base chains and their jumps, made by the first ADD and shared by
# every container (never removed by a DEL): all other rules are a container's own.
SHARED_RULE = re.compile(
    r"^(:CNI-(HOSTPORT-DNAT|HOSTPORT-MASQ|HOSTPORT-SETMARK|FORWARD|ADMIN) "
    r"|-A (PREROUTING|OUTPUT|POSTROUTING|FORWARD) .*-j CNI-(HOSTPORT-DNAT|HOSTPORT-MASQ|FORWARD)$"
    r"|-A CNI-FORWARD .*-j CNI-ADMIN$|-A CNI-HOSTPORT-MASQ .*MASQUERADE$|-A CNI-HOSTPORT-SETMARK )"
)


def served(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def leftovers() -> dict[str, list[str]]:
    """What containers have of the network on this host: veths, IP leases, port claims and rules."""
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True, check=True).stdout
    leases = [
        str(path.relative_to(NETWORKS))
        for path in sorted((NETWORKS / "leases").glob("*/*"))
        if path.name != "lock" and not path.name.startswith("last_reserved_ip")
    ]
    return {
        "veths": sorted(line.split()[0] for line in links.splitlines() if line.startswith("veth")),
        "leases": leases,
        "ports": sorted(p.name for p in (NETWORKS / "ports").glob("*")),
        "rules": sorted(
            line
            for line in rules.splitlines()
            if line.startswith(("-A", ":")) and not SHARED_RULE.match(line) and "CNI" in line
        ),
    }


def test_detached_container_serves_on_its_published_port_and_keeps_its_ports_across_a_restart(
    capfd: pytest.CaptureFixture[str], daemon: Daemon, tmp_path: Path
) -> None:
    go, failed = tmp_path / "go", tmp_path / "failed"
    script = (
        f"if [ -e {failed} ]; then exec {PYTHON} -m http.server 80; fi; "
        f"until [ -e {go} ]; do sleep 0.1; done; touch {failed}; exit 1"
    )
    status, out, err = daemon.cli(
        capfd, "run", "-d", "--name", "web", "--network", "bridge", "-p", "127.0.0.1:18081:80",
        "-p", "127.0.0.1::81", "--restart", "on-failure:3", "--", "sh", "-c", script,
    )  # fmt: skip
    assert (status, out.strip()) == (0, "web"), err
    try:
        first = daemon.api.inspect("web").network
        assert first is not None and first.mode == "bridge" and first.network == "bridge"
        assert first.address and first.address.startswith("10.91.")
        chosen = next(p.host_port for p in first.ports if p.container_port == 81)
        assert chosen > 0
        status, out, err = daemon.cli(capfd, "port", "web")
        assert status == 0, err
        assert out.splitlines() == ["80/tcp -> 127.0.0.1:18081", f"81/tcp -> 127.0.0.1:{chosen}"]
        assert daemon.cli(capfd, "port", "web", "80/tcp")[1].strip() == "127.0.0.1:18081"
        status, _, err = daemon.cli(capfd, "port", "web", "82")
        assert status == 1 and "82/tcp" in err

        go.touch()  # the first attempt fails; on-failure starts a second, which serves
        wait_for(lambda: len(daemon.api.inspect("web").attempts) == 2, "the restart", timeout=300)
        wait_for(lambda: served(18081), "the server on 127.0.0.1:18081", timeout=300)
        again = daemon.api.inspect("web").network
        assert again is not None and again.ports == first.ports
        status, out, _ = daemon.cli(capfd, "port", "web")
        assert out.splitlines() == ["80/tcp -> 127.0.0.1:18081", f"81/tcp -> 127.0.0.1:{chosen}"]
        status, out, _ = daemon.cli(capfd, "inspect", "web")
        assert f"ports: 127.0.0.1:18081->80/tcp, 127.0.0.1:{chosen}->81/tcp" in out
    finally:
        daemon.cli(capfd, "rm", "-f", "web")
    assert not served(18081)
    assert leftovers()["ports"] == []


def test_network_verbs_through_the_daemon(capfd: pytest.CaptureFixture[str], daemon: Daemon) -> None:
    status, out, err = daemon.cli(capfd, "network", "create", "--subnet", "10.93.0.0/24", "front")
    assert (status, out.strip()) == (0, "front"), err
    try:
        listed = daemon.cli(capfd, "network", "ls", "-q")[1].split()
        assert "front" in listed
        refused = {
            ("--subnet", "10.93.0.0/25", "other"): "overlaps the network front",
            ("--subnet", "10.94.0.0/33", "other"): "--subnet",
            ("--subnet", "10.94.0.1/24", "other"): "host bits are set",
            ("--subnet", "10.94.0.0/24", "--gateway", "10.95.0.1", "other"): "--gateway",
            ("front",): "exists",
            ("host",): "'host' for NAME",
            ("bridge",): "'bridge' for NAME",
        }
        for args, reason in refused.items():
            status, _, err = daemon.cli(capfd, "network", "create", *args)
            assert status == 125 and reason in err, (args, err)
        assert daemon.cli(capfd, "network", "ls", "-q")[1].split() == listed, "a refused create made one"
        status, out, err = daemon.cli(
            capfd, "run", "-d", "--name", "member", "--network", "front", "--", "sleep", "600"
        )
        assert status == 0, err
        shown = json.loads(daemon.cli(capfd, "network", "inspect", "front")[1])
        assert shown[0]["subnet"] == "10.93.0.0/24" and shown[0]["gateway"] == "10.93.0.1"
        assert shown[0]["containers"] == ["member"]
        address = daemon.api.inspect("member").network.address  # type: ignore[union-attr]
        assert address is not None and address.startswith("10.93.0.")
        status, _, err = daemon.cli(
            capfd, "run", "-d", "--name", "joiner", "--network", "container:member", "--", "sleep", "600"
        )
        assert status == 0, err
        joiner, member = daemon.api.inspect("joiner"), daemon.api.inspect("member")
        assert joiner.network is not None and joiner.network.mode == "container:member"
        assert os.readlink(f"/proc/{joiner.pid}/ns/net") == os.readlink(f"/proc/{member.pid}/ns/net")
        for args, expected in {
            ("--network", "nosuch"): "invalid value 'nosuch' for --network: no such network",
            ("--network", "container:nosuch"): "no running container nosuch",
            ("--network", "none", "-p", "80"): "--network none cannot carry published ports",
        }.items():
            status, _, err = daemon.cli(capfd, "run", "-d", "--name", "refused", *args, "--", "true")
            assert status == 125 and expected in err, (args, err)
            assert "refused" not in {c.name for c in daemon.api.list(all=True)}
        status, out, err = daemon.cli(capfd, "network", "rm", "front", "nosuch")
        assert status == 1 and "in use by member" in err and "nosuch" in err and out == ""
        table = daemon.cli(capfd, "network", "ls")[1].splitlines()
        assert table[0].split() == ["NAME", "SUBNET", "GATEWAY", "BRIDGE", "INTERNAL"]
        assert any(line.split()[:3] == ["front", "10.93.0.0/24", "10.93.0.1"] for line in table)
    finally:
        daemon.cli(capfd, "rm", "-f", "joiner")
        daemon.cli(capfd, "rm", "-f", "member")
        status, out, err = daemon.cli(capfd, "network", "rm", "front")
    assert (status, out.strip()) == (0, "front"), err
    assert "front" not in daemon.cli(capfd, "network", "ls", "-q")[1].split()
    links = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True, check=True).stdout
    assert shown[0]["bridge"] not in links.split(), "its bridge stayed"


def test_nothing_is_left_after_the_daemon_is_sigkilled_while_publishing_containers_run(
    capfd: pytest.CaptureFixture[str], daemon: Daemon
) -> None:
    before = leftovers()
    names = [f"pub-{index}" for index in range(6)]
    for name in names:
        status, _, err = daemon.cli(
            capfd,
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "bridge",
            "-p",
            "127.0.0.1::80",
            "--",
            "sleep",
            "600",
        )
        assert status == 0, err
    during = leftovers()
    assert len(during["veths"]) == len(before["veths"]) + 6
    assert len(during["leases"]) == len(before["leases"]) + 6
    assert len(during["ports"]) == len(before["ports"]) + 6
    assert len(during["rules"]) > len(before["rules"])
    cgroups = {name: Path(daemon.api.inspect(name).cgroup) for name in names}

    daemon.kill()
    for name in names[:3]:  # these end while the daemon is down
        (cgroups[name] / "cgroup.kill").write_text("1")
    wait_for(
        lambda: all("populated 0" in (cgroups[n] / "cgroup.events").read_text() for n in names[:3]),
        "three containers to end",
    )
    daemon.start()
    assert {c.name for c in daemon.api.list()} == set(names[3:])  # answered once recovery is done
    recovered = leftovers()
    assert len(recovered["veths"]) == len(before["veths"]) + 3, recovered
    assert len(recovered["leases"]) == len(before["leases"]) + 3, recovered
    assert len(recovered["ports"]) == len(before["ports"]) + 3, recovered
    for name in names:
        status, _, err = daemon.cli(capfd, "rm", "-f", name)
        assert status == 0, err
    assert leftovers() == before


def test_a_checkpoint_restored_through_the_daemon_serves_again_on_its_port(
    capfd: pytest.CaptureFixture[str], daemon: Daemon, tmp_path: Path
) -> None:
    """The daemon restores a networked checkpoint onto a new namespace on the same network, with the
    same address and published port (the keeper gives CRIU the namespace the daemon attached)."""
    status, out, err = daemon.cli(
        capfd, "run", "-d", "--name", "ckweb", "--network", "bridge", "-p", "127.0.0.1:18083:80",
        "--", PYTHON, "-m", "http.server", "80",
    )  # fmt: skip
    assert status == 0, err
    try:
        wait_for(lambda: served(18083), "the server before the dump", 300)
        address = daemon.api.inspect("ckweb").network.address  # type: ignore[union-attr]
        status, _, err = daemon.cli(capfd, "checkpoint", "--dir", str(tmp_path / "ck"), "ckweb")
        assert status == 0, err
        daemon.api.wait("ckweb")
        status, out, err = daemon.cli(
            capfd, "restore", "-d", "--dir", str(tmp_path / "ck"), "--name", "ckagain"
        )
        assert (status, out) == (0, "ckagain\n"), err
        wait_for(lambda: served(18083), "the restored server", 300)
        assert daemon.api.inspect("ckagain").network.address == address  # type: ignore[union-attr]
    finally:
        daemon.cli(capfd, "rm", "-f", "ckweb", "ckagain")
