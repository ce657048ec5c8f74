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

import contextlib
import grp
import hmac
import json
import os
import signal
import socket
import stat
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from cgctl import __version__
from cgctl.cgroup import fs
from cgctl.daemon.errors import error_response, problem, validation_message
from cgctl.daemon.routes import containers, images, networks, policies, system
from cgctl.daemon.service import Service
from cgctl.metrics import ContainerCollector
from cgctl.network import NetworkError, cni
from cgctl.runtime.api import ApiError, Failure
from cgctl.runtime.spawn import SpawnError
from cgctl.spec import SpecError

BODY_LIMIT = 1 << 20
# ASGI's three arguments, for the two middlewares.
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Scope]]
Send = Callable[[Scope], Awaitable[None]]
ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ApiError} for status in (400, 404, 409, 413, 500, 501)
}


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
            await error_response(413, f"the request body is over {BODY_LIMIT} bytes")(scope, receive, send)
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
            await error_response(413, f"the request body is over {BODY_LIMIT} bytes")(scope, receive, send)


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
                await error_response(401, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


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
    @app.exception_handler(NetworkError)
    @app.exception_handler(cni.CniError)
    async def failure(_: Request, error: Exception) -> JSONResponse:
        return error_response(*problem(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        """Unknown paths (404), wrong methods (405), bodies that are not text (400): the same JSON."""
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(RequestValidationError)
    async def request_error(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(400, validation_message(list(error.errors())))

    for router in (system.router, containers.router, policies.router, images.router, networks.router):
        app.include_router(router)
    app.add_middleware(BodyLimit)  # type: ignore[arg-type]
    return app


def listening_socket(path: Path, group: str | None) -> socket.socket:
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
