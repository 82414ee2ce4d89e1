"""Fused training through the one ask/tell loop: --fuse-folds and --fuse-trials N.

In-process runs with fake fold runners: a fake that records every ``run`` call's groups and
answers like the pool does (every job's outcome in place), and the real WorkerPool driving
the fake worker script, whose results are a pure function of the request. The real
trainers are in test_opt_fused_cli.py.
"""
from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path
from typing import Sequence

import optuna
import pytest
from optuna.trial import TrialState

from step5 import artifacts
from step5.execution.pool import WorkerPool
from step5.jsonio import read_json_file
from step5.optimizer import AntiOverfitMetaOptimizer
from step5.optimizer import backends as backends_module
from step5.optimizer import optimizer as optimizer_module
from step5.optimizer.backends import fold_seed, fusion_groups, plan_groups
from step5.protocol import FUSE_KEYS, NNParams, TrainRequest, fusion_key
from step5.testing import fake_pool
from step5.testing.fake_runner import install_fake_runner


@pytest.fixture
def config_defaults() -> dict:
    """This module's runs: 3 trials x 3 folds on two slots."""
    return dict(cpu_workers=2)


@pytest.fixture
def runners(monkeypatch):
    """Install a FakeFoldRunner factory; returns (runners made, options for the next ones)."""
    return install_fake_runner(
        monkeypatch, mode="persistent_workers", seed_in_metrics=True,
        failure=("loss diverged to NaN at epoch 3", "train_error", 0),
    )


def _trial_calls(runner) -> list[list[list[TrainRequest]]]:
    """The runner's calls that trained trials (not the final model)."""
    return runner.train_calls


def _table(study: optuna.Study) -> list[tuple[int, str, float | None, dict]]:
    return [(t.number, t.state.name, t.value, t.user_attrs.get("params")) for t in study.trials]


# ---------------------------------------------------------------------------- grouping


def _req(trial: int, fold: int, hidden: Sequence[int], lr: float = 1e-3, optimizer: str = "adam") -> TrainRequest:
    return TrainRequest("f.npz", NNParams(hidden_layers=tuple(hidden), learning_rate=lr, optimizer=optimizer),
                        trial_number=trial, fold_idx=fold)


def test_fusion_key_mirrors_the_worker_list_and_ignores_per_model_params():
    assert FUSE_KEYS == ("hidden_layers", "optimizer", "epochs", "normalize_features", "use_leaky_relu")
    a, b = _req(0, 0, [64, 32], lr=1e-3), _req(1, 0, [64, 32], lr=5e-3)
    assert fusion_key(a) == fusion_key(dataclasses.replace(b, seed=99))  # lr, seed: per model
    assert fusion_key(a) != fusion_key(_req(2, 0, [64, 64]))
    assert fusion_key(a) != fusion_key(_req(3, 0, [64, 32], optimizer="adamw"))
    assert fusion_key(a) != fusion_key(dataclasses.replace(a, use_leaky_relu=False))


def test_fusion_groups_by_shape_then_splits_to_fill_the_device_slots():
    trials = {0: [_req(0, f, [64]) for f in range(2)], 1: [_req(1, f, [128]) for f in range(2)],
              2: [_req(2, f, [64], lr=0.01) for f in range(2)], 3: [_req(3, f, [64]) for f in range(2)],
              4: [_req(4, f, [32, 32]) for f in range(2)]}
    assert fusion_groups(trials, 1) == [[0, 2, 3], [1], [4]]
    assert fusion_groups(trials, 4) == [[0, 2], [3], [1], [4]]  # the biggest group split in place, by trials
    assert fusion_groups({0: trials[0]}, 4) == [[0]]  # a lone trial is never split
    assert sorted(sum(fusion_groups(trials, 8), [])) == [0, 1, 2, 3, 4]


