"""Model quality: Step 5 against tuned scikit-learn baselines on rows it never saw.

Datasets come from what scikit-learn ships, nothing downloaded:

* ``diabetes_s<seed>``: ``load_diabetes`` (442 rows, 10 features), one per split seed;
* ``friedman1``: ``make_friedman1`` (``--friedman-rows`` rows, 10 features, noise 1.0);
* ``..._noise80``: the same with 80 uninformative standard-normal columns appended.

Each dataset is written as a survivors file (SPEC section 2: the target is
``holdout_quality``, features ``x000``, ``x001``, ...) plus a small history file, and:

1. Step 5 runs on it in-process (``AntiOverfitMetaOptimizer``, ``--model-type
   neural_net``), or with ``--compare`` ``run_compare`` (all four model types; its
   neural_net run, the same config, gives the NN row); ``--seed`` is the dataset's split
   seed, so Step 5 holds out the rows ``step5.data.splits.holdout_split(n, --test-holdout,
   seed)`` gives;
2. the baselines are fitted on exactly those development rows and scored on exactly
   those test rows: RidgeCV (standardised inputs, alphas 1e-3..1e3), HistGradientBoosting
   (defaults), RandomForest (300 trees), and an MLPRegressor grid (GridSearchCV, 5 folds,
   standardised inputs, lbfgs, alpha 0.1/1/10 x one layer of 16/64);
3. the table, the targets of issue 14 (NN test R² within 0.05 of the best baseline on
   every dataset; compare-models at least the best baseline minus 0.01) and the CV-vs-test
   optimism of the NN (its best trial's CV mean R² minus its test R²) are printed, and
   written to ``<out>/quality.json`` and ``<out>/quality.png``.

Each target line also gives the gap it judges, best baseline's test R² minus Step 5's, with
its paired bootstrap standard error over the test rows (:func:`paired_gap`: the rows are
resampled together for both models). A test set of 89 rows (diabetes) moves a single
model's R² by about 0.07 and a gap between two models by a few hundredths, so a gap
smaller than its standard error is not evidence that either model is better. The best
baseline is itself the highest of four test R², picked on the test rows, so its line leans
optimistic; Step 5's choices never see those rows. The predictions behind this (every
model's, on the test rows) are kept in ``quality.json``.

With ``--repeats N`` (> 1) Step 5 runs N times per dataset on the same development and
test rows with different search randomness: repeat r uses the seed ``split seed + r *
REPEAT_SEED_STEP`` for its sampler, folds and training seeds, on a survivors file whose
rows are reordered so that this seed holds out exactly the dataset's test rows
(:func:`reordered_for_seed`). The report then also gives each dataset's mean and spread
over the repeats and how many repeats met each target, so a lever can be judged against
the search's own run-to-run spread rather than against one draw of it.

Usage::

    python -m bench.quality [--trials 30] [--datasets diabetes_s42,friedman1,...]
        [--compare] [--repeats 1] [--out bench/results/quality] [--friedman-rows 2000]
    python -m bench.quality --report-from DIR [DIR ...] --out DIR   # join runs split by dataset

A quick run: ``--trials 8 --datasets diabetes_s42,diabetes_noise80``.
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
NN_TOLERANCE = 0.05  # NN test R² >= best baseline - this
COMPARE_TOLERANCE = 0.01  # compare-models test R² >= best baseline - this
BASELINES = ("RidgeCV", "HistGB", "RandomForest", "MLP grid")
REPEAT_SEED_STEP = 1000  # repeat r of a dataset runs Step 5 with split seed + r * this
BOOTSTRAP_RESAMPLES = 2000  # test-row resamples behind a gap's standard error


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    X: np.ndarray
    y: np.ndarray
    split_seed: int


def _with_noise(X: np.ndarray, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 80])
    return np.hstack([X, rng.normal(size=(X.shape[0], NOISE_COLUMNS))])


def datasets(friedman_rows: int) -> dict[str, Callable[[], Dataset]]:
    """Every dataset the benchmark knows, by name, built lazily."""
    from sklearn.datasets import load_diabetes, make_friedman1

    def diabetes(seed: int, noise: bool) -> Dataset:
        X, y = load_diabetes(return_X_y=True)
        name = f"diabetes_s{seed}" if not noise else f"diabetes_noise{NOISE_COLUMNS}"
        return Dataset(name, _with_noise(X, seed) if noise else X, y, seed)

    def friedman(noise: bool) -> Dataset:
        X, y = make_friedman1(n_samples=friedman_rows, n_features=10, noise=1.0, random_state=0)
        name = "friedman1" if not noise else f"friedman1_noise{NOISE_COLUMNS}"
        return Dataset(name, _with_noise(X, 0) if noise else X, y, 42)

    out: dict[str, Callable[[], Dataset]] = {}
    for s in DIABETES_SEEDS:
        out[f"diabetes_s{s}"] = lambda s=s: diabetes(s, False)
    out["friedman1"] = lambda: friedman(False)
    out[f"diabetes_noise{NOISE_COLUMNS}"] = lambda: diabetes(42, True)
    out[f"friedman1_noise{NOISE_COLUMNS}"] = lambda: friedman(True)
    return out


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


def run_baselines(ds: Dataset) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Each baseline's test R² and test-row predictions, fitted on the development rows
    Step 5 uses; the predictions also hold the test rows' targets under ``"y"``."""
    from sklearn.ensemble import HistGradientBoostingRegressor, RandomForestRegressor
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import RidgeCV
    from sklearn.metrics import r2_score
    from sklearn.model_selection import GridSearchCV, KFold
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from step5.data.splits import holdout_split

    dev, test = holdout_split(len(ds.y), TEST_HOLDOUT, ds.split_seed)
    X = ds.X.astype(np.float32).astype(np.float64)  # what the survivors file holds
    models: dict[str, Any] = {
        "RidgeCV": make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13))),
        "HistGB": HistGradientBoostingRegressor(random_state=0),
        "RandomForest": RandomForestRegressor(n_estimators=300, random_state=0, n_jobs=1),
        "MLP grid": GridSearchCV(
            make_pipeline(StandardScaler(), MLPRegressor(max_iter=400, random_state=0, solver="lbfgs")),
            {"mlpregressor__alpha": [0.1, 1.0, 10.0], "mlpregressor__hidden_layer_sizes": [(16,), (64,)]},
            cv=KFold(K_FOLDS, shuffle=True, random_state=0), n_jobs=1,
        ),
    }
    scores: dict[str, float] = {}
    predictions: dict[str, list[float]] = {"y": ds.y[test].tolist()}
    for name, model in models.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # lbfgs at max_iter: a result, not news
            model.fit(X[dev], ds.y[dev])
        pred = model.predict(X[test])
        scores[name] = float(r2_score(ds.y[test], pred))
        predictions[name] = pred.tolist()
    return scores, predictions


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


