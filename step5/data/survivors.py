"""Load ``survivors_with_scores.json`` into a feature matrix and a target vector.

A survivors file is a JSON array of records shaped like (SPEC section 2)::

    {"seed": 123456, "score": 0.31,
     "features": {"score": 0.31, "confidence": 0.2, "lane_agreement_8": 0.12, ...},
     "metadata": {"prng_type": "java_lcg", "mod": 1000},
     "holdout_hits": 0.001, "holdout_quality": 0.2742}

Real files hold ~90 feature keys and up to millions of records, so the loader is built for
speed: orjson parses the file, one Python pass per record does only C-level work
(``operator.itemgetter`` pulls the values in column order, whatever the record's key
order), and value types are checked for the whole matrix at once. Only when that bulk
check fails does a slow per-record scan run, to name the first bad record and key.

Decisions where the spec is silent:

* the feature set is the union of the keys of all records; a record lacking a key gets 0.0
  and the fills are counted (logged once, returned in :attr:`SurvivorTable.missing_fills`);
* besides the leakage set, the target column is never an input: with ``--target
  lane_agreement_8`` that key is excluded from the features too;
* ints are numbers, bools are not (``true`` is not a feature value);
* a value that is finite as a float64 but overflows float32 (the matrix dtype) is an error.
"""
from __future__ import annotations

import gc
import logging
import math
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from operator import itemgetter
from typing import Any, Callable, Iterator, NoReturn, Sequence

import numpy as np

from step5.errors import DataError
from step5.jsonio import read_json_file

logger = logging.getLogger(__name__)

#: Keys that describe the outcome a model is judged on; never model inputs.
LEAKAGE_COLUMNS: tuple[str, ...] = ("score", "confidence", "holdout_hits", "holdout_quality")

#: Default target column (``--target``).
DEFAULT_TARGET = "holdout_quality"

_NUMBER_TYPES = frozenset((int, float))
_FLOAT64_MAX = float(np.finfo(np.float64).max)
_MISSING = object()


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

    @property
    def n_features(self) -> int:
        """Number of feature columns (``X.shape[1]``)."""
        return int(self.X.shape[1])


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while millions of acyclic objects are built.

    Parsing and tabulating creates a dict per record and a tuple per row; every few hundred
    allocations the collector would walk all of them again, which doubles the load time of
    a 200k-record file (about 12 s instead of 6 s). Nothing built here forms cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _is_number(v: Any) -> bool:
    """A finite JSON number that fits a float64 (bools are not numbers here)."""
    t = type(v)
    if t is float:
        return math.isfinite(v)
    if t is int:
        return -_FLOAT64_MAX <= v <= _FLOAT64_MAX
    return False


def _describe(v: Any) -> str:
    text = repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(v).__name__})"


def _records_list(data: Any, source: str) -> list[Any]:
    if not isinstance(data, list):
        raise DataError(f"survivors file {source}: expected a JSON array of records, got {type(data).__name__}")
    if not data:
        raise DataError(f"survivors file {source}: the array is empty, there are no records")
    return data