def test_batch_size_separates_trials_only_when_their_folds_train_in_mini_batches():
    small, big = _req(0, 0, [64]), dataclasses.replace(_req(1, 0, [64]), params=NNParams(hidden_layers=(64,), batch_size=64))
    trials = {0: [small], 1: [big]}
    # "auto" resolves to full batch for a 500-row fold: batch_size is unused, the trials fuse.
    assert fusion_groups(trials, 1, {"f.npz": 500}) == [[0, 1]]
    assert fusion_key(small, 500) == fusion_key(big, 500)
    # Above the auto threshold the folds train in mini-batches of different sizes: no fusing.
    assert fusion_groups(trials, 1, {"f.npz": 20_000}) == [[0], [1]]
    # Unknown fold size: "auto" cannot be resolved, so only identical batch sizes fuse.
    assert fusion_groups(trials, 1) == [[0], [1]]


def test_plan_groups_makes_one_path_for_every_fusion_setting_longest_first():
    trials = {0: [_req(0, f, [64]) for f in range(2)], 1: [_req(1, f, [128, 64]) for f in range(2)],
              2: [_req(2, f, [64], lr=0.01) for f in range(2)]}

    def shape(groups):
        return [[(r.trial_number, r.fold_idx) for r in g] for g in groups]

    # Fold by fold: six groups of one, the widest trial's folds first (estimated cost).
    alone = plan_groups(trials, fuse_folds=False, fuse_trials=False, capacity=2)
    assert shape(alone) == [[(1, 0)], [(1, 1)], [(0, 0)], [(0, 1)], [(2, 0)], [(2, 1)]]
    # Fused folds: one group per trial.
    assert shape(plan_groups(trials, fuse_folds=True, fuse_trials=False, capacity=2)) == [
        [(1, 0), (1, 1)], [(0, 0), (0, 1)], [(2, 0), (2, 1)]]
    # Fused trials: same shapes together (0 and 2); the wider trial 1 is still the costlier group.
    assert shape(plan_groups(trials, fuse_folds=True, fuse_trials=True, capacity=1)) == [
        [(1, 0), (1, 1)], [(0, 0), (0, 1), (2, 0), (2, 1)]]


# ---------------------------------------------------------------------------- --fuse-folds


def test_fuse_folds_sends_each_trial_as_one_group_with_the_unfused_requests(runners, make_config, study_of):
    made, _ = runners
    plain = AntiOverfitMetaOptimizer(make_config("plain")).run()
    fused_cfg = make_config("fused", fuse_folds=True)
    fused = AntiOverfitMetaOptimizer(fused_cfg).run()
    unfused_runner, fused_runner = made

    assert _table(study_of(fused_cfg, fused)) == _table(study_of(make_config("plain"), plain))
    assert fused.sidecar["optuna"]["best_value"] == plain.sidecar["optuna"]["best_value"]
    # Four trials in flight (two per slot of the fake's two), so the 3 trials are one batch:
    # one group of K folds per trial; then the final model: one merge of the best trial's K
    # fold models, which the search already trained (nothing is trained again).
    assert [[len(g) for g in call] for call in fused_runner.calls] == [[3, 3, 3], [1]]
    assert [[len(g) for g in call] for call in unfused_runner.calls] == [[1] * 9, [1]]
    sent = sorted((r.trial_number, r.fold_idx, r.seed, Path(r.data_path).name)
                  for call in _trial_calls(fused_runner) for g in call for r in g)
    assert sent == sorted(
        (r.trial_number, r.fold_idx, r.seed, Path(r.data_path).name)
        for r in unfused_runner.requests
    )
    search = fused.sidecar["execution"]["search"]
    assert (search["fuse_folds"], search["fuse_trials"], search["trials_in_flight"], search["batches"]) == (
        True, False, 4, 1)
    fusion = fused.sidecar["execution"]["fusion"]
    assert (fusion["groups"], fusion["jobs"], fusion["fused_groups"], fusion["largest_group"]) == (4, 9, 3, 3)
    assert plain.sidecar["execution"]["search"]["fuse_folds"] is False
    assert artifacts.validate_sidecar(fused.sidecar) == []


