"""Model quality: Step 5 against scikit-learn baselines on rows it never saw.

Datasets come from what scikit-learn ships and generates, nothing downloaded, in three
suites (``--datasets`` takes dataset and suite names; the default is ``tuning``):

* **tuning** (designed against, issue 36): ``make_friedman1`` with 25 of 30 columns
  uninformative (500 rows), ``make_friedman3`` plus 16 noise columns (600 rows),
  ``make_sparse_uncorrelated`` (linear, 4 of 40 columns, 800 rows), ``make_friedman2``
  (4 columns, 3000 rows) and a recipe of products, a logistic and an absolute value on 6
  of 30 columns (:func:`interactions`, 800 rows);
* **legacy**: issue 14's six, tuned against before: ``load_diabetes`` with split seeds
  42, 1 and 7, ``make_friedman1`` (``--friedman-rows``), and both with 80 noise columns;
* **confirmation** (run only at the end, reported apart, issue 36): issue 36's held-back
  kind (:func:`heldback`: 10 of 50 columns, products, a square and a sine, 1250 rows),
  ``make_friedman1`` with 55 of 60 columns uninformative (2500 rows),
  ``make_sparse_uncorrelated`` with 4 of 50 columns (375 rows), smooth terms and products
  on 12 of 16 columns (:func:`smooth_additive`, 12,500 rows), and ``load_diabetes`` with
  40 noise columns (split seed 3).

Each dataset is written as a survivors file (SPEC section 2: the target is
``holdout_quality``, features ``x000``, ``x001``, ...) plus a small history file, and:

1. Step 5 runs on it in-process (``AntiOverfitMetaOptimizer``, ``--model-type
   neural_net``), or with ``--compare`` ``run_compare`` (all four model types; its
   neural_net run, the same config, gives the NN row); ``--seed`` is the dataset's split
   seed, so Step 5 holds out the rows ``step5.data.splits.holdout_split(n, --test-holdout,
   seed)`` gives;
2. the baselines are fitted on exactly those development rows and scored on exactly
   those test rows: RidgeCV (standardised inputs, alphas 1e-3..1e3), HistGradientBoosting
   (defaults), RandomForest (300 trees), and issue 36's plain MLP grid (GridSearchCV, 5
   folds, standardised inputs, lbfgs, 3 sizes x 5 alphas: :func:`mlp_grid`). Where a
   dataset knows its informative columns, the same grid on those alone is reported beside
   them (:data:`ORACLE`, what knowing the columns is worth; never the best baseline).
   Baseline results are kept under ``--baseline-cache`` and reused while the data and
   the models' settings are the same (:func:`cached_baselines`);
3. per suite, the table (each test R² with its bootstrap standard error over the test
   rows; the columns the final NN reads, and how many of the informative ones; CPU
   seconds of the NN run, the compare run and the baselines), the targets and the CV-vs-
   test optimism of the NN (its best trial's CV mean R² minus its test R²) are printed,
   and written to ``<out>/quality.json`` and ``<out>/quality.png``.

The targets (issue 36): the NN's test R² at least the MLP grid's minus 0.02 on every
dataset, and within 0.05 of the best baseline where the MLP grid comes that close (where
no plain MLP reaches the trees, the NN is not held to them); compare-models at least the
best baseline minus 0.01. Each target line also gives the gap it judges with its paired
bootstrap standard error over the test rows (:func:`paired_gap`: the rows are resampled
together for both models). A test set of 89 rows (diabetes) moves a single model's R² by
about 0.07, so a gap smaller than its standard error is not evidence that either model is
better. The best baseline is itself the highest of four test R², picked on the test rows,
so its line leans optimistic; Step 5's choices never see those rows.

With ``--repeats N`` (> 1) Step 5 runs N times per dataset on the same development and
test rows with different search randomness: repeat r uses the seed ``split seed + r *
REPEAT_SEED_STEP`` for its sampler, folds and training seeds, on a survivors file whose
rows are reordered so that this seed holds out exactly the dataset's test rows
(:func:`reordered_for_seed`). The report then also gives each dataset's mean and spread
over the repeats and how many repeats met each target.

Usage::

    python -m bench.quality [--trials 50] [--datasets tuning|confirmation|legacy|NAME,...]
        [--compare] [--repeats 1] [--out bench/results/quality] [--cpu-workers N]
    python -m bench.quality --report-from DIR [DIR ...] --out DIR   # join runs split by dataset

A quick run: ``--trials 8 --datasets friedman1_n500_p30``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

logger = logging.getLogger("bench.quality")

NOISE_COLUMNS = 80
DIABETES_SEEDS = (42, 1, 7)
TEST_HOLDOUT = 0.2
K_FOLDS = 5
NN_TOLERANCE = 0.05  # NN test R² >= best baseline - this, where the MLP grid reaches that line
MLP_TOLERANCE = 0.02  # NN test R² >= MLP grid - this, on every dataset
COMPARE_TOLERANCE = 0.01  # compare-models test R² >= best baseline - this
BASELINES = ("RidgeCV", "HistGB", "RandomForest", "MLP grid")
#: The MLP grid on the informative columns alone, where a dataset knows them: reported
#: beside the baselines (what column selection is worth), never the "best baseline".
ORACLE = "MLP grid, informative columns"
MLP_SIZES = ((16,), (64,), (64, 64))
MLP_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0)
MLP_MAX_ITER = 400
REPEAT_SEED_STEP = 1000  # repeat r of a dataset runs Step 5 with split seed + r * this
BOOTSTRAP_RESAMPLES = 2000  # test-row resamples behind a gap's standard error


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    X: np.ndarray
    y: np.ndarray
    split_seed: int
    #: The columns the target depends on, where the dataset's recipe says so (None: unknown);
    #: every other column is noise by construction.
    informative: tuple[int, ...] | None = None


def _with_noise(X: np.ndarray, seed: int, columns: int = NOISE_COLUMNS) -> np.ndarray:
    rng = np.random.default_rng([seed, columns])
    return np.hstack([X, rng.normal(size=(X.shape[0], columns))])


def heldback(rows: int, noise_columns: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Issue 36's held-back recipe: ten standard-normal columns that the target reads through
    products, a square and a sine (and a little linearly), then ``noise_columns``
    standard-normal columns it does not read; noise of sd 0.6 on a signal of sd ~2.5."""
    rng = np.random.default_rng([seed, 36])
    X = rng.normal(size=(rows, 10 + noise_columns))
    x = X.T
    y = (1.2 * x[0] * x[1] + 0.8 * x[2] ** 2 + 1.5 * np.sin(1.5 * x[3]) + x[4] * x[5] + 0.7 * x[6]
         - 0.6 * x[7] + 0.5 * x[8] * x[9] + 0.5 * x[6] * x[2] + rng.normal(scale=0.6, size=rows))
    return X, y


