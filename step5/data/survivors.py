"""Load ``survivors_with_scores.json`` into a feature matrix and a target vector (SPEC section 2).

The file is never parsed whole (docs/data.md, "How a file is read")::

    file --ArrayReader--> pieces of ~1 MiB --RecordDecoder (msgspec structs)--> float columns --+
                              |                                                                  +--> X, y
                              +--(piece does not decode)--> stdlib json, record by record --> checks-+

Every error message is made on the exact path, naming the file, the record index, its seed and the key.
"""
from __future__ import annotations

import gc
import logging
import math
import os
import re
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from operator import attrgetter, itemgetter
from typing import Any, Iterator, Sequence

import msgspec
import numpy as np

from step5.data.arrayreader import ArrayReader
from step5.errors import DataError
from step5.fsutil import os_error_reason
from step5.jsonio import parse_json_bytes

logger = logging.getLogger(__name__)

#: Keys that describe the outcome a model is judged on; never model inputs.
LEAKAGE_COLUMNS: tuple[str, ...] = ("score", "confidence", "holdout_hits", "holdout_quality")

#: Default target column (``--target``).
DEFAULT_TARGET = "holdout_quality"

#: Marks a key a record lacks (``None`` is a value a record can hold).
MISSING = object()

_NUMBER_TYPES = frozenset((int, float))
_FLOAT64_MAX = float(np.finfo(np.float64).max)


@dataclass
class SurvivorTable:
    """A loaded survivors file: model inputs, target and what the sidecar records about them."""

    X: np.ndarray  # (n, d) float32, columns in ``feature_names`` order
    y: np.ndarray  # (n,) float64 target values
    feature_names: list[str]  # sorted feature keys minus leakage (and minus the target)
    excluded_features: list[str]  # leakage/target keys that were present in `features`
    missing_fills: int  # number of (record, key) cells filled with 0.0
    source_file: str  # the path as given, for the sidecar
    target: str  # the target column name
    n_records: int  # number of records in the file (== len(y))
    prng_type: str | None = None  # most common metadata.prng_type, None if never given
    mod: int | None = None  # most common metadata.mod, None if never given
    prng_type_counts: dict[str, int] = field(default_factory=dict)  # every prng_type seen
    mod_counts: dict[int, int] = field(default_factory=dict)  # every mod seen
    missing_by_feature: dict[str, int] = field(default_factory=dict)  # feature -> cells filled (only > 0)

    @property
    def n_features(self) -> int:
        return int(self.X.shape[1])


@dataclass
class SurvivorFeatures:
    """A survivors file read for prediction: inputs in a given column order, and the seeds."""

    X: np.ndarray  # (n, d) float32, columns in ``feature_names`` order
    seeds: list[Any]  # each record's `seed` in file order (None where a record has none)
    feature_names: list[str]  # the column order asked for
    missing_fills: int  # number of (record, key) cells filled with 0.0
    missing_by_feature: dict[str, int]  # feature -> cells filled (only features with fills)
    source_file: str  # the path as given

    @property
    def n_records(self) -> int:
        return int(self.X.shape[0])


#: Top-level keys the decoder reads itself; a target with one of these names cannot be decoded.
RESERVED_KEYS = frozenset(("seed", "features", "metadata"))

#: What msgspec refuses in a renamed field's name, so a key holding it cannot be a decoded column: a
#: lone surrogate (``"\\ud800"`` in the file, which json reads) cannot even be encoded as UTF-8.
_NOT_A_FIELD_NAME = re.compile(r'["\\\x00-\x1f\ud800-\udfff]')
_LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")


def decodable_key(key: str) -> bool:
    """Whether ``key`` can be a :class:`RecordDecoder` column (msgspec refuses to rename a field to a
    name with ``"``, ``\\``, a control character or a lone surrogate; a file with such a key takes the
    exact path)."""
    return _NOT_A_FIELD_NAME.search(key) is None


def is_unicode(text: str) -> bool:
    """Whether ``text`` can be written as UTF-8 (no lone surrogate, which a ``\\udXXX`` escape in a
    JSON file makes): the sidecar, the fingerprint and every log line need that."""
    return text.isascii() or _LONE_SURROGATE.search(text) is None


