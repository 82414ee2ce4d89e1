"""Jobs: fold files in, protocol results out; errors, cache, checkpoints, fused groups."""
from __future__ import annotations

import dataclasses
import errno
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from step5.data import kfold_splits, load_survivors, write_fold_npz
from step5.errors import DataError, JobError
from step5.nn import job as job_module
from step5.nn.checkpoint import Checkpoint, load_checkpoint
from step5.nn.job import DataCache, describe_device, load_fold, run_fold_group, run_train_job
from step5.protocol import TrainRequest

CPU = torch.device("cpu")
COMPLETE_KEYS = {
    "status", "model_type", "r2", "val_mse", "train_mse", "train_r2", "duration", "load_s", "train_s", "device",
    "trial_number", "fold_idx", "job_id", "epochs_run", "best_epoch", "n_train", "n_val",
}


def arrays(seed: int = 0, n_train: int = 120, n_val: int = 40, d: int = 6) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n_train + n_val, d)).astype(np.float32)
    y = (X[:, 0] - 0.5 * X[:, 1] ** 2 + 0.2 * rng.normal(size=len(X))).astype(np.float32)
    return {"X_train": X[:n_train], "y_train": y[:n_train], "X_val": X[n_train:], "y_val": y[n_train:]}


def npz(path: Path, **arrs: np.ndarray) -> str:
    with open(path, "wb") as fh:
        np.savez(fh, **arrs)
    return str(path)


def request(path: str, **overrides) -> TrainRequest:
    params = {"hidden_layers": [16, 8], "epochs": 12, "learning_rate": 1e-2, "early_stopping_patience": 4}
    params.update(overrides.pop("params", {}))
    raw = {"X_train_path": path, "params": params, "trial_number": 7, "fold_idx": 2, "job_id": "t7-f2", "seed": 5}
    raw.update(overrides)
    return TrainRequest.from_dict(raw)


def test_result_message_has_the_protocol_fields(tmp_path):
    path = npz(tmp_path / "f.npz", **arrays())
    res = run_train_job(request(path), device=CPU)
    assert set(res) == COMPLETE_KEYS
    assert (res["status"], res["model_type"], res["device"]) == ("complete", "neural_net", "cpu")
    assert (res["trial_number"], res["fold_idx"], res["job_id"]) == (7, 2, "t7-f2")
    assert (res["n_train"], res["n_val"]) == (96, 40)  # 24 of the 120 training rows only early-stop
    assert 1 <= res["best_epoch"] <= res["epochs_run"] <= 12
    assert all(isinstance(res[k], float) and math.isfinite(res[k]) for k in ("r2", "val_mse", "train_mse", "train_r2"))
    assert res["duration"] >= res["train_s"] > 0


def test_test_arrays_are_scored_when_present(tmp_path):
    a = arrays()
    extra = arrays(seed=1, n_train=2, n_val=30)
    path = npz(tmp_path / "f.npz", **a, X_test=extra["X_val"], y_test=extra["y_val"])
    res = run_train_job(request(path), device=CPU)
    assert {"test_r2", "test_mse"} <= set(res)
    without = run_train_job(request(npz(tmp_path / "g.npz", **a)), device=CPU)
    assert res["r2"] == without["r2"], "test rows must not influence training"


def _bad_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """name -> (path, a fragment the error message must contain)."""
    a = arrays()
    nan = dict(a, X_train=a["X_train"].copy())
    nan["X_train"][3, 1] = np.nan
    inf_y = dict(a, y_val=a["y_val"].copy())
    inf_y["y_val"][0] = np.inf
    (tmp_path / "garbage.npz").write_bytes(b"this is not a zip archive")
    return {
        "missing file": (str(tmp_path / "absent.npz"), "not found"),
        "not an npz": (str(tmp_path / "garbage.npz"), "garbage.npz"),
        "missing key": (npz(tmp_path / "nokey.npz", X_train=a["X_train"], y_train=a["y_train"], X_val=a["X_val"]),
                        "y_val"),
        "pickled object array": (npz(tmp_path / "obj.npz", **dict(a, y_train=np.array([{"a": 1}] * 120, dtype=object))),
                                 "pickled"),
        "NaN feature": (npz(tmp_path / "nan.npz", **nan), "row 3, column 1"),
        "inf target": (npz(tmp_path / "inf.npz", **inf_y), "y_val"),
        "1-D X": (npz(tmp_path / "flat.npz", **dict(a, X_train=a["X_train"][:, 0])), "X_train"),
        "row mismatch": (npz(tmp_path / "rows.npz", **dict(a, y_train=a["y_train"][:-1])), "rows"),
        "feature mismatch": (npz(tmp_path / "cols.npz", **dict(a, X_val=a["X_val"][:, :-1])), "features"),
        "string array": (npz(tmp_path / "str.npz", **dict(a, y_val=np.array(["x"] * 40))), "numeric"),
        "too few rows": (npz(tmp_path / "few.npz", **dict(a, X_val=a["X_val"][:1], y_val=a["y_val"][:1])), "X_val"),
    }


