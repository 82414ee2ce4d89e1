"""Tree models: search spaces, one-fold training, early stopping, devices and bad input."""
from __future__ import annotations

import json

import numpy as np
import optuna
import pytest

from step5.artifacts import checkpoint_filename
from step5.data.sample import generate_arrays
from step5.devices import detect_gpus
from step5.models import trees

FAST = {"n_estimators": 80, "early_stopping_rounds": 10, "learning_rate": 0.1}
FAST_PARAMS = {
    "xgboost": {**FAST, "max_depth": 3},
    "lightgbm": {**FAST, "num_leaves": 8, "min_data_in_leaf": 10},
    "catboost": {**FAST, "depth": 4},
}


@pytest.fixture(scope="module")
def planted():
    """The sample generator's planted signal, split train/val/test (240/80/80 rows)."""
    arrays = generate_arrays(400, 16, seed=11)
    X = arrays["X"].astype(np.float32)
    y = arrays["holdout_quality"]
    return (X[:240], y[:240]), (X[240:320], y[240:320]), (X[320:], y[320:])


def _fit(model_type, planted, params=None, **kwargs):
    (Xtr, ytr), (Xva, yva), (Xte, yte) = planted
    kwargs.setdefault("n_threads", 1)
    kwargs.setdefault("device", "cpu")
    return trees.train_fold(
        model_type, params or FAST_PARAMS[model_type], Xtr, ytr, Xva, yva,
        seed=3, X_test=Xte, y_test=yte, **kwargs,
    )


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_train_fold_learns_the_planted_signal_and_reports_every_metric(model_type, planted):
    metrics, model = _fit(model_type, planted)

    expected = {"r2", "val_mse", "train_mse", "train_r2", "test_r2", "test_mse", "duration",
                "best_iteration", "n_iterations", "device", "model_type", "early_stopped"}
    assert expected <= set(metrics)
    json.dumps(metrics)  # the optimizer stores these as trial attributes
    assert metrics["model_type"] == model_type
    assert metrics["device"] == "cpu" and metrics["device_fallback"] is None
    assert metrics["r2"] > 0.15 and metrics["test_r2"] > 0.15, metrics
    assert metrics["train_r2"] >= metrics["r2"]  # boosting fits its own rows at least as well
    assert metrics["n_iterations"] == metrics["best_iteration"] + 1 == model.n_iterations
    assert 1 <= metrics["n_iterations"] <= 80

    # the metrics describe exactly the returned model (cut to its best round)
    (_, _), (Xva, yva), (Xte, yte) = planted
    r2, mse = trees.r2_mse(yte, model.predict(Xte))
    assert r2 == pytest.approx(metrics["test_r2"]) and mse == pytest.approx(metrics["test_mse"])
    assert trees.r2_mse(yva, model.predict(Xva))[0] == pytest.approx(metrics["r2"])


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_same_seed_same_model_different_seed_different_model(model_type, planted):
    params = {**FAST_PARAMS[model_type]}
    # sampling makes the seed matter; without it some libraries are seed-independent
    params.update({"xgboost": {"subsample": 0.7}, "lightgbm": {"bagging_fraction": 0.7, "bagging_freq": 1},
                   "catboost": {"bagging_temperature": 1.0}}[model_type])
    (_, _), (_, _), (Xte, _) = planted
    m1, a = _fit(model_type, planted, params)
    m2, b = _fit(model_type, planted, params)
    np.testing.assert_array_equal(a.predict(Xte), b.predict(Xte))
    assert {k: v for k, v in m1.items() if k != "duration"} == {k: v for k, v in m2.items() if k != "duration"}

    (Xtr, ytr), (Xva, yva), _ = planted
    _, c = trees.train_fold(model_type, params, Xtr, ytr, Xva, yva, seed=4, n_threads=1, device="cpu")
    assert not np.array_equal(a.predict(Xte), c.predict(Xte))


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_early_stopping_on_noise_keeps_only_the_best_rounds(model_type, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5)).astype(np.float32)
    y = rng.normal(size=200)  # nothing to learn: validation loss bottoms out early
    params = {"n_estimators": 400, "early_stopping_rounds": 5, "learning_rate": 0.3}
    metrics, model = trees.train_fold(model_type, params, X[:150], y[:150], X[150:], y[150:],
                                      seed=0, n_threads=1, device="cpu")
    assert metrics["early_stopped"] is True
    assert metrics["n_iterations"] < 100
    # the checkpoint holds the same number of rounds as the metrics describe
    path = trees.save_model(model, model_type, tmp_path / checkpoint_filename(model_type))
    assert trees.load_model(path, model_type).n_iterations == metrics["n_iterations"]


