"""Repeated CV (``--cv-repeats``): every trial scored on N K-fold partitions of the dev rows.

The net's runs go through a fake fold runner (so the requests a worker would get are seen);
the tree runs and the linear booster's final model train for real, in-process.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from step5.data.splits import dev_rows, kfold_splits
from step5.errors import StudyMismatchError, UsageError
from step5.optimizer import AntiOverfitMetaOptimizer
from step5.optimizer.backends import CVData, TreeBackend, partition_seed
from step5.optimizer.config import cv_repeats, validate_config
from step5.optimizer.objective import anti_overfit_score
from step5.testing.fake_runner import install_fake_runner


@pytest.fixture
def config_defaults():
    """This module tests the default itself: the model type and the rows decide."""
    return {"cv_repeats": None}


@pytest.fixture
def fake_runner(monkeypatch):
    return install_fake_runner(monkeypatch)


def _cv(n: int = 60, k: int = 3, extra: int = 3, search_repeats: int = 1, seed: int = 0) -> CVData:
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n + 10, 4)).astype(np.float32)
    y = X[:, 0] * 2.0 - X[:, 1] + 0.3 * rng.standard_normal(n + 10)
    return CVData(
        X_dev=X[:n], y_dev=y[:n], X_test=X[n:], y_test=y[n:], folds=kfold_splits(n, k, seed + 1),
        final_fit_idx=np.arange(n - n // k), final_es_idx=np.arange(n - n // k, n), feature_names=list("abcd"),
        fresh_partitions=[kfold_splits(n, k, partition_seed(seed, p)) for p in range(1, extra + 1)],
        search_repeats=search_repeats,
    )


def test_the_search_takes_the_first_partitions_and_the_rescore_the_rest():
    cv = _cv(k=3, extra=3, search_repeats=2)
    assert list(cv.search_partitions) == [0, 1] and list(cv.rescore_partitions) == [2, 3]
    folds = cv.search_folds()
    assert [(p, idx) for p, idx, _tr, _va in folds] == [(0, 0), (0, 1), (0, 2), (1, 3), (1, 4), (1, 5)]
    for p in (0, 1):  # each search partition's validation parts cover the dev rows once
        val = np.concatenate([va for q, _idx, _tr, va in folds if q == p])
        assert sorted(val) == list(range(60))
    # one repeat: the search is partition 0 alone and every fresh partition is the rescore's
    plain = _cv(search_repeats=1)
    assert list(plain.search_partitions) == [0] and list(plain.rescore_partitions) == [1, 2, 3]
    with pytest.raises(ValueError, match="5 search partitions, but only 4 exist"):
        _cv(extra=3, search_repeats=5)


@pytest.mark.parametrize("model_type, n_dev, repeats", [
    ("neural_net", 100, 1),  # the net: one partition, whatever the rows
    ("xgboost", 353, 3), ("lightgbm", 480, 3), ("catboost", 600, 2), ("xgboost", 1000, 1),
    ("xgboost", 1600, 1), ("lightgbm", 20, 3),
])
def test_default_repeats_follow_the_model_type_and_the_dev_rows(make_config, model_type, n_dev, repeats):
    assert cv_repeats(make_config(model_type=model_type), n_dev) == repeats


def test_the_flag_overrides_the_default_and_must_be_positive(make_config):
    assert cv_repeats(make_config(model_type="xgboost", cv_repeats=1), 353) == 1
    assert cv_repeats(make_config(cv_repeats=4), 5000) == 4
    assert dev_rows(442, 0.2) == 353 and dev_rows(2000, 0.2) == 1600
    with pytest.raises(UsageError, match="--cv-repeats must be >= 1, got 0"):
        validate_config(make_config(cv_repeats=0))


def test_nn_trials_train_every_fold_of_every_search_partition(fake_runner, make_config, study_of):
    made, options = fake_runner
    options["seed_in_metrics"] = True  # other seeds, other scores: the repeats are not copies
    cfg = make_config(cv_repeats=2, rescore_partitions=1)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    assert outcome.status == "SUCCESS"
    (runner,) = made
    study = study_of(cfg, outcome)
    best = study.best_trial
    search = [r for r in runner.requests if r.fold_idx < 6]
    rescore = [r for r in runner.requests if r.fold_idx >= 6]
    ((final, _merged, _score),) = runner.merges

    # 3 trials x 2 partitions x 3 folds, on six fold files; a seed per (trial, fold)
    assert len(search) == 3 * 6 and len({r.data_path for r in search}) == 6
    assert len({r.seed for r in search}) == 18
    for t in study.trials:
        folds = t.user_attrs["folds"]
        assert [f["fold_idx"] for f in folds] == list(range(6))
        assert t.value == pytest.approx(anti_overfit_score([f["r2"] for f in folds], [f["train_r2"] for f in folds]))

    # Both search partitions split the same dev rows, differently
    def val_rows(requests):
        return [frozenset(tuple(row) for row in runner.arrays[r.data_path]["X_val"]) for r in requests]

    mine = sorted((r for r in search if r.trial_number == best.number), key=lambda r: r.fold_idx)
    first, second = val_rows(mine[:3]), val_rows(mine[3:])
    assert frozenset().union(*first) == frozenset().union(*second) and set(first) != set(second)

    # The rescore is a partition the search never used; the final net merges partition 0's folds
    assert [r.fold_idx for r in rescore] == [6, 7, 8] and {r.trial_number for r in rescore} == {best.number}
    assert not {r.data_path for r in rescore} & {r.data_path for r in search}
    assert [str(p) for p in final] == [r.save_model_path for r in mine[:3]]
    assert not any(r.save_model_path for r in mine[3:])  # the repeat's folds save no model

    metrics = outcome.sidecar["training_metrics"]
    assert metrics["cv_repeats"] == 2 and metrics["k_folds"] == 3
    assert metrics["cv_r2_mean"] == pytest.approx(np.mean([f["r2"] for f in best.user_attrs["folds"]]))
    assert study.user_attrs["step5_setup"]["cv_repeats"] == 2


def test_one_repeat_keeps_the_setup_and_study_of_runs_before_repeated_cv(fake_runner, make_config, study_of):
    cfg = make_config(trials=1)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    assert "cv_repeats" not in study_of(cfg, outcome).user_attrs["step5_setup"]
    assert outcome.sidecar["training_metrics"]["cv_repeats"] == 1
    # The same run with the flag spelled out is the same study: it resumes.
    again = AntiOverfitMetaOptimizer(dataclasses.replace(cfg, cv_repeats=1)).run()
    assert again.sidecar["optuna"]["study_name"] == outcome.sidecar["optuna"]["study_name"]
    assert again.sidecar["optuna"]["resumed"] is True and again.sidecar["optuna"]["trials_run"] == 2


def test_a_named_study_refuses_a_run_with_other_repeats(fake_runner, make_config):
    named = make_config(trials=1, study_name="mine")
    AntiOverfitMetaOptimizer(named).run()
    with pytest.raises(StudyMismatchError, match="cv_repeats"):
        AntiOverfitMetaOptimizer(dataclasses.replace(named, cv_repeats=2)).run()


@pytest.mark.parametrize("test_holdout, repeats", [(0.2, 3), (0.01, 2)])
def test_tree_runs_repeat_the_cv_by_default_on_small_tables(make_config, study_of, test_holdout, repeats):
    """The sample's 600 rows: 480 dev rows give 3 partitions, 594 give 2 (1000 validation rows)."""
    cfg = make_config(model_type="lightgbm", trials=2, k_folds=3, test_holdout=test_holdout)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    assert outcome.status == "SUCCESS"
    for t in study_of(cfg, outcome).trials:
        folds = t.user_attrs["folds"]
        assert [f["fold_idx"] for f in folds] == list(range(3 * repeats))
        assert len({f["r2"] for f in folds}) == len(folds)  # other rows, other scores
        assert t.value == pytest.approx(anti_overfit_score([f["r2"] for f in folds], [f["train_r2"] for f in folds]))
    assert outcome.sidecar["training_metrics"]["cv_repeats"] == repeats


