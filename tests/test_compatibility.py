"""Drop-in for the existing pipeline (docs/compatibility.md): its optimizer flags, its
WATCHER manifest's params, and its Step 6 loading our model files and sidecar.

The "existing Step 6" below is written from the description of how that loader works
(issue 18), not from this project's code: it rebuilds the network itself, loads the
state dict strictly, and applies the scalers itself. If this project's checkpoint layout
drifts from it, these tests fail.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from step5.data.survivors import load_feature_matrix
from step5.launch import module_command
from step5.models import trees
from step5.optimizer.cli import build_parser, config_from_args
from step5.predictor import load_predictor
from step5.watcher.steps import build_command, get_step, validate_params

REPO = Path(__file__).resolve().parents[1]
OPTIMIZER = REPO / "meta_prediction_optimizer_anti_overfit.py"
WATCHER = REPO / "agents" / "watcher_agent.py"

#: What the existing Step 6 reads from the sidecar.
STEP6_SIDECAR_KEYS = ("model_type", "checkpoint_path", "feature_schema", "signal_quality", "data_context",
                      "agent_metadata")

#: The existing WATCHER manifest's default params for step 5 (values made small for a test).
MANIFEST_DEFAULTS = {
    "compare_models": False, "trials": 2, "output_dir": "models/reinforcement", "enable_diagnostics": True,
    "model_type": "neural_net", "persistent_workers": True, "enable_vmap": True, "k_folds": 2,
}


# ----------------------------------------------------------------- the existing Step 6, as described


class SurvivorQualityNet(nn.Module):
    """Per hidden layer Linear (with bias) -> BatchNorm1d -> ReLU or LeakyReLU(0.01) -> Dropout,
    then a Linear to one output, held in an ``nn.Sequential`` under ``network``."""

    def __init__(self, input_size: int, hidden_layers: list[int], dropout: float, use_leaky_relu: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = input_size
        for width in hidden_layers:
            layers += [nn.Linear(prev, width), nn.BatchNorm1d(width),
                       nn.LeakyReLU(0.01) if use_leaky_relu else nn.ReLU(), nn.Dropout(dropout)]
            prev = width
        layers.append(nn.Linear(prev, 1))
        self.network = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x).squeeze(-1)


def existing_step6_predict(checkpoint: Path, X: np.ndarray) -> np.ndarray:
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    feature_count = ckpt.get("feature_count") or ckpt.get("input_dim")
    if feature_count is None:
        raise ValueError("Checkpoint missing feature_count")
    config = ckpt["config"]
    assert isinstance(config, dict)
    config["hidden_layers"] = ckpt["hidden_layers"]  # the existing loader writes into it
    net = SurvivorQualityNet(feature_count, ckpt["hidden_layers"], ckpt["dropout"], ckpt["use_leaky_relu"])
    net.load_state_dict(ckpt.get("state_dict") or ckpt.get("model_state_dict"), strict=True)
    net.eval()
    X = np.asarray(X, dtype=np.float64)
    if ckpt["normalize_features"]:
        X = (X - np.asarray(ckpt["scaler_mean"])) / np.asarray(ckpt["scaler_scale"])
    with torch.no_grad():
        z = net(torch.as_tensor(X, dtype=torch.float32)).numpy().astype(np.float64)
    return z * ckpt["y_std"] + ckpt["y_mean"]


def assert_step6_reads(model_dir: Path, survivors: Path) -> dict:
    """The existing Step 6 loads the model dir's checkpoint and predicts what our predictor does."""
    sidecar = json.loads((model_dir / "best_model.meta.json").read_text())
    for key in STEP6_SIDECAR_KEYS:
        assert key in sidecar, key
    meta = sidecar["agent_metadata"]
    assert meta == {"pipeline_step": 5, "pipeline_step_name": "anti_overfit_training",
                    "run_id": sidecar["provenance"]["run_id"],
                    "parent_run_id": sidecar["provenance"]["parent_run_id"]}
    names = sidecar["feature_schema"]["feature_names"]
    X = load_feature_matrix(survivors, names)  # plain float32, schema order
    theirs = existing_step6_predict(model_dir / sidecar["checkpoint_path"], X)
    ours = load_predictor(model_dir).predict(X)
    assert np.std(ours) > 0  # a real model, not a constant
    np.testing.assert_allclose(theirs, ours, rtol=1e-5, atol=1e-6)
    return sidecar


