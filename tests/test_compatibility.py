"""Drop-in for the existing pipeline (docs/compatibility.md), checked against contracts read
from that pipeline's own code (mmercalde/prng_cluster_public). Each contract below names
the file and function it was read from; the readers here are written from that reading,
not copied, and not from this project's code, so a drift on either side fails a test.

The pipeline's code itself was run on this project's outputs outside the repository (its
WATCHER running step 5 and Step 6); docs/compatibility.md says how and what it printed.
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

from step5.artifacts import checkpoint_filename
from step5.launch import module_command
from step5.models import trees
from step5.optimizer.cli import build_parser, config_from_args
from step5.predictor import load_predictor
from step5.watcher.steps import build_command, get_step, validate_params

REPO = Path(__file__).resolve().parents[1]
OPTIMIZER = REPO / "meta_prediction_optimizer_anti_overfit.py"
WATCHER = REPO / "agents" / "watcher_agent.py"

#: agent_manifests/reinforcement.json `default_params`, as the pipeline ships them.
PIPELINE_MANIFEST_DEFAULTS = {
    "survivors": "survivors_with_scores.json", "lottery_data": "train_history.json", "compare_models": True,
    "trials": 20, "output_dir": "models/reinforcement", "enable_diagnostics": True, "model_type": "catboost",
    "persistent_workers": False, "enable_vmap": True, "k_folds": 20,
}
#: The same keys, with values small enough for a test, for the WATCHER run below.
MANIFEST_DEFAULTS = {
    "compare_models": False, "trials": 2, "output_dir": "models/reinforcement", "enable_diagnostics": True,
    "model_type": "neural_net", "persistent_workers": True, "enable_vmap": True, "k_folds": 2,
}


# ------------------------------------------------------------ the existing Step 6, as read
# models/wrappers/neural_net_wrapper.py::SurvivorQualityNet / NeuralNetWrapper.load / predict,
# models/model_factory.py::load_model_from_sidecar, prediction_generator.py::
# PredictionGenerator.__init__ / _load_nn_scaler / _build_prediction_pool.


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


def existing_network(checkpoint: Path) -> tuple[nn.Module, dict]:
    """NeuralNetWrapper.load: architecture from the checkpoint's keys, state dict loaded strictly."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    feature_count = ckpt.get("feature_count") or ckpt.get("input_dim")
    if feature_count is None:
        raise ValueError("Checkpoint missing feature_count")
    config = ckpt.get("config", {})
    config["hidden_layers"] = ckpt.get("hidden_layers", [256, 128, 64])  # the loader writes into it
    net = SurvivorQualityNet(feature_count, config["hidden_layers"], ckpt.get("dropout", 0.3),
                             ckpt.get("use_leaky_relu", False))
    net.load_state_dict(ckpt.get("state_dict") or ckpt.get("model_state_dict"), strict=True)
    net.eval()
    return net, ckpt


def existing_checkpoint_lookup(models_dir: Path, sidecar: dict) -> Path:
    """load_model_from_sidecar: checkpoint_path as written, else its name in models_dir."""
    path = Path(sidecar["checkpoint_path"])
    if path.exists():
        return path
    alt = models_dir / path.name
    if not alt.exists():
        raise FileNotFoundError(f"Checkpoint not found: {path}; also tried {alt}")
    return alt


