"""AntiOverfitMetaOptimizer in-process, with a fake fold runner standing in for the trainers.

The fake reads the fold NPZ files it is handed (so the tests see exactly what a worker
would), answers with metrics derived from the params, writes a checkpoint when asked, and
can fail chosen trials deterministically (JobError) or blow up (RuntimeError, Ctrl-C).
The real-trainer runs are in test_opt_cli_end_to_end.py.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import optuna
import psutil
import pytest
from optuna.trial import TrialState

from step5 import artifacts, model_set
from step5.errors import DegenerateSignalError, Step5Error, StudyMismatchError, UsageError
from step5.jsonio import read_json_file, write_json_atomic
from step5.optimizer import AntiOverfitMetaOptimizer, OptimizerConfig
from step5.optimizer.study import TARGET_ATTR
from step5.testing.fake_runner import FAKE_ENSEMBLE_TEST_R2


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    """Point tempfile at a private folder so leftover fold dirs can be seen."""
    import tempfile

    d = tmp_path / "tmp"
    d.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    return d


def test_run_builds_final_model_from_best_trial_and_never_shows_test_rows(
    fake_runner, private_tmp, make_config, study_of,
):
    made, _ = fake_runner
    cfg = make_config(dropout=0.25, normalize_features=False, use_leaky_relu=False)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    assert outcome.status == "SUCCESS"
    (runner,) = made
    assert runner.closed and runner.persistent is False  # no policy file: the kill switch is off
    assert list(private_tmp.iterdir()) == []  # fold files removed

    cv_requests = runner.requests
    assert len(cv_requests) == 3 * 3  # and no fold trained again for the final model
    # Fold files are written once and reused by every trial.
    assert len({r.data_path for r in cv_requests}) == 3
    # Flags and fixed dropout reach every request; seeds differ per (trial, fold).
    for r in runner.requests:
        assert (r.normalize_features, r.use_leaky_relu, r.params.dropout) == (False, False, 0.25)
    assert len({r.seed for r in cv_requests}) == len(cv_requests)

    sidecar = read_json_file(cfg.output_dir / artifacts.SIDECAR_NAME, "sidecar")
    assert artifacts.validate_sidecar(sidecar) == []
    assert sidecar["training_metrics"]["rescore"] is None  # a single run rescores only when asked
    best = study_of(cfg, outcome).best_trial
    assert sidecar["optuna"]["best_trial_number"] == best.number
    # The final model: the best trial's K fold models, which its search folds saved (every
    # search fold saves its model; only the best trial's are kept), merged into one best_model.pth.
    best_folds = [r for r in cv_requests if r.trial_number == best.number]
    assert all(r.save_model_path for r in cv_requests)
    assert best.user_attrs["params"] == sidecar["hyperparameters"] == best_folds[0].params.to_dict()
    ((fold_ckpts, merged, score_file),) = runner.merges
    assert [str(p) for p in fold_ckpts] == [r.save_model_path for r in best_folds]
    assert merged.name == "best_model.pth" and cfg.output_dir not in merged.parents  # merged aside, then staged
    assert (cfg.output_dir / "best_model.pth").read_bytes() == b"fake checkpoint"
    assert sidecar["checkpoint_sha256"] == hashlib.sha256(b"fake checkpoint").hexdigest()
    sets = cfg.output_dir / model_set.SETS_DIRNAME  # one committed set, nothing half-written
    assert sorted(p.name for p in sets.iterdir()) == sorted(
        [model_set.POINTER_NAME, model_set.LOCK_NAME, model_set.current_dir(cfg.output_dir).name])
    assert (cfg.output_dir / "best_model.history.png").stat().st_size > 0

    # The merged model is scored on every dev row and on the test rows, which are in no fold file.
    fin = runner.arrays[str(score_file)]
    n = sidecar["data_context"]["survivor_source"]["survivor_count"]
    n_test = sidecar["training_metrics"]["n_test"]
    assert n_test == int(np.ceil(n * cfg.test_holdout)) == len(fin["y_test"])
    assert len(fin["y_train"]) == n - n_test == sidecar["training_metrics"]["n_fit"]
    assert np.array_equal(fin["X_val"], fin["X_test"])
    test_rows = {row.tobytes() for row in fin["X_test"]}
    for path in {r.data_path for r in cv_requests}:
        arrays = runner.arrays[path]
        assert "X_test" not in arrays
        for key in ("X_train", "X_val"):
            assert not test_rows & {row.tobytes() for row in arrays[key]}
        assert list(arrays["feature_names"]) == sidecar["feature_schema"]["feature_names"]

    tm = sidecar["training_metrics"]
    assert tm["test_r2"] == pytest.approx(outcome.test_r2) == FAKE_ENSEMBLE_TEST_R2
    # The ensemble's validation score is its folds' CV mean: the same folds as the best trial's.
    assert tm["val_r2"] == pytest.approx(tm["cv_r2_mean"])
    assert (tm["epochs_run"], tm["best_epoch"]) == (None, None)  # K models, no one epoch count
    assert tm["objective_formula"].startswith("objective = mean_k(val_r2_k) - 0.5")
    # The pipeline's "val loss / train loss" (its health check's overfit_ratio), on the best trial's folds.
    assert tm["overfit_ratio"] == pytest.approx(tm["cv_val_mse_mean"] / tm["cv_train_mse_mean"])
    assert sidecar["execution"]["timings"]["total_s"] > 0
    assert sidecar["provenance"]["command_line"] == ["test"]


def test_the_best_trial_is_rescored_on_fresh_partitions_of_the_dev_rows(fake_runner, make_config, study_of):
    made, options = fake_runner
    options["seed_in_metrics"] = True  # each fold's score carries its seed: other seeds, other scores
    cfg = make_config(rescore_partitions=2)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    (runner,) = made
    best = study_of(cfg, outcome).best_trial
    search = [r for r in runner.requests if r.fold_idx < 3]
    rescore = [r for r in runner.requests if r.fold_idx >= 3]
    ((final, _merged, _score),) = runner.merges

    # Two partitions x three folds of the best trial's params, on files and seeds of their own
    assert [r.fold_idx for r in rescore] == [3, 4, 5, 6, 7, 8]
    assert {r.trial_number for r in rescore} == {best.number}
    assert all(r.params.to_dict() == best.user_attrs["params"] for r in rescore)
    assert not {r.seed for r in rescore} & {r.seed for r in search} and len({r.seed for r in rescore}) == 6
    assert len({r.data_path for r in rescore}) == 6 and not {r.data_path for r in rescore} & {r.data_path for r in search}

    # Each fresh partition splits the same dev rows into validation parts that cover them
    # once, and differently from the search's folds; the test rows are in none of them.
    def val_rows(requests):
        return [{tuple(row) for row in runner.arrays[r.data_path]["X_val"]} for r in requests]

    search_parts = val_rows([r for r in search if r.trial_number == best.number])
    dev = set().union(*search_parts)
    for part in (rescore[:3], rescore[3:]):
        parts = val_rows(part)
        assert set().union(*parts) == dev and sum(map(len, parts)) == len(dev)
        assert parts != search_parts

    # The final model is still the best trial's search folds: rescoring changes no model
    best_search = [r for r in search if r.trial_number == best.number]
    assert [str(p) for p in final] == [r.save_model_path for r in best_search]
    assert not any(r.save_model_path for r in rescore)

    block = outcome.sidecar["training_metrics"]["rescore"]
    assert block["partitions"] == 2 and block["search_objective"] == pytest.approx(best.value)
    assert len(block["objective_values"]) == 2 and block["objective_values"][0] != block["objective_values"][1]
    assert block["objective_mean"] == pytest.approx(np.mean(block["objective_values"]))
    assert outcome.cv_rescored == pytest.approx(block["objective_mean"])
    assert outcome.sidecar["execution"]["timings"]["rescore_s"] > 0


def test_a_partition_that_fails_to_rescore_leaves_no_estimate_and_the_run_goes_on(fake_runner, caplog, make_config):
    made, options = fake_runner
    options["fail_trials"] = range(50)  # the first fold of fresh partition 1 (fold_idx 3): only rescores have it
    options["failure"] = ("loss is NaN", "train_error", 3)
    with caplog.at_level(logging.WARNING):
        outcome = AntiOverfitMetaOptimizer(make_config(rescore_partitions=2)).run()
    assert outcome.status == "SUCCESS"
    block = outcome.sidecar["training_metrics"]["rescore"]
    assert block["objective_values"][0] is None and block["objective_values"][1] is not None
    assert block["objective_mean"] is None and outcome.cv_rescored is None
    assert "fresh partition 1 failed" in caplog.text and "loss is NaN" in caplog.text


def test_job_error_fails_that_trial_with_its_message_and_the_study_goes_on(fake_runner, caplog, make_config, study_of):
    made, options = fake_runner
    options["fail_trials"] = [1]
    cfg = make_config()
    with caplog.at_level(logging.WARNING):
        outcome = AntiOverfitMetaOptimizer(cfg).run()
    study = study_of(cfg, outcome)
    states = [t.state for t in study.trials]
    # --trials 3 means three COMPLETE trials: the failed one is replaced.
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.COMPLETE]
    assert "NaN in X_train row 3" in study.trials[1].user_attrs["fail_reason"]
    assert "Trial 1 failed with parameters" in caplog.text and "NaN in X_train row 3" in caplog.text
    assert outcome.sidecar["optuna"]["trials_failed"] == 1
    assert outcome.sidecar["optuna"]["trials_run"] == 3
    search = outcome.sidecar["execution"]["search"]
    assert (search["trials"], search["failed_trials"], search["replaced_trials"]) == (4, 1, 1)
    assert outcome.sidecar["optuna"]["best_trial_number"] != 1
    assert made[0].closed


def test_failed_trials_in_a_row_stop_the_run_naming_the_reason(tmp_path, fake_runner, make_config):
    made, options = fake_runner
    options["fail_trials"] = range(100)
    policy = tmp_path / "policy.json"
    policy.write_text('{"training": {"max_consecutive_failed_trials": 4}}')
    cfg = make_config(trials=2, policy_path=policy)
    with pytest.raises(Step5Error, match=r"(?s)4 trials failed in a row \(training.max_consecutive_failed_trials = 4\)"
                                         r".*0 of the 2 complete trials.*NaN in X_train") as info:
        AntiOverfitMetaOptimizer(cfg).run()
    assert info.value.exit_code == 1
    assert made[0].closed
    assert not (tmp_path / "out" / "best_model.pth").exists()


@pytest.mark.parametrize("explosion", [RuntimeError, KeyboardInterrupt])
def test_crash_or_ctrl_c_cleans_up_and_leaves_no_trial_running(fake_runner, private_tmp, explosion, make_config):
    made, options = fake_runner
    options.update(explode_on_trial=3, explosion=explosion)
    cfg = make_config(trials=5, trials_in_flight=2)
    with pytest.raises(explosion, match="the runner blew up"):
        AntiOverfitMetaOptimizer(cfg).run()
    assert made[0].closed
    assert list(private_tmp.iterdir()) == []  # the fold dir is removed even on failure
    storage = f"sqlite:///{(cfg.output_dir / 'optuna_step5.db').resolve()}"
    (summary,) = optuna.get_all_study_summaries(storage)
    states = [t.state for t in optuna.load_study(study_name=summary.study_name, storage=storage).trials]
    # Trials 0 and 1 were told; 2 and 3 were in flight together when the runner blew up;
    # trial 4, the one left to ask, may have been asked ahead for the next batch meanwhile
    # (the helper thread is stopped at its next step): failed unrun, never RUNNING.
    assert states[:4] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    assert states[4:] in ([], [TrialState.FAIL])
    assert not (cfg.output_dir / artifacts.SIDECAR_NAME).exists()


def test_an_interrupted_round_is_completed_and_a_finished_one_is_followed_by_a_new_one(
        fake_runner, make_config, study_of):
    """--trials N: N trials per call; a call that finds the last round short of its target
    (its run was interrupted) completes it instead of starting another."""
    made, _ = fake_runner
    cfg = make_config(trials=2)
    first = AntiOverfitMetaOptimizer(cfg).run()
    assert first.sidecar["optuna"]["trials_new"] == 2 and not first.sidecar["optuna"]["resumed"]
    study = study_of(cfg, first)
    assert study.user_attrs[TARGET_ATTR] == 2
    study.set_user_attr(TARGET_ATTR, 3)  # as if that run had been asked for 3 and stopped after 2
    (cfg.output_dir / "best_model.pth").unlink()

    again = AntiOverfitMetaOptimizer(dataclasses.replace(cfg, trials=10)).run()
    assert again.sidecar["optuna"]["study_name"] == first.sidecar["optuna"]["study_name"]
    assert again.sidecar["optuna"]["resumed"] is True
    assert again.sidecar["optuna"]["trials_new"] == 1 and again.sidecar["optuna"]["round_target"] == 3
    assert again.sidecar["optuna"]["trials_run"] == 3
    assert (cfg.output_dir / "best_model.pth").exists()

    more = AntiOverfitMetaOptimizer(dataclasses.replace(cfg, trials=2)).run()
    assert more.sidecar["optuna"]["trials_new"] == 2 and more.sidecar["optuna"]["trials_run"] == 5
    assert study_of(cfg, more).user_attrs[TARGET_ATTR] == 5
    # The resumed sampler is not reseeded to replay the first run's start-up configurations.
    assert more.sidecar["optuna"]["sampler_seed"] != first.sidecar["optuna"]["sampler_seed"]
    study = study_of(cfg, more)
    # Whole configurations, not one value: two of the fixed first trials share a learning rate.
    configs = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(configs)) == len(configs) == 5


@pytest.mark.parametrize("stop_in", ["_train_final", "commit"])
def test_a_run_stopped_after_its_search_leaves_the_round_for_the_same_command_to_build(
        fake_runner, make_config, monkeypatch, caplog, stop_in):
    """Ctrl-C or SIGTERM during the final fit or the commit once left the round complete: the same command
    again ran --trials more trials instead of only building the model its finished search had chosen."""
    cfg = make_config(trials=2)
    owner = AntiOverfitMetaOptimizer if stop_in == "_train_final" else model_set.StagedSet

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt("stopped at the end")

    with monkeypatch.context() as patch:
        patch.setattr(owner, stop_in, stopped)
        with pytest.raises(KeyboardInterrupt, match="stopped at the end"):
            AntiOverfitMetaOptimizer(cfg).run()
    assert not (cfg.output_dir / "best_model.pth").exists()
    with caplog.at_level(logging.INFO, logger="step5.optimizer.optimizer"):
        again = AntiOverfitMetaOptimizer(cfg).run()
    assert again.sidecar["optuna"]["trials_new"] == 0 and again.sidecar["optuna"]["round_target"] == 2
    assert again.sidecar["optuna"]["trials_run"] == 2 and (cfg.output_dir / "best_model.pth").exists()
    assert any("its model was never saved" in r.getMessage() for r in caplog.records)
    more = AntiOverfitMetaOptimizer(cfg).run()  # built: the next run starts a new round
    assert more.sidecar["optuna"]["trials_new"] == 2 and more.sidecar["optuna"]["round_target"] == 4


def test_a_round_left_unbuilt_starts_no_helpers_on_the_other_hosts(fake_runner, make_config, monkeypatch):
    """With nothing to search, the helpers of --cluster-config would only find the round complete and warn."""
    from step5.cluster import HelperFleet

    cfg = make_config(trials=2)
    started: list[list[str]] = []

    def fleet(self, nodes, study_name):
        started.append(list(nodes))
        return HelperFleet([], [])

    monkeypatch.setattr(AntiOverfitMetaOptimizer, "_helper_nodes", lambda self: ["other-host"])
    monkeypatch.setattr(AntiOverfitMetaOptimizer, "_helper_fleet", fleet)
    with monkeypatch.context() as patch:
        patch.setattr(model_set.StagedSet, "commit", lambda self: (_ for _ in ()).throw(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            AntiOverfitMetaOptimizer(cfg).run()
    assert AntiOverfitMetaOptimizer(cfg).run().sidecar["optuna"]["trials_new"] == 0
    AntiOverfitMetaOptimizer(cfg).run()
    assert started == [["other-host"], [], ["other-host"]]


def test_an_interrupt_the_interpreter_dropped_after_the_last_batch_stops_the_run_before_its_commit(
        fake_runner, make_config, monkeypatch):
    """The search loop checks the latch before each batch only: a Ctrl-C or SIGTERM dropped in the last batch or
    the final fit went unnoticed, and the run committed its model and ended 0 as if none had come."""
    from step5 import interrupts

    cfg = make_config(trials=2)
    real = AntiOverfitMetaOptimizer._train_final

    def dropped_during(self, *args, **kwargs):
        monkeypatch.setattr(interrupts, "_latched", KeyboardInterrupt("dropped"))  # what the handler latches
        return real(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(AntiOverfitMetaOptimizer, "_train_final", dropped_during)
        with pytest.raises(KeyboardInterrupt, match="dropped"):
            AntiOverfitMetaOptimizer(cfg).run()
    assert not (cfg.output_dir / "best_model.pth").exists()
    monkeypatch.setattr(interrupts, "_latched", None)
    again = AntiOverfitMetaOptimizer(cfg).run()  # the round is left to build
    assert again.sidecar["optuna"]["trials_new"] == 0 and (cfg.output_dir / "best_model.pth").exists()


def test_a_helper_that_comes_after_the_round_is_complete_starts_no_round(fake_runner, make_config, caplog):
    """A --search-only helper joining once the main process's round is complete (a late ssh start, one by
    hand) once set a new round of its own --trials and ran it: alone, or cut short by the main process,
    and the next run of the main command then only finished that round instead of adding its --trials."""
    cfg = make_config(trials=2, study_name="shared")
    storage = f"sqlite:///{(cfg.output_dir.parent / 'shared.db').resolve()}"
    AntiOverfitMetaOptimizer(dataclasses.replace(cfg, storage=storage)).run()
    helper_cfg = dataclasses.replace(cfg, storage=storage, search_only=True, output_dir=cfg.output_dir.parent / "h")
    with caplog.at_level(logging.WARNING, logger="step5.optimizer.optimizer"):
        late = AntiOverfitMetaOptimizer(helper_cfg).run()
    assert late.status == "SEARCH_ONLY" and late.trials_run == 2
    assert any("a --search-only helper starts no round" in r.getMessage() for r in caplog.records)
    study = optuna.load_study(study_name="shared", storage=storage)
    assert study.user_attrs[TARGET_ATTR] == 2 and len(study.trials) == 2
    again = AntiOverfitMetaOptimizer(dataclasses.replace(cfg, storage=storage)).run()
    assert again.sidecar["optuna"]["trials_new"] == 2 and again.sidecar["optuna"]["round_target"] == 4
    # The first process of a fresh study starts its round, a helper too (helpers may start first).
    first = AntiOverfitMetaOptimizer(dataclasses.replace(helper_cfg, study_name="fresh")).run()
    assert first.status == "SEARCH_ONLY" and first.trials_run == 2


def test_changed_setup_gets_a_new_default_study_and_an_explicit_name_refuses(fake_runner, make_config):
    cfg = make_config(trials=1)
    a = AntiOverfitMetaOptimizer(cfg).run()
    b = AntiOverfitMetaOptimizer(dataclasses.replace(cfg, k_folds=2)).run()
    assert a.sidecar["optuna"]["study_name"] != b.sidecar["optuna"]["study_name"]
    named = dataclasses.replace(cfg, study_name="mine")
    AntiOverfitMetaOptimizer(named).run()
    with pytest.raises(StudyMismatchError, match="k_folds: study has 3, this run 2") as info:
        AntiOverfitMetaOptimizer(dataclasses.replace(named, k_folds=2)).run()
    assert info.value.exit_code == 1  # a run error, not a usage error: a shared study may refuse a helper


@pytest.mark.parametrize("ends", ["complete", "crash", "refused"])
def test_a_run_that_is_over_holds_no_database_connection(fake_runner, make_config, ends):
    """However it ended (a model, a crash, a study that refused it), a run leaves the study's
    database closed: a shared server's connections are everyone's, and --compare-models runs
    four studies in one process. Seen here as the SQLite file no longer open in this process."""
    cfg = make_config(trials=2)
    if ends == "refused":
        AntiOverfitMetaOptimizer(dataclasses.replace(cfg, study_name="mine")).run()
        cfg = dataclasses.replace(cfg, study_name="mine", k_folds=2)
    elif ends == "crash":
        fake_runner[1].update(explode_on_trial=1)
    ending = {"complete": contextlib.nullcontext(), "crash": pytest.raises(RuntimeError, match="the runner blew up"),
              "refused": pytest.raises(StudyMismatchError, match="k_folds: study has 3, this run 2")}[ends]
    with ending:
        AntiOverfitMetaOptimizer(cfg).run()
    db = (cfg.output_dir / "optuna_step5.db").resolve()
    assert db.is_file()
    assert [f.path for f in psutil.Process().open_files() if Path(f.path) == db] == []


def test_degenerate_target_writes_degenerate_sidecar_and_removes_a_stale_model(
    degenerate_inputs, fake_runner, make_config,
):
    made, _ = fake_runner
    cfg = make_config(inputs=degenerate_inputs)
    cfg.output_dir.mkdir(parents=True)
    (cfg.output_dir / "best_model.pth").write_bytes(b"from an earlier run")
    with pytest.raises(DegenerateSignalError) as info:
        AntiOverfitMetaOptimizer(cfg).run()
    assert info.value.exit_code == 2
    assert info.value.outcome.status == "DEGENERATE_SIGNAL"
    sidecar = read_json_file(cfg.output_dir / artifacts.SIDECAR_NAME, "sidecar")
    assert artifacts.validate_sidecar(sidecar) == []
    assert sidecar["outcome"] == "DEGENERATE_SIGNAL"
    assert sidecar["signal_quality"]["prediction_allowed"] is False
    assert not (cfg.output_dir / "best_model.pth").exists()
    assert made == []  # nothing was trained, no process started


def test_a_search_only_helper_on_a_degenerate_target_writes_nothing(degenerate_inputs, fake_runner, make_config):
    # A helper writes no model or sidecar (docs/cluster.md), yet on a degenerate target it committed a degenerate
    # sidecar into its output dir and removed the model there, without looking at the study.
    made, _ = fake_runner
    cfg = make_config(inputs=degenerate_inputs, search_only=True, study_name="shared")
    cfg.output_dir.mkdir(parents=True)
    (cfg.output_dir / "best_model.pth").write_bytes(b"from an earlier run")
    with pytest.raises(DegenerateSignalError, match="a --search-only helper has nothing to search") as info:
        AntiOverfitMetaOptimizer(cfg).run()
    assert info.value.exit_code == 2
    assert sorted(p.name for p in cfg.output_dir.iterdir()) == ["best_model.pth"]
    assert made == []


def test_search_plan_flags_win_over_the_policy_and_fuse_trials_sets_the_batch(tmp_path):
    from step5.optimizer.optimizer import resolve_search_plan
    from step5.policy import load_policy

    policy_on = tmp_path / "on.json"
    write_json_atomic(policy_on, {"training": {"fuse_folds": True, "trials_in_flight": 3}})
    on, off = load_policy(policy_on), load_policy(None)
    cfg = OptimizerConfig(survivors=Path("s.json"), lottery_data=Path("h.json"))

    def plan(policy, capacity=2, neural_net=True, **kw):
        return resolve_search_plan(dataclasses.replace(cfg, **kw), policy, capacity, neural_net=neural_net)

    assert (plan(off).fuse_folds, plan(off).fuse_trials) == (False, False)  # off by default
    assert plan(off).trials_in_flight == 4 and plan(off, capacity=5).trials_in_flight == 10  # 2 per slot
    assert plan(off, neural_net=False).trials_in_flight == 1  # trees: in-process, one at a time
    assert plan(on).fuse_folds is True and "training.fuse_folds" in plan(on).source
    assert plan(on).trials_in_flight == 3  # the policy's key
    assert plan(on, trials_in_flight=7).trials_in_flight == 7  # the flag wins
    assert plan(on, fuse_folds=False).fuse_folds is False
    assert plan(off, fuse_folds=True).fuse_folds is True
    fused = plan(off, fuse_trials=4)
    assert (fused.fuse_folds, fused.fuse_trials, fused.trials_in_flight) == (True, True, 4)
    assert plan(off, neural_net=False, fuse_trials=4).fuse_trials is False  # fusion is NN-only
    with pytest.raises(UsageError, match="--no-fuse-folds forbids"):
        AntiOverfitMetaOptimizer(dataclasses.replace(cfg, fuse_trials=4, fuse_folds=False))
    with pytest.raises(UsageError, match="--trials-in-flight is 2"):
        AntiOverfitMetaOptimizer(dataclasses.replace(cfg, fuse_trials=4, trials_in_flight=2))
    with pytest.raises(UsageError, match="--trials-in-flight must be >= 1"):
        AntiOverfitMetaOptimizer(dataclasses.replace(cfg, trials_in_flight=0))


def test_policy_kill_switch_and_cli_override_reach_the_runner_factory(tmp_path, fake_runner, make_config):
    made, _ = fake_runner
    policy = tmp_path / "policy.json"
    write_json_atomic(policy, {"training": {"use_persistent_workers": True}})
    AntiOverfitMetaOptimizer(make_config(trials=1, policy_path=policy)).run()
    AntiOverfitMetaOptimizer(
        make_config(trials=1, policy_path=policy, persistent_workers=False)
    ).run()
    assert [r.persistent for r in made] == [True, False]


def test_diagnostics_written_per_run(fake_runner, make_config):
    cfg = make_config(trials=2, enable_diagnostics=True)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    (folder,) = [p for p in cfg.diagnostics_dir.iterdir() if p.is_dir()]
    data = read_json_file(folder / "trials.json", "diagnostics")
    assert data["run_id"] == outcome.sidecar["provenance"]["run_id"]
    assert [t["state"] for t in data["trials"]] == ["COMPLETE", "COMPLETE"]
    assert len(data["trials"][0]["folds"]) == cfg.k_folds
    assert {"r2", "train_r2", "val_mse", "duration"} <= set(data["trials"][0]["folds"][0])
    assert (folder / "timings.png").stat().st_size > 0


def test_too_few_rows_for_the_folds_is_a_data_error(tmp_path, fake_runner, make_config):
    from step5.data.sample import write_sample
    from step5.errors import DataError

    survivors, history = write_sample(tmp_path / "tiny", n_survivors=12, n_features=6, seed=1)
    cfg = make_config(inputs=(survivors, history), k_folds=5, test_holdout=0.5)
    with pytest.raises(DataError, match=r"12 records leave 6 development rows after holding out 6 for testing "
                                        r"\(--test-holdout 0.5\); 5-fold CV needs at least 10"):
        AntiOverfitMetaOptimizer(cfg).run()
    # Enough rows for the folds, one for the test R²: found before the search, not when the final model is scored.
    cfg = make_config(inputs=(survivors, history), k_folds=2, test_holdout=0.05)
    with pytest.raises(DataError, match=r"12 records leave 1 for testing \(--test-holdout 0.05\); the test R² needs "
                                        r"at least 2"):
        AntiOverfitMetaOptimizer(cfg).run()
    assert not (cfg.output_dir / "optuna_step5.db").exists()


def test_target_storage_and_data_context_flags_are_honoured(tmp_path, fake_runner, make_config):
    storage = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    cfg = make_config(trials=1, target="lane_agreement_8", storage=storage,
                      study_name="named", prng_type="xorshift32", mod=997, holdout_draws=25, parent_run_id="p-1")
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    sc = outcome.sidecar
    assert sc["data_context"]["target"] == "lane_agreement_8"
    assert "lane_agreement_8" in sc["feature_schema"]["excluded_features"]
    assert "lane_agreement_8" not in sc["feature_schema"]["feature_names"]
    assert sc["data_context"]["prng_hypothesis"] == {"prng_type": "xorshift32", "mod": 997}
    assert sc["data_context"]["holdout_window"] == {"start_draw": 501, "end_draw": 525, "draw_count": 25}
    assert sc["optuna"]["study_name"] == "named" and sc["optuna"]["storage"] == storage
    assert optuna.load_study(study_name="named", storage=storage).trials[0].state == TrialState.COMPLETE
    assert not (cfg.output_dir / "optuna_step5.db").exists()
    assert sc["provenance"]["parent_run_id"] == "p-1"
    # The recorded prng type / mod are part of the data fingerprint.
    other = AntiOverfitMetaOptimizer(dataclasses.replace(cfg, mod=1000, study_name="named2")).run()
    assert other.sidecar["data_context"]["fingerprint_hash"] != sc["data_context"]["fingerprint_hash"]


def test_survivors_that_repeat_a_row_split_as_groups_are_warned_about_and_counted(tmp_path, fake_runner, make_config,
                                                                                    caplog):
    """Copies of a row on both sides of a split score a model on rows it trained on (the pipeline's own
    sanity_tests.py --test dedup looks for them): every split keeps a row's copies on one side, the run
    warns, the sidecar counts them, and data without repeats splits exactly as before."""
    from step5.data.sample import write_sample
    from step5.optimizer.optimizer import load_inputs

    survivors, history = write_sample(tmp_path / "data", n_survivors=60, n_features=5, seed=3)
    records = read_json_file(survivors, "survivors")
    survivors.write_text(json.dumps(records + records[:7] + records[:3]))  # ten copies of seven survivors
    cfg = make_config(inputs=(survivors, history), trials=1, rescore_partitions=2)
    with caplog.at_level(logging.WARNING, logger="step5.optimizer.optimizer"):
        outcome = AntiOverfitMetaOptimizer(cfg).run()
    assert outcome.sidecar["data_context"]["repeated_feature_rows"] == 10
    assert f"survivors file {survivors}: 10 of 70 rows repeat another row's features exactly" in caplog.text

    inputs = load_inputs(cfg)
    optimizer = AntiOverfitMetaOptimizer(cfg, inputs=inputs)
    assert optimizer._setup(inputs)["split"] == "grouped_repeated_rows"  # other folds: not a study from before
    cv = optimizer._split(inputs)

    def keys(X: np.ndarray) -> set[bytes]:
        return {row.tobytes() for row in X}

    assert not keys(cv.X_dev) & keys(cv.X_test)
    assert len(cv.y_dev) + len(cv.y_test) == 70
    for number in range(1 + 2):  # the search's partition and the two rescore partitions
        for train, val in cv.partition(number):
            assert not keys(cv.X_dev[train]) & keys(cv.X_dev[val]) and len(train) + len(val) == len(cv.y_dev)
    assert not keys(cv.X_dev[cv.final_fit_idx]) & keys(cv.X_dev[cv.final_es_idx])

    clean = AntiOverfitMetaOptimizer(make_config(name="clean", trials=1))
    assert clean.run().sidecar["data_context"]["repeated_feature_rows"] == 0
    assert "split" not in clean._setup(load_inputs(clean.config))


@pytest.mark.parametrize("name", ["a%20b", "a?b#c", "ü ñ"])
def test_an_output_dir_whose_name_reads_as_url_syntax_keeps_its_study_inside_it(fake_runner, make_config, name):
    """The default study database is a URL made from the output dir: unescaped, ``%20`` read as a space
    (no such folder: "unable to open database file") and ``?`` cut the path short (a database at
    ``<tmp>/a``, outside the output dir)."""
    cfg = make_config(name, trials=1)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    assert (cfg.output_dir / "optuna_step5.db").is_file()
    assert [p.name for p in cfg.output_dir.parent.iterdir()] == [name]  # nothing written beside it
    assert optuna.load_study(study_name=outcome.sidecar["optuna"]["study_name"],
                             storage=outcome.sidecar["optuna"]["storage"]).trials[0].state == TrialState.COMPLETE
