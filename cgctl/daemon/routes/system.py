"""The daemon itself and the host: /v1/info, /v1/stats, /v1/events and /metrics."""

from __future__ import annotations

import itertools
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from cgctl.daemon.routes import NDJSON, Served, ndjson_lines
from cgctl.metrics import ContainerCollector
from cgctl.runtime.api import HostWide, Info

router = APIRouter()


@router.get("/v1/info")
def info(
    service: Served,
) -> Info:
    return service.info()


@router.get("/v1/stats", responses={200: {"content": {NDJSON: {}}}})
def stats(
    service: Served,
    name: Annotated[list[str] | None, Query(description="only these containers")] = None,
    interval: Annotated[float, Query(ge=0.1, le=60)] = 1.0,
    stream: bool = False,
    all: Annotated[bool, Query(description="every cgroup of the host, as `cgctl stats --all`")] = False,
    cgroup_root: Annotated[str | None, Query(description="with all: the cgroup to start from")] = None,
    max_depth: Annotated[int | None, Query(ge=0, description="with all: levels below root")] = None,
    include: Annotated[list[str] | None, Query(description="with all: path globs to show")] = None,
    exclude: Annotated[list[str] | None, Query(description="with all: path globs to leave out")] = None,
) -> Response:
    """Usage of running containers (with all, of every selected cgroup) over `interval` seconds,
    as `cgctl stats` shows it: a list; with stream, one list per line and interval."""
    hostwide = (
        HostWide(cgroup_root=cgroup_root, max_depth=max_depth, include=include or [], exclude=exclude or [])
        if all
        else None
    )
    samples = (
        [asdict(usage) for usage in sample]
        for sample in service.local.stats(name, interval, stream, hostwide)
    )
    first = next(samples)  # an unknown name is a 404, not an empty stream
    if not stream:
        return JSONResponse(first)
    return StreamingResponse(ndjson_lines(itertools.chain([first], samples)), media_type=NDJSON)


@router.get("/v1/events", response_class=StreamingResponse)
def events(
    service: Served,
    since: Annotated[float | None, Query(ge=0, description="unix time")] = None,
    until: Annotated[float | None, Query(ge=0, description="unix time")] = None,
) -> StreamingResponse:
    return StreamingResponse(
        ndjson_lines(event.model_dump(mode="json") for event in service.feed.follow(since, until)),
        media_type=NDJSON,
    )


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(request: Request) -> PlainTextResponse:
    collector: ContainerCollector = request.app.state.collector
    return PlainTextResponse(collector.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