def smooth_additive(rows: int, noise_columns: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Twelve standard-normal columns read through smooth one-column terms (tanh, a damped
    square, a bump, a cosine) and three pairwise products, plus ``noise_columns`` unread
    ones; noise sd 0.5."""
    rng = np.random.default_rng([seed, 12])
    X = rng.normal(size=(rows, 12 + noise_columns))
    x = X.T
    y = (np.tanh(1.5 * x[0]) + 0.5 * x[1] ** 2 / (1 + 0.2 * x[1] ** 2) + np.exp(-x[2] ** 2) + 0.8 * np.cos(x[3])
         + 0.6 * x[4] - 0.4 * x[5] + 0.3 * x[6] + 0.7 * x[7] * x[8] - 0.5 * x[9] * x[10] + 0.4 * x[11] * x[0]
         + rng.normal(scale=0.5, size=rows))
    return X, y


def interactions(rows: int, noise_columns: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Six standard-normal columns read through products, a logistic and an absolute value,
    plus ``noise_columns`` unread ones; noise sd 0.5 (a tuning set of the held-back kind,
    with another recipe)."""
    rng = np.random.default_rng([seed, 6])
    X = rng.normal(size=(rows, 6 + noise_columns))
    x = X.T
    y = (x[0] * x[1] - 0.8 * x[2] * x[3] + 2.0 / (1 + np.exp(-2 * x[4])) + 0.6 * np.abs(x[5]) + 0.5 * x[0]
         + rng.normal(scale=0.5, size=rows))
    return X, y


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How to build one dataset, and which suite it belongs to."""

    suite: str  # "tuning" (designed against) | "confirmation" (run at the end only) | "legacy" (issue 14's)
    build: Callable[[], Dataset]
    about: str  # one line for the docs and --help


#: The suites, in report order. Tuning: designed against (with the legacy six, which issue
#: 14 tuned against). Confirmation: run once at the end, never during design (issue 36).
SUITES = ("tuning", "legacy", "confirmation")


def recipes(friedman_rows: int = 2000) -> dict[str, Recipe]:
    """Every dataset the benchmark knows, by name, built lazily (``friedman_rows``: the
    legacy ``friedman1`` sets' size)."""
    from sklearn.datasets import load_diabetes, make_friedman1, make_friedman2, make_friedman3, make_sparse_uncorrelated

    def diabetes(name: str, seed: int, noise: int) -> Dataset:
        X, y = load_diabetes(return_X_y=True)
        return Dataset(name, _with_noise(X, seed, noise) if noise else X, y, seed,
                       informative=tuple(range(10)) if noise else None)

    def friedman(name: str, noise: bool) -> Dataset:
        X, y = make_friedman1(n_samples=friedman_rows, n_features=10, noise=1.0, random_state=0)
        # make_friedman1's columns 5..9 are uniform noise already; the target reads 0..4.
        return Dataset(name, _with_noise(X, 0) if noise else X, y, 42, informative=tuple(range(5)))

    def generated(name: str, seed: int, X: np.ndarray, y: np.ndarray, informative: int) -> Dataset:
        return Dataset(name, X, y, seed, informative=tuple(range(informative)))

    out: dict[str, Recipe] = {}

    def add(name: str, suite: str, about: str, build: Callable[[str], Dataset]) -> None:
        out[name] = Recipe(suite, lambda: build(name), about)

    # ---- tuning: new kinds, designed against
    add("friedman1_n500_p30", "tuning", "make_friedman1, 500 rows, 5 of 30 columns informative (uniform noise)",
        lambda n: generated(n, 11, *make_friedman1(n_samples=500, n_features=30, noise=1.0, random_state=1), 5))
    add("friedman3_n600_p20", "tuning", "make_friedman3 (arctan of a ratio), 600 rows, + 16 normal noise columns",
        lambda n: generated(n, 12, _with_noise(make_friedman3(n_samples=600, noise=0.11, random_state=2)[0], 12, 16),
                            make_friedman3(n_samples=600, noise=0.11, random_state=2)[1], 4))
    add("sparse_linear_n800_p40", "tuning", "make_sparse_uncorrelated (linear), 800 rows, 4 of 40 columns informative",
        lambda n: generated(n, 13, *make_sparse_uncorrelated(n_samples=800, n_features=40, random_state=3), 4))
    add("friedman2_n3000", "tuning", "make_friedman2 (smooth, 4 columns, all informative), 3000 rows, noise sd 125",
        lambda n: generated(n, 14, *make_friedman2(n_samples=3000, noise=125.0, random_state=4), 4))
    add("interactions_n800_p30", "tuning", "6 normal columns through products, a logistic, |x|; + 24 noise columns; 800 rows",
        lambda n: generated(n, 15, *interactions(800, 24, 15), 6))
    # ---- legacy: issue 14's six, tuned against before
    for s in DIABETES_SEEDS:
        add(f"diabetes_s{s}", "legacy", f"load_diabetes (442 rows, 10 columns), split seed {s}",
            lambda n, s=s: diabetes(n, s, 0))
    add("friedman1", "legacy", "make_friedman1, --friedman-rows rows, 5 of 10 columns informative",
        lambda n: friedman(n, False))
    add(f"diabetes_noise{NOISE_COLUMNS}", "legacy", f"load_diabetes + {NOISE_COLUMNS} normal noise columns, split seed 42",
        lambda n: diabetes(n, 42, NOISE_COLUMNS))
    add(f"friedman1_noise{NOISE_COLUMNS}", "legacy", f"friedman1 + {NOISE_COLUMNS} normal noise columns",
        lambda n: friedman(n, True))
    # ---- confirmation: run only at the end
    add("heldback_n1250_p50", "confirmation",
        "issue 36's held-back kind: 10 normal columns (products, a square, a sine) + 40 noise columns; 1250 rows",
        lambda n: generated(n, 21, *heldback(1250, 40, 21), 10))
    add("friedman1_n2500_p60", "confirmation", "make_friedman1, 2500 rows, 5 of 60 columns informative",
        lambda n: generated(n, 22, *make_friedman1(n_samples=2500, n_features=60, noise=1.0, random_state=22), 5))
    add("sparse_linear_n375_p50", "confirmation", "make_sparse_uncorrelated (linear), 375 rows, 4 of 50 columns informative",
        lambda n: generated(n, 23, *make_sparse_uncorrelated(n_samples=375, n_features=50, random_state=23), 4))
    add("smooth_n12500_p16", "confirmation",
        "12 normal columns through smooth terms and 3 products + 4 noise columns; 12500 rows",
        lambda n: generated(n, 24, *smooth_additive(12500, 4, 24), 12))
    add("diabetes_noise40_s3", "confirmation", "load_diabetes + 40 normal noise columns, split seed 3",
        lambda n: diabetes(n, 3, 40))
    return out


def datasets(friedman_rows: int = 2000) -> dict[str, Callable[[], Dataset]]:
    """Every dataset the benchmark knows, by name, built lazily."""
    return {name: r.build for name, r in recipes(friedman_rows).items()}


def suite_names(suite: str, friedman_rows: int = 2000) -> list[str]:
    """The datasets of one suite, in report order."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; expected one of {list(SUITES)}")
    return [n for n, r in recipes(friedman_rows).items() if r.suite == suite]


def reordered_for_seed(ds: Dataset, seed: int) -> Dataset:
    """``ds`` with its rows reordered so that a Step 5 run with ``seed`` holds out exactly the
    rows ``ds`` holds out with its own split seed: the same test rows, the same development
    rows (in their order, at other positions), so only the search's randomness changes."""
    from step5.data.splits import holdout_split

    n = len(ds.y)
    dev, test = holdout_split(n, TEST_HOLDOUT, ds.split_seed)
    new_dev, new_test = holdout_split(n, TEST_HOLDOUT, seed)
    order = np.empty(n, dtype=np.int64)
    order[new_dev] = dev  # sizes depend only on n and the fraction, so they match
    order[new_test] = test
    return Dataset(ds.name, ds.X[order], ds.y[order], seed)


def run_folder_name(name: str, repeat: int) -> str:
    """The folder under ``--out`` of repeat ``repeat`` of dataset ``name``."""
    return name if repeat == 0 else f"{name}_r{repeat}"


def parse_run_folder_name(folder_name: str) -> tuple[str, int]:
    """``(dataset, repeat)`` of a folder :func:`run_folder_name` named."""
    base, sep, repeat = folder_name.rpartition("_r")
    return (base, int(repeat)) if sep and base and repeat.isdigit() else (folder_name, 0)


def repeat_seed(split_seed: int, repeat: int) -> int:
    """Step 5's ``--seed`` in repeat ``repeat`` of a dataset with this split seed."""
    return split_seed + repeat * REPEAT_SEED_STEP


def write_survivors(ds: Dataset, folder: Path) -> tuple[Path, Path]:
    """The dataset as a survivors file (target ``holdout_quality``) and a history file."""
    from step5.data.sample import make_history
    from step5.jsonio import write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    records = [
        {
            "seed": i, "score": 0.0,
            "features": {f"x{j:03d}": float(v) for j, v in enumerate(row)},
            "metadata": {"prng_type": "java_lcg", "mod": 1000},
            "holdout_hits": 0.0, "holdout_quality": float(t),
        }
        for i, (row, t) in enumerate(zip(ds.X, ds.y))
    ]
    survivors, history = folder / "survivors_with_scores.json", folder / "train_history.json"
    write_json_atomic(survivors, records, indent=False)
    write_json_atomic(history, make_history(200, 0), indent=False)
    return survivors, history


def mlp_grid() -> Any:
    """Issue 36's plain MLP: standardised inputs, lbfgs, 3 sizes x 5 alphas, chosen by 5-fold CV."""
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return GridSearchCV(
        make_pipeline(StandardScaler(), MLPRegressor(max_iter=MLP_MAX_ITER, random_state=0, solver="lbfgs")),
        {"mlpregressor__alpha": list(MLP_ALPHAS), "mlpregressor__hidden_layer_sizes": list(MLP_SIZES)},
        cv=KFold(K_FOLDS, shuffle=True, random_state=0), n_jobs=1,
    )


def run_baselines(ds: Dataset) -> tuple[dict[str, float], dict[str, list[float]], dict[str, float]]:
    """Each baseline's test R², test-row predictions and CPU seconds, fitted on the
    development rows Step 5 uses; the predictions also hold the test rows' targets under
    ``"y"``. Where the dataset knows its informative columns, the MLP grid is also fitted
    on those alone (:data:`ORACLE`: what knowing the columns is worth; not a baseline)."""
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from step5.data.splits import holdout_split

    dev, test = holdout_split(len(ds.y), TEST_HOLDOUT, ds.split_seed)
    X = ds.X.astype(np.float32).astype(np.float64)  # what the survivors file holds
    columns = slice(None)
    models: dict[str, tuple[Any, Any]] = {
        "RidgeCV": (make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))), columns),
        "HistGB": (HistGradientBoostingRegressor(random_state=0), columns),
        "RandomForest": (RandomForestRegressor(n_estimators=300, random_state=0, n_jobs=1), columns),
        "MLP grid": (mlp_grid(), columns),
    }
    if ds.informative is not None and len(ds.informative) < ds.X.shape[1]:
        models[ORACLE] = (mlp_grid(), list(ds.informative))
    scores: dict[str, float] = {}
    cpu_s: dict[str, float] = {}
    predictions: dict[str, list[float]] = {"y": ds.y[test].tolist()}
    for name, (model, cols) in models.items():
        start = time.process_time()
        # One BLAS/OpenMP thread: on a shared machine a second one spins waiting for a core
        # (HistGB and the lbfgs fits ran ten times slower with two under load).
        with threadpool_limits(limits=1), warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs at max_iter: a result, not news
            model.fit(X[dev][:, cols], ds.y[dev])
        pred = model.predict(X[test][:, cols])
        cpu_s[name] = round(time.process_time() - start, 1)
        scores[name] = float(r2_score(ds.y[test], pred))
        predictions[name] = pred.tolist()
    return scores, predictions, cpu_s


