"""/v1/networks: the host's networks (a daemon's and a foreground run's alike); and a container's
published ports."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from cgctl.daemon.routes import ContainerName, Served
from cgctl.netspec import NETWORK_NAME, PortMapping
from cgctl.runtime.api import NetworkCreateRequest, NetworkInfo

router = APIRouter()
NetworkName = Annotated[str, Path(pattern=NETWORK_NAME, description="the network's name")]


@router.get("/v1/networks")
def networks(service: Served) -> list[NetworkInfo]:
    """Every network, with the running containers on each."""
    return service.local.networks()


@router.post("/v1/networks", status_code=201)
def create_network(service: Served, request: NetworkCreateRequest) -> NetworkInfo:
    """Define a network; its bridge appears with its first container. 400 names a bad or taken name,
    a malformed or overlapping subnet, or a gateway outside it."""
    return service.local.create_network(request.name, request.subnet, request.gateway, request.internal)


@router.get("/v1/networks/{name}")
def inspect_network(service: Served, name: NetworkName) -> NetworkInfo:
    return service.local.inspect_network(name)


@router.delete("/v1/networks/{name}", status_code=204)
def remove_network(service: Served, name: NetworkName) -> Response:
    """Remove a network and its bridge; 409 while a running container is on it."""
    service.local.remove_network(name)
    return Response(status_code=204)


@router.get("/v1/containers/{name}/port")
def port(service: Served, name: ContainerName) -> list[PortMapping]:
    """The running container's published ports, with the host ports chosen for -p PORT and -P."""
    return service.port(name)