@dataclass
class DecodedPiece:
    """One piece of the file, decoded."""

    values: np.ndarray  # (n, len(columns)) float64; NaN where the record lacks the key
    top_target: np.ndarray | None  # (n,) float64 top-level target, NaN where absent
    seeds: list[Any]  # each record's `seed` (None when absent)
    prng_types: list[Any]  # metadata.prng_type of the records that have metadata
    mods: list[Any]  # metadata.mod of the records that have metadata


def _array_header_size(length: int) -> int:
    """Bytes of a MessagePack array header for ``length`` items (fixarray, array 16, array 32)."""
    return 1 if length < 16 else 3 if length < 1 << 16 else 5


class RecordDecoder:
    """Decodes pieces (JSON arrays of records): the `features` keys ``columns`` as floats, in this
    order (NaN when absent; null also allowed in the ``unread`` ones, the leakage keys); with
    ``closed``, another key in `features` fails the decode (so new keys are noticed); ``target``,
    a top-level key read as a float (NaN when absent); with ``metadata``, its prng_type / mod."""

    def __init__(self, columns: tuple[str, ...], *, closed: bool, unread: frozenset[str],
                 target: str | None = None, metadata: bool = False) -> None:
        self.columns, self.target, self.metadata = columns, target, metadata
        # Field names are c0, c1, ... renamed to the keys: keys need not be identifiers.
        features = msgspec.defstruct(
            "Features",
            [(f"c{j}", float | None if key in unread else float, math.nan) for j, key in enumerate(columns)],
            rename={f"c{j}": key for j, key in enumerate(columns)},
            forbid_unknown_fields=closed,
            gc=False,
        )
        # an absent seed is UNSET (None once decoded), so a `null` seed, which a NaN token nulled may be, is told apart
        fields: list[Any] = [("seed", Any, msgspec.UNSET), ("features", features)]
        if metadata:
            meta = msgspec.defstruct("Metadata", [("prng_type", Any, None), ("mod", Any, None)], gc=False)
            fields.append(("metadata", meta | None, None))
        rename = None
        if target is not None:
            fields.append(("target_", float, math.nan))
            rename = {"target_": target}
        record = msgspec.defstruct("Record", fields, rename=rename, kw_only=True, gc=False)
        self._decoder = msgspec.json.Decoder(list[record])
        self._msgpack = msgspec.msgpack.Encoder()
        self._read_columns = [j for j, key in enumerate(columns) if key not in unread]
        fields = [f"c{j}" for j in self._read_columns]
        # attrgetter of one field returns a bare value, of none it fails: such rows are built one by one
        self._read_getter = attrgetter(*fields) if len(fields) > 1 else lambda s: tuple(getattr(s, f) for f in fields)

    def decode(self, piece: Any, *, nulled: bool = False) -> DecodedPiece | None:
        """Decode a piece (bytes-like); a msgspec error if it does not fit. With ``nulled`` (its
        ``NaN`` / ``Infinity`` tokens made ``null``), None when a record's seed is ``null``: it may
        have been such a token, which the exact way reads as the float it is."""
        records = self._decoder.decode(piece)
        seeds = list(map(attrgetter("seed"), records))
        if nulled and None in seeds:
            return None
        if msgspec.UNSET in seeds:
            seeds = [None if s is msgspec.UNSET else s for s in seeds]
        values = self._float_rows(list(map(attrgetter("features"), records)))
        top_target = None
        if self.target is not None:
            top_target = np.fromiter(map(attrgetter("target_"), records), dtype=np.float64, count=len(records))
        prng_types: list[Any] = []
        mods: list[Any] = []
        if self.metadata:
            metas = [m for m in map(attrgetter("metadata"), records) if m is not None]
            prng_types = list(map(attrgetter("prng_type"), metas))
            mods = list(map(attrgetter("mod"), metas))
        return DecodedPiece(values, top_target, seeds, prng_types, mods)

    def _float_rows(self, structs: Sequence[Any]) -> np.ndarray:
        """The structs' fields as an (n, d) float64 matrix. A null in an unread column (a
        ``NaN`` token there) breaks the fixed stride; then only the read columns are taken."""
        n, d = len(structs), len(self.columns)
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
        """``rows`` (n tuples of d floats) as an (n, d) float64 matrix; None if one is a None. msgspec
        writes every float as a float64 (9 bytes) and None as 1 byte, so the length tells."""
        n = len(rows)
        blob = self._msgpack.encode(rows)
        outer, inner = _array_header_size(n), _array_header_size(d)
        stride = inner + 9 * d
        if len(blob) != outer + n * stride:
            return None
        big_endian = np.ndarray((n, d), dtype=">f8", buffer=blob, offset=outer + inner + 1, strides=(stride, 9))
        return big_endian.astype(np.float64)