def test_policy_fuse_folds_reaches_the_backend(tmp_path, runners, make_config):
    from step5.jsonio import write_json_atomic

    made, _ = runners
    policy = tmp_path / "policy.json"
    write_json_atomic(policy, {"training": {"fuse_folds": True}})
    AntiOverfitMetaOptimizer(make_config("a", trials=1, policy_path=policy)).run()
    AntiOverfitMetaOptimizer(make_config("b", trials=1, policy_path=policy,
                                         fuse_folds=False)).run()
    # The policy fuses the trial's folds (the final model merges them: nothing to fuse);
    # --no-fuse-folds wins.
    assert [len(r.fused_groups) for r in made] == [1, 0]


# ---------------------------------------------------------------------------- --fuse-trials


def test_trial_batches_tell_every_trial_exactly_once_with_the_unfused_values(runners, make_config, study_of):
    made, _ = runners
    plain_cfg = make_config("plain", trials=7, k_folds=2)
    plain = AntiOverfitMetaOptimizer(plain_cfg).run()
    cfg = make_config("batched", trials=7, k_folds=2, fuse_trials=3)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    runner = made[1]
    study = study_of(cfg, outcome)

    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 7  # none RUNNING, none twice
    assert outcome.sidecar["optuna"]["trials_run"] == 7 and outcome.sidecar["optuna"]["trials_new"] == 7
    # Batches of 3, 3, 1 trials; every trial's 2 folds sent exactly once, with the unfused seeds.
    per_call = [sorted({r.trial_number for g in call for r in g}) for call in _trial_calls(runner)]
    assert per_call == [[0, 1, 2], [3, 4, 5], [6]]
    sent = sorted((r.trial_number, r.fold_idx, r.seed) for call in _trial_calls(runner) for g in call for r in g)
    assert sent == [(t, f, fold_seed(cfg.seed, t, f)) for t in range(7) for f in range(2)]
    for call in _trial_calls(runner):
        for g in call:  # a group holds whole trials
            trials = {r.trial_number for r in g}
            assert len(g) == 2 * len(trials)
    assert [t.user_attrs["batch"]["trials"] for t in study.trials] == [[0, 1, 2]] * 3 + [[3, 4, 5]] * 3 + [[6]]
    # The sampler's start-up trials are the same configurations: same params, same values.
    assert _table(study) == _table(study_of(plain_cfg, plain))
    search = outcome.sidecar["execution"]["search"]
    assert (search["fuse_folds"], search["fuse_trials"], search["trials_in_flight"], search["batches"]) == (
        True, True, 3, 3)
    # The final model merges the best trial's folds: no fold is trained again.
    assert outcome.sidecar["execution"]["fusion"]["jobs"] == 14


def test_trial_batches_group_same_shapes_into_one_group(runners, monkeypatch, make_config):
    made, _ = runners
    shapes = {0: [64], 1: [128], 2: [64], 3: [64]}
    real = backends_module.NNBackend.suggest

    def suggest(self, trial):
        # The search space rarely draws two equal shapes in 4 trials; pin them (and the
        # other shape-fixing params), keep the per-model ones as drawn.
        params = real(self, trial)
        params.update(hidden_layers=shapes[trial.number], optimizer="adam", batch_size=128)
        return params

    monkeypatch.setattr(backends_module.NNBackend, "suggest", suggest)
    cfg = make_config(trials=4, k_folds=2, fuse_trials=4, cpu_workers=1)
    AntiOverfitMetaOptimizer(cfg).run()
    (call,) = _trial_calls(made[0])
    assert [sorted({r.trial_number for r in g}) for g in call] == [[0, 2, 3], [1]]
    assert len({(r.params.learning_rate, r.params.weight_decay) for r in call[0]}) == 3  # per-model values


