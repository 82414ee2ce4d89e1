"""Sidecar building and validation (step5.artifacts): what Step 6 and the WATCHER rely on."""
from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest

from step5 import artifacts
from step5.errors import DataError
from step5.execution.summary import RunnerStats, build_execution_summary
from step5.sidecar import build_data_context, build_provenance, build_sidecar

NAMES = ["lane_agreement_8", "skip_mean", "skip_min"]


def _valid_sidecar(outcome: str = "SUCCESS") -> dict:
    metrics = {k: 0.5 for k in artifacts.TRAINING_METRIC_KEYS}
    metrics["beats_mean"] = True
    if outcome != "SUCCESS":
        metrics = None
    return build_sidecar(
        model_type="neural_net",
        checkpoint_path="best_model.pth" if outcome == "SUCCESS" else None,
        feature_schema=artifacts.build_feature_schema(NAMES, ["score", "confidence"], "s.json"),
        signal_quality={
            "signal_status": "healthy" if outcome == "SUCCESS" else "degenerate",
            "prediction_allowed": outcome == "SUCCESS",
            "target_mean": 0.3, "target_std": 0.1, "target_variance": 0.01,
            "unique_target_values": 100, "sample_size": 100,
        },
        data_context=build_data_context(
            fingerprint="0123456789abcdef", training_draws=500, holdout_draws=None, survivors_file="s.json",
            survivor_count=100, prng_type="java_lcg", mod=1000, target="holdout_quality", missing_feature_fills=0,
            lottery_data_file="h.json",
        ),
        training_metrics=metrics,
        hyperparameters={"hidden_layers": [64]},
        optuna={"study_name": "s", "storage": "sqlite:///x.db", "trials_run": 3,
                "best_trial_number": 1 if outcome == "SUCCESS" else None,
                "best_value": 0.4 if outcome == "SUCCESS" else None},
        execution=build_execution_summary(RunnerStats(mode="subprocess", devices=["CPU-0"])).to_dict(),
        provenance=build_provenance(
            run_id="r1", parent_run_id=None, command_line=["x"], created_at="2026-01-01T00:00:00Z",
        ),
        checkpoint_sha256="ab" * 32 if outcome == "SUCCESS" else None,
    )


def test_agent_metadata_repeats_the_provenance_ids_for_the_existing_step6():
    sidecar = _valid_sidecar()
    assert sidecar["agent_metadata"] == {"pipeline_step": 5, "pipeline_step_name": "anti_overfit_training",
                                         "run_id": "r1", "parent_run_id": None}


def test_feature_schema_hash_is_sha256_of_comma_joined_names_first_16_hex():
    expected = hashlib.sha256(b"lane_agreement_8,skip_mean,skip_min").hexdigest()[:16]
    assert artifacts.feature_schema_hash(NAMES) == expected
    assert artifacts.feature_schema_hash(list(reversed(NAMES))) != expected  # order matters


@pytest.mark.parametrize("outcome", ["SUCCESS", "DEGENERATE_SIGNAL"])
def test_built_sidecars_are_valid(outcome):
    assert artifacts.validate_sidecar(_valid_sidecar(outcome)) == []