@pytest.mark.parametrize("case", [
    "missing file", "not an npz", "missing key", "pickled object array", "NaN feature", "inf target", "1-D X",
    "row mismatch", "feature mismatch", "string array", "too few rows",
])
def test_bad_fold_files_are_data_errors(tmp_path, case):
    path, fragment = _bad_cases(tmp_path)[case]
    with pytest.raises(JobError) as info:
        run_train_job(request(path), device=CPU)
    err = info.value
    assert err.error_type == "data_error", err.message
    assert fragment in err.message and path in err.message, err.message
    assert (err.trial_number, err.fold_idx, err.job_id) == (7, 2, "t7-f2")


def test_divergence_is_a_train_error(tmp_path):
    path = npz(tmp_path / "f.npz", **arrays())
    req = request(path, params={"optimizer": "sgd", "learning_rate": 1e30, "gradient_clip": 0.0})
    with pytest.raises(JobError) as info:
        run_train_job(req, device=CPU)
    assert info.value.error_type == "train_error" and "diverged" in info.value.message
    assert info.value.job_id == "t7-f2"


def test_out_of_memory_is_classified(tmp_path, monkeypatch):
    path = npz(tmp_path / "f.npz", **arrays())

    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(job_module, "train_models", oom)
    with pytest.raises(JobError) as info:
        run_train_job(request(path), device=CPU)
    assert info.value.error_type == "out_of_memory"
    assert job_module._as_job_error(torch.OutOfMemoryError("CUDA out of memory"), "x").error_type == "out_of_memory"
    bug = job_module._as_job_error(KeyError("boom"), "training")
    assert bug.error_type == "train_error" and "KeyError" in bug.traceback


def test_data_cache_reuses_and_invalidates(tmp_path):
    path = npz(tmp_path / "f.npz", **arrays())
    cache = DataCache(max_entries=2)
    first = run_train_job(request(path), device=CPU, cache=cache)
    second = run_train_job(request(path), device=CPU, cache=cache)
    assert second["load_s"] == 0.0 and cache.hits == 1
    assert second["r2"] == first["r2"]
    npz(Path(path), **arrays(seed=9))  # rewritten in place: a new (mtime, size) key
    os.utime(path, ns=(1, 1))
    data, load_s = load_fold(path, cache)
    assert load_s > 0.0 and np.array_equal(data.X_train, arrays(seed=9)["X_train"])
    for i in range(3):
        load_fold(npz(tmp_path / f"o{i}.npz", **arrays(seed=i)), cache)
    assert len(cache) == 2
    assert not data.X_train.flags.writeable, "cached arrays are shared and must be read-only"


def test_checkpoint_loads_weights_only_and_predicts_like_training(tmp_path):
    a = arrays(d=5)
    names = [f"feat_{i}" for i in range(5)]
    path = npz(tmp_path / "f.npz", **a, feature_names=np.array(names))
    ckpt = tmp_path / "out" / "best_model.pth"
    res = run_train_job(request(path, save_model_path=str(ckpt), use_leaky_relu=False), device=CPU)
    assert res["model_path"] == str(ckpt)
    raw = torch.load(ckpt, weights_only=True)
    assert raw["feature_names"] == names and raw["hidden_layers"] == [16, 8]
    assert raw["use_leaky_relu"] is False and raw["feature_count"] == raw["input_dim"] == 5
    assert raw["config"]["hidden_layers"] == [16, 8]  # the hyperparameters that trained it
    assert "network.0.bias" in raw["state_dict"] and not raw["state_dict"]["network.0.bias"].any()
    model = load_checkpoint(ckpt)
    pred = model.predict(a["X_val"])
    y = a["y_val"].astype(np.float64)
    assert pred.shape == (40,) and pred.dtype == np.float64
    assert np.mean((y - pred) ** 2) == pytest.approx(res["val_mse"], rel=1e-5)
    assert 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2) == pytest.approx(res["r2"], rel=1e-5)
    with pytest.raises(ValueError, match=r"\(n, 5\)"):
        model.predict(a["X_val"][:, :4])


