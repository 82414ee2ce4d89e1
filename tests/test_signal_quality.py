"""Signal quality: which targets are healthy, weak or degenerate, and why."""
from __future__ import annotations

import math

import numpy as np
import orjson
import pytest

from step5.signal_quality import assess_signal

KEYS = {
    "signal_status",
    "prediction_allowed",
    "target_mean",
    "target_std",
    "target_variance",
    "unique_target_values",
    "sample_size",
    "reason",
}


def test_healthy_continuous_target():
    y = np.random.default_rng(0).normal(0.3, 0.1, 500)
    out = assess_signal(y)
    assert set(out) == KEYS
    assert out["signal_status"] == "healthy" and out["prediction_allowed"] is True
    assert out["sample_size"] == 500 and out["unique_target_values"] == 500
    assert math.isclose(out["target_mean"], float(y.mean()))
    assert math.isclose(out["target_std"], float(y.std()))
    assert math.isclose(out["target_variance"], float(y.var()))
    orjson.dumps(out)  # plain JSON types, ready for the sidecar
    assert all(type(out[k]) is float for k in ("target_mean", "target_std", "target_variance"))
    assert type(out["unique_target_values"]) is int and type(out["sample_size"]) is int


@pytest.mark.parametrize(
    "y,reason",
    [
        (np.zeros(300), "constant"),
        (np.full(5, 0.2742), "constant"),
        ([0.3, 0.1 + 0.2] * 100, "negligible"),  # two values that differ only by rounding
        (1e6 + np.arange(100) * 1e-10, "negligible"),
        ([], "no target values"),
    ],
    ids=["zeros", "constant", "rounding", "tiny_relative_std", "empty"],
)
def test_degenerate(y, reason):
    out = assess_signal(y)
    assert out["signal_status"] == "degenerate"
    assert out["prediction_allowed"] is False
    assert reason in out["reason"]


@pytest.mark.parametrize(
    "y,reason",
    [
        (np.tile([0.0, 1.0, 2.0], 100), "3 distinct values"),
        (np.linspace(0, 1, 20), "only 20 rows"),
        (np.r_[np.zeros(980), np.linspace(0.1, 1, 20)], "98.0% of rows share the value 0.0"),
    ],
    ids=["few_levels", "tiny_sample", "dominant_value"],
)
def test_weak(y, reason):
    out = assess_signal(y)
    assert out["signal_status"] == "weak"
    assert out["prediction_allowed"] is True
    assert reason in out["reason"]


def test_small_scale_targets_are_not_degenerate():
    """holdout_hits-like targets (~1e-3) with real spread stay healthy: the test is relative."""
    y = np.random.default_rng(1).normal(1e-3, 1e-4, 200)
    assert assess_signal(y)["signal_status"] == "healthy"


def test_thresholds_are_adjustable():
    y = np.linspace(0, 1, 60)
    assert assess_signal(y)["signal_status"] == "healthy"
    assert assess_signal(y, min_samples=100)["signal_status"] == "weak"


@pytest.mark.parametrize("y,match", [(np.zeros((3, 2)), "1-D"), ([1.0, float("nan")], "finite")])
def test_rejects_bad_input(y, match):
    with pytest.raises(ValueError, match=match):
        assess_signal(y)


def test_generated_inputs(sample_inputs, degenerate_inputs):
    from step5.data.survivors import load_survivors

    assert assess_signal(load_survivors(sample_inputs[0]).y)["signal_status"] == "healthy"
    assert assess_signal(load_survivors(degenerate_inputs[0]).y)["signal_status"] == "degenerate"
