"""The final NN: K fold models merged into one MLP of the checkpoint layout (step5.nn.ensemble)."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from step5.data.splits import kfold_splits, write_fold_npz
from step5.errors import DataError
from step5.jsonio import dumps
from step5.launch import ONESHOT_MODULE, child_environment, module_command
from step5.nn.checkpoint import Checkpoint, load_checkpoint
from step5.nn.ensemble import build_ensemble, merge_models
from step5.nn.job import run_train_job
from step5.nn.model import ReferenceMLP
from step5.protocol import MergeRequest, NNParams, TrainRequest

PARAMS = dict(hidden_layers=[6, 4], learning_rate=0.01, dropout=0.1, input_dropout=0.1, epochs=15,
              weight_decay=1e-4, optimizer="adam", batch_size=64, early_stopping_patience=4, gradient_clip=1.0)


def _data(n: int = 120, d: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Columns on very different scales and offsets, so each fold's scaler differs from the merged one.
    X = rng.normal(size=(n + 30, d)) * np.array([1.0, 10.0, 0.1, 3.0, 50.0])[:d] + np.arange(d) * 7.0
    y = X[:, 0] - 0.2 * X[:, 1] + 5.0 * X[:, 2] + rng.normal(scale=0.5, size=n + 30) + 100.0
    return X[:n], y[:n], X[n:], y[n:]


def _fold_models(tmp_path: Path, *, leaky: bool = True, normalize: bool = True, k: int = 3,
                 **params: object) -> tuple[list[Path], Path]:
    X, y, X_test, y_test = _data()
    paths = []
    for f, (tr, va) in enumerate(kfold_splits(len(y), k, 5)):
        data = write_fold_npz(tmp_path / f"fold_{f}.npz", X[tr], y[tr], X[va], y[va])
        ckpt = tmp_path / f"fold_{f}" / "best_model.pth"
        ckpt.parent.mkdir()
        request = TrainRequest(data_path=str(data), params=NNParams.from_dict({**PARAMS, **params}),
                               seed=100 + f,
                               use_leaky_relu=leaky, normalize_features=normalize, save_model_path=str(ckpt))
        assert run_train_job(request, device=torch.device("cpu"))["status"] == "complete"
        paths.append(ckpt)
    final = write_fold_npz(tmp_path / "final.npz", X, y, X_test, y_test, X_test=X_test, y_test=y_test)
    return paths, final


@pytest.mark.parametrize("leaky,normalize", [(True, True), (False, False)])
def test_the_merged_net_predicts_the_mean_of_the_fold_models(tmp_path, leaky, normalize):
    folds, final = _fold_models(tmp_path, leaky=leaky, normalize=normalize)
    out = tmp_path / "best_model.pth"
    result = build_ensemble(folds, out, score_path=final)

    merged, models = load_checkpoint(out), [load_checkpoint(p) for p in folds]
    assert merged.hidden_layers == (18, 12)  # three models of (6, 4) side by side
    assert merged.normalize_features is normalize and merged.use_leaky_relu is leaky
    X = np.random.default_rng(3).normal(size=(50, 5)) * 20.0  # rows none of them saw, far out too
    expected = np.mean([m.predict(X) for m in models], axis=0)
    np.testing.assert_allclose(merged.predict(X), expected, rtol=1e-5, atol=1e-4)
    # Every hidden Linear keeps the zero bias of the layout (BatchNorm's shift plays its role).
    payload = torch.load(out, weights_only=True)
    assert all(not v.any() for n, v in payload["state_dict"].items() if n in ("network.0.bias", "network.4.bias"))
    assert payload["training"]["final_model"] == "fold_ensemble"
    assert payload["training"]["fold_seeds"] == [100, 101, 102]
    assert payload["config"]["hidden_layers"] == [6, 4]  # the hyperparameters each model trained with

    _, _, X_test, y_test = _data()
    from sklearn.metrics import r2_score

    fold_mean = np.mean([m.predict(X_test) for m in models], axis=0)
    assert result["test_r2"] == pytest.approx(r2_score(y_test, fold_mean), abs=1e-6)
    assert result["models"] == 3 and result["hidden_layers"] == [18, 12]


def test_the_merged_checkpoint_loads_strictly_into_the_step6_layout(tmp_path):
    folds, final = _fold_models(tmp_path, k=2)
    out = tmp_path / "best_model.pth"
    build_ensemble(folds, out, score_path=final)
    payload = torch.load(out, weights_only=True)
    net = ReferenceMLP(payload["input_dim"], payload["hidden_layers"],
                              use_leaky_relu=payload["use_leaky_relu"], dropout=payload["dropout"])
    net.load_state_dict(payload["state_dict"])  # strict: same keys and shapes as any checkpoint


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_fold_models_merge_into_one_linear_model(tmp_path, normalize):
    """No hidden layer: the K heads read the inputs, each through its own fold's scaler, and
    add up to a single Linear(D, 1) that Step 6 rebuilds as nn.Sequential(Linear)."""
    # Adam moves each weight by about the learning rate per step; with no hidden layer to
    # help, reaching the coefficients takes a larger rate or more epochs than PARAMS has.
    folds, final = _fold_models(tmp_path, normalize=normalize, hidden_layers=[], learning_rate=0.1, epochs=60)
    out = tmp_path / "best_model.pth"
    result = build_ensemble(folds, out, score_path=final)

    merged, models = load_checkpoint(out), [load_checkpoint(p) for p in folds]
    assert merged.hidden_layers == () and result["hidden_layers"] == []
    X = np.random.default_rng(4).normal(size=(50, 5)) * 20.0
    np.testing.assert_allclose(merged.predict(X), np.mean([m.predict(X) for m in models], axis=0),
                               rtol=1e-5, atol=1e-4)
    payload = torch.load(out, weights_only=True)
    assert {n: tuple(v.shape) for n, v in payload["state_dict"].items()} == {
        "network.0.weight": (1, 5), "network.0.bias": (1,)}
    net = ReferenceMLP(5, [], use_leaky_relu=True, dropout=0.0)
    net.load_state_dict(payload["state_dict"])
    assert isinstance(net.network, torch.nn.Sequential) and len(net.network) == 1
    # The planted linear signal is there to be found, on standardised inputs (raw columns
    # 500 times apart in scale are the reason the option exists).
    assert result["test_r2"] > 0.9 or not normalize


def test_models_of_different_inputs_are_refused():
    a = ReferenceMLP(3, [4], use_leaky_relu=True, dropout=0.0)
    b = ReferenceMLP(4, [4], use_leaky_relu=True, dropout=0.0)

    def loaded(module, d):
        return Checkpoint(module.state_dict(), d, (4,), True, 0.0, np.zeros(d), np.ones(d), 0.0, 1.0, module=module)

    with pytest.raises(ValueError, match="model 1 cannot be merged"):
        merge_models([loaded(a, 3), loaded(b, 4)])
    with pytest.raises(ValueError, match="at least one model"):
        merge_models([])


def test_a_score_file_that_does_not_fit_the_models_is_a_data_error_naming_it(tmp_path):
    # A score file of other feature columns failed in predict, as a train_error
    # "ValueError: X must have shape (n, 5), got (120, 3)" naming no file.
    folds, final = _fold_models(tmp_path, k=2)
    X, y, X_test, y_test = _data()
    narrow = write_fold_npz(tmp_path / "narrow.npz", X[:, :3], y, X_test[:, :3], y_test, X_test=X_test[:, :3],
                            y_test=y_test)
    with pytest.raises(DataError, match=f"{narrow} has 3 feature columns but the fold models .* read 5"):
        build_ensemble(folds, tmp_path / "out.pth", score_path=narrow)
    no_test = write_fold_npz(tmp_path / "no_test.npz", X, y, X_test, y_test)
    with pytest.raises(DataError, match="no X_test / y_test"):
        build_ensemble(folds, tmp_path / "out.pth", score_path=no_test)
    assert not (tmp_path / "out.pth").exists()


def test_fold_models_of_different_depths_are_a_data_error_naming_the_files(tmp_path):
    # merge_models' ValueError reached the worker as a train_error ("ValueError: model 1 cannot be merged
    # with model 0 ...") naming no file, where a score file that does not fit was already a data_error.
    (tmp_path / "deep").mkdir(), (tmp_path / "shallow").mkdir()
    deep, final = _fold_models(tmp_path / "deep", k=2)
    shallow, _ = _fold_models(tmp_path / "shallow", k=2, hidden_layers=[6])
    with pytest.raises(DataError, match=f"{shallow[1]} cannot be merged with {deep[0]}: .*depth"):
        build_ensemble([deep[0], shallow[1]], tmp_path / "out.pth", score_path=final)
    assert not (tmp_path / "out.pth").exists()


def test_a_holdout_row_far_outside_the_training_range_does_not_fail_a_correct_merge(tmp_path, monkeypatch):
    # One test row with a feature 1e6 (the column's scale is 10) made the fold models predict far from the
    # target; float32 rounds relative to that, and the check, relative to the target's std only, refused the
    # correct merge at the end of the run: "the merged net does not reproduce the mean ... (worst difference
    # 2.86e-03 target std > 0.0001)".
    folds, _ = _fold_models(tmp_path, k=2)
    X, y, X_test, y_test = _data()
    X_test[3, 1] = 1e6
    score = write_fold_npz(tmp_path / "outlier.npz", X, y, X_test, y_test, X_test=X_test, y_test=y_test)
    assert build_ensemble(folds, tmp_path / "out.pth", score_path=score)["status"] == "complete"
    # A wrong merge is still refused: its error is of the target's scale on ordinary rows.
    from step5.nn import ensemble

    merge = ensemble.merge_models

    def off_by_a_tenth(*args, **kwargs):
        merged = merge(*args, **kwargs)
        merged.target_mean += 0.1 * merged.target_std
        return merged

    monkeypatch.setattr(ensemble, "merge_models", off_by_a_tenth)
    with pytest.raises(ValueError, match="does not reproduce the mean"):
        build_ensemble(folds, tmp_path / "wrong.pth", score_path=score)


def test_the_one_shot_trainer_answers_a_merge_with_one_json_line_and_names_a_missing_checkpoint(tmp_path,
                                                                                             file_size_limit):
    """A ``merge`` request runs where torch already is: here the one-shot trainer (a worker
    serving one job); the parent never imports torch."""
    folds, final = _fold_models(tmp_path, k=2)
    out = tmp_path / "best_model.pth"

    def run(paths, preexec_fn=None) -> subprocess.CompletedProcess:
        request = MergeRequest(tuple(map(str, paths)), str(out), str(final), trial_number=3, job_id="t3-merge")
        return subprocess.run([*module_command(ONESHOT_MODULE), "--request", "-"], input=dumps(request.to_dict()),
                              capture_output=True, env=child_environment(), timeout=120, preexec_fn=preexec_fn)

    refused = run(folds, preexec_fn=file_size_limit.child(1024))  # as a full disk refuses the merged model
    assert refused.returncode == 1 and not out.exists()
    (line,) = refused.stdout.decode().splitlines()
    assert json.loads(line) | {"pid": None} == {
        "status": "error", "error_type": "train_error", "trial_number": 3, "fold_idx": None, "job_id": "t3-merge",
        "error": f"cannot write the merged model {out}: file too large (a file size limit)", "pid": None}

    ok = run(folds)
    assert ok.returncode == 0, ok.stderr.decode()[-2000:]
    (line,) = ok.stdout.decode().splitlines()
    reply = json.loads(line)
    assert (reply["status"], reply["job_id"], reply["trial_number"], reply["models"]) == ("complete", "t3-merge", 3, 2)
    assert reply["model_path"] == str(out) and reply["hidden_layers"] == [12, 8] == list(load_checkpoint(out).hidden_layers)

    missing = tmp_path / "nowhere" / "best_model.pth"
    bad = run([folds[0], missing])
    assert bad.returncode == 1
    (line,) = bad.stdout.decode().splitlines()
    error = json.loads(line)
    assert error["status"] == "error" and error["error_type"] == "data_error" and str(missing) in error["error"]
    assert error["job_id"] == "t3-merge"