def test_a_target_is_scored_at_the_precision_of_its_fold_file(tmp_path):
    # Fold files hold y as float64. Read as float32 (spacing 8 at 1e8), this target was a
    # constant to the worker: it reported r2 0.0 and a val_mse of 1e-5 where the model's
    # real error on these rows is some 4000 times that.
    a = arrays(d=4)
    rng = np.random.default_rng(3)
    y = {k: 1e8 + a[f"X_{k}"][:, 0].astype(np.float64) + 0.3 * rng.normal(size=len(a[f"X_{k}"])) for k in ("train", "val")}
    path = npz(tmp_path / "f.npz", X_train=a["X_train"], y_train=y["train"], X_val=a["X_val"], y_val=y["val"])
    fold, _ = load_fold(path)
    assert fold.y_val.dtype == np.float64 and np.array_equal(fold.y_val, y["val"])
    ckpt = tmp_path / "m.pth"
    res = run_train_job(request(path, save_model_path=str(ckpt)), device=CPU)
    pred = load_checkpoint(ckpt).predict(a["X_val"])
    assert res["val_mse"] == pytest.approx(np.mean((y["val"] - pred) ** 2), rel=1e-4)
    assert res["r2"] == pytest.approx(1 - np.sum((y["val"] - pred) ** 2) / np.sum((y["val"] - y["val"].mean()) ** 2),
                                      rel=1e-4)


def test_a_target_beyond_float32_is_a_data_error(tmp_path):
    a = arrays()
    big = dict(a, y_train=a["y_train"].astype(np.float64) * 1e300)
    path = npz(tmp_path / "f.npz", **big)
    with pytest.raises(JobError, match=r"y_train.*too large for float32") as info:
        run_train_job(request(path), device=CPU)
    assert info.value.error_type == "data_error"


def _overflowing(a: dict[str, np.ndarray], part: str) -> dict[str, np.ndarray]:
    """``a`` with a training column of 1e38s and 2e38s (mean 1.5e38), where -3e38, legal in
    float32, overflows once standardised; placed in the ``part`` rows."""
    out = {k: v.copy() for k, v in a.items()}
    out["X_train"][:, 2] = np.where(np.arange(len(out["X_train"])) % 2, 1e38, 2e38)
    out[f"X_{part}"][3, 2] = -3e38
    return out


@pytest.mark.parametrize("part", ["train", "val", "test"])
def test_features_that_overflow_when_standardised_are_a_data_error_naming_the_column(tmp_path, part):
    # The model met inf inputs and "diverged" at epoch 1, a train_error blaming the learning
    # rate (or, in the test rows, "non-finite predictions; the model diverged").
    a = arrays()
    a["X_test"], a["y_test"] = a["X_val"][:10], a["y_val"][:10]
    path = npz(tmp_path / "f.npz", **_overflowing(a, part))
    with pytest.raises(JobError) as info:
        run_train_job(request(path), device=CPU)
    err = info.value
    assert err.error_type == "data_error", err.message
    assert path in err.message and "feature column 2 overflows float32" in err.message and "-3e+38" in err.message
    assert {"train": "training", "val": "validation", "test": "test"}[part] + " rows" in err.message


@pytest.mark.parametrize("hidden_layers", [[16, 8], []])
def test_unstandardised_features_that_overflow_the_net_are_a_data_error_naming_the_column(tmp_path, hidden_layers):
    # With normalize_features off, a finite 1e30 feature overflowed the net's float32 activations at once
    # and was reported as "training diverged ... a smaller learning rate or gradient clipping should help".
    a = arrays()
    a["X_train"][:, 2] = np.where(np.arange(len(a["X_train"])) % 2, 1e30, -2e30)
    path = npz(tmp_path / "f.npz", **a)
    with pytest.raises(JobError) as info:
        run_train_job(request(path, normalize_features=False, params={"hidden_layers": hidden_layers}), device=CPU)
    err = info.value
    assert err.error_type == "data_error", err.message
    assert path in err.message and "feature column 2 holds -2e+30" in err.message
    assert "normalize_features" in err.message