def test_a_failing_trial_in_a_batch_fails_only_itself(runners, caplog, make_config, study_of):
    made, options = runners
    options["fail_trials"] = [1]
    cfg = make_config(trials=4, k_folds=2, fuse_trials=4)
    with caplog.at_level(logging.WARNING):
        outcome = AntiOverfitMetaOptimizer(cfg).run()
    study = study_of(cfg, outcome)
    # Trial 1 failed and was replaced (trial 4): --trials 4 means four COMPLETE trials.
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert "loss diverged to NaN" in study.trials[1].user_attrs["fail_reason"]
    assert "Trial 1 failed with parameters" in caplog.text and "loss diverged to NaN" in caplog.text
    # One call trained the whole batch: trial 1's failure cost the others nothing.
    calls = [sorted({r.trial_number for g in c for r in g}) for c in _trial_calls(made[0])]
    assert calls == [[0, 1, 2, 3], [4]]
    assert outcome.sidecar["optuna"]["trials_failed"] == 1 and outcome.sidecar["optuna"]["trials_run"] == 4


def test_batches_whose_trials_all_fail_stop_the_run_naming_the_reason(runners, make_config):
    from step5.errors import Step5Error

    _, options = runners
    options["fail_trials"] = range(100)
    with pytest.raises(Step5Error, match="(?s)10 trials failed in a row.*0 of the 2 complete.*loss diverged"):
        AntiOverfitMetaOptimizer(make_config(trials=2, fuse_trials=2)).run()


@pytest.mark.parametrize("explosion", [RuntimeError, KeyboardInterrupt])
def test_crash_or_ctrl_c_mid_batch_fails_the_whole_batch_and_leaves_no_trial_running(
    tmp_path, runners, explosion, caplog, make_config,
):
    import tempfile

    made, options = runners
    options.update(explode_on_trial=4, explosion=explosion)
    private = tmp_path / "tmp"
    private.mkdir()
    cfg = make_config(trials=6, k_folds=2, fuse_trials=3)
    old = tempfile.tempdir
    tempfile.tempdir = str(private)
    try:
        with caplog.at_level(logging.WARNING), pytest.raises(explosion, match="the runner blew up"):
            AntiOverfitMetaOptimizer(cfg).run()
    finally:
        tempfile.tempdir = old
    assert made[0].closed and list(private.iterdir()) == []
    storage = f"sqlite:///{(cfg.output_dir / 'optuna_step5.db').resolve()}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3 + ["FAIL"] * 3
    assert all("interrupted" in t.user_attrs["fail_reason"] for t in trials[3:])
    # a crash is logged per trial; an interrupt is reported in one line by the CLI (issue 13)
    assert ("Trial 5 failed with parameters" in caplog.text) == (explosion is not KeyboardInterrupt)


def test_resumed_study_is_topped_up_in_batches(runners, make_config):
    made, _ = runners
    cfg = make_config(trials=2, k_folds=2)
    first = AntiOverfitMetaOptimizer(cfg).run()
    more = AntiOverfitMetaOptimizer(dataclasses.replace(cfg, trials=3, fuse_trials=2)).run()
    # Fusion does not change what a trial measures: the same study is resumed.
    assert more.sidecar["optuna"]["study_name"] == first.sidecar["optuna"]["study_name"]
    assert more.sidecar["optuna"]["trials_new"] == 3 and more.sidecar["optuna"]["trials_run"] == 5
    calls = [sorted({r.trial_number for g in c for r in g}) for c in _trial_calls(made[1])]
    # Then, when the best trial is one of the first run's, its folds are trained again for
    # the final model (this process never held its fold models); one of its own is merged.
    best = more.sidecar["optuna"]["best_trial_number"]
    assert calls == [[2, 3], [4]] + ([[best]] if best < 2 else [])


