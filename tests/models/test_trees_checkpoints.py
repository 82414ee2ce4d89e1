"""Tree checkpoints: native files that round-trip exactly, written atomically, read back
with clear errors."""
from __future__ import annotations

import numpy as np
import pytest

from step5.errors import DataError
from step5.models import trees


@pytest.fixture(scope="module")
def fitted():
    """One small fitted model per tree type, plus rows to predict on."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(160, 6)).astype(np.float32)
    y = 0.3 + 0.05 * X[:, 0] - 0.03 * X[:, 1] * X[:, 2] + 0.01 * rng.normal(size=160)
    models = {}
    for model_type in trees.TREE_MODEL_TYPES:
        _, models[model_type] = trees.train_fold(
            model_type, {"n_estimators": 40, "learning_rate": 0.2}, X[:100], y[:100], X[100:130], y[100:130],
            seed=1, n_threads=1, device="cpu",
        )
    return models, X[130:]


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_round_trip_predicts_the_same_values(model_type, fitted, tmp_path):
    models, X_new = fitted
    model = models[model_type]
    path = trees.save_model(model, model_type, tmp_path / trees.checkpoint_name(model_type))

    assert path.name == "best_model" + trees.CHECKPOINT_SUFFIX[model_type]
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    loaded = trees.load_model(path, model_type)
    assert (loaded.model_type, loaded.n_features, loaded.n_iterations) == (model_type, 6, model.n_iterations)
    got = loaded.predict(X_new)
    assert got.shape == (X_new.shape[0],) and got.dtype == np.float64
    np.testing.assert_allclose(got, model.predict(X_new), rtol=1e-6, atol=1e-9)
    # float64 input (what a caller might have) predicts the same as float32
    np.testing.assert_allclose(loaded.predict(X_new.astype(np.float64)), got, rtol=1e-6)


def test_checkpoint_constants_match_the_sidecar_definitions():
    from step5 import artifacts

    for model_type, name in artifacts.CHECKPOINT_FILENAMES.items():
        assert trees.checkpoint_name(model_type) == name
        assert trees.CHECKPOINT_FORMAT[model_type] == artifacts.CHECKPOINT_FORMATS[model_type]
    assert set(trees.TREE_MODEL_TYPES) < set(trees.CHECKPOINT_SUFFIX)


def test_saving_replaces_an_old_checkpoint_whole(fitted, tmp_path):
    models, X_new = fitted
    path = tmp_path / "best_model.json"
    path.write_text("an older, different model")
    trees.save_model(models["xgboost"], "xgboost", path)
    np.testing.assert_allclose(trees.load_model(path, "xgboost").predict(X_new), models["xgboost"].predict(X_new))


def test_save_refuses_a_wrong_suffix_or_a_model_of_another_type(fitted, tmp_path):
    models, _ = fitted
    with pytest.raises(ValueError, match=r"a lightgbm checkpoint must end with '\.txt'"):
        trees.save_model(models["lightgbm"], "lightgbm", tmp_path / "best_model.json")
    with pytest.raises(ValueError, match="is a catboost model, but `model_type` is 'xgboost'"):
        trees.save_model(models["catboost"], "xgboost", tmp_path / "best_model.json")
    with pytest.raises(ValueError, match="must be a TreeModel"):
        trees.save_model(models["xgboost"].booster, "xgboost", tmp_path / "best_model.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_missing_or_corrupt_checkpoint_is_a_data_error_naming_the_file(model_type, tmp_path):
    path = tmp_path / trees.checkpoint_name(model_type)
    with pytest.raises(DataError, match=f"{model_type} checkpoint not found: .*{path.name}"):
        trees.load_model(path, model_type)
    path.write_bytes(b"\x00garbage, not a model")
    with pytest.raises(DataError, match=f"cannot load {model_type} checkpoint .*{path.name}"):
        trees.load_model(path, model_type)


def test_load_refuses_a_neural_net_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="'neural_net' is not a tree model"):
        trees.load_model(tmp_path / "best_model.pth", "neural_net")


def test_predict_checks_the_feature_count(fitted):
    models, X_new = fitted
    with pytest.raises(ValueError, match="`X` has 5 feature columns but this lightgbm model was trained on 6"):
        models["lightgbm"].predict(X_new[:, :5])
    with pytest.raises(ValueError, match="`X` must be 2-D"):
        models["lightgbm"].predict(X_new[0])
    assert models["catboost"].predict(X_new[:0]).shape == (0,)