def test_a_fold_that_overflows_costs_its_group_mates_nothing(tmp_path):
    bad = npz(tmp_path / "bad.npz", **_overflowing(arrays(), "val"))
    good = npz(tmp_path / "good.npz", **arrays(seed=1))
    alone = run_train_job(request(good, seed=2), device=CPU)
    out = run_fold_group([request(bad, seed=1), request(good, seed=2)], device=CPU)
    assert out[0]["status"] == "error" and out[0]["error_type"] == "data_error"
    assert (out[1]["r2"], out[1]["val_mse"]) == (alone["r2"], alone["val_mse"])


def test_input_dropout_is_in_the_config_not_in_the_weights(tmp_path):
    path = npz(tmp_path / "f.npz", **arrays(d=5))
    ckpts = [tmp_path / f"m{i}.pth" for i in range(2)]
    for ckpt, p in zip(ckpts, (0.0, 0.2)):
        run_train_job(request(path, save_model_path=str(ckpt), params={"input_dropout": p}), device=CPU)
    plain, dropped = (torch.load(c, weights_only=True) for c in ckpts)
    assert list(dropped["state_dict"]) == list(plain["state_dict"])
    assert dropped["config"]["input_dropout"] == 0.2 and plain["config"]["input_dropout"] == 0.0
    assert not torch.equal(dropped["state_dict"]["network.0.weight"], plain["state_dict"]["network.0.weight"])
    load_checkpoint(ckpts[1])  # strict load into the inference layout


@pytest.mark.parametrize("value", [1.0, -0.1, "0.2", float("nan")])
def test_input_dropout_out_of_range_is_a_bad_request(value):
    from step5.errors import BadRequest

    with pytest.raises(BadRequest, match="`input_dropout` must be a finite number >= 0.0 and < 1.0"):
        request("f.npz", params={"input_dropout": value})


@pytest.mark.parametrize("value", [-0.1, "0.2", float("inf"), True])
def test_input_sparsity_out_of_range_is_a_bad_request(value):
    from step5.errors import BadRequest

    with pytest.raises(BadRequest, match="`input_sparsity` must be a finite number >= 0.0"):
        request("f.npz", params={"input_sparsity": value})


def test_bad_checkpoints_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "none.pth")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="not a step5-mlp checkpoint"):
        load_checkpoint(tmp_path / "other.pth")
    torch.save({"format": "step5-mlp", "format_version": 1, "architecture": {}}, tmp_path / "v1.pth")
    with pytest.raises(DataError, match="format_version 1.*re-run Step 5"):
        load_checkpoint(tmp_path / "v1.pth")
    (tmp_path / "empty.pth").write_bytes(b"")  # torch's EOFError() has no message: the error ended in ": "
    with pytest.raises(DataError, match=r"cannot read checkpoint .*empty\.pth: EOFError \(the file is 0 bytes"):
        load_checkpoint(tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="feature scaler"):
        Checkpoint(state_dict={}, n_features=3, hidden_layers=[2], use_leaky_relu=True, dropout=0.0,
                   feature_mean=np.zeros(2), feature_scale=np.ones(3), target_mean=0.0,
                   target_std=1.0).save(tmp_path / "x.pth")


def test_describe_device_on_cpu():
    assert describe_device(CPU) == "cpu"


# ---------------------------------------------------------------- fused groups (phase 2)


def _group_requests(tmp_path: Path) -> list[TrainRequest]:
    sizes = [(130, 40), (117, 53), (101, 35)]
    reqs = []
    for i, (n_tr, n_va) in enumerate(sizes):
        path = npz(tmp_path / f"fold{i}.npz", **arrays(seed=20 + i, n_train=n_tr, n_val=n_va))
        params = {"epochs": 30, "learning_rate": (5e-2, 2e-2, 5e-3)[i], "dropout": (0.0, 0.2, 0.4)[i],
                  "weight_decay": (0.0, 1e-3, 1e-2)[i], "early_stopping_patience": (2, 3, 0)[i],
                  "gradient_clip": (1.0, 0.5, 0.0)[i], "input_dropout": (0.2, 0.0, 0.1)[i],
                  "input_sparsity": (0.0, 0.02, 0.1)[i]}
        reqs.append(request(path, params=params, fold_idx=i, job_id=f"t7-f{i}", seed=100 + i, batch_mode="mini"))
    return reqs


