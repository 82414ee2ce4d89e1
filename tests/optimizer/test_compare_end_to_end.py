"""--compare-models with the real optimizer on generated sample data (few trials, few folds)."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest

from step5 import artifacts
from step5.artifacts import MODEL_TYPES, checkpoint_filename
from step5.models import trees
from step5.optimizer import compare
from step5.optimizer.config import OptimizerConfig


def _config(sample_inputs, tmp_path, repo_root, **overrides) -> OptimizerConfig:
    survivors, history = sample_inputs
    settings = dict(
        survivors=survivors, lottery_data=history, compare_models=True, trials=2, k_folds=3, cv_repeats=1, seed=5,
        output_dir=tmp_path / "out", diagnostics_dir=tmp_path / "diag", cpu_workers=1,
        skip_registry=tmp_path / "diag" / artifacts.REGISTRY_NAME,
        policy_path=repo_root / "watcher_policies.json", nn_max_epochs=5, command_line=["test"],
    )
    settings.update(overrides)
    return OptimizerConfig(**settings)


def _skip_neural_net(config: OptimizerConfig) -> None:
    """Put neural_net over the registry limit, so the in-process tests need no torch workers."""
    from step5.policy import load_policy
    from step5.watcher.registry import record_result

    rules = load_policy(config.policy_path).training_diagnostics
    for _ in range(rules.max_consecutive_critical):
        record_result(config.skip_registry, "neural_net", True, "test", rules)


@pytest.fixture
def single_thread(monkeypatch):
    """Keep the tree libraries to one thread each on a shared two-core machine."""
    real = trees.train_fold

    def one_thread(*args, **kwargs):
        kwargs["n_threads"] = 1
        return real(*args, **kwargs)

    monkeypatch.setattr(trees, "train_fold", one_thread)


def test_trees_compete_and_a_failing_type_cannot_stop_or_win(sample_inputs, tmp_path, repo_root,
                                                             monkeypatch, single_thread):
    config = _config(sample_inputs, tmp_path, repo_root)
    _skip_neural_net(config)
    real = trees.train_fold

    def catboost_breaks(model_type, *args, **kwargs):
        if model_type == "catboost":
            raise RuntimeError("catboost exploded (planted by the test)")
        return real(model_type, *args, **kwargs)

    monkeypatch.setattr(trees, "train_fold", catboost_breaks)

    assert compare.run_compare(config) == 0

    summary = json.loads((config.diagnostics_dir / compare.SUMMARY_NAME).read_text())
    models = summary["models"]
    assert models["neural_net"]["status"] == "SKIPPED"
    assert models["catboost"]["status"] == "FAILED" and "catboost exploded" in models["catboost"]["error"]
    done = {mt: m for mt, m in models.items() if m["status"] == "SUCCESS"}
    assert set(done) == {"xgboost", "lightgbm"}
    best = max(done, key=lambda mt: done[mt]["cv_rescored"])  # chosen on fresh folds, never on test R^2
    assert summary["winner"] == best
    for m in done.values():
        assert m["trials_run"] == 2 and m["wall_s"] > 0 and np.isfinite(m["cv_score"]) and np.isfinite(m["cv_rescored"])

    # the winner is best_model.* with a valid sidecar whose metrics are the summary's
    out = config.output_dir
    sidecar = artifacts.read_sidecar(out / artifacts.SIDECAR_NAME)
    assert sidecar["model_type"] == best and sidecar["compare_models"]["winner"] == best
    assert sidecar["training_metrics"]["test_r2"] == pytest.approx(done[best]["test_r2"])
    rescore = sidecar["training_metrics"]["rescore"]
    assert rescore["partitions"] == 3 and len(rescore["objective_values"]) == 3
    assert rescore["objective_mean"] == pytest.approx(np.mean(rescore["objective_values"]))
    assert rescore["objective_mean"] == pytest.approx(done[best]["cv_rescored"])
    assert rescore["search_objective"] == pytest.approx(done[best]["cv_score"])
    ckpt = artifacts.resolve_checkpoint(out / artifacts.SIDECAR_NAME, sidecar)
    assert ckpt.samefile(out / checkpoint_filename(best))  # read from the sidecar's own model set
    assert artifacts.file_sha256(ckpt) == sidecar["checkpoint_sha256"]
    model = trees.load_model(ckpt, best)
    assert model.n_features == sidecar["feature_schema"]["feature_count"]

    loser = ({"xgboost", "lightgbm"} - {best}).pop()
    archived = out / compare.ARCHIVE_DIRNAME / loser
    assert (archived / checkpoint_filename(loser)).is_file()
    assert artifacts.read_sidecar(archived / artifacts.SIDECAR_NAME)["model_type"] == loser
    assert (config.diagnostics_dir / compare.PLOT_NAME).stat().st_size > 1000


def test_a_rerun_adds_trials_to_the_same_four_studies(sample_inputs, tmp_path, repo_root, single_thread):
    config = _config(sample_inputs, tmp_path, repo_root, trials=1)
    _skip_neural_net(config)
    assert compare.run_compare(config) == 0
    first = json.loads((config.diagnostics_dir / compare.SUMMARY_NAME).read_text())
    assert compare.run_compare(config) == 0  # --trials 1 again: one more trial per study
    second = json.loads((config.diagnostics_dir / compare.SUMMARY_NAME).read_text())
    for mt in ("xgboost", "lightgbm", "catboost"):
        assert (first["models"][mt]["trials_run"], second["models"][mt]["trials_run"]) == (1, 2)
        archived = config.output_dir if second["winner"] == mt else config.output_dir / compare.ARCHIVE_DIRNAME / mt
        sidecar = artifacts.read_sidecar(archived / artifacts.SIDECAR_NAME)
        assert sidecar["optuna"]["resumed"] is True and sidecar["optuna"]["trials_new"] == 1


@pytest.mark.slow
def test_cli_compare_models_runs_all_four(sample_inputs, tmp_path, repo_root, python):
    survivors, history = sample_inputs
    cmd = [python, str(repo_root / "meta_prediction_optimizer_anti_overfit.py"),
           "--survivors", str(survivors), "--lottery-data", str(history), "--compare-models",
           "--trials", "2", "--k-folds", "3", "--cv-repeats", "1", "--seed", "3", "--output-dir", "models",
           "--policy", str(repo_root / "watcher_policies.json"), "--cpu-workers", "1",
           "--nn-max-epochs", "5", "--study-name", "cli"]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo_root), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == ""  # logs go to stderr

    # the model under --output-dir; the summary in the working directory's diagnostics_outputs/,
    # where the pipeline's health check looks for it (SPEC section 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostics_outputs", "models"]
    summary = json.loads((tmp_path / "diagnostics_outputs" / compare.SUMMARY_NAME).read_text())
    assert {mt: m["status"] for mt, m in summary["models"].items()} == {mt: "SUCCESS" for mt in MODEL_TYPES}
    ranked = sorted(MODEL_TYPES, key=lambda mt: -summary["models"][mt]["cv_rescored"])
    assert summary["winner"] == ranked[0]
    sidecar = artifacts.read_sidecar(tmp_path / "models" / artifacts.SIDECAR_NAME)
    nn = summary["models"]["neural_net"]  # its rescore ran through the workers like its trials
    nn_rescore = artifacts.read_sidecar(tmp_path / nn["sidecar_path"])["training_metrics"]["rescore"]
    assert nn_rescore["partitions"] == 3 and all(np.isfinite(nn_rescore["objective_values"]))
    assert nn_rescore["objective_mean"] == pytest.approx(nn["cv_rescored"])
    assert sidecar["model_type"] == summary["winner"]
    assert sidecar["optuna"]["study_name"] == f"cli_{summary['winner']}"
    assert (tmp_path / "models" / artifacts.checkpoint_filename(summary["winner"])).is_file()
    for mt in ranked[1:]:
        assert (tmp_path / "models" / compare.ARCHIVE_DIRNAME / mt / artifacts.checkpoint_filename(mt)).is_file()
    assert (tmp_path / "diagnostics_outputs" / compare.PLOT_NAME).is_file()
    assert "compare-models results" in proc.stderr
