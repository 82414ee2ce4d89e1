"""The anti-overfit objective, fold seeds, fresh partitions and the NN search space."""
from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from step5.data.splits import kfold_splits
from step5.optimizer.backends import CVData, fold_seed, partition_seed
from step5.optimizer.objective import OVERFIT_PENALTY, anti_overfit_score, summarize_folds
from step5.optimizer.search_space import INPUT_DROPOUT_RATES, first_nn_trials, suggest_nn_params


def test_score_rewards_val_r2_and_charges_half_the_gap():
    assert anti_overfit_score([0.5, 0.5], [0.5, 0.5]) == pytest.approx(0.5)
    assert anti_overfit_score([0.4, 0.6], [0.9, 0.9]) == pytest.approx(0.5 - OVERFIT_PENALTY * 0.4)
    # Same validation R²: the one that fits train less suspiciously wins.
    assert anti_overfit_score([0.5], [0.6]) > anti_overfit_score([0.5], [0.95])
    # Fitting train worse than validation is not rewarded (the gap is clipped at 0).
    assert anti_overfit_score([0.5], [0.3]) == pytest.approx(0.5)
    assert math.isnan(anti_overfit_score([0.5, float("nan")], [0.5, 0.5]))
    with pytest.raises(ValueError):
        anti_overfit_score([0.5], [0.5, 0.5])


def test_summarize_folds_means_and_missing_keys():
    folds = [{"r2": 0.4, "train_r2": 0.6, "val_mse": 2.0, "train_mse": 1.0, "duration": 0.1, "junk": 1},
             {"r2": 0.6, "train_r2": 0.8, "val_mse": 4.0, "train_mse": 3.0, "duration": 0.2}]
    s = summarize_folds(folds)
    assert s.val_r2_mean == pytest.approx(0.5) and s.train_r2_mean == pytest.approx(0.7)
    assert s.val_mse_mean == pytest.approx(3.0) and s.value == pytest.approx(0.5 - OVERFIT_PENALTY * 0.2)
    assert "junk" not in s.folds[0]
    from step5.errors import Step5Error

    with pytest.raises(Step5Error, match="lacks"):
        summarize_folds([{"r2": 0.1}])


def test_fold_seeds_are_deterministic_distinct_and_in_protocol_range():
    seeds = {fold_seed(42, t, f) for t in range(20) for f in range(5)}
    assert len(seeds) == 100
    assert all(0 <= s < 2**63 for s in seeds)
    assert fold_seed(42, 3, 1) == fold_seed(42, 3, 1) != fold_seed(43, 3, 1)


def test_fresh_partitions_have_their_own_shuffles_and_fold_indices():
    folds = kfold_splits(30, 3, 1)
    fresh = [kfold_splits(30, 3, partition_seed(0, p)) for p in (1, 2)]
    cv = CVData(X_dev=np.zeros((30, 2), np.float32), y_dev=np.zeros(30), X_test=np.zeros((5, 2), np.float32),
                y_test=np.zeros(5), folds=folds, final_fit_idx=np.arange(24), final_es_idx=np.arange(24, 30),
                feature_names=["a", "b"], fresh_partitions=fresh)
    assert cv.partition(0) is folds and cv.partition(2) is fresh[1]
    with pytest.raises(ValueError, match="partition 3 does not exist"):
        cv.partition(3)
    # fold f of partition p is fold_idx p*K + f: the search's folds keep 0..K-1
    assert [cv.fold_idx(p, f) for p in range(3) for f in range(3)] == list(range(9))
    # a stream per (seed, partition), never a search's KFold seed (seed + 1) of a nearby run
    seeds = {partition_seed(s, p, search_repeat=r) for s in range(20) for p in range(1, 6) for r in (False, True)}
    assert len(seeds) == 200 and not seeds & set(range(1, 22))
    assert partition_seed(7, 1) == partition_seed(7, 1)


@pytest.mark.parametrize("fixed_dropout", [None, 0.2])
def test_the_first_trials_are_points_of_the_search_space(fixed_dropout):
    """Enqueued, each is asked exactly as given: every name is one the space asks, with a
    value inside its range, and nothing the space asks is left to the sampler."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    firsts = first_nn_trials(fixed_dropout=fixed_dropout)
    for params in firsts:
        study.enqueue_trial(params)
    depths = []
    for params in firsts:
        trial = study.ask()
        nn = suggest_nn_params(trial, max_epochs=50, fixed_dropout=fixed_dropout)
        assert trial.params == params
        depths.append(len(nn.hidden_layers))
        study.tell(trial, 0.0)
    assert depths == [0, 2]  # a linear model and a two-layer net


def test_search_space_gives_valid_params_and_fixed_dropout_is_not_searched():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    gate_seen = set()
    for _ in range(10):
        trial = study.ask()
        params = suggest_nn_params(trial, max_epochs=17, fixed_dropout=0.2)
        assert params.epochs == 17 and params.dropout == 0.2
        assert "dropout" not in trial.params
        gate_seen.add(trial.params["input_dropout_on"])  # searched regardless of --dropout
        if trial.params["input_dropout_on"]:
            assert params.input_dropout == trial.params["input_dropout_rate"]
            assert params.input_dropout in INPUT_DROPOUT_RATES
        else:
            assert params.input_dropout == 0.0 and "input_dropout_rate" not in trial.params
        assert 1e-4 <= params.input_sparsity <= 0.1 and "input_sparsity" in trial.params
        assert len(params.hidden_layers) == trial.params["n_layers"] <= 3
        study.tell(trial, 0.0)
    assert gate_seen == {False, True}  # both sides of the input-dropout gate were drawn
    depths = set()
    for _ in range(20):
        trial = study.ask()
        params = suggest_nn_params(trial, max_epochs=5)
        depths.add(len(params.hidden_layers))
        if params.hidden_layers:
            assert 0.0 <= params.dropout <= 0.5 and "dropout" in trial.params
        else:  # a linear model: no widths, and no hidden unit for dropout to act on
            assert params.dropout == 0.0 and "dropout" not in trial.params and "width_l0" not in trial.params
        study.tell(trial, 0.0)
    assert depths == {0, 1, 2, 3}