def test_fold_group_equals_separate_jobs(tmp_path):
    reqs = _group_requests(tmp_path)
    fused = run_fold_group(reqs, device=CPU)
    assert [r["job_id"] for r in fused] == ["t7-f0", "t7-f1", "t7-f2"]
    for got, req in zip(fused, reqs):
        alone = run_train_job(req, device=CPU)
        assert set(got) == set(alone)
        assert (got["epochs_run"], got["best_epoch"], got["fold_idx"]) == (
            alone["epochs_run"], alone["best_epoch"], alone["fold_idx"])
        for k in ("r2", "val_mse", "train_mse", "train_r2"):
            assert math.isclose(got[k], alone[k], rel_tol=1e-5, abs_tol=1e-9), (k, got[k], alone[k])
    assert len({r["epochs_run"] for r in fused}) > 1, "early stopping should fire at different epochs"


def test_fold_group_isolates_a_bad_fold(tmp_path):
    reqs = _group_requests(tmp_path)
    bad = request(str(tmp_path / "absent.npz"), fold_idx=9, job_id="bad", batch_mode="mini",
                  params=dict(reqs[0].params.to_dict()))
    out = run_fold_group([reqs[0], bad, reqs[2]], device=CPU)
    assert [o["status"] for o in out] == ["complete", "error", "complete"]
    assert out[1]["error_type"] == "data_error" and out[1]["job_id"] == "bad" and out[1]["fold_idx"] == 9
    alone = run_train_job(reqs[2], device=CPU)
    assert math.isclose(out[2]["r2"], alone["r2"], rel_tol=1e-5)


def test_fold_group_with_different_feature_counts_trains_in_separate_passes(tmp_path):
    reqs = _group_requests(tmp_path)[:2]
    wide = npz(tmp_path / "wide.npz", **arrays(seed=3, d=9))
    reqs.append(request(wide, batch_mode="mini", params=dict(reqs[0].params.to_dict()), job_id="wide"))
    out = run_fold_group(reqs, device=CPU)
    assert [o["status"] for o in out] == ["complete"] * 3
    alone = run_train_job(reqs[2], device=CPU)
    assert math.isclose(out[2]["r2"], alone["r2"], rel_tol=1e-5)


def test_batch_size_splits_a_group_only_in_mini_batch_mode(tmp_path):
    """Full-batch folds ignore batch_size, so they share a pass; mini-batch folds with other
    batch sizes train in separate passes. Either way each equals its lone run."""
    reqs = _group_requests(tmp_path)
    for mode in ("full", "mini"):
        group = [dataclasses.replace(r, batch_mode=mode,
                                     params=dataclasses.replace(r.params, batch_size=16 * (i + 1)))
                 for i, r in enumerate(reqs)]
        out = run_fold_group(group, device=CPU)
        for got, req in zip(out, group):
            alone = run_train_job(req, device=CPU)
            assert (got["r2"], got["epochs_run"]) == (alone["r2"], alone["epochs_run"]), (mode, req.job_id)


def test_fold_group_rejects_unfusable_requests(tmp_path):
    reqs = _group_requests(tmp_path)
    other = request(reqs[1].data_path, batch_mode="mini", params={"hidden_layers": [4]}, job_id="x")
    with pytest.raises(ValueError, match="hidden_layers"):
        run_fold_group([reqs[0], other], device=CPU)
    assert run_fold_group([], device=CPU) == []


def test_fold_group_out_of_memory_retries_models_one_at_a_time(tmp_path, monkeypatch):
    reqs = _group_requests(tmp_path)
    real = job_module.train_models

    def oom_when_fused(config, specs, folds, *, device):
        if len(specs) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(config, specs, folds, device=device)

    monkeypatch.setattr(job_module, "train_models", oom_when_fused)
    out = run_fold_group(reqs, device=CPU)
    assert [o["status"] for o in out] == ["complete"] * 3
    monkeypatch.setattr(job_module, "train_models", real)
    assert out[1]["r2"] == run_train_job(reqs[1], device=CPU)["r2"]


