"""Step 6's loader: a Step 5 model directory (checkpoint + sidecar) -> predictions, as a function
(``load_predictor(dir).predict_file(path)``) and a CLI; what it checks: docs/optimizer.md ("Step 6:
the predictor"). Step 6 code, not the parent: it imports torch lazily, for a neural-net checkpoint only.
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import orjson

from step5.artifacts import MODEL_SET_NAMES, SIDECAR_NAME, feature_schema_hash, file_sha256, get_model_type, \
    read_sidecar, resolve_checkpoint
from step5.cliutil import UsageErrorParser, add_log_level, closed_fraction, non_empty_path
from step5.errors import EXIT_INTERRUPTED, EXIT_OK, DataError, PredictionNotAllowed, Step5Error
from step5.fsutil import file_in_the_way, os_error_reason
from step5.jsonio import dumps, write_json_atomic
from step5.model_set import SETS_DIRNAME

if TYPE_CHECKING:
    from step5.data.survivors import SurvivorFeatures

logger = logging.getLogger(__name__)

#: Default of ``--max-missing-fraction``: the share of the model's feature cells (records x
#: features) that may be missing from new survivors. One feature absent from every record of
#: a 90-feature model is 1.1%: refused, because the model would see 0.0 for it everywhere.
DEFAULT_MAX_MISSING_FRACTION = 0.01
#: How many of the most-missing keys an error or warning names.
MISSING_KEYS_SHOWN = 5
#: Loads of an output dir's model set, when commits replace it under the load (each keeps one set before it).
LOAD_TRIES = 3


@dataclass
class Predictor:
    """A loaded model with the feature schema it was trained on."""

    sidecar: dict[str, Any]
    sidecar_path: Path
    checkpoint_path: Path
    model: Any  # has .predict(X: (n, d) float32) -> (n,) float64

    @property
    def model_type(self) -> str:
        return str(self.sidecar["model_type"])

    @property
    def feature_names(self) -> list[str]:
        return list(self.sidecar["feature_schema"]["feature_names"])

    def predict(self, X: Any) -> np.ndarray:
        """Predict for a pandas DataFrame (columns matched by name, in any order; extra columns
        ignored) or a matrix whose columns are :attr:`feature_names`, in that order."""
        names = self.feature_names
        if hasattr(X, "columns") and hasattr(X, "loc"):  # a DataFrame; pandas is not imported here
            missing = [k for k in names if k not in X.columns]
            if missing:
                raise ValueError(f"the DataFrame lacks {len(missing)} of the model's {len(names)} feature columns: "
                                 f"{missing[:10]}{' ...' if len(missing) > 10 else ''}")
            X = X.loc[:, names].to_numpy(dtype=np.float32)
        return self._predict(X, lambda i: f"row {i}")

    def _predict(self, X: Any, which: Callable[[int], str]) -> np.ndarray:
        """The model's predictions for matrix ``X``; a non-finite one is a DataError naming its row by
        ``which``: a finite input can still overflow a net's float32 activations (NaN was written as
        ``"prediction": null``)."""
        names = self.feature_names
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(names):
            raise ValueError(f"X must have shape (n, {len(names)}): one column per feature of the model's schema, "
                             f"in its order; got shape {X.shape}")
        y = np.asarray(self.model.predict(X), dtype=np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(y))
        if bad.size:
            i = int(bad[0])
            raise DataError(f"{which(i)}: the model predicted {y[i]} ({bad.size} of {y.size} non-finite): its "
                            "features are far outside what it was trained on")
        return y

    def predict_records(self, records: Any, *, source: str = "<records>",
                        max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION) -> np.ndarray:
        """Predict for already-parsed survivor records (same shape as the survivors file)."""
        from step5.data.survivors import features_from_records

        return self.predict_survivors(features_from_records(records, self.feature_names, source=source),
                                      max_missing_fraction=max_missing_fraction)

    def predict_file(self, survivors_path: str | os.PathLike[str], *,
                     max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION) -> np.ndarray:
        """Predict for every record of a survivors file, in file order (read piece by piece
        straight into the model's columns: memory near the matrix's size)."""
        from step5.data.survivors import load_features

        return self.predict_survivors(load_features(survivors_path, self.feature_names),
                                      max_missing_fraction=max_missing_fraction)

    def predict_survivors(self, survivors: SurvivorFeatures, *,
                          max_missing_fraction: float = DEFAULT_MAX_MISSING_FRACTION) -> np.ndarray:
        """Predict for survivors read in this model's column order. More than ``max_missing_fraction``
        of the model's feature cells missing (filled with 0.0) is a :class:`DataError` naming the
        most-missing keys; below it, the reader has already warned."""
        counts = Counter(survivors.missing_by_feature)
        total, n = sum(counts.values()), survivors.n_records
        cells = n * len(survivors.feature_names)
        if total and total / cells > max_missing_fraction:
            worst = ", ".join(f"{k!r} (missing in {c} of {n})" for k, c in counts.most_common(MISSING_KEYS_SHOWN))
            raise DataError(
                f"survivors {survivors.source_file}: {total} of {cells} feature cells ({total / cells:.1%}) are "
                f"missing, more than --max-missing-fraction {max_missing_fraction:g} allows; the model would see "
                f"0.0 for them. Most missing: {worst}. Do these survivors come from the pipeline version the "
                "model was trained on?"
            )
        return self._predict(survivors.X, lambda i: f"survivors {survivors.source_file}: record {i} "
                                                    f"[seed {survivors.seeds[i]!r:.60}]")


def load_predictor(model_dir_or_sidecar_path: str | os.PathLike[str]) -> Predictor:
    """Load the model a Step 5 sidecar describes, after checking it may and can be used: a
    :class:`DataError` for a missing/invalid sidecar or checkpoint or a feature schema mismatch,
    :class:`PredictionNotAllowed` for a degenerate sidecar."""
    sidecar_path = Path(model_dir_or_sidecar_path)
    if sidecar_path.is_dir():
        sidecar_path = sidecar_path / SIDECAR_NAME
    if not sidecar_path.is_file():
        raise DataError(f"no Step 5 sidecar at {sidecar_path} (expected {SIDECAR_NAME} in the model directory)")
    for attempt in range(1, LOAD_TRIES + 1):
        # In an output dir the sidecar is a link into the current model set: resolve it once, so
        # the sidecar and the checkpoint come from the same set even if a commit lands meanwhile.
        real = Path(os.path.realpath(sidecar_path))
        try:
            return _load(real)
        except DataError:
            # A commit keeps the set before it; a second one removes the set this load had resolved, mid-load
            # ("names checkpoint ..., which does not exist"): the link now shows a newer set, load that one.
            if attempt == LOAD_TRIES or os.path.realpath(sidecar_path) == str(real):
                raise
            logger.info("the model set %s was replaced while loading it; loading the current one", real.parent)
    raise AssertionError("unreachable")  # pragma: no cover


def _load(sidecar_path: Path) -> Predictor:
    """:func:`load_predictor` on a sidecar's real path."""
    sidecar = read_sidecar(sidecar_path)
    signal = sidecar["signal_quality"]
    if not signal["prediction_allowed"] or sidecar["outcome"] != "SUCCESS":
        raise PredictionNotAllowed(f"{sidecar_path}: prediction is not allowed: outcome {sidecar['outcome']}, signal "
                                   f"{signal['signal_status']} ({signal.get('reason', 'no usable target signal')}); "
                                   "this run saved no model")
    checkpoint = resolve_checkpoint(sidecar_path, sidecar)
    if not checkpoint.is_file():
        raise DataError(f"{sidecar_path} names checkpoint {checkpoint}, which does not exist")
    try:
        actual = file_sha256(checkpoint)
    except OSError as exc:  # unreadable to this user (a model dir shared with Step 6's group), or gone meanwhile
        raise DataError(f"cannot read checkpoint {checkpoint}: {os_error_reason(exc)}") from None
    expected = sidecar.get("checkpoint_sha256")
    if actual != expected:
        raise DataError(
            f"checkpoint {checkpoint} does not match its sidecar {sidecar_path}: SHA-256 {actual[:16]}... "
            f"but the sidecar records {str(expected)[:16]}...; the model and sidecar come from different runs"
        )
    model_type = sidecar["model_type"]
    if get_model_type(model_type).torch:
        from step5.nn.checkpoint import load_checkpoint  # imports torch: Step 6 only

        model = load_checkpoint(checkpoint)
    else:
        from step5.models.trees import load_model

        model = load_model(checkpoint, model_type)

    schema = sidecar["feature_schema"]
    ckpt_names = getattr(model, "feature_names", None)
    if ckpt_names is not None:
        ckpt_hash = feature_schema_hash(list(ckpt_names))
        if ckpt_hash != schema["feature_schema_hash"]:
            names = list(schema["feature_names"])
            missing = sorted(set(names) - set(ckpt_names))[:5]
            extra = sorted(set(ckpt_names) - set(names))[:5]
            if missing or extra:
                how = f"in sidecar only: {missing}, in checkpoint only: {extra}"
            else:  # the columns the model would be given in another order: every prediction wrong
                i = next((i for i, (a, b) in enumerate(zip(names, ckpt_names)) if a != b), min(len(names), len(ckpt_names)))
                how = (f"the same names in another order: position {i} is {names[i] if i < len(names) else None!r} in "
                       f"the sidecar, {ckpt_names[i] if i < len(ckpt_names) else None!r} in the checkpoint")
            raise DataError(f"checkpoint {checkpoint} was trained on a different feature schema than its sidecar "
                            f"{sidecar_path} describes: hash {ckpt_hash} != {schema['feature_schema_hash']} "
                            f"({len(ckpt_names)} vs {schema['feature_count']} features; {how}). The model and sidecar "
                            "come from different runs.")
    n_features = getattr(model, "n_features", None)
    if n_features is not None and int(n_features) != schema["feature_count"]:
        raise DataError(
            f"checkpoint {checkpoint} expects {n_features} features but its sidecar lists {schema['feature_count']}"
        )
    logger.info("loaded %s model %s (%d features, schema %s)", model_type, checkpoint, schema["feature_count"],
                schema["feature_schema_hash"])
    metrics = sidecar["training_metrics"]
    if metrics.get("beats_mean") is False:
        logger.warning("this model is no better than predicting the mean (test R² %s <= 0; sidecar %s): treat its "
                       "predictions with care", metrics.get("test_r2"), sidecar_path)
    return Predictor(sidecar=sidecar, sidecar_path=sidecar_path, checkpoint_path=checkpoint, model=model)


