"""The client side of the OCI distribution API: manifests and blobs, fetched and pushed, with auth.

One `Client` per registry and repository. It says hello at `/v2/` first, which
tells it the scheme (HTTPS always, verified, with `--tls-ca` for a private CA;
plain HTTP only for a registry named insecure or on loopback, and only when it
does not speak TLS) and the authentication the registry wants: none, basic
(htpasswd), or a bearer token from the realm of its `WWW-Authenticate`
challenge. Connection errors, 5xx and 429 are retried with backoff; a blob
that breaks off mid-stream is fetched on from where it stopped (`Range`).
Credentials go in headers only: never in a URL, a message or a log.
"""

from __future__ import annotations

import base64
import io
import re
import ssl
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from cgctl.images.reference import DEFAULT_API_HOST, DEFAULT_DOMAIN, Reference, is_loopback
from cgctl.images.source import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST

MANIFEST_ACCEPT = ", ".join((OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST))
BACKOFF = (0.5, 1.0, 2.0, 4.0)  # seconds before each retry: five attempts in all
MAX_RETRY_AFTER = 30.0  # seconds: a longer Retry-After is an error, not a wait
SMALL_BLOB = 4 << 20  # manifests and configs are read whole, up to this
CHUNK = 16 << 20  # bytes per PATCH of a chunked upload; smaller blobs go in one PUT
CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class RegistryError(Exception):
    """The registry could not be reached or refused; the message names the reference and the cause."""


@dataclass(frozen=True)
class Options:
    """How to reach registries: whom to trust, which may speak plain HTTP, whose credentials."""

    tls_ca: Path | None = None
    insecure: frozenset[str] = frozenset()  # domains allowed plain HTTP besides loopback ones
    credentials: Callable[[str], tuple[str, str] | None] = field(default=lambda _: None)