def test_learns_the_planted_signal_of_the_sample_generator(sample_inputs, tmp_path):
    table = load_survivors(sample_inputs[0])
    (train_idx, val_idx), = kfold_splits(len(table.y), 5, seed=0)[:1]
    path = write_fold_npz(tmp_path / "sample.npz", table.X[train_idx], table.y[train_idx], table.X[val_idx],
                          table.y[val_idx], feature_names=table.feature_names)
    req = request(str(path), batch_mode="mini", params={
        "hidden_layers": [32, 16], "epochs": 40, "learning_rate": 5e-3, "dropout": 0.1, "batch_size": 64,
        "early_stopping_patience": 8})
    res = run_train_job(req, device=CPU)
    assert res["r2"] > 0.3, res


def test_the_validation_rows_only_score_the_fold(tmp_path):
    """Early stopping decides on a seeded slice of the training rows: other validation
    targets change the reported R^2 but not one step of the training."""
    base = arrays(seed=3)
    other = dict(base, y_val=(base["y_val"][::-1] * 3.0 + 1.0).astype(np.float32))
    params = {"epochs": 40, "early_stopping_patience": 2}
    a = run_train_job(request(npz(tmp_path / "a.npz", **base), params=params), device=CPU)
    b = run_train_job(request(npz(tmp_path / "b.npz", **other), params=params), device=CPU)
    assert a["epochs_run"] < 40  # it did stop early
    assert (a["epochs_run"], a["best_epoch"], a["train_mse"]) == (b["epochs_run"], b["best_epoch"], b["train_mse"])
    assert a["r2"] != b["r2"]


def test_the_early_stopping_slice_is_seeded_disjoint_and_leaves_rows_to_fit():
    fit, stop = job_module.early_stopping_split(120, seed=5)
    assert len(stop) == 24 and len(fit) == 96 and not set(fit) & set(stop)
    assert sorted([*fit, *stop]) == list(range(120))
    again = job_module.early_stopping_split(120, seed=5)
    assert all(np.array_equal(x, y) for x, y in zip((fit, stop), again))
    assert not np.array_equal(job_module.early_stopping_split(120, seed=6)[1], stop)
    assert [len(p) for p in job_module.early_stopping_split(3, seed=0)] == [2, 1]


def test_patience_zero_fits_every_training_row_for_exactly_the_epochs(tmp_path):
    path = npz(tmp_path / "f.npz", **arrays())
    res = run_train_job(request(path, params={"epochs": 7, "early_stopping_patience": 0}), device=CPU)
    assert res["n_train"] == 120 and res["epochs_run"] == res["best_epoch"] == 7  # the last weights, no selection


def test_a_checkpoint_the_filesystem_refuses_says_why_and_leaves_nothing(tmp_path, file_size_limit):
    """torch's own writer reports a full disk as "unexpected pos ..."; the checkpoint is
    serialised first, so the write fails with the OSError that says why."""
    path = npz(tmp_path / "f.npz", **arrays())
    out = tmp_path / "fold_states" / "fold_2.pth"
    out.parent.mkdir()
    trained = run_train_job(request(path, save_model_path=str(tmp_path / "ok.pth"),
                                    params={"hidden_layers": [256, 128]}), device=CPU)
    checkpoint = load_checkpoint(trained["model_path"])
    size = (tmp_path / "ok.pth").stat().st_size
    for limit in (512, 4096, 8192, size // 2, size - 100):  # where torch's writer fails depends on the cut
        with file_size_limit(limit), pytest.raises(OSError) as caught:
            checkpoint.save(out)
        assert caught.value.errno == errno.EFBIG, limit
        assert list(out.parent.iterdir()) == []  # no partial checkpoint, no temp file

    def refused(self, target):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpoint, "save", refused)
        with pytest.raises(JobError) as job_error:
            run_train_job(request(path, save_model_path=str(out)), device=CPU)
    assert (job_error.value.error_type, job_error.value.message) == (
        "train_error", f"cannot write checkpoint {out}: no space left on the device")
