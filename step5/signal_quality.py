"""Is there anything to learn? A cheap look at the target before any trial runs.

Optuna cannot find a model for a target that never varies, and the sidecar must say so
(``outcome: DEGENERATE_SIGNAL``, exit code 2) instead of shipping a model that predicts a
constant. The statuses and their thresholds: docs/data.md ("Signal quality").
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: std below this share of the largest |value| is treated as rounding noise.
DEGENERATE_RELATIVE_STD = 1e-9
#: fewer distinct values than this makes a target "weak".
WEAK_MIN_UNIQUE = 10
#: fewer rows than this makes a target "weak".
WEAK_MIN_SAMPLES = 50
#: one value covering at least this share of rows makes a target "weak".
WEAK_MAX_DOMINANT_FRACTION = 0.95


def assess_signal(y: Any, *, min_unique: int = WEAK_MIN_UNIQUE, min_samples: int = WEAK_MIN_SAMPLES,
                  max_dominant_fraction: float = WEAK_MAX_DOMINANT_FRACTION,
                  relative_std: float = DEGENERATE_RELATIVE_STD) -> dict[str, Any]:
    """The sidecar's ``signal_quality`` block for a target vector (plain JSON types): ``signal_status``
    (healthy | weak | degenerate), ``prediction_allowed``, the target's statistics, ``reason``.
    Raises ``ValueError`` for a non-1-D or non-finite ``y``."""
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"`y` must be 1-D, got shape {arr.shape}")
    n = int(arr.size)
    if n and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"`y` must be finite, got {arr[bad]!r} at index {bad}")

    values, counts = np.unique(arr, return_counts=True)
    n_unique = int(values.size)
    std = float(arr.std()) if n else None
    scale = float(np.abs(arr).max()) if n else 0.0
    if n == 0:
        status, reason = "degenerate", "no target values"
    elif n_unique < 2:
        status, reason = "degenerate", f"target is constant ({float(values[0])!r} in all {n} rows)"
    elif std == 0.0 or std <= relative_std * scale:
        status, reason = "degenerate", f"target std {std:.3g} is negligible next to its magnitude {scale:.3g}"
    else:
        weak: list[str] = []
        if n_unique < min_unique:
            weak.append(f"only {n_unique} distinct values (< {min_unique})")
        if n < min_samples:
            weak.append(f"only {n} rows (< {min_samples})")
        dominant_fraction = float(counts.max()) / n
        if dominant_fraction >= max_dominant_fraction:
            top = float(values[int(counts.argmax())])
            weak.append(f"{dominant_fraction:.1%} of rows share the value {top!r} (>= {max_dominant_fraction:.0%})")
        if weak:
            status, reason = "weak", "; ".join(weak)
        else:
            status, reason = "healthy", f"{n_unique} distinct values over {n} rows, std {std:.3g}"

    if status != "healthy":
        logger.warning("target signal is %s: %s", status, reason)
    return {
        "signal_status": status,
        "prediction_allowed": status != "degenerate",
        "target_mean": float(arr.mean()) if n else None,
        "target_std": std,
        "target_variance": float(arr.var()) if n else None,
        "unique_target_values": n_unique,
        "sample_size": n,
        "reason": reason,
    }
