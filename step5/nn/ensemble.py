"""The final neural net: the best trial's K fold models merged into one wider MLP of the usual
checkpoint layout that computes exactly their mean (docs/optimizer.md, "Neural net")::

    fold k:  y_k = ys_k * head_k(BN..(W_k (x - mu_k) / s_k)) + ym_k
    merged:  layer i = the K layers i side by side (first: stacked rows; deeper: block-diagonal),
             each BatchNorm unit as it was, one head weighting block k by ys_k / (K * ys).

The merged scaler is the folds' mean; each block's first layer absorbs the difference.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from step5.errors import DataError
from step5.nn.checkpoint import Checkpoint, load_checkpoint
from step5.nn.job import load_fold
from step5.nn.trainer import regression_metrics

#: The merged net must reproduce the mean of the fold models' predictions to this
#: fraction of the target's standard deviation (float32 rounding is ~1e-6 of it), or of the
#: prediction's distance from the target's mean where that is larger: float32 rounds relative to
#: the magnitudes it holds, and a row far outside the training range has large ones.
MERGE_TOLERANCE = 1e-4


def merge_models(models: Sequence[Checkpoint], names: Sequence[str] | None = None) -> Checkpoint:
    """One MLP predicting the mean of ``models`` (their first one's hyperparameters); ``names``
    (default ``model 0``, ...) name them in the ValueError for models of different layouts."""
    if not models:
        raise ValueError("an ensemble needs at least one model")
    first = models[0]
    names = list(names) if names is not None else [f"model {i}" for i in range(len(models))]

    def layout(m: Checkpoint) -> tuple[int, int, bool]:  # what every model must share, besides feature names
        return m.n_features, len(m.hidden_layers), m.use_leaky_relu

    for i, m in enumerate(models[1:], start=1):
        if layout(m) != layout(first) or m.feature_names != first.feature_names:
            raise ValueError(
                f"{names[i]} cannot be merged with {names[0]}: (features, depth, leaky relu) "
                f"{layout(m)} != {layout(first)}"
                + (" and the feature names differ" if m.feature_names != first.feature_names else "")
            )
    k, depth = len(models), len(first.hidden_layers)
    f64 = torch.float64
    mean = np.mean([m.feature_mean for m in models], axis=0)
    scale = np.mean([m.feature_scale for m in models], axis=0)
    target_mean = float(np.mean([m.target_mean for m in models]))
    target_std = float(np.mean([m.target_std for m in models]))
    states = [{n: t.detach().to("cpu", f64) for n, t in m.state_dict.items()} for m in models]

    def read_merged_scaler(layer: str) -> tuple[list[Any], list[Any]]:
        # x_k = (x - mu_k) / s_k = x_std * (S / s_k) + (M - mu_k) / s_k, with x_std the
        # merged scaler's output: the layer that reads x_k gets its columns rescaled and
        # gains a constant (its bias plus the shift), per model.
        weights, constants = [], []
        for m, sd in zip(models, states):
            ratio = torch.from_numpy(scale / m.feature_scale)
            shift = torch.from_numpy((mean - m.feature_mean) / m.feature_scale)
            weights.append(sd[f"{layer}.weight"] * ratio)
            constants.append(sd[f"{layer}.weight"] @ shift + sd[f"{layer}.bias"])
        return weights, constants

    merged: dict[str, Any] = {}
    for i in range(depth):
        lin, bn = f"network.{4 * i}", f"network.{4 * i + 1}"
        if i == 0:  # the constant moves into BN
            blocks, offsets = read_merged_scaler(lin)
            weight = torch.cat(blocks, dim=0)
            offset = torch.cat(offsets)
        else:
            weight = torch.block_diag(*(sd[f"{lin}.weight"] for sd in states))
            offset = torch.cat([sd[f"{lin}.bias"] for sd in states])
        merged[f"{lin}.weight"] = weight
        merged[f"{lin}.bias"] = torch.zeros(weight.shape[0], dtype=f64)
        for name in ("weight", "bias", "running_var"):
            merged[f"{bn}.{name}"] = torch.cat([sd[f"{bn}.{name}"] for sd in states])
        # BN subtracts its running mean from Wx + b; b moves there (b - rm == -(rm - b)).
        merged[f"{bn}.running_mean"] = torch.cat([sd[f"{bn}.running_mean"] for sd in states]) - offset
        merged[f"{bn}.num_batches_tracked"] = max(int(sd[f"{bn}.num_batches_tracked"]) for sd in states)
    head = f"network.{4 * depth}"
    ratios = [m.target_std / (k * target_std) for m in models]
    target_shift = sum((m.target_mean - target_mean) / (k * target_std) for m in models)
    if depth:
        merged[f"{head}.weight"] = torch.cat([sd[f"{head}.weight"] * r for sd, r in zip(states, ratios)], dim=1)
        merged[f"{head}.bias"] = sum(sd[f"{head}.bias"] * r for sd, r in zip(states, ratios)) + target_shift
    else:
        # Linear models: the head reads the inputs, and K linear maps add up to one.
        heads, constants = read_merged_scaler(head)
        merged[f"{head}.weight"] = sum(w * r for w, r in zip(heads, ratios))
        merged[f"{head}.bias"] = sum(c * r for c, r in zip(constants, ratios)) + target_shift
    state_dict = {
        n: (torch.tensor(v, dtype=torch.long) if isinstance(v, int) else v.to(torch.float32))
        for n, v in merged.items()
    }
    return Checkpoint(
        state_dict, first.n_features, [sum(m.hidden_layers[i] for m in models) for i in range(depth)],
        first.use_leaky_relu, first.dropout, mean, scale, target_mean, target_std,
        normalize_features=any(m.normalize_features for m in models), feature_names=first.feature_names,
        config=first.config,
    )


def build_ensemble(
    fold_paths: Sequence[str | Path], out_path: str | Path, *, score_path: str | Path,
) -> dict[str, Any]:
    """Merge the fold checkpoints into ``out_path`` and return the metrics the sidecar reports.

    ``score_path`` is the final split's NPZ (``X_train``/``y_train``: every development row;
    ``X_test``/``y_test``: the holdout rows, scored only). The merged net must predict the
    fold models' mean on all those rows (else ``ValueError``): a wrong merge never ships. Fold models of
    different layouts (features, depth, activation), or a score file without test rows or with other
    feature columns than the models read, are a :class:`DataError` naming the files.
    """
    models = [load_checkpoint(p) for p in fold_paths]
    data, _ = load_fold(str(score_path))
    if data.X_test is None or data.y_test is None:
        raise DataError(f"{score_path} has no X_test / y_test to score the final model on")
    try:
        merged = merge_models(models, [str(p) for p in fold_paths])
    except ValueError as exc:  # fold models of different layouts: bad input, as a score file that does not fit
        raise DataError(str(exc)) from None
    if data.X_train.shape[1] != merged.n_features:  # else predict's bare "X must have shape (n, 6)"
        raise DataError(f"{score_path} has {data.X_train.shape[1]} feature columns but the fold models "
                        f"{fold_paths[0]}, ... read {merged.n_features}")
    merged.training = {
        "final_model": "fold_ensemble",
        "models": len(models),
        "fold_hidden_layers": [list(m.hidden_layers) for m in models],
        "fold_seeds": [m.training.get("seed") for m in models],
        "fold_epochs_run": [m.training.get("epochs_run") for m in models],
        "fold_best_epochs": [m.training.get("best_epoch") for m in models],
    }
    merged.save(out_path)
    ensemble = load_checkpoint(out_path)
    y_scale = float(np.std(data.y_train)) or 1.0
    y_mean = float(np.mean(data.y_train))
    metrics: dict[str, Any] = {}
    for part, X, y in (("train", data.X_train, data.y_train), ("test", data.X_test, data.y_test)):
        expected = np.mean([m.predict(X) for m in models], axis=0)
        got = ensemble.predict(X)
        worst = float(np.max(np.abs(got - expected) / np.maximum(y_scale, np.abs(expected - y_mean)), initial=0.0))
        if not math.isfinite(worst) or worst > MERGE_TOLERANCE:
            raise ValueError(
                f"the merged net does not reproduce the mean of its {len(models)} fold models on the "
                f"{part} rows of {score_path} (worst difference {worst:.2e} of the target std, or of the "
                f"prediction's distance from the target mean, > {MERGE_TOLERANCE:g})"
            )
        metrics[f"{part}_r2"], metrics[f"{part}_mse"] = regression_metrics(y, got)
    return {
        "status": "complete", "model_type": "neural_net", "model_path": str(out_path),
        "models": len(models), "hidden_layers": list(ensemble.hidden_layers), **metrics,
    }
