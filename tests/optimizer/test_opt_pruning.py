"""Fold-level intermediate values, --pruner, flat per-trial attributes and the progress line.

In-process runs with the fake fold runner (each fold's R² is a function of the learning
rate, so the median pruner has hopeless trials to stop), and one real CLI run with
persistent torch workers (slow).
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from step5 import artifacts
from step5.errors import PolicyError
from step5.jsonio import write_json_atomic
from step5.optimizer import AntiOverfitMetaOptimizer
from step5.optimizer.optimizer import resolve_search_plan
from step5.optimizer.search import elapsed_and_eta
from step5.policy import load_policy, parse_policy
from step5.testing.fake_runner import install_fake_runner

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def config_defaults() -> dict:
    """This module's runs: 16 trials x 5 folds on two slots, seed 3."""
    return dict(trials=16, k_folds=5, cpu_workers=2, seed=3)


@pytest.fixture
def runners(monkeypatch):
    return install_fake_runner(monkeypatch, mode="persistent_workers", seed_in_metrics=True)


def _trial_requests(runner) -> list:
    return runner.requests


def test_median_pruner_prunes_in_fold_waves_and_sends_no_pruned_fold(runners, make_config, study_of):
    made, _ = runners
    cfg = make_config(pruner="median")
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    study = study_of(cfg, outcome)
    trials = study.trials
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # --trials 16 means 16 COMPLETE trials: each pruned trial was replaced by a fresh one.
    assert pruned and len(complete) == 16 and len(trials) == len(pruned) + len(complete)
    assert all(t.intermediate_values for t in trials)
    for t in complete:  # every fold reported, in order; the last step is the trial's value
        assert sorted(t.intermediate_values) == [0, 1, 2, 3, 4]
        assert t.intermediate_values[4] == pytest.approx(t.value)
    sent = {}
    for r in _trial_requests(made[0]):
        sent.setdefault(r.trial_number, []).append(r.fold_idx)
    for t in pruned:  # the folds after the pruning step were never sent
        steps = sorted(t.intermediate_values)
        assert steps == list(range(t.user_attrs["pruned_after_folds"]))
        assert sent[t.number] == steps and len(steps) < 5
        assert t.value == pytest.approx(t.intermediate_values[steps[-1]])
    assert study.best_trial.state == TrialState.COMPLETE
    assert outcome.sidecar["optuna"]["best_trial_number"] in {t.number for t in complete}
    assert outcome.sidecar["optuna"]["pruner"] == "median"
    assert outcome.sidecar["optuna"]["trials_pruned"] == len(pruned)
    # Waves: every runner call trains one fold index.
    calls = made[0].train_calls
    assert all(len({r.fold_idx for g in c for r in g}) == 1 for c in calls)
    # Deterministic for a seed and B: a second fresh study makes the same decisions.
    again = make_config(name="again", pruner="median")
    study2 = study_of(again, AntiOverfitMetaOptimizer(again).run())
    assert [(t.state, t.value, t.intermediate_values) for t in study2.trials] == \
        [(t.state, t.value, t.intermediate_values) for t in trials]


def test_without_a_pruner_every_trial_reports_every_fold_and_has_flat_means(runners, make_config, study_of):
    made, _ = runners
    cfg = make_config(trials=4, k_folds=3, pruner="none", trials_in_flight=2)
    study = study_of(cfg, AntiOverfitMetaOptimizer(cfg).run())
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 4
    for t in study.trials:
        assert sorted(t.intermediate_values) == [0, 1, 2]
        assert t.intermediate_values[2] == pytest.approx(t.value)
        gap = t.user_attrs["cv_train_r2_mean"] - t.user_attrs["cv_val_r2_mean"]
        assert t.user_attrs["overfit_gap"] == pytest.approx(gap)
    # One runner call per batch (all folds together), as before pruning existed.
    calls = made[0].train_calls
    assert len(calls) == 2 and all(len({r.fold_idx for g in c for r in g}) == 3 for c in calls)
    frame = study.trials_dataframe()
    for column in ("user_attrs_cv_val_r2_mean", "user_attrs_cv_train_r2_mean", "user_attrs_cv_val_r2_std",
                   "user_attrs_overfit_gap"):
        assert frame[column].notna().all(), column


