"""Is there anything to learn? A cheap look at the target before any trial runs.

Optuna cannot find a model for a target that never varies, and the sidecar must say so
(``outcome: DEGENERATE_SIGNAL``, exit code 2) instead of shipping a model that predicts a
constant. :func:`assess_signal` classifies the target vector:

* ``degenerate`` (prediction not allowed): no rows, fewer than 2 distinct values, or a
  standard deviation that is float noise relative to the values' magnitude
  (``std <= 1e-9 * max|y|``, or exactly 0);
* ``weak`` (prediction allowed, with a warning): fewer than 10 distinct values (a
  near-categorical target), fewer than 50 rows, or one value covering at least 95% of
  the rows (e.g. almost every survivor scored 0.0);
* ``healthy`` otherwise.

The thresholds are module constants and keyword arguments, so a caller can tighten them.
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


def assess_signal(
    y: Any,
    *,
    min_unique: int = WEAK_MIN_UNIQUE,
    min_samples: int = WEAK_MIN_SAMPLES,
    max_dominant_fraction: float = WEAK_MAX_DOMINANT_FRACTION,
    relative_std: float = DEGENERATE_RELATIVE_STD,
) -> dict[str, Any]:
    """Classify a target vector; returns the sidecar's ``signal_quality`` block.

    Keys: ``signal_status`` (healthy | weak | degenerate), ``prediction_allowed``,
    ``target_mean``, ``target_std``, ``target_variance``, ``unique_target_values``,
    ``sample_size``, ``reason``. All values are plain Python types (JSON-ready).
    Raises ``ValueError`` for a non-1-D or non-finite ``y``.
    """
    arr = np.asarray(y, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"`y` must be 1-D, got shape {arr.shape}")
    n = int(arr.size)
    if n and not np.isfinite(arr).all():
        bad = int(np.flatnonzero(~np.isfinite(arr))[0])
        raise ValueError(f"`y` must be finite, got {arr[bad]!r} at index {bad}")

    if n == 0:
        return {
            "signal_status": "degenerate",
            "prediction_allowed": False,
            "target_mean": None,
            "target_std": None,
            "target_variance": None,
            "unique_target_values": 0,
            "sample_size": 0,
            "reason": "no target values",
        }

    values, counts = np.unique(arr, return_counts=True)
    n_unique = int(values.size)
    mean = float(arr.mean())
    std = float(arr.std())
    scale = float(np.abs(arr).max())
    dominant_fraction = float(counts.max()) / n

    if n_unique < 2:
        status, reason = "degenerate", f"target is constant ({float(values[0])!r} in all {n} rows)"
    elif std == 0.0 or std <= relative_std * scale:
        status, reason = "degenerate", f"target std {std:.3g} is negligible next to its magnitude {scale:.3g}"
    else:
        weak: list[str] = []
        if n_unique < min_unique:
            weak.append(f"only {n_unique} distinct values (< {min_unique})")
        if n < min_samples:
            weak.append(f"only {n} rows (< {min_samples})")
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
        "target_mean": mean,
        "target_std": std,
        "target_variance": float(arr.var()),
        "unique_target_values": n_unique,
        "sample_size": n,
        "reason": reason,
    }