class Client:
    """Talks to one repository of one registry (and, for mounts, other repositories there)."""

    def __init__(
        self, reference: Reference, options: Options, push: bool = False, mount_from: str | None = None
    ) -> None:
        self.reference, self.options = reference, options
        self.host = DEFAULT_API_HOST if reference.registry == DEFAULT_DOMAIN else reference.registry
        self.scopes = [f"repository:{reference.repository}:{'pull,push' if push else 'pull'}"]
        if mount_from:
            self.scopes.append(f"repository:{mount_from}:pull")
        self.base = ""
        self.authorization: str | None = None
        self.challenge: dict[str, str] = {}
        try:
            verify: ssl.SSLContext | bool = ssl.create_default_context(
                cafile=str(options.tls_ca) if options.tls_ca else None
            )
        except (OSError, ssl.SSLError) as error:
            raise RegistryError(
                f"--tls-ca {options.tls_ca}: not a readable PEM certificate: {error}"
            ) from None
        self.http = httpx.Client(
            verify=verify,
            timeout=httpx.Timeout(60.0, connect=10.0),
            follow_redirects=True,
            headers={"User-Agent": "cgctl"},
        )

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- the API

    def manifest(self, reference: str) -> tuple[bytes, str]:
        """A manifest or index by tag or digest: its bytes and media type."""
        path = f"/v2/{self.reference.repository}/manifests/{reference}"
        response = self.send("GET", path, headers={"Accept": MANIFEST_ACCEPT})
        if len(response.content) > SMALL_BLOB:
            raise RegistryError(
                f"{self.reference}: the registry sent a manifest of {len(response.content)} bytes"
            )
        media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        return response.content, media_type

    def blob_bytes(self, digest: str) -> bytes:
        """A small blob (a config or a nested index), whole."""
        response = self.send("GET", f"/v2/{self.reference.repository}/blobs/{digest}")
        return response.content

    def open_blob(self, digest: str, offset: int = 0) -> IO[bytes]:
        """A blob's bytes from offset on, as a stream that fetches on from where it broke off."""
        return io.BufferedReader(_BlobStream(self, digest, offset), 1 << 20)

    def has_blob(self, digest: str) -> bool:
        path = f"/v2/{self.reference.repository}/blobs/{digest}"
        return self.send("HEAD", path, ok=(200, 404)).status_code == 200

    def start_upload(self, digest: str, mount_from: str | None = None) -> str | None:
        """An upload's location, or None if the registry mounted the blob from mount_from (a
        repository of the same registry that has it) instead."""
        path = f"/v2/{self.reference.repository}/blobs/uploads/"
        params = {"mount": digest, "from": mount_from} if mount_from else None
        response = self.send("POST", path, params=params, ok=(201, 202))
        return None if response.status_code == 201 else self._location(response)

    def upload(self, location: str, digest: str, size: int, read: Callable[[int], bytes]) -> None:
        """Send a blob to an upload location: one PUT if it is small, else PATCH chunks, then PUT."""
        if size <= CHUNK:
            self.send("PUT", location, params={"digest": digest}, content=read(size), ok=(201,),
                      headers={"Content-Type": "application/octet-stream"})  # fmt: skip
            return
        sent = 0
        while sent < size:
            chunk = read(min(CHUNK, size - sent))
            headers = {"Content-Type": "application/octet-stream",
                       "Content-Range": f"{sent}-{sent + len(chunk) - 1}"}  # fmt: skip
            location = self._location(self.send("PATCH", location, content=chunk, headers=headers, ok=(202,)))
            sent += len(chunk)
        self.send("PUT", location, params={"digest": digest}, ok=(201,))

    def put_manifest(self, tag: str, data: bytes, media_type: str) -> str:
        """Upload a manifest under tag; returns the digest the registry gives it."""
        path = f"/v2/{self.reference.repository}/manifests/{tag}"
        response = self.send("PUT", path, content=data, headers={"Content-Type": media_type}, ok=(201,))
        return response.headers.get("Docker-Content-Digest", "")

    def check_login(self) -> None:
        """Whether the registry takes the credentials (RegistryError if not): /v2/ with them, asking
        a token service for no repository in particular, as docker login does."""
        self.scopes = []
        self.send("GET", "/v2/")

    # -- requests, retries and authentication

    def send(
        self,
        method: str,
        path: str,
        *,
        headers: dict[str, str] | None = None,
        params: dict[str, str] | None = None,
        content: bytes | None = None,
        ok: tuple[int, ...] = (200,),
        stream: bool = False,
    ) -> httpx.Response:
        """The registry's answer (one of `ok`), after retries and authentication; RegistryError if not."""
        if not self.base:
            self._hello()
        url = httpx.URL(path if path.startswith(("http://", "https://")) else self.base + path)
        url = url.copy_merge_params(params or {})  # an upload's Location carries its own query
        authenticated = False
        for pause in (*BACKOFF, None):
            request = self.http.build_request(method, url, headers=self._headers(headers), content=content)
            try:
                response = self.http.send(request, stream=stream)
            except httpx.TransportError as error:
                if pause is None or isinstance(_innermost(error), ssl.SSLError):  # TLS failures are for good
                    raise RegistryError(
                        f"{self.reference}: {self.host} cannot be reached: {_cause(error)}"
                    ) from None
                time.sleep(pause)
                continue
            if response.status_code in ok:
                return response
            if stream:
                response.read()
            if response.status_code == 401 and not authenticated:
                authenticated = True
                self._authenticate(response)
                continue
            retry_after = _retry_after(response)
            transient = response.status_code >= 500 or response.status_code == 429
            if transient and pause is not None and (retry_after or 0.0) <= MAX_RETRY_AFTER:
                time.sleep(max(pause, retry_after or 0.0))
                continue
            raise RegistryError(self._refusal(method, path, response))
        raise AssertionError("unreachable")

    def _hello(self) -> None:
        """Find the scheme (and the challenge) at /v2/: HTTPS, or plain HTTP where that is allowed
        and the registry does not speak TLS."""
        plain = is_loopback(self.reference.registry) or self.reference.registry in self.options.insecure
        for scheme in ("https", "http") if plain else ("https",):
            self.base = f"{scheme}://{self.host}"
            try:
                self.send("GET", "/v2/", ok=(200,))
                return
            except RegistryError as error:
                if scheme == "https" and plain and _speaks_plain_http(error):
                    continue
                self.base = ""
                raise
        self.base = ""

    def _headers(self, extra: dict[str, str] | None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.authorization:
            headers["Authorization"] = self.authorization
        return headers

    def _authenticate(self, response: httpx.Response) -> None:
        """Answer a 401's challenge: basic credentials, or a bearer token from the challenge's realm."""
        header = response.headers.get("WWW-Authenticate", "")
        scheme, _, rest = header.partition(" ")
        credentials = self.options.credentials(self.reference.registry)
        if scheme.lower() == "basic":
            if credentials is None:
                raise RegistryError(self._refusal("GET", "/v2/", response))
            self.authorization = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
            return
        if scheme.lower() != "bearer":
            raise RegistryError(
                f"{self.reference}: {self.host} asks for {scheme or 'an unknown'} authentication, "
                "which cgctl does not speak (basic and bearer tokens only)"
            )
        challenge = dict(CHALLENGE.findall(rest))
        scopes = [*self.scopes, *([challenge["scope"]] if "scope" in challenge else [])]
        params: list[tuple[str, str | int | float | bool | None]] = [
            ("scope", scope) for scope in dict.fromkeys(scopes)
        ]
        if "service" in challenge:
            params.append(("service", challenge["service"]))
        auth = httpx.BasicAuth(*credentials) if credentials else None
        try:
            answer = self.http.get(challenge.get("realm", ""), params=params, auth=auth)
        except httpx.HTTPError as error:
            raise RegistryError(f"{self.reference}: the token service {challenge.get('realm')!r} cannot be "
                                f"reached: {_cause(error)}") from None  # fmt: skip
        if answer.status_code != 200:
            raise RegistryError(self._refusal("GET", "token", answer))
        body = answer.json()
        self.authorization = f"Bearer {body.get('token') or body.get('access_token')}"

    def _location(self, response: httpx.Response) -> str:
        location = response.headers.get("Location")
        if not location:
            raise RegistryError(f"{self.reference}: {self.host} started an upload without a Location")
        return str(response.url.join(location))

    def _refusal(self, method: str, path: str, response: httpx.Response) -> str:
        """What the registry said, for a human: the reference, the status, the registry's own reason
        and the fix."""
        status = response.status_code
        reason = _registry_message(response)
        where = f"{self.reference}: {self.host} answered {status} {response.reason_phrase}"
        where += f" ({reason})" if reason else ""
        if status == 401:
            has = self.options.credentials(self.reference.registry) is not None
            fix = (
                "the user name or password is wrong"
                if has
                else "log in first: cgctl login " + self.reference.registry
            )
            return f"{where}: {fix}"
        if status == 403:
            action = "push to" if "push" in self.scopes[0] else "pull from"
            return f"{where}: the account may not {action} this repository"
        if status == 404:
            return f"{where}: no such repository, tag or digest there"
        if status == 429:
            return f"{where}: too many requests; try again later"
        return f"{where} to {method} {path.split('?')[0]}"


class _BlobStream(io.RawIOBase):
    """A blob's body from an offset, re-requested from where it stopped if the connection breaks."""

    def __init__(self, client: Client, digest: str, offset: int) -> None:
        self.client, self.digest, self.position = client, digest, offset
        self.response: httpx.Response | None = None
        self.chunks: Iterator[bytes] = iter(())
        self.pending = b""
        self.breaks = 0

    def readable(self) -> bool:
        return True

    def _open(self) -> None:
        headers = {"Range": f"bytes={self.position}-"} if self.position else None
        path = f"/v2/{self.client.reference.repository}/blobs/{self.digest}"
        self.response = self.client.send("GET", path, headers=headers, ok=(200, 206, 416), stream=True)
        if self.response.status_code == 416:  # nothing after offset: the kept part was all of it
            self.chunks = iter(())
            return
        self.chunks = self.response.iter_raw(1 << 20)
        if self.position and self.response.status_code == 200:  # no Range support: skip what we have
            skip = self.position
            while skip > 0:
                chunk = next(self.chunks, b"")
                if not chunk:
                    break
                if len(chunk) > skip:
                    self.pending = chunk[skip:]
                skip -= len(chunk)

    def readinto(self, buffer: Any) -> int:
        while not self.pending:
            if self.response is None:
                self._open()
            try:
                chunk = next(self.chunks, None)
            except httpx.TransportError as error:
                self._close_response()
                self.breaks += 1
                if self.breaks > len(BACKOFF):
                    raise RegistryError(f"{self.client.reference}: the blob {self.digest} broke off at byte "
                                        f"{self.position}: {_cause(error)}") from None  # fmt: skip
                time.sleep(BACKOFF[self.breaks - 1])
                continue
            if chunk is None:
                return 0
            self.pending = chunk
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        self.position += size
        return size

    def _close_response(self) -> None:
        if self.response is not None:
            self.response.close()
        self.response = None

    def close(self) -> None:
        self._close_response()
        super().close()


def _speaks_plain_http(error: RegistryError) -> bool:
    """Whether a TLS handshake failed because the other end speaks plain HTTP (not because its
    certificate is not trusted: that must never fall back)."""
    text = str(error)
    return "CERTIFICATE_VERIFY_FAILED" not in text and any(
        sign in text
        for sign in (
            "WRONG_VERSION_NUMBER",
            "wrong version number",
            "record layer failure",
            "packet length too long",
            "http request",
        )
    )


def _cause(error: Exception) -> str:
    """The innermost reason of a transport error (the SSL or socket error under httpx's)."""
    inner = _innermost(error)
    return str(inner) or type(inner).__name__


def _innermost(error: BaseException) -> BaseException:
    while error.__context__ is not None and not isinstance(error, (ssl.SSLError, OSError)):
        error = error.__context__
    return error


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


def _registry_message(response: httpx.Response) -> str:
    """The registry's own reason from its errors body (codes and messages, never headers)."""
    try:
        errors = response.json().get("errors") or []
        return "; ".join(str(e.get("message") or e.get("code")) for e in errors if isinstance(e, dict))[:300]
    except (ValueError, AttributeError):
        return ""