def test_the_flag_wins_over_the_policy_key_and_the_policy_rejects_unknown_pruners(tmp_path, make_config):
    cfg = make_config(inputs=("s.json", "h.json"))
    policy_file = tmp_path / "p.json"
    write_json_atomic(policy_file, {"training": {"pruner": "median"}})
    policy = load_policy(policy_file)
    assert policy.training.pruner == "median"
    assert load_policy(None).training.pruner == "none"
    assert resolve_search_plan(cfg, policy, 2, neural_net=True).pruner == "median"
    flagged = dataclasses.replace(cfg, pruner="none")
    assert resolve_search_plan(flagged, policy, 2, neural_net=True).pruner == "none"
    with pytest.raises(PolicyError, match=r"training.pruner must be one of \"none\", \"median\""):
        parse_policy({"training": {"pruner": "hyperband!"}}, "p.json")
    with pytest.raises(PolicyError, match="training.pruner"):
        parse_policy({"training": {"pruner": 1}}, "p.json")


def test_elapsed_and_eta():
    assert elapsed_and_eta(30.0, 1, 3) == "elapsed 30s, ETA 1m00s"
    assert elapsed_and_eta(3725.0, 5, 5) == "elapsed 1h02m05s, ETA 0s"
    assert elapsed_and_eta(0.0, 0, 5) == "elapsed 0s, ETA ?"


def test_trees_report_fold_values_and_can_be_pruned(make_config, study_of):
    cfg = make_config(model_type="lightgbm", trials=8, k_folds=3, pruner="median", cpu_workers=1,
                      cv_repeats=2)
    study = study_of(cfg, AntiOverfitMetaOptimizer(cfg).run())
    assert all(t.intermediate_values for t in study.trials)
    for t in study.trials:  # one step per fold of every search partition
        if t.state == TrialState.COMPLETE:
            assert sorted(t.intermediate_values) == list(range(3 * 2))


@pytest.mark.slow
def test_cli_median_pruner_on_16_trials_of_5_folds_with_real_workers(sample_inputs, tmp_path):
    """The issue's bar: real torch workers, 16 trials x 5 folds, --pruner median. The seed
    fixes the sampled trials; this one's include clearly hopeless ones (4 pruned), so the
    test does not hang on a close call. The seed is tied to the search space: a new
    parameter draws a different trial sequence (seed 5 stopped pruning when input dropout
    joined it, seed 3 when input sparsity did; seed 4 prunes 4 of the 20 trials it asks
    behind the input-dropout gate)."""
    survivors, history = sample_inputs
    cmd = [
        sys.executable, str(REPO_ROOT / "meta_prediction_optimizer_anti_overfit.py"),
        "--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "neural_net",
        "--trials", "16", "--k-folds", "5", "--nn-max-epochs", "8", "--cpu-workers", "2", "--seed", "4",
        "--pruner", "median", "--output-dir", str(tmp_path / "out"),
        "--policy", str(REPO_ROOT / "watcher_policies.json"),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True,
                          text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sidecar = json.loads((tmp_path / "out" / artifacts.SIDECAR_NAME).read_text())
    storage = f"sqlite:///{(tmp_path / 'out' / 'optuna_step5.db').resolve()}"
    study = optuna.load_study(study_name=sidecar["optuna"]["study_name"], storage=storage)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 16 and TrialState.PRUNED in states, states
    assert all(t.intermediate_values for t in study.trials)
    assert study.best_trial.state == TrialState.COMPLETE
    assert "pruned after" in proc.stderr and "ETA" in proc.stderr and "elapsed" in proc.stderr
