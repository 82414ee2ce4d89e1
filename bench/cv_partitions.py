"""How one K-fold partition's noise picks a linear model's penalty (why ``--cv-repeats``).

For the diabetes splits of ``bench.quality`` (split seeds 42, 1, 7: the same development
and test rows Step 5 gets), this scores the linear model xgboost's ``gblinear`` booster
fits (an elastic net on standardised features and target; tests/models/
test_xgboost_linear.py checks it is scikit-learn's ``ElasticNet``) over a grid of L2
penalties ``lambda`` (``alpha`` at its range floor, 1e-5) with Step 5's anti-overfit
objective, on the search's own partition (KFold seed ``seed + 1``) and on the partitions
repeated CV adds (``partition_seed(seed, r, search_repeat=True)``). It prints, per
penalty, the objective on each partition, their mean, and the test R² of that penalty
fitted on every development row, and which penalty each criterion would choose.

The test R² column explains; it chooses nothing. Usage::

    python -m bench.cv_partitions [--splits 42,1,7] [--partitions 4] [--k-folds 5]
"""
from __future__ import annotations

import argparse
import warnings
from typing import Callable

import numpy as np

#: The L2 penalties scored: xgboost's search range for gblinear, 1e-4 to 10, log-spaced.
LAMBDAS = tuple(float(v) for v in np.logspace(-4, 1, 11))
ALPHA = 1e-5


def fit_linear(X: np.ndarray, y: np.ndarray, lam: float, alpha: float = ALPHA) -> Callable[[np.ndarray], np.ndarray]:
    """The gblinear model as scikit-learn's ElasticNet on standardised rows; returns its predictor."""
    from sklearn.linear_model import ElasticNet

    x_mean, x_scale = X.mean(axis=0), X.std(axis=0)
    x_scale[x_scale == 0.0] = 1.0
    y_mean, y_scale = float(y.mean()), float(y.std())
    model = ElasticNet(alpha=lam + alpha, l1_ratio=alpha / (lam + alpha), max_iter=10_000, tol=1e-7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit((X - x_mean) / x_scale, (y - y_mean) / y_scale)
    return lambda Z: model.predict((Z - x_mean) / x_scale) * y_scale + y_mean


def partition_objective(X: np.ndarray, y: np.ndarray, folds: list, lam: float) -> float:
    """Step 5's anti-overfit objective of one penalty on one K-fold partition."""
    from sklearn.metrics import r2_score

    from step5.optimizer.objective import anti_overfit_score

    val, train = [], []
    for tr, va in folds:
        predict = fit_linear(X[tr], y[tr], lam)
        val.append(r2_score(y[va], predict(X[va])))
        train.append(r2_score(y[tr], predict(X[tr])))
    return anti_overfit_score(val, train)


def split_table(split_seed: int, partitions: int, k_folds: int) -> dict[str, object]:
    """Objective per (penalty, partition), the mean, the test R², and each criterion's choice."""
    from sklearn.datasets import load_diabetes
    from sklearn.metrics import r2_score

    from step5.data.splits import holdout_split, kfold_splits
    from step5.optimizer.backends import partition_seed

    X, y = load_diabetes(return_X_y=True)
    X = X.astype(np.float32).astype(np.float64)  # Step 5 reads features as float32
    dev, test = holdout_split(len(y), 0.2, split_seed)
    Xd, yd = X[dev], y[dev]
    seeds = [split_seed + 1] + [partition_seed(split_seed, r, search_repeat=True) for r in range(1, partitions)]
    parts = [kfold_splits(len(dev), k_folds, s) for s in seeds]
    rows = []
    for lam in LAMBDAS:
        objectives = [partition_objective(Xd, yd, folds, lam) for folds in parts]
        test_r2 = r2_score(y[test], fit_linear(Xd, yd, lam)(X[test]))
        rows.append({"lambda": lam, "objectives": objectives, "mean": float(np.mean(objectives)), "test_r2": test_r2})
    by_first = max(rows, key=lambda r: r["objectives"][0])
    by_mean = max(rows, key=lambda r: r["mean"])
    return {"split_seed": split_seed, "rows": rows, "choice_one_partition": by_first["lambda"],
            "choice_mean": by_mean["lambda"]}


def format_table(table: dict[str, object], partitions: int) -> str:
    header = " ".join(f"{'part ' + str(p):>7}" for p in range(partitions))
    lines = [f"diabetes split seed {table['split_seed']}:", f"  {'lambda':>8} {header} {'mean':>7} {'test R²':>8}"]
    for r in table["rows"]:  # type: ignore[union-attr]
        cells = " ".join(f"{v:7.4f}" for v in r["objectives"])
        mark = ("  <- partition 0" if r["lambda"] == table["choice_one_partition"] else "") + (
            "  <- mean" if r["lambda"] == table["choice_mean"] else "")
        lines.append(f"  {r['lambda']:8.2g} {cells} {r['mean']:7.4f} {r['test_r2']:8.4f}{mark}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cv_partitions", description=__doc__.split("\n\n")[0])
    parser.add_argument("--splits", default="42,1,7", help="diabetes split seeds [42,1,7]")
    parser.add_argument("--partitions", type=int, default=4, help="K-fold partitions: the search's and N - 1 more [4]")
    parser.add_argument("--k-folds", type=int, default=5, help="folds per partition [5]")
    args = parser.parse_args(argv)
    if args.partitions < 1 or args.k_folds < 2:
        parser.error("--partitions must be >= 1 and --k-folds >= 2")
    for seed in (int(s) for s in args.splits.split(",")):
        print(format_table(split_table(seed, args.partitions, args.k_folds), args.partitions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