def test_tree_models_say_that_neural_net_flags_do_not_apply(caplog, monkeypatch, make_config):
    from step5.models import trees

    seen: list[dict] = []
    real = trees.train_fold

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(trees, "train_fold", spy)
    cfg = make_config(model_type="lightgbm", trials=1, k_folds=2, fuse_trials=3,
                      dropout=0.2, cpu_workers=1, command_line=["step5", "--normalize-features"])
    with caplog.at_level(logging.INFO, logger="step5.optimizer.optimizer"):
        outcome = AntiOverfitMetaOptimizer(cfg).run()
    lines = [r.getMessage() for r in caplog.records if "do not apply to lightgbm" in r.getMessage()]
    assert len(lines) == 1
    for flag in ("normalize-features=True", "dropout=0.2", "fuse-trials=3"):
        assert flag in lines[0]
    assert "use-leaky-relu" not in lines[0]  # neither typed nor changed
    # --cpu-workers is the library's thread count; feature names reach every fit.
    assert seen and all(k["n_threads"] == 1 for k in seen)
    assert all(k["feature_names"] == outcome.sidecar["feature_schema"]["feature_names"] for k in seen)
    search = outcome.sidecar["execution"]["search"]
    assert (search["fuse_folds"], search["fuse_trials"], search["trials_in_flight"]) == (False, False, 1)
    assert outcome.sidecar["execution"]["mode"] == "inline"
    assert artifacts.validate_sidecar(outcome.sidecar) == []
    assert outcome.sidecar["training_options"]["n_threads"] == 1


# ---------------------------------------------------------------------------- the real pool


def _install_fake_pool(monkeypatch, *options: str) -> list[WorkerPool]:
    made: list[WorkerPool] = []

    def factory(slots, policy, *, persistent, wait=True):
        made.append(fake_pool(2, *options, worker_job_timeout_s=10.0, worker_ready_timeout_s=20.0, shutdown_timeout_s=5.0,
                              wait=wait))
        return made[-1]

    monkeypatch.setattr(optimizer_module, "WorkerPool", factory)
    return made


def _spy_search_requests(monkeypatch) -> dict[int, list[TrainRequest]]:
    sent: dict[int, list[TrainRequest]] = {}
    real = backends_module.NNBackend.search_requests

    def search_requests(self, trial_number, params):  # a trial's jobs, not the final model's
        sent[trial_number] = requests = real(self, trial_number, params)
        return requests

    monkeypatch.setattr(backends_module.NNBackend, "search_requests", search_requests)
    return sent


def test_pool_worker_crash_in_a_fused_group_falls_back_with_the_undisturbed_results(
    tmp_path, monkeypatch, make_config, study_of,
):
    from step5.testing.fake_worker import fake_metrics

    # Both workers' first launches SIGKILL themselves after one answer: mid fused group.
    state = tmp_path / "state"
    state.mkdir()
    _install_fake_pool(monkeypatch, "--fault", "sigkill", "--after", "1", "--faulty-starts", "2",
                       "--state-dir", str(state))
    sent = _spy_search_requests(monkeypatch)
    cfg = make_config(trials=4, k_folds=2, fuse_trials=2)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    study = study_of(cfg, outcome)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 4
    for t in study.trials:  # the fake's results are a pure function of the request
        assert [f["r2"] for f in t.user_attrs["folds"]] == [fake_metrics(r)["r2"] for r in sent[t.number]]
    execution = outcome.sidecar["execution"]
    assert any(c["status"] == "SIGKILL(-9)" for c in execution["faults"])
    assert execution["search"]["batches"] == 2 and execution["fusion"]["rerun_jobs"] == 0


