"""pasta's options for published ports, the publish syntax's host port, and --network pasta's checks."""

from __future__ import annotations

import pytest

from cgctl import network
from cgctl.netspec import NetworkSpec, PortMapping, parse_publish
from cgctl.network import pasta


def test_a_host_port_is_not_taken_for_an_address() -> None:
    assert parse_publish("8080:80") == [PortMapping(host_port=8080, container_port=80)]
    assert parse_publish("127.0.0.1::80/udp") == [
        PortMapping(host_ip="127.0.0.1", host_port=0, container_port=80, protocol="udp")
    ]


def test_port_options_forward_only_the_published_ports() -> None:
    mappings = [
        PortMapping(host_port=8080, container_port=80),
        PortMapping(host_ip="127.0.0.1", host_port=5353, container_port=53, protocol="udp"),
    ]
    assert pasta.port_options(mappings) == [
        *("-t", "8080:80", "-u", "127.0.0.1/5353:53"),
        *("-T", "none", "-U", "none"),
    ]
    assert pasta.port_options([]) == ["-t", "none", "-u", "none", "-T", "none", "-U", "none"]


def test_pasta_is_a_mode_and_carries_ports() -> None:
    spec = NetworkSpec(mode="pasta", publish=parse_publish("8080:80"))
    assert spec.carries_ports()


def test_pasta_without_the_program_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pasta, "find", lambda: None)
    with pytest.raises(network.NetworkError, match="apt-get install passt"):
        network.plan(NetworkSpec(mode="pasta"))


def test_pasta_on_a_joined_net_namespace_is_refused() -> None:
    with pytest.raises(network.NetworkError, match="net namespace of the container's own"):
        network.plan(NetworkSpec(mode="pasta"), joined_net=True)


def test_the_rootless_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CGCTL_NETWORK", raising=False)
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    monkeypatch.setattr(pasta, "find", lambda: "/usr/bin/pasta")
    monkeypatch.setattr(pasta, "has_route", lambda: True)
    assert network.default_mode() == ("pasta", None)
    monkeypatch.setattr(pasta, "has_route", lambda: False)
    assert network.default_mode()[0] == "none"
    monkeypatch.setattr(pasta, "find", lambda: None)
    mode, note = network.default_mode()
    assert mode == "none" and note is not None and "passt" in note


def test_stop_leaves_a_process_that_reused_the_pid_alone() -> None:
    import os

    pasta.stop({"mode": "pasta", "pid": os.getpid(), "start_time": "0"})  # not ours to kill
    assert pasta.start_time(os.getpid()) is not None