@pytest.mark.parametrize(
    "path",
    [
        ("schema_version",), ("model_type",), ("checkpoint_path",), ("feature_schema",), ("signal_quality",),
        ("data_context",), ("training_metrics",), ("hyperparameters",), ("optuna",), ("execution",),
        ("outcome",), ("provenance",), ("feature_schema", "feature_schema_hash"),
        ("feature_schema", "excluded_features"), ("signal_quality", "prediction_allowed"),
        ("data_context", "fingerprint_hash"), ("data_context", "fingerprint_version"),
        ("data_context", "training_window", "draw_count"), ("data_context", "holdout_window", "draw_count"),
        ("data_context", "prng_hypothesis", "prng_type"), ("signal_quality", "quality"),
        ("signal_quality", "confidence"), ("training_metrics", "early_stop_ratio"),
        ("training_metrics", "test_r2"), ("training_metrics", "overfit_ratio"), ("optuna", "best_value"),
        ("execution", "fallbacks"), ("execution", "faults"), ("execution", "fusion", "rerun_jobs"),
        ("execution", "search", "trials_in_flight"), ("execution", "timings", "total_s"),
        ("provenance", "parent_run_id"), ("provenance", "versions"),
        ("agent_metadata",), ("agent_metadata", "run_id"), ("agent_metadata", "parent_run_id"),
        ("agent_metadata", "pipeline_step"), ("agent_metadata", "pipeline_step_name"),
    ],
)
def test_missing_key_is_reported_by_its_dotted_name(path):
    obj = _valid_sidecar()
    target = obj
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    problems = artifacts.validate_sidecar(obj)
    assert any(f"missing key `{'.'.join(path)}`" in p for p in problems), problems


@pytest.mark.parametrize(
    "path, value, fragment",
    [
        (("feature_schema", "feature_count"), "3", "feature_schema.feature_count` must be an int"),
        (("feature_schema", "feature_names"), ["a", 1], "feature_schema.feature_names` must be an array of strings"),
        (("signal_quality", "prediction_allowed"), "yes", "prediction_allowed` must be true or false"),
        (("signal_quality", "signal_status"), "great", "signal_status` must be one of"),
        (("training_metrics", "test_r2"), "0.5", "training_metrics.test_r2` must be a finite number"),
        (("training_metrics", "cv_r2_mean"), None, "must be a finite number in a SUCCESS sidecar"),
        (("training_metrics", "train_mse"), float("nan"), "training_metrics.train_mse"),
        (("optuna", "trials_run"), 2.0, "optuna.trials_run` must be an int"),
        (("execution", "mode"), "threads", "execution.mode` must be one of"),
        (("execution", "timings", "wall_s"), "1.5", "execution.timings.wall_s` must be a finite number"),
        (("execution", "search", "fuse_trials"), 1, "execution.search.fuse_trials` must be true or false"),
        (("execution", "fusion", "jobs"), -1, "execution.fusion.jobs` must be an int"),
        (("outcome",), "MAYBE", "`outcome` must be one of"),
        (("model_type",), "svm", "`model_type` must be one of"),
        (("checkpoint_format",), "pickle", "`checkpoint_format` must be 'pytorch_tensors'"),
        (("checkpoint_path",), "model.bin", "`checkpoint_path` must name 'best_model.pth'"),
        (("data_context", "fingerprint_hash"), "XYZ", "must be 16 lowercase hex"),
        (("data_context", "training_window", "draw_count"), "500", "data_context.training_window.draw_count` must be an int"),
        (("signal_quality", "quality"), "weak", "`signal_quality.quality` / `confidence` must be 'healthy' / 1.0"),
        (("provenance", "command_line"), "python x.py", "provenance.command_line` must be an array of strings"),
        (("agent_metadata", "pipeline_step"), 6, "`agent_metadata.pipeline_step` must be 5"),
        (("agent_metadata", "pipeline_step_name"), "step5", "must be 'anti_overfit_training'"),
        (("agent_metadata", "run_id"), "other", "`agent_metadata.run_id` 'other' differs from `provenance.run_id`"),
        (("agent_metadata", "parent_run_id"), "p9", "`agent_metadata.parent_run_id` 'p9' differs"),
    ],
)
def test_mistyped_value_is_reported(path, value, fragment):
    obj = _valid_sidecar()
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    problems = artifacts.validate_sidecar(obj)
    assert any(fragment in p for p in problems), problems


def test_hash_and_count_must_match_the_names():
    obj = _valid_sidecar()
    obj["feature_schema"]["feature_names"] = ["other", "names", "here"]
    problems = artifacts.validate_sidecar(obj)
    assert any("does not match the feature names" in p for p in problems), problems
    obj = _valid_sidecar()
    obj["feature_schema"]["feature_count"] = 7
    assert any("feature_count` is 7" in p for p in artifacts.validate_sidecar(obj))


