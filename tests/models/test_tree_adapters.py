"""The adapter registry: every tree library answers the same interface, its search space
stays what docs/models.md says, and importing the adapters imports no library."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from step5 import artifacts
from step5.data.sample import generate_arrays
from step5.models import trees
from step5.models.trees import TreeAdapter, TreeModel

REPO_ROOT = Path(__file__).resolve().parents[2]

_ROUNDS = IntDistribution(100, 1000, step=50)
_RATE = FloatDistribution(0.01, 0.3, log=True)

#: The search spaces of docs/models.md: Optuna parameter name -> distribution. A change
#: here changes which trials a seeded study draws.
SEARCH_SPACES = {
    "xgboost": {
        "booster": CategoricalDistribution(("gbtree", "gblinear")),
        "n_estimators": _ROUNDS, "learning_rate": _RATE,
        "max_depth": IntDistribution(2, 10),
        "min_child_weight": FloatDistribution(1.0, 20.0, log=True),
        "subsample": FloatDistribution(0.5, 1.0),
        "colsample_bytree": FloatDistribution(0.5, 1.0),
        "reg_alpha": FloatDistribution(1e-8, 1.0, log=True),
        "reg_lambda": FloatDistribution(1e-3, 10.0, log=True),
    },
    "lightgbm": {
        "n_estimators": _ROUNDS, "learning_rate": _RATE,
        "num_leaves": IntDistribution(8, 128, log=True),
        "max_depth": IntDistribution(3, 12),
        "min_data_in_leaf": IntDistribution(5, 100, log=True),
        "bagging_fraction": FloatDistribution(0.5, 1.0),
        "feature_fraction": FloatDistribution(0.5, 1.0),
        "lambda_l1": FloatDistribution(1e-8, 1.0, log=True),
        "lambda_l2": FloatDistribution(1e-3, 10.0, log=True),
    },
    "catboost": {
        "n_estimators": _ROUNDS, "learning_rate": _RATE,
        "depth": IntDistribution(3, 8),
        "l2_leaf_reg": FloatDistribution(1.0, 10.0, log=True),
        "random_strength": FloatDistribution(1e-3, 10.0, log=True),
        "bagging_temperature": FloatDistribution(0.0, 1.0),
    },
}

#: xgboost's other branch: the linear booster (penalties on standardised features and target).
XGBOOST_LINEAR_SPACE = {
    "booster": CategoricalDistribution(("gbtree", "gblinear")),
    "lambda": FloatDistribution(1e-4, 10.0, log=True),
    "alpha": FloatDistribution(1e-5, 0.5, log=True),
}

#: The interface's methods (TreeAdapter), each of which every adapter must have.
METHODS = ("suggest", "fit", "reads_validation_rows", "cpu_only_reason", "predict", "save", "load",
           "library_error", "gpu_unsupported_reason")


def test_the_registry_holds_one_adapter_per_tree_model_type():
    assert trees.TREE_MODEL_TYPES == tuple(trees.ADAPTERS) == ("xgboost", "lightgbm", "catboost")
    assert set(trees.TREE_MODEL_TYPES) == set(artifacts.MODEL_TYPES) - {"neural_net"}
    for model_type, adapter in trees.ADAPTERS.items():
        assert adapter.model_type == model_type
        assert all(callable(getattr(adapter, name, None)) for name in METHODS), model_type
        assert set(METHODS) <= set(dir(TreeAdapter))
    with pytest.raises(TypeError):
        trees.ADAPTERS["random_forest"] = trees.ADAPTERS["xgboost"]  # read-only: no state to share


def _trial(fixed: dict | None = None) -> optuna.Trial:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    if fixed:
        study.enqueue_trial(fixed)
    return study.ask()


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_search_space_names_and_ranges(model_type):
    adapter = trees.ADAPTERS[model_type]
    trial = _trial({"booster": "gbtree"} if model_type == "xgboost" else None)
    params = adapter.suggest(trial)
    assert trial.distributions == SEARCH_SPACES[model_type]
    boosting = [k for k in params if k not in adapter.choice_keys]
    assert boosting[:2] == ["n_estimators", "learning_rate"]  # shared, suggested first after the choices
    assert set(params) - {"n_estimators"} <= set(adapter.library_keys) | set(adapter.choice_keys)
    assert adapter.reads_validation_rows(params)  # every tree booster early-stops on them


def test_xgboost_searches_a_linear_booster_too():
    adapter = trees.ADAPTERS["xgboost"]
    trial = _trial({"booster": "gblinear"})
    params = adapter.suggest(trial)
    assert trial.distributions == XGBOOST_LINEAR_SPACE
    assert params == {"booster": "gblinear", "n_estimators": 1000,
                      "lambda": trial.params["lambda"], "alpha": trial.params["alpha"]}
    assert not adapter.reads_validation_rows(params)  # the penalties regularise it; val rows only score
    assert adapter.reads_validation_rows({"learning_rate": 0.1})  # no `booster` key: trees, as before


@pytest.fixture(scope="module")
def data():
    arrays = generate_arrays(240, 8, seed=2)
    X = arrays["X"].astype(np.float32)
    y = arrays["holdout_quality"]
    return (X[:160], y[:160]), (X[160:], y[160:])


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_each_adapter_round_trips_fit_save_load_predict(model_type, data, tmp_path):
    adapter = trees.ADAPTERS[model_type]
    (X_tr, y_tr), (X_va, y_va) = data
    names = [f"f{i}" for i in range(X_tr.shape[1])]
    booster, kept = adapter.fit(
        {"learning_rate": 0.3}, X_tr, y_tr, X_va, y_va, max_rounds=200, early_stopping_rounds=3,
        seed=1, n_threads=1, device="cpu", feature_names=names,
    )
    assert 1 <= kept < 200  # stopped early, cut to its best round
    before = np.asarray(adapter.predict(booster, X_va), dtype=np.float64)
    assert before.shape == (len(X_va),) and np.isfinite(before).all()

    path = tmp_path / artifacts.checkpoint_filename(model_type)
    adapter.save(booster, path)
    loaded = adapter.load(path)
    assert isinstance(loaded, TreeModel)
    assert (loaded.n_features, loaded.n_iterations) == (X_tr.shape[1], kept)
    assert list(loaded.feature_names) == names
    np.testing.assert_array_equal(np.asarray(adapter.predict(loaded.booster, X_va), dtype=np.float64), before)
    assert issubclass(adapter.library_error(), BaseException)


def test_importing_the_tree_models_imports_no_tree_library():
    # The libraries are the optional `trees` extra: a neural-net run must not need them.
    code = (
        "import json, sys\n"
        "import step5.models, step5.models.trees\n"
        "print(json.dumps(sorted(m for m in ('xgboost', 'lightgbm', 'catboost') if m in sys.modules)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout) == []
