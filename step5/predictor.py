"""Step 6's loader: a Step 5 model directory (checkpoint + sidecar) -> predictions.

::

    predictor = load_predictor("models/reinforcement")     # or the sidecar's path
    y_hat = predictor.predict_file("new_survivors.json")   # (n,) float64, file order

CLI::

    python -m step5.predictor --model-dir DIR --survivors FILE [--output preds.json]

writes ``[{"seed": ..., "prediction": ...}, ...]`` (to stdout without ``--output``).
Exit codes: 0 success, 1 error (bad files, schema mismatch), 2 the sidecar forbids
prediction (degenerate target signal), 64 usage.

What is checked before anything is predicted:

* the sidecar is valid (:func:`step5.artifacts.validate_sidecar`);
* ``signal_quality.prediction_allowed`` is true (a degenerate run saved no model, and its
  sidecar says so: refused with exit 2 rather than predicting a constant);
* the checkpoint's own feature names (a ``.pth`` stores them) hash to the sidecar's
  ``feature_schema_hash``: a checkpoint from another run beside this sidecar is an error;
* new survivors are read in the sidecar's feature order (missing keys are filled with 0.0
  and counted, extra keys are ignored).

This is Step 6 code, not the Step 5 parent: it imports torch (lazily, for a neural-net
checkpoint only) and the tree libraries (for their checkpoints only).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Sequence

import numpy as np

from step5.artifacts import SIDECAR_NAME, feature_schema_hash, read_sidecar, resolve_checkpoint
from step5.errors import DataError, Step5Error
from step5.jsonio import write_json_atomic

if TYPE_CHECKING:
    from step5.data.survivors import SurvivorFeatures

logger = logging.getLogger(__name__)


class PredictionNotAllowed(Step5Error):
    """Raised when a sidecar says its run found no usable signal (no model to predict with)."""

    exit_code = 2


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

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predict for a matrix whose columns are :attr:`feature_names`, in that order."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != len(self.feature_names):
            raise ValueError(f"X must have shape (n, {len(self.feature_names)}), got {X.shape}")
        return np.asarray(self.model.predict(X), dtype=np.float64).reshape(-1)

    def predict_records(self, records: Any, *, source: str = "<records>") -> np.ndarray:
        """Predict for already-parsed survivor records (same shape as the survivors file)."""
        from step5.data.survivors import feature_matrix_from_records

        return self.predict(feature_matrix_from_records(records, self.feature_names, source=source))

    def predict_file(self, survivors_path: str | os.PathLike[str]) -> np.ndarray:
        """Predict for every record of a survivors file, in file order."""
        from step5.data.survivors import load_feature_matrix

        return self.predict(load_feature_matrix(survivors_path, self.feature_names))


def _sidecar_path(model_dir_or_sidecar: str | os.PathLike[str]) -> Path:
    p = Path(model_dir_or_sidecar)
    if p.is_dir():
        p = p / SIDECAR_NAME
    if not p.is_file():
        raise DataError(f"no Step 5 sidecar at {p} (expected {SIDECAR_NAME} in the model directory)")
    return p


def _load_model(model_type: str, checkpoint: Path) -> Any:
    if model_type == "neural_net":
        from step5.nn.checkpoint import load_checkpoint  # imports torch: Step 6 only

        return load_checkpoint(checkpoint)
    from step5.models.trees import load_model

    return load_model(checkpoint, model_type)


def load_predictor(model_dir_or_sidecar_path: str | os.PathLike[str]) -> Predictor:
    """Load the model a Step 5 sidecar describes, after checking it may and can be used.

    Raises :class:`DataError` for a missing/invalid sidecar or checkpoint or a feature
    schema mismatch, :class:`PredictionNotAllowed` for a degenerate sidecar.
    """
    sidecar_path = _sidecar_path(model_dir_or_sidecar_path)
    sidecar = read_sidecar(sidecar_path)
    signal = sidecar["signal_quality"]
    if not signal["prediction_allowed"] or sidecar["outcome"] != "SUCCESS":
        raise PredictionNotAllowed(
            f"{sidecar_path}: prediction is not allowed: outcome {sidecar['outcome']}, signal "
            f"{signal['signal_status']} ({signal.get('reason', 'no usable target signal')}); "
            "this run saved no model"
        )
    checkpoint = resolve_checkpoint(sidecar_path, sidecar)
    if not checkpoint.is_file():
        raise DataError(f"{sidecar_path} names checkpoint {checkpoint}, which does not exist")
    model_type = sidecar["model_type"]
    model = _load_model(model_type, checkpoint)

    schema = sidecar["feature_schema"]
    ckpt_names = getattr(model, "feature_names", None)
    if ckpt_names is not None:
        ckpt_hash = feature_schema_hash(list(ckpt_names))
        if ckpt_hash != schema["feature_schema_hash"]:
            missing = sorted(set(schema["feature_names"]) - set(ckpt_names))[:5]
            extra = sorted(set(ckpt_names) - set(schema["feature_names"]))[:5]
            raise DataError(
                f"checkpoint {checkpoint} was trained on a different feature schema than its sidecar "
                f"{sidecar_path} describes: hash {ckpt_hash} != {schema['feature_schema_hash']} "
                f"({len(ckpt_names)} vs {schema['feature_count']} features; in sidecar only: {missing}, "
                f"in checkpoint only: {extra}). The model and sidecar come from different runs."
            )
    n_features = getattr(model, "n_features", None)
    if n_features is not None and int(n_features) != schema["feature_count"]:
        raise DataError(
            f"checkpoint {checkpoint} expects {n_features} features but its sidecar lists {schema['feature_count']}"
        )
    logger.info(
        "loaded %s model %s (%d features, schema %s)", model_type, checkpoint, schema["feature_count"],
        schema["feature_schema_hash"],
    )
    return Predictor(sidecar=sidecar, sidecar_path=sidecar_path, checkpoint_path=checkpoint, model=model)


# --------------------------------------------------------------------------- CLI


class _UsageExitParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(64, f"{self.prog}: error: {message}\n")


def _read_survivors(path: Path, feature_names: Sequence[str]) -> SurvivorFeatures:
    """The survivors file's inputs in the model's column order, and each record's seed.

    Read piece by piece straight into the matrix (no dict per record), so a file of
    millions of records needs about the matrix's memory, not several times the file's.
    """
    from step5.data.survivors import load_features

    return load_features(path, feature_names)


def build_parser() -> argparse.ArgumentParser:
    p = _UsageExitParser(
        prog="python -m step5.predictor",
        description="Predict holdout quality for survivors with a Step 5 model (best_model.* + best_model.meta.json).",
    )
    p.add_argument("--model-dir", type=Path, required=True, help="folder holding best_model.meta.json (or the sidecar path)")
    p.add_argument("--survivors", type=Path, required=True, help="survivors JSON file to predict for")
    p.add_argument("--output", type=Path, default=None, help='write [{"seed", "prediction"}] here [stdout]')
    p.add_argument("--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR"), default="INFO")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        predictor = load_predictor(args.model_dir)
        survivors = _read_survivors(args.survivors, predictor.feature_names)
        preds = predictor.predict(survivors.X)
        rows = [{"seed": seed, "prediction": float(v)} for seed, v in zip(survivors.seeds, preds)]
        if args.output is not None:
            write_json_atomic(args.output, rows)
            logger.info("wrote %d predictions to %s", len(rows), args.output)
        else:
            from step5.jsonio import dumps

            sys.stdout.buffer.write(dumps(rows) + b"\n")
            sys.stdout.flush()
    except Step5Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