_MINUS = ord("-")


def null_non_finite_tokens(piece: Any) -> bytes | None:
    """The piece with each ``NaN`` / ``Infinity`` / ``-Infinity`` token outside strings as
    ``null``, or None when it has none (or holds a backslash: counting quotes is then unsafe).
    Why, and where ``null`` decodes: docs/data.md, "How a file is read"."""
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


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while many acyclic objects are built: it would walk all of them every
    few hundred allocations (that doubled the load time of a 200k-record file read as dicts)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def is_number(v: Any) -> bool:
    """A finite JSON number that fits a float64 (bools are not numbers here)."""
    t = type(v)
    if t is float:
        return math.isfinite(v)
    if t is int:
        return -_FLOAT64_MAX <= v <= _FLOAT64_MAX
    return False


def _shortened(v: Any, width: int) -> str:
    text = repr(v)
    return text if len(text) <= width else text[: width - 3] + "..."


def describe_value(v: Any) -> str:
    """A bad value for an error message: its repr (cut at 60 characters) and its type."""
    return f"{_shortened(v, 60)} ({type(v).__name__})"


def records_list(data: Any, source: str) -> list[Any]:
    """``data`` when it is a non-empty JSON array; otherwise the error naming ``source``."""
    if not isinstance(data, list):
        raise DataError(f"survivors file {source}: expected a JSON array of records, got {type(data).__name__}")
    if not data:
        raise DataError(f"survivors file {source}: the array is empty, there are no records")
    return data


def seed_note(seed: Any) -> str:
    """`` [seed 123]``, appended to an error about a record; empty when it has no seed."""
    return "" if seed is None else f" [seed {_shortened(seed, 40)}]"


def features_of(rec: Any, i: int, source: str) -> dict[str, Any]:
    """Record ``i``'s ``features`` object; an error naming the record when it has none."""
    if not isinstance(rec, dict):
        raise DataError(f"survivors file {source}: record {i} must be a JSON object, got {type(rec).__name__}")
    feats = rec.get("features", MISSING)
    if feats is MISSING:
        raise DataError(f"survivors file {source}: record {i} has no `features` object{seed_note(rec.get('seed'))}")
    if not isinstance(feats, dict):
        raise DataError(
            f"survivors file {source}: record {i}: `features` must be a JSON object, got {type(feats).__name__}"
            + seed_note(rec.get("seed"))
        )
    return feats


def gather_rows(
    feature_dicts: Sequence[dict[str, Any]], names: Sequence[str]
) -> tuple[list[tuple[Any, ...]], Counter[str], int]:
    """Each record's values in ``names`` order, absent ones 0.0; returns (rows, fills per key,
    records filled). ``itemgetter`` looks up in C; a ``KeyError`` sends that record to the slow path."""
    # itemgetter of one key returns a bare value, of none it fails: such rows are built one by one
    getter = itemgetter(*names) if len(names) > 1 else lambda d: tuple(d[k] for k in names)
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    fills: Counter[str] = Counter()
    filled_records = 0
    for feats in feature_dicts:
        try:
            append(getter(feats))
        except KeyError:
            row = tuple(feats.get(k, MISSING) for k in names)
            fills.update(k for k, v in zip(names, row) if v is MISSING)
            filled_records += 1
            append(tuple(0.0 if v is MISSING else v for v in row))
    return rows, fills, filled_records


