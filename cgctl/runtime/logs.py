"""Container logs: the keeper appends a detached container's output here; `cgctl logs` reads it back.

One file per container in the CRI (Kubernetes) log format, one record per line:

    2026-11-28T17:02:09.669794000Z stdout F hello world

`F` is a full line (its newline is not stored), `P` a piece of one: a line longer than max_line
bytes, or output without a final newline when its pipe closes. Content is stored as the bytes
came and decoded (with replacement characters) only when read. The file is rotated by size,
path -> path.1 -> path.2 ..., so a follower that holds the old file open reads it to its end
and then goes on with the new one.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from io import FileIO
from pathlib import Path
from typing import Any

from inotify_simple import INotify, flags

STREAMS = frozenset({"stdout", "stderr"})
_BLOCK = 65536
_TIME = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")


@dataclass(frozen=True)
class LogLine:
    """A record as read back: text is decoded with replacement characters for bytes that are not UTF-8."""

    time: datetime
    stream: str
    partial: bool
    text: str

    def to_json(self) -> dict[str, object]:
        return {"time": _stamp(self.time), "stream": self.stream, "partial": self.partial, "text": self.text}

    @classmethod
    def from_json(cls, item: dict[str, Any]) -> LogLine:
        """Back from to_json (the API's logs stream)."""
        when = datetime.fromisoformat(str(item["time"])[:26].rstrip("Z") + "+00:00")
        return cls(when, str(item["stream"]), bool(item["partial"]), str(item["text"]))


class LogWriter:
    """Appends one container's stdout and stderr to path, rotating by size.

    Called from the keeper's select loop: it buffers an unfinished line in memory and never waits
    for anything but the disk.
    """

    def __init__(
        self, path: Path, max_bytes: int = 10 * 2**20, max_files: int = 3, max_line: int = 16384
    ) -> None:
        if max_files < 1 or max_line < 1:
            raise ValueError("max_files and max_line must be at least 1")
        self.path = path
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.max_line = max_line
        self._pending = dict.fromkeys(STREAMS, b"")
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._fd = self._open()
        self._size = os.fstat(self._fd).st_size

    def feed(self, stream: str, data: bytes, now: datetime | None = None) -> None:
        """Record what a stream's pipe gave: its complete lines now, the rest when it is complete."""
        stamp = _stamp(now or datetime.now(UTC))
        data = self._pending[stream] + data
        start = 0
        while True:
            newline = data.find(b"\n", start, start + self.max_line + 1)
            if newline >= 0:
                self._append(stamp, stream, b"F", data[start:newline])
                start = newline + 1
            elif len(data) - start > self.max_line:
                cut = _cut(data, start, self.max_line)
                self._append(stamp, stream, b"P", data[start:cut])
                start = cut
            else:
                break
        self._pending[stream] = data[start:]

    def flush_partial(self, stream: str) -> None:
        """Record a stream's unfinished line as it is (its pipe is at EOF, the newline will not come)."""
        if self._pending[stream]:
            self._append(_stamp(datetime.now(UTC)), stream, b"P", self._pending[stream])
            self._pending[stream] = b""

    def close(self) -> None:
        """Record what both streams left unfinished (the container is gone), then close the file."""
        for stream in sorted(STREAMS):
            self.flush_partial(stream)
        os.close(self._fd)

    def _open(self) -> int:
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _append(self, stamp: str, stream: str, tag: bytes, content: bytes) -> None:
        record = b"%s %s %s %s\n" % (stamp.encode(), stream.encode(), tag, content)
        if self._size and self._size + len(record) > self.max_bytes:
            self._rotate()
        view = memoryview(record)
        while view:
            view = view[os.write(self._fd, view) :]
        self._size += len(record)

    def _rotate(self) -> None:
        """Rename, never truncate: a follower keeps the old file open and reads it to its end."""
        if self.max_files == 1:
            self.path.unlink(missing_ok=True)
        for k in range(self.max_files - 1, 0, -1):  # onto path.(max_files - 1), which is dropped
            with contextlib.suppress(FileNotFoundError):
                os.rename(_rotated(self.path, k - 1), _rotated(self.path, k))
        old, self._fd, self._size = self._fd, self._open(), 0
        os.close(old)


def parse(line: bytes) -> LogLine | None:
    """A record, or None for a line that is not one (garbage must not stop a reader)."""
    fields = line.removesuffix(b"\n").split(b" ", 3)
    if len(fields) != 4 or fields[1] not in (b"stdout", b"stderr") or fields[2] not in (b"F", b"P"):
        return None
    match = _TIME.fullmatch(fields[0])
    if match is None:
        return None
    try:
        second = datetime.fromisoformat(match[1].decode())
    except ValueError:
        return None
    microsecond = int((match[2] or b"").ljust(6, b"0")[:6])
    return LogLine(
        time=second.replace(microsecond=microsecond, tzinfo=UTC),
        stream=fields[1].decode(),
        partial=fields[2] == b"P",
        text=fields[3].decode(errors="replace"),
    )


def read(
    path: Path, tail: int | None = None, since: datetime | None = None, streams: frozenset[str] = STREAMS
) -> list[LogLine]:
    """The records of path and its rotated files, oldest first; with tail, only the last tail of them.

    For tail the files are read backwards in blocks, newest first, so that `--tail 10` of a large
    log reads a block, not the whole of it. A record still being written is left out.
    """
    if tail is None:
        found: list[LogLine] = []
        for file in _files(path):
            with contextlib.suppress(FileNotFoundError), open(file, "rb") as f:
                lines = f.read().split(b"\n")[:-1]
                found.extend(r for r in map(parse, lines) if r and _wanted(r, since, streams))
        return found
    found = []
    for file in reversed(_files(path)):
        if len(found) >= tail:
            break
        with contextlib.suppress(FileNotFoundError), open(file, "rb") as f:
            backward = _lines_backward(f.fileno(), os.fstat(f.fileno()).st_size)
            next(backward)  # after the last newline: not a complete record
            for record in map(parse, backward):
                if record and _wanted(record, since, streams):
                    found.append(record)
                    if len(found) >= tail:
                        break
    return found[::-1]


def follow(
    path: Path,
    since: datetime | None = None,
    streams: frozenset[str] = STREAMS,
    stop: Callable[[], bool] = lambda: False,
    poll: float = 0.2,
) -> Iterator[LogLine]:
    """The records appended to path from the call on, across rotations, as they are written.

    Ends once stop() is true and all that was written before has been yielded; stop() is asked at
    least every poll seconds. The watch starts at the call, not at the first next(), so that
    nothing written in between is missed; path's directory must exist, path need not yet.
    """
    watch = INotify()
    watch.add_watch(path.parent, flags.CREATE | flags.MODIFY | flags.MOVED_TO)
    return _follow(path, watch, _Reading.open(path, at_end=True), since, streams, stop, poll)


@dataclass
class _Reading:
    """A file being followed, and the start of a record in it whose newline has not come yet."""

    file: FileIO
    inode: int
    held: bytes = b""

    @classmethod
    def open(cls, path: Path, at_end: bool) -> _Reading | None:
        """From its start, or from after its last complete record (one being written will be read)."""
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by _follow)
        except FileNotFoundError:
            return None
        status = os.fstat(file.fileno())
        if at_end:
            unfinished = next(_lines_backward(file.fileno(), status.st_size))
            file.seek(status.st_size - len(unfinished))
        return cls(file, status.st_ino)

    def lines(self) -> list[bytes]:
        """The lines completed since the last call."""
        *complete, self.held = (self.held + self.file.readall()).split(b"\n")
        return complete