def _nn_row(outcome: Any, wall_s: float) -> dict[str, Any]:
    metrics = outcome.sidecar.get("training_metrics", {})
    return {
        "status": outcome.status, "test_r2": outcome.test_r2, "cv_r2_mean": metrics.get("cv_r2_mean"),
        "train_r2": metrics.get("train_r2"), "cv_objective": outcome.cv_score, "cv_rescored": outcome.cv_rescored,
        "best_trial": outcome.sidecar.get("optuna", {}).get("best_trial_number"),
        "hyperparameters": outcome.sidecar.get("hyperparameters"), "wall_s": round(wall_s, 1),
        "sidecar_path": str(outcome.sidecar_path) if outcome.sidecar_path else None,
    }


def run_step5(ds: Dataset, survivors: Path, history: Path, out: Path, *, trials: int, compare: bool,
              max_epochs: int) -> dict[str, Any]:
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
        seed=ds.split_seed, cpu_workers=1, log_level="WARNING", nn_max_epochs=max_epochs,
        skip_registry=out / "no_registry.json", diagnostics_dir=out / "diagnostics_outputs",
    )
    res: dict[str, Any] = {}
    if not compare:
        t0 = time.perf_counter()
        outcome = AntiOverfitMetaOptimizer(OptimizerConfig(output_dir=out / "nn", **common)).run()
        res["nn"] = _nn_row(outcome, time.perf_counter() - t0)
        return res

    class KeepNN(AntiOverfitMetaOptimizer):
        """The default optimizer, keeping the neural_net run's outcome for the NN row."""

        def run(self) -> Any:
            t0 = time.perf_counter()
            outcome = super().run()
            if self.config.model_type == "neural_net":
                res["nn"] = _nn_row(outcome, time.perf_counter() - t0)
            return outcome

    t0 = time.perf_counter()
    cfg = OptimizerConfig(output_dir=out / "compare", compare_models=True, **common)
    run_compare(cfg, optimizer_factory=KeepNN)
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
    }
    return res


def _fmt(v: float | None) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"


