"""The caller's side of a workload's terminal: raw mode while attached, the window size followed, and
the detach keys.

One pump for every path: a foreground `cgctl run -it` relays the pty's master it holds, and a run,
`attach` or `exec` through the daemon relays a WebSocket; both give `pump` what to do with the
caller's keystrokes and window size, and a pipe that says when the output has ended.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import termios
import threading
import tty
from collections.abc import Callable, Iterator

from cgctl.ns import console

DEFAULT_DETACH_KEYS = "ctrl-p,ctrl-q"  # docker's
# Attach and exec streams (keeper to daemon, daemon to client: docs/api.md): one message per chunk,
# its first byte says what it is.
STDIN, STDOUT, STDERR, RESIZE, STDIN_CLOSED, EXITED = b"0", b"1", b"2", b"r", b"e", b"x"


class DetachKeysError(ValueError):
    pass


def parse_detach_keys(text: str) -> bytes:
    """docker's --detach-keys: comma-separated `ctrl-X` (X a letter or one of @[\\]^_) or single
    characters; "" turns detaching off."""
    keys = bytearray()
    for part in filter(None, text.split(",")):
        if part.lower().startswith("ctrl-") and len(part) == 6:
            code = ord(part[5].upper()) - 64
            if not 0 <= code < 32:
                raise DetachKeysError(
                    f"{part!r} is not a control key (ctrl-a..ctrl-z, ctrl-@, ctrl-[ ... ctrl-_)"
                )
            keys.append(code)
        elif len(part) == 1 and part.isascii():
            keys += part.encode()
        else:
            raise DetachKeysError(f"{part!r} is neither ctrl-X nor a single character")
    return bytes(keys)


class _DetachWatch:
    """Finds the detach sequence in the keystrokes, across reads; keys held back while they might
    start it are sent on as soon as they turn out not to."""

    def __init__(self, keys: bytes) -> None:
        self.keys = keys
        self.held = b""

    def feed(self, data: bytes) -> tuple[bytes, bool]:
        """(what to send on, whether the sequence was typed)."""
        if not self.keys:
            return data, False
        out = bytearray()
        for byte in data:
            self.held += bytes([byte])
            if self.held == self.keys:
                return bytes(out), True
            if not self.keys.startswith(self.held):
                out += self.held
                self.held = b""
        return bytes(out), False


def is_terminal(fd: int) -> bool:
    return os.isatty(fd)


def size(fd: int = 1) -> tuple[int, int]:
    """The caller's window as (rows, columns); console.UNKNOWN_SIZE when fd is not a terminal."""
    try:
        return console.get_size(fd)
    except OSError:
        return console.UNKNOWN_SIZE


@contextlib.contextmanager
def raw(fd: int = 0) -> Iterator[None]:
    """The caller's terminal in raw mode (keys go to the workload as typed: Ctrl-C is a byte for its
    terminal, not a signal for cgctl), and back as it was on every way out."""
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def pump(
    finished: int,
    send: Callable[[bytes], None] | None,
    close_input: Callable[[], None] | None = None,
    resize: Callable[[tuple[int, int]], None] | None = None,
    detach_keys: bytes = b"",
) -> bool:
    """Feed the caller's stdin to `send` (None: stdin is not read), and its window size to `resize`
    now and on every SIGWINCH, until `finished` is readable (the output has ended) or the detach
    keys are typed. At stdin's end, close_input is called and stdin is no longer read.
    Returns whether the caller detached. Must run in the main thread (SIGWINCH)."""
    wake_r, wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    previous = None
    if resize is not None:
        previous = signal.signal(signal.SIGWINCH, lambda *_: _poke(wake_w))
        resize(size())
    watch = _DetachWatch(detach_keys)
    reading = send is not None
    try:
        while True:
            ready = select.select([finished, wake_r, *([0] if reading else [])], [], [])[0]
            if finished in ready:
                return False
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 64)
                if resize is not None:
                    resize(size())
            if 0 in ready and send is not None:
                try:
                    data = os.read(0, 65536)
                except OSError:  # EIO: our terminal was hung up
                    data = b""
                if not data:
                    reading = False
                    if close_input is not None:
                        close_input()
                    continue
                data, detached = watch.feed(data)
                if data:
                    send(data)
                if detached:
                    return True
    finally:
        if previous is not None:
            signal.signal(signal.SIGWINCH, previous)
        os.close(wake_r)
        os.close(wake_w)


def _poke(fd: int) -> None:
    with contextlib.suppress(BlockingIOError):
        os.write(fd, b"!")


class Output(threading.Thread):
    """Copies a pty's master to the caller's stdout until the workload's side is closed (EIO) or
    stop() is called, after which what is already buffered is still copied. `ended` (a pipe's read
    end) becomes readable when it is done: pump's `finished`."""

    def __init__(self, master: int, out: int = 1) -> None:
        super().__init__(name="terminal-output", daemon=True)
        self.master, self.out = master, out
        self.ended, self._ended_w = os.pipe2(os.O_CLOEXEC)
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)

    def run(self) -> None:
        try:
            while select.select([self.master, self._stop_r], [], [])[0] != [self._stop_r] and self._copy():
                pass
            os.set_blocking(self.master, False)
            while self._copy():  # what the workload wrote before it ended
                pass
        finally:
            os.close(self._ended_w)

    def _copy(self) -> bool:
        try:
            data = os.read(self.master, 65536)
        except (BlockingIOError, OSError):  # EIO: no process has the slave open any more
            return False
        if data:
            write_all(self.out, data)
        return bool(data)

    def stop(self, timeout: float = 5.0) -> None:
        os.write(self._stop_w, b"!")
        self.join(timeout)
        os.close(self._stop_r)
        os.close(self._stop_w)


def write_all(fd: int, data: bytes) -> None:
    """All of data to fd, or as much as it takes before it is gone (a closed pipe, a hung-up terminal)."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except OSError:
            return


def hang_up(master: int) -> None:
    """Hang up the workload's terminal, as the kernel does when a terminal goes away: the master is
    closed (the fd now reads /dev/null's EOF, so that nothing else reuses its number meanwhile), the
    slave's readers get EOF and its session SIGHUP."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    os.dup2(null, master)
    os.close(null)


def relay_until_exit(master: int, interactive: bool, wait: Callable[[], int]) -> int:
    """A pty's master held here (`run -t`, `exec -t` without a daemon): its output to our stdout, and
    with `interactive` our keystrokes (the terminal in raw mode) and window size to it, until `wait`
    returns (the process has ended); what it returned. The master is closed."""
    output = Output(master)
    waited: list[int] = []

    def waiter() -> None:
        waited.append(wait())
        output.stop()  # what it wrote is copied; then `ended` says the output is done

    thread = threading.Thread(target=waiter, name="workload-wait", daemon=True)
    keys = raw() if interactive and is_terminal(0) else contextlib.nullcontext()
    try:
        with keys:  # before any output: what our terminal answers to it must not be echoed here
            output.start()
            thread.start()
            pump(
                output.ended,
                (lambda data: write_all(master, data)) if interactive else None,
                resize=lambda size: console.set_size(master, size),
            )
        thread.join()
    finally:
        os.close(output.ended)
        os.close(master)
    return waited[0]