# ----------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def manifest_run(sample_inputs, tmp_path_factory):
    """The WATCHER running the real step 5 with the existing manifest's default params."""
    work = tmp_path_factory.mktemp("manifest")
    policy = json.loads((REPO / "watcher_policies.json").read_text())
    policy["watcher"].update({"step_timeout_s": 250, "kill_grace_s": 5, "max_retries": 0})
    (work / "policy.json").write_text(json.dumps(policy))
    survivors, history = sample_inputs
    params = {"survivors": str(survivors), "lottery_data": str(history), **MANIFEST_DEFAULTS}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(WATCHER), "--run-pipeline", "--start-step", "5", "--end-step", "5",
         "--params", json.dumps(params), "--policy", "policy.json"],
        cwd=work, env=env, capture_output=True, text=True, timeout=280,
    )
    return work, proc


@pytest.fixture(scope="module")
def existing_flags_run(sample_inputs, tmp_path_factory):
    """The optimizer run with the existing optimizer's flags, spelled its way."""
    out = tmp_path_factory.mktemp("flags") / "models"
    survivors, history = sample_inputs
    cmd = [sys.executable, str(OPTIMIZER), "--survivors", str(survivors), "--lottery-data", str(history),
           "--model-type", "neural_net", "--trials", "2", "--k-folds", "2", "--test-holdout", "0.2",
           "--output-dir", str(out), "--seed", "3", "--policy", str(REPO / "watcher_policies.json"),
           "--persistent-workers", "--device", "cpu", "--enable-vmap", "--allow-inline-nn-fallback",
           "--normalize-features", "--no-use-leaky-relu", "--dropout-override", "0.1", "--batch-size-nn", "2",
           "--nn-max-epochs", "40", "--parent-run-id", "pipeline-7"]
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=280)
    return out, proc


@pytest.mark.slow
def test_manifest_default_params_run_through_the_watcher(manifest_run, sample_inputs):
    work, proc = manifest_run
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Two trials on tiny data may or may not pass the acceptance rules; either way the run
    # started, wrote a valid sidecar and was judged on it.
    assert result["decision"] in ("PROCEED", "SKIP_MODEL"), proc.stderr[-3000:]
    decision = json.loads((work / "diagnostics_outputs" / "watcher_decisions.jsonl").read_text().splitlines()[-1])
    assert "--enable-vmap" in decision["command"] and "--persistent-workers" in decision["command"]
    sidecar = assert_step6_reads(work / "models" / "reinforcement", sample_inputs[0])
    # Step 6 takes agent_metadata.run_id as its parent for lineage; the WATCHER's run is ours.
    assert sidecar["agent_metadata"]["parent_run_id"] == decision["run_id"]
    assert sidecar["execution"]["search"]["fuse_folds"] is True  # enable_vmap meant --fuse-folds


@pytest.mark.slow
def test_existing_optimizer_flags_run_with_their_meaning(existing_flags_run, sample_inputs):
    out, proc = existing_flags_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--allow-inline-nn-fallback does not apply" in proc.stderr
    sidecar = assert_step6_reads(out, sample_inputs[0])
    assert sidecar["agent_metadata"]["parent_run_id"] == "pipeline-7"
    assert sidecar["hyperparameters"]["dropout"] == 0.1  # --dropout-override fixed it
    assert all(d.startswith("CPU-") for d in sidecar["execution"]["devices"])  # --device cpu
    assert sidecar["execution"]["search"]["fuse_folds"] is True  # --enable-vmap
    assert sidecar["execution"]["search"]["fuse_trials"] is True  # --batch-size-nn 2
    assert sidecar["execution"]["search"]["trials_in_flight"] == 2  # --batch-size-nn 2 implies B = 2
    ckpt = torch.load(out / "best_model.pth", weights_only=True)
    assert ckpt["use_leaky_relu"] is False and ckpt["normalize_features"] is True


