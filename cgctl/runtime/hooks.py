"""OCI hooks: programs config.json names, run at fixed points of a container's life with its state on
stdin (the runtime specification's "Lifecycle"), each within its timeout.

A failing prestart, createRuntime or poststart hook fails the operation (the caller tears the
container down); a failing poststop hook is only reported, as the container is gone already.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any, Protocol


class HookError(Exception):
    """A hook failed or ran out of time; the message names it."""


class Hook(Protocol):
    path: str
    args: list[str]
    env: list[str]
    timeout: int | None


def run(kind: str, hooks: list[Hook], state: dict[str, Any]) -> None:
    """Run each hook of `kind` in order, with state (the container's OCI state) as JSON on its stdin."""
    payload = json.dumps(state).encode()
    for index, hook in enumerate(hooks):
        where = f"hooks.{kind}[{index}] ({hook.path})"
        env = dict(entry.partition("=")[::2] for entry in hook.env)
        try:
            done = subprocess.run(
                hook.args,
                executable=hook.path,
                input=payload,
                env=env,
                capture_output=True,
                timeout=hook.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise HookError(f"{where}: did not finish within its timeout of {hook.timeout}s") from None
        except OSError as error:
            raise HookError(f"{where}: cannot run it: {error.strerror}") from None
        if done.returncode != 0:
            said = done.stderr.decode(errors="replace").strip()
            raise HookError(f"{where}: exited with status {done.returncode}" + (f": {said}" if said else ""))
