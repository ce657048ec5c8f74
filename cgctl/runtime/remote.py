"""The remote runtime: the runtime interface over the daemon's HTTP API.

unix://PATH reaches a daemon's socket on this host. tcp://HOST:PORT reaches one that also listens
on TCP (`cgctl daemon --tcp`, as in `cgctl machine`), with the bearer token it was started with.
ssh://[USER@]HOST[:PORT][/SOCKET] runs `ssh HOST cgctl dial-stdio` and speaks HTTP over its
standard input and output, as docker does, so one CLI drives a fleet with the ssh keys and config
it already has. Only the standard library and
the models are used here: the CLI stays quick to start.
"""

from __future__ import annotations

import builtins
import contextlib
import http.client
import json
import os
import socket
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cgctl.netspec import PortMapping
from cgctl.runtime.api import (
    BadGateway,
    CheckpointRequest,
    CheckpointResult,
    CommitRequest,
    Conflict,
    Container,
    CreateRequest,
    Event,
    ExecRequest,
    Explanation,
    Failure,
    Invalid,
    NeedsDaemon,
    NetworkCreateRequest,
    NetworkInfo,
    NotFound,
    PolicyPlan,
    PolicyStatus,
    ProcessRow,
    PullRequest,
    PushRequest,
    PushResult,
    RegistryRequest,
    ReloadResult,
    RestoreRequest,
    SaveRequest,
)
from cgctl.runtime.logs import LogLine

if TYPE_CHECKING:
    from cgctl.accounting import Usage
    from cgctl.images.importer import Progress as ImageProgress
    from cgctl.runtime.api import HostWide
    from cgctl.runtime.checkpoint import Progress
    from cgctl.spec import ExecSpec

FAILURES: dict[int, type[Failure]] = {
    400: Invalid,
    404: NotFound,
    409: Conflict,
    502: BadGateway,
    413: Invalid,
    501: NeedsDaemon,
}


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


class _SshConnection(http.client.HTTPConnection):
    def __init__(self, target: urllib.parse.SplitResult, timeout: float | None) -> None:
        super().__init__("localhost", timeout=timeout)
        self.target = target
        self.process: subprocess.Popen[bytes] | None = None

    def connect(self) -> None:
        ours, theirs = socket.socketpair()
        destination = self.target.hostname or ""
        if self.target.username:
            destination = f"{self.target.username}@{destination}"
        argv = ["ssh", "-o", "BatchMode=yes", *(["-p", str(self.target.port)] if self.target.port else [])]
        remote = ["cgctl", "dial-stdio", *(["--socket", self.target.path] if self.target.path else [])]
        self.process = subprocess.Popen(
            [*argv, destination, "--", *remote], stdin=theirs.fileno(), stdout=theirs.fileno()
        )
        theirs.close()
        ours.settimeout(self.timeout)
        self.sock = ours

    def close(self) -> None:
        super().close()
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.process = None


def _connection(host: str, timeout: float | None) -> http.client.HTTPConnection:
    target = urllib.parse.urlsplit(host)
    if target.scheme == "unix" and (target.path or target.netloc):
        return UnixConnection(target.netloc + target.path, timeout)
    if target.scheme == "ssh" and target.hostname:
        return _SshConnection(target, timeout)
    if target.scheme == "tcp" and target.hostname and target.port and target.path in ("", "/"):
        return http.client.HTTPConnection(target.hostname, target.port, timeout=timeout)
    raise Invalid(
        f"invalid value {host!r} for --host: expected unix:///PATH, tcp://HOST:PORT "
        "or ssh://[USER@]HOST[:PORT][/SOCKET]"
    )