def baseline_key(ds: Dataset) -> str:
    """What a cached baseline result depends on: the data, the split and the models' settings."""
    import hashlib

    h = hashlib.sha256()
    for part in (ds.X.astype(np.float32).tobytes(), ds.y.tobytes(), repr((ds.split_seed, TEST_HOLDOUT, K_FOLDS, BASELINES,
                 MLP_SIZES, MLP_ALPHAS, MLP_MAX_ITER, ds.informative)).encode()):
        h.update(part)
    return h.hexdigest()[:16]


def cached_baselines(ds: Dataset, cache: Path | None) -> tuple[dict[str, float], dict[str, list[float]], dict[str, float]]:
    """:func:`run_baselines`, read from ``cache/<dataset>.json`` when it holds this data's
    result (:func:`baseline_key`), else computed and written there: the baselines do not
    change while Step 5 is tuned, and on the larger tables the MLP grid takes many minutes."""
    path = cache / f"{ds.name}.json" if cache is not None else None
    key = baseline_key(ds)
    if path is not None and path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            logger.info("%s: baselines from %s", ds.name, path)
            return saved["scores"], saved["predictions"], saved["cpu_s"]
    scores, predictions, cpu_s = run_baselines(ds)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"key": key, "scores": scores, "predictions": predictions, "cpu_s": cpu_s}))
    return scores, predictions, cpu_s


