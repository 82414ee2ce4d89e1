"""Load ``survivors_with_scores.json`` into a feature matrix and a target vector.

A survivors file is a JSON array of records shaped like (SPEC section 2)::

    {"seed": 123456, "score": 0.31,
     "features": {"score": 0.31, "confidence": 0.2, "lane_agreement_8": 0.12, ...},
     "metadata": {"prng_type": "java_lcg", "mod": 1000},
     "holdout_hits": 0.001, "holdout_quality": 0.2742}

Real files hold ~90 feature keys and up to millions of records (700 MiB for 200k records
as ``json.dump(..., indent=2)`` writes them), so the file is never parsed whole::

    file --ArrayReader--> pieces of ~1 MiB --RecordDecoder (msgspec structs)--> float columns --+
                              |                                                                  +--> X, y
                              +--(piece does not decode)--> stdlib json, record by record --> checks-+

:class:`~step5.data.arrayreader.ArrayReader` holds one block of the file at a time and cuts
it into pieces of whole records; :class:`~step5.data.recorddecoder.RecordDecoder` decodes a
piece into float columns with a decoder built from the key names (no dict per record).
Any piece that does not decode cleanly (a ``NaN`` token, a string value, a key not seen
before, a record that is not an object, a syntax error) is parsed again exactly, record by
record, by the standard library, and checked with the same code as records built in memory
(:func:`features_from_records`): that is where every error message is made, naming the file,
the record index, its seed and the key. Those record and value checks, the 0.0 fills and
the assembly of the matrix from its pieces live in :mod:`step5.data.survivormatrix`; this
module reads the file, collects the target and the metadata, and builds the tables. Peak memory is about twice the float32 matrix
(the pieces' blocks, then the assembled matrix) plus two blocks of the file, not a
multiple of the file (docs/data.md has the measurements).

Decisions where the spec is silent:

* the feature set is the union of the keys of all records; a record lacking a key gets 0.0
  and the fills are counted (logged once, returned in :attr:`SurvivorTable.missing_fills`);
* besides the leakage set, the target column is never an input: with ``--target
  lane_agreement_8`` that key is excluded from the features too;
* ints are numbers, bools are not (``true`` is not a feature value);
* ``NaN`` / ``Infinity`` / ``-Infinity`` tokens (what Python's ``json`` writes for
  non-finite floats) are read; such a value where a feature or the target is read is an
  error, anywhere else (a leakage key, metadata) it is ignored like the key itself;
* a value that is finite as a float64 but overflows float32 (the matrix dtype) is an error.
"""
from __future__ import annotations

import gc
import logging
import os
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from step5.data.arrayreader import ArrayReader
from step5.data.recorddecoder import (
    DECODE_ERRORS,
    RESERVED_KEYS,
    DecodedPiece,
    RecordDecoder,
    RecordLayout,
    null_non_finite_tokens,
)
from step5.data.survivormatrix import (
    MISSING,
    BatchPlace,
    MatrixParts,
    describe_value,
    features_of,
    fill_absent,
    gather_rows,
    is_number,
    records_list,
    seed_note,
    to_float32,
    to_matrix,
)
from step5.errors import DataError
from step5.jsonio import read_json_file

logger = logging.getLogger(__name__)

#: Keys that describe the outcome a model is judged on; never model inputs.
LEAKAGE_COLUMNS: tuple[str, ...] = ("score", "confidence", "holdout_hits", "holdout_quality")

#: Default target column (``--target``).
DEFAULT_TARGET = "holdout_quality"


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
        """Number of feature columns (``X.shape[1]``)."""
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


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC while many acyclic objects are built.

    Records parsed into dicts (records built in memory, pieces that need the exact path)
    would otherwise make the collector walk all of them again every few hundred
    allocations, which doubled the load time of a 200k-record file when every record was
    a dict. Nothing built here forms cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


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


