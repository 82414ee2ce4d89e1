"""The final neural net is merged from the fold models the search already trained.

Each search fold saves its model; only the best trial's are kept, and a ``merge`` job on
the fold runner (a process that already holds torch) merges them. A best trial this process
did not train has its folds trained again first. A merge that fails is an error naming the
step, and no checkpoint is committed. The merge itself (real checkpoints) is tested in
tests/nn/test_nn_ensemble.py, the disk refusing the checkpoint in test_opt_full_disk.py.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from step5.errors import JobError, Step5Error
from step5.optimizer import AntiOverfitMetaOptimizer
from step5.testing.fake_runner import FakeFoldRunner, install_fake_runner


@pytest.fixture
def fake_runner(monkeypatch):
    return install_fake_runner(monkeypatch)


def test_only_the_best_trials_fold_models_are_kept_and_merged_without_training_again(
    fake_runner, monkeypatch, make_config, study_of,
):
    made, _ = fake_runner
    kept_at_merge: list[list[str]] = []
    real_merge = FakeFoldRunner._merge

    def merge(self, req):
        states = Path(req.fold_paths[0]).parent.parent
        kept_at_merge.append(sorted(p.name for p in states.iterdir()))
        return real_merge(self, req)

    monkeypatch.setattr(FakeFoldRunner, "_merge", merge)
    cfg = make_config(trials=4)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    best = study_of(cfg, outcome).best_trial
    (runner,) = made
    assert kept_at_merge == [[f"trial_{best.number}"]]  # every other trial's models were deleted
    assert len(runner.requests) == 4 * 3  # the search's folds, and nothing trained again
    ((folds, _merged, _score),) = runner.merges
    assert [p.name for p in folds] == ["fold_0.pth", "fold_1.pth", "fold_2.pth"]
    # The merged net's validation score is the mean of the kept folds' scores: the best trial's.
    assert outcome.sidecar["training_metrics"]["val_r2"] == pytest.approx(np.mean([f["r2"] for f in best.user_attrs["folds"]]))


def test_a_best_trial_whose_models_are_not_here_has_its_folds_trained_again(
    fake_runner, monkeypatch, make_config, study_of,
):
    """As for a best trial another process of a shared study ran, or an earlier run."""
    from step5.optimizer.backends import NNBackend

    def keep_nothing(self, number, outcome):
        shutil.rmtree(self.states / f"trial_{number}")

    monkeypatch.setattr(NNBackend, "_keep_states_of_best", keep_nothing)
    made, _ = fake_runner
    cfg = make_config()
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    best = study_of(cfg, outcome).best_trial
    (runner,) = made
    searched = [r for call in runner.train_calls[:-1] for g in call for r in g if r.trial_number == best.number]
    retrained = [r for g in runner.train_calls[-1] for r in g]
    assert [(r.data_path, r.seed, r.params, r.save_model_path) for r in retrained] == [
        (r.data_path, r.seed, r.params, r.save_model_path) for r in searched]
    ((folds, _merged, _score),) = runner.merges
    assert [str(p) for p in folds] == [r.save_model_path for r in retrained]
    assert outcome.sidecar["training_metrics"]["val_r2"] == pytest.approx(np.mean([f["r2"] for f in best.user_attrs["folds"]]))


def test_a_merge_that_fails_is_an_error_naming_the_step(fake_runner, monkeypatch, make_config):
    def merge(self, req):
        return JobError("checkpoint not found: /x/fold_1.pth", "data_error", job_id=req.job_id)

    monkeypatch.setattr(FakeFoldRunner, "_merge", merge)
    cfg = make_config()
    with pytest.raises(Step5Error, match=r"merging trial \d+'s 3 fold models into the final model failed "
                                         r"\(data_error\): checkpoint not found: /x/fold_1.pth"):
        AntiOverfitMetaOptimizer(cfg).run()
    assert not (cfg.output_dir / "best_model.pth").exists()


def test_a_merge_that_reports_success_without_a_checkpoint_is_an_error(fake_runner, monkeypatch, make_config):
    def merge(self, req):
        return {"status": "complete", "model_type": "neural_net", "test_r2": 0.5, "job_id": req.job_id}

    monkeypatch.setattr(FakeFoldRunner, "_merge", merge)
    cfg = make_config()
    with pytest.raises(Step5Error, match=r"reported success but wrote no checkpoint at .*best_model.pth"):
        AntiOverfitMetaOptimizer(cfg).run()
    assert not (cfg.output_dir / "best_model.pth").exists()
