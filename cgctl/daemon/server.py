"""The HTTP/JSON API on the daemon's unix socket. The pydantic models of cgctl.runtime.api are its
request and response schemas, so FastAPI serves an OpenAPI description made from them (/openapi.json;
the copy in docs/openapi.json is checked against it by the tests).

Every error is JSON, {"message": ..., "exit_code": ...}, with a 4xx status for the caller's
mistakes: 400 a bad value (the message names the field and the value), 404 no such container,
409 a conflict with its state, 413 a body over 1 MiB, 501 not offered here. Blocking calls run in
the thread pool (sync endpoints); streams (logs, events, stats) are newline-delimited JSON.

The API may also listen on TCP (`cgctl daemon --tcp`, what `cgctl machine` forwards to the host's
loopback): there, unlike on the socket, whose file mode decides who connects, every request must
carry `Authorization: Bearer TOKEN` with the token from --token-file, or gets 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hmac
import itertools
import json
import logging
import os
import signal
import socket
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from cgctl import __version__
from cgctl.cgroup import fs
from cgctl.daemon import keeper
from cgctl.daemon.service import Service
from cgctl.metrics import ContainerCollector
from cgctl.runtime import terminal
from cgctl.runtime.api import (
    ApiError,
    CheckpointRequest,
    CheckpointResult,
    CommitRequest,
    Container,
    CreateRequest,
    DiffRequest,
    ExecRequest,
    Explanation,
    Failure,
    FreezeRequest,
    HostWide,
    ImportRequest,
    Info,
    Invalid,
    KillRequest,
    PolicyPlan,
    PolicyStatus,
    ProcessRow,
    PullRequest,
    PushRequest,
    PushResult,
    ReloadResult,
    RestoreRequest,
    SaveRequest,
    UpdateRequest,
)
from cgctl.runtime.spawn import SpawnError
from cgctl.spec import NAME_PATTERN, SpecError

BODY_LIMIT = 1 << 20
# ASGI's three arguments, for the two middlewares.
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Scope]]
Send = Callable[[Scope], Awaitable[None]]
NDJSON = "application/x-ndjson"


def _service(request: Request) -> Service:
    return request.app.state.service  # type: ignore[no-any-return]


Served = Annotated[Service, Depends(_service)]
ContainerName = Annotated[str, Path(pattern=NAME_PATTERN, description="the container's name")]
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ApiError} for status in (400, 404, 409, 413, 500, 501)
}


def _error(status: int, message: str, exit_code: int = 125) -> JSONResponse:
    return JSONResponse({"message": message, "exit_code": exit_code}, status_code=status)


def _problem(error: Exception) -> tuple[int, str, int]:
    """(HTTP status, message, exit status) of what a call raised: the same for a request and a stream."""
    if isinstance(error, Failure):
        return error.status, str(error), error.exit_code
    if isinstance(error, SpecError):
        field = ".".join(str(part) for part in error.field)
        return 400, f"invalid value {error.value!r} for {field}: {error.reason}", 125
    if isinstance(error, SpawnError):
        return 400, str(error), error.exit_code
    if isinstance(error, ValidationError):
        return 400, _validation_message(list(error.errors())), 125
    if isinstance(error, fs.CgroupError):
        return 500, str(error), 125
    raise error


def _validation_message(errors: list[Any]) -> str:
    """'invalid value X for spec.limits.memory.max: reason', one clause per error."""
    clauses = []
    for detail in errors:
        location = ".".join(str(part) for part in detail["loc"] if part not in ("body", "query", "path"))
        reason = str(detail["msg"]).removeprefix("Value error, ")
        given = detail.get("input")
        if detail["type"] == "extra_forbidden":
            clauses.append(f"unknown field {location!r}")
        elif detail["type"] == "missing":
            clauses.append(f"missing field {location!r}")
        elif location.split(".")[0] == "auth":
            clauses.append(f"invalid {location}: {reason}")  # never echoed
        elif isinstance(given, str | int | float | bool):
            clauses.append(f"invalid value {given!r} for {location}: {reason}")
        else:
            clauses.append(f"invalid {location or 'body'}: {reason}")
    return "; ".join(clauses)


class BodyLimit:
    """Refuse request bodies over BODY_LIMIT with 413, counted as they arrive (Content-Length can lie)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > BODY_LIMIT):
            await _error(413, f"the request body is over {BODY_LIMIT} bytes")(scope, receive, send)
            return
        received = 0

        async def counted() -> Scope:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > BODY_LIMIT:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await _error(413, f"the request body is over {BODY_LIMIT} bytes")(scope, receive, send)


