"""bench.cv_partitions: the linear model's objective per penalty and partition, on Step 5's rows."""
from __future__ import annotations

import numpy as np
import pytest

from bench.cv_partitions import LAMBDAS, fit_linear, format_table, main, split_table


def test_the_linear_model_is_xgboosts_gblinear_of_the_same_rows():
    pytest.importorskip("xgboost")
    from step5.models.trees import train_fold

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4)).astype(np.float32)
    y = X[:, 0] * 3.0 - X[:, 2] + rng.normal(size=120)
    params = {"booster": "gblinear", "n_estimators": 1000, "lambda": 0.1, "alpha": 1e-5}
    _metrics, model = train_fold("xgboost", params, X, y, X, y, seed=0, device="cpu")
    ours = model.predict(X)
    assert np.allclose(fit_linear(X.astype(np.float64), y, 0.1)(X.astype(np.float64)), ours, atol=1e-3)


def test_on_diabetes_s7_one_partition_picks_least_squares_and_three_pick_more_penalty():
    """The measurement docs/optimizer.md quotes for --cv-repeats' default of 3."""
    table = split_table(7, partitions=3, k_folds=5)
    assert [r["lambda"] for r in table["rows"]] == list(LAMBDAS)
    assert table["choice_one_partition"] == LAMBDAS[0]
    assert table["choice_mean"] == pytest.approx(0.1)
    text = format_table(table, 3)
    assert "<- partition 0" in text and "<- mean" in text


def test_cli_prints_a_table_per_split(capsys):
    assert main(["--splits", "42", "--partitions", "2", "--k-folds", "3"]) == 0
    out = capsys.readouterr().out
    assert "diabetes split seed 42" in out and out.count("\n") == 2 + len(LAMBDAS)
