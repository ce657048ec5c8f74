"""Image references as docker spells them: `[DOMAIN[:PORT]/]PATH[:TAG][@sha256:HEX]`.

The first component of a path is a registry's domain when it has a '.' or a ':'
or is `localhost`; otherwise the image is on the default registry, docker.io,
where one-component names live under `library/`. The store names images the
way docker shows them (`busybox`, `team/app`, `127.0.0.1:5000/team/app`), so
`cgctl pull busybox` and `cgctl run --image busybox` mean the same image.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

DEFAULT_DOMAIN = "docker.io"
DEFAULT_API_HOST = "registry-1.docker.io"  # where docker.io's API answers
COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
PATH = re.compile(rf"^{COMPONENT}(?:/{COMPONENT})*$")
DOMAIN = re.compile(
    r"^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?\.?)+(?::[0-9]{1,5})?$|^\[[0-9a-fA-F:]+\](?::[0-9]{1,5})?$"
)
TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


@dataclass(frozen=True)
class Reference:
    domain: str | None  # None: the default registry
    path: str  # as given: "busybox", "team/app"
    tag: str | None = None
    digest: str | None = None

    @property
    def registry(self) -> str:
        """The registry's domain (with its port)."""
        return self.domain or DEFAULT_DOMAIN

    @property
    def repository(self) -> str:
        """The repository's name in the registry's API."""
        if self.registry == DEFAULT_DOMAIN and "/" not in self.path:
            return f"library/{self.path}"
        return self.path

    @property
    def name(self) -> str:
        """The name the store keeps it under: docker's short form for docker.io."""
        if self.registry == DEFAULT_DOMAIN:
            return self.path.removeprefix("library/")
        return f"{self.domain}/{self.path}"

    @property
    def store_tag(self) -> str:
        """The tag the store keeps it under: its own, "latest", or one made from its digest."""
        if self.tag:
            return self.tag
        return f"sha256-{self.digest.removeprefix('sha256:')}" if self.digest else "latest"

    def __str__(self) -> str:
        """The full reference: registry, repository, tag (latest unless only a digest is given), digest."""
        text = f"{self.registry}/{self.repository}"
        if self.tag or not self.digest:
            text += f":{self.tag or 'latest'}"
        return text + (f"@{self.digest}" if self.digest else "")


def parse(text: str) -> Reference:
    """The reference text names; ValueError saying what is wrong with it."""
    rest, _, digest = text.partition("@")
    if digest and not DIGEST.match(digest):
        raise ValueError(f"{text!r}: {digest!r} is not a digest (sha256: and 64 lowercase hex digits)")
    tag = None
    slash, colon = rest.rfind("/"), rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not TAG.match(tag):
            raise ValueError(f"{text!r}: {tag!r} is not a tag (letters, digits, '_', '.', '-'; at most 128)")
    first, _, remainder = rest.partition("/")
    domain = None
    if remainder and ("." in first or ":" in first or first == "localhost"):
        if not DOMAIN.match(first):
            raise ValueError(f"{text!r}: {first!r} is not a registry's domain (HOST or HOST:PORT)")
        domain, rest = first, remainder
    if not PATH.match(rest) or len(rest) > 255:
        raise ValueError(
            f"{text!r}: not an image name ([REGISTRY/]NAME[:TAG][@DIGEST]; a NAME is lowercase letters, "
            "digits and '.', '_', '-' between them, in components separated by '/')"
        )
    return Reference(domain, rest, tag, digest or None)


def is_loopback(domain: str) -> bool:
    """Whether the registry is on this machine (docker lets those speak plain HTTP)."""
    host = domain
    if domain.startswith("["):
        host = domain[1 : domain.index("]")]
    elif domain.count(":") == 1:
        host = domain.split(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