class _Collector:
    """The matrix's rows as they arrive, batch by batch, each batch with the columns known then,
    checked as they come. A key first seen in a later batch is a column the earlier batches lack:
    assembling fills it with 0.0 for them and counts the fills, as if the file had been read whole."""

    def __init__(self, source: str) -> None:
        self.source = source
        self._parts: list[tuple[np.ndarray, tuple[str, ...], Counter[str], int]] = []
        self.n = 0
        self._decoder: RecordDecoder | None = None
        self._take: list[int] = []  # where the batch's names sit among the decoder's columns

    def decoder(self) -> RecordDecoder | None:
        """The typed decoder for the next piece; None sends it down the exact path."""
        return self._decoder

    def add_records(self, records: Sequence[Any], base: int) -> None:
        """Check and add parsed records (dicts); ``base`` is the first one's index in the file.
        A batch is checked one kind of problem after another (record shapes, targets, values; keys
        in the order first seen), so when it fails its records are checked one at a time, each on
        its own: the error names the first bad record and, in it, the first bad key in file order
        (as whichever pieces the file was cut into)."""
        try:
            self._add_records(records, base)
        except DataError:
            for k, rec in enumerate(records):
                self._blank()._add_records([rec], base + k)
            raise

    def _add_records(self, records: Sequence[Any], base: int) -> None:
        raise NotImplementedError

    def _blank(self) -> _Collector:
        """A new collector like this one, with nothing collected (to check a record on its own)."""
        raise NotImplementedError

    def _add_dicts(self, feature_dicts: list[dict[str, Any]], names: tuple[str, ...], base: int,
                   seeds: Sequence[Any]) -> None:
        """Check parsed records' values and add them as a batch with columns ``names``; the
        check runs in C (``set(map(type, ...))``) and goes record by record only for the message."""
        rows, fills, filled_records = gather_rows(feature_dicts, names)
        n, d = len(rows), len(names)
        X64 = None
        if set(map(type, chain.from_iterable(rows))) <= _NUMBER_TYPES:
            try:
                X64 = np.fromiter(chain.from_iterable(rows), dtype=np.float64, count=n * d).reshape(n, d)
            except OverflowError:  # an int too large for a float64
                pass
        if X64 is None or not np.isfinite(X64).all():
            for i, feats in enumerate(feature_dicts):
                for k in names:
                    v = feats.get(k, 0.0)
                    if not is_number(v):
                        raise DataError(
                            f"survivors file {self.source}: record {base + i}: feature {k!r} must be a finite "
                            f"number, got {describe_value(v)}{seed_note(seeds[i])}"
                        )
            raise AssertionError("bulk check failed but no bad value was found")  # pragma: no cover
        self._add(X64, names, fills, filled_records, base, seeds)

    def _add_decoded(self, piece: DecodedPiece, names: tuple[str, ...], base: int) -> None:
        """Add a decoded piece's columns ``self._take`` as ``names``; NaN (absent) becomes 0.0."""
        F = piece.values[:, self._take]
        absent = np.isnan(F)
        fills: Counter[str] = Counter()
        filled_records = 0
        if absent.any():
            F[absent] = 0.0
            fills.update({names[j]: int(c) for j, c in enumerate(absent.sum(axis=0)) if c})
            filled_records = int(absent.any(axis=1).sum())
        self._add(F, names, fills, filled_records, base, piece.seeds)

    def _add(self, X64: np.ndarray, names: tuple[str, ...], fills: Counter[str], filled_records: int, base: int,
             seeds: Sequence[Any]) -> None:
        """Keep the finite float64 batch as float32; a value beyond float32's range is an error."""
        with np.errstate(over="ignore"):
            X = X64.astype(np.float32)
        if not np.isfinite(X).all():
            i, j = (int(v) for v in np.argwhere(~np.isfinite(X))[0])
            raise DataError(
                f"survivors file {self.source}: record {base + i}: feature {names[j]!r} = {float(X64[i, j])!r} "
                f"does not fit in float32 (max {float(np.finfo(np.float32).max):.3g}){seed_note(seeds[i])}"
            )
        self._parts.append((X, names, fills, filled_records))
        self.n += len(X)

    def _assemble(self, names: Sequence[str]) -> tuple[np.ndarray, Counter[str]]:
        """The (n, d) float32 matrix in ``names`` order and the fills per key (logged)."""
        column = {k: j for j, k in enumerate(names)}
        X = np.zeros((self.n, len(names)), dtype=np.float32)
        fills: Counter[str] = Counter()
        filled_records = 0
        row = 0
        self._parts.reverse()
        while self._parts:  # pop as we go: the parts and X are not both held in full
            part, part_names, part_fills, part_filled = self._parts.pop()
            present = set(part_names)
            lacking = [k for k in names if k not in present]
            m = len(part)
            X[row : row + m, [column[k] for k in part_names]] = part
            fills.update(part_fills)
            for k in lacking:
                fills[k] += m
            filled_records += m if lacking else part_filled
            row += m
        if total := sum(fills.values()):
            logger.warning("survivors file %s: %d record(s) of %d lacked some feature key(s); filled %d value(s) "
                           "with 0.0", self.source, filled_records, self.n, total)
        return X, fills