def step5_test_predictions(ds: Dataset, res: dict[str, Any]) -> dict[str, list[float]]:
    """What the models a :func:`run_step5` call saved predict for the test rows, loaded as
    Step 6 would (``step5.predictor``, from the sidecars the run reported): ``"nn"`` and,
    after compare-models, ``"compare"``."""
    from step5.data.splits import holdout_split
    from step5.predictor import load_predictor

    _, test = holdout_split(len(ds.y), TEST_HOLDOUT, ds.split_seed)
    X_test = ds.X[test].astype(np.float32)
    sidecars = {"nn": res["nn"]["sidecar_path"]}
    if "compare" in res:  # where compare-models left each model: the winner's folder or the archive
        by_model = res["compare"]["by_model"]
        sidecars = {"nn": by_model["neural_net"]["sidecar_path"],
                    "compare": by_model[res["compare"]["winner"]]["sidecar_path"]}
    return {who: load_predictor(path).predict(X_test).tolist() for who, path in sidecars.items()}


def paired_gap(y: Any, best: Any, ours: Any, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """``R²(best) - R²(ours)`` on these rows, and its bootstrap standard error: each resample
    draws rows with replacement and scores both models on the same draw, so what the two
    share (hard rows, easy rows) cancels out of the gap."""
    from sklearn.metrics import r2_score

    y, best, ours = (np.asarray(v, dtype=np.float64) for v in (y, best, ours))
    rows = np.random.default_rng(seed).integers(0, len(y), size=(len(y), resamples))  # a column per resample

    def r2_per_resample(pred: np.ndarray) -> np.ndarray:
        return r2_score(y[rows], pred[rows], multioutput="raw_values")

    gaps = r2_per_resample(best) - r2_per_resample(ours)
    return float(r2_score(y, best) - r2_score(y, ours)), float(np.std(gaps, ddof=1))


def cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have ended (the workers and
    one-shot trainers a Step 5 run starts end with it), user plus system."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def kept_columns(sidecar_path: str | Path) -> list[int]:
    """The input columns a saved NN reads: those whose weights in the layer that reads the
    inputs are not all zero (input sparsity zeroes a column exactly; the fold ensemble reads
    a column when any of its fold models does)."""
    import torch

    sidecar = json.loads(Path(sidecar_path).read_text())
    checkpoint = Path(sidecar_path).parent / Path(sidecar["checkpoint_path"]).name
    state = torch.load(checkpoint, weights_only=True, map_location="cpu")["state_dict"]
    first = state["network.0.weight"]  # (W, D): the first hidden layer's, or the head's in a linear model
    return [int(j) for j in torch.nonzero(first.abs().sum(dim=0) > 0).flatten()]


def _nn_row(outcome: Any, wall_s: float, cpu_s: float) -> dict[str, Any]:
    metrics = outcome.sidecar.get("training_metrics", {})
    return {
        "status": outcome.status, "test_r2": outcome.test_r2, "cv_r2_mean": metrics.get("cv_r2_mean"),
        "train_r2": metrics.get("train_r2"), "cv_objective": outcome.cv_score, "cv_rescored": outcome.cv_rescored,
        "best_trial": outcome.sidecar.get("optuna", {}).get("best_trial_number"),
        "hyperparameters": outcome.sidecar.get("hyperparameters"), "wall_s": round(wall_s, 1),
        "cpu_s": round(cpu_s, 1),
        "kept_columns": kept_columns(outcome.sidecar_path) if outcome.sidecar_path else None,
        "sidecar_path": str(outcome.sidecar_path) if outcome.sidecar_path else None,
    }


def run_step5(ds: Dataset, survivors: Path, history: Path, out: Path, *, trials: int, compare: bool,
              max_epochs: int, cpu_workers: int = 1, pruner: str | None = None) -> dict[str, Any]:
    """Step 5's NN run (and compare-models): test R², CV mean R², train R² of the final model.

    With ``compare``, the NN row is compare-models' own neural_net run: the same config a
    lone ``--model-type neural_net`` run has (compare replaces only the output folder), so
    a second, identical search would only double the time.
    """
    from step5.optimizer.compare import run_compare
    from step5.optimizer.config import OptimizerConfig
    from step5.optimizer.optimizer import AntiOverfitMetaOptimizer

    common = dict(
        survivors=survivors, lottery_data=history, trials=trials, k_folds=K_FOLDS, test_holdout=TEST_HOLDOUT,
        seed=ds.split_seed, cpu_workers=cpu_workers, pruner=pruner, log_level="WARNING", nn_max_epochs=max_epochs,
        skip_registry=out / "no_registry.json", diagnostics_dir=out / "diagnostics_outputs",
    )
    res: dict[str, Any] = {}
    if not compare:
        t0, c0 = time.perf_counter(), cpu_seconds()
        outcome = AntiOverfitMetaOptimizer(OptimizerConfig(output_dir=out / "nn", **common)).run()
        res["nn"] = _nn_row(outcome, time.perf_counter() - t0, cpu_seconds() - c0)
        return res

    class KeepNN(AntiOverfitMetaOptimizer):
        """The default optimizer, keeping the neural_net run's outcome for the NN row."""

        def run(self) -> Any:
            t0, c0 = time.perf_counter(), cpu_seconds()
            outcome = super().run()
            if self.config.model_type == "neural_net":
                res["nn"] = _nn_row(outcome, time.perf_counter() - t0, cpu_seconds() - c0)
            return outcome

    def optimizer(config: OptimizerConfig) -> KeepNN:
        # A tree library's --cpu-workers is its thread count: one OpenMP thread, which on a
        # shared machine does not spin waiting for a second core; the net keeps its workers.
        if config.model_type != "neural_net":
            config = dataclasses.replace(config, cpu_workers=1)
        return KeepNN(config)

    t0, c0 = time.perf_counter(), cpu_seconds()
    cfg = OptimizerConfig(output_dir=out / "compare", compare_models=True, **common)
    run_compare(cfg, optimizer_factory=optimizer)
    if "nn" not in res:
        raise RuntimeError(f"{ds.name}: compare-models ran no neural_net model")
    summary = json.loads((cfg.diagnostics_folder / "compare_models_summary.json").read_text())
    winner = summary["winner"]
    res["compare"] = {
        "winner": winner,
        "test_r2": summary["models"][winner]["test_r2"] if winner else None,
        "by_model": {mt: {"cv_score": m["cv_score"], "cv_rescored": m["cv_rescored"], "test_r2": m["test_r2"],
                          "sidecar_path": m["sidecar_path"]}
                     for mt, m in summary["models"].items()},
        "wall_s": round(time.perf_counter() - t0, 1),
        "cpu_s": round(cpu_seconds() - c0, 1),
    }
    return res


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


def report(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """The tables (one per suite), the targets and the CV-vs-test optimism; True when every
    target is met. Test R² carry their bootstrap standard error over the test rows where
    the row kept its test predictions."""
    met = True
    parts = []
    for suite, group in _by_suite(rows):
        text, ok = _suite_report(group)
        parts.append((f"{suite.capitalize()} datasets:\n\n" if suite else "") + text)
        met &= ok
    return "\n\n".join(parts), met


def _by_suite(rows: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """Rows grouped by suite, in :data:`SUITES` order; a lone unnamed group when no row
    says (rows of a run before the suites)."""
    if not any(r.get("suite") for r in rows):
        return [("", rows)]
    order = {name: i for i, name in enumerate(SUITES)}
    suites = sorted({r.get("suite") or "" for r in rows}, key=lambda x: order.get(x, len(order)))
    return [(suite, [r for r in rows if (r.get("suite") or "") == suite]) for suite in suites]


def _suite_report(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    head = ("| data | rows x cols | Step 5 NN | compare-models (winner) | " + " | ".join(BASELINES)
            + f" | best baseline | {ORACLE} | NN CV R² | optimism (CV - test) | NN keeps (informative) "
            "| CPU s: NN, compare, baselines |")
    lines = [head, "|" + "---|" * (len(BASELINES) + 10)]
    met = True
    checks = []
    for r in rows:
        best = max(r["baselines"].values())
        nn = r["nn"]["test_r2"]
        cmp = r.get("compare", {})
        cmp_s = f"{_with_se(r, 'compare', cmp.get('test_r2'))} ({cmp.get('winner')})" if cmp else "-"
        opt = None if nn is None or r["nn"]["cv_r2_mean"] is None else r["nn"]["cv_r2_mean"] - nn
        label = _label(r)
        lines.append(
            f"| {label} | {r.get('rows', '-')} x {r.get('features', '-')} | {_with_se(r, 'nn', nn)} | {cmp_s} | "
            + " | ".join(_with_se(r, b, r["baselines"][b]) for b in BASELINES)
            + f" | {_fmt(best)} | {_with_se(r, ORACLE, r.get('oracle'))} | {_fmt(r['nn']['cv_r2_mean'])} | {_fmt(opt)} "
            f"| {_kept_text(r)} | {_cpu_text(r)} |"
        )
        ok_mlp = _nn_vs_mlp_met(r)
        checks.append(f"{label}: NN {_fmt(nn)} >= MLP grid {r['baselines']['MLP grid']:.3f} - {MLP_TOLERANCE}: "
                      f"{'met' if ok_mlp else 'MISSED'}{_gap_text(r, 'nn', 'MLP grid')}")
        met &= ok_mlp
        if _an_mlp_reaches_best(r):
            ok_nn = _nn_met(r)
            checks.append(f"{label}: NN {_fmt(nn)} >= best baseline {best:.3f} - {NN_TOLERANCE}: "
                          f"{'met' if ok_nn else 'MISSED'}{_gap_text(r, 'nn')}")
            met &= ok_nn
        else:
            checks.append(f"{label}: NN against the best baseline {best:.3f} - {NN_TOLERANCE}: no MLP reaches it "
                          f"(MLP grid {r['baselines']['MLP grid']:.3f}), not a target{_gap_text(r, 'nn')}")
        if cmp:
            ok_c = _compare_met(r)
            checks.append(f"{label}: compare-models {_fmt(cmp.get('test_r2'))} >= best baseline "
                          f"{best:.3f} - {COMPARE_TOLERANCE}: {'met' if ok_c else 'MISSED'}{_gap_text(r, 'compare')}")
            met &= ok_c
    text = "\n".join(lines) + "\n\nTargets:\n" + "\n".join("  " + c for c in checks)
    spread = repeat_summary(rows)
    return text + ("\n\nOver the repeats (same rows, other search seeds):\n" + spread if spread else ""), met


def r2_standard_error(y: Any, pred: Any, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> float:
    """The bootstrap standard error of one model's R² over these test rows."""
    from sklearn.metrics import r2_score

    y, pred = (np.asarray(v, dtype=np.float64) for v in (y, pred))
    rows = np.random.default_rng(seed).integers(0, len(y), size=(len(y), resamples))
    return float(np.std(r2_score(y[rows], pred[rows], multioutput="raw_values"), ddof=1))


def _with_se(row: dict[str, Any], who: str, value: float | None) -> str:
    """``0.812 ± 0.015``: a test R² and its bootstrap SE, or the value alone when the row has
    no test predictions for ``who``."""
    preds = row.get("test_predictions") or {}
    if value is None or who not in preds:
        return _fmt(value)
    return f"{_fmt(value)} ± {r2_standard_error(preds['y'], preds[who]):.3f}"


def _kept_text(row: dict[str, Any]) -> str:
    """``12 (10 of 10)``: the input columns the final NN reads, and how many of the
    dataset's informative columns are among them."""
    kept = row["nn"].get("kept_columns")
    if kept is None:
        return "-"
    informative = row.get("informative")
    if not informative:
        return f"{len(kept)} of {row.get('features', '?')}"
    return f"{len(kept)} of {row.get('features', '?')} ({len(set(kept) & set(informative))} of {len(informative)})"


def _cpu_text(row: dict[str, Any]) -> str:
    nn = row["nn"].get("cpu_s")
    cmp = row.get("compare", {}).get("cpu_s")
    base = row.get("baselines_cpu_s")
    base_s = None if not base else sum(base.values())
    return ", ".join("-" if v is None else f"{v:.0f}" for v in (nn, cmp, base_s))


def _label(row: dict[str, Any]) -> str:
    return row["dataset"] if not row.get("repeat") else f"{row['dataset']} r{row['repeat']}"


def _gap_text(row: dict[str, Any], who: str, against: str | None = None) -> str:
    """`` (gap to RidgeCV +0.027 ± 0.033, ...)``: the test R² of ``against`` (default: the
    best baseline) minus ``who``'s, with its paired bootstrap standard error; empty for
    rows saved without test predictions."""
    preds = row.get("test_predictions") or {}
    if who not in preds:
        return ""
    best = against if against is not None else max(row["baselines"], key=row["baselines"].get)
    gap, se = paired_gap(preds["y"], preds[best], preds[who])
    return f" (gap to {best} {gap:+.3f} ± {se:.3f}, paired bootstrap SE over {len(preds['y'])} test rows)"


def _nn_met(row: dict[str, Any]) -> bool:
    nn = row["nn"]["test_r2"]
    return nn is not None and nn >= max(row["baselines"].values()) - NN_TOLERANCE


def _nn_targets_met(row: dict[str, Any]) -> bool:
    """Both of the NN's targets: against the MLP grid, and against the best baseline where
    it applies."""
    return _nn_vs_mlp_met(row) and (_nn_met(row) or not _an_mlp_reaches_best(row))


def _nn_vs_mlp_met(row: dict[str, Any]) -> bool:
    nn = row["nn"]["test_r2"]
    return nn is not None and nn >= row["baselines"]["MLP grid"] - MLP_TOLERANCE


def _an_mlp_reaches_best(row: dict[str, Any]) -> bool:
    """Whether the NN is held to the best baseline: where a plain MLP (the grid) comes
    within :data:`NN_TOLERANCE` of it, an MLP can, so the NN must too (issue 36)."""
    return row["baselines"]["MLP grid"] >= max(row["baselines"].values()) - NN_TOLERANCE


def _compare_met(row: dict[str, Any]) -> bool:
    got = row.get("compare", {}).get("test_r2")
    return got is not None and got >= max(row["baselines"].values()) - COMPARE_TOLERANCE


def repeat_summary(rows: list[dict[str, Any]]) -> str:
    """Per dataset run more than once: the mean, spread and worst of the NN's and
    compare-models' test R², and in how many runs each target was met (empty: no repeats)."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        runs.setdefault(r["dataset"], []).append(r)
    lines = []
    for name, group in runs.items():
        if len(group) < 2:
            continue
        parts = []
        for what, values, met in (
            ("NN", [r["nn"]["test_r2"] for r in group], [_nn_targets_met(r) for r in group]),
            ("compare-models", [r.get("compare", {}).get("test_r2") for r in group],
             [_compare_met(r) for r in group if r.get("compare")]),
        ):
            got = np.array([v for v in values if v is not None], dtype=float)
            if got.size and met:
                parts.append(f"{what} {got.mean():.3f} ± {got.std(ddof=1) if got.size > 1 else 0.0:.3f} "
                             f"(worst {got.min():.3f}), target met in {sum(met)} of {len(met)}")
        lines.append(f"  {name} ({len(group)} runs): " + "; ".join(parts))
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure

    names = [_label(r) for r in rows]
    series = {"Step 5 NN": [r["nn"]["test_r2"] for r in rows]}
    if any("compare" in r for r in rows):
        series["compare-models"] = [r.get("compare", {}).get("test_r2") for r in rows]
    for b in BASELINES:
        series[b] = [r["baselines"][b] for r in rows]
    fig = Figure(figsize=(max(8, 1.9 * len(rows)), 4.5))
    ax = fig.subplots()
    w = 0.8 / len(series)
    for i, (label, vals) in enumerate(series.items()):
        xs = [j + (i - (len(series) - 1) / 2) * w for j in range(len(rows))]
        ax.bar(xs, [v if v is not None else 0.0 for v in vals], width=w, label=label)
    ax.set_xticks(range(len(rows)), names, rotation=15)
    ax.set_ylabel("test R² (untouched rows)")
    ax.set_ylim(bottom=min(0.0, *(v for vals in series.values() for v in vals if v is not None)))
    ax.axhline(0, color="black", linewidth=0.8)
    # Beside the axes, not on them: R² near 1 puts the bars' tops where a legend would sit.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Step 5 vs scikit-learn baselines, same dev rows, same test rows")
    fig.savefig(path, dpi=110, bbox_inches="tight")


def _print_report(rows: list[dict[str, Any]], trials: Any, out: Path) -> None:
    text, met = report(rows)
    print(f"Step 5 quality, {trials} trials per run, {K_FOLDS} folds, test holdout {TEST_HOLDOUT}:\n")
    print(text)
    print(f"\nAll targets met: {met}")
    plot(rows, out / "quality.png")
    print(f"Results: {out / 'quality.json'}; picture: {out / 'quality.png'}")


def _report_from(folders: list[Path], out: Path) -> int:
    rows: list[dict[str, Any]] = []
    trials = set()
    for folder in folders:
        saved = json.loads((folder / "quality.json").read_text())
        trials.add(saved["settings"]["trials"])
        rows += saved["rows"]
    order = list(datasets(2000))
    rows.sort(key=lambda r: (order.index(r["dataset"]) if r["dataset"] in order else len(order), r.get("repeat", 0)))
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(
        {"settings": {"report_from": [str(f) for f in folders], "trials": sorted(trials)}, "rows": rows},
        indent=1, default=str))
    _print_report(rows, "/".join(map(str, sorted(trials))), out)
    return 0


def _dataset_names(spec: str | None, known: dict[str, Recipe]) -> list[str]:
    """``--datasets``: names and suite names, comma-separated; default the tuning suite
    (the confirmation suite runs only when asked for, at the end)."""
    if not spec:
        return [n for n, r in known.items() if r.suite == "tuning"]
    names: list[str] = []
    for item in spec.split(","):
        names += [n for n, r in known.items() if r.suite == item] if item in SUITES else [item]
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=50,
                        help="Optuna trials per Step 5 run [50, Step 5's own default]")
    parser.add_argument("--datasets", default=None,
                        help="comma-separated dataset or suite names (" + ", ".join(SUITES) + "; default: tuning): "
                             + ", ".join(datasets(2000)))
    parser.add_argument("--compare", action="store_true", help="also run --compare-models on each dataset")
    parser.add_argument("--friedman-rows", type=int, default=2000, help="rows of make_friedman1 [2000]")
    parser.add_argument("--nn-max-epochs", type=int, default=200, help="Step 5's NN epoch cap [200]")
    parser.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 1,
                        help="Step 5's --cpu-workers: one single-threaded worker per core [%(default)s]; a "
                             "second torch thread per worker only waits for a core on a shared machine")
    parser.add_argument("--pruner", default=None, help="Step 5's --pruner [the policy's: none]")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Step 5 runs per dataset, each with other search seeds on the same rows [1]")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality"))
    parser.add_argument("--baseline-cache", type=Path, default=Path("bench/results/baselines"),
                        help="where each dataset's baseline results are kept and reused [bench/results/baselines]")
    parser.add_argument("--baselines-only", action="store_true",
                        help="fit (or read) the baselines of --datasets and stop: no Step 5 run")
    parser.add_argument("--report-from", type=Path, nargs="+", default=None, metavar="DIR",
                        help="train nothing: join the quality.json of these --out folders (runs of the same "
                             "code split by dataset) and print the table, the targets and the picture into --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.report_from:
        return _report_from(args.report_from, args.out)
    known_recipes = recipes(args.friedman_rows)
    known = {name: r.build for name, r in known_recipes.items()}
    names = _dataset_names(args.datasets, known_recipes)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; known: {list(known)}")
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in names:
        ds = known[name]()
        logger.info("%s: %d rows x %d features; baselines", name, *ds.X.shape)
        t0 = time.perf_counter()
        scores, baseline_predictions, baselines_cpu_s = cached_baselines(ds, args.baseline_cache)
        baselines_wall_s = round(time.perf_counter() - t0, 1)
        baselines = {b: scores[b] for b in BASELINES}
        logger.info("%s: baselines %s (CPU s %s)", name, scores, baselines_cpu_s)
        if args.baselines_only:
            continue
        for repeat in range(args.repeats):
            run_ds = ds if repeat == 0 else reordered_for_seed(ds, repeat_seed(ds.split_seed, repeat))
            folder = args.out / run_folder_name(name, repeat)
            survivors, history = write_survivors(run_ds, folder / "data")
            row: dict[str, Any] = {"dataset": name, "suite": known_recipes[name].suite, "repeat": repeat, "rows": int(ds.X.shape[0]),
                                   "features": int(ds.X.shape[1]), "split_seed": ds.split_seed,
                                   "step5_seed": run_ds.split_seed, "baselines": baselines,
                                   "baselines_wall_s": baselines_wall_s, "baselines_cpu_s": baselines_cpu_s,
                                   "oracle": scores.get(ORACLE), "informative": ds.informative}
            logger.info("%s: baselines %s; Step 5 (%d trials, seed %d)", _label(row), baselines, args.trials,
                        run_ds.split_seed)
            row.update(run_step5(run_ds, survivors, history, folder, trials=args.trials, compare=args.compare,
                                 max_epochs=args.nn_max_epochs, cpu_workers=args.cpu_workers,
                                 pruner=args.pruner))
            # The same test rows in the same order for every repeat (reordered_for_seed).
            row["test_predictions"] = {**baseline_predictions, **step5_test_predictions(run_ds, row)}
            logger.info("%s: NN %s", _label(row), row["nn"])
            rows.append(row)
            (args.out / "quality.json").write_text(json.dumps(
                {"settings": {**vars(args), "out": str(args.out)}, "rows": rows}, indent=1, default=str))
    if not args.baselines_only:
        _print_report(rows, args.trials, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