class RemoteRuntime:
    """The runtime interface (see cgctl.runtime.interface) over a daemon's API at `host`."""

    def __init__(self, host: str, timeout: float | None = 300.0, token: str | None = None) -> None:
        self.host = host
        self.timeout = timeout
        self.token = token
        _connection(host, timeout)  # a malformed host fails now, not at the first call

    @property
    def paths_are_here(self) -> bool:
        """A daemon on this host's socket sees this host's files; one over TCP or ssh, its own."""
        return self.host.startswith("unix://")

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        stream: bool = False,
    ) -> http.client.HTTPResponse:
        """One request on a connection of its own (streams keep theirs open); Failure on an error status."""
        connection = _connection(self.host, None if stream else self.timeout)
        pairs = [
            (k, str(v).lower() if isinstance(v, bool) else v)
            for k, v in (query or {}).items()
            if v is not None
        ]
        expanded = [(k, item) for k, v in pairs for item in (v if isinstance(v, list) else [v])]
        url = path + (f"?{urllib.parse.urlencode(expanded)}" if expanded else "")
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            connection.request(method, url, payload, headers)
            response = connection.getresponse()
        except OSError as error:
            connection.close()
            raise NeedsDaemon(
                f"cannot reach the cgctl daemon at {self.host}: {error.strerror or error}"
            ) from None
        if response.status >= 400:
            raw = response.read()
            connection.close()
            try:
                detail = json.loads(raw)
                message, exit_code = str(detail["message"]), int(detail.get("exit_code", 125))
            except (ValueError, KeyError, TypeError):
                message, exit_code = f"the daemon answered {response.status}: {raw[:200]!r}", 125
            raise FAILURES.get(response.status, Failure)(message, exit_code)
        return response

    def _json(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        patient: bool = False,
    ) -> Any:
        """The JSON answer; `patient` for calls that take as long as their data is big (no timeout)."""
        response = self._call(method, path, body, query, stream=patient)
        data = response.read()
        return json.loads(data) if data else None

    def _stream(self, path: str, query: dict[str, Any]) -> Iterator[dict[str, Any]]:
        response = self._call("GET", path, query=query, stream=True)
        try:
            for line in response:
                if line.strip():
                    yield json.loads(line)
        finally:
            response.close()

    def ping(self) -> dict[str, Any]:
        return dict(self._json("GET", "/v1/info"))

    def list(self, all: bool = False, labels: dict[str, str] | None = None) -> list[Container]:
        query = {"all": all, "label": [f"{k}={v}" for k, v in (labels or {}).items()]}
        return [Container.model_validate(item) for item in self._json("GET", "/v1/containers", query=query)]

    def inspect(self, name: str) -> Container:
        return Container.model_validate(self._json("GET", f"/v1/containers/{_quoted(name)}"))

    def create(self, request: CreateRequest) -> Container:
        # Only what was given: the daemon tells explicit limits from its policies' by the fields set.
        body = request.model_dump(mode="json", exclude_unset=True)
        return Container.model_validate(self._json("POST", "/v1/containers", body))

    def freeze(self, name: str, timeout: float = 10.0) -> bool:
        return bool(
            self._json("POST", f"/v1/containers/{_quoted(name)}/freeze", {"timeout": timeout})["changed"]
        )

    def thaw(self, name: str, timeout: float = 10.0) -> bool:
        return bool(
            self._json("POST", f"/v1/containers/{_quoted(name)}/thaw", {"timeout": timeout})["changed"]
        )

    def kill(self, name: str, signal_name: str = "KILL") -> int:
        return int(
            self._json("POST", f"/v1/containers/{_quoted(name)}/kill", {"signal": signal_name})["signalled"]
        )

    def update(self, name: str, limits: dict[str, dict[str, Any]]) -> dict[str, str]:
        return dict(
            self._json("POST", f"/v1/containers/{_quoted(name)}/update", {"limits": limits})["written"]
        )

    def remove(self, name: str, force: bool = False) -> None:
        self._json("DELETE", f"/v1/containers/{_quoted(name)}", query={"force": force})

    def wait(self, name: str, timeout: float | None = None) -> Container:
        response = self._call(
            "POST", f"/v1/containers/{_quoted(name)}/wait", query={"timeout": timeout}, stream=True
        )
        return Container.model_validate_json(response.read())

    def attach(self, name: str, detach_keys: bytes = b"", replay: bool = False) -> bool:
        """The caller's terminal (or stdio) on the container's, until it ends (False) or the detach keys
        are typed (True)."""
        query = "?replay=true" if replay else ""
        websocket, hello, connection = self._websocket(f"/v1/containers/{_quoted(name)}/attach{query}")
        try:
            return _relay(websocket, hello, detach_keys, {})
        finally:
            connection.close()

    def exec(self, name: str, spec: ExecSpec, detach_keys: bytes = b"") -> int:
        """Run spec's process in the container through the daemon, on the caller's terminal or stdio;
        its exit status (125 if the caller detached or the stream ended without one)."""
        from cgctl.runtime import terminal

        websocket, hello, connection = self._websocket(
            f"/v1/containers/{_quoted(name)}/exec",
            ExecRequest(spec=spec, console_size=terminal.size() if spec.tty else None),
        )
        status: dict[str, Any] = {}
        try:
            if _relay(websocket, hello, detach_keys, status) or not status:
                return 125
        finally:
            connection.close()
        return int(status["exit_code"]) if "exit_code" in status else 128 + int(status["signal"])

    def _websocket(self, path: str, first: ExecRequest | None = None) -> tuple[Any, dict[str, Any], Any]:
        """A WebSocket to the daemon over the host's transport, with the stream's first message read:
        (the connection, {"tty": ..., "stdin": ...}, what to close at the end). Failure on an error."""
        from websockets.exceptions import WebSocketException
        from websockets.sync.client import connect

        connection = _connection(self.host, self.timeout)
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            connection.connect()
            assert connection.sock is not None
            connection.sock.settimeout(None)
            websocket = connect(f"ws://localhost{path}", sock=connection.sock, additional_headers=headers,
                                max_size=None, compression=None)  # fmt: skip
            if first is not None:
                websocket.send(first.model_dump_json())
            hello = json.loads(websocket.recv())
        except (OSError, WebSocketException) as error:
            connection.close()
            raise NeedsDaemon(f"cannot open a stream to the cgctl daemon at {self.host}: {error}") from None
        if not hello.get("ok"):
            websocket.close()
            connection.close()
            raise FAILURES.get(int(hello["status"]), Failure)(str(hello["message"]), int(hello["exit_code"]))
        return websocket, hello, connection

    def logs(
        self, name: str, tail: int | None = None, since: datetime | None = None, follow: bool = False
    ) -> Iterator[LogLine]:
        query = {"tail": tail, "since": since.timestamp() if since else None, "follow": follow}
        for item in self._stream(f"/v1/containers/{_quoted(name)}/logs", query):
            yield LogLine.from_json(item)

    def events(self, since: float | None = None, until: float | None = None) -> Iterator[Event]:
        for item in self._stream("/v1/events", {"since": since, "until": until}):
            yield Event.model_validate(item)

    def stats(
        self,
        names: builtins.list[str] | None = None,
        interval: float = 1.0,
        stream: bool = False,
        hostwide: HostWide | None = None,
    ) -> Iterator[builtins.list[Usage]]:
        from cgctl.accounting import Usage

        query: dict[str, Any] = {"name": names or [], "interval": interval, "stream": stream}
        if hostwide is not None:
            query |= {"all": True} | hostwide.model_dump(mode="json", exclude_none=True)
        for sample in self._stream("/v1/stats", query):
            yield [Usage(**row) for row in sample]  # type: ignore[arg-type]

    def top(self, name: str) -> builtins.list[ProcessRow]:
        return [
            ProcessRow.model_validate(row) for row in self._json("GET", f"/v1/containers/{_quoted(name)}/top")
        ]

    def checkpoint(
        self, name: str, request: CheckpointRequest, progress: Progress | None = None
    ) -> CheckpointResult:
        """Dump the container with CRIU into request.dir, a directory on the daemon's host (which
        reports no progress)."""
        body = request.model_dump(mode="json")
        return CheckpointResult.model_validate(
            self._json("POST", f"/v1/containers/{_quoted(name)}/checkpoint", body, patient=True)
        )

    def restore(self, request: RestoreRequest) -> Container:
        """Restore a checkpoint (request.dir, on the daemon's host) as a new detached container."""
        return Container.model_validate(
            self._json("POST", "/v1/restore", request.model_dump(mode="json"), patient=True)
        )

    def images(self) -> builtins.list[dict[str, Any]]:
        return list(self._json("GET", "/v1/images"))

    def inspect_image(self, reference: str) -> dict[str, Any]:
        """The image's record, as the daemon lists it (with where its layers are on its host)."""
        from cgctl.images import parse_reference

        try:
            name, tag = parse_reference(reference)
        except ValueError as error:
            raise Invalid(str(error)) from None
        found = [i for i in self.images() if (i["name"], i["tag"]) == (name, tag)]
        if not found:
            raise NotFound(f"no image {name}:{tag} in the daemon's store at {self.host}")
        return found[0]

    def policy_status(self) -> PolicyStatus:
        return PolicyStatus.model_validate(self._json("GET", "/v1/policies"))

    def policy_apply(self) -> builtins.list[PolicyPlan]:
        return ReloadResult.model_validate(self._json("POST", "/v1/policies/reload")).containers

    def policy_diff(self, directory: str | None = None) -> builtins.list[PolicyPlan]:
        """What the policy files in `directory` (on the daemon's host; default: its own) would change."""
        body = {"directory": directory} if directory else None
        return [PolicyPlan.model_validate(plan) for plan in self._json("POST", "/v1/policies/diff", body)]

    def explain(self, name: str) -> Explanation:
        return Explanation.model_validate(self._json("GET", f"/v1/containers/{_quoted(name)}/policy"))

    def import_image(
        self, path: str, reference: str, progress: ImageProgress | None = None
    ) -> dict[str, Any]:
        """Import an image from `path`, a path on the daemon's host (a machine shares this host's; a
        relative one is taken from this process's directory). The daemon reports no progress."""
        body = {"path": str(Path(path).absolute()), "reference": reference}
        return dict(self._json("POST", "/v1/images", body, patient=True))

    def pull(self, request: PullRequest, progress: ImageProgress | None = None) -> dict[str, Any]:
        """Pull into the daemon's store; the request's credentials go in its body, nowhere else."""
        return dict(self._json("POST", "/v1/images/pull", _with_secret(request), patient=True))

    def push(self, request: PushRequest, progress: ImageProgress | None = None) -> PushResult:
        return PushResult.model_validate(
            self._json("POST", "/v1/images/push", _with_secret(request), patient=True)
        )

    def save_image(self, reference: str, path: str, progress: ImageProgress | None = None) -> dict[str, Any]:
        """Write the image as an OCI layout tar at `path`, a path on the daemon's host (a relative
        one is taken from this process's directory)."""
        body = SaveRequest(reference=reference, path=str(Path(path).absolute())).model_dump(mode="json")
        return dict(self._json("POST", "/v1/images/save", body, patient=True))

    def commit(self, name: str, reference: str, message: str = "") -> dict[str, Any]:
        body = CommitRequest(reference=reference, message=message).model_dump(mode="json")
        return dict(self._json("POST", f"/v1/containers/{_quoted(name)}/commit", body, patient=True))

    def remove_image(self, reference: str) -> builtins.list[str]:
        return list(self._json("DELETE", f"/v1/images/{_quoted(reference)}")["removed_layers"])

    def port(self, name: str) -> builtins.list[PortMapping]:
        return [
            PortMapping.model_validate(p) for p in self._json("GET", f"/v1/containers/{_quoted(name)}/port")
        ]

    def networks(self) -> builtins.list[NetworkInfo]:
        return [NetworkInfo.model_validate(item) for item in self._json("GET", "/v1/networks")]

    def inspect_network(self, name: str) -> NetworkInfo:
        return NetworkInfo.model_validate(self._json("GET", f"/v1/networks/{_quoted(name)}"))

    def create_network(
        self, name: str, subnet: str | None = None, gateway: str | None = None, internal: bool = False
    ) -> NetworkInfo:
        request = NetworkCreateRequest(name=name, subnet=subnet, gateway=gateway, internal=internal)
        body = request.model_dump(mode="json")
        return NetworkInfo.model_validate(self._json("POST", "/v1/networks", body))

    def remove_network(self, name: str) -> None:
        self._json("DELETE", f"/v1/networks/{_quoted(name)}")