def _most_common(counts: Counter[Any]) -> Any:
    if not counts:
        return None
    # ties go to the smallest value, so the answer does not depend on record order
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)


class _TableBuilder(_Collector):
    """Collects a survivors file for training: features (every key seen), target and metadata."""

    def __init__(self, target: str, source: str) -> None:
        if not isinstance(target, str) or not target:
            raise ValueError(f"`target` must be a non-empty string, got {target!r}")
        super().__init__(source)
        self.target = target
        self.keys: dict[str, None] = {}  # every key seen in `features`, in first-seen order
        self.ys: list[np.ndarray] = []
        self.prng_counts: Counter[str] = Counter()
        self.mod_counts: Counter[int] = Counter()
        self._names: tuple[str, ...] = ()  # the decoder's feature columns
        self._target_column: int | None = None  # the target's decoder column when `features` holds it

    def _is_feature(self, key: str) -> bool:
        return key not in LEAKAGE_COLUMNS and key != self.target

    def decoder(self) -> RecordDecoder | None:
        """Rebuilt when a key was added; None for a target the decoder cannot read."""
        if self.target in RESERVED_KEYS or not decodable_key(self.target):
            return None
        if self._decoder is None or len(self._decoder.columns) != len(self.keys):
            columns = tuple(self.keys)
            if not all(map(decodable_key, columns)):
                return None  # every column must be a field: such a key keeps the file on the exact path
            unread = frozenset(k for k in columns if not self._is_feature(k) and k != self.target)
            self._decoder = RecordDecoder(columns, closed=True, unread=unread, target=self.target, metadata=True)
            self._take = [j for j, k in enumerate(columns) if self._is_feature(k)]
            self._names = tuple(columns[j] for j in self._take)
            self._target_column = columns.index(self.target) if self.target in columns else None
        return self._decoder

    def _count_metadata(self, prng_types: Sequence[Any], mods: Sequence[Any]) -> None:
        """Count string prng_types (valid Unicode) and int mods (not 1000.0 or true); anything else is
        ignored, never an error."""
        self.prng_counts.update(p for p in prng_types if type(p) is str and is_unicode(p))  # the sidecar writes it
        self.mod_counts.update(m for m in mods if type(m) is int)

    def _no_target(self, i: int, seed: Any) -> DataError:
        return DataError(f"survivors file {self.source}: record {i} has no target {self.target!r} "
                         f"(looked in `features` and at the top level){seed_note(seed)}")

    def _blank(self) -> _TableBuilder:
        return _TableBuilder(self.target, self.source)

    def _add_records(self, records: Sequence[Any], base: int) -> None:
        feature_dicts: list[dict[str, Any]] = []
        targets: list[Any] = []
        seeds: list[Any] = []
        target = self.target
        for i, rec in enumerate(records, start=base):
            feats = features_of(rec, i, self.source)
            seed = rec.get("seed")
            feature_dicts.append(feats)
            seeds.append(seed)
            if not feats.keys() <= self.keys.keys():
                for key in feats.keys() - self.keys.keys():
                    if not is_unicode(key) and self._is_feature(key):
                        # it would be a column name, which the fingerprint and the sidecar cannot write
                        raise DataError(
                            f"survivors file {self.source}: record {i}: feature key {key!r} is not valid Unicode "
                            f"(it holds a lone surrogate escape), so it cannot name a column{seed_note(seed)}"
                        )
                self.keys.update(dict.fromkeys(feats))
            t = feats.get(target, MISSING)
            if t is MISSING:
                t = rec.get(target, MISSING)
            if t is MISSING:
                raise self._no_target(i, seed)
            targets.append(t)
        if not all(map(is_number, targets)):
            for k, t in enumerate(targets):
                if not is_number(t):
                    raise DataError(
                        f"survivors file {self.source}: record {base + k}: target {target!r} must be a finite number, "
                        f"got {describe_value(t)}{seed_note(seeds[k])}"
                    )
        self._add_dicts(feature_dicts, tuple(k for k in self.keys if self._is_feature(k)), base, seeds)
        self.ys.append(np.asarray(targets, dtype=np.float64))
        metas = [meta for meta in (rec.get("metadata") for rec in records) if isinstance(meta, dict)]
        self._count_metadata([meta.get("prng_type") for meta in metas], [meta.get("mod") for meta in metas])

    def add_decoded(self, piece: DecodedPiece, base: int) -> None:
        assert piece.top_target is not None
        y = piece.top_target
        if self._target_column is not None:
            in_features = piece.values[:, self._target_column]
            y = np.where(np.isnan(in_features), y, in_features)
        if np.isnan(y).any():
            k = int(np.flatnonzero(np.isnan(y))[0])
            raise self._no_target(base + k, piece.seeds[k])
        self._add_decoded(piece, self._names, base)
        self.ys.append(y)
        self._count_metadata(piece.prng_types, piece.mods)

    def finish(self) -> SurvivorTable:
        excluded = sorted(k for k in self.keys if not self._is_feature(k))
        names = sorted(k for k in self.keys if self._is_feature(k))
        if not names:
            raise DataError(
                f"survivors file {self.source}: no feature columns left after excluding {excluded} "
                f"(leakage keys {list(LEAKAGE_COLUMNS)} and the target are never inputs)"
            )
        X, fills = self._assemble(names)
        return SurvivorTable(
            X=X, y=np.concatenate(self.ys), feature_names=names, excluded_features=excluded,
            missing_fills=sum(fills.values()), source_file=self.source, target=self.target, n_records=self.n,
            prng_type=_most_common(self.prng_counts), mod=_most_common(self.mod_counts),
            prng_type_counts=dict(self.prng_counts), mod_counts=dict(self.mod_counts),
            missing_by_feature=dict(fills),
        )


