"""Newline-delimited frames over byte streams: the wire layer of the worker protocol.

This module deals only in bytes and lines, never in JSON or commands (that is the
dispatcher's job, :mod:`step5.nn.worker`, and the pool's, :mod:`step5.execution.pool`).
It is torch-free and used on both sides of the pipe:

* :class:`LineReader` reads one line at a time with a hard size bound. A line longer than
  the bound is *discarded up to its newline* and reported as :class:`~step5.errors.FrameTooLarge`, so a
  runaway writer cannot make the reader allocate without limit, and the next call starts
  cleanly at the next line (there is no "previous message" to fall back on).
* :class:`LineWriter` writes one message with one lock, one ``write`` and one ``flush``,
  so two threads can never interleave halves of two frames.
"""
from __future__ import annotations

import threading
from typing import Any, BinaryIO

from step5.errors import FrameTooLarge
from step5.jsonio import dumps_line
from step5.protocol import MAX_REQUEST_BYTES

#: Chunk size used while skipping the rest of an oversize line.
_DISCARD_CHUNK = 1 << 16


class LineReader:
    """Reads newline-terminated frames from a binary stream, at most ``max_bytes`` each.

    ``max_bytes`` bounds the frame *content*; the newline is not counted. A final line at
    end of stream without a newline is still returned (a writer may close right after it).
    """

    def __init__(self, stream: BinaryIO, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        if max_bytes < 1:
            raise ValueError(f"`max_bytes` must be >= 1, got {max_bytes!r}")
        self._stream = stream
        self.max_bytes = max_bytes

    def read_line(self) -> bytes | None:
        """The next frame without its line ending; ``None`` at end of stream.

        Raises :class:`FrameTooLarge` after skipping the remainder of an oversize line;
        the caller may simply call again to get the following frame.
        """
        # One byte more than allowed: a complete allowed line is content + "\n".
        chunk = self._stream.readline(self.max_bytes + 1)
        if not chunk:
            return None
        if chunk.endswith(b"\n"):
            return chunk[:-1].rstrip(b"\r")
        if len(chunk) <= self.max_bytes:
            return chunk  # last line of the stream, no newline
        # Oversize: throw away everything up to and including the next newline.
        seen = len(chunk)
        while True:
            rest = self._stream.readline(_DISCARD_CHUNK)
            if not rest:
                raise FrameTooLarge(self.max_bytes, seen, at_eof=True)
            seen += len(rest)
            if rest.endswith(b"\n"):
                raise FrameTooLarge(self.max_bytes, seen, at_eof=False)


class LineWriter:
    """Writes whole frames to a binary stream; safe to share between threads."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def write_line(self, frame: bytes) -> None:
        """Write one frame; a trailing newline is added when missing.

        A frame must not contain a newline of its own: that would be two frames.
        """
        if not frame.endswith(b"\n"):
            frame += b"\n"
        if b"\n" in frame[:-1]:
            raise ValueError("a frame must not contain an embedded newline")
        with self._lock:
            self._stream.write(frame)
            self._stream.flush()

    def write_message(self, message: Any) -> None:
        """Serialise ``message`` as compact JSON and write it as one frame."""
        # orjson never emits a raw newline (it escapes them in strings), so one dumps is one frame.
        frame = dumps_line(message)
        with self._lock:
            self._stream.write(frame)
            self._stream.flush()

    def close(self) -> None:
        with self._lock:
            self._stream.close()