@pytest.mark.parametrize("model_type", trees.TREE_MODEL_TYPES)
def test_search_space_samples_are_accepted_by_train_fold(model_type, planted):
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = []
    for _ in range(5):
        trial = study.ask()
        params = trees.adapter_for(model_type).suggest(trial)
        json.dumps(params)
        adapter = trees.ADAPTERS[model_type]
        assert set(params) <= set(adapter.library_keys) | set(adapter.choice_keys) | {"n_estimators", "early_stopping_rounds"}
        assert all(params[k] in choices for k, choices in adapter.choice_keys.items() if k in params)
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool)
                   for k, v in params.items() if k not in adapter.choice_keys)
        seen.append(params)
        study.tell(trial, 0.0)
    assert len({json.dumps(p, sort_keys=True) for p in seen}) == 5  # it really searches
    # a sampled point trains (cap the rounds: the search's caps are for real data sizes)
    params = {**seen[0], "n_estimators": 30}
    metrics, _ = _fit(model_type, planted, params)
    assert np.isfinite(metrics["r2"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"params": {"n_estimatorz": 5}}, r"unknown xgboost parameter\(s\) \['n_estimatorz'\]"),
        ({"params": {"max_depth": "deep"}}, "`max_depth` must be a finite number"),
        ({"params": {"n_estimators": 0}}, "`n_estimators` must be an int >= 1"),
        ({"params": {"booster": "dart"}}, r"`booster` must be one of \['gbtree', 'gblinear'\], got 'dart'"),
        ({"params": {"booster": "gblinear", "lambda": 0.1, "alpha": 0.01, "max_depth": 3}},
         r"xgboost parameter\(s\) \['max_depth'\] do not apply to booster 'gblinear'"),
        ({"X_val": np.full((10, 4), np.nan, dtype=np.float32)}, r"`X_val` has a non-finite value nan at row 0, column 0"),
        ({"X_val": np.zeros((10, 3), dtype=np.float32)}, "`X_val` has 3 features but `X_train` has 4"),
        ({"y_train": np.zeros(7)}, "`X_train` has 20 rows but `y_train` has 7"),
        ({"X_test": np.zeros((5, 4), dtype=np.float32)}, "`X_test` and `y_test` must be given together"),
        ({"seed": "1"}, "`seed` must be an int"),
        ({"n_threads": 0}, "`n_threads` must be an int >= 1"),
        ({"device": "tpu"}, "`device` must be 'cpu', 'cuda' or 'cuda:N'"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    rng = np.random.default_rng(0)
    args = {
        "params": {"n_estimators": 5},
        "X_train": rng.normal(size=(20, 4)).astype(np.float32), "y_train": rng.normal(size=20),
        "X_val": rng.normal(size=(10, 4)).astype(np.float32), "y_val": rng.normal(size=10),
        "seed": 0, "n_threads": 1,
    }
    args.update(change)
    params = args.pop("params")
    with pytest.raises(ValueError, match=message):
        trees.train_fold("xgboost", params, **args)


def test_neural_net_and_unknown_model_types_are_refused():
    with pytest.raises(ValueError, match="'neural_net' is not a tree model"):
        trees.adapter_for("neural_net")
    with pytest.raises(ValueError, match="must be one of"):
        trees.train_fold("random_forest", {}, np.zeros((4, 1)), np.zeros(4), np.zeros((4, 1)), np.zeros(4), seed=0)


def test_r2_is_finite_for_a_constant_target():
    assert trees.r2_mse(np.ones(4), np.ones(4)) == (1.0, 0.0)
    assert trees.r2_mse(np.ones(4), np.zeros(4)) == (0.0, 1.0)


# ------------------------------------------------------------------------------ devices

def test_no_visible_gpu_means_cpu(monkeypatch, xgboost_sees_a_gpu):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    for model_type in trees.TREE_MODEL_TYPES:
        assert trees.TreeDevices().resolve(model_type) == "cpu"
    assert trees.TreeDevices().resolve("xgboost", "cuda") == "cuda:0"
    assert trees.TreeDevices().resolve("catboost", "cuda:1") == "cuda:1"


def test_visible_gpu_picks_the_first_visible_ordinal(monkeypatch, xgboost_sees_a_gpu):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert trees.TreeDevices().resolve("xgboost") == "cuda:0"  # physical GPU 3 is ordinal 0 in-process


def test_lightgbm_without_gpu_support_trains_on_cpu(monkeypatch, caplog, xgboost_sees_a_gpu):
    probes = []
    monkeypatch.setattr(trees.ADAPTERS["lightgbm"], "gpu_unsupported_reason",
                        lambda gpu_id: probes.append(gpu_id) or "No OpenCL device found")
    devices = trees.TreeDevices()
    with caplog.at_level("INFO", logger="step5.models.trees"):
        assert devices.resolve("lightgbm", "cuda") == "cpu"
    assert "No OpenCL device found" in caplog.text
    # probed once: later folds sharing these devices go straight to the CPU
    assert devices.resolve("lightgbm", "cuda:0") == "cpu" and probes == [0]
    assert devices.gpu_failures == {"lightgbm": "No OpenCL device found"}
    assert trees.TreeDevices().resolve("xgboost", "cuda") == "cuda:0"  # not probed: fails over on its first fit


def test_a_gpu_build_is_probed_once_per_device(monkeypatch):
    probes = []
    monkeypatch.setattr(trees.ADAPTERS["lightgbm"], "gpu_unsupported_reason", lambda gpu_id: probes.append(gpu_id))
    devices = trees.TreeDevices()
    assert [devices.resolve("lightgbm", d) for d in ("cuda", "cuda:0", "cuda:1")] == ["cuda:0", "cuda:0", "cuda:1"]
    assert probes == [0, 1]


def test_a_failing_gpu_fit_falls_back_to_cpu_once(monkeypatch, planted, caplog, xgboost_sees_a_gpu):
    calls = []
    adapter = trees.ADAPTERS["xgboost"]
    real = adapter.fit

    def flaky(*args, device, **kwargs):
        calls.append(device)
        if device != "cpu":
            raise RuntimeError("CUDA driver version is insufficient")
        return real(*args, device=device, **kwargs)

    monkeypatch.setattr(adapter, "fit", flaky)
    devices = trees.TreeDevices()  # what the optimizer's tree backend shares across its folds
    with caplog.at_level("WARNING", logger="step5.models.trees"):
        metrics, _ = _fit("xgboost", planted, device="cuda", devices=devices)
    assert metrics["device"] == "cpu"
    assert "CUDA driver version is insufficient" in metrics["device_fallback"]
    assert "falling back to CPU" in caplog.text
    # the next fold does not try the GPU again
    metrics, _ = _fit("xgboost", planted, device="cuda", devices=devices)
    assert calls == ["cuda:0", "cpu", "cpu"] and metrics["device_fallback"] is None
    # a fold that shares nothing tries the GPU again
    _fit("xgboost", planted, device="cuda")
    assert calls[3:] == ["cuda:0", "cpu"]


@pytest.mark.skipif(bool(detect_gpus()), reason="needs a host without a GPU")
def test_an_xgboost_fit_asked_onto_a_gpu_it_cannot_find_is_recorded_and_warned_as_cpu(planted, caplog, recwarn):
    # xgboost does not fail there: it trains on the CPU and says so only in a warning of its own,
    # so the fold, the run's sidecar and the log used to say "cuda" for a CPU fit.
    reason = trees.ADAPTERS["xgboost"].gpu_unsupported_reason(9)
    assert reason is not None and reason.startswith("it trained on the cpu")
    devices = trees.TreeDevices()
    with caplog.at_level("WARNING", logger="step5.models.trees"):
        for _ in range(2):
            metrics, _ = _fit("xgboost", planted, device="cuda:9", devices=devices)
            assert metrics["device"] == "cpu" and metrics["device_fallback"] is None
    assert caplog.text.count("xgboost cannot train on GPU cuda:9 here (it trained on the cpu") == 1
    assert list(devices.gpu_failures) == ["xgboost"]
    assert not [w for w in recwarn if "xgboost" in w.filename]  # its own warnings were the probe's, kept


@pytest.mark.skipif(not detect_gpus(), reason="needs a GPU")
@pytest.mark.parametrize("model_type", ["xgboost", "catboost"])
def test_gpu_training_when_a_gpu_is_present(model_type, planted, tmp_path):
    metrics, model = _fit(model_type, planted, device=None)
    assert metrics["device"] == "cuda", metrics
    assert metrics["test_r2"] > 0.15
    path = trees.save_model(model, model_type, tmp_path / checkpoint_filename(model_type))
    loaded = trees.load_model(path, model_type)
    (_, _), (_, _), (Xte, _) = planted
    np.testing.assert_allclose(loaded.predict(Xte), model.predict(Xte), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    ("model_type", "params"),
    [("xgboost", {"max_depth": -3}), ("lightgbm", {"num_leaves": 1}), ("catboost", {"depth": 99})],
)
def test_a_fit_the_library_rejects_is_a_job_error(model_type, params, planted):
    from step5.errors import JobError

    with pytest.raises(JobError, match=f"{model_type} training failed") as info:
        _fit(model_type, planted, {"n_estimators": 5, **params})
    assert info.value.error_type == "train_error"