def test_the_workers_boot_while_the_rows_are_split_and_the_study_is_opened(monkeypatch, make_config, caplog):
    """Booting torch (and CUDA) takes seconds the parent spends splitting the rows, writing
    nothing yet, and opening the study: the pool starts before them and is waited for after."""
    caplog.set_level(logging.INFO)
    made = _install_fake_pool(monkeypatch, "--boot-s", "1.0")
    outcome = AntiOverfitMetaOptimizer(make_config(trials=2, k_folds=2)).run()
    assert len(made) == 1
    order = [m for m in caplog.messages if m.startswith(("neural-net folds run on", "split "))]
    assert [m.split(" ")[0] for m in order] == ["neural-net", "split"]  # the pool starts first
    boots = [float(m) for m in re.findall(r"worker CPU-\d \(pid \d+\) ready on \S+ \(\S+\) in ([\d.]+)s",
                                           "\n".join(caplog.messages))]
    assert boots and min(boots) >= 1.0
    # The run waited only for what was left of the boot once the rows were split and the study open.
    assert outcome.sidecar["execution"]["timings"]["runner_start_s"] < min(boots)


def test_pool_job_error_in_a_fused_batch_fails_only_that_trial(tmp_path, monkeypatch, make_config, study_of):
    """A trial whose fold data is missing: the worker answers data_error in that job's place,
    and the pool hands it back beside the other jobs' results: nothing is trained twice."""
    _install_fake_pool(monkeypatch)
    real = backends_module.NNBackend.search_requests

    def search_requests(self, trial_number, params):
        requests = real(self, trial_number, params)
        if trial_number == 2:
            requests[1] = dataclasses.replace(requests[1], data_path=str(tmp_path / "gone.npz"))
        return requests

    monkeypatch.setattr(backends_module.NNBackend, "search_requests", search_requests)
    cfg = make_config(trials=4, k_folds=2, fuse_trials=4)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    study = study_of(cfg, outcome)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "data_error (fold 1): NPZ file not found" in study.trials[2].user_attrs["fail_reason"]
    execution = outcome.sidecar["execution"]
    assert execution["fusion"]["rerun_jobs"] == 1  # the failed fold's unfused verdict
    # 4 trials x 2 folds in the first batch, each trained once (fused), trial 2's
    # replacement (2 folds), then the final model: one merge of the best trial's folds.
    assert execution["timings"]["jobs"] == 7 + 2 + 1
    assert execution["search"]["replaced_trials"] == 1
    sidecar = read_json_file(cfg.output_dir / artifacts.SIDECAR_NAME, "sidecar")
    assert artifacts.validate_sidecar(sidecar) == []


def test_batched_trials_get_heartbeats_so_a_killed_batch_is_failed_later(tmp_path):
    """A batch's trials are asked outside study.optimize; their heartbeats are what lets a
    later run fail them if this process is SIGKILLed mid-batch."""
    import time
    import warnings

    from step5.optimizer.study import OpenedStudy, TrialHeartbeats

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path / 'hb.db'}", heartbeat_interval=1, grace_period=1)
        study = optuna.create_study(storage=storage, study_name="hb", direction="maximize")
        beaten, silent = study.ask(), study.ask()
    opened = OpenedStudy(study=study, study_name="hb", storage_url="", resumed=False, complete_before=0,
                         trials_before=0, sampler_seed=0, storage=storage)
    heartbeats = TrialHeartbeats(opened)
    heartbeats.add(beaten)  # before the thread starts: its first beat is at once
    with heartbeats:
        time.sleep(0.2)
    # Until the beaten trial's heartbeat is past the grace period (stale), which takes up to 2 s
    # (SQLite stores it to the second): each look fails the stale trials, as a later run would.
    deadline = time.monotonic() + 20
    while study.get_trials()[beaten.number].state == TrialState.RUNNING:
        assert time.monotonic() < deadline, "the beaten trial's heartbeat never went stale"
        time.sleep(0.05)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states == {beaten.number: TrialState.FAIL, silent.number: TrialState.RUNNING}


