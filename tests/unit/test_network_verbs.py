"""The network verbs and `cgctl port` before anything reaches the kernel: the CLI's arguments, the
local runtime's answers over a network store in a temporary directory (nftables and netlink stubbed
out: nothing is made on this host), the API's routes and models."""

from __future__ import annotations

import fcntl
import json
import os
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from cgctl.cli import main
from cgctl.daemon.server import make_app
from cgctl.netspec import PortMapping
from cgctl.runtime.api import ContainerNetwork, NetworkCreateRequest
from cgctl.runtime.local import LocalRuntime


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """No daemon; the network store and the run records in tmp_path; no nft, no netlink."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/nonexistent")
    monkeypatch.setattr("cgctl.runtime.interface.SYSTEM_SOCKET", Path("/nonexistent/cgctl.sock"))
    monkeypatch.delenv("CGCTL_HOST", raising=False)
    monkeypatch.setenv("CGCTL_NETWORK_DIR", str(tmp_path / "networks"))
    monkeypatch.setenv("CGCTL_STATE_DIR", str(tmp_path / "runs"))
    monkeypatch.setattr("cgctl.network.store.write_isolation", lambda networks: None)
    monkeypatch.setattr("cgctl.network.store._delete_link", lambda name: None)
    monkeypatch.setattr("cgctl.cli.connection.machine_runtime", lambda: None)
    yield tmp_path


def cgctl(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], *args: str
) -> tuple[int, str, str]:
    monkeypatch.setattr("sys.argv", ["cgctl", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out, err = capsys.readouterr()
    return int(exit_.value.code or 0), out, err


def running(state_dir: Path, name: str, record: dict[str, object]) -> int:
    """A run record held as a live supervisor holds it: the fd to close when it 'ends'."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"{name}.json"
    path.write_text(json.dumps({"id": "abc", "cgroup": "/nonexistent/cgroup", **record}))
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_create_ls_inspect_rm(
    host: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cgctl(monkeypatch, capsys, "network", "create", "--subnet", "10.93.0.0/24", "front")[:2] == (
        0,
        "front\n",
    )
    assert cgctl(monkeypatch, capsys, "network", "create", "--internal", "back")[:2] == (0, "back\n")
    status, out, _ = cgctl(monkeypatch, capsys, "network", "ls")
    assert status == 0
    assert [line.split() for line in out.splitlines()] == [
        ["NAME", "SUBNET", "GATEWAY", "BRIDGE", "INTERNAL"],
        ["back", "10.92.0.0/24", "10.92.0.1", "cgctl2", "true"],
        ["bridge", "10.91.0.0/16", "10.91.0.1", "cgctl0", "false"],
        ["front", "10.93.0.0/24", "10.93.0.1", "cgctl1", "false"],
    ]
    assert cgctl(monkeypatch, capsys, "network", "ls", "-q")[1] == "back\nbridge\nfront\n"
    listed = json.loads(cgctl(monkeypatch, capsys, "network", "ls", "--json")[1])
    assert [n["name"] for n in listed] == ["back", "bridge", "front"] and listed[0]["internal"] is True
    shown = json.loads(cgctl(monkeypatch, capsys, "network", "inspect", "front")[1])
    assert shown[0] | {"created": 0} == {
        "name": "front", "subnet": "10.93.0.0/24", "gateway": "10.93.0.1", "bridge": "cgctl1",
        "internal": False, "created": 0, "containers": [],
    }  # fmt: skip
    assert cgctl(monkeypatch, capsys, "network", "rm", "front", "back")[:2] == (0, "front\nback\n")
    assert cgctl(monkeypatch, capsys, "network", "ls", "-q")[1] == "bridge\n"  # the default, always


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--subnet", "10.93.0.0/25", "x"],
            "invalid value '10.93.0.0/25' for --subnet: overlaps the network front",
        ),
        (["--subnet", "banana", "x"], "invalid value 'banana' for --subnet: not a subnet in CIDR notation"),
        (["--subnet", "10.94.0.1/24", "x"], "invalid value '10.94.0.1/24' for --subnet: host bits are set"),
        (["--subnet", "10.94.0.0/30", "x"], "invalid value '10.94.0.0/30' for --subnet: too small"),
        (
            ["--subnet", "10.94.0.0/24", "--gateway", "10.95.0.1", "x"],
            "invalid value '10.95.0.1' for --gateway",
        ),
        (["--gateway", "nope", "x"], "invalid value 'nope' for --gateway: not an IP address"),
        (["front"], "invalid value 'front' for NAME: a network of that name exists"),
        (["host"], "invalid value 'host' for NAME"),
        (["bridge"], "invalid value 'bridge' for NAME"),
        (["container"], "invalid value 'container' for NAME"),
        (["-bad"], "No such option"),
        (["a/b"], "invalid value 'a/b' for NAME"),
    ],
)
def test_bad_networks_exit_125_naming_option_and_value_and_make_nothing(
    host: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    expected: str,
) -> None:
    cgctl(monkeypatch, capsys, "network", "create", "--subnet", "10.93.0.0/24", "front")
    status, _, err = cgctl(monkeypatch, capsys, "network", "create", *args)
    assert status == 125 and expected in err, err
    assert sorted(p.name for p in (host / "networks").glob("*.json")) == ["front.json"]


