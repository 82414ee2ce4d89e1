"""Tree checkpoints: native files that round-trip exactly, written atomically, read back
with clear errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from step5.artifacts import checkpoint_filename
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
    path = trees.save_model(model, model_type, tmp_path / checkpoint_filename(model_type))

    assert path.name == checkpoint_filename(model_type)
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp file left behind
    loaded = trees.load_model(path, model_type)
    assert (loaded.model_type, loaded.n_features, loaded.n_iterations) == (model_type, 6, model.n_iterations)
    got = loaded.predict(X_new)
    assert got.shape == (X_new.shape[0],) and got.dtype == np.float64
    np.testing.assert_allclose(got, model.predict(X_new), rtol=1e-6, atol=1e-9)
    # float64 input (what a caller might have) predicts the same as float32
    np.testing.assert_allclose(loaded.predict(X_new.astype(np.float64)), got, rtol=1e-6)


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
    path = tmp_path / checkpoint_filename(model_type)
    with pytest.raises(DataError, match=f"{model_type} checkpoint not found: .*{path.name}"):
        trees.load_model(path, model_type)
    path.write_bytes(b"\x00garbage, not a model")
    with pytest.raises(DataError, match=f"cannot load {model_type} checkpoint .*{path.name}"):
        trees.load_model(path, model_type)
    path.write_text('{"learner": {"attributes": {}, "feature_na')  # cut short
    with pytest.raises(DataError, match=f"cannot load {model_type} checkpoint .*{path.name}") as caught:
        trees.load_model(path, model_type)
    assert "Stack trace" not in str(caught.value) and "[bt]" not in str(caught.value)  # xgboost's C++ trace


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


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_feature_names_travel_in_the_checkpoint(model_type, tmp_path):
    rng = np.random.default_rng(2)
    X = rng.normal(size=(80, 3)).astype(np.float32)
    y = X[:, 0] + 0.1 * rng.normal(size=80)
    names = ["lane_agreement_8", "skip_mean", "temporal_stability_mid"]
    _, model = trees.train_fold(model_type, {"n_estimators": 10}, X[:60], y[:60], X[60:], y[60:],
                                seed=0, n_threads=1, device="cpu", feature_names=names)
    assert model.feature_names == names
    path = trees.save_model(model, model_type, tmp_path / checkpoint_filename(model_type))
    assert trees.load_model(path, model_type).feature_names == names

    # trained without names: the library's made-up ones (Column_0, "0") are not reported
    _, nameless = trees.train_fold(model_type, {"n_estimators": 10}, X[:60], y[:60], X[60:], y[60:],
                                   seed=0, n_threads=1, device="cpu")
    path = trees.save_model(nameless, model_type, tmp_path / ("nameless" + Path(checkpoint_filename(model_type)).suffix))
    assert trees.load_model(path, model_type).feature_names is None


def test_feature_names_are_checked_and_unstorable_ones_are_dropped():
    X = np.zeros((10, 2), dtype=np.float32)
    y = np.arange(10, dtype=np.float64)
    with pytest.raises(ValueError, match="`feature_names` has 3 names but `X_train` has 2 columns"):
        trees.train_fold("xgboost", {"n_estimators": 2}, X, y, X, y, seed=0, feature_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="unique"):
        trees.train_fold("xgboost", {"n_estimators": 2}, X, y, X, y, seed=0, feature_names=["a", "a"])
    _, model = trees.train_fold("lightgbm", {"n_estimators": 2}, X, y, X, y, seed=0, n_threads=1,
                                feature_names=["ok", "bad[name]"])
    assert model.feature_names is None


def test_device_for_gpus_maps_the_flag_to_an_ordinal():
    assert trees.device_for_gpus(None) is None
    assert trees.device_for_gpus([]) == "cpu"
    assert trees.device_for_gpus(["1", "0"], env={}) == "cuda:1"
    assert trees.device_for_gpus(["5"], env={"CUDA_VISIBLE_DEVICES": "3,5"}) == "cuda:1"
    with pytest.raises(ValueError, match="hides it"):
        trees.device_for_gpus(["0"], env={"CUDA_VISIBLE_DEVICES": "3,5"})
    # CUDA sees nothing past an entry that is not a GPU: GPU 2 is hidden, not ordinal 2.
    for visible in ("0,-1,2", "NoDevFiles,2"):
        with pytest.raises(ValueError, match="hides it"):
            trees.device_for_gpus(["2"], env={"CUDA_VISIBLE_DEVICES": visible})
