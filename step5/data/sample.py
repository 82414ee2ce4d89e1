"""Sample survivors and history files shaped like SPEC section 2, with a planted, learnable
signal, for the demo, the tests and the benchmark (docs/data.md, "Sample generator")."""
from __future__ import annotations

import datetime as dt
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import orjson

from step5.artifacts import HISTORY_FILENAME, SURVIVORS_FILENAME
from step5.cliutil import UsageErrorParser, add_log_level, non_empty_path, non_negative_int, positive_int
from step5.data.survivors import gc_paused
from step5.fsutil import atomic_output, os_error_reason
from step5.jsonio import write_json_atomic
from step5.values import is_int

logger = logging.getLogger(__name__)

#: How many leading feature columns carry the planted signal.
N_SIGNAL_FEATURES = 6

_CHUNK_RECORDS = 10_000
_DECIMALS = 6


def feature_names(n_features: int) -> list[str]:
    """The generator's first ``n_features`` feature names in file order: the signal carriers first,
    so that a small ``--features`` still holds them, then ``aux_feature_NNN`` past the list."""
    names = ["lane_agreement_8", "skip_mean", "residue_mod_16_match_rate", "temporal_stability_mid", "skip_min",
             "hit_rate_window_50"]
    names += [f"lane_agreement_{w}" for w in (2, 4, 16, 32, 64)]
    names += ["skip_max", "skip_median", "skip_std", "skip_entropy", "skip_range", "skip_cv"]
    for m in (8, 16, 32, 64, 125, 1000):
        for stat in ("match_rate", "entropy", "coherence"):
            name = f"residue_mod_{m}_{stat}"
            if name not in names:
                names.append(name)
    names += [f"hit_rate_window_{w}" for w in (10, 25, 100, 200, 500)]
    names += ["temporal_stability_short", "temporal_stability_long"]
    names += ["bidirectional_agreement", "forward_count", "reverse_count", "intersection_weight",
              "survivor_overlap_ratio", "sieve_pass_depth", "sieve_margin"]
    for pos in range(3):
        names += [f"digit_{pos}_match_rate", f"digit_{pos}_bias", f"digit_{pos}_entropy"]
    names += [f"lag_autocorr_{k}" for k in (1, 2, 3, 5, 8, 13)]
    names += [f"state_entropy_{b}" for b in (4, 8, 16)]
    names += [f"window_consistency_{w}" for w in (16, 32, 64, 128)]
    names += ["reseed_probability", "phase_alignment", "drift_score", "cycle_length_log", "period_estimate_log",
              "prng_state_entropy", "sum_parity_bias"]
    names += [f"sum_mod_{m}_bias" for m in (3, 9, 27)]
    names += ["mirror_agreement", "cross_session_agreement_midday", "cross_session_agreement_evening"]
    names += ["global_rank_pct"] + [f"local_density_k{k}" for k in (5, 10, 20)]
    names += [f"gap_quantile_{q}" for q in (10, 25, 75, 90)]
    if n_features <= len(names):
        return names[:n_features]
    return names + [f"aux_feature_{i:03d}" for i in range(n_features - len(names))]


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _transform(name: str, z: np.ndarray) -> np.ndarray:
    """Map a latent N(0, 1) column to a plausible range for the feature family (monotone)."""
    if name.startswith("skip_"):
        return 2.0 + 6.0 * np.log1p(np.exp(z))  # a few draws between hits, > 2
    if name.endswith("_count") or name == "sieve_pass_depth":
        return np.round(np.exp(2.5 + 0.45 * z))  # whole counts stored as floats
    if "entropy" in name:
        return 4.0 * _sigmoid(0.8 * z)  # bits, in (0, 4)
    if name.endswith("_log"):
        return 10.0 + 2.0 * z
    if name.endswith("_bias") or name.startswith("lag_autocorr") or name == "drift_score":
        return 0.1 * np.tanh(z)  # small signed deviations
    if name.startswith("aux_feature"):
        return z
    return _sigmoid(z - 0.5)  # rates, agreements, ratios, probabilities in (0, 1)