def test_the_linear_boosters_final_reports_the_mean_over_every_search_fold(tmp_path):
    """It fits every dev row, so its val scores are its trial's CV means: over all the
    search's partitions, the same numbers the trial was scored by."""
    pytest.importorskip("xgboost")
    cv = _cv(search_repeats=2)
    backend = TreeBackend("xgboost", cv, seed=3, gpus=[])
    params = {"booster": "gblinear", "n_estimators": 200, "lambda": 0.01, "alpha": 1e-4}
    (folds,) = backend.run_trials([(0, params)])
    assert [f["fold_idx"] for f in folds] == list(range(6))
    final = backend.train_final(0, params, tmp_path / "best_model.json")
    assert final["r2"] == pytest.approx(np.mean([f["r2"] for f in folds]))
    assert final["val_mse"] == pytest.approx(np.mean([f["val_mse"] for f in folds]))
    assert final["n_fit"] == 60 and (tmp_path / "best_model.json").exists()


def test_the_rescore_partitions_do_not_depend_on_the_repeats(fake_runner, make_config):
    """compare-models compares the types' rescored objectives: on the same folds, whatever
    number of search partitions each type ran with."""
    made, _ = fake_runner
    for name, repeats in (("one", 1), ("two", 2)):
        AntiOverfitMetaOptimizer(make_config(name, trials=1, cv_repeats=repeats, rescore_partitions=1)).run()

    def rescore_val_rows(runner, first_idx):
        rescore = [r for r in runner.requests if r.fold_idx >= first_idx]
        return [frozenset(tuple(row) for row in runner.arrays[r.data_path]["X_val"]) for r in rescore]

    one, two = rescore_val_rows(made[0], 3), rescore_val_rows(made[1], 6)
    assert len(one) == 3 and one == two
