"""xgboost's linear booster: an elastic net on standardised rows whose saved weights
predict on raw features, that only scores its validation rows, and whose final model
fits every development row."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import ElasticNet
from sklearn.preprocessing import StandardScaler

from step5 import artifacts
from step5.models import trees
from step5.optimizer import backends
from step5.optimizer.config import OptimizerConfig
from step5.optimizer.optimizer import AntiOverfitMetaOptimizer

LINEAR = {"booster": "gblinear", "n_estimators": 1000, "lambda": 0.05, "alpha": 0.002}


@pytest.fixture(scope="module")
def rows():
    """A linear target on columns of very different scales and offsets, plus a constant
    column: standardising must make the penalties scale-free and the weights raw-scale."""
    rng = np.random.default_rng(4)
    n = 300
    X = rng.normal(size=(n, 6)) * np.array([1e-3, 1.0, 50.0, 1e3, 1.0, 0.0]) + np.array([0, 5, -20, 1e4, 0, 3])
    y = 2e3 * X[:, 0] + 0.5 * X[:, 1] - 0.01 * X[:, 2] + 1e-3 * X[:, 3] + rng.normal(scale=0.3, size=n)
    X = X.astype(np.float32)
    return (X[:200], y[:200]), (X[200:260], y[200:260]), (X[260:], y[260:])


def _fit(rows, params=LINEAR, **kwargs):
    (Xtr, ytr), (Xva, yva), (Xte, yte) = rows
    kwargs.setdefault("device", "cpu")
    return trees.train_fold("xgboost", params, Xtr, ytr, kwargs.pop("X_val", Xva), kwargs.pop("y_val", yva),
                            seed=1, X_test=Xte, y_test=yte, n_threads=1, **kwargs)


def test_the_linear_booster_is_the_elastic_net_of_the_standardised_rows(rows):
    (Xtr, ytr), _, (Xte, _) = rows
    metrics, model = _fit(rows)
    # xgboost's per-row objective 1/2 mean(r^2) + lambda/2 |w|^2 + alpha |w|_1 is sklearn's
    # ElasticNet with alpha = lambda + alpha and l1_ratio = alpha / (lambda + alpha).
    Xtr, Xte = Xtr.astype(np.float64), Xte.astype(np.float64)
    scaler = StandardScaler().fit(Xtr)
    target = (ytr - ytr.mean()) / ytr.std()
    total = LINEAR["lambda"] + LINEAR["alpha"]
    net = ElasticNet(alpha=total, l1_ratio=LINEAR["alpha"] / total, tol=1e-10, max_iter=100_000)
    net.fit(scaler.transform(Xtr), target)
    expected = net.predict(scaler.transform(Xte)) * ytr.std() + ytr.mean()
    np.testing.assert_allclose(model.predict(Xte), expected, atol=2e-3 * ytr.std())
    assert metrics["r2"] > 0.9 and metrics["test_r2"] > 0.9
    assert metrics["n_iterations"] < LINEAR["n_estimators"] and metrics["early_stopped"]  # converged


def test_validation_rows_are_only_scored(rows):
    _, (Xva, yva), (Xte, _) = rows
    metrics, model = _fit(rows)
    shuffled = np.random.default_rng(0).permutation(len(yva))
    other_metrics, other = _fit(rows, X_val=Xva[shuffled][::-1], y_val=-yva)
    np.testing.assert_array_equal(other.predict(Xte), model.predict(Xte))  # the same model
    assert other_metrics["r2"] != metrics["r2"]  # scored on what it was given
    assert not trees.adapter_for("xgboost").reads_validation_rows(LINEAR)


def test_the_checkpoint_predicts_raw_rows_as_step6_does(rows, tmp_path):
    import xgboost as xgb

    (_, _), _, (Xte, _) = rows
    names = [f"f{i}" for i in range(Xte.shape[1])]
    _, model = _fit(rows, feature_names=names)
    path = trees.save_model(model, "xgboost", tmp_path / "best_model.json")
    plain = xgb.Booster()
    plain.load_model(str(path))  # what the existing Step 6 does: no names, a float32 array
    np.testing.assert_array_equal(plain.predict(xgb.DMatrix(Xte)), model.predict(Xte).astype(np.float32))
    loaded = trees.load_model(path, "xgboost")
    assert loaded.feature_names == names and loaded.n_iterations == model.n_iterations
    np.testing.assert_array_equal(loaded.predict(Xte), model.predict(Xte))
    saved = json.loads(path.read_text())["learner"]["gradient_booster"]
    assert saved["name"] == "gblinear" and saved["model"]["weights"][5] == 0.0  # the constant column


def test_the_same_seed_gives_the_same_model(rows):
    (_, _), _, (Xte, _) = rows
    np.testing.assert_array_equal(_fit(rows)[1].predict(Xte), _fit(rows)[1].predict(Xte))


def test_a_linear_best_trial_fits_its_final_model_on_every_dev_row(sample_inputs, tmp_path, monkeypatch):
    def linear(self, trial):
        return {**LINEAR, "lambda": trial.suggest_float("lambda", 1e-3, 1.0, log=True)}

    monkeypatch.setattr(backends.TreeBackend, "suggest", linear)
    survivors, history = sample_inputs
    out = tmp_path / "out"
    config = OptimizerConfig(survivors=survivors, lottery_data=history, model_type="xgboost", trials=2, k_folds=3,
                             seed=3, output_dir=out, cpu_workers=1, diagnostics_dir=tmp_path / "diag",
                             command_line=["test"])
    outcome = AntiOverfitMetaOptimizer(config).run()
    assert outcome.status == "SUCCESS"
    sidecar = artifacts.read_sidecar(out / artifacts.SIDECAR_NAME)
    metrics = sidecar["training_metrics"]
    assert sidecar["hyperparameters"]["booster"] == "gblinear"
    assert metrics["n_fit"] == metrics["n_dev"] and metrics["n_early_stop"] == 0
    # no validation rows of its own: its val scores are the best trial's CV means, refitted
    assert metrics["val_r2"] == pytest.approx(metrics["cv_r2_mean"], rel=1e-12)
    assert metrics["val_mse"] == pytest.approx(metrics["cv_val_mse_mean"], rel=1e-12)
    model = trees.load_model(out / "best_model.json", "xgboost")
    assert model.n_features == sidecar["feature_schema"]["feature_count"]


def test_a_linear_fit_trains_on_the_cpu_where_a_gpu_is_asked_for(rows, monkeypatch, xgboost_sees_a_gpu):
    adapter = trees.ADAPTERS["xgboost"]
    real, calls = adapter.fit, []

    def spy(*args, device, **kwargs):
        calls.append(device)
        return real(*args, device="cpu", **kwargs)  # this machine may have no GPU: record, then fit

    monkeypatch.setattr(adapter, "fit", spy)
    devices = trees.TreeDevices()
    metrics, _ = _fit(rows, device="cuda", devices=devices)
    assert calls == ["cpu"] and metrics["device"] == "cpu" and metrics["device_fallback"] is None
    assert devices.gpu_failures == {}  # not a failure: later tree fits still try the GPU
    _fit(rows, params={"n_estimators": 5, "max_depth": 2}, device="cuda", devices=devices)
    assert calls[1:] == ["cuda:0"]