class _TableBuilder:
    """Collects a survivors file for training: features, target and metadata counts."""

    def __init__(self, target: str, source: str) -> None:
        self.target = target
        self.source = source
        self.keys: dict[str, None] = {}  # every key seen in `features`, in first-seen order
        self.parts = MatrixParts()
        self.ys: list[np.ndarray] = []
        self.prng_counts: Counter[str] = Counter()
        self.mod_counts: Counter[int] = Counter()
        self._decoder: RecordDecoder | None = None
        self._names: tuple[str, ...] = ()  # the decoder's feature columns ...
        self._take: list[int] = []  # ... and where they sit among its columns
        self._target_column: int | None = None  # the target's column when `features` holds it

    def _is_feature(self, key: str) -> bool:
        return key not in LEAKAGE_COLUMNS and key != self.target

    def decoder(self) -> RecordDecoder | None:
        """The typed decoder for the keys seen so far (rebuilt when a key is added); None
        for a target the decoder cannot read (every batch then takes the exact path)."""
        if self.target in RESERVED_KEYS:
            return None
        if self._decoder is None or len(self._decoder.layout.columns) != len(self.keys):
            columns = tuple(self.keys)
            unread = frozenset(k for k in columns if not self._is_feature(k) and k != self.target)
            layout = RecordLayout(columns, closed=True, unread=unread, target=self.target, metadata=True)
            self._decoder = RecordDecoder(layout)
            self._take = [j for j, k in enumerate(columns) if self._is_feature(k)]
            self._names = tuple(columns[j] for j in self._take)
            self._target_column = columns.index(self.target) if self.target in columns else None
        return self._decoder

    def _count_metadata(self, prng_types: Sequence[Any], mods: Sequence[Any]) -> None:
        """Count string prng_types and int mods (anything else is ignored, never an error)."""
        try:  # counted in C, keyed by (type, value): 1000, 1000.0 and True stay apart
            prng = Counter(zip(map(type, prng_types), prng_types))
            mod = Counter(zip(map(type, mods), mods))
        except TypeError:  # an unhashable value (a list, an object): filter first
            prng = Counter((str, p) for p in prng_types if isinstance(p, str))
            mod = Counter((int, m) for m in mods if type(m) is int)
        self.prng_counts.update({v: c for (t, v), c in prng.items() if t is str})
        self.mod_counts.update({v: c for (t, v), c in mod.items() if t is int})

    def add_records(self, records: Sequence[Any], base: int) -> None:
        """Check and add parsed records (dicts); ``base`` is the first one's index in the file."""
        feature_dicts: list[dict[str, Any]] = []
        targets: list[Any] = []
        seeds: list[Any] = []
        prng_types: list[Any] = []
        mods: list[Any] = []
        target = self.target
        for i, rec in enumerate(records, start=base):
            feats = features_of(rec, i, self.source)
            seed = rec.get("seed")
            feature_dicts.append(feats)
            seeds.append(seed)
            if not feats.keys() <= self.keys.keys():
                self.keys.update(dict.fromkeys(feats))
            t = feats.get(target, MISSING)
            if t is MISSING:
                t = rec.get(target, MISSING)
            if t is MISSING:
                raise DataError(
                    f"survivors file {self.source}: record {i} has no target {target!r} "
                    f"(looked in `features` and at the top level){seed_note(seed)}"
                )
            targets.append(t)
            meta = rec.get("metadata")
            if isinstance(meta, dict):
                prng_types.append(meta.get("prng_type"))
                mods.append(meta.get("mod"))
        where = BatchPlace(self.source, base, seeds)
        if not all(map(is_number, targets)):
            for k, t in enumerate(targets):
                if not is_number(t):
                    raise DataError(
                        f"survivors file {self.source}: record {base + k}: target {target!r} must be a finite number, "
                        f"got {describe_value(t)}{seed_note(seeds[k])}"
                    )
        names = tuple(k for k in self.keys if self._is_feature(k))
        rows, fills, filled_records = gather_rows(feature_dicts, names)
        X = to_matrix(rows, feature_dicts, names, where)
        self.parts.add(X, names, fills, filled_records)
        self.ys.append(np.asarray(targets, dtype=np.float64))
        self._count_metadata(prng_types, mods)

    def add_decoded(self, piece: DecodedPiece, base: int) -> None:
        """Add a piece decoded with :meth:`decoder` (its values are finite floats or NaN = absent)."""
        assert piece.top_target is not None
        where = BatchPlace(self.source, base, piece.seeds)
        y = piece.top_target
        if self._target_column is not None:
            in_features = piece.values[:, self._target_column]
            y = np.where(np.isnan(in_features), y, in_features)
        if np.isnan(y).any():
            k = int(np.flatnonzero(np.isnan(y))[0])
            raise DataError(
                f"survivors file {self.source}: record {base + k} has no target {self.target!r} "
                f"(looked in `features` and at the top level){seed_note(piece.seeds[k])}"
            )
        F = piece.values[:, self._take]
        fills, filled_records = fill_absent(F, self._names)
        self.parts.add(to_float32(F, self._names, where), self._names, fills, filled_records)
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
        n = self.parts.n
        X, fills, filled_records = self.parts.assemble(names)
        total = sum(fills.values())
        _log_fills(total, filled_records, n, self.source)
        return SurvivorTable(
            X=X,
            y=np.concatenate(self.ys),
            feature_names=names,
            excluded_features=excluded,
            missing_fills=total,
            source_file=self.source,
            target=self.target,
            n_records=n,
            prng_type=_most_common(self.prng_counts),
            mod=_most_common(self.mod_counts),
            prng_type_counts=dict(self.prng_counts),
            mod_counts=dict(self.mod_counts),
            missing_by_feature=dict(fills),
        )