def _features_of(rec: Any, i: int, source: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise DataError(f"survivors file {source}: record {i} must be a JSON object, got {type(rec).__name__}")
    feats = rec.get("features", _MISSING)
    if feats is _MISSING:
        raise DataError(f"survivors file {source}: record {i} has no `features` object")
    if not isinstance(feats, dict):
        raise DataError(
            f"survivors file {source}: record {i}: `features` must be a JSON object, got {type(feats).__name__}"
        )
    return feats


def _gather_rows(
    feature_dicts: Sequence[dict[str, Any]], names: Sequence[str]
) -> tuple[list[tuple[Any, ...]], int, int]:
    """Pull each record's values in ``names`` order; returns (rows, cells filled, records filled).

    ``itemgetter`` does the lookups in C and does not care about the record's key order;
    a ``KeyError`` sends only that record down the slower filling path.
    """
    if len(names) == 1:  # itemgetter with one key returns a bare value, not a tuple
        key = names[0]
        getter: Callable[[dict[str, Any]], tuple[Any, ...]] = lambda d: (d[key],)  # noqa: E731
    else:
        getter = itemgetter(*names)
    rows: list[tuple[Any, ...]] = []
    append = rows.append
    fills = 0
    filled_records = 0
    for feats in feature_dicts:
        try:
            append(getter(feats))
        except KeyError:
            row = tuple(feats.get(k, _MISSING) for k in names)
            n_missing = sum(1 for v in row if v is _MISSING)
            fills += n_missing
            filled_records += 1
            append(tuple(0.0 if v is _MISSING else v for v in row))
    return rows, fills, filled_records


def _to_matrix(
    rows: list[tuple[Any, ...]],
    feature_dicts: Sequence[dict[str, Any]],
    names: Sequence[str],
    source: str,
) -> np.ndarray:
    """Validate all values at once and build the (n, d) float32 matrix.

    ``set(map(type, ...))`` runs in C over every cell; only if it finds a non-number (or the
    matrix holds a non-finite value) does :func:`_locate_bad_feature` scan record by record.
    """
    n, d = len(rows), len(names)
    types = set(map(type, chain.from_iterable(rows)))
    if not types <= _NUMBER_TYPES:
        _locate_bad_feature(feature_dicts, names, source)
    try:
        X64 = np.fromiter(chain.from_iterable(rows), dtype=np.float64, count=n * d).reshape(n, d)
    except OverflowError:  # an int too large for a float64
        _locate_bad_feature(feature_dicts, names, source)
    if not np.isfinite(X64).all():
        _locate_bad_feature(feature_dicts, names, source)
    with np.errstate(over="ignore"):
        X = X64.astype(np.float32)
    if not np.isfinite(X).all():
        i, j = (int(v) for v in np.argwhere(~np.isfinite(X))[0])
        raise DataError(
            f"survivors file {source}: record {i}: feature {names[j]!r} = {float(X64[i, j])!r} "
            f"does not fit in float32 (max {float(np.finfo(np.float32).max):.3g})"
        )
    return X


def _locate_bad_feature(feature_dicts: Sequence[dict[str, Any]], names: Sequence[str], source: str) -> NoReturn:
    """Raise a :class:`DataError` naming the first record and key holding a bad value."""
    for i, feats in enumerate(feature_dicts):
        for k in names:
            v = feats.get(k, 0.0)
            if not _is_number(v):
                raise DataError(
                    f"survivors file {source}: record {i}: feature {k!r} must be a finite number, got {_describe(v)}"
                )
    raise AssertionError("bulk check failed but no bad value was found")  # pragma: no cover


def _log_fills(fills: int, filled_records: int, n: int, source: str) -> None:
    if fills:
        logger.warning(
            "survivors file %s: %d record(s) of %d lacked some feature key(s); filled %d value(s) with 0.0",
            source,
            filled_records,
            n,
            fills,
        )


def _most_common(counts: Counter[Any]) -> Any:
    if not counts:
        return None
    # ties go to the smallest value, so the answer does not depend on record order
    top = max(counts.values())
    return min(v for v, c in counts.items() if c == top)


@_gc_paused()
def table_from_records(
    records: Any, target: str = DEFAULT_TARGET, *, source: str = "<records>"
) -> SurvivorTable:
    """Build a :class:`SurvivorTable` from already-parsed records (what ``load_survivors`` reads).

    ``source`` names the records in error messages and becomes ``source_file``.
    """
    if not isinstance(target, str) or not target:
        raise ValueError(f"`target` must be a non-empty string, got {target!r}")
    records = _records_list(records, source)
    n = len(records)

    feature_dicts: list[dict[str, Any]] = []
    targets: list[Any] = []
    all_keys: set[str] = set()
    prng_counts: Counter[str] = Counter()
    mod_counts: Counter[int] = Counter()
    for i, rec in enumerate(records):
        feats = _features_of(rec, i, source)
        feature_dicts.append(feats)
        all_keys.update(feats)
        t = feats.get(target, _MISSING)
        if t is _MISSING:
            t = rec.get(target, _MISSING)
        if t is _MISSING:
            raise DataError(
                f"survivors file {source}: record {i} has no target {target!r} "
                f"(looked in `features` and at the top level)"
            )
        targets.append(t)
        meta = rec.get("metadata")
        if isinstance(meta, dict):
            p = meta.get("prng_type")
            if isinstance(p, str):
                prng_counts[p] += 1
            m = meta.get("mod")
            if type(m) is int:
                mod_counts[m] += 1

    if not all(map(_is_number, targets)):
        for i, t in enumerate(targets):
            if not _is_number(t):
                raise DataError(
                    f"survivors file {source}: record {i}: target {target!r} must be a finite number, got {_describe(t)}"
                )
    y = np.asarray(targets, dtype=np.float64)

    excluded = sorted(k for k in all_keys if k in LEAKAGE_COLUMNS or k == target)
    names = sorted(k for k in all_keys if k not in LEAKAGE_COLUMNS and k != target)
    if not names:
        raise DataError(
            f"survivors file {source}: no feature columns left after excluding {excluded} "
            f"(leakage keys {list(LEAKAGE_COLUMNS)} and the target are never inputs)"
        )

    rows, fills, filled_records = _gather_rows(feature_dicts, names)
    X = _to_matrix(rows, feature_dicts, names, source)
    del rows
    _log_fills(fills, filled_records, n, source)

    return SurvivorTable(
        X=X,
        y=y,
        feature_names=names,
        excluded_features=excluded,
        missing_fills=fills,
        source_file=source,
        target=target,
        n_records=n,
        prng_type=_most_common(prng_counts),
        mod=_most_common(mod_counts),
        prng_type_counts=dict(prng_counts),
        mod_counts=dict(mod_counts),
    )


def load_survivors(path: str | os.PathLike[str], target: str = DEFAULT_TARGET) -> SurvivorTable:
    """Read a survivors file into inputs ``X`` and target ``y``; see the module docstring.

    Raises :class:`DataError` naming the file, record index and key for malformed input.
    """
    source = os.fspath(path)
    with _gc_paused():
        data = read_json_file(path, "survivors")
        return table_from_records(data, target, source=source)


@_gc_paused()
def feature_matrix_from_records(
    records: Any, feature_names: Sequence[str], *, source: str = "<records>"
) -> np.ndarray:
    """Build the (n, d) float32 matrix of already-parsed records in ``feature_names`` order.

    For prediction (Step 6): no target is needed, keys not in ``feature_names`` are ignored,
    missing keys are filled with 0.0 (and counted in a warning), bad values are errors.
    """
    names = list(feature_names)
    if not names or not all(isinstance(k, str) for k in names):
        raise ValueError(f"`feature_names` must be a non-empty list of strings, got {feature_names!r}")
    if len(set(names)) != len(names):
        dupes = sorted(k for k, c in Counter(names).items() if c > 1)
        raise ValueError(f"`feature_names` has duplicates: {dupes}")
    records = _records_list(records, source)
    feature_dicts = [_features_of(rec, i, source) for i, rec in enumerate(records)]
    rows, fills, filled_records = _gather_rows(feature_dicts, names)
    X = _to_matrix(rows, feature_dicts, names, source)
    _log_fills(fills, filled_records, len(records), source)
    return X


def load_feature_matrix(path: str | os.PathLike[str], feature_names: Sequence[str]) -> np.ndarray:
    """Read a survivors file's features in the given column order (float32, shape (n, d)).

    Used to predict on new survivors with a trained model's feature schema.
    """
    with _gc_paused():
        data = read_json_file(path, "survivors")
        return feature_matrix_from_records(data, feature_names, source=os.fspath(path))
