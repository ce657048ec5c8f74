"""The daemon's streams of one container: attach and exec, through the keeper (keeper.py's stream
protocol: the daemon hands it one end of a socket pair), and its logs, read and followed."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from cgctl.daemon.keeper import KeeperClient
from cgctl.daemon.managed import Managed
from cgctl.ns import console
from cgctl.runtime import logs
from cgctl.runtime.api import Conflict, NotFound
from cgctl.runtime.spawn import SpawnError
from cgctl.spec import ExecSpec


def attach(keeper: KeeperClient, managed: Managed, replay: bool) -> tuple[socket.socket, dict[str, Any]]:
    """The container's output from now (with replay, its terminal's latest 64 KiB first), and back to
    it keystrokes and window size. Returns the stream with {"tty": ..., "stdin": ...}."""
    name, state = managed.info.name, managed.info.state
    if state not in ("running", "frozen"):
        raise Conflict(f"{name} is {state}, not running: attach needs a running container")
    return _open(keeper, {"op": "attach", "name": name, "replay": replay})


def exec(
    keeper: KeeperClient, state_dir: Path, name: str, spec: ExecSpec, size: tuple[int, int] | None
) -> tuple[socket.socket, dict[str, Any]]:
    """Start spec's process in the running container, as the keeper's child (so the daemon's
    threads need not reap it), and return the stream of its output and then its status."""
    from cgctl.runtime import exec as execution

    try:
        target = execution.prepare(state_dir, name, spec)
    except LookupError as error:
        raise NotFound(str(error)) from None
    terminal = (size or console.UNKNOWN_SIZE) if spec.tty else None
    message = {"op": "exec", "name": name, "target": target, "terminal": terminal}
    return _open(keeper, {**message, "tty": spec.tty, "interactive": spec.interactive})


def _open(keeper: KeeperClient, message: dict[str, Any]) -> tuple[socket.socket, dict[str, Any]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        reply = keeper.request(message, fds=(theirs.fileno(),))
    except ConnectionError:
        reply = {"ok": False, "error": "the keeper is gone", "exit_code": 125}
    finally:
        theirs.close()
    if not reply["ok"]:
        ours.close()
        if message["op"] == "exec":
            raise SpawnError(reply["error"], reply.get("exit_code", 125))
        raise Conflict(reply["error"])
    return ours, reply


def log_lines(
    managed: Managed,
    ended: Callable[[], bool],
    tail: int | None,
    since: datetime | None,
    follow: bool,
    streams: frozenset[str],
) -> Iterator[logs.LogLine]:
    """Its log's lines; following, new ones as they come until `ended` says the container is done."""
    # Following starts before the past is read, so nothing written in between is missed; what
    # both see is skipped by time.
    new = logs.follow(managed.log_path, since=since, streams=streams, stop=ended) if follow else iter(())
    past = logs.read(managed.log_path, tail=tail, since=since, streams=streams)
    yield from past
    seen = past[-1].time if past else None
    yield from (line for line in new if seen is None or line.time > seen)