def existing_scaler(sidecar: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """_load_nn_scaler: opens checkpoint_path *as written* (relative to the working directory),
    and "proceeds without scaler" when it is not there -- the silent misprediction."""
    path = sidecar.get("checkpoint_path")
    if not path or not Path(path).exists():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not ckpt.get("normalize_features", False):
        return None
    mean = np.asarray(ckpt["scaler_mean"], dtype=np.float32)
    scale = np.asarray(ckpt["scaler_scale"], dtype=np.float32)
    scale[scale < 1e-12] = 1.0
    return mean, scale


def existing_feature_rows(records: list[dict], feature_names: list[str]) -> np.ndarray:
    """_build_prediction_pool: one row per survivor in the sidecar's feature order, 0.0 for a
    missing key, float32."""
    return np.array([[float(r.get("features", {}).get(n, 0.0)) for n in feature_names] for r in records],
                    dtype=np.float32)


def existing_step6_predict(models_dir: Path, records: list[dict]) -> tuple[np.ndarray, bool]:
    """What the existing Step 6 predicts for these survivor records, and whether it found the scaler."""
    sidecar = json.loads((models_dir / "best_model.meta.json").read_text())
    fs = sidecar["feature_schema"]
    X = existing_feature_rows(records, fs.get("per_seed_feature_names", fs.get("feature_names", [])))
    checkpoint = existing_checkpoint_lookup(models_dir, sidecar)
    if sidecar["model_type"] != "neural_net":
        return trees.load_model(checkpoint, sidecar["model_type"]).predict(X), True
    scaler = existing_scaler(sidecar)
    if scaler is not None:
        X = (X - scaler[0]) / scaler[1]
    net, ckpt = existing_network(checkpoint)
    with torch.no_grad():
        out = net(torch.as_tensor(X, dtype=torch.float32)).numpy()
    if ckpt.get("y_mean") is not None:
        out = out * ckpt["y_std"] + ckpt["y_mean"]
    return out, scaler is not None or not ckpt.get("normalize_features", False)


def assert_step6_reads(models_dir: Path, survivors: Path, cwd: Path) -> dict:
    """From working directory ``cwd``, the existing Step 6 finds the scaler and predicts what
    our predictor predicts (max difference 1e-5)."""
    records = json.loads(survivors.read_text())[:100]
    sidecar = json.loads((models_dir / "best_model.meta.json").read_text())
    meta = sidecar["agent_metadata"]
    assert meta == {"pipeline_step": 5, "pipeline_step_name": "anti_overfit_training",
                    "run_id": sidecar["provenance"]["run_id"],
                    "parent_run_id": sidecar["provenance"]["parent_run_id"]}
    here = os.getcwd()
    os.chdir(cwd)
    try:
        theirs, scaled = existing_step6_predict(models_dir.resolve(), records)
    finally:
        os.chdir(here)
    assert scaled, "the existing Step 6 would proceed without the feature scaler"
    X = existing_feature_rows(records, sidecar["feature_schema"]["feature_names"])
    ours = load_predictor(models_dir).predict(X)
    assert np.std(ours) > 0  # a real model, not a constant
    assert np.max(np.abs(theirs - ours)) <= 1e-5
    return sidecar


# ------------------------------------------------------------ runs


@pytest.fixture(scope="module")
def manifest_run(sample_inputs, tmp_path_factory):
    """The WATCHER running the real step 5 with the manifest's default params (small values)."""
    work = tmp_path_factory.mktemp("manifest")
    policy = json.loads((REPO / "watcher_policies.json").read_text())
    policy["watcher"].update({"step_timeout_s": 250, "kill_grace_s": 5, "max_retries": 0})
    policy["training_diagnostics"]["severity_thresholds"]["critical"]["max_retries"] = 0
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
           "--nn-max-epochs", "40", "--parent-run-id", "pipeline-7", "--enable-diagnostics"]
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=280)
    return out, proc


@pytest.mark.slow
def test_manifest_default_params_run_through_the_watcher(manifest_run, sample_inputs, tmp_path):
    work, proc = manifest_run
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # Two trials on tiny data may or may not pass the acceptance rules; either way the run
    # started, wrote a valid sidecar and was judged on it.
    assert result["decision"] in ("PROCEED", "SKIP_MODEL"), proc.stderr[-3000:]
    decision = json.loads((work / "diagnostics_outputs" / "watcher_decisions.jsonl").read_text().splitlines()[-1])
    assert "--enable-vmap" in decision["command"] and "--persistent-workers" in decision["command"]
    models = work / "models" / "reinforcement"
    for cwd in (work, tmp_path):  # the pipeline root, and any other working directory
        sidecar = assert_step6_reads(models, sample_inputs[0], cwd)
    # Step 6 takes agent_metadata.run_id as its parent for lineage; the WATCHER's run is ours.
    assert sidecar["agent_metadata"]["parent_run_id"] == decision["run_id"]
    assert sidecar["execution"]["search"]["fuse_folds"] is True  # enable_vmap meant --fuse-folds