def writable_seed(seed: Any, i: int, source: Any) -> Any:
    """``seed`` as the predictions file can hold it: orjson writes no int beyond 64 bits and no
    string with a lone surrogate (``"\\ud800"`` in the survivors file), which the readers accept
    in a seed; such a seed is written as the standard library writes it, i.e. as the file had it."""
    try:
        orjson.dumps(seed)
        return seed
    except TypeError:
        pass
    try:
        return orjson.Fragment(json.dumps(seed, allow_nan=False))
    except ValueError:  # NaN inside a seed that also holds such a value
        raise DataError(f"survivors file {source}: record {i}: seed {seed!r:.60} cannot be written as JSON") from None


def check_output(output: Path, predictor: Predictor, survivors: Path) -> None:
    """Refuse an ``--output`` that would replace what the user keeps, each of which it once replaced
    with exit 0: the ``--survivors`` file (by any path or link), an SQLite database (the run's study), a
    file of the model just loaded (the sidecar's link: the folder then held no model) or one in its
    committed model set (the checkpoint: SHA-256 no longer the sidecar's; a file put there is deleted
    with the set by a later commit), or the sets' own folder (the commit lock)."""
    with contextlib.suppress(OSError):  # either not there (yet): not the same file
        if os.path.samefile(output, survivors):
            raise Step5Error(f"--output {output} is the --survivors file {survivors}: the predictions would "
                             "replace the survivors; choose another path")
    if os.path.isfile(output):  # a regular file: a pipe's reader would block
        with contextlib.suppress(OSError), open(output, "rb") as fh:
            # the run's study (<model dir>/optuna_step5.db, its every trial) was replaced, exit 0
            if fh.read(16) == b"SQLite format 3\x00":
                raise Step5Error(f"--output {output} is an SQLite database (an Optuna study?): the predictions "
                                 "would replace it; choose another path")
    real = Path(os.path.realpath(output))
    model_folder = predictor.sidecar_path.parent  # a real path: the model set's folder, or a plain model dir
    if model_folder.parent.name == SETS_DIRNAME and real.parent == model_folder.parent:
        raise Step5Error(f"--output {output} is in {model_folder.parent}, which the model's commits manage (their "
                         "lock, their sets); choose another path")
    if real.parent != model_folder:
        return
    if real.name in MODEL_SET_NAMES:
        raise Step5Error(f"--output {output} is the model's own {real.name} ({real}): the predictions would "
                         "replace it; choose another path")
    if model_folder.parent.name == SETS_DIRNAME:
        raise Step5Error(f"--output {output} is in the committed model set {model_folder}, which a later commit "
                         "deletes with everything in it; choose another path")


