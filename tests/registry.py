"""A real OCI registry on loopback for integration tests and benchmarks of pulls.

Debian's docker-registry (distribution 2.8) serves from a directory of its own, over plain HTTP or TLS
(a throwaway CA), with or without htpasswd users; skopeo fills and inspects it, as a user would; and
BlobProxy stands in front of it to count what a client asked for, corrupt one blob or slow blobs down,
so that tests can see verification, resumption and caching at work without a network.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import http.client
import io
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, Literal
from urllib.parse import urlsplit

REGISTRY = Path("/usr/bin/docker-registry")
START_TIMEOUT = 20.0  # seconds; it starts in a few milliseconds, but the VM may be slow
STOP_TIMEOUT = 5.0
# Headers that describe one connection, not the message: never forwarded as they are.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
     "expect", "content-length"}
)  # fmt: skip
PATH_KINDS = [
    ("base", re.compile(r"/v2/?")),
    ("catalog", re.compile(r"/v2/_catalog")),
    ("upload", re.compile(r"/v2/.+/blobs/uploads/.*")),
    ("blob", re.compile(r"/v2/.+/blobs/sha256:[0-9a-f]{64}")),
    ("manifest", re.compile(r"/v2/.+/manifests/[^/]+")),
    ("tags", re.compile(r"/v2/.+/tags/list")),
]


def run(*command: str | Path, timeout: float | None = 300) -> subprocess.CompletedProcess[str]:
    """Run a tool, failing the test with its stderr (CalledProcessError alone does not show it)."""
    try:
        return subprocess.run(
            [str(a) for a in command], check=True, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, "TMPDIR": tempfile.gettempdir()},
        )  # fmt: skip
    except subprocess.CalledProcessError as error:
        words = " ".join(str(a) for a in command)
        raise AssertionError(f"`{words}` exited {error.returncode}: {error.stderr.strip()}") from None


def skopeo(*args: str) -> subprocess.CompletedProcess[str]:
    """skopeo with TMPDIR set: it unpacks oci-archive: sources there, else in /var/tmp (read-only in VMs)."""
    return run("skopeo", *args)


@dataclass(frozen=True)
class Registry:
    """Where a running registry answers and how to talk to it: the first of `users` is who tools log in as."""

    address: str  # 127.0.0.1:PORT
    url: str  # http://127.0.0.1:PORT or https://...
    directory: Path
    ca: Path | None = None  # the CA to trust, alone in its directory (skopeo's --cert-dir wants that)
    users: dict[str, str] = field(default_factory=dict)

    def skopeo_flags(self, side: Literal["src", "dest"] | None = None) -> list[str]:
        """skopeo's flags for this registry as the source or destination of `copy`, or (None) of `inspect`."""
        prefix = f"--{side}-" if side else "--"
        flags = [f"{prefix}cert-dir", str(self.ca.parent)] if self.ca else [f"{prefix}tls-verify=false"]
        if self.users:
            user, password = next(iter(self.users.items()))
            flags += [f"{prefix}creds", f"{user}:{password}"]
        return flags

    def reference(self, name: str) -> str:
        """skopeo's name for the image `name` ("repo:tag" or "repo@sha256:...") here."""
        return f"docker://{self.address}/{name}"

    def push(self, layout: Path, name: str) -> str:
        """Copy the OCI layout's image (all platforms of an index, same digests) to `name`; its digest."""
        with tempfile.TemporaryDirectory() as scratch:
            digest_file = Path(scratch) / "digest"
            skopeo("copy", "--all", "--preserve-digests", "--digestfile", str(digest_file),
                   *self.skopeo_flags("dest"), f"oci:{layout}", self.reference(name))  # fmt: skip
            return digest_file.read_text().strip()

    def inspect(self, name: str, raw: bool = False) -> dict[str, Any]:
        """`skopeo inspect` of `name`: its summary (this machine's platform), or (raw) its manifest/index."""
        flags = ["--raw"] if raw else []
        return json.loads(skopeo("inspect", *flags, *self.skopeo_flags(), self.reference(name)).stdout)

    def ssl_context(self) -> ssl.SSLContext | None:
        """For Python clients: one trusting the registry's CA (None over plain HTTP)."""
        return ssl.create_default_context(cafile=self.ca) if self.ca else None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        credentials: bool = True,
        timeout: float = 30,
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One HTTP request to the registry's API, as the first user unless not `credentials`: (status,
        headers, body), whatever the status (redirects are not followed)."""
        connection = (
            http.client.HTTPSConnection(self.address, timeout=timeout, context=self.ssl_context())
            if self.ca
            else http.client.HTTPConnection(self.address, timeout=timeout)
        )
        headers = dict(headers or {})
        if credentials and self.users:
            token = base64.b64encode(":".join(next(iter(self.users.items()))).encode()).decode()
            headers["Authorization"] = f"Basic {token}"
        try:
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            return response.status, response.headers, response.read()
        finally:
            connection.close()


def free_port() -> int:
    """A loopback port nobody listens on now (the kernel's pick, released for the server to bind)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def write_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signs for 127.0.0.1 and localhost: (CA, certificate,
    key). The CA is trust/ca.crt, alone in its directory for skopeo's --cert-dir."""
    tls, trust = directory / "tls", directory / "trust"
    tls.mkdir(parents=True, exist_ok=True)
    trust.mkdir(parents=True, exist_ok=True)
    ca, ca_key, certificate, key = trust / "ca.crt", tls / "ca.key", tls / "server.crt", tls / "server.key"
    new = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
           "-days", "7"]  # fmt: skip
    run(*new, "-keyout", ca_key, "-out", ca, "-subj", "/CN=cgctl test CA",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run(*new, "-keyout", key, "-out", certificate, "-subj", "/CN=localhost", "-CA", ca, "-CAkey", ca_key,
        "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-addext", "basicConstraints=critical,CA:FALSE", "-addext", "keyUsage=critical,digitalSignature",
        "-addext", "extendedKeyUsage=serverAuth")  # fmt: skip
    return ca, certificate, key


def write_htpasswd(path: Path, users: dict[str, str]) -> Path:
    """An htpasswd file of bcrypt hashes, the only kind distribution accepts."""
    path.write_text("".join(run("htpasswd", "-Bbn", user, password).stdout.strip() + "\n"
                            for user, password in users.items()))  # fmt: skip
    return path


@contextlib.contextmanager
def running_registry(
    directory: Path, *, tls: bool = False, users: dict[str, str] | None = None
) -> Iterator[Registry]:
    """A registry storing under directory/storage and logging to directory/registry.log, serving
    until the block ends: over HTTPS if `tls` (trust Registry.ca), asking for basic auth if `users`.
    Deletes are enabled, so that tests can take blobs away."""
    directory.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    ca = None
    # A fixed secret keeps it from warning that it made one up; access logs would cost benchmarks.
    config: dict[str, Any] = {
        "version": "0.1",
        "log": {"level": "warn", "accesslog": {"disabled": True}},
        "storage": {"filesystem": {"rootdirectory": str(directory / "storage")}, "delete": {"enabled": True}},
        "http": {"addr": address, "secret": secrets.token_hex(16)},
    }
    if tls:
        ca, certificate, key = write_certificates(directory)
        config["http"]["tls"] = {"certificate": str(certificate), "key": str(key)}
    if users:
        htpasswd = write_htpasswd(directory / "htpasswd", users)
        config["auth"] = {"htpasswd": {"realm": "cgctl-tests", "path": str(htpasswd)}}
    (directory / "config.yml").write_text(json.dumps(config, indent=2))  # JSON is YAML
    scheme = "https" if tls else "http"
    registry = Registry(address, f"{scheme}://{address}", directory, ca, dict(users or {}))
    log = directory / "registry.log"
    with log.open("ab") as output:
        process = subprocess.Popen([REGISTRY, "serve", directory / "config.yml"], stdin=subprocess.DEVNULL,
                                   stdout=output, stderr=output)  # fmt: skip
    try:
        wait_until_serving(registry, process, log)
        yield registry
    finally:
        process.terminate()
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_serving(registry: Registry, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until GET /v2/ answers as it should (401 if it has users: the probe does not log in)."""
    expected = 401 if registry.users else 200
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert process.poll() is None, f"the registry exited {process.returncode} on start: {log.read_text()}"
        try:
            status = registry.request("GET", "/v2/", credentials=False, timeout=1)[0]
        except OSError as error:
            assert time.monotonic() < deadline, (
                f"the registry did not answer in {START_TIMEOUT} s ({error}): {log.read_text()}"
            )
            time.sleep(0.02)
            continue
        assert status == expected, f"GET /v2/ answered {status}, not {expected}: {log.read_text()}"
        return


def path_kind(path: str) -> str:
    """What a registry API path names: base, catalog, upload, blob, manifest, tags or other."""
    return next((kind for kind, pattern in PATH_KINDS if pattern.fullmatch(path)), "other")


@dataclass
class Served:
    """One request the proxy forwarded, listed once the registry answered, before the body is sent (so a
    client that has it all finds it listed), or when the registry did not answer (status 0)."""

    method: str
    path: str
    query: str
    range: str | None  # the client's Range header
    status: int = 0
    sent: int = 0  # body bytes written to the client so far

    @property
    def kind(self) -> str:
        return path_kind(self.path)


class BlobProxy:
    """A reverse proxy in front of a plain-HTTP registry, on a port of its own, forwarding everything.

    Knobs, which take effect at once, even in the middle of a blob: `corrupt`, a blob digest whose GET
    bodies are served with their middle byte flipped (same length, Range or not), and `rate`, the bytes
    per second blob GET bodies trickle at, so a test can kill a client mid-blob. `requests` lists what
    was served; `blob_bytes` counts blob body bytes sent so far, to tell when a client is mid-blob.
    """

    CHUNK = 1 << 16

    def __init__(self, registry: Registry) -> None:
        assert registry.ca is None, "the proxy talks plain HTTP to the registry"
        self.upstream = registry
        self.corrupt: str | None = None
        self.rate: int | None = None
        self.requests: list[Served] = []
        self.blob_bytes = 0
        self._closing = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Forwarder, self))
        self.address = f"127.0.0.1:{self._server.server_port}"
        # The registry as clients see it through the proxy: its flags, push and inspect work unchanged.
        self.registry = dataclasses.replace(registry, address=self.address, url=f"http://{self.address}")
        self._thread = threading.Thread(target=self._server.serve_forever, name="blob-proxy", daemon=True)

    def __enter__(self) -> BlobProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closing.set()  # ends trickling bodies
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    def served(self, kind: str, method: str = "GET") -> list[Served]:
        """The requests for `kind` of path (see path_kind) by `method`, in order."""
        return [r for r in self.requests if r.kind == kind and r.method == method]

    def forward(self, client: BaseHTTPRequestHandler) -> None:
        target = urlsplit(client.path)
        served = Served(client.command, target.path, target.query, client.headers.get("Range"))
        body = read_body(client)
        upstream = http.client.HTTPConnection(self.upstream.address, timeout=60)
        try:
            # The client's own Host goes upstream, so the registry's Locations name the proxy already.
            upstream.putrequest(client.command, client.path, skip_host=True, skip_accept_encoding=True)
            for name, value in client.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)
            if body or client.command in ("POST", "PUT", "PATCH"):
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            served.status = response.status
            self.requests.append(served)
            client.send_response_only(response.status, response.reason)
            for name, value in response.getheaders():
                if name.lower() == "location":
                    value = value.replace(self.upstream.url, self.registry.url, 1)
                if name.lower() not in HOP_BY_HOP:
                    client.send_header(name, value)
            if client.command == "HEAD":
                client.send_header("Content-Length", response.getheader("Content-Length", "0"))
                client.end_headers()
                return
            blob = client.command == "GET" and served.kind == "blob" and response.status in (200, 206)
            source: BinaryIO = response
            length = response.length
            if length is None:  # chunked: read whole and sent sized, as this side never chunks
                whole = response.read()
                source, length = io.BytesIO(whole), len(whole)
            client.send_header("Content-Length", str(length))
            client.end_headers()
            for chunk in self._body(source, length, blob, self._flip_at(target.path, response, length)):
                client.wfile.write(chunk)
                served.sent += len(chunk)
        except OSError:  # the client went away (or the registry did): this connection is done
            client.close_connection = True
        finally:
            upstream.close()
            if not served.status:
                self.requests.append(served)

    def _flip_at(self, path: str, response: http.client.HTTPResponse, length: int) -> int | None:
        """Where in this body the blob's middle byte is, if this blob is the one to corrupt."""
        if self.corrupt is None or not path.endswith("/" + self.corrupt):
            return None
        start, total = 0, length
        if response.status == 206:  # Content-Range: bytes START-END/TOTAL
            span, _, size = response.getheader("Content-Range", "").partition("/")
            start, total = int(span.split()[-1].split("-")[0]), int(size)
        offset = total // 2 - start
        return offset if 0 <= offset < length else None

    def _body(self, source: BinaryIO, length: int, blob: bool, flip: int | None) -> Iterator[bytes]:
        """The `length` bytes of a body in chunks, the byte at `flip` flipped, a blob's at `rate`."""
        done = 0
        while done < length:
            if self._closing.is_set():
                raise ConnectionAbortedError("the proxy is closing")
            rate = self.rate if blob else None
            chunk = bytearray(source.read(min(length - done, max(1, rate // 20) if rate else self.CHUNK)))
            if not chunk:
                raise ConnectionAbortedError("the registry cut the body short")
            if flip is not None and done <= flip < done + len(chunk):
                chunk[flip - done] ^= 0xFF
            if rate:
                time.sleep(len(chunk) / rate)
            yield bytes(chunk)
            done += len(chunk)
            if blob:
                self.blob_bytes += len(chunk)


def read_body(client: BaseHTTPRequestHandler) -> bytes:
    """The request's body, whether sized or chunked (Go's clients chunk uploads of unknown size)."""
    if "chunked" not in client.headers.get("Transfer-Encoding", "").lower():
        return client.rfile.read(int(client.headers.get("Content-Length") or 0))
    parts = []
    while size := int(client.rfile.readline().split(b";")[0], 16):
        parts.append(client.rfile.read(size))
        client.rfile.readline()
    while client.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
        pass
    return b"".join(parts)


class _Forwarder(BaseHTTPRequestHandler):
    """Every method to BlobProxy.forward, over HTTP/1.1 keep-alive as registry clients expect."""

    protocol_version = "HTTP/1.1"

    def __init__(self, proxy: BlobProxy, *args: Any) -> None:
        self.proxy = proxy
        super().__init__(*args)

    def forward(self) -> None:
        self.proxy.forward(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = forward

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: `requests` says what was served."""