def report(rows: list[dict[str, Any]]) -> tuple[str, bool]:
    """The markdown table, the targets and the optimism; True when every target is met."""
    head = "| data | Step 5 NN | compare-models (winner) | " + " | ".join(BASELINES) + " | best baseline | NN CV R² | optimism (CV - test) |"
    lines = [head, "|" + "---|" * (len(BASELINES) + 6)]
    met = True
    checks = []
    for r in rows:
        best = max(r["baselines"].values())
        nn = r["nn"]["test_r2"]
        cmp = r.get("compare", {})
        cmp_s = f"{_fmt(cmp.get('test_r2'))} ({cmp.get('winner')})" if cmp else "-"
        opt = None if nn is None or r["nn"]["cv_r2_mean"] is None else r["nn"]["cv_r2_mean"] - nn
        label = _label(r)
        lines.append(
            f"| {label} | {_fmt(nn)} | {cmp_s} | " + " | ".join(_fmt(r["baselines"][b]) for b in BASELINES)
            + f" | {_fmt(best)} | {_fmt(r['nn']['cv_r2_mean'])} | {_fmt(opt)} |"
        )
        ok_nn = _nn_met(r)
        checks.append(f"{label}: NN {_fmt(nn)} >= best baseline {best:.3f} - {NN_TOLERANCE}: "
                      f"{'met' if ok_nn else 'MISSED'}{_gap_text(r, 'nn')}")
        met &= ok_nn
        if cmp:
            ok_c = _compare_met(r)
            checks.append(f"{label}: compare-models {_fmt(cmp.get('test_r2'))} >= best baseline "
                          f"{best:.3f} - {COMPARE_TOLERANCE}: {'met' if ok_c else 'MISSED'}{_gap_text(r, 'compare')}")
            met &= ok_c
    text = "\n".join(lines) + "\n\nTargets:\n" + "\n".join("  " + c for c in checks)
    spread = repeat_summary(rows)
    return text + ("\n\nOver the repeats (same rows, other search seeds):\n" + spread if spread else ""), met


def _label(row: dict[str, Any]) -> str:
    return row["dataset"] if not row.get("repeat") else f"{row['dataset']} r{row['repeat']}"


def _gap_text(row: dict[str, Any], who: str) -> str:
    """`` (gap to RidgeCV +0.027 ± 0.033, ...)``: the best baseline's test R² minus
    ``who``'s, with its paired bootstrap standard error; empty for rows saved without
    test predictions."""
    preds = row.get("test_predictions") or {}
    if who not in preds:
        return ""
    best = max(row["baselines"], key=row["baselines"].get)
    gap, se = paired_gap(preds["y"], preds[best], preds[who])
    return f" (gap to {best} {gap:+.3f} ± {se:.3f}, paired bootstrap SE over {len(preds['y'])} test rows)"


def _nn_met(row: dict[str, Any]) -> bool:
    nn = row["nn"]["test_r2"]
    return nn is not None and nn >= max(row["baselines"].values()) - NN_TOLERANCE


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
            ("NN", [r["nn"]["test_r2"] for r in group], [_nn_met(r) for r in group]),
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
    ax.legend(fontsize=8, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Step 5 vs scikit-learn baselines, same dev rows, same test rows")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=30, help="Optuna trials per Step 5 run [30]")
    parser.add_argument("--datasets", default=None,
                        help="comma-separated names (default: all): " + ", ".join(datasets(2000)))
    parser.add_argument("--compare", action="store_true", help="also run --compare-models on each dataset")
    parser.add_argument("--friedman-rows", type=int, default=2000, help="rows of make_friedman1 [2000]")
    parser.add_argument("--nn-max-epochs", type=int, default=200, help="Step 5's NN epoch cap [200]")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Step 5 runs per dataset, each with other search seeds on the same rows [1]")
    parser.add_argument("--out", type=Path, default=Path("bench/results/quality"))
    parser.add_argument("--report-from", type=Path, nargs="+", default=None, metavar="DIR",
                        help="train nothing: join the quality.json of these --out folders (runs of the same "
                             "code split by dataset) and print the table, the targets and the picture into --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    if args.report_from:
        return _report_from(args.report_from, args.out)
    known = datasets(args.friedman_rows)
    names = args.datasets.split(",") if args.datasets else list(known)
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
        baselines, baseline_predictions = run_baselines(ds)
        baselines_wall_s = round(time.perf_counter() - t0, 1)
        for repeat in range(args.repeats):
            run_ds = ds if repeat == 0 else reordered_for_seed(ds, repeat_seed(ds.split_seed, repeat))
            folder = args.out / run_folder_name(name, repeat)
            survivors, history = write_survivors(run_ds, folder / "data")
            row: dict[str, Any] = {"dataset": name, "repeat": repeat, "rows": int(ds.X.shape[0]),
                                   "features": int(ds.X.shape[1]), "split_seed": ds.split_seed,
                                   "step5_seed": run_ds.split_seed, "baselines": baselines,
                                   "baselines_wall_s": baselines_wall_s}
            logger.info("%s: baselines %s; Step 5 (%d trials, seed %d)", _label(row), baselines, args.trials,
                        run_ds.split_seed)
            row.update(run_step5(run_ds, survivors, history, folder, trials=args.trials, compare=args.compare,
                                 max_epochs=args.nn_max_epochs))
            # The same test rows in the same order for every repeat (reordered_for_seed).
            row["test_predictions"] = {**baseline_predictions, **step5_test_predictions(run_ds, row)}
            logger.info("%s: NN %s", _label(row), row["nn"])
            rows.append(row)
            (args.out / "quality.json").write_text(json.dumps(
                {"settings": {**vars(args), "out": str(args.out)}, "rows": rows}, indent=1, default=str))
    _print_report(rows, args.trials, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