def test_rm_is_refused_while_in_use_and_names_each_failure(
    host: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cgctl(monkeypatch, capsys, "network", "create", "front")
    holder = running(host / "runs", "web", {"network": {"network": "front", "name": "web"}})
    try:
        shown = json.loads(cgctl(monkeypatch, capsys, "network", "inspect", "front")[1])
        assert shown[0]["containers"] == ["web"]
        status, out, err = cgctl(monkeypatch, capsys, "network", "rm", "front", "nosuch", "bridge")
        assert (status, out) == (1, "")
        assert "in use by web" in err and "no network named 'nosuch'" in err and "default network" in err
    finally:
        os.close(holder)  # the run ended: its record's lock is gone
    assert cgctl(monkeypatch, capsys, "network", "rm", "front")[:2] == (0, "front\n")


def test_port_prints_dockers_format(
    host: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ports = [
        {"host_ip": "127.0.0.1", "host_port": 8080, "container_port": 80, "protocol": "tcp"},
        {"host_ip": "", "host_port": 5353, "container_port": 53, "protocol": "udp"},
        {"host_ip": "::1", "host_port": 8443, "container_port": 443, "protocol": "tcp"},
    ]
    record = {"spec": {"network": {"mode": "bridge"}}, "network": {"network": "bridge", "ports": ports}}
    holder = running(host / "runs", "web", record)
    try:
        status, out, _ = cgctl(monkeypatch, capsys, "port", "web")
        assert (status, out.splitlines()) == (
            0, ["80/tcp -> 127.0.0.1:8080", "53/udp -> 0.0.0.0:5353", "443/tcp -> [::1]:8443"]
        )  # fmt: skip
        assert cgctl(monkeypatch, capsys, "port", "web", "53/udp")[:2] == (0, "0.0.0.0:5353\n")
        assert cgctl(monkeypatch, capsys, "port", "web", "80")[:2] == (0, "127.0.0.1:8080\n")
        status, _, err = cgctl(monkeypatch, capsys, "port", "web", "81")
        assert status == 1 and "no public port 81/tcp published for web" in err
        for bad in ("http", "80/sctp", "70000"):
            status, _, err = cgctl(monkeypatch, capsys, "port", "web", bad)
            assert status == 125 and f"invalid value {bad!r} for PORT[/PROTO]" in err
        network = LocalRuntime(host / "runs").inspect("web").network
        assert network is not None and (network.mode, network.network) == ("bridge", "bridge")
    finally:
        os.close(holder)
    status, _, err = cgctl(monkeypatch, capsys, "port", "web")
    assert status == 125 and "no running container named 'web'" in err


def test_network_errors_are_the_apis_400_naming_the_option() -> None:
    from cgctl.daemon.errors import problem
    from cgctl.network import NetworkError

    refused = NetworkError("--publish", "8080", "8080/tcp is published by web")
    assert problem(refused) == (400, "invalid value '8080' for --publish: 8080/tcp is published by web", 125)


def test_models() -> None:
    with pytest.raises(ValidationError, match="Extra inputs"):
        NetworkCreateRequest.model_validate({"name": "x", "driver": "overlay"})
    assert ContainerNetwork.of("none", None) == ContainerNetwork(mode="none")
    attached = ContainerNetwork.of(
        "front",
        {"network": "front", "address": "10.92.0.2", "ports": [{"host_port": 1, "container_port": 2}]},
    )
    assert attached.ports == [PortMapping(host_port=1, container_port=2)] and attached.address == "10.92.0.2"


def test_routes(host: Path) -> None:
    app = make_app()
    mapping = PortMapping(host_ip="127.0.0.1", host_port=8080, container_port=80)
    app.state.service = types.SimpleNamespace(local=LocalRuntime(host / "runs"), port=lambda name: [mapping])
    client = TestClient(app)
    made = client.post("/v1/networks", json={"name": "front", "subnet": "10.93.0.0/24"})
    assert made.status_code == 201 and made.json()["gateway"] == "10.93.0.1"
    assert [n["name"] for n in client.get("/v1/networks").json()] == ["bridge", "front"]
    assert client.get("/v1/networks/front").json()["bridge"] == "cgctl1"
    refused = client.post("/v1/networks", json={"name": "other", "subnet": "10.93.0.0/16"})
    assert refused.status_code == 400 and "for --subnet: overlaps" in refused.json()["message"]
    assert client.post("/v1/networks", json={"name": "x", "mtu": 9000}).status_code == 400
    assert client.get("/v1/networks/nosuch").status_code == 404
    assert client.get("/v1/containers/web/port").json() == [mapping.model_dump(mode="json")]
    assert client.delete("/v1/networks/front").status_code == 204
    assert [n["name"] for n in client.get("/v1/networks").json()] == ["bridge"]