class _TooLarge(Exception):
    pass


class TokenGate:
    """Requests that came in over TCP need the bearer token; those on the unix socket do not."""

    def __init__(self, app: Callable[..., Awaitable[None]], token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # uvicorn sets "server" to (host, port) for a TCP listener and to (path, None) for a unix socket.
        server = scope.get("server")
        if scope["type"] in ("http", "websocket") and (server is None or server[1] is not None):
            given = dict(scope.get("headers", [])).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                if scope["type"] == "websocket":  # refused before the handshake: HTTP 403
                    await send({"type": "websocket.close", "code": 1008})
                    return
                message = "this API needs its token over TCP: send Authorization: Bearer TOKEN"
                await _error(401, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _stream(
    websocket: WebSocket, open_stream: Callable[[], tuple[socket.socket, dict[str, Any]]]
) -> None:
    """Bridge a keeper stream (keeper.py: one SOCK_SEQPACKET message per chunk, tagged by its first
    byte) and an accepted WebSocket: first a JSON text message, {"tty": ..., "stdin": ...} or the
    error; then each chunk from the keeper as a binary message, and the client's binary messages
    (only keystrokes, window sizes and the end of its input) back; until either side ends."""
    try:
        stream, hello = await run_in_threadpool(open_stream)
    except Exception as error:
        await _refuse(websocket, error)
        return
    loop = asyncio.get_running_loop()
    stream.setblocking(False)

    async def outward() -> None:
        while data := await loop.sock_recv(stream, keeper.MESSAGE_LIMIT):
            await websocket.send_bytes(data)

    async def inward() -> None:
        while True:
            message = await websocket.receive()
            data = message.get("bytes") or b""
            if message["type"] == "websocket.disconnect":
                return
            if data[:1] == terminal.STDIN:
                for start in range(1, len(data), keeper.READ_SIZE):
                    await loop.sock_sendall(stream, terminal.STDIN + data[start : start + keeper.READ_SIZE])
            elif data[:1] in (terminal.RESIZE, terminal.STDIN_CLOSED) and len(data) < 64:
                await loop.sock_sendall(stream, data)

    try:
        await websocket.send_text(json.dumps({"ok": True, **hello}))
        tasks = {asyncio.ensure_future(outward()), asyncio.ensure_future(inward())}
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    finally:
        stream.close()
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await websocket.close()


async def _refuse(websocket: WebSocket, error: Exception) -> None:
    """End a stream before it began, with the error as a request would have had it (an unexpected
    one is a 500 and logged, as uvicorn logs a request's)."""
    try:
        status, message, exit_code = _problem(error)
    except Exception:
        logging.getLogger("cgctl.daemon").exception("a stream failed")
        status, message, exit_code = 500, f"internal error: {type(error).__name__}: {error}", 125
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.send_text(json.dumps({"ok": False, "status": status, "message": message,
                                              "exit_code": exit_code}))  # fmt: skip
        await websocket.close()


def _lines(items: Iterator[Any]) -> Iterator[bytes]:
    for item in items:
        yield (json.dumps(item) + "\n").encode()


@contextlib.asynccontextmanager
async def _lifespan(_: FastAPI) -> AsyncIterator[None]:
    import anyio.to_thread

    # Streams (logs -f, events) hold a worker thread each: room for many clients at once.
    anyio.to_thread.current_default_thread_limiter().total_tokens = 512
    notify_systemd(f"READY=1\nMAINPID={os.getpid()}")
    yield


def make_app() -> FastAPI:
    """The API; serve() gives it the service and the metrics collector (app.state)."""
    app = FastAPI(
        lifespan=_lifespan,
        title="cgctl",
        version=__version__,
        description="Run, supervise and account workloads in cgroup v2 containers.",
        responses=ERRORS,
    )

    @app.exception_handler(Failure)
    @app.exception_handler(SpecError)
    @app.exception_handler(SpawnError)
    @app.exception_handler(ValidationError)
    @app.exception_handler(fs.CgroupError)
    async def failure(_: Request, error: Exception) -> JSONResponse:
        return _error(*_problem(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        """Unknown paths (404), wrong methods (405), bodies that are not text (400): the same JSON."""
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def request_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(list(error.errors())))

    @app.get("/v1/info")
    def info(
        service: Served,
    ) -> Info:
        return service.info()

    @app.get("/v1/containers")
    def list_containers(
        service: Served,
        all: bool = False,
        label: Annotated[list[str] | None, Query(description="K=V: only containers with this label")] = None,
    ) -> list[Container]:
        labels = {}
        for pair in label or []:
            key, separator, value = pair.partition("=")
            if not separator or not key:
                raise _invalid_query("label", pair, "expected K=V")
            labels[key] = value
        return service.list(all=all, labels=labels)

    @app.post("/v1/containers", status_code=201)
    def create(service: Served, request: CreateRequest) -> Container:
        return service.create(request)

    @app.get("/v1/containers/{name}")
    def inspect(service: Served, name: ContainerName) -> Container:
        return service.inspect(name)

    @app.delete("/v1/containers/{name}", status_code=204)
    def remove(service: Served, name: ContainerName, force: bool = False) -> Response:
        service.remove(name, force)
        return Response(status_code=204)

    @app.post("/v1/containers/{name}/freeze")
    def freeze(service: Served, name: ContainerName, request: FreezeRequest | None = None) -> dict[str, bool]:
        return {"changed": service.freeze(name, (request or FreezeRequest()).timeout)}

    @app.post("/v1/containers/{name}/thaw")
    def thaw(service: Served, name: ContainerName, request: FreezeRequest | None = None) -> dict[str, bool]:
        return {"changed": service.thaw(name, (request or FreezeRequest()).timeout)}

    @app.post("/v1/containers/{name}/kill")
    def kill(service: Served, name: ContainerName, request: KillRequest | None = None) -> dict[str, int]:
        return {"signalled": service.kill(name, (request or KillRequest()).signal)}

    @app.post("/v1/containers/{name}/update")
    def update(service: Served, name: ContainerName, request: UpdateRequest) -> dict[str, dict[str, str]]:
        return {"written": service.update(name, request.limits)}

    @app.get("/v1/containers/{name}/top")
    def top(service: Served, name: ContainerName) -> list[ProcessRow]:
        """The running container's processes (its nested cgroups' too), by host pid, as `cgctl top`
        shows them; CPU % is over the 0.5 s the answer takes."""
        return service.top(name)

    @app.get("/v1/containers/{name}/policy")
    def explain(service: Served, name: ContainerName) -> Explanation:
        """Per limit in force: its value, the policy (or explicit option) that set it, what it overrode."""
        return service.explain(name)

    @app.get("/v1/policies")
    def policy_status(service: Served) -> PolicyStatus:
        return service.policy_status()

    @app.post("/v1/policies/reload")
    def policy_reload(service: Served) -> ReloadResult:
        """Load the policy directory and apply it to every running container; 400 if a file is bad (the
        active policies stay)."""
        return service.policy_reload()

    @app.post("/v1/policies/diff")
    def policy_diff(service: Served, request: DiffRequest | None = None) -> list[PolicyPlan]:
        """What a policy directory (default: the daemon's) would change on each running container; nothing
        is written."""
        return service.policy_diff((request or DiffRequest()).directory)

    @app.post("/v1/containers/{name}/wait")
    def wait(
        service: Served, name: ContainerName, timeout: Annotated[float | None, Query(gt=0, le=86400)] = None
    ) -> Container:
        return service.wait(name, timeout)

    @app.get("/v1/containers/{name}/logs", response_class=StreamingResponse)
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

        return StreamingResponse(_lines(items()), media_type=NDJSON)

    @app.get("/v1/stats", responses={200: {"content": {NDJSON: {}}}})
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
            HostWide(
                cgroup_root=cgroup_root, max_depth=max_depth, include=include or [], exclude=exclude or []
            )
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
        return StreamingResponse(_lines(itertools.chain([first], samples)), media_type=NDJSON)

    @app.post("/v1/containers/{name}/checkpoint")
    def checkpoint(service: Served, name: ContainerName, request: CheckpointRequest) -> CheckpointResult:
        return service.checkpoint(name, request)

    @app.post("/v1/restore", status_code=201)
    def restore(service: Served, request: RestoreRequest) -> Container:
        return service.restore(request)

    @app.get("/v1/images")
    def images(service: Served) -> list[dict[str, Any]]:
        return service.images()

    @app.post("/v1/images", status_code=201)
    def import_image(service: Served, request: ImportRequest) -> dict[str, Any]:
        return service.import_image(request)

    @app.post("/v1/images/pull", status_code=201)
    def pull(service: Served, request: PullRequest) -> dict[str, Any]:
        """Pull an image from a registry into the daemon's store."""
        return service.pull(request)

    @app.post("/v1/images/push")
    def push(service: Served, request: PushRequest) -> PushResult:
        """Push an image of the daemon's store to a registry."""
        return service.push(request)

    @app.post("/v1/images/save")
    def save_image(service: Served, request: SaveRequest) -> dict[str, Any]:
        """Write an image as an OCI layout tar at a path on the daemon's host."""
        return service.save_image(request)

    @app.post("/v1/containers/{name}/commit", status_code=201)
    def commit(service: Served, name: ContainerName, request: CommitRequest) -> dict[str, Any]:
        """A new image: the container's image plus its writes (it needs an --upper DIR)."""
        return service.commit(name, request)

    @app.delete("/v1/images/{reference:path}")
    def remove_image(service: Served, reference: str) -> dict[str, list[str]]:
        return {"removed_layers": service.remove_image(reference)}

    @app.websocket("/v1/containers/{name}/attach")
    async def attach(websocket: WebSocket, name: ContainerName, replay: bool = False) -> None:
        """A WebSocket (docs/api.md, "Attach and exec streams"): the container's output from now on
        (with replay, its terminal's latest output first) as binary messages, and the client's
        keystrokes and window size back; it ends when the container's main process does."""
        service: Service = websocket.app.state.service
        await websocket.accept()
        await _stream(websocket, lambda: service.attach(name, replay))

    @app.websocket("/v1/containers/{name}/exec")
    async def exec_stream(websocket: WebSocket, name: ContainerName) -> None:
        """A WebSocket whose first message is an ExecRequest (JSON): the process's output as binary
        messages, the client's keystrokes back, and last its status; docs/api.md."""
        service: Service = websocket.app.state.service
        await websocket.accept()
        try:
            request = ExecRequest.model_validate_json(await websocket.receive_text())
        except ValidationError as error:
            await _refuse(websocket, error)
            return
        except (KeyError, RuntimeError, WebSocketDisconnect):  # not text, or gone
            await _refuse(
                websocket, Invalid("the first message of an exec stream must be an ExecRequest as JSON text")
            )
            return
        await _stream(websocket, lambda: service.exec(name, request.spec, request.console_size))

    @app.get("/v1/events", response_class=StreamingResponse)
    def events(
        service: Served,
        since: Annotated[float | None, Query(ge=0, description="unix time")] = None,
        until: Annotated[float | None, Query(ge=0, description="unix time")] = None,
    ) -> StreamingResponse:
        return StreamingResponse(
            _lines(event.model_dump(mode="json") for event in service.events(since, until)), media_type=NDJSON
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(request: Request) -> PlainTextResponse:
        collector: ContainerCollector = request.app.state.collector
        return PlainTextResponse(collector.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    app.add_middleware(BodyLimit)  # type: ignore[arg-type]
    return app


def _invalid_query(field: str, value: str, reason: str) -> Failure:
    return Invalid(f"invalid value {value!r} for {field}: {reason}")


def listening_socket(path: FilePath, group: str | None) -> socket.socket:
    """The API's socket: systemd's (socket activation), else bound at path, reachable by root and
    `group` only. Refuses a directory others can write (they could swap the socket) or a path held
    by someone else or by a daemon that still answers."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        return socket.socket(fileno=3)  # SD_LISTEN_FDS_START
    path.parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    parent = path.parent.stat()
    if parent.st_uid != os.geteuid() or parent.st_mode & 0o022:
        raise Failure(
            f"{path.parent}: the socket's directory must be owned by uid {os.geteuid()} and writable by it "
            f"alone (it is uid {parent.st_uid}, mode {stat.S_IMODE(parent.st_mode):o}): others could replace "
            f"the socket. Fix: chown {os.geteuid()} {path.parent} && chmod go-w {path.parent}"
        )
    if path.exists() or path.is_symlink():
        held = path.lstat()
        if not stat.S_ISSOCK(held.st_mode) or held.st_uid != os.geteuid():
            raise Failure(
                f"{path}: not a socket of uid {os.geteuid()}; refusing to replace it (remove it by hand)"
            )
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise Failure(f"{path}: a daemon already answers there (stop it first, or use --socket)")
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # left by a daemon that died
        finally:
            probe.close()
    gid = None
    if group:
        with contextlib.suppress(KeyError):
            gid = grp.getgrnam(group).gr_gid
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # never reachable by others, even for a moment
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    listener.listen(128)
    return listener


def notify_systemd(state: str) -> None:
    """sd_notify: tell systemd (Type=notify) we are ready or stopping; nothing without $NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notifier, contextlib.suppress(OSError):
        notifier.sendto(state.encode(), address)


def tcp_socket(address: tuple[str, int]) -> socket.socket:
    listener = socket.create_server(address, family=socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    listener.listen(128)
    return listener


def serve(
    service: Service,
    listener: socket.socket,
    collector: ContainerCollector,
    metrics: tuple[str, int] | None,
    tcp: tuple[socket.socket, str] | None = None,
) -> None:
    """Serve the API until SIGTERM or SIGINT (uvicorn's handlers end the loop); also on a TCP
    listener, with its token, if `tcp` is given."""
    import uvicorn

    app = make_app()
    app.state.service, app.state.collector = service, collector
    sockets = [listener]
    if tcp is not None:
        app.add_middleware(TokenGate, token=tcp[1])  # type: ignore[arg-type]
        sockets.append(tcp[0])
    if metrics is not None:
        from cgctl.exporter import make_server

        exporter = make_server(metrics[0], metrics[1], collector, own_process=False)  # see Service.metrics
        threading.Thread(target=exporter.serve_forever, name="metrics", daemon=True).start()
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2, access_log=False)
    # uvicorn stops on SIGTERM/SIGINT and raises the signal again once it has; with these handlers
    # that second delivery is a no-op, so the daemon's own shutdown (Service.close) still runs.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    signal.signal(signal.SIGHUP, lambda *_: service.engine.changed.set())  # reload the policies
    uvicorn.Server(config).run(sockets=sockets)
    notify_systemd("STOPPING=1")


if __name__ == "__main__":  # python -m cgctl.daemon.server > docs/openapi.json
    print(json.dumps(make_app().openapi(), indent=2, sort_keys=True))
