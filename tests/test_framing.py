"""Framing: bytes <-> lines with a size bound, tested on in-memory streams."""
from __future__ import annotations

import io
import threading

import pytest

from step5.errors import FrameTooLarge
from step5.framing import LineReader, LineWriter
from step5.jsonio import loads


def read_all(reader: LineReader) -> list[object]:
    """Every frame until EOF; an oversize frame shows up as the string "TOO_LARGE"."""
    out: list[object] = []
    while True:
        try:
            line = reader.read_line()
        except FrameTooLarge:
            out.append("TOO_LARGE")
            continue
        if line is None:
            return out
        out.append(line)


def test_lines_are_split_and_stripped_of_line_endings():
    reader = LineReader(io.BytesIO(b'{"a": 1}\n{"b": 2}\r\n\nlast-without-newline'), max_bytes=100)
    assert read_all(reader) == [b'{"a": 1}', b'{"b": 2}', b"", b"last-without-newline"]


def test_empty_stream_is_eof():
    assert LineReader(io.BytesIO(b"")).read_line() is None


@pytest.mark.parametrize("size, ok", [(10, True), (11, False)])
def test_limit_is_on_content_not_newline(size, ok):
    reader = LineReader(io.BytesIO(b"x" * size + b"\nnext\n"), max_bytes=10)
    expected = [b"x" * size, b"next"] if ok else ["TOO_LARGE", b"next"]
    assert read_all(reader) == expected


def test_oversize_line_is_discarded_and_the_next_frame_is_read_fresh():
    big = b"y" * 300_000  # spans several discard chunks
    stream = io.BytesIO(b"first\n" + big + b"\nsecond\n")
    reader = LineReader(stream, max_bytes=1000)
    assert reader.read_line() == b"first"
    with pytest.raises(FrameTooLarge) as info:
        reader.read_line()
    assert info.value.seen == len(big) + 1
    assert not info.value.at_eof
    # The next read starts at the next line; nothing of the big line nor of "first" comes back.
    assert reader.read_line() == b"second"
    assert reader.read_line() is None


def test_oversize_line_at_eof_is_reported_as_such():
    reader = LineReader(io.BytesIO(b"z" * 50), max_bytes=10)
    with pytest.raises(FrameTooLarge) as info:
        reader.read_line()
    assert info.value.at_eof
    assert reader.read_line() is None


def test_reader_rejects_a_nonsense_bound():
    with pytest.raises(ValueError, match="max_bytes"):
        LineReader(io.BytesIO(b""), max_bytes=0)


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, b):  # type: ignore[override]
        self.writes += 1
        return super().write(b)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_writer_writes_one_frame_with_one_write_and_one_flush():
    stream = CountingStream()
    writer = LineWriter(stream)
    writer.write_message({"status": "pong", "text": "two\nlines"})
    assert stream.writes == 1 and stream.flushes == 1
    data = stream.getvalue()
    assert data.count(b"\n") == 1 and data.endswith(b"\n")
    assert loads(data) == {"status": "pong", "text": "two\nlines"}


def test_write_line_adds_newline_and_refuses_embedded_ones():
    stream = io.BytesIO()
    writer = LineWriter(stream)
    writer.write_line(b"abc")
    writer.write_line(b"def\n")
    assert stream.getvalue() == b"abc\ndef\n"
    with pytest.raises(ValueError, match="embedded newline"):
        writer.write_line(b"a\nb")


def test_concurrent_writers_never_interleave_frames():
    stream = io.BytesIO()
    writer = LineWriter(stream)
    payload = "p" * 5000

    def spam(tag: int) -> None:
        for i in range(200):
            writer.write_message({"tag": tag, "i": i, "payload": payload})

    threads = [threading.Thread(target=spam, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 800
    assert all(loads(line)["payload"] == payload for line in lines)
