"""The anti-overfit objective, fold seeds, fresh partitions and the NN search space."""
from __future__ import annotations

import math

import numpy as np
import optuna
import pytest

from step5.data.splits import kfold_splits
from step5.optimizer.backends import CVData, fold_seed, partition_seed
from step5.optimizer.objective import OVERFIT_PENALTY, anti_overfit_score, summarize_folds
from step5.optimizer.search_space import (
    INPUT_DROPOUT_RATES,
    LINEAR_SPARSITY_RANGE,
    NET_SPARSITY_RANGE,
    DataShape,
    first_nn_trials,
    suggest_nn_params,
)

SMALL = DataShape.of_development(353, 90, 5)  # diabetes with 80 noise columns: 226 rows fit per fold


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
    assert s["val_r2_mean"] == pytest.approx(0.5) and s["train_r2_mean"] == pytest.approx(0.7)
    assert s["val_mse_mean"] == pytest.approx(3.0) and s["value"] == pytest.approx(0.5 - OVERFIT_PENALTY * 0.2)
    assert "junk" not in s["folds"][0]
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
    for data in (SMALL, DataShape.of_development(10_000, 16, 5), DataShape.of_development(160_000, 90, 5)):
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        firsts = first_nn_trials(data, fixed_dropout=fixed_dropout)
        for params in firsts:
            study.enqueue_trial(params)
        depths = []
        for params in firsts:
            trial = study.ask()
            nn = suggest_nn_params(trial, max_epochs=50, data=data, fixed_dropout=fixed_dropout)
            assert trial.params == params
            assert nn.batch_size in data.batch_sizes()
            depths.append(len(nn.hidden_layers))
            study.tell(trial, 0.0)
        assert depths == [1, 2, 0]  # a plain one-layer MLP, a sparse two-layer net, a lasso


def test_search_space_gives_valid_params_and_fixed_dropout_is_not_searched():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    gate_seen = set()
    for _ in range(10):
        trial = study.ask()
        params = suggest_nn_params(trial, max_epochs=17, data=SMALL, fixed_dropout=0.2)
        assert params.epochs == 17 and params.dropout == 0.2
        assert "dropout" not in trial.params
        gate_seen.add(trial.params["input_dropout_on"])  # searched regardless of --dropout
        if trial.params["input_dropout_on"]:
            assert params.input_dropout == trial.params["input_dropout_rate"]
            assert params.input_dropout in INPUT_DROPOUT_RATES
        else:
            assert params.input_dropout == 0.0 and "input_dropout_rate" not in trial.params
        rel = trial.params["input_sparsity_rel" if params.hidden_layers else "linear_sparsity_rel"]
        assert params.input_sparsity == pytest.approx(rel * SMALL.lasso_scale)
        assert (NET_SPARSITY_RANGE if params.hidden_layers else LINEAR_SPARSITY_RANGE)[0] <= rel
        assert len(params.hidden_layers) == trial.params["n_layers"] <= 3
        study.tell(trial, 0.0)
    assert gate_seen == {False, True}  # both sides of the input-dropout gate were drawn
    depths = set()
    for _ in range(20):
        trial = study.ask()
        params = suggest_nn_params(trial, max_epochs=5, data=SMALL)
        depths.add(len(params.hidden_layers))
        if params.hidden_layers:
            assert 0.0 <= params.dropout <= 0.5 and "dropout" in trial.params
        else:  # a linear model: no widths, and no hidden unit for dropout to act on
            assert params.dropout == 0.0 and "dropout" not in trial.params and "width_l0" not in trial.params
        study.tell(trial, 0.0)
    assert depths == {0, 1, 2, 3}


def test_the_priors_follow_the_datas_size_and_width():
    """Input sparsity is searched in units of the lasso's noise threshold sqrt(2 ln D / n),
    and the batch sizes offered give a fold a few to 64 steps per epoch, one of them the
    whole fold when it is small."""
    small, large = SMALL, DataShape.of_development(10_000, 16, 5)
    assert small.fit_rows == 226 and large.fit_rows == 6400  # (K-1)/K of dev, less a fifth to early-stop
    assert small.lasso_scale == pytest.approx(math.sqrt(2 * math.log(90) / 226))
    assert large.lasso_scale < small.lasso_scale / 5  # more rows and fewer columns: a smaller threshold
    assert small.batch_sizes() == (32, 64, 256)  # 256 spans the 226 rows: full batch
    assert large.batch_sizes() == (128, 256, 512, 1024, 2048)
    for data in (small, large, DataShape(100_000, 90)):
        assert all(data.fit_rows / 64 <= b or b == max(data.batch_sizes()) for b in data.batch_sizes())
    assert DataShape(10_000_000, 90).batch_sizes() == (4096,)  # past every choice: the largest
    with pytest.raises(ValueError, match="need >= 2 rows"):
        DataShape.of_development(1, 5, 5)