@pytest.mark.slow
def test_existing_optimizer_flags_run_with_their_meaning(existing_flags_run, sample_inputs):
    out, proc = existing_flags_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--allow-inline-nn-fallback does not apply" in proc.stderr
    sidecar = assert_step6_reads(out, sample_inputs[0], out.parent)
    assert sidecar["agent_metadata"]["parent_run_id"] == "pipeline-7"
    assert sidecar["hyperparameters"]["dropout"] == 0.1  # --dropout-override fixed it
    assert all(d.startswith("CPU-") for d in sidecar["execution"]["devices"])  # --device cpu
    assert sidecar["execution"]["search"]["fuse_folds"] is True  # --enable-vmap
    assert sidecar["execution"]["search"]["fuse_trials"] is True  # --batch-size-nn 2
    assert sidecar["execution"]["search"]["trials_in_flight"] == 2  # --batch-size-nn 2 implies B = 2
    ckpt = torch.load(out / "best_model.pth", weights_only=True)
    assert ckpt["use_leaky_relu"] is False and ckpt["normalize_features"] is True


@pytest.mark.slow
def test_a_moved_model_dir_still_predicts_with_its_own_scaler(existing_flags_run, sample_inputs, tmp_path):
    """After a copy, checkpoint_path still names the committed set it was written in: a set
    never changes, so the scaler read through it is the model's own (a moved-away original
    is what the existing Step 6 cannot follow; our predictor can)."""
    import shutil

    out, proc = existing_flags_run
    assert proc.returncode == 0
    copy = tmp_path / "copied"
    shutil.copytree(out, copy, symlinks=True)
    assert_step6_reads(copy, sample_inputs[0], tmp_path)


@pytest.mark.slow
def test_the_sidecar_has_every_field_the_watchers_metrics_extractor_reads(existing_flags_run):
    """agents/step_runner/metrics_extractor.py::extract_step5_metrics reads these paths; a
    missing one comes back empty in the WATCHER's report."""
    out, proc = existing_flags_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    sidecar = json.loads((out / "best_model.meta.json").read_text())
    sq, dc = sidecar["signal_quality"], sidecar["data_context"]
    read = {
        "signal_quality": sq.get("quality"), "signal_confidence": sq.get("confidence"),
        "target_variance": sq.get("target_variance"), "model_type": sidecar.get("model_type"),
        "checkpoint_path": sidecar.get("checkpoint_path"), "fingerprint": dc.get("fingerprint_hash"),
        "fingerprint_version": dc.get("fingerprint_version"),
        "training_draws": dc.get("training_window", {}).get("draw_count"),
        "holdout_draws": dc.get("holdout_window", {}).get("draw_count"),
        "prng_type": dc.get("prng_hypothesis", {}).get("prng_type"),
    }
    assert {k: v for k, v in read.items() if v is None} == {}
    assert read["holdout_draws"] == 1000  # the existing optimizer's --holdout-draws default