class _FeaturesBuilder(_Collector):
    """Collects a survivors file for prediction: the given columns (others ignored) and seeds."""

    def __init__(self, names: Sequence[str], source: str) -> None:
        self.names = tuple(names)
        if not self.names or not all(isinstance(k, str) for k in self.names):
            raise ValueError(f"`feature_names` must be a non-empty list of strings, got {names!r}")
        if len(set(self.names)) != len(self.names):
            dupes = sorted(k for k, c in Counter(self.names).items() if c > 1)
            raise ValueError(f"`feature_names` has duplicates: {dupes}")
        super().__init__(source)
        self.seeds: list[Any] = []

    def _blank(self) -> _FeaturesBuilder:
        return _FeaturesBuilder(self.names, self.source)

    def _add_records(self, records: Sequence[Any], base: int) -> None:
        feature_dicts = [features_of(rec, i, self.source) for i, rec in enumerate(records, start=base)]
        seeds = [rec.get("seed") for rec in records]
        if self._decoder is None and feature_dicts and all(map(decodable_key, self.names)):
            # The decoder's columns: every key of the first record in file order, then the names it
            # lacks. It finds each key where it expects it instead of searching for it (skipping two
            # unknown keys per record cost 30 % more CPU time). Keys other records add are skipped,
            # and so are the first record's keys that cannot be a column (none is a name).
            order = [k for k in feature_dicts[0] if decodable_key(k)]
            order += [k for k in self.names if k not in feature_dicts[0]]
            self._decoder = RecordDecoder(tuple(order), closed=False, unread=frozenset(order) - set(self.names))
            self._take = [order.index(k) for k in self.names]
        self._add_dicts(feature_dicts, self.names, base, seeds)
        self.seeds.extend(seeds)

    def add_decoded(self, piece: DecodedPiece, base: int) -> None:
        self._add_decoded(piece, self.names, base)
        self.seeds.extend(piece.seeds)

    def finish(self) -> SurvivorFeatures:
        X, fills = self._assemble(self.names)
        return SurvivorFeatures(X=X, seeds=self.seeds, feature_names=list(self.names),
                                missing_fills=sum(fills.values()), missing_by_feature=dict(fills),
                                source_file=self.source)


