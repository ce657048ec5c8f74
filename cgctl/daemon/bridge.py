"""Keeper streams (attach, exec) bridged to the API's WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from collections.abc import Callable
from typing import Any

from fastapi import WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from cgctl.daemon import keeper
from cgctl.daemon.errors import problem
from cgctl.runtime import terminal


async def bridge(
    websocket: WebSocket, open_stream: Callable[[], tuple[socket.socket, dict[str, Any]]]
) -> None:
    """Bridge a keeper stream (keeper.py: one SOCK_SEQPACKET message per chunk, tagged by its first
    byte) and an accepted WebSocket: first a JSON text message, {"tty": ..., "stdin": ...} or the
    error; then each chunk from the keeper as a binary message, and the client's binary messages
    (only keystrokes, window sizes and the end of its input) back; until either side ends."""
    try:
        stream, hello = await run_in_threadpool(open_stream)
    except Exception as error:
        await refuse(websocket, error)
        return
    loop = asyncio.get_running_loop()
    stream.setblocking(False)

    async def outward() -> None:
        while data := await loop.sock_recv(stream, keeper.MESSAGE_LIMIT):
            await websocket.send_bytes(data)

    async def inward() -> None:
        """Until the client goes. Input the keeper no longer takes (the process ended, the keeper
        closed its end) is dropped: ending here would cancel `outward` before it passed on the exit
        status already waiting in the stream."""
        taking = True
        while True:
            message = await websocket.receive()
            data = message.get("bytes") or b""
            if message["type"] == "websocket.disconnect":
                return
            try:
                if taking and data[:1] == terminal.STDIN:
                    for start in range(1, len(data), keeper.READ_SIZE):
                        chunk = terminal.STDIN + data[start : start + keeper.READ_SIZE]
                        await loop.sock_sendall(stream, chunk)
                elif taking and data[:1] in (terminal.RESIZE, terminal.STDIN_CLOSED) and len(data) < 64:
                    await loop.sock_sendall(stream, data)
            except OSError:
                taking = False

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


async def refuse(websocket: WebSocket, error: Exception) -> None:
    """End a stream before it began, with the error as a request would have had it (an unexpected
    one is a 500 and logged, as uvicorn logs a request's)."""
    try:
        status, message, exit_code = problem(error)
    except Exception:
        logging.getLogger("cgctl.daemon").exception("a stream failed")
        status, message, exit_code = 500, f"internal error: {type(error).__name__}: {error}", 125
    with contextlib.suppress(RuntimeError, WebSocketDisconnect):
        await websocket.send_text(json.dumps({"ok": False, "status": status, "message": message,
                                              "exit_code": exit_code}))  # fmt: skip
        await websocket.close()
