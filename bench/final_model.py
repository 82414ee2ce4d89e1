"""Which final NN to ship: the refit on every development row, or the best trial's K fold models averaged.

Issue 14, item 2 asks for "a refit on all [development rows] for the epoch count the CV
folds found, or the ensemble of the best trial's K fold models (already trained), chosen
by measurement". This script measured both, and Step 5 now ships the ensemble (merged
into one network, step5.nn.ensemble). It measures both from the same
hyperparameters, on the same rows, through the same training core (``step5.nn.job``,
in this process):

* **folds**: the best trial's K CV fold models, with the seeds the search gave them
  (``fold_seed(seed, trial, fold)``), each early-stopping on a slice of its training rows;
* **ensemble**: the mean of the K fold models' predictions on the test rows -- Step 5's
  final model, so its test R² should equal the one the Step 5 run reported (printed
  side by side as a check);
* **refit**: every development row for :func:`refit_epochs` of the folds' best epochs,
  patience 0, with the seed ``fold_seed(seed, trial, FINAL_FOLD_IDX)``.

The hyperparameters and trial number are the best complete trial of the neural-net study
in a ``bench.quality`` output folder (``<from>/<dataset>/{compare,nn}/optuna_step5.db``;
the data from ``<from>/<dataset>/data``), so this is cheap: K + 1 trainings per dataset,
no search, and it works on a run still in progress (its best trial so far). When the run
has finished, its reported test R² is shown next to the reproduced ensemble as a check.

Usage::

    python -m bench.final_model --from /tmp/quality_full [--datasets diabetes_s42,...] [--refit-seeds 1]

``--refit-seeds N`` (> 1) also refits with N - 1 further seeds, to show how much of a
difference is the refit's own seed.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

logger = logging.getLogger("bench.final_model")


@dataclasses.dataclass(frozen=True)
class FinalModels:
    """Test R² of each candidate final model, and what produced them."""

    refit_test_r2: float
    ensemble_test_r2: float
    fold_test_r2: list[float]  # each fold model alone
    fold_val_r2: list[float]  # each fold model on its own validation rows (the trial's CV)
    refit_epochs: int
    fold_best_epochs: list[int]
    extra_refit_test_r2: list[float]  # refits with other seeds (--refit-seeds)


def compare_final_models(
    X_dev: np.ndarray, y_dev: np.ndarray, X_test: np.ndarray, y_test: np.ndarray, params: dict[str, Any], *,
    seed: int, trial_number: int, k_folds: int, workdir: Path, refit_seeds: int = 1,
) -> FinalModels:
    """Train the K fold models and the refit from ``params`` exactly as a Step 5 run does,
    and score every candidate on ``(X_test, y_test)``."""
    import torch
    from sklearn.metrics import r2_score

    from step5.data.splits import kfold_splits, write_fold_npz
    from step5.nn.checkpoint import load_checkpoint
    from step5.nn.job import run_train_job
    from step5.optimizer.backends import FINAL_FOLD_IDX, fold_seed
    from step5.protocol import NNParams, TrainRequest

    cpu = torch.device("cpu")
    nn_params = NNParams.from_dict(params)

    def train(path: Path, p: NNParams, fold_idx: int, train_seed: int) -> tuple[dict[str, Any], np.ndarray]:
        ckpt = workdir / f"model_{fold_idx}_{train_seed}.pth"
        request = TrainRequest(data_path=str(path), params=p, trial_number=trial_number, fold_idx=fold_idx,
                               seed=train_seed, save_model_path=str(ckpt))
        result = run_train_job(request, device=cpu)
        if result.get("status") != "complete":
            raise RuntimeError(f"training fold {fold_idx} failed: {result}")
        return result, load_checkpoint(ckpt).predict(X_test)

    folds = kfold_splits(len(y_dev), k_folds, seed + 1)  # the optimizer's own split of the dev rows
    fold_results, fold_preds = [], []
    for f, (tr, va) in enumerate(folds):
        path = write_fold_npz(workdir / f"fold_{f}.npz", X_dev[tr], y_dev[tr], X_dev[va], y_dev[va])
        res, pred = train(path, nn_params, f, fold_seed(seed, trial_number, f))
        fold_results.append(res)
        fold_preds.append(pred)
    epochs = refit_epochs(fold_results, cap=nn_params.epochs)
    refit_params = NNParams.from_dict({**params, "epochs": epochs, "early_stopping_patience": 0})
    final_path = write_fold_npz(workdir / "final.npz", X_dev, y_dev, X_test, y_test)
    refits = [train(final_path, refit_params, FINAL_FOLD_IDX, fold_seed(seed, trial_number, FINAL_FOLD_IDX) + i)[1]
              for i in range(max(1, refit_seeds))]
    r2 = [float(r2_score(y_test, p)) for p in refits]
    return FinalModels(
        refit_test_r2=r2[0], ensemble_test_r2=float(r2_score(y_test, np.mean(fold_preds, axis=0))),
        fold_test_r2=[float(r2_score(y_test, p)) for p in fold_preds], fold_val_r2=[r["r2"] for r in fold_results],
        refit_epochs=epochs, fold_best_epochs=[int(r["best_epoch"]) for r in fold_results],
        extra_refit_test_r2=r2[1:],
    )


def refit_epochs(cv_folds: Sequence[dict[str, Any]], *, cap: int) -> int:
    """Epochs for the refit on all dev rows: the median of the folds' early-stopped best
    epochs (each fold stopped on rows carved from its own training rows), at least 1 and
    at most ``cap``; ``cap`` when no fold recorded one."""
    best = [int(f["best_epoch"]) for f in cv_folds if isinstance(f.get("best_epoch"), int) and f["best_epoch"] > 0]
    if not best:
        logger.warning("the best trial recorded no fold best_epoch; the refit trains the full %d epochs", cap)
        return cap
    return max(1, min(cap, int(round(float(np.median(best))))))


def best_nn_trial(run_dir: Path) -> tuple[int, dict[str, Any], int]:
    """The neural-net study's best complete trial so far in one dataset's ``bench.quality``
    folder (its compare or its lone NN run): (trial number, params, complete trials)."""
    import optuna

    from step5.optimizer.study import DEFAULT_DB_NAME

    for sub in ("compare", "nn"):
        db = run_dir / sub / DEFAULT_DB_NAME
        if not db.is_file():
            continue
        storage = optuna.storages.RDBStorage(f"sqlite:///{db.resolve()}")
        try:
            for summary in optuna.get_all_study_summaries(storage):
                if summary.study_name.startswith("step5_neural_net"):
                    study = optuna.load_study(study_name=summary.study_name, storage=storage)
                    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
                    if done:
                        best = study.best_trial
                        return best.number, dict(best.user_attrs["params"]), len(done)
        finally:
            storage.engine.dispose()  # its connections closed, not left to the garbage collector
    raise FileNotFoundError(f"no neural-net study with a complete trial under {run_dir}")


def measure_dataset(folder: Path, name: str, *, test_holdout: float, k_folds: int, refit_seeds: int) -> dict[str, Any]:
    """One run of a ``bench.quality`` output folder (``name``: a dataset, or ``<dataset>_r<N>``
    for repeat N): both candidates from its NN study's best trial, on that run's own rows."""
    from bench.quality import datasets, parse_run_folder_name, repeat_seed
    from step5.data.splits import holdout_split
    from step5.data.survivors import load_survivors

    dataset, repeat = parse_run_folder_name(name)
    trial, params, n_done = best_nn_trial(folder / name)
    # The run's survivors file was reordered for this seed (bench.quality.reordered_for_seed),
    # so it holds out the dataset's test rows, and its folds and training seeds come from it.
    seed = repeat_seed(datasets(2000)[dataset]().split_seed, repeat)
    table = load_survivors(folder / name / "data" / "survivors_with_scores.json")
    dev, test = holdout_split(table.n_records, test_holdout, seed)
    with tempfile.TemporaryDirectory(prefix="final_model_") as tmp:
        got = compare_final_models(table.X[dev], table.y[dev], table.X[test], table.y[test], params, seed=seed,
                                   trial_number=trial, k_folds=k_folds, workdir=Path(tmp), refit_seeds=refit_seeds)
    finished = folder / "quality.json"
    rows = json.loads(finished.read_text())["rows"] if finished.is_file() else []
    reported = [r["nn"]["test_r2"] for r in rows
                if (r["dataset"], r.get("repeat", 0)) == (dataset, repeat) and r["nn"].get("best_trial") == trial]
    return {"dataset": name, "best_trial": trial, "trials_complete": n_done, "params": params,
            "step5_test_r2": reported[0] if reported else None, **dataclasses.asdict(got)}


def report(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: each candidate's test R² per dataset."""
    lines = ["| data | refit | refit, mean over seeds (n) | ensemble of the K fold models (Step 5's final model) "
             "| fold models alone (mean) | refit epochs (fold best epochs) | Step 5 run's reported test R² "
             "| best trial (of complete) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        refits = [r["refit_test_r2"], *r["extra_refit_test_r2"]]
        lines.append(
            f"| {r['dataset']} | {r['refit_test_r2']:.3f} | {np.mean(refits):.3f} ({len(refits)}) "
            f"| {r['ensemble_test_r2']:.3f} | {np.mean(r['fold_test_r2']):.3f} "
            f"| {r['refit_epochs']} ({', '.join(map(str, r['fold_best_epochs']))}) "
            f"| {'-' if r['step5_test_r2'] is None else format(r['step5_test_r2'], '.3f')} "
            f"| {r['best_trial']} ({r['trials_complete']}) |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from bench.quality import K_FOLDS, TEST_HOLDOUT

    parser = argparse.ArgumentParser(prog="python -m bench.final_model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="source", type=Path, required=True, help="a bench.quality --out folder")
    parser.add_argument("--datasets", default=None,
                        help="comma-separated run folders: a dataset, or <dataset>_r<N> for repeat N "
                             "(default: every one with a study)")
    parser.add_argument("--refit-seeds", type=int, default=1, help="refits per dataset, each with its own seed [1]")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    import torch

    torch.set_num_threads(1)  # small nets; and a shared machine
    names = args.datasets.split(",") if args.datasets else sorted(
        p.parent.parent.name for p in args.source.glob("*/*/optuna_step5.db"))
    if not names:
        parser.error(f"no dataset with a study under {args.source}")
    rows = []
    for name in names:
        logger.info("%s: K fold models and the refit", name)
        rows.append(measure_dataset(args.source, name, test_holdout=TEST_HOLDOUT, k_folds=K_FOLDS,
                                    refit_seeds=args.refit_seeds))
    print(report(rows))
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