def _follow(
    path: Path,
    watch: INotify,
    reading: _Reading | None,
    since: datetime | None,
    streams: frozenset[str],
    stop: Callable[[], bool],
    poll: float,
) -> Iterator[LogLine]:
    try:
        while True:
            done = stop()
            while True:
                # Looked at before reading: once path is a new file, the old one is no longer written.
                inode = _inode(path)
                rotated = inode is not None and (reading is None or inode != reading.inode)
                if reading is not None:
                    for record in map(parse, reading.lines()):
                        if record and _wanted(record, since, streams):
                            yield record
                if not rotated:
                    break
                successor = _successor(path, reading)
                if successor is None:
                    break
                if reading is not None:
                    reading.file.close()
                reading = successor
            if done:
                return
            watch.read(timeout=int(poll * 1000))
    finally:
        watch.close()
        if reading is not None:
            reading.file.close()


def _successor(path: Path, reading: _Reading | None) -> _Reading | None:
    """The file written after the one being read: path, or a rotated file if the writer rotated more
    than once since the last look. None while path is missing (between the renames of a rotation)."""
    after = path
    for older, newer in itertools.pairwise(_files(path)):
        if reading is not None and _inode(older) == reading.inode:
            after = newer
            break
    return _Reading.open(after, at_end=False)


def _lines_backward(fd: int, end: int) -> Iterator[bytes]:
    """The lines of the first end bytes of a file, last first, read in blocks from the end.

    The first one is what follows the last newline (b"" if the file ends with one).
    """
    tail: list[bytes] = []  # pieces of a line that started in an earlier block, last piece first
    while end > 0:
        start = max(0, end - _BLOCK)
        first, *rest = os.pread(fd, end - start, start).split(b"\n")
        if rest:
            tail.append(rest.pop())
            yield b"".join(reversed(tail))
            yield from reversed(rest)
            tail = []
        tail.append(first)
        end = start
    yield b"".join(reversed(tail))


def _files(path: Path) -> list[Path]:
    """path's rotated files, oldest (highest number) first, then path itself."""
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        return [path]
    prefix = f"{path.name}."
    numbers = [int(n[len(prefix) :]) for n in names if n.startswith(prefix) and n[len(prefix) :].isdecimal()]
    return [_rotated(path, k) for k in sorted(numbers, reverse=True) if k] + [path]


def _rotated(path: Path, number: int) -> Path:
    """path.number; path itself is number 0."""
    return path.with_name(f"{path.name}.{number}") if number else path


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None


def _wanted(record: LogLine, since: datetime | None, streams: frozenset[str]) -> bool:
    return record.stream in streams and (since is None or record.time >= since)


def _stamp(time: datetime) -> str:
    """RFC 3339 in UTC with nanoseconds (a datetime has microseconds: the last three digits are 0)."""
    time = time.astimezone(UTC)
    return f"{time:%Y-%m-%dT%H:%M:%S}.{time.microsecond:06d}000Z"


def _cut(data: bytes, start: int, limit: int) -> int:
    """Where to end a piece of at most limit bytes: not inside a UTF-8 character if that can be helped."""
    for cut in range(start + limit, max(start, start + limit - 4), -1):
        if not 0x80 <= data[cut] < 0xC0:
            return cut
    return start + limit
