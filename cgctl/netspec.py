"""The network part of the workload spec (WorkloadSpec.network): which network, published ports,
DNS and /etc/hosts entries, with docker's syntax for each option's text.

Kept apart from cgctl.spec, which embeds it, so that the network's parsers read on their own.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

NETWORK_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# The modes --network takes besides a network's name; `container:NAME` joins another's namespace.
SPECIAL_MODES = ("none", "host", "bridge", "pasta")
_PUBLISH = re.compile(
    r"^(?:(?P<ip>\[[0-9A-Fa-f:.]+\]|\d+(?:\.\d+){3}):)?(?:(?P<host>\d*(?:-\d+)?):)?(?P<container>\d+(?:-\d+)?)"
    r"(?:/(?P<protocol>tcp|udp))?$"
)
PUBLISH_SYNTAX = "[IP:][HOSTPORT[-END]:]PORT[-END][/tcp|udp], e.g. 8080:80, 127.0.0.1:8080:80/udp, 80"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip("[]")))
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


IP = Annotated[str, BeforeValidator(lambda value: _ip(str(value)))]


class PortMapping(_Model):
    """One published port: host_ip:host_port on the host to container_port in the container."""

    host_ip: str = Field("", description="the host address it is published on ('': all of them)")
    host_port: int = Field(ge=0, le=65535, description="0: a free port, chosen when the container starts")
    container_port: int = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("host_ip")
    @classmethod
    def _address(cls, value: str) -> str:
        return value and _ip(value)

    def __str__(self) -> str:
        address = f"[{self.host_ip}]" if ":" in self.host_ip else self.host_ip or "0.0.0.0"
        return f"{address}:{self.host_port}->{self.container_port}/{self.protocol}"


def _port_range(text: str) -> range:
    first, _, last = text.partition("-")
    low, high = int(first), int(last or first)
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"{text!r} is not a port or a range of ports within 1-65535")
    return range(low, high + 1)


def parse_publish(text: str) -> list[PortMapping]:
    """docker's -p: '8080:80', '127.0.0.1:8080:80/udp', '80' (a free host port), '8000-8001:80-81'."""
    match = _PUBLISH.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not {PUBLISH_SYNTAX}")
    try:
        inside = _port_range(match["container"])
        outside = _port_range(match["host"]) if match["host"] else None
    except ValueError as error:
        raise ValueError(f"{text!r}: {error}") from None
    if outside is not None and len(outside) != len(inside):
        raise ValueError(f"{text!r}: the host's range and the container's must be as long")
    ports = outside or [0] * len(inside)
    protocol = match["protocol"] or "tcp"
    return [
        PortMapping(host_ip=match["ip"] or "", host_port=host, container_port=port, protocol=protocol)
        for host, port in zip(ports, inside, strict=True)
    ]


class HostEntry(_Model):
    """A line --add-host writes into the container's /etc/hosts."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")
    ip: IP


def parse_add_host(text: str) -> HostEntry:
    """docker's --add-host NAME:IP (or NAME=IP; an IPv6 address may be in brackets)."""
    match = re.match(r"^([^:=]+)[:=](.+)$", text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not NAME:IP")
    name, address = match.groups()
    return HostEntry(name=name, ip=address)


def _mode(value: str | None) -> str | None:
    if value is None or value in SPECIAL_MODES:
        return value
    kind, colon, target = value.partition(":")
    if colon and kind == "container" and re.match(NETWORK_NAME, target):
        return value
    if not colon and re.match(NETWORK_NAME, value):
        return value
    raise ValueError(f"{value!r} is not none, host, bridge, pasta, a network's name or container:NAME")


class NetworkSpec(_Model):
    """Where the container's network namespace comes from and what goes in it."""

    mode: Annotated[str | None, BeforeValidator(_mode)] = Field(
        None,
        description="none, host, bridge, pasta (rootless), a network's name or container:NAME "
        "(None: the default)",
    )
    publish: list[PortMapping] = Field(default_factory=list, description="published ports (-p)")
    publish_all: bool = Field(False, description="also publish the image's exposed ports on free ports (-P)")
    dns: list[IP] = Field(
        default_factory=list, description="nameservers (default: the host's, loopback ones left out)"
    )
    dns_search: list[str] = Field(default_factory=list, description="search domains")
    dns_options: list[str] = Field(default_factory=list, description="resolv.conf options (ndots:2, ...)")
    add_hosts: list[HostEntry] = Field(default_factory=list, description="extra /etc/hosts lines")

    @model_validator(mode="after")
    def _carried(self) -> NetworkSpec:
        if (self.publish or self.publish_all) and self.mode is not None and not self.carries_ports():
            raise ValueError(
                f"--network {self.mode} cannot carry published ports: use bridge, pasta or a network"
            )
        if self.mode is not None and self.mode.startswith("container:") and (self.dns or self.add_hosts):
            raise ValueError(f"--network {self.mode} shares that container's DNS and /etc/hosts")
        return self

    def carries_ports(self) -> bool:
        """Whether the mode gives the container an interface of its own that ports can reach."""
        return self.mode not in ("none", "host") and not str(self.mode).startswith("container:")

    @property
    def joins(self) -> str | None:
        """The container whose network namespace this one joins (container:NAME), if any."""
        kind, _, target = (self.mode or "").partition(":")
        return target if kind == "container" else None
