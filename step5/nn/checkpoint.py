"""``best_model.pth``: one trained MLP with everything needed to predict, as plain data that
``torch.load(path, weights_only=True)`` reads, in the keys and layout of the existing
pipeline's Step 6 (docs/training.md, "Checkpoints"; docs/compatibility.md, "Model files")."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from step5.errors import DataError
from step5.fsutil import atomic_output
from step5.nn.model import ReferenceMLP

CHECKPOINT_FORMAT = "step5-mlp"
CHECKPOINT_FORMAT_VERSION = 2
PREDICT_CHUNK_ROWS = 65_536  # rows per forward pass when predicting, bounding activation memory


@dataclass
class Checkpoint:
    """One MLP and its scalers: what :meth:`save` writes and :func:`load_checkpoint` reads back
    (with ``module`` built, ready to :meth:`predict` on the original target scale)."""

    state_dict: Mapping[str, Tensor]  # ReferenceMLP layout
    n_features: int
    hidden_layers: Sequence[int]
    use_leaky_relu: bool
    dropout: float
    feature_mean: np.ndarray  # (D,) float64
    feature_scale: np.ndarray  # (D,) float64
    target_mean: float
    target_std: float
    normalize_features: bool = True  # whether training standardised X (else the scaler is the identity)
    feature_names: Sequence[str] | None = None
    config: Mapping[str, Any] = field(default_factory=dict)  # the hyperparameters that trained it (JSON-like)
    training: Mapping[str, Any] = field(default_factory=dict)  # seed, metrics, ... (JSON-like)
    module: ReferenceMLP | None = None  # eval mode, on ``device``: set by load_checkpoint
    device: torch.device = torch.device("cpu")

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the weights-only checkpoint atomically and return its path."""
        n = self.n_features
        mean = np.asarray(self.feature_mean, dtype=np.float64)
        scale = np.asarray(self.feature_scale, dtype=np.float64)
        if mean.shape != (n,) or scale.shape != (n,):
            raise ValueError(f"feature scaler must have shape ({n},), got mean {mean.shape} and scale {scale.shape}")
        names = None if self.feature_names is None else [str(s) for s in self.feature_names]
        if names is not None and len(names) != n:
            raise ValueError(f"`feature_names` has {len(names)} names for {n} features")
        payload: dict[str, Any] = {
            "format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_FORMAT_VERSION,
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict.items()},
            "feature_count": int(n), "input_dim": int(n),  # both names Step 6 tries
            "hidden_layers": [int(w) for w in self.hidden_layers], "dropout": float(self.dropout),
            "use_leaky_relu": bool(self.use_leaky_relu), "config": dict(self.config),
            "y_mean": float(self.target_mean), "y_std": float(self.target_std),
            "normalize_features": bool(self.normalize_features),
            "scaler_mean": [float(v) for v in mean], "scaler_scale": [float(v) for v in scale],
            "feature_names": names, "training": dict(self.training),
        }
        # Serialised in memory first: torch's writer reports a full disk as an opaque RuntimeError
        # ("unexpected pos ..."); a plain write raises the OSError that says why.
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        p = Path(path)
        with atomic_output(p) as tmp:
            tmp.write_bytes(buffer.getbuffer())
        return p

    @torch.no_grad()
    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predict (n,) float64 targets for features X (n, D) in the training column order."""
        assert self.module is not None, "predict needs a loaded checkpoint"
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
        out = [np.zeros(0, dtype=np.float32)]
        for s in range(0, X32.shape[0], PREDICT_CHUNK_ROWS):
            # A copy: X may be a read-only view (a memory-mapped NPZ), which torch will not wrap.
            xb = torch.tensor(X32[s : s + PREDICT_CHUNK_ROWS], device=self.device)
            out.append(self.module((xb - mean) / scale)[:, 0].cpu().numpy())
        return np.concatenate(out).astype(np.float64) * self.target_std + self.target_mean


def load_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint written by :meth:`Checkpoint.save` (``weights_only=True``); a missing,
    foreign or inconsistent file is a :class:`DataError` naming it."""
    p = Path(path)
    dev = torch.device(device)
    if not p.is_file():
        raise DataError(f"checkpoint not found: {p}")
    try:
        payload = torch.load(p, map_location=dev, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        # An empty or cut-short file is a bare EOFError(): its type is all the reason there is.
        reason = str(exc).strip() or f"{type(exc).__name__} (the file is {p.stat().st_size} bytes, cut short?)"
        raise DataError(f"cannot read checkpoint {p}: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{p} is not a {CHECKPOINT_FORMAT} checkpoint")
    if payload.get("format_version") != CHECKPOINT_FORMAT_VERSION:
        raise DataError(f"{p} has checkpoint format_version {payload.get('format_version')!r}; "
                        f"this code reads version {CHECKPOINT_FORMAT_VERSION} (re-run Step 5 to write one)")
    try:
        module = ReferenceMLP(payload["feature_count"], payload["hidden_layers"],
                              use_leaky_relu=payload["use_leaky_relu"], dropout=payload["dropout"])
        module.load_state_dict(payload["state_dict"])  # strict: every key, nothing extra
        loaded = Checkpoint(
            state_dict=payload["state_dict"], n_features=int(payload["feature_count"]),
            hidden_layers=tuple(int(w) for w in payload["hidden_layers"]),
            use_leaky_relu=bool(payload["use_leaky_relu"]), dropout=float(payload["dropout"]),
            feature_mean=np.asarray(payload["scaler_mean"], dtype=np.float64),
            feature_scale=np.asarray(payload["scaler_scale"], dtype=np.float64),
            target_mean=float(payload["y_mean"]), target_std=float(payload["y_std"]),
            normalize_features=bool(payload["normalize_features"]), feature_names=payload.get("feature_names"),
            config=dict(payload.get("config") or {}), training=dict(payload.get("training") or {}),
            module=module.to(dev).eval(), device=dev,
        )
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DataError(f"checkpoint {p} is inconsistent: {exc}") from None
    if loaded.feature_mean.shape != (loaded.n_features,) or loaded.feature_scale.shape != (loaded.n_features,):
        raise DataError(f"checkpoint {p}: feature scaler does not match n_features={loaded.n_features}")
    return loaded