class _FeaturesBuilder:
    """Collects a survivors file for prediction: the given columns (others ignored) and seeds."""

    def __init__(self, names: Sequence[str], source: str) -> None:
        self.names = tuple(names)
        self.source = source
        self.parts = MatrixParts()
        self.seeds: list[Any] = []
        self._decoder: RecordDecoder | None = None
        self._take: list[int] = []  # decoder column of each name

    def decoder(self) -> RecordDecoder | None:
        return self._decoder

    def _make_decoder(self, first: dict[str, Any]) -> None:
        # Every key of the first record, in the order the file writes them, then the names
        # it lacks: the decoder finds each key where it expects it instead of searching all
        # fields for it (keys it does not know, such as `score`, cost it such a search; the
        # predictor reader took 30 % more CPU time skipping two of them per record). Keys
        # other records add are skipped; a non-number under a key the model does not read
        # only sends that piece down the exact path.
        order = list(first)
        present = set(order)
        order += [k for k in self.names if k not in present]
        column = {k: j for j, k in enumerate(order)}
        unread = frozenset(order) - set(self.names)
        self._decoder = RecordDecoder(RecordLayout(tuple(order), closed=False, unread=unread))
        self._take = [column[k] for k in self.names]

    def add_records(self, records: Sequence[Any], base: int) -> None:
        feature_dicts = [features_of(rec, i, self.source) for i, rec in enumerate(records, start=base)]
        seeds = [rec.get("seed") for rec in records]
        if self._decoder is None and feature_dicts:
            self._make_decoder(feature_dicts[0])
        rows, fills, filled_records = gather_rows(feature_dicts, self.names)
        X = to_matrix(rows, feature_dicts, self.names, BatchPlace(self.source, base, seeds))
        self.parts.add(X, self.names, fills, filled_records)
        self.seeds.extend(seeds)

    def add_decoded(self, piece: DecodedPiece, base: int) -> None:
        F = piece.values[:, self._take]
        fills, filled_records = fill_absent(F, self.names)
        X = to_float32(F, self.names, BatchPlace(self.source, base, piece.seeds))
        self.parts.add(X, self.names, fills, filled_records)
        self.seeds.extend(piece.seeds)

    def finish(self) -> SurvivorFeatures:
        n = self.parts.n
        X, fills, filled_records = self.parts.assemble(self.names)
        total = sum(fills.values())
        _log_fills(total, filled_records, n, self.source)
        return SurvivorFeatures(
            X=X,
            seeds=self.seeds,
            feature_names=list(self.names),
            missing_fills=total,
            missing_by_feature=dict(fills),
            source_file=self.source,
        )


