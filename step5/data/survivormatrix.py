"""Survivor records to a checked float32 feature matrix (used by :mod:`step5.data.survivors`).

What the survivors loader does below the level of a file: the shape checks of one record
(an object with a ``features`` object), the value checks of a batch of records (finite
numbers that fit a float32), the 0.0 fills of absent keys, and the assembly of the
matrix from batches whose columns grow as new keys turn up. Every error names the file,
the record index, its seed and the key (:class:`~step5.errors.DataError`). Reading the
file, decoding pieces and collecting the target and metadata stay in
:mod:`step5.data.survivors`.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from itertools import chain
from operator import itemgetter
from typing import Any, Callable, NoReturn, Sequence

import numpy as np

from step5.errors import DataError

_NUMBER_TYPES = frozenset((int, float))
_FLOAT64_MAX = float(np.finfo(np.float64).max)

#: Marks a key a record lacks (``None`` is a value a record can hold).
MISSING = object()


def is_number(v: Any) -> bool:
    """A finite JSON number that fits a float64 (bools are not numbers here)."""
    t = type(v)
    if t is float:
        return math.isfinite(v)
    if t is int:
        return -_FLOAT64_MAX <= v <= _FLOAT64_MAX
    return False


def describe_value(v: Any) -> str:
    """A bad value for an error message: its repr (cut at 60 characters) and its type."""
    text = repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(v).__name__})"


def records_list(data: Any, source: str) -> list[Any]:
    """``data`` when it is a non-empty JSON array; otherwise the error naming ``source``."""
    if not isinstance(data, list):
        raise DataError(f"survivors file {source}: expected a JSON array of records, got {type(data).__name__}")
    if not data:
        raise DataError(f"survivors file {source}: the array is empty, there are no records")
    return data


def seed_note(seed: Any) -> str:
    """`` [seed 123]``, appended to an error about a record; empty when it has no seed."""
    if seed is None:
        return ""
    text = repr(seed)
    if len(text) > 40:
        text = text[:37] + "..."
    return f" [seed {text}]"


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
    """Pull each record's values in ``names`` order; returns (rows, fills per key, records filled).

    ``itemgetter`` does the lookups in C and does not care about the record's key order;
    a ``KeyError`` sends only that record down the slower filling path.
    """
    if len(names) == 1:  # itemgetter with one key returns a bare value, not a tuple
        key = names[0]
        getter: Callable[[dict[str, Any]], tuple[Any, ...]] = lambda d: (d[key],)  # noqa: E731
    elif not names:
        getter = lambda d: ()  # noqa: E731
    else:
        getter = itemgetter(*names)
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


def to_matrix(
    rows: list[tuple[Any, ...]],
    feature_dicts: Sequence[dict[str, Any]],
    names: Sequence[str],
    where: BatchPlace,
) -> np.ndarray:
    """Validate all values at once and build the (n, d) float32 matrix.

    ``set(map(type, ...))`` runs in C over every cell; only if it finds a non-number (or the
    matrix holds a non-finite value) does :func:`_locate_bad_feature` scan record by record.
    """
    n, d = len(rows), len(names)
    types = set(map(type, chain.from_iterable(rows)))
    if not types <= _NUMBER_TYPES:
        _locate_bad_feature(feature_dicts, names, where)
    try:
        X64 = np.fromiter(chain.from_iterable(rows), dtype=np.float64, count=n * d).reshape(n, d)
    except OverflowError:  # an int too large for a float64
        _locate_bad_feature(feature_dicts, names, where)
    if not np.isfinite(X64).all():
        _locate_bad_feature(feature_dicts, names, where)
    return to_float32(X64, names, where)


def to_float32(X64: np.ndarray, names: Sequence[str], where: BatchPlace) -> np.ndarray:
    """The finite float64 matrix as float32; a value beyond float32's range is an error."""
    with np.errstate(over="ignore"):
        X = X64.astype(np.float32)
    if not np.isfinite(X).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(X))[0])
        raise DataError(
            f"survivors file {where.source}: record {where.base + i}: feature {names[j]!r} = {float(X64[i, j])!r} "
            f"does not fit in float32 (max {float(np.finfo(np.float32).max):.3g}){seed_note(where.seeds[i])}"
        )
    return X


def _locate_bad_feature(feature_dicts: Sequence[dict[str, Any]], names: Sequence[str], where: BatchPlace) -> NoReturn:
    """Raise a :class:`DataError` naming the first record and key holding a bad value."""
    for i, feats in enumerate(feature_dicts):
        for k in names:
            v = feats.get(k, 0.0)
            if not is_number(v):
                raise DataError(
                    f"survivors file {where.source}: record {where.base + i}: feature {k!r} must be a finite number, "
                    f"got {describe_value(v)}{seed_note(where.seeds[i])}"
                )
    raise AssertionError("bulk check failed but no bad value was found")  # pragma: no cover


def fill_absent(F: np.ndarray, names: Sequence[str]) -> tuple[Counter[str], int]:
    """Set the NaN cells (keys a decoded record lacked) of ``F`` to 0.0, in place;
    returns (fills per key, records filled)."""
    absent = np.isnan(F)
    if not absent.any():
        return Counter(), 0
    per_key = absent.sum(axis=0)
    F[absent] = 0.0
    fills = Counter({names[j]: int(c) for j, c in enumerate(per_key) if c})
    return fills, int(absent.any(axis=1).sum())


@dataclass
class BatchPlace:
    """Where a batch of records sits, for error messages."""

    source: str
    base: int  # file index of the batch's first record
    seeds: Sequence[Any]  # the batch's seeds


class MatrixParts:
    """The matrix's rows as they arrive, batch by batch, each batch with the columns known then.

    A key first seen in a later batch is a column the earlier batches lack: assembling
    fills it with 0.0 for them and counts the fills, exactly as if every record had been
    read before the columns were fixed.
    """

    def __init__(self) -> None:
        self._parts: list[tuple[np.ndarray, tuple[str, ...], Counter[str], int]] = []
        self.n = 0

    def add(self, X: np.ndarray, names: tuple[str, ...], fills: Counter[str], filled_records: int) -> None:
        self._parts.append((X, names, fills, filled_records))
        self.n += len(X)

    def assemble(self, names: Sequence[str]) -> tuple[np.ndarray, Counter[str], int]:
        """The (n, d) float32 matrix in ``names`` order; (matrix, fills per key, records filled)."""
        column = {k: j for j, k in enumerate(names)}
        X = np.zeros((self.n, len(names)), dtype=np.float32)
        fills: Counter[str] = Counter()
        filled_records = 0
        row = 0
        layouts: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}  # part names -> (columns, lacking)
        self._parts.reverse()
        while self._parts:  # pop as we go: the parts and X are not both held in full
            part, part_names, part_fills, part_filled = self._parts.pop()
            if part_names not in layouts:
                present = set(part_names)
                layouts[part_names] = ([column[k] for k in part_names], [k for k in names if k not in present])
            columns, lacking = layouts[part_names]
            m = len(part)
            X[row : row + m, columns] = part
            fills.update(part_fills)
            for k in lacking:
                fills[k] += m
            filled_records += m if lacking else part_filled
            row += m
        return X, fills, filled_records