def _relay(websocket: Any, hello: dict[str, Any], detach_keys: bytes, status: dict[str, Any]) -> bool:
    """The stream's output to our stdout and stderr (the exit status it ends with into `status`), and
    with the container's stdin open, our stdin to it (our terminal raw with its tty); until the
    stream ends (False) or the detach keys are typed (True, with a tty only)."""
    from websockets.exceptions import ConnectionClosed

    from cgctl.runtime import terminal

    ended, ended_w = os.pipe2(os.O_CLOEXEC)

    def output() -> None:
        try:
            for message in websocket:
                tag, data = message[:1], message[1:]
                if tag in (terminal.STDOUT, terminal.STDERR):
                    terminal.write_all(1 if tag == terminal.STDOUT else 2, data)
                elif tag == terminal.EXITED:
                    status.update(json.loads(data))
        except ConnectionClosed:
            pass
        finally:
            os.close(ended_w)

    reader = threading.Thread(target=output, name="stream-output", daemon=True)
    tty, stdin = bool(hello.get("tty")), bool(hello.get("stdin"))
    raw = terminal.raw() if tty and stdin and terminal.is_terminal(0) else contextlib.nullcontext()
    try:
        with raw:  # before any output: what our terminal answers to it must not be echoed here
            reader.start()
            detached = terminal.pump(
                ended,
                (lambda data: websocket.send(terminal.STDIN + data)) if stdin else None,
                close_input=lambda: websocket.send(terminal.STDIN_CLOSED),
                resize=(lambda size: websocket.send(terminal.RESIZE + json.dumps(size).encode()))
                if tty
                else None,
                detach_keys=detach_keys if tty else b"",
            )
    except ConnectionClosed:
        detached = False
    finally:
        os.close(ended)
    websocket.close()
    reader.join(timeout=5)
    return detached


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _with_secret(request: RegistryRequest) -> dict[str, Any]:
    """The request as JSON with its password in clear (pydantic masks a SecretStr when dumping)."""
    body = request.model_dump(mode="json")
    if request.auth is not None:
        body["auth"]["password"] = request.auth.password.get_secret_value()
    return body