def existing_health_check(diagnostics: dict, bounds: dict) -> tuple[str, list[str]]:
    """training_health_check.py::_evaluate_metrics on one model's report: the early-stop
    ratio from training_summary.best_round / rounds_captured (when rounds were captured),
    the overfit ratio from final_val_loss / final_train_loss, each bound reached at >= / <=."""
    summary = diagnostics.get("training_summary", {})
    severity, issues = diagnostics.get("diagnosis", {}).get("severity", "ok"), []
    rounds = summary.get("rounds_captured", 1)
    if rounds > 0:
        ratio = summary.get("best_round", 0) / max(rounds, 1)
        b = bounds["early_stop_ratio"]
        if ratio <= b["critical"]:
            severity, issues = "critical", issues + [f"early stop {ratio:.2f}"]
        elif ratio <= b["warning"] and severity == "ok":
            severity, issues = "warning", issues + [f"early stop {ratio:.2f}"]
    train, val = summary.get("final_train_loss"), summary.get("final_val_loss")
    if train and val and train > 0:
        ratio = val / train
        b = bounds["overfit_ratio"]
        if ratio >= b["critical"]:
            severity, issues = "critical", issues + [f"overfit {ratio:.2f}"]
        elif ratio >= b["warning"] and severity == "ok":
            severity, issues = "warning", issues + [f"overfit {ratio:.2f}"]
    return severity, issues


@pytest.mark.slow
def test_the_health_check_reads_the_diagnostics_and_agrees_with_the_watcher(existing_flags_run):
    """training_health_check.py::check_training_health reads diagnostics_outputs/
    training_diagnostics.json from the working directory (the pipeline root), in the layout
    of training_diagnostics.py::TrainingDiagnostics.get_report."""
    out, proc = existing_flags_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = out.parent / "diagnostics_outputs" / "training_diagnostics.json"
    report = json.loads(path.read_text())
    assert report["model_type"] == "neural_net"
    bounds = json.loads((REPO / "watcher_policies.json").read_text())["training_diagnostics"]["metric_bounds"]
    severity, _ = existing_health_check(report, bounds)
    assert severity == report["diagnosis"]["severity"]  # the same verdict from the same numbers
    sidecar = json.loads((out / "best_model.meta.json").read_text())
    tm, summary = sidecar["training_metrics"], report["training_summary"]
    assert summary["best_round"] / summary["rounds_captured"] == pytest.approx(tm["early_stop_ratio"])
    assert summary["final_val_loss"] / summary["final_train_loss"] == pytest.approx(tm["overfit_ratio"])


def test_a_report_without_rounds_is_not_read_as_a_model_that_peaked_at_round_zero():
    """_evaluate_metrics defaults best_round to 0 and rounds_captured to 1: a report without
    them would read as critical overfitting."""
    from step5.optimizer.diagnostics import model_health_report
    from step5.policy import DiagnosticsPolicy

    report = model_health_report("xgboost", {"cv_train_mse_mean": 1.0, "cv_val_mse_mean": 1.1}, DiagnosticsPolicy())
    assert report["training_summary"]["rounds_captured"] == 0
    severity, issues = existing_health_check(report, {"early_stop_ratio": {"warning": 0.3, "critical": 0.15},
                                                      "overfit_ratio": {"warning": 1.3, "critical": 1.5}})
    assert (severity, issues) == ("ok", [])


def existing_health_check_model_type(diagnostics_path: Path) -> str:
    """training_health_check.py::_check_training_health_impl: the model type it judges, and whose
    skip-registry entry it counts up (RETRY, SKIP_MODEL) or the WATCHER resets: the report's
    ``model_type``, overridden by the winner (``winner_model_type``, else ``winner``) of a
    compare_models_summary.json beside it; a compare report's own ``comparison.winner``."""
    diag = json.loads(diagnostics_path.read_text())
    summary_path = diagnostics_path.parent / "compare_models_summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        winner = summary.get("winner_model_type", summary.get("winner"))
        if winner and isinstance(winner, str):
            diag["model_type"] = winner
    if "models" in diag:
        return diag.get("comparison", {}).get("winner", "unknown")
    return diag.get("model_type", "unknown")