@pytest.mark.parametrize("hidden", [[8, 4], []], ids=["mlp", "linear"])
def test_a_net_trained_with_input_dropout_loads_strictly_in_the_existing_step6(tmp_path, hidden):
    """Input dropout and input sparsity are training-only: no module, no key, no index shift
    in ``network.N``; a linear model (no hidden layer) is ``network.0`` alone there too."""
    from step5.nn.checkpoint import load_checkpoint
    from step5.nn.job import run_train_job
    from step5.protocol import TrainRequest

    rng = np.random.default_rng(0)
    X = rng.normal(size=(160, 6)).astype(np.float32)
    y = (X[:, 0] - 0.5 * X[:, 1] + 0.1 * rng.normal(size=160)).astype(np.float32)
    data = tmp_path / "fold.npz"
    np.savez(data, X_train=X[:120], y_train=y[:120], X_val=X[120:], y_val=y[120:])
    ckpt = tmp_path / "best_model.pth"
    run_train_job(TrainRequest.from_dict({
        "X_train_path": str(data), "save_model_path": str(ckpt), "seed": 1,
        "params": {"hidden_layers": hidden, "epochs": 10, "input_dropout": 0.25, "dropout": 0.1,
                   "input_sparsity": 0.01, "learning_rate": 0.01}}),
        device=torch.device("cpu"))
    theirs = existing_step6_predict(ckpt, X)  # strict load_state_dict inside
    np.testing.assert_allclose(theirs, load_checkpoint(ckpt).predict(X), rtol=1e-5, atol=1e-6)
    assert np.std(theirs) > 0


def test_manifest_params_and_bounds_build_a_command_step5_accepts():
    """Every param of the existing manifest (defaults and declared bounds) maps to a flag with its meaning."""
    step = get_step(5)
    params = {**MANIFEST_DEFAULTS, "normalize_features": False, "use_leaky_relu": False, "dropout": 0.25,
              "dropout_override": 0.25, "batch_size_nn": 4, "survivors": "s.json", "lottery_data": "h.json"}
    argv = build_command(step, validate_params(step, params), policy_path="p.json", python="py")
    argv = argv[len(module_command(step.module, "py")):]
    config = config_from_args(build_parser().parse_args(argv), argv)
    assert (config.trials, config.k_folds, config.model_type, config.compare_models) == (2, 2, "neural_net", False)
    assert config.output_dir == Path("models/reinforcement") and config.enable_diagnostics
    assert config.persistent_workers is True and config.fuse_folds is True and config.fuse_trials == 4
    assert (config.normalize_features, config.use_leaky_relu, config.dropout) == (False, False, 0.25)
    assert str(config.survivors) == "s.json" and str(config.lottery_data) == "h.json"


def test_a_key_that_means_nothing_is_still_refused():
    from step5.errors import UsageError

    with pytest.raises(UsageError, match="unknown --params key `reinforce_weight`"):
        validate_params(get_step(5), {"reinforce_weight": 0.5})


@pytest.mark.parametrize("model_type", ["xgboost", "lightgbm", "catboost"])
def test_tree_models_load_natively_and_predict_on_a_plain_array(model_type, tmp_path):
    """As the existing Step 6 loads them: the library's own loader, a float32 array in schema order."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 5)).astype(np.float32)
    y = 0.3 * X[:, 0] - 0.2 * X[:, 3] + 0.05 * rng.normal(size=240)
    _, model = trees.train_fold(model_type, _small_params(model_type), X[:180], y[:180], X[180:], y[180:], seed=1,
                                feature_names=[f"f{i}" for i in range(5)])
    path = trees.save_model(model, model_type, tmp_path / trees.checkpoint_name(model_type))
    if model_type == "xgboost":
        import xgboost as xgb

        booster = xgb.Booster()
        booster.load_model(str(path))
        theirs = booster.predict(xgb.DMatrix(X))
    elif model_type == "lightgbm":
        import lightgbm as lgb

        theirs = lgb.Booster(model_file=str(path)).predict(X)
    else:
        from catboost import CatBoostRegressor

        theirs = CatBoostRegressor().load_model(str(path)).predict(X)
    ours = trees.load_model(path, model_type)
    assert ours.feature_names == [f"f{i}" for i in range(5)]  # kept for the schema check
    np.testing.assert_allclose(theirs, ours.predict(X), rtol=1e-6, atol=1e-7)


def _small_params(model_type: str) -> dict:
    common = {"n_estimators": 40, "early_stopping_rounds": 10, "learning_rate": 0.1}
    return {
        "xgboost": {**common, "max_depth": 3, "min_child_weight": 1.0, "subsample": 1.0, "colsample_bytree": 1.0,
                    "reg_alpha": 0.0, "reg_lambda": 1.0},
        "lightgbm": {**common, "num_leaves": 8, "max_depth": 3, "min_data_in_leaf": 5, "bagging_fraction": 1.0,
                     "bagging_freq": 0, "feature_fraction": 1.0, "lambda_l1": 0.0, "lambda_l2": 0.0},
        "catboost": {**common, "depth": 3, "l2_leaf_reg": 3.0, "random_strength": 1.0, "bagging_temperature": 0.0},
    }[model_type]
