"""Newline-delimited frames over byte streams: the wire layer of the worker protocol.

Bytes and lines only, never JSON commands (:mod:`step5.protocol`); torch-free, used on
both sides of the pipe.
"""
from __future__ import annotations

import threading
from typing import Any, BinaryIO

from step5.errors import FrameTooLarge
from step5.jsonio import dumps_line
from step5.protocol import MAX_REQUEST_BYTES


class LineReader:
    """Reads newline-terminated frames from a binary stream, at most ``max_bytes`` of
    content each (the newline not counted)."""

    def __init__(self, stream: BinaryIO, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"`max_bytes` must be >= 1, got {max_bytes!r}")
        self._stream = stream
        self.max_bytes = max_bytes

    def read_line(self) -> bytes | None:
        """The next frame without its line ending; ``None`` at end of stream; a last line without
        a newline is still a frame (a writer may close right after it). A longer line is discarded
        up to its newline and raised as :class:`FrameTooLarge`: a runaway writer cannot make the
        reader allocate without limit, and the next call starts cleanly at the next line."""
        chunk = self._stream.readline(self.max_bytes + 1)  # an allowed line is content + "\n"
        if not chunk:
            return None
        if chunk.endswith(b"\n"):
            return chunk[:-1].rstrip(b"\r")
        if len(chunk) <= self.max_bytes:
            return chunk
        seen = len(chunk)
        while True:
            rest = self._stream.readline(1 << 16)
            if not rest:
                raise FrameTooLarge(self.max_bytes, seen, at_eof=True)
            seen += len(rest)
            if rest.endswith(b"\n"):
                raise FrameTooLarge(self.max_bytes, seen, at_eof=False)


class LineWriter:
    """Writes whole frames, one lock, one ``write`` and one ``flush`` each, so two threads
    never interleave halves of two frames."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write_line(self, frame: bytes) -> None:
        """Write one frame (a trailing newline added when missing; an embedded one would make two frames)."""
        if not frame.endswith(b"\n"):
            frame += b"\n"
        if b"\n" in frame[:-1]:
            raise ValueError("a frame must not contain an embedded newline")
        with self._lock:
            self._stream.write(frame)
            self._stream.flush()

    def write_message(self, message: Any) -> None:
        """``message`` as compact JSON, one frame (orjson escapes every newline in it)."""
        self.write_line(dumps_line(message))

    def close(self) -> None:
        with self._lock:
            self._stream.close()