@pytest.mark.parametrize("fuse", [{}, {"fuse_trials": 3}], ids=["fold-by-fold", "fused-trials"])
def test_same_seed_and_trials_in_flight_give_the_same_study_with_several_workers(
    monkeypatch, fuse, make_config, study_of,
):
    """Two workers finish jobs in whatever order they like; the loop tells trials in ask
    order and the sampler (TPE, constant liar) sees the same history at every ask, so a
    re-run is the same study: same params, same values, same best trial."""
    _install_fake_pool(monkeypatch, "--job-s", "0.02")
    tables, best = [], []
    for name in ("first", "second"):
        cfg = make_config(name, trials=13, k_folds=2, trials_in_flight=3, **fuse)
        outcome = AntiOverfitMetaOptimizer(cfg).run()
        tables.append(_table(study_of(cfg, outcome)))
        best.append((outcome.sidecar["optuna"]["best_trial_number"], outcome.sidecar["optuna"]["best_value"]))
        assert outcome.sidecar["execution"]["search"]["trials_in_flight"] == 3
    assert len(tables[0]) == 13 and all(state == "COMPLETE" for _, state, _, _ in tables[0])
    assert tables[0] == tables[1]
    assert best[0] == best[1]


def test_a_trial_whose_jobs_kill_their_process_every_time_fails_alone_and_is_replaced(
    monkeypatch, make_config, study_of, caplog,
):
    from step5.testing.fake_worker import fake_metrics

    caplog.set_level(logging.INFO, logger="step5.optimizer.search")
    monkeypatch.setenv("STEP5_FAKE_POISON_TRIAL", "1")
    _install_fake_pool(monkeypatch)
    sent = _spy_search_requests(monkeypatch)
    cfg = make_config(trials=3, k_folds=2)
    outcome = AntiOverfitMetaOptimizer(cfg).run()
    study = study_of(cfg, outcome)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    reason = study.trials[1].user_attrs["fail_reason"]
    assert "infrastructure fault(s)" in reason and "SIGKILL(-9)" in reason
    assert "training.max_job_reruns" in reason
    # The progress counts complete trials: the replaced one does not push [i/n] past n.
    progress = [r.getMessage() for r in caplog.records if re.match(r"\[\d+/\d+\]", r.getMessage())]
    assert [m.split("]")[0] + "]" for m in progress] == ["[1/3]", "[1/3]", "[2/3]", "[3/3]"]
    assert "trial 1 FAIL, replaced" in progress[1]
    for t in study.trials:  # the complete trials are untouched by the faults
        if t.state.name == "COMPLETE":
            assert [f["r2"] for f in t.user_attrs["folds"]] == [fake_metrics(r)["r2"] for r in sent[t.number]]
    execution = outcome.sidecar["execution"]
    assert execution["search"]["failed_trials"] == 1 and execution["search"]["replaced_trials"] == 1
    assert execution["recovery"]["refused_reruns"] >= 1 and execution["recovery"]["faults"] >= 4


def test_a_tree_model_given_more_threads_than_cores_warns(caplog, monkeypatch, make_config):
    # plan_slots warns a net's workers; a tree model's --cpu-workers (its library's threads) never did:
    # lightgbm with 1024 threads on 2 cores finished no trial in 120 s without a word.
    monkeypatch.setattr(optimizer_module.os, "cpu_count", lambda: 1)
    cfg = make_config(model_type="xgboost", trials=1, k_folds=2, cpu_workers=3)
    with caplog.at_level(logging.INFO, logger="step5.optimizer.optimizer"):
        AntiOverfitMetaOptimizer(cfg).run()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--cpu-workers" in r.getMessage()]
    assert len(warned) == 1 and "--cpu-workers 3 on 1 core(s): xgboost trains with 3 threads" in warned[0]
    caplog.clear()
    monkeypatch.setattr(optimizer_module.os, "cpu_count", lambda: 4)
    with caplog.at_level(logging.INFO, logger="step5.optimizer.optimizer"):
        AntiOverfitMetaOptimizer(dataclasses.replace(cfg, output_dir=cfg.output_dir.parent / "b")).run()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and "--cpu-workers" in r.getMessage()]
    assert any("xgboost trains with 3 thread(s)" in r.getMessage() for r in caplog.records)
