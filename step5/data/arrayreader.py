"""Read one JSON array from a file piece by piece, holding about one block of it at a time.

:class:`ArrayReader` hands the caller *pieces*: runs of whole elements, written as a JSON
array, cut at the last ``}`` ``,`` ``{`` by a byte search. A piece is only a candidate (a
cut inside a string leaves it undecodable: an array of whole elements has one reading), so
the caller either decodes it and calls :meth:`~ArrayReader.accept`, or calls
:meth:`~ArrayReader.parse_elements`, which parses the same bytes exactly with the standard
library or raises a :class:`DataError` with line and column (docs/data.md).
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any, BinaryIO

from step5.errors import DataError

#: Bytes read at a time, about a piece's length: large enough that per-piece overhead
#: vanishes, small enough that a decoded piece stays in the CPU cache (1 MiB pieces took
#: 40 % less CPU time than 8 MiB pieces).
DEFAULT_BLOCK_SIZE = 1 << 20

_WHITESPACE = re.compile(rb"[ \t\r\n]*")
_CUT = re.compile(rb"\}[ \t\r\n]*,[ \t\r\n]*\{")
_CUT_WINDOW = 1 << 16  # look for the last cut in this tail first; whole buffer if none
_LONGEST_TOKEN = 16  # `-Infinity`, a `\\uXXXX` escape: a syntax error this close to the end may be a cut
_OPEN, _CLOSE, _COMMA = ord("["), ord("]"), ord(",")


class ArrayReader:
    """Pieces of the top-level JSON array of a binary file. ``index`` counts the elements
    consumed so far; a piece is a view into the buffer, valid until the next call."""

    def __init__(self, fh: BinaryIO, source: str, what: str, *, block_size: int | None = None) -> None:
        self._fh, self._source, self._what = fh, source, what
        self._block = block_size or DEFAULT_BLOCK_SIZE  # read at call time, so tests can make pieces small
        self._buf = bytearray()
        self._eof = False
        self._base = 0  # file offset of _buf[0]
        self._sep = 0  # index in _buf of the `[` or `,` before the next element
        self._pos = 0  # index in _buf where the next element starts
        self._pending: tuple[int, int, int, memoryview] | None = None  # sep byte, close, its byte, view
        self._text: tuple[int, str] | None = None  # (file offset, Latin-1 text) of the buffer from there
        self.index = 0
        self.ended = False  # the array's closing `]` has been consumed

    def _read_more(self, n: int) -> bool:
        """Append at least one block (``n`` bytes if more); False at end of file."""
        if self._eof:
            return False
        if self._sep > 0:  # drop what was consumed; keep the separator before the next element
            self._base += self._sep
            del self._buf[: self._sep]
            self._pos -= self._sep
            self._sep = 0
        data = self._fh.read(max(n, self._block))
        self._text = None
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def _skip_ws(self, i: int) -> int:
        """Buffer index of the first non-whitespace byte from ``i``, reading on as needed;
        ``len(buffer)`` at end of file."""
        while True:
            j = _WHITESPACE.match(self._buf, i).end()
            if j < len(self._buf):
                return j
            at = self._base + j
            if not self._read_more(self._block):
                return len(self._buf)
            i = at - self._base

    def _error(self, msg: str, i: int) -> DataError:
        """A syntax error at buffer index ``i``: its line and column are counted by reading the
        file again (only errors pay for counting lines), unless it cannot seek."""
        offset = self._base + max(0, min(i, len(self._buf)))
        error = f"{self._what} file {self._source} is not valid JSON: {msg}"
        try:
            self._fh.seek(0)
        except (OSError, ValueError):
            return DataError(f"{error}: byte {offset}")
        lines, line_start, done = 0, 0, 0
        while done < offset:
            chunk = self._fh.read(min(self._block, offset - done))
            if not chunk:
                break
            lines += chunk.count(b"\n")
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                line_start = done + nl + 1
            done += len(chunk)
        return DataError(f"{error}: line {lines + 1} column {offset - line_start + 1} (byte {offset})")

    def open_array(self) -> bool:
        """Consume the opening ``[``; False (nothing consumed) when the file holds something else."""
        self._read_more(self._block)
        i = self._skip_ws(0)
        if i >= len(self._buf):
            raise self._error("Expecting value", i)
        if self._buf[i] != _OPEN:
            return False
        self._sep = i
        self._pos = self._skip_ws(i + 1)
        if self._pos < len(self._buf) and self._buf[self._pos] == _CLOSE:
            self._finish(self._pos)
        return True

    def rest(self) -> bytes:
        """The whole file after :meth:`open_array` found no array: what was read, then the rest (the
        file is not read again, so a pipe or FIFO gives its bytes, and a reopen cannot block)."""
        return bytes(self._buf[self._sep :]) + self._fh.read()

    def _finish(self, close: int) -> None:
        after = self._skip_ws(close + 1)
        if after < len(self._buf):
            raise self._error("Extra data", after)
        self.ended = True

    def next_piece(self) -> memoryview | None:
        """The next candidate piece (``[`` elements ``]``), or None once the array ended."""
        self._release()
        if self.ended:
            return None
        want = self._block
        while True:
            if len(self._buf) - self._pos < want:
                self._read_more(want)
            if self._eof:
                close = len(self._buf.rstrip(b" \t\r\n")) - 1
                if close >= self._pos and self._buf[close] == _CLOSE:
                    if close == self._pos:  # `,]`: a separator with no element after it
                        raise self._error("Expecting value", close)
                    return self._make_piece(close)
                # no closing bracket: a truncated file; this piece cannot decode, and
                # parse_elements() says where it breaks
                return self._make_piece(len(self._buf))
            cut = self._last_cut()
            if cut is not None:
                return self._make_piece(cut)
            want = 2 * max(want, len(self._buf) - self._pos)  # one element longer than a block

    def _last_cut(self) -> int | None:
        """Buffer index of the `,` after the last `}` that a `{` follows, or None."""
        end = len(self._buf)
        start = max(self._pos, end - _CUT_WINDOW)
        while True:
            last = None
            for last in _CUT.finditer(self._buf, start, end):  # noqa: B007 - the loop finds the last match
                pass
            if last is not None:
                return self._buf.index(b",", last.start())
            if start == self._pos:
                return None
            start = self._pos

    def _make_piece(self, close: int) -> memoryview:
        """Turn ``[sep .. close]`` into an array in place: the separator becomes `[`, ``close`` `]`."""
        opening = self._buf[self._sep]
        self._buf[self._sep] = _OPEN
        closing = -1
        if close < len(self._buf):
            closing = self._buf[close]
            self._buf[close] = _CLOSE
            view = memoryview(self._buf)[self._sep : close + 1]
        else:
            view = memoryview(self._buf)[self._sep :]
        self._pending = (opening, close, closing, view)
        return view

    def _release(self) -> int | None:
        """Undo the pending piece's brackets; returns its closing index (None if none)."""
        if self._pending is None:
            return None
        opening, close, closing, view = self._pending
        view.release()
        self._pending = None
        self._buf[self._sep] = opening
        if closing >= 0:
            self._buf[close] = closing
        return close

    def accept(self, n_elements: int) -> None:
        """The pending piece decoded into ``n_elements`` elements: move past it."""
        close = self._release()
        if close is None:
            raise RuntimeError("accept() without a pending piece")
        self.index += n_elements
        if self._buf[close] == _CLOSE:
            self._finish(close)
            return
        self._sep = close
        self._pos = self._skip_ws(close + 1)

    def parse_elements(self) -> list[Any]:
        """Parse exactly, element by element, at least through the pending piece (or one
        element when none is pending); returns the elements."""
        close = self._release()
        if self.ended:
            return []
        stop = self._base + (close if close is not None else self._pos + 1)  # file offset to reach
        decoder = json.JSONDecoder()
        out: list[Any] = []
        while True:
            obj, end = self._parse_one(decoder)
            out.append(obj)
            self.index += 1
            k = self._skip_ws(end)
            if k >= len(self._buf):
                raise self._error("Expecting ',' delimiter", k)
            if self._buf[k] == _CLOSE:
                self._finish(k)
                return out
            if self._buf[k] != _COMMA:
                raise self._error("Expecting ',' delimiter", k)
            self._sep = k
            self._pos = self._skip_ws(k + 1)
            if self._pos >= len(self._buf) or self._buf[self._pos] == _CLOSE:
                raise self._error("Expecting value", self._pos)
            if self._base + self._pos >= stop:
                return out

    def _parse_one(self, decoder: json.JSONDecoder) -> tuple[Any, int]:
        """The element at ``_pos`` and the buffer index just past it.

        The buffer is read as Latin-1 (once per fill) so that string indices are byte
        indices; an element with non-ASCII bytes is parsed again as UTF-8 (bytes that are not
        UTF-8 are a syntax error at the first of them). An element that
        may run past the buffer (an unterminated string, an error within a token's length of
        its end, a bare number ending there) is parsed again after reading on.
        """
        while True:
            if self._text is None or self._text[0] > self._base + self._pos:
                self._text = (self._base + self._pos, self._buf[self._pos :].decode("latin-1"))
            start, text = self._text
            try:
                obj, n = decoder.raw_decode(text, self._base + self._pos - start)
            except json.JSONDecodeError as exc:
                cut_short = exc.msg.startswith("Unterminated string") or exc.pos >= len(text) - _LONGEST_TOKEN
                if cut_short and self._read_more(self._block):
                    continue
                raise self._error(exc.msg, start + exc.pos - self._base) from None
            except ValueError:  # an int of more digits than Python converts: json.load raises this bare
                if text[-1:].isdigit() and self._read_more(self._block):
                    continue  # the buffer may end inside the number: its digits are counted whole
                raise self._error(f"element {self.index} holds an integer of more than {sys.get_int_max_str_digits()} "
                                  "digits, which Python's json does not read", self._pos) from None
            if n == len(text) and self._read_more(self._block):
                continue
            end = start + n - self._base  # raw_decode returns an index into the text
            raw = self._buf[self._pos : end]
            if not raw.isascii():
                try:
                    utf8 = raw.decode("utf-8")
                except UnicodeDecodeError as exc:  # JSON text is UTF-8; json.loads would raise this bare
                    raise self._error(f"invalid UTF-8 byte 0x{raw[exc.start]:02x}", self._pos + exc.start) from None
                obj = json.loads(utf8)
            return obj, end