def _read_file(path: str | os.PathLike[str], builder: _TableBuilder | _FeaturesBuilder) -> None:
    """Feed a survivors file to ``builder``, piece by piece (see the module docstring)."""
    source = os.fspath(path)
    try:
        fh = open(source, "rb")
    except FileNotFoundError:
        raise DataError(f"survivors file not found: {source}") from None
    except OSError as exc:
        raise DataError(f"cannot read survivors file {source}: {exc}") from None
    with fh:
        reader = ArrayReader(fh, source, "survivors")
        if not reader.open_array():
            # Not an array (or not JSON): parse it whole for the message. A file that still
            # turns out to hold an array (e.g. after a byte-order mark) is read as one batch.
            builder.add_records(records_list(read_json_file(path, "survivors"), source), 0)
            return
        # The first record fixes the decoder's columns; the empty-array error comes from here too.
        builder.add_records(records_list(reader.parse_elements(), source), 0)
        while (piece := reader.next_piece()) is not None:
            base = reader.index
            decoded = _decode(builder.decoder(), piece)
            if decoded is None:
                builder.add_records(reader.parse_elements(), base)
            else:
                reader.accept(decoded.n)
                builder.add_decoded(decoded, base)


def _decode(decoder: RecordDecoder | None, piece: Any) -> DecodedPiece | None:
    """The piece decoded, or None when it needs the exact path.

    A piece that fails only because of ``NaN`` / ``Infinity`` tokens where nothing is read
    (what Python's json.dump writes for a missing float) is decoded again with those tokens
    as ``null``, so such files keep the fast path.
    """
    if decoder is None:
        return None
    try:
        return decoder.decode(piece)
    except DECODE_ERRORS:
        pass
    nulled = null_non_finite_tokens(piece)
    if nulled is None:
        return None
    try:
        return decoder.decode(nulled)
    except DECODE_ERRORS:
        return None


def _check_target(target: Any) -> None:
    if not isinstance(target, str) or not target:
        raise ValueError(f"`target` must be a non-empty string, got {target!r}")


def _check_feature_names(feature_names: Sequence[str]) -> list[str]:
    names = list(feature_names)
    if not names or not all(isinstance(k, str) for k in names):
        raise ValueError(f"`feature_names` must be a non-empty list of strings, got {feature_names!r}")
    if len(set(names)) != len(names):
        dupes = sorted(k for k, c in Counter(names).items() if c > 1)
        raise ValueError(f"`feature_names` has duplicates: {dupes}")
    return names


def load_survivors(path: str | os.PathLike[str], target: str = DEFAULT_TARGET) -> SurvivorTable:
    """Read a survivors file into inputs ``X`` and target ``y``; see the module docstring.

    Raises :class:`DataError` naming the file, record index, seed and key for malformed input.
    """
    _check_target(target)
    builder = _TableBuilder(target, os.fspath(path))
    with _gc_paused():
        _read_file(path, builder)
        return builder.finish()


@_gc_paused()
def features_from_records(
    records: Any, feature_names: Sequence[str], *, source: str = "<records>"
) -> SurvivorFeatures:
    """Already-parsed records read for prediction, as :func:`load_features` reads a file.

    For prediction (Step 6): no target is needed, keys not in ``feature_names`` are ignored,
    missing keys are filled with 0.0 (and counted), bad values are errors.
    """
    builder = _FeaturesBuilder(_check_feature_names(feature_names), source)
    builder.add_records(records_list(records, source), 0)
    return builder.finish()


def load_features(path: str | os.PathLike[str], feature_names: Sequence[str]) -> SurvivorFeatures:
    """Read a survivors file for prediction: the given columns in that order, and each
    record's seed (what the predictor writes beside each prediction).

    Same reading, fills and errors as :func:`load_survivors`; no target is needed and keys
    not in ``feature_names`` are ignored.
    """
    builder = _FeaturesBuilder(_check_feature_names(feature_names), os.fspath(path))
    with _gc_paused():
        _read_file(path, builder)
        return builder.finish()
