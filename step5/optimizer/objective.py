"""The anti-overfit objective: how a trial's fold results become its score
(docs/optimizer-internals.md#objective)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import optuna

from step5.errors import Step5Error

#: Weight of the (clipped) train/validation R² gap in the objective.
OVERFIT_PENALTY = 0.5
OBJECTIVE_FORMULA = (
    f"objective = mean_k(val_r2_k) - {OVERFIT_PENALTY} * max(0, mean_k(train_r2_k) - mean_k(val_r2_k))"
)


def anti_overfit_score(val_r2: Sequence[float], train_r2: Sequence[float]) -> float:
    """:data:`OBJECTIVE_FORMULA` for one trial's folds; NaN when any fold's metric is not finite."""
    val = np.asarray(val_r2, dtype=np.float64)
    train = np.asarray(train_r2, dtype=np.float64)
    if val.size == 0 or val.shape != train.shape:
        raise ValueError(f"need one val and one train R² per fold, got {val.size} and {train.size}")
    if not (np.isfinite(val).all() and np.isfinite(train).all()):
        return float("nan")
    mean_val, mean_train = float(val.mean()), float(train.mean())
    return mean_val - OVERFIT_PENALTY * max(0.0, mean_train - mean_val)


#: Per-fold keys kept in the study (small, JSON-able); the rest of a result is log detail.
_KEPT_FOLD_KEYS = ("fold_idx", "r2", "train_r2", "val_mse", "train_mse", "duration", "load_s", "train_s", "device",
                   "epochs_run", "best_epoch", "n_train", "n_val")


def summarize_folds(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """What one trial measured across its folds: its objective ``value``, the folds' means (and the validation
    R²'s spread), and the ``folds`` as the study keeps them."""
    for i, res in enumerate(results):
        missing = [k for k in ("r2", "train_r2", "val_mse", "train_mse") if k not in res]
        if missing:
            raise Step5Error(f"fold {i} result lacks {missing}: {sorted(res)}")
    val = [float(r["r2"]) for r in results]
    train = [float(r["train_r2"]) for r in results]
    return {"value": anti_overfit_score(val, train), "val_r2_mean": float(np.mean(val)),
            "val_r2_std": float(np.std(val)), "train_r2_mean": float(np.mean(train)),
            "val_mse_mean": float(np.mean([r["val_mse"] for r in results])),
            "train_mse_mean": float(np.mean([r["train_mse"] for r in results])),
            "folds": [{k: r[k] for k in _KEPT_FOLD_KEYS if k in r} for r in results]}


def record_trial(trial: optuna.Trial, results: Sequence[dict[str, Any]], *, wall_s: float) -> dict[str, Any]:
    """Store one trial's fold results in its ``user_attrs``; its summary (the value may be NaN)."""
    summary = summarize_folds(results)
    means = {k: v for k, v in summary.items() if k != "folds"}
    trial.set_user_attr("cv", means)  # read by the sidecar, the progress line, diagnostics
    # Scalar attributes too: columns of study.trials_dataframe() (the overfit gap unclipped).
    for key in ("val_r2_mean", "val_r2_std", "train_r2_mean", "val_mse_mean", "train_mse_mean"):
        trial.set_user_attr(f"cv_{key}", means[key])
    trial.set_user_attr("overfit_gap", summary["train_r2_mean"] - summary["val_r2_mean"])
    trial.set_user_attr("folds", summary["folds"])
    trial.set_user_attr("wall_s", round(wall_s, 4))
    if not math.isfinite(summary["value"]):
        # Optuna fails a trial whose value is NaN; say why first.
        trial.set_user_attr("fail_reason", "a fold's R² is not finite (training diverged)")
    return summary