def write_reason(output: Path, exc: OSError) -> str:
    """Why ``output`` could not be written: a file where a folder of its path must be is named (making
    the folders says only "File exists")."""
    blocker = file_in_the_way(output.parent)
    if blocker is not None and exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{blocker} is a file, not a folder"
    return os_error_reason(exc)


def build_parser() -> argparse.ArgumentParser:
    p = UsageErrorParser(
        prog="python -m step5.predictor",
        description="Predict holdout quality for survivors with a Step 5 model (best_model.* + best_model.meta.json).",
    )
    p.add_argument("--model-dir", type=non_empty_path, required=True, help="folder holding best_model.meta.json (or the sidecar path)")
    p.add_argument("--survivors", type=non_empty_path, required=True, help="survivors JSON file to predict for")
    p.add_argument("--output", type=non_empty_path, default=None,
                   help='write [{"seed", "prediction"}] to this file, its folders made as needed (- : stdout) [stdout]')
    p.add_argument("--max-missing-fraction", type=closed_fraction, default=DEFAULT_MAX_MISSING_FRACTION,
                   help="refuse survivors when more than this share of the model's feature cells are missing "
                        f"(a missing cell is filled with 0.0; 1 allows any) [{DEFAULT_MAX_MISSING_FRACTION}]")
    add_log_level(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    from step5.data.survivors import load_features

    try:
        predictor = load_predictor(args.model_dir)
        to_file = args.output is not None and str(args.output) != "-"
        if to_file:  # before the survivors are read: a large file takes a while
            check_output(args.output, predictor, args.survivors)
        survivors = load_features(args.survivors, predictor.feature_names)
        preds = predictor.predict_survivors(survivors, max_missing_fraction=args.max_missing_fraction)
        rows = [{"seed": writable_seed(seed, i, args.survivors), "prediction": float(v)}
                for i, (seed, v) in enumerate(zip(survivors.seeds, preds))]
        if to_file:
            try:
                write_json_atomic(args.output, rows)
            except OSError as exc:
                raise Step5Error(f"cannot write the predictions to {args.output}: "
                                 f"{write_reason(args.output, exc)}") from None
            logger.info("wrote %d predictions to %s", len(rows), args.output)
        else:
            try:
                sys.stdout.buffer.write(dumps(rows) + b"\n")
                sys.stdout.flush()
            except OSError as exc:  # a reader that closed the pipe early (| head), a full disk
                # Python's own flush at exit would fail again, with a traceback: point stdout at nothing.
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                raise Step5Error(f"cannot write the predictions to stdout: {os_error_reason(exc)}") from None
    except Step5Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # nothing half-written to clean up: the output file is written atomically
        print("interrupted (Ctrl-C); no predictions written", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
