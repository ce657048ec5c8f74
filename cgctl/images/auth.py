"""Registry credentials: `cgctl login`'s file, in the format of docker's config.json, and docker's own.

`cgctl login` writes `$XDG_CONFIG_HOME/cgctl/auth.json` (or `$CGCTL_AUTH_FILE`),
0600 in a 0700 directory; lookups read it, then `~/.docker/config.json` (or
`$DOCKER_CONFIG/config.json`), so a user's existing `docker login` works as is.
Passwords are never printed: errors name the file and the registry only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

from cgctl import durable

DOCKER_HUB_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io")


def auth_file() -> Path:
    if explicit := os.environ.get("CGCTL_AUTH_FILE"):
        return Path(explicit)
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return Path(config) / "cgctl" / "auth.json"


def docker_file() -> Path:
    return Path(os.environ.get("DOCKER_CONFIG") or os.path.expanduser("~/.docker")) / "config.json"


def lookup(registry: str) -> tuple[str, str] | None:
    """The (user, password) stored for registry, from cgctl's file first, then docker's."""
    keys = (
        DOCKER_HUB_KEYS
        if registry in DOCKER_HUB_KEYS
        else (registry, f"https://{registry}", f"http://{registry}")
    )
    for path in (auth_file(), docker_file()):
        auths = _auths(path)
        for key in keys:
            if auths.get(key):  # docker leaves {} for registries whose secret is in a credsStore
                return _credentials(path, registry, auths[key])
    return None


def save(registry: str, user: str, password: str) -> Path:
    """Store credentials for registry (0600, atomically); returns the file."""
    path = auth_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    document = _document(path)
    document.setdefault("auths", {})[registry] = {
        "auth": base64.b64encode(f"{user}:{password}".encode()).decode()
    }
    durable.write_json(path, document, mode=0o600)
    os.chmod(path, 0o600)
    return path


def remove(registry: str) -> bool:
    """Forget registry's credentials in cgctl's file; False if there were none."""
    path = auth_file()
    document = _document(path)
    if registry not in document.get("auths", {}):
        return False
    del document["auths"][registry]
    durable.write_json(path, document, mode=0o600)
    return True


def _document(path: Path) -> dict[str, Any]:
    try:
        document = json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return {}
    except PermissionError:  # another user's file (HOME=/root for another user): none of ours
        return {}
    except (OSError, ValueError) as error:
        raise ValueError(f'{path}: not a readable credentials file (JSON with "auths"): {error}') from None
    if not isinstance(document, dict) or not isinstance(document.get("auths", {}), dict):
        raise ValueError(f'{path}: not a credentials file: "auths" must map registries to entries')
    return document


def _auths(path: Path) -> dict[str, Any]:
    return dict(_document(path).get("auths", {}))


def _credentials(path: Path, registry: str, entry: Any) -> tuple[str, str]:
    """An entry's user and password: its "auth" (base64 of USER:PASSWORD) or "username"/"password"."""
    if isinstance(entry, dict) and isinstance(entry.get("auth"), str):
        try:
            user, separator, password = base64.b64decode(entry["auth"], validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            separator = ""
        if separator:
            return user, password
    if (
        isinstance(entry, dict)
        and isinstance(entry.get("username"), str)
        and isinstance(entry.get("password"), str)
    ):
        return entry["username"], entry["password"]
    raise ValueError(
        f'{path}: the entry for {registry} has neither an "auth" of base64 USER:PASSWORD nor a username '
        f"and password (log in again: cgctl login {registry})"
    )