def _planted_signal(latent: np.ndarray) -> np.ndarray:
    """Noise-free signal from the first N_SIGNAL_FEATURES latent columns (those present)."""
    n, d = latent.shape
    z = [latent[:, j] if j < d else None for j in range(N_SIGNAL_FEATURES)]
    g = 0.9 * z[0]
    if z[1] is not None:
        g = g + 0.7 * np.tanh(1.5 * z[1])
    if z[2] is not None and z[3] is not None:
        g = g + 0.5 * z[2] * z[3]
    if z[4] is not None:
        g = g + 0.35 * (z[4] ** 2 - 1.0)
    if z[5] is not None:
        g = g + 0.3 * z[5]
    return g


def generate_arrays(n_survivors: int, n_features: int, seed: int, degenerate: bool = False) -> dict[str, np.ndarray]:
    """Draw the sample's columns: ``X`` (n, d), ``holdout_quality``, ``holdout_hits``, ``score``,
    ``confidence``, ``seed`` (n,), and which record lacks which feature (``missing_rows``/``_cols``)."""
    names = feature_names(n_features)
    rng = np.random.default_rng(seed)
    n, d = n_survivors, len(names)

    # mildly correlated latent columns, like real features computed from the same draws
    common = rng.standard_normal((n, 1))
    latent = 0.3 * common + np.sqrt(1.0 - 0.09) * rng.standard_normal((n, d))
    X = np.empty((n, d), dtype=np.float64)
    for j, name in enumerate(names):
        X[:, j] = _transform(name, latent[:, j])
    X = np.round(X, _DECIMALS)

    g = _planted_signal(latent)
    noisy = g + 0.6 * rng.standard_normal(n)
    if degenerate:  # "no survivor ever hit"
        quality, hits = np.zeros(n), np.zeros(n)
    else:
        quality = np.clip(0.3 + 0.08 * noisy, 0.0, 1.0)
        hits = np.clip(0.004 * quality + 0.0005 * rng.standard_normal(n), 0.0, None)
    score = np.clip(0.3 + 0.08 * noisy + 0.03 * rng.standard_normal(n), 0.0, 1.0)
    confidence = _sigmoid(2.0 * noisy + rng.standard_normal(n))

    n_missing = max(1, n // 200) if n >= 10 else 0
    missing_rows = np.sort(rng.choice(n, size=n_missing, replace=False))
    droppable = d - N_SIGNAL_FEATURES
    if droppable > 0:
        missing_cols = N_SIGNAL_FEATURES + rng.integers(0, droppable, size=n_missing)
    else:
        missing_cols = np.full(n_missing, d - 1)

    seeds = rng.choice(2**32, size=n, replace=False)
    rounded = {"holdout_quality": quality, "holdout_hits": hits, "score": score, "confidence": confidence}
    return {"X": X, **{k: np.round(v, _DECIMALS) for k, v in rounded.items()},
            "seed": seeds, "missing_rows": missing_rows, "missing_cols": missing_cols}


def _records(
    arrays: dict[str, np.ndarray], names: Sequence[str], prng_type: str, mod: int, start: int, stop: int
) -> Iterator[dict]:
    X, quality, hits, score, confidence, seeds = (arrays[k][start:stop].tolist() for k in (
        "X", "holdout_quality", "holdout_hits", "score", "confidence", "seed"))
    missing = {int(r): names[int(c)] for r, c in zip(arrays["missing_rows"], arrays["missing_cols"]) if start <= r < stop}
    keys = ("score", "confidence", *names)
    for k in range(stop - start):
        feats = dict(zip(keys, (score[k], confidence[k], *X[k])))
        dropped = missing.get(start + k)
        if dropped is not None:
            del feats[dropped]
        yield {"seed": seeds[k], "score": score[k], "features": feats, "metadata": {"prng_type": prng_type, "mod": mod},
               "holdout_hits": hits[k], "holdout_quality": quality[k]}


@gc_paused()  # millions of short-lived dicts/floats: the cyclic GC only slows this down
def _write_survivors(path: Path, arrays: dict[str, np.ndarray], names: Sequence[str], prng_type: str, mod: int) -> None:
    """Stream the records as one JSON array, chunk by chunk, via a temp file + rename."""
    n = len(arrays["seed"])
    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fh.write(b"[")
        for start in range(0, n, _CHUNK_RECORDS):
            stop = min(n, start + _CHUNK_RECORDS)
            chunk = orjson.dumps(list(_records(arrays, names, prng_type, mod, start, stop)))
            if start:
                fh.write(b",")
            fh.write(chunk[1:-1])  # strip the chunk's own brackets
        fh.write(b"]\n")


def make_history(n_draws: int, seed: int, mod: int = 1000) -> list[dict]:
    """``n_draws`` history entries, two sessions a day from 2024-01-01, uniform draws."""
    rng = np.random.default_rng([seed, 1])  # independent of the survivors stream
    draws = rng.integers(0, mod, size=n_draws).tolist()
    start = dt.date(2024, 1, 1)
    return [{"date": (start + dt.timedelta(days=i // 2)).isoformat(), "session": ("midday", "evening")[i % 2],
             "draw": draw} for i, draw in enumerate(draws)]


def write_sample(
    out_dir: str | os.PathLike[str], n_survivors: int = 2000, n_features: int = 90, seed: int = 42,
    degenerate: bool = False, n_draws: int = 500, *, prng_type: str = "java_lcg", mod: int = 1000,
) -> tuple[Path, Path]:
    """Write ``survivors_with_scores.json`` and ``train_history.json`` into ``out_dir``; returns
    their paths (the arguments: docs/data.md). Same arguments, same bytes."""
    for name, value in (("n_survivors", n_survivors), ("n_features", n_features), ("n_draws", n_draws)):
        if not is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = feature_names(n_features)
    arrays = generate_arrays(n_survivors, n_features, seed, degenerate)
    survivors_path = out / SURVIVORS_FILENAME
    history_path = out / HISTORY_FILENAME
    _write_survivors(survivors_path, arrays, names, prng_type, mod)
    write_json_atomic(history_path, make_history(n_draws, seed, mod), indent=False)
    logger.info("wrote %d survivors x %d features%s to %s and %d draws to %s", n_survivors, n_features,
                " (degenerate target)" if degenerate else "", survivors_path, n_draws, history_path)
    return survivors_path, history_path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m step5.data.sample``: prints the survivors and history paths, one per line."""
    parser = UsageErrorParser(prog="python -m step5.data.sample",
                              description="Write sample survivors/history files with a planted, learnable signal.")
    parser.add_argument("--out", type=non_empty_path, required=True, help="output directory (created if missing)")
    parser.add_argument("--survivors", type=positive_int, default=2000, help="number of survivor records [2000]")
    parser.add_argument("--features", type=positive_int, default=90, help="number of model features per record [90]")
    parser.add_argument("--draws", type=positive_int, default=500, help="number of history draws [500]")
    parser.add_argument("--seed", type=non_negative_int, default=42, help="random seed [42]")
    parser.add_argument("--degenerate", action="store_true", help="constant holdout_quality (no signal)")
    add_log_level(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    try:
        paths = write_sample(args.out, n_survivors=args.survivors, n_features=args.features, seed=args.seed,
                             degenerate=args.degenerate, n_draws=args.draws)
    except OSError as exc:
        print(f"error: cannot write the sample to {args.out}: {os_error_reason(exc)}", file=sys.stderr)
        return 1
    print(*paths, sep="\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
