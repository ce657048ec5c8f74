"""Our terminal to a serial port's unix socket, as `telnet` or `virsh console` do: raw mode, bytes
both ways, Ctrl-] to leave. Without a terminal (a pipe), it copies until either side ends."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import sys
import termios
import tty
from pathlib import Path

ESCAPE = b"\x1d"  # Ctrl-]


def attach(path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as port:
        port.connect(str(path))
        interactive = os.isatty(0)
        if interactive:
            print(
                "connected to the machine's shell; Ctrl-] leaves (the shell keeps running)", file=sys.stderr
            )
        saved = termios.tcgetattr(0) if interactive else None
        with contextlib.ExitStack() as restore:
            if saved is not None:
                tty.setraw(0)
                restore.callback(termios.tcsetattr, 0, termios.TCSADRAIN, saved)
            port.sendall(b"\n")  # a prompt, for a shell that sat waiting
            _copy(port, interactive)


def _copy(port: socket.socket, interactive: bool) -> None:
    with selectors.DefaultSelector() as ready:
        ready.register(0, selectors.EVENT_READ)
        ready.register(port, selectors.EVENT_READ)
        while True:
            for key, _ in ready.select():
                if key.fileobj == 0:
                    data = os.read(0, 4096)
                    if not data or (interactive and ESCAPE in data):
                        if data:
                            port.sendall(data.split(ESCAPE)[0])
                        return
                    port.sendall(data)
                else:
                    data = port.recv(4096)
                    if not data:
                        return
                    os.write(1, data)