def test_degenerate_sidecar_must_forbid_prediction_and_name_no_checkpoint():
    obj = _valid_sidecar("DEGENERATE_SIGNAL")
    obj["signal_quality"]["prediction_allowed"] = True
    obj["checkpoint_path"] = "best_model.pth"
    problems = artifacts.validate_sidecar(obj)
    assert any("prediction_allowed` must be false" in p for p in problems)
    assert any("`checkpoint_path` must be null" in p for p in problems)


def test_overfit_ratio_may_be_null_on_success():
    obj = _valid_sidecar()
    obj["training_metrics"]["overfit_ratio"] = None
    assert artifacts.validate_sidecar(obj) == []


def test_non_dict_is_one_problem():
    assert artifacts.validate_sidecar([1, 2]) == ["the sidecar must be a JSON object, got list"]  # type: ignore[arg-type]


def test_write_refuses_invalid_and_read_round_trips(tmp_path):
    bad = copy.deepcopy(_valid_sidecar())
    del bad["optuna"]
    with pytest.raises(ValueError, match="missing key `optuna`"):
        artifacts.write_sidecar(tmp_path / "x.meta.json", bad)
    assert not (tmp_path / "x.meta.json").exists()
    good = _valid_sidecar()
    path = artifacts.write_sidecar(tmp_path / artifacts.SIDECAR_NAME, good)
    assert artifacts.read_sidecar(path) == good
    assert artifacts.resolve_checkpoint(path, good) == tmp_path / "best_model.pth"
    (tmp_path / "broken.json").write_text('{"outcome": "SUCCESS"}')
    with pytest.raises(DataError, match="is invalid"):
        artifacts.read_sidecar(tmp_path / "broken.json")


def test_provenance_records_torch_version_without_importing_it():
    import sys

    had_torch = "torch" in sys.modules
    versions = build_provenance(run_id="r", parent_run_id=None, command_line=[], created_at="now")["versions"]
    assert versions["optuna"] and versions["numpy"] and versions["scikit-learn"]
    assert "torch" in versions
    assert ("torch" in sys.modules) == had_torch


def test_data_fingerprint_follows_the_data():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 3)).astype(np.float32)
    y = rng.normal(size=20)
    fp = artifacts.data_fingerprint(X, y, NAMES, [1, 2, 3], target="holdout_quality")
    assert fp == artifacts.data_fingerprint(X.copy(), y.copy(), NAMES, [1, 2, 3], target="holdout_quality")
    assert len(fp) == 16
    y2 = y.copy()
    y2[5] += 1e-6
    assert fp != artifacts.data_fingerprint(X, y2, NAMES, [1, 2, 3], target="holdout_quality")
    assert fp != artifacts.data_fingerprint(X, y, NAMES, [1, 2, 3, 4], target="holdout_quality")
    assert fp != artifacts.data_fingerprint(X, y, NAMES, [1, 2, 3], target="other")


def test_success_sidecars_carry_the_checkpoint_hash_and_an_honest_beats_mean_flag():
    sidecar = _valid_sidecar()
    del sidecar["checkpoint_sha256"]
    assert any("checkpoint_sha256" in p for p in artifacts.validate_sidecar(sidecar))
    sidecar = _valid_sidecar()
    sidecar["training_metrics"].update(test_r2=-0.3, beats_mean=True)
    assert any("beats_mean` must be false" in p for p in artifacts.validate_sidecar(sidecar))
    del sidecar["training_metrics"]["beats_mean"]
    assert any("beats_mean" in p for p in artifacts.validate_sidecar(sidecar))
    degenerate = _valid_sidecar("DEGENERATE_SIGNAL")
    degenerate["checkpoint_sha256"] = "ab" * 32
    assert any("checkpoint_sha256" in p for p in artifacts.validate_sidecar(degenerate))