def test_after_a_compare_run_the_health_check_judges_the_single_model_that_ran_last(tmp_path):
    """A compare run leaves compare_models_summary.json; a later single-model run's report must not be
    judged as that run's winner's: it was, so a neural_net's critical result counted against catboost
    (three of them: catboost skipped) and a healthy one reset catboost's count. The old summary is kept."""
    from step5.optimizer.diagnostics import (
        compare_health_report, model_health_report, write_health_report)
    from step5.policy import DiagnosticsPolicy

    diag = tmp_path / "diagnostics_outputs"
    rules = DiagnosticsPolicy()
    metrics = {"cv_train_mse_mean": 1.0, "cv_val_mse_mean": 2.0, "overfit_ratio": 2.0}
    diag.mkdir()
    old_summary = json.dumps({"winner": "catboost", "models": {}})
    (diag / "compare_models_summary.json").write_text(old_summary)  # as the compare run left it
    write_health_report(diag, compare_health_report(
        {"catboost": model_health_report("catboost", metrics, rules)}, winner="catboost", criterion="cv_rescored",
        winner_value=0.5, ranking=["catboost"]), model_type=None)
    assert existing_health_check_model_type(diag / "training_diagnostics.json") == "catboost"

    write_health_report(diag, model_health_report("neural_net", metrics, rules), model_type="neural_net")
    assert existing_health_check_model_type(diag / "training_diagnostics.json") == "neural_net"
    kept = list(diag.glob("compare_models_summary_*.json"))
    assert [p.read_text() for p in kept] == [old_summary]


def existing_watcher_argv(params: dict) -> list[str]:
    """agents/watcher_agent.py::run_step: True -> --flag, False -> nothing, else --key value."""
    argv: list[str] = []
    for key, value in params.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv += [flag] if value else []
        else:
            argv += [flag, str(value)]
    return argv


def test_the_existing_watchers_command_from_the_pipelines_manifest_is_accepted():
    """The manifest's default params all together, as the existing WATCHER passes them: the
    optimizer accepts --compare-models with --model-type (the existing one compares and
    ignores the type), --enable-vmap, and no persistent-workers flag, so the policy decides."""
    argv = existing_watcher_argv(PIPELINE_MANIFEST_DEFAULTS)
    config = config_from_args(build_parser().parse_args(argv), argv)
    assert config.compare_models and (config.trials, config.k_folds) == (20, 20)
    assert config.fuse_folds is True and config.persistent_workers is None and config.enable_diagnostics


def test_defaults_of_the_existing_optimizers_flags():
    """meta_prediction_optimizer_anti_overfit.py::main's defaults that mean the same here;
    docs/compatibility.md says why the others differ."""
    args = build_parser().parse_args(["--survivors", "s.json", "--lottery-data", "h.json"])
    assert (args.trials, args.k_folds, args.test_holdout) == (50, 5, 0.2)
    assert str(args.output_dir) == "models/reinforcement" and args.holdout_draws == 1000
    config = config_from_args(args, [])
    assert config.model_type == "neural_net"  # the existing default is catboost (compatibility.md)


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
    net, raw = existing_network(ckpt)  # strict load_state_dict inside
    Xs = (X - np.asarray(raw["scaler_mean"], dtype=np.float32)) / np.asarray(raw["scaler_scale"], dtype=np.float32)
    with torch.no_grad():
        theirs = net(torch.as_tensor(Xs)).numpy() * raw["y_std"] + raw["y_mean"]
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
    """As the existing Step 6's wrappers load them (models/wrappers/{xgboost,lightgbm,catboost}_wrapper.py
    ``load``): the library's own loader, a float32 array in schema order."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(240, 5)).astype(np.float32)
    y = 0.3 * X[:, 0] - 0.2 * X[:, 3] + 0.05 * rng.normal(size=240)
    _, model = trees.train_fold(model_type, _small_params(model_type), X[:180], y[:180], X[180:], y[180:], seed=1,
                                feature_names=[f"f{i}" for i in range(5)])
    path = trees.save_model(model, model_type, tmp_path / checkpoint_filename(model_type))
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
