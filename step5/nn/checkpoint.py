"""``best_model.pth``: one trained MLP with everything needed to predict, and nothing else.

The file is a plain dict of tensors, strings, numbers and lists, so
``torch.load(path, weights_only=True)`` reads it -- no pickled classes, no code runs on
load. Layout::

    {"format": "step5-mlp", "format_version": 1,
     "state_dict": {...},             # build_reference_mlp(...).state_dict() of the model
     "architecture": {"n_features", "hidden_layers", "use_leaky_relu", "dropout"},
     "feature_scaler": {"mean": (D,) float64, "scale": (D,) float64, "normalize_features"},
     "target_scaler": {"mean": float, "std": float},
     "feature_names": [str, ...] | None,
     "training": {...}}               # plain metadata (params, metrics, seed), optional

Prediction = standardise X with the train-fold scaler (in float32, as in training) ->
eval-mode MLP -> ``z * std + mean`` in float64, so a loaded model reproduces the
validation predictions made during training.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from step5.errors import DataError
from step5.fsutil import atomic_output
from step5.nn.model import build_reference_mlp

CHECKPOINT_FORMAT = "step5-mlp"
CHECKPOINT_FORMAT_VERSION = 1
#: Rows per forward pass when predicting, bounding activation memory on big inputs.
PREDICT_CHUNK_ROWS = 65_536


def save_checkpoint(
    path: str | os.PathLike[str],
    *,
    state_dict: Mapping[str, Tensor],
    n_features: int,
    hidden_layers: Sequence[int],
    use_leaky_relu: bool,
    dropout: float,
    feature_mean: np.ndarray,
    feature_scale: np.ndarray,
    target_mean: float,
    target_std: float,
    normalize_features: bool = True,
    feature_names: Sequence[str] | None = None,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write a weights-only checkpoint atomically (temp file + rename) and return its path.

    ``training`` is optional plain metadata (params, metrics, seed); it must hold only
    JSON-like values so that the file stays loadable with ``weights_only=True``.
    """
    mean = np.asarray(feature_mean, dtype=np.float64)
    scale = np.asarray(feature_scale, dtype=np.float64)
    if mean.shape != (n_features,) or scale.shape != (n_features,):
        raise ValueError(
            f"feature scaler must have shape ({n_features},), got mean {mean.shape} and scale {scale.shape}"
        )
    names = None if feature_names is None else [str(s) for s in feature_names]
    if names is not None and len(names) != n_features:
        raise ValueError(f"`feature_names` has {len(names)} names for {n_features} features")
    payload: dict[str, Any] = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
        "architecture": {
            "n_features": int(n_features),
            "hidden_layers": [int(w) for w in hidden_layers],
            "use_leaky_relu": bool(use_leaky_relu),
            "dropout": float(dropout),
        },
        "feature_scaler": {
            "mean": torch.from_numpy(mean.copy()),
            "scale": torch.from_numpy(scale.copy()),
            "normalize_features": bool(normalize_features),
        },
        "target_scaler": {"mean": float(target_mean), "std": float(target_std)},
        "feature_names": names,
        "training": dict(training) if training else {},
    }
    p = Path(path)
    with atomic_output(p) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)
    return p


@dataclass
class LoadedModel:
    """A checkpoint ready to predict on the original target scale."""

    module: nn.Sequential  # eval mode, on ``device``
    n_features: int
    hidden_layers: tuple[int, ...]
    use_leaky_relu: bool
    dropout: float
    feature_mean: np.ndarray  # (D,) float64
    feature_scale: np.ndarray  # (D,) float64
    target_mean: float
    target_std: float
    feature_names: list[str] | None
    training: dict[str, Any]
    device: torch.device

    @torch.no_grad()
    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predict (n,) float64 targets for features X (n, D) in the training column order."""
        X = np.asarray(X)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"X must have shape (n, {self.n_features}), got {X.shape}")
        if not np.issubdtype(X.dtype, np.number):
            raise ValueError(f"X must be numeric, got dtype {X.dtype}")
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        if not np.isfinite(X32).all():
            bad = np.argwhere(~np.isfinite(X32))[0]
            raise ValueError(f"X has a non-finite value at row {bad[0]}, column {bad[1]}")
        mean = torch.tensor(self.feature_mean, dtype=torch.float32, device=self.device)
        scale = torch.tensor(self.feature_scale, dtype=torch.float32, device=self.device)
        self.module.eval()
        out = []
        for s in range(0, X32.shape[0], PREDICT_CHUNK_ROWS):
            xb = torch.from_numpy(X32[s : s + PREDICT_CHUNK_ROWS]).to(self.device)
            out.append(self.module((xb - mean) / scale)[:, 0].cpu().numpy())
        z = np.concatenate(out) if out else np.zeros(0, dtype=np.float32)
        return z.astype(np.float64) * self.target_std + self.target_mean


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> LoadedModel:
    """Load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises :class:`DataError` naming the file when it is missing, not a checkpoint of
    this format, or inconsistent.
    """
    p = Path(path)
    dev = torch.device(device)
    if not p.is_file():
        raise DataError(f"checkpoint not found: {p}")
    try:
        payload = torch.load(p, map_location=dev, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise DataError(f"cannot read checkpoint {p}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{p} is not a {CHECKPOINT_FORMAT} checkpoint")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise DataError(
            f"{p} has checkpoint format_version {payload.get('format_version')!r}; "
            f"this code reads version {CHECKPOINT_FORMAT_VERSION}"
        )
    try:
        arch = payload["architecture"]
        fs = payload["feature_scaler"]
        ts = payload["target_scaler"]
        module = build_reference_mlp(
            arch["n_features"], arch["hidden_layers"],
            use_leaky_relu=arch["use_leaky_relu"], dropout=arch["dropout"],
        )
        module.load_state_dict(payload["state_dict"])
        loaded = LoadedModel(
            module=module.to(dev).eval(),
            n_features=int(arch["n_features"]),
            hidden_layers=tuple(int(w) for w in arch["hidden_layers"]),
            use_leaky_relu=bool(arch["use_leaky_relu"]),
            dropout=float(arch["dropout"]),
            feature_mean=fs["mean"].cpu().numpy().astype(np.float64),
            feature_scale=fs["scale"].cpu().numpy().astype(np.float64),
            target_mean=float(ts["mean"]),
            target_std=float(ts["std"]),
            feature_names=payload.get("feature_names"),
            training=dict(payload.get("training") or {}),
            device=dev,
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"checkpoint {p} is inconsistent: {exc}") from None
    if loaded.feature_mean.shape != (loaded.n_features,) or loaded.feature_scale.shape != (loaded.n_features,):
        raise DataError(f"checkpoint {p}: feature scaler does not match n_features={loaded.n_features}")
    return loaded