@gc_paused()
def _read_file(path: str | os.PathLike[str], builder: _TableBuilder | _FeaturesBuilder) -> Any:
    """Feed a survivors file to ``builder``, piece by piece (see the module docstring); what it built."""
    source = os.fspath(path)
    try:
        fh = open(source, "rb")
    except FileNotFoundError:
        raise DataError(f"survivors file not found: {source}") from None
    except OSError as exc:
        raise DataError(f"cannot read survivors file {source}: {os_error_reason(exc)}") from None
    with fh:
        reader = ArrayReader(fh, source, "survivors")
        if not reader.open_array():
            # Not an array (or not JSON): parse it whole for the message (a byte-order mark is
            # refused there, as json.load refuses it); one that still holds an array is read whole.
            # From the bytes already read: reopening a pipe gave an empty document, or hung on a FIFO.
            builder.add_records(records_list(parse_json_bytes(reader.rest(), source, "survivors"), source), 0)
            return builder.finish()
        # The first record fixes the decoder's columns; the empty-array error comes from here too.
        builder.add_records(records_list(reader.parse_elements(), source), 0)
        while (piece := reader.next_piece()) is not None:
            base = reader.index
            decoded = _decode(builder.decoder(), piece)
            if decoded is None:
                builder.add_records(reader.parse_elements(), base)
            else:
                reader.accept(len(decoded.seeds))
                builder.add_decoded(decoded, base)
    return builder.finish()


def _decode(decoder: RecordDecoder | None, piece: Any) -> DecodedPiece | None:
    """The piece decoded, or None when it needs the exact path. A piece that fails only
    because of ``NaN`` / ``Infinity`` tokens where nothing is read (what json.dump writes
    for a missing float) is decoded again with them as ``null``: it keeps the fast path."""
    if decoder is None:
        return None
    try:
        return decoder.decode(piece)
    except _UNDECODABLE:
        nulled = null_non_finite_tokens(piece)
    try:
        return None if nulled is None else decoder.decode(nulled, nulled=True)
    except _UNDECODABLE:
        return None


#: What a piece that does not fit the decoder raises; msgspec raises a bare UnicodeDecodeError
#: for bytes that are not UTF-8 inside a string (the exact path names where they are).
_UNDECODABLE = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def load_survivors(path: str | os.PathLike[str], target: str = DEFAULT_TARGET) -> SurvivorTable:
    """Read a survivors file into inputs ``X`` and target ``y``; a :class:`DataError` naming
    the file, record index, seed and key for malformed input."""
    return _read_file(path, _TableBuilder(target, os.fspath(path)))


@gc_paused()
def features_from_records(
    records: Any, feature_names: Sequence[str], *, source: str = "<records>"
) -> SurvivorFeatures:
    """Already-parsed records read for prediction (Step 6), as :func:`load_features` reads a file."""
    builder = _FeaturesBuilder(feature_names, source)
    builder.add_records(records_list(records, source), 0)
    return builder.finish()


def load_features(path: str | os.PathLike[str], feature_names: Sequence[str]) -> SurvivorFeatures:
    """Read a survivors file for prediction: the given columns in that order, and each record's
    seed. Same reading, fills and errors as :func:`load_survivors`; no target is needed and
    keys not in ``feature_names`` are ignored."""
    return _read_file(path, _FeaturesBuilder(feature_names, os.fspath(path)))
