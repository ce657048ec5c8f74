"""/v1/containers: the daemon's containers, their lifecycle, logs and streams; and /v1/restore."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket, WebSocketDisconnect
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from cgctl.daemon.bridge import bridge, refuse
from cgctl.daemon.errors import invalid_query
from cgctl.daemon.routes import NDJSON, ContainerName, Served, ndjson_lines
from cgctl.daemon.service import Service
from cgctl.runtime.api import (
    CheckpointRequest,
    CheckpointResult,
    Container,
    CreateRequest,
    ExecRequest,
    FreezeRequest,
    Invalid,
    KillRequest,
    ProcessRow,
    RestoreRequest,
    UpdateRequest,
)

router = APIRouter()


@router.get("/v1/containers")
def list_containers(
    service: Served,
    all: bool = False,
    label: Annotated[list[str] | None, Query(description="K=V: only containers with this label")] = None,
) -> list[Container]:
    labels = {}
    for pair in label or []:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise invalid_query("label", pair, "expected K=V")
        labels[key] = value
    return service.list(all=all, labels=labels)


@router.post("/v1/containers", status_code=201)
def create(service: Served, request: CreateRequest) -> Container:
    return service.create(request)


@router.get("/v1/containers/{name}")
def inspect(service: Served, name: ContainerName) -> Container:
    return service.inspect(name)


@router.delete("/v1/containers/{name}", status_code=204)
def remove(service: Served, name: ContainerName, force: bool = False) -> Response:
    service.remove(name, force)
    return Response(status_code=204)


@router.post("/v1/containers/{name}/freeze")
def freeze(service: Served, name: ContainerName, request: FreezeRequest | None = None) -> dict[str, bool]:
    return {"changed": service.freeze(name, (request or FreezeRequest()).timeout)}


@router.post("/v1/containers/{name}/thaw")
def thaw(service: Served, name: ContainerName, request: FreezeRequest | None = None) -> dict[str, bool]:
    return {"changed": service.thaw(name, (request or FreezeRequest()).timeout)}


@router.post("/v1/containers/{name}/kill")
def kill(service: Served, name: ContainerName, request: KillRequest | None = None) -> dict[str, int]:
    return {"signalled": service.kill(name, (request or KillRequest()).signal)}


@router.post("/v1/containers/{name}/update")
def update(service: Served, name: ContainerName, request: UpdateRequest) -> dict[str, dict[str, str]]:
    return {"written": service.update(name, request.limits)}


@router.get("/v1/containers/{name}/top")
def top(service: Served, name: ContainerName) -> list[ProcessRow]:
    """The running container's processes (its nested cgroups' too), by host pid, as `cgctl top`
    shows them; CPU % is over the 0.5 s the answer takes."""
    return service.top(name)


@router.post("/v1/containers/{name}/wait")
def wait(
    service: Served, name: ContainerName, timeout: Annotated[float | None, Query(gt=0, le=86400)] = None
) -> Container:
    return service.wait(name, timeout)


@router.get("/v1/containers/{name}/logs", response_class=StreamingResponse)
def logs(
    service: Served,
    name: ContainerName,
    follow: bool = False,
    tail: Annotated[int | None, Query(ge=0)] = None,
    since: Annotated[float | None, Query(ge=0, description="unix time")] = None,
    stdout: bool = True,
    stderr: bool = True,
) -> StreamingResponse:
    streams = frozenset(s for s, wanted in (("stdout", stdout), ("stderr", stderr)) if wanted)
    start = None if since is None else datetime.fromtimestamp(since, UTC)
    lines = service.logs(name, tail=tail, since=start, follow=follow, streams=streams)
    first = next(lines, None)  # a missing container is a 404, not an empty stream

    def items() -> Iterator[Any]:
        if first is not None:
            yield first.to_json()
            yield from (line.to_json() for line in lines)

    return StreamingResponse(ndjson_lines(items()), media_type=NDJSON)


@router.post("/v1/containers/{name}/checkpoint")
def checkpoint(service: Served, name: ContainerName, request: CheckpointRequest) -> CheckpointResult:
    return service.checkpoint(name, request)


@router.post("/v1/restore", status_code=201)
def restore(service: Served, request: RestoreRequest) -> Container:
    return service.restore(request)


@router.websocket("/v1/containers/{name}/attach")
async def attach(websocket: WebSocket, name: ContainerName, replay: bool = False) -> None:
    """A WebSocket (docs/api.md, "Attach and exec streams"): the container's output from now on
    (with replay, its terminal's latest output first) as binary messages, and the client's
    keystrokes and window size back; it ends when the container's main process does."""
    service: Service = websocket.app.state.service
    await websocket.accept()
    await bridge(websocket, lambda: service.attach(name, replay))


@router.websocket("/v1/containers/{name}/exec")
async def exec_stream(websocket: WebSocket, name: ContainerName) -> None:
    """A WebSocket whose first message is an ExecRequest (JSON): the process's output as binary
    messages, the client's keystrokes back, and last its status; docs/api.md."""
    service: Service = websocket.app.state.service
    await websocket.accept()
    try:
        request = ExecRequest.model_validate_json(await websocket.receive_text())
    except ValidationError as error:
        await refuse(websocket, error)
        return
    except (KeyError, RuntimeError, WebSocketDisconnect):  # not text, or gone
        await refuse(
            websocket, Invalid("the first message of an exec stream must be an ExecRequest as JSON text")
        )
        return
    await bridge(websocket, lambda: service.exec(name, request.spec, request.console_size))
