"""The benchmark's workload: identical jobs for every mode.

Every mode must train exactly the same folds, so the workload is fixed up front:

* a seeded sequence of :class:`~step5.protocol.NNParams` (small, realistic MLPs) built
  without Optuna — a sampler would propose different trials when timings differ;
* the generated sample survivors, a seeded test holdout and K seeded folds, written once
  as fold NPZs (:class:`~step5.data.splits.FoldFiles`) that all modes read;
* one :class:`~step5.protocol.TrainRequest` per (trial, fold) with a fixed seed and a
  ``job_id`` ``"t{trial}-f{fold}"`` that the metric cross-check keys on;
* a separate warm-up fold file, so that warming a process up does not pre-fill its data
  cache with a fold the timed section then reads.

Torch-free: this runs in the benchmark's parent process.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from step5.data.sample import write_sample
from step5.data.splits import FoldFiles, holdout_split, kfold_splits
from step5.data.survivors import load_survivors
from step5.protocol import NNParams, TrainRequest

logger = logging.getLogger(__name__)

#: Layer widths the params sequence draws from (the search space's NN range, scaled down
#: so that a 100-fold CPU benchmark finishes in minutes).
WIDTHS = (32, 48, 64, 96, 128)
TEST_HOLDOUT = 0.2  # as the optimizer's default --test-holdout: folds see 80% of the rows


def params_sequence(n_trials: int, seed: int) -> list[NNParams]:
    """``n_trials`` hyperparameter sets from a seeded generator (no Optuna).

    Hidden layers 1-3 of non-increasing width in 32..128, 20-60 epochs, early stopping
    patience 5-12, adam/adamw, log-uniform learning rate and weight decay: the shape of
    what the optimizer's search proposes, at a size where a fold takes a fraction of a
    second on a CPU core.
    """
    if n_trials < 1:
        raise ValueError(f"`n_trials` must be >= 1, got {n_trials}")
    rng = np.random.default_rng([seed, 96])  # independent of the data's stream
    out: list[NNParams] = []
    for _ in range(n_trials):
        depth = int(rng.integers(1, 4))
        widths = sorted((int(w) for w in rng.choice(WIDTHS, size=depth)), reverse=True)
        out.append(
            NNParams(
                hidden_layers=tuple(widths),
                learning_rate=float(10 ** rng.uniform(-3.3, -2.3)),
                dropout=round(float(rng.uniform(0.0, 0.3)), 3),
                epochs=int(rng.integers(20, 61)),
                weight_decay=float(10 ** rng.uniform(-6, -3)),
                optimizer=str(rng.choice(["adam", "adamw"])),
                batch_size=256,
                early_stopping_patience=int(rng.integers(5, 13)),
                gradient_clip=1.0,
                # Every mode must reproduce the input-dropout masks too (bit-identical metrics).
                input_dropout=round(float(rng.uniform(0.0, 0.2)), 3),
            )
        )
    return out


@dataclass
class Workload:
    """The folds every mode trains, and where their data lives."""

    n_trials: int
    k_folds: int
    n_survivors: int
    n_features: int
    seed: int
    params: list[NNParams]
    trials: list[list[TrainRequest]]  # [trial][fold]
    warmup: TrainRequest  # a dry job on its own fold file
    fold_files: FoldFiles
    survivors_path: Path
    fold_write_s: list[float] = field(default_factory=list)  # parent-side NPZ write per fold
    fold_bytes: list[int] = field(default_factory=list)
    n_train: int = 0
    n_val: int = 0

    @property
    def requests(self) -> list[TrainRequest]:
        """All jobs, trial by trial."""
        return [r for trial in self.trials for r in trial]

    @property
    def n_jobs(self) -> int:
        return self.n_trials * self.k_folds

    def describe(self) -> dict:
        hidden = [list(p.hidden_layers) for p in self.params]
        return {
            "trials": self.n_trials,
            "folds": self.k_folds,
            "jobs": self.n_jobs,
            "survivors": self.n_survivors,
            "features": self.n_features,
            "seed": self.seed,
            "rows_train_per_fold": self.n_train,
            "rows_val_per_fold": self.n_val,
            "epochs_total": sum(p.epochs for p in self.params) * self.k_folds,
            "hidden_layers": hidden,
        }

    def close(self) -> None:
        self.fold_files.close()

    def __enter__(self) -> "Workload":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def sample_survivors(data_dir: Path, n_survivors: int, n_features: int, seed: int) -> Path:
    """The generated survivors file for these arguments, written once and then reused.

    ``write_sample`` is deterministic (same arguments, same bytes), so a file found with
    its completion marker is the file we would write.
    """
    target = data_dir / f"sample_{n_survivors}x{n_features}_s{seed}"
    marker = target / ".complete"
    path = target / "survivors_with_scores.json"
    if marker.exists() and path.exists():
        return path
    start = time.perf_counter()
    survivors, _history = write_sample(target, n_survivors=n_survivors, n_features=n_features, seed=seed)
    marker.write_text("ok\n")
    logger.info("generated %s in %.1fs", survivors, time.perf_counter() - start)
    return survivors


def build_workload(
    *,
    n_trials: int,
    k_folds: int,
    n_survivors: int,
    n_features: int = 90,
    seed: int = 42,
    data_dir: Path,
    fold_dir: Path | None = None,
) -> Workload:
    """Generate (or reuse) the sample, split it and write the fold NPZs once.

    The caller closes the workload (it removes the fold files).
    """
    if k_folds < 2:
        raise ValueError(f"`k_folds` must be >= 2, got {k_folds}")
    survivors_path = sample_survivors(data_dir, n_survivors, n_features, seed)
    table = load_survivors(survivors_path)
    dev_idx, _test_idx = holdout_split(len(table.y), TEST_HOLDOUT, seed)
    X, y = table.X[dev_idx], table.y[dev_idx]
    folds = FoldFiles(dir=fold_dir)
    try:
        write_s: list[float] = []
        sizes: list[int] = []
        paths: list[str] = []
        splits = kfold_splits(len(y), k_folds, seed)
        for f, (tr, va) in enumerate(splits):
            start = time.perf_counter()
            p = folds.write(f"fold_{f}", X[tr], y[tr], X[va], y[va], feature_names=table.feature_names)
            write_s.append(time.perf_counter() - start)
            sizes.append(p.stat().st_size)
            paths.append(str(p))
        # The warm-up fold: the first fold's arrays under another name (a cache keyed by
        # path must see it as different data).
        tr, va = splits[0]
        warm_path = folds.write("warmup", X[tr], y[tr], X[va], y[va], feature_names=table.feature_names)
        params = params_sequence(n_trials, seed)
        trials = [
            [
                TrainRequest(
                    data_path=paths[f],
                    params=params[t],
                    trial_number=t,
                    fold_idx=f,
                    normalize_features=True,
                    use_leaky_relu=True,
                    batch_mode="auto",
                    seed=seed * 10_000 + t * 100 + f,
                    job_id=f"t{t}-f{f}",
                )
                for f in range(k_folds)
            ]
            for t in range(n_trials)
        ]
        warm = TrainRequest(
            data_path=str(warm_path),
            params=NNParams(hidden_layers=(64, 32), epochs=5, early_stopping_patience=0),
            trial_number=-1,
            fold_idx=0,
            seed=seed,
            job_id="warmup",
        )
    except BaseException:
        folds.close()
        raise
    logger.info(
        "workload: %d trials x %d folds on %d survivors (%d features); fold files in %s",
        n_trials, k_folds, n_survivors, table.n_features, folds.path,
    )
    return Workload(
        n_trials=n_trials,
        k_folds=k_folds,
        n_survivors=n_survivors,
        n_features=table.n_features,
        seed=seed,
        params=params,
        trials=trials,
        warmup=warm,
        fold_files=folds,
        survivors_path=survivors_path,
        fold_write_s=write_s,
        fold_bytes=sizes,
        n_train=len(splits[0][0]),
        n_val=len(splits[0][1]),
    )


def median(values: list[float]) -> float:
    """Median of a non-empty list (NaN for an empty one)."""
    if not values:
        return math.nan
    return float(np.median(np.asarray(values, dtype=float)))
