"""Container logs: real files in tmp_path, written by LogWriter and read back, followed by a real inotify."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cgctl.runtime.logs import LogLine, LogWriter, follow, parse, read

T = datetime(2026, 11, 28, 17, 2, 9, 669794, tzinfo=UTC)
STAMP = b"2026-11-28T17:02:09.669794000Z"
RECORD = len(STAMP + b" stdout F line 000\n")  # 49 bytes: the size of each record of numbered()


def fields(lines: list[LogLine]) -> list[tuple[str, bool, str]]:
    return [(line.stream, line.partial, line.text) for line in lines]


def texts(lines: list[LogLine]) -> list[str]:
    return [line.text for line in lines]


def numbered(writer: LogWriter, numbers: range) -> None:
    for i in numbers:
        writer.feed("stdout", f"line {i:03d}\n".encode(), now=T)


def test_records_are_written_in_the_cri_format_and_read_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path)
    writer.feed("stdout", b"hello wor", now=T)
    writer.feed("stderr", b"oops\n", now=T)
    writer.feed("stdout", b"ld\nsecond\n\n", now=T + timedelta(seconds=1))
    writer.close()

    later = b"2026-11-28T17:02:10.669794000Z"
    assert path.read_bytes() == (
        STAMP + b" stderr F oops\n"
        + later + b" stdout F hello world\n"
        + later + b" stdout F second\n"
        + later + b" stdout F \n"
    )  # fmt: skip
    assert read(path) == [
        LogLine(T, "stderr", False, "oops"),
        LogLine(T + timedelta(seconds=1), "stdout", False, "hello world"),
        LogLine(T + timedelta(seconds=1), "stdout", False, "second"),
        LogLine(T + timedelta(seconds=1), "stdout", False, ""),
    ]


def test_the_directory_and_file_are_private_and_a_new_writer_appends(tmp_path: Path) -> None:
    path = tmp_path / "new" / "ctr.log"
    writer = LogWriter(path)
    numbered(writer, range(2))
    writer.close()
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
    assert path.stat().st_mode & 0o777 == 0o600

    writer = LogWriter(path, max_bytes=RECORD * 2 + 10)  # counts what the file already holds
    numbered(writer, range(2, 3))
    writer.close()
    assert texts(read(path.with_name("ctr.log.1"))) == ["line 000", "line 001"]
    assert texts(read(path)) == ["line 000", "line 001", "line 002"]


def test_a_line_longer_than_max_line_is_split_into_partial_records(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path, max_line=10)
    writer.feed("stdout", b"abcdefghijab", now=T)
    writer.feed("stdout", b"cdefghijklmno\n0123456789\n", now=T)
    writer.close()

    lines = read(path)
    assert fields(lines) == [
        ("stdout", True, "abcdefghij"),
        ("stdout", True, "abcdefghij"),
        ("stdout", False, "klmno"),
        ("stdout", False, "0123456789"),
    ]
    assert "".join(texts(lines[:3])) == "abcdefghij" * 2 + "klmno"


def test_pieces_of_a_long_line_do_not_cut_a_utf8_character(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path, max_line=4)
    writer.feed("stdout", "aé€b\n".encode(), now=T)
    writer.close()
    assert fields(read(path)) == [("stdout", True, "aé"), ("stdout", False, "€b")]


def test_output_without_a_final_newline_is_a_partial_record(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path)
    writer.feed("stdout", b"abc", now=T)
    writer.flush_partial("stdout")
    writer.flush_partial("stdout")  # nothing buffered: no record
    writer.feed("stdout", b"def\nprompt> ", now=T)
    writer.feed("stderr", b"half", now=T)
    writer.close()
    assert fields(read(path)) == [
        ("stdout", True, "abc"),
        ("stdout", False, "def"),
        ("stderr", True, "half"),
        ("stdout", True, "prompt> "),
    ]


def test_undecodable_bytes_are_kept_and_read_as_replacement_characters(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path)
    writer.feed("stderr", b"bad \xff\xfe end\n", now=T)
    writer.close()
    assert path.read_bytes() == STAMP + b" stderr F bad \xff\xfe end\n"
    assert texts(read(path)) == ["bad \ufffd\ufffd end"]


@pytest.mark.parametrize("max_files", [1, 2, 3])
def test_rotation_keeps_max_files_files_with_the_newest_records(tmp_path: Path, max_files: int) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path, max_bytes=RECORD * 10 + 5, max_files=max_files)  # 10 records a file
    numbered(writer, range(100))
    writer.close()

    names = ["ctr.log", "ctr.log.1", "ctr.log.2"][:max_files]
    assert sorted(p.name for p in tmp_path.iterdir()) == names
    assert [(tmp_path / name).stat().st_size for name in names] == [RECORD * 10] * max_files
    assert texts(read(path)) == [f"line {i:03d}" for i in range(100 - 10 * max_files, 100)]


def test_tail_reads_across_rotated_files(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path, max_bytes=RECORD * 10, max_files=3)
    numbered(writer, range(100))
    writer.close()

    assert texts(read(path, tail=3)) == ["line 097", "line 098", "line 099"]
    assert texts(read(path, tail=15)) == [f"line {i:03d}" for i in range(85, 100)]
    assert texts(read(path, tail=1000)) == [f"line {i:03d}" for i in range(70, 100)]
    assert read(path, tail=0) == []


def test_tail_of_a_file_larger_than_a_block_matches_the_whole_read(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path)
    written = [(f"{i}:" + "x" * (i * 37 % 500), "stderr" if i % 3 == 0 else "stdout") for i in range(2000)]
    for text, stream in written:
        writer.feed(stream, f"{text}\n".encode(), now=T)
    writer.close()
    assert path.stat().st_size > 4 * 65536

    assert texts(read(path)) == [text for text, _ in written]
    for tail in (1, 7, 300, 1999, 2000, 5000):
        assert texts(read(path, tail=tail)) == [text for text, _ in written][-tail:]
    stderr = [text for text, stream in written if stream == "stderr"]
    assert texts(read(path, tail=250, streams=frozenset({"stderr"}))) == stderr[-250:]


def test_since_and_streams_filter_records(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path, max_bytes=200)
    for second in range(4):
        writer.feed("stdout", f"out {second}\n".encode(), now=T + timedelta(seconds=second))
        writer.feed("stderr", f"err {second}\n".encode(), now=T + timedelta(seconds=second))
    writer.close()

    since = T + timedelta(seconds=2)
    assert texts(read(path, since=since)) == ["out 2", "err 2", "out 3", "err 3"]
    assert texts(read(path, since=since, tail=3)) == ["err 2", "out 3", "err 3"]
    assert texts(read(path, streams=frozenset({"stderr"}))) == ["err 0", "err 1", "err 2", "err 3"]
    assert texts(read(path, since=since, streams=frozenset({"stdout"}), tail=5)) == ["out 2", "out 3"]
    assert read(path, streams=frozenset()) == []


GARBAGE = [
    b"not a record at all",
    b"2026-11-28T17:02:09Z stdin F wrong stream",
    b"2026-11-28T17:02:09Z stdout X wrong tag",
    b"2026-13-28T17:02:09Z stdout F no such month",
    b"2026-11-28 17:02:09Z stdout F space in the time",
    b"2026-11-28T17:02:09.1234567890Z stdout F ten digits",
    b"2026-11-28T17:02:09+01:00 stdout F not UTC",
    b"2026-11-28T17:02:09Z stdout F",
    b"",
    b"\xff\xfe\x00 binary",
]


def test_garbage_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    good = [STAMP + b" stdout F one", b"2026-11-28T17:02:10Z stderr P two"]
    path.write_bytes(b"\n".join([good[0], *GARBAGE, good[1]]) + b"\n2026-11-28T17:02:11Z stdout F torn")

    assert [parse(line) for line in GARBAGE] == [None] * len(GARBAGE)
    expected = [
        LogLine(T, "stdout", False, "one"),
        LogLine(T.replace(second=10, microsecond=0), "stderr", True, "two"),
    ]
    assert read(path) == expected
    assert read(path, tail=5) == expected


def test_parse_takes_any_number_of_fraction_digits_and_to_json_gives_z_times() -> None:
    assert parse(b"2026-11-28T17:02:09Z stdout F a b ") == LogLine(
        T.replace(microsecond=0), "stdout", False, "a b "
    )
    assert parse(b"2026-11-28T17:02:09.5Z stderr P x\n") == LogLine(
        T.replace(microsecond=500000), "stderr", True, "x"
    )
    line = parse(b"2026-11-28T17:02:09.669794202Z stdout F hello world\n")
    assert line == LogLine(T, "stdout", False, "hello world")
    assert line.to_json() == {
        "time": "2026-11-28T17:02:09.669794000Z",
        "stream": "stdout",
        "partial": False,
        "text": "hello world",
    }


def test_follow_yields_what_is_written_after_the_call_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path, max_bytes=RECORD * 4, max_files=3)  # 4 records a file
    numbered(writer, range(3))
    lines = follow(path, stop=lambda: True)
    numbered(writer, range(3, 12))  # 3 in the followed file, 4-7 in the next, 8-11 in the one after
    writer.close()

    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctr.log", "ctr.log.1", "ctr.log.2"]
    assert texts(list(lines)) == [f"line {i:03d}" for i in range(3, 12)]


def test_follow_starts_with_a_record_being_written_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    path.write_bytes(STAMP + b" stdout F before\n" + STAMP + b" stdout F hal")
    lines = follow(path, since=T, streams=frozenset({"stdout"}), stop=lambda: True)
    with open(path, "ab") as f:
        f.write(b"f written\n" + STAMP + b" stderr F not wanted\n2026-11-28T17:02:08Z stdout F too old\n")
        f.write(STAMP + b" stdout F after\n")
    assert texts(list(lines)) == ["half written", "after"]


def test_follow_waits_for_the_file_to_be_created(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    lines = follow(path, stop=lambda: True)
    writer = LogWriter(path)
    numbered(writer, range(2))
    writer.close()
    assert texts(list(lines)) == ["line 000", "line 001"]


def test_follow_yields_records_written_by_another_thread_across_rotations(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path, max_bytes=RECORD * 4, max_files=3)
    numbered(writer, range(2))
    finished = threading.Event()
    deadline = time.monotonic() + 10

    def write() -> None:
        for i in range(2, 12):
            numbered(writer, range(i, i + 1))
            time.sleep(0.02)
        finished.set()

    lines = follow(path, stop=lambda: finished.is_set() or time.monotonic() > deadline, poll=0.05)
    thread = threading.Thread(target=write)
    thread.start()
    got = texts(list(lines))
    thread.join()
    writer.close()

    assert got == [f"line {i:03d}" for i in range(2, 12)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctr.log", "ctr.log.1", "ctr.log.2"]


def test_follow_holds_back_a_record_until_its_newline_comes(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    path.write_bytes(b"")
    finished = threading.Event()
    deadline = time.monotonic() + 10

    def write() -> None:
        with open(path, "ab", buffering=0) as f:
            f.write(STAMP + b" stdout F hal")
            time.sleep(0.3)  # several polls: the follower reads the torn record and must wait
            f.write(b"f\n")
        finished.set()

    lines = follow(path, stop=lambda: finished.is_set() or time.monotonic() > deadline, poll=0.05)
    thread = threading.Thread(target=write)
    thread.start()
    got = texts(list(lines))
    thread.join()
    assert got == ["half"]


def test_follow_waits_in_bounded_steps_without_busy_polling(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    LogWriter(path).close()
    asked = 0
    start = time.monotonic()

    def stop() -> bool:
        nonlocal asked
        asked += 1
        return time.monotonic() > start + 0.5

    assert list(follow(path, stop=stop, poll=0.1)) == []
    assert 0.5 < time.monotonic() - start < 2
    assert 5 <= asked <= 10


def test_follow_is_woken_by_a_write_rather_than_by_its_poll_timeout(tmp_path: Path) -> None:
    path = tmp_path / "ctr.log"
    writer = LogWriter(path)
    deadline = time.monotonic() + 10
    lines = follow(path, stop=lambda: time.monotonic() > deadline, poll=5)
    timer = threading.Timer(0.2, lambda: numbered(writer, range(1)))
    start = time.monotonic()
    timer.start()
    try:
        assert texts([next(lines)]) == ["line 000"]
        assert time.monotonic() - start < 2
    finally:
        timer.join()
        lines.close()  # type: ignore[attr-defined]
        writer.close()
