"""How a run's measurements become its sidecar, built to :mod:`step5.artifacts`' schema so the
optimizer never spells a sidecar key itself. Torch-free and optuna-free (the optimizer passes
the study's numbers in)."""
from __future__ import annotations

import platform
import socket
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

from step5.artifacts import MODEL_REGISTRY, PIPELINE_STEP, PIPELINE_STEP_NAME, SCHEMA_VERSION, \
    SIGNAL_CONFIDENCE, TRAINING_METRIC_KEYS, beats_mean

#: Packages whose versions the sidecar records. Read from installed metadata, never by
#: importing: the parent must not import torch just to learn its version.
VERSIONED_PACKAGES = ("optuna", "numpy", "scikit-learn", "torch", "xgboost", "lightgbm", "catboost", "orjson")


def _installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def build_provenance(*, run_id: str, parent_run_id: str | None, command_line: Sequence[str], created_at: str,
                     extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The sidecar's ``provenance`` block: who made this model, how, with what."""
    return {
        "run_id": run_id,
        "parent_run_id": parent_run_id,
        "command_line": [str(a) for a in command_line],
        "created_at": created_at,
        "hostname": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {name: _installed_version(name) for name in VERSIONED_PACKAGES},
        **dict(extra or {}),
    }


#: Names the data fingerprint's recipe (artifacts.data_fingerprint: the feature matrix,
#: target, history and recorded context themselves). The existing Step 5's "v2_data_only"
#: hashed the window bounds, survivor count and file name; the two never compare equal.
FINGERPRINT_VERSION = "step5_content_v1"


def build_data_context(*, fingerprint: str, training_draws: int, holdout_draws: int | None, survivors_file: str,
                       survivor_count: int, prng_type: str | None, mod: int | None, target: str,
                       missing_feature_fills: int, lottery_data_file: str,
                       repeated_feature_rows: int = 0) -> dict[str, Any]:
    """The sidecar's ``data_context`` in the existing pipeline's layout: the training window is
    the history's draws 1..N, the holdout window the ``holdout_draws`` after it (recorded as
    given; Step 5 holds out survivors, not draws)."""
    holdout = None if holdout_draws is None else {
        "start_draw": training_draws + 1, "end_draw": training_draws + holdout_draws, "draw_count": holdout_draws,
    }
    return {
        "fingerprint_hash": fingerprint,
        "fingerprint_version": FINGERPRINT_VERSION,
        "training_window": {"start_draw": 1, "end_draw": training_draws, "draw_count": training_draws},
        "holdout_window": holdout or {"start_draw": None, "end_draw": None, "draw_count": None},
        "survivor_source": {"file": Path(survivors_file).name, "file_path": str(Path(survivors_file).resolve()),
                            "survivor_count": survivor_count},
        "prng_hypothesis": {"prng_type": prng_type, "mod": mod},
        "target": target,
        "missing_feature_fills": missing_feature_fills,
        "repeated_feature_rows": repeated_feature_rows,
        "lottery_data_file": str(lottery_data_file),
        "derived_by": "step5_anti_overfit",
    }


def build_sidecar(*, model_type: str, feature_schema: Mapping[str, Any], signal_quality: Mapping[str, Any],
                  data_context: Mapping[str, Any], optuna: Mapping[str, Any], execution: Mapping[str, Any],
                  provenance: Mapping[str, Any], checkpoint_path: str | None = None,
                  checkpoint_sha256: str | None = None, training_metrics: Mapping[str, Any] | None = None,
                  hyperparameters: Mapping[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """A sidecar in SPEC order. With a ``checkpoint_path`` (in its committed set,
    :attr:`step5.model_set.StagedSet.final_dir`) the run saved a model: SUCCESS. Without one it
    found no usable signal: DEGENERATE_SIGNAL, every metric null, no hyperparameters.
    ``checkpoint_format`` follows from the model type, ``agent_metadata`` (which the
    existing pipeline reads) from the provenance."""
    saved = checkpoint_path is not None
    return {
        "schema_version": SCHEMA_VERSION,
        "model_type": model_type,
        "checkpoint_path": checkpoint_path,
        "checkpoint_format": MODEL_REGISTRY[model_type].checkpoint_format if saved else None,
        "checkpoint_sha256": checkpoint_sha256,
        "feature_schema": dict(feature_schema),
        "signal_quality": {**signal_quality, "quality": signal_quality["signal_status"],
                           "confidence": SIGNAL_CONFIDENCE[signal_quality["signal_status"]]},
        "data_context": dict(data_context),
        "training_metrics": dict(training_metrics or dict.fromkeys(TRAINING_METRIC_KEYS)),
        "hyperparameters": dict(hyperparameters or {}),
        "optuna": dict(optuna),
        "execution": dict(execution),
        "outcome": "SUCCESS" if saved else "DEGENERATE_SIGNAL",
        "provenance": dict(provenance),
        "agent_metadata": {"pipeline_step": PIPELINE_STEP, "pipeline_step_name": PIPELINE_STEP_NAME,
                           "run_id": provenance["run_id"], "parent_run_id": provenance.get("parent_run_id")},
        **extra,
    }


OVERFIT_RATIO_DEFINITION = (
    "mean CV val MSE / mean CV train MSE of the best trial (the pipeline's 'val loss / train loss'); "
    "null when the train MSE is 0"
)
EARLY_STOP_RATIO_DEFINITION = (
    "the shipped model's best round / rounds trained (the net: its fold members' mean best epoch / "
    "epochs run; a tree model: rounds kept / rounds run); low means it peaked early"
)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``; None when either is unknown or the denominator is not positive
    (an overfit ratio with a train loss of 0, an early-stop ratio of a model without rounds)."""
    if numerator is None or denominator is None or not denominator > 0:
        return None
    return float(numerator) / float(denominator)


def build_training_metrics(best_cv: Mapping[str, Any], final: Mapping[str, Any], *, objective_value: float | None,
                           objective_formula: str, overfit_penalty: float, k_folds: int, cv_repeats: int = 1,
                           n_dev: int, n_fit: int, n_early_stop: int, n_test: int,
                           rescore: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The SUCCESS sidecar's ``training_metrics``: the best trial's CV means (``best_cv``), the
    final model's scores (``final``) and ``rescore`` (``--rescore-partitions``; null without).
    ``n_fit``/``n_early_stop``: the final split's sizes, unless ``final`` says which rows it fitted.
    """
    return {
        "cv_r2_mean": best_cv.get("val_r2_mean"),
        "cv_r2_std": best_cv.get("val_r2_std"),
        "cv_train_r2_mean": best_cv.get("train_r2_mean"),
        "cv_val_mse_mean": best_cv.get("val_mse_mean"),
        "cv_train_mse_mean": best_cv.get("train_mse_mean"),
        "train_r2": final.get("train_r2"),
        "val_r2": final.get("r2"),
        "test_r2": final.get("test_r2"),
        "beats_mean": beats_mean(final.get("test_r2")),
        "train_mse": final.get("train_mse"),
        "val_mse": final.get("val_mse"),
        "test_mse": final.get("test_mse"),
        "overfit_ratio": _ratio(best_cv.get("val_mse_mean"), best_cv.get("train_mse_mean")),
        "overfit_ratio_definition": OVERFIT_RATIO_DEFINITION,
        "final_overfit_ratio": _ratio(final.get("val_mse"), final.get("train_mse")),
        "early_stop_ratio": _ratio(final.get("best_round"), final.get("rounds_trained")),
        "early_stop_ratio_definition": EARLY_STOP_RATIO_DEFINITION,
        "best_round": final.get("best_round"),
        "rounds_trained": final.get("rounds_trained"),
        "objective_value": objective_value,
        "objective_formula": objective_formula,
        "overfit_penalty": overfit_penalty,
        "k_folds": k_folds,
        "cv_repeats": int(cv_repeats),
        "n_dev": int(n_dev),
        "n_fit": int(final.get("n_fit", n_fit)),
        "n_early_stop": int(final.get("n_early_stop", n_early_stop)),
        "n_test": int(n_test),
        "epochs_run": final.get("epochs_run"),
        "best_epoch": final.get("best_epoch"),
        "rescore": dict(rescore) if rescore is not None else None,
    }
