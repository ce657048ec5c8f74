"""The daemon's image verbs, on its own image store, with the image layer's errors mapped to the
API's: a bad reference or image 400, a missing one 404, a registry that refused or cannot be
reached 502."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cgctl.runtime.api import (
    BadGateway,
    CommitRequest,
    Conflict,
    Container,
    EventType,
    ImportRequest,
    Invalid,
    NotFound,
    PullRequest,
    PushRequest,
    PushResult,
    SaveRequest,
)
from cgctl.runtime.local import registry_options


class Images:
    """The image verbs; `containers` lists the daemon's containers (an image in use is not removed),
    `inspect` finds one (a commit's), `emit` tells the event feed."""

    def __init__(
        self,
        emit: Callable[[EventType, str, dict[str, str]], None],
        containers: Callable[[], list[Container]],
        inspect: Callable[[str], Container],
    ) -> None:
        self.emit, self.containers, self.inspect = emit, containers, inspect

    def records(self) -> list[dict[str, Any]]:
        """The image records, with where their layers are on this host (what a client's spec names)."""
        from cgctl.images import Store, default_root

        store = Store(default_root())
        return [
            {**record, "layer_dirs": [str(store.layer(diff_id)) for diff_id in record["layers"]]}
            for record in store.images()
        ]

    def import_image(self, request: ImportRequest) -> dict[str, Any]:
        from cgctl.images import ImageError, LayerError, Store, default_root, import_image

        try:
            return import_image(Path(request.path), request.reference, Store(default_root()))
        except ValueError as error:
            raise Invalid(f"invalid value {request.reference!r} for reference: {error}") from None
        except (ImageError, LayerError, OSError) as error:
            raise Invalid(f"{request.path}: not imported: {error}") from None

    def pull(self, request: PullRequest) -> dict[str, Any]:
        """Pull an image into the daemon's store (credentials: the request's, else the daemon's own)."""
        from cgctl.images import Store, default_root
        from cgctl.images.pull import pull

        with _image_errors(request.reference):
            record = pull(request.reference, Store(default_root()), registry_options(request))
        self.emit("pull", request.reference, {"image": f"{record['name']}:{record['tag']}"})
        return record

    def push(self, request: PushRequest) -> PushResult:
        from cgctl.images import Store, default_root
        from cgctl.images.push import push

        with _image_errors(request.source):
            pushed = push(
                request.source, request.destination, Store(default_root()), registry_options(request)
            )
        self.emit("push", request.source, {"destination": pushed.reference, "digest": pushed.digest})
        return PushResult(**dataclasses.asdict(pushed))

    def save(self, request: SaveRequest) -> dict[str, Any]:
        from cgctl.images import Store, default_root
        from cgctl.images.save import save

        with _image_errors(request.reference):
            size = save(request.reference, Store(default_root()), Path(request.path))
        return {"path": request.path, "size": size}

    def commit(self, name: str, request: CommitRequest) -> dict[str, Any]:
        """A new image: the container's image plus its writes (runtime/commit.py)."""
        from cgctl.runtime.commit import commit

        container = self.inspect(name)
        with _image_errors(request.reference):
            record = commit(container, request.reference, request.message)
        self.emit("commit", name, {"image": f"{record['name']}:{record['tag']}"})
        return record

    def remove(self, reference: str) -> list[str]:
        """Remove an image and the layers no other image uses; refused while a container runs it."""
        from cgctl.images import Store, default_root, parse_reference

        try:
            name, tag = parse_reference(reference)
        except ValueError as error:
            raise Invalid(f"invalid value {reference!r} for reference: {error}") from None
        users = [c.name for c in self.containers() if c.image == f"{name}:{tag}"]
        if users:
            raise Conflict(f"{name}:{tag} is in use by the running container {users[0]}: stop it first")
        try:
            return Store(default_root()).remove(reference)
        except LookupError as error:
            raise NotFound(str(error)) from None


@contextlib.contextmanager
def _image_errors(reference: str) -> Iterator[None]:
    """The image layer's errors as the API's (see the module's docstring)."""
    from cgctl.images import ImageError, LayerError
    from cgctl.images.registry import RegistryError

    try:
        yield
    except ValueError as error:
        raise Invalid(f"invalid value {reference!r} for reference: {error}") from None
    except LookupError as error:
        raise NotFound(str(error)) from None
    except RegistryError as error:
        raise BadGateway(str(error)) from None
    except (ImageError, LayerError, OSError) as error:
        raise Invalid(f"{reference}: {error}") from None
