"""The API's routers, one per resource (containers, images, policies, the daemon itself), which
make_app includes; and what they share: the service as a dependency, the container name as a path
parameter, and newline-delimited JSON for streams."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from cgctl.daemon.service import Service
from cgctl.spec import NAME_PATTERN

NDJSON = "application/x-ndjson"


def _service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


Served = Annotated[Service, Depends(_service)]
ContainerName = Annotated[str, Path(pattern=NAME_PATTERN, description="the container's name")]


def ndjson_lines(items: Iterator[Any]) -> Iterator[bytes]:
    for item in items:
        yield (json.dumps(item) + "\n").encode()
