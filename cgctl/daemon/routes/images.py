"""/v1/images: the daemon's image store (and a container's writes committed as an image)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from cgctl.daemon.routes import ContainerName, Served
from cgctl.runtime.api import CommitRequest, ImportRequest, PullRequest, PushRequest, PushResult, SaveRequest

router = APIRouter()


@router.get("/v1/images")
def images(service: Served) -> list[dict[str, Any]]:
    return service.images.records()


@router.post("/v1/images", status_code=201)
def import_image(service: Served, request: ImportRequest) -> dict[str, Any]:
    return service.images.import_image(request)


@router.post("/v1/images/pull", status_code=201)
def pull(service: Served, request: PullRequest) -> dict[str, Any]:
    """Pull an image from a registry into the daemon's store."""
    return service.images.pull(request)


@router.post("/v1/images/push")
def push(service: Served, request: PushRequest) -> PushResult:
    """Push an image of the daemon's store to a registry."""
    return service.images.push(request)


@router.post("/v1/images/save")
def save_image(service: Served, request: SaveRequest) -> dict[str, Any]:
    """Write an image as an OCI layout tar at a path on the daemon's host."""
    return service.images.save(request)


@router.post("/v1/containers/{name}/commit", status_code=201)
def commit(service: Served, name: ContainerName, request: CommitRequest) -> dict[str, Any]:
    """A new image: the container's image plus its writes (it needs an --upper DIR)."""
    return service.images.commit(name, request)


@router.delete("/v1/images/{reference:path}")
def remove_image(service: Served, reference: str) -> dict[str, list[str]]:
    return {"removed_layers": service.images.remove(reference)}
