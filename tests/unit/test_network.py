"""The network's parsers and files, and the store's checks, without a kernel (tests/integration/
test_network*.py take real containers through the plugins in the VM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from cgctl import network
from cgctl.limits import format_rate, parse_rate
from cgctl.netspec import NetworkSpec, PortMapping, parse_add_host, parse_publish
from cgctl.network import cni, files, ports, store
from cgctl.spec import WorkloadSpec


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080:80", [("", 8080, 80, "tcp")]),
        ("127.0.0.1:8080:80/udp", [("127.0.0.1", 8080, 80, "udp")]),
        ("80", [("", 0, 80, "tcp")]),
        ("127.0.0.1::80", [("127.0.0.1", 0, 80, "tcp")]),
        ("[::1]:8080:80", [("::1", 8080, 80, "tcp")]),
        ("8000-8001:80-81", [("", 8000, 80, "tcp"), ("", 8001, 81, "tcp")]),
    ],
)
def test_publish_reads_docker_s_syntax(text: str, expected: list[tuple[str, int, int, str]]) -> None:
    assert [(p.host_ip, p.host_port, p.container_port, p.protocol) for p in parse_publish(text)] == expected


@pytest.mark.parametrize(
    "text", ["", "x", "80:", "0:80", "80:70000", "8000-8002:80-81", "80/sctp", "1.2.3:80:80"]
)
def test_a_bad_publish_names_itself(text: str) -> None:
    with pytest.raises(ValueError, match=repr(text).replace("[", r"\[")):
        parse_publish(text)


def test_add_host_and_its_refusals() -> None:
    assert parse_add_host("db:10.0.0.5").model_dump() == {"name": "db", "ip": "10.0.0.5"}
    assert parse_add_host("v6=2001:db8::1").ip == "2001:db8::1"
    for bad in ("nocolon", "db:not-an-ip", ":10.0.0.5"):
        with pytest.raises(ValueError):
            parse_add_host(bad)


@pytest.mark.parametrize(
    ("text", "bits"),
    [("500kbit", 500_000), ("10mbit", 10_000_000), ("1gbit", 10**9), ("1mibit", 1 << 20),
     ("100kbps", 800_000), ("10M", 10_000_000), ("512Ki", 512 * 1024), ("1000", 1000),
     ("10MBIT", 10_000_000)],
)  # fmt: skip
def test_rates_as_tc_and_kubernetes_write_them(text: str, bits: int) -> None:
    assert parse_rate(text) == bits


@pytest.mark.parametrize("text", ["10m", "fast", "0bit", "-1M", "1.5", "10 M", "True"])
def test_what_is_not_a_rate(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


def test_rates_read_back_as_tc_shows_them() -> None:
    assert [format_rate(r) for r in (800, 500_000, 10_000_000, 1_500_000_000)] == [
        "800bit", "500kbit", "10mbit", "1.5gbit",
    ]  # fmt: skip


def test_share_net_is_network_host_and_modes_are_checked() -> None:
    assert WorkloadSpec(command=["x"], namespaces={"share": ["net"]}).network.mode == "host"
    assert "net" in WorkloadSpec(command=["x"], network={"mode": "host"}).namespaces.share
    for spec in (
        {"namespaces": {"share": ["net"]}, "network": {"mode": "bridge"}},
        {"network": {"mode": "bad name"}},
        {"network": {"mode": "none", "publish": [{"host_port": 1, "container_port": 2}]}},
        {"network": {"mode": "container:other", "dns": ["1.1.1.1"]}},
    ):
        with pytest.raises(ValidationError):
            WorkloadSpec.model_validate({"command": ["x"], **spec})


def test_resolv_conf_leaves_loopback_nameservers_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    host = tmp_path / "resolv.conf"
    host.write_text(
        "# generated\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch corp.example\noptions edns0\n"
    )
    monkeypatch.setattr(files, "HOST_RESOLV_CONF", host)
    monkeypatch.setattr(files, "RESOLVED_UPSTREAM", tmp_path / "absent")
    assert files.resolv_conf(NetworkSpec()) == "search corp.example\nnameserver 10.0.0.2\noptions edns0\n"
    given = NetworkSpec(dns=["192.0.2.1"], dns_search=["a.example"], dns_options=["ndots:2"])
    assert files.resolv_conf(given) == "search a.example\nnameserver 192.0.2.1\noptions ndots:2\n"
    host.write_text("nameserver 127.0.0.53\n")
    assert files.resolv_conf(NetworkSpec()) == "nameserver 8.8.8.8\nnameserver 8.8.4.4\n"


def test_hosts_as_docker_writes_them_and_members_see_each_other(tmp_path: Path) -> None:
    spec = NetworkSpec(add_hosts=[parse_add_host("db:10.0.0.5")])
    text = files.hosts("web", "10.92.0.2", spec, {"web": "10.92.0.2", "api": "10.92.0.3"})
    assert text == files.HOSTS_HEADER + "10.0.0.5\tdb\n10.92.0.2\tweb\n10.92.0.3\tapi\n"
    members = files.Members(tmp_path / "members")
    for name, address in (("a", "10.92.0.2"), ("b", "10.92.0.3")):
        (tmp_path / name).write_text("")
        members.join(name, address, tmp_path / name, name, NetworkSpec())
    inode = (tmp_path / "a").stat().st_ino
    assert (tmp_path / "a").read_text().endswith("10.92.0.2\ta\n10.92.0.3\tb\n")
    members.leave("b")
    assert (tmp_path / "a").read_text().endswith("10.92.0.2\ta\n")
    assert (tmp_path / "a").stat().st_ino == inode  # rewritten in place: its bind mount shows it


@pytest.fixture
def paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> store.Paths:
    """A store in tmp_path; its nftables table is recorded, never written to this host."""
    written: list[list[store.Network]] = []
    monkeypatch.setattr(store, "write_isolation", written.append)
    monkeypatch.setattr(store, "host_routes", lambda: [__import__("ipaddress").ip_network("192.168.1.0/24")])
    return store.Paths(tmp_path / "defs", tmp_path / "run")


def test_networks_get_free_subnets_and_bridges(paths: store.Paths) -> None:
    first = store.create(paths, "one")
    second = store.create(paths, "two", subnet="10.93.0.0/24", gateway="10.93.0.254", internal=True)
    assert (first.subnet, first.gateway, first.bridge) == ("10.92.0.0/24", "10.92.0.1", "cgctl1")
    assert (second.bridge, second.gateway, second.internal) == ("cgctl2", "10.93.0.254", True)
    assert store.create(paths, "three").subnet == "10.92.1.0/24"
    assert store.get(paths, "bridge").bridge == "cgctl0"  # the default, made on first use
    assert [n.name for n in store.load_all(paths)] == ["bridge", "one", "three", "two"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"name": "one"}, "a network of that name exists"),
        ({"name": "host"}, "not none, host, bridge or container"),
        ({"name": "bridge"}, "not none, host, bridge or container"),
        ({"name": "bad/name"}, "a network's name"),
        ({"name": "x", "subnet": "10.92.0.0/16"}, "overlaps the network one"),
        ({"name": "x", "subnet": "192.168.1.128/25"}, "overlaps this host's route"),
        ({"name": "x", "subnet": "10.94.0.1/24"}, "did you mean 10.94.0.0/24"),
        ({"name": "x", "subnet": "nonsense"}, "CIDR"),
        ({"name": "x", "subnet": "10.94.0.0/30"}, "at least a /29"),
        ({"name": "x", "subnet": "fd00::/64"}, "only IPv4"),
        ({"name": "x", "subnet": "10.94.0.0/24", "gateway": "10.95.0.1"}, "not a host address"),
        ({"name": "x", "subnet": "10.94.0.0/24", "gateway": "10.94.0.255"}, "not a host address"),
    ],
)
def test_bad_networks_are_refused_and_nothing_is_saved(
    paths: store.Paths, args: dict[str, str], message: str
) -> None:
    store.create(paths, "one")
    with pytest.raises(store.NetworkError, match=message):
        store.create(paths, **args)  # type: ignore[arg-type]
    assert [n.name for n in store.load_all(paths)] == ["bridge", "one"]


def test_the_conflist_calls_the_debian_plugins(paths: store.Paths) -> None:
    conflist = store.create(paths, "one").conflist(paths)
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "portmap", "firewall", "bandwidth"]
    assert conflist["plugins"][0]["ipam"]["dataDir"] == str(paths.leases)
    internal = store.create(paths, "closed", internal=True).conflist(paths)
    assert [p["type"] for p in internal["plugins"]] == ["bridge", "bandwidth"]
    assert "routes" not in internal["plugins"][0]["ipam"] and not internal["plugins"][0]["isGateway"]


def test_a_missing_network_is_named_with_the_fix(paths: store.Paths) -> None:
    with pytest.raises(store.NetworkError, match="cgctl network create nosuch"):
        network.plan(NetworkSpec(mode="nosuch"), paths=paths)


def test_ports_are_claimed_once(tmp_path: Path) -> None:
    mapping = PortMapping(host_ip="127.0.0.1", host_port=0, container_port=80)
    first = ports.claim(tmp_path, [mapping], "one")
    assert first[0].host_port > 0
    with pytest.raises(ports.PortBusy, match=f"{first[0].host_port}/tcp is published by one"):
        ports.claim(tmp_path, first, "two")
    ports.release(tmp_path, first, "two")  # not two's: stays
    assert len(list(tmp_path.iterdir())) == 1
    ports.release(tmp_path, first, "one")
    assert list(tmp_path.iterdir()) == []


def test_a_plugin_is_called_as_the_cni_spec_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fake plugin records its environment and stdin; ADD runs the list in order with prevResult and
    the capabilities asked for, DEL in reverse, and a failure carries the plugin's msg."""
    log = tmp_path / "calls"
    plugin = tmp_path / "fake"
    plugin.write_text(
        '#!/bin/sh\nin=$(cat)\necho "$CNI_COMMAND $CNI_IFNAME $in" >> ' + str(log) + "\n"
        'case "$in" in *fail*) echo \'{"code": 11, "msg": "it broke"}\'; exit 1;; esac\n'
        'echo \'{"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24"}]}\'\n'
    )
    plugin.chmod(0o755)
    monkeypatch.setenv("CNI_PATH", str(tmp_path))
    first_plugin = {"type": "fake", "capabilities": {"portMappings": True}}
    conflist = {
        "name": "n",
        "cniVersion": "1.0.0",
        "plugins": [first_plugin, {"type": "fake", "second": True}],
    }
    result = cni.add(conflist, "id1", "/proc/1/ns/net", "eth0", {"portMappings": [1], "bandwidth": {}})
    assert result["ips"][0]["address"] == "10.1.0.2/24"
    calls = [line.split(" ", 2) for line in log.read_text().splitlines()]
    assert [c[:2] for c in calls] == [["ADD", "eth0"], ["ADD", "eth0"]]
    first, second = (json.loads(c[2]) for c in calls)
    assert first["runtimeConfig"] == {"portMappings": [1]} and "prevResult" not in first
    assert second["prevResult"] == result and "runtimeConfig" not in second
    conflist["plugins"][1]["fail"] = True
    with pytest.raises(cni.CniError, match="the CNI plugin fake failed \\(ADD\\): it broke"):
        cni.add(conflist, "id2", "/proc/1/ns/net", "eth0", {})
    assert [line.split()[0] for line in log.read_text().splitlines()][2:] == ["ADD", "ADD", "DEL", "DEL"]
