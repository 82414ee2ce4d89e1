"""Typed decoding of survivors records: a piece of the file straight to float columns.

The decoder is made at run time from the column names (msgspec ``Struct`` types), so a
record becomes a small struct of floats, not a dict of 90 keys; an absent key decodes as
NaN (the file cannot hold NaN there: msgspec refuses ``NaN`` tokens). The floats reach
numpy without a Python loop: the structs' value tuples are encoded as one MessagePack
array, where every float is 9 bytes (0xcb and a big-endian float64) at a fixed stride,
read through a strided view. A piece that does not fit raises one of :data:`DECODE_ERRORS`;
the caller then parses it exactly, which is where every error message is made.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Sequence

import msgspec
import numpy as np

#: What :meth:`RecordDecoder.decode` raises when a piece does not fit the layout.
DECODE_ERRORS: tuple[type[Exception], ...] = (msgspec.DecodeError, msgspec.ValidationError)

#: Top-level keys the decoder reads itself; a target with one of these names cannot be decoded.
RESERVED_KEYS = frozenset(("seed", "features", "metadata"))

_MSGPACK_FLOAT64 = 0xCB


@dataclass(frozen=True)
class RecordLayout:
    """What to decode from each record."""

    columns: tuple[str, ...]  # keys of `features` read as floats, in this order (NaN when absent)
    closed: bool  # True: another key in `features` fails the decode (so new keys are noticed)
    unread: frozenset[str] = frozenset()  # columns no one reads (leakage): null is allowed there, as NaN
    target: str | None = None  # a top-level key read as a float (NaN when absent)
    metadata: bool = False  # read metadata.prng_type / metadata.mod


@dataclass
class DecodedPiece:
    """One piece of the file, decoded."""

    values: np.ndarray  # (n, len(columns)) float64; NaN where the record lacks the key
    top_target: np.ndarray | None  # (n,) float64 top-level target, NaN where absent
    seeds: list[Any]  # each record's `seed` (None when absent)
    prng_types: list[Any]  # metadata.prng_type of the records that have metadata
    mods: list[Any]  # metadata.mod of the records that have metadata

    @property
    def n(self) -> int:
        return len(self.seeds)


def _array_header_size(length: int) -> int:
    """Bytes of a MessagePack array header for ``length`` items (fixarray, array 16, array 32)."""
    return 1 if length < 16 else 3 if length < 1 << 16 else 5


class RecordDecoder:
    """Decodes pieces (JSON arrays of records) for one :class:`RecordLayout`."""

    def __init__(self, layout: RecordLayout) -> None:
        if layout.target in RESERVED_KEYS:
            raise ValueError(f"a target named {layout.target!r} cannot be decoded (reserved: {sorted(RESERVED_KEYS)})")
        self.layout = layout
        # Field names are c0, c1, ... renamed to the keys: keys need not be identifiers.
        features = msgspec.defstruct(
            "Features",
            [(f"c{j}", float | None if key in layout.unread else float, math.nan)
             for j, key in enumerate(layout.columns)],
            rename={f"c{j}": key for j, key in enumerate(layout.columns)},
            forbid_unknown_fields=layout.closed,
            gc=False,
        )
        fields: list[Any] = [("seed", Any, None), ("features", features)]
        if layout.metadata:
            metadata = msgspec.defstruct("Metadata", [("prng_type", Any, None), ("mod", Any, None)], gc=False)
            fields.append(("metadata", metadata | None, None))
        rename = None
        if layout.target is not None:
            fields.append(("target_", float, math.nan))
            rename = {"target_": layout.target}
        record = msgspec.defstruct("Record", fields, rename=rename, kw_only=True, gc=False)
        self._decoder = msgspec.json.Decoder(list[record])
        self._msgpack = msgspec.msgpack.Encoder()
        self._read_columns = [j for j, key in enumerate(layout.columns) if key not in layout.unread]
        fields = [f"c{j}" for j in self._read_columns]
        self._read_getter = (lambda s: (getattr(s, fields[0]),)) if len(fields) == 1 else attrgetter(*fields)

    def decode(self, piece: Any) -> DecodedPiece:
        """Decode a piece (bytes-like); raises one of :data:`DECODE_ERRORS` if it does not fit."""
        records = self._decoder.decode(piece)
        values = self._float_rows(list(map(attrgetter("features"), records)))
        top_target = None
        if self.layout.target is not None:
            top_target = np.fromiter(map(attrgetter("target_"), records), dtype=np.float64, count=len(records))
        prng_types: list[Any] = []
        mods: list[Any] = []
        if self.layout.metadata:
            metas = [m for m in map(attrgetter("metadata"), records) if m is not None]
            prng_types = list(map(attrgetter("prng_type"), metas))
            mods = list(map(attrgetter("mod"), metas))
        return DecodedPiece(values, top_target, list(map(attrgetter("seed"), records)), prng_types, mods)

    def _float_rows(self, structs: Sequence[Any]) -> np.ndarray:
        """The structs' fields as an (n, d) float64 matrix. A null in an unread column (a
        ``NaN`` token there) breaks the fixed stride; then only the read columns are taken."""
        n, d = len(structs), len(self.layout.columns)
        if n == 0 or d == 0:
            return np.zeros((n, d), dtype=np.float64)
        values = self._strided(list(map(msgspec.structs.astuple, structs)), d)
        if values is not None:
            return values
        read = self._read_columns
        values = np.full((n, d), np.nan)
        if read:
            taken = self._strided([self._read_getter(s) for s in structs], len(read))
            assert taken is not None, "read columns are typed float"
            values[:, read] = taken
        return values

    def _strided(self, rows: list[tuple[Any, ...]], d: int) -> np.ndarray | None:
        """``rows`` (n tuples of d floats) as an (n, d) float64 matrix; None if one is a None."""
        n = len(rows)
        blob = self._msgpack.encode(rows)
        outer, inner = _array_header_size(n), _array_header_size(d)
        stride = inner + 9 * d
        if len(blob) != outer + n * stride:
            return None
        kinds = np.ndarray((n, d), dtype=np.uint8, buffer=blob, offset=outer + inner, strides=(stride, 9))
        if not (kinds == _MSGPACK_FLOAT64).all():  # pragma: no cover - a None changes the length
            return None
        big_endian = np.ndarray((n, d), dtype=">f8", buffer=blob, offset=outer + inner + 1, strides=(stride, 9))
        return big_endian.astype(np.float64)


_MINUS = ord("-")


def null_non_finite_tokens(piece: Any) -> bytes | None:
    """The piece with each ``NaN`` / ``Infinity`` / ``-Infinity`` token outside strings as
    ``null``, or None when it has none (or holds a backslash: counting quotes is then unsafe).

    msgspec refuses these tokens even under a key it skips; json.dump writes them for missing
    floats. As ``null`` they decode where nothing is read (a leakage key typed ``float | None``,
    metadata, an unknown key); where a feature or the target is read the decode still fails.
    """
    data = bytes(piece)
    if b"\\" in data:
        return None
    spans = []  # bytes.find, not a regex: a regex alternation tries every byte, 20x slower
    for token in (b"NaN", b"Infinity"):
        i = data.find(token)
        while i >= 0:
            start = i - 1 if token == b"Infinity" and i > 0 and data[i - 1] == _MINUS else i
            spans.append((start, i + len(token)))
            i = data.find(token, i + len(token))
    if not spans:
        return None
    spans.sort()
    out: list[bytes] = []
    quotes = 0  # quotes before the token: odd means it is inside a string
    prev = 0
    for start, end in spans:
        quotes += data.count(b'"', prev, start)
        out.append(data[prev:start])
        out.append(data[start:end] if quotes % 2 else b"null")
        prev = end
    out.append(data[prev:])
    return b"".join(out)
