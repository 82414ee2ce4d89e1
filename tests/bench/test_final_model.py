"""bench.final_model: the refit and the fold ensemble from the same params, on the same test rows."""
from __future__ import annotations

import numpy as np

from bench.final_model import compare_final_models, refit_epochs, report

PARAMS = {"hidden_layers": [8], "epochs": 40, "learning_rate": 2e-2, "early_stopping_patience": 3,
          "dropout": 0.1, "input_dropout": 0.1, "weight_decay": 1e-3}


def _data(seed: int = 0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(150, 4)).astype(np.float32)
    y = X[:, 0] - 0.5 * X[:, 1] + 0.3 * rng.normal(size=150)
    return X[:120], y[:120], X[120:], y[120:]


def test_both_candidates_are_trained_and_scored_on_the_same_test_rows(tmp_path):
    kwargs = dict(seed=3, trial_number=2, k_folds=3, refit_seeds=2)
    (tmp_path / "a").mkdir()
    got = compare_final_models(*_data(), PARAMS, workdir=tmp_path / "a", **kwargs)
    assert len(got.fold_test_r2) == len(got.fold_val_r2) == len(got.fold_best_epochs) == 3
    assert got.refit_epochs == refit_epochs([{"best_epoch": e} for e in got.fold_best_epochs], cap=40)
    assert len(got.extra_refit_test_r2) == 1
    # Averaging predictions cannot raise the squared error above the models' mean (convexity).
    assert got.ensemble_test_r2 >= np.mean(got.fold_test_r2) - 1e-12
    assert got.refit_test_r2 > 0.5  # a real model of a planted linear signal
    (tmp_path / "b").mkdir()
    again = compare_final_models(*_data(), PARAMS, workdir=tmp_path / "b", **kwargs)
    assert again == got  # the seeds the search gave, so the same numbers
    text = report([{"dataset": "d", "step5_test_r2": None, "best_trial": 2, "trials_complete": 30, **got.__dict__}])
    assert text.splitlines()[2].startswith(f"| d | {got.refit_test_r2:.3f} |")


def test_refit_epochs_is_the_median_fold_best_epoch_within_the_cap():
    folds = [{"best_epoch": e} for e in (12, 30, 18, 7, 25)]
    assert refit_epochs(folds, cap=200) == 18
    assert refit_epochs(folds, cap=10) == 10
    assert refit_epochs([{"best_epoch": 0}, {"r2": 0.3}], cap=50) == 50  # nothing recorded: the cap
    assert refit_epochs([], cap=50) == 50
