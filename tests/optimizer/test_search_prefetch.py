"""The search loop asks, claims and samples the next batch while the current one trains
(step5.optimizer.search.Prefetch): the study still ends with exactly --trials COMPLETE
trials, the prefetched trials beat while they wait, whatever stops the run fails them
instead of leaving them RUNNING, and a seed still gives the same study every run.

Driven through ``run_search`` with a backend whose folds sleep, on a SQLite study opened
as the optimizer opens it (retrying storage, heartbeats, the study lock).
"""
from __future__ import annotations

import random
import sqlite3
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import optuna
import pytest
import sqlalchemy.exc as sa_exc
from optuna.trial import TrialState

from step5.errors import JobError, StorageError
from step5.optimizer.search import SearchGoal, SearchPlan, run_search
from step5.optimizer.study import OpenedStudy, open_study
from step5.policy import TrainingPolicy

SETUP = {"model_type": "neural_net", "seed": 1, "k_folds": 2}
DATA = {"fingerprint_hash": "abc", "survivor_count": 10, "training_window_draws": 5}


class SleepyBackend:
    """Folds that sleep; the objective follows the params, so the sampler has something to learn."""

    model_type = "neural_net"

    def __init__(self, sleep_s: float = 0.05, jitter_s: float = 0.0,
                 on_run: Callable[[int, list[int]], None] | None = None,
                 on_suggest: Callable[[int], None] | None = None, fail: frozenset[int] = frozenset()) -> None:
        self.sleep_s, self.jitter_s, self.on_run, self.on_suggest, self.fail = sleep_s, jitter_s, on_run, on_suggest, fail
        self.batches: list[list[int]] = []

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        if self.on_suggest is not None:
            self.on_suggest(trial.number)
        return {"x": trial.suggest_float("x", -1.0, 1.0), "depth": trial.suggest_int("depth", 1, 50)}

    def run_trials(self, trials: list[tuple[int, dict[str, Any]]], gate: Any = None) -> list[Any]:
        numbers = [n for n, _ in trials]
        self.batches.append(numbers)
        if self.on_run is not None:
            self.on_run(len(self.batches) - 1, numbers)
        time.sleep(self.sleep_s + random.uniform(0, self.jitter_s))  # the slots finish in any order, at any time
        outcomes: list[Any] = []
        for number, p in trials:
            if number in self.fail:
                outcomes.append(JobError("the fold failed", trial_number=number, fold_idx=0))
                continue
            r2 = 0.9 - p["x"] ** 2 - p["depth"] / 100
            outcomes.append([{"r2": r2, "train_r2": r2 + 0.01, "val_mse": 1 - r2, "train_mse": 0.99 - r2}] * 2)
        return outcomes


def _open(tmp_path: Path, name: str = "s", *, seed: int = 7, trials: int = 8,
          training: TrainingPolicy | None = None) -> OpenedStudy:
    url = f"sqlite:///{tmp_path / (name + '.db')}"
    return open_study(study_name=name, storage_url=url, setup=SETUP, data=DATA, seed=seed, trials=trials,
                      training=training or TrainingPolicy())


def _search(opened: OpenedStudy, backend: SleepyBackend, *, trials: int, in_flight: int,
            reclaim_every_s: float = 10.0) -> None:
    plan = SearchPlan(trials_in_flight=in_flight, fuse_folds=False, fuse_trials=False, source="test")
    goal = SearchGoal(complete=trials, new_trials=trials, poll_s=0.05, reclaim_every_s=reclaim_every_s)
    run_search(opened, backend, plan, goal, lambda study, trial: None)


def _by_state(study: optuna.Study) -> dict[TrialState, list[int]]:
    out: dict[TrialState, list[int]] = {}
    for t in study.get_trials(deepcopy=False):
        out.setdefault(t.state, []).append(t.number)
    return out


def test_the_next_batch_is_asked_while_one_trains_and_the_study_ends_at_exactly_n(tmp_path):
    opened = _open(tmp_path, trials=7)
    backend = SleepyBackend(sleep_s=0.3, fail=frozenset({1}))  # trial 1 fails: it is replaced
    _search(opened, backend, trials=7, in_flight=3)
    study = opened.study
    states = _by_state(study)
    assert len(states[TrialState.COMPLETE]) == 7
    assert states[TrialState.FAIL] == [1]
    assert set(states) == {TrialState.COMPLETE, TrialState.FAIL}  # none RUNNING or WAITING
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 7
    # Each batch after the first was asked and sampled before the one before it was told.
    trials = study.get_trials(deepcopy=False)
    for previous, batch in zip(backend.batches, backend.batches[1:]):
        assert max(trials[n].datetime_start for n in batch) < min(trials[n].datetime_complete for n in previous)
        assert all(trials[n].user_attrs["batch"]["trials"] == batch for n in batch)
    assert [len(b) for b in backend.batches] == [3, 3, 2]  # the last ask only had room for what was left


def test_prefetched_trials_beat_while_they_wait_so_no_process_takes_them_for_dead(tmp_path):
    # SQLite stores heartbeats to the second: a grace period under 1 s + the interval would fail live trials.
    training = TrainingPolicy(heartbeat_interval_s=0.3, heartbeat_grace_s=2.0)
    opened = _open(tmp_path, trials=8, training=training)
    study_id = opened.study._study_id
    seen: list[tuple[list[int], list[int]]] = []  # per batch: prefetched trials RUNNING, stale trial ids

    def check(index: int, numbers: list[int]) -> None:
        # Past the grace period: the trials asked for the next batch have waited that long. Two
        # batches show it (in the second, the trials prefetched in the first train while the next
        # ones wait); the other two batches are checked without the wait.
        if index < 2:
            time.sleep(3.0)
        running = [t.number for t in opened.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
        seen.append(([n for n in running if n not in numbers], opened.storage._get_stale_trial_ids(study_id)))

    backend = SleepyBackend(sleep_s=0.0, on_run=check)
    # reclaim_every_s=0: every ask (the prefetch's too) first fails trials whose heartbeat is stale,
    # as any other process of the study would.
    _search(opened, backend, trials=8, in_flight=2, reclaim_every_s=0.0)
    assert any(prefetched for prefetched, _ in seen[:2])  # trials did wait, prefetched, past the grace period
    assert all(not stale for _, stale in seen)
    states = _by_state(opened.study)
    assert len(states[TrialState.COMPLETE]) == 8 and set(states) == {TrialState.COMPLETE}


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_an_interrupt_fails_the_batch_in_flight_and_the_prefetched_one_leaving_none_running(tmp_path):
    opened = _open(tmp_path, trials=12)

    def interrupt_third_batch(index: int, numbers: list[int]) -> None:
        if index == 2:  # once the next batch is asked and sampled, Ctrl-C
            _wait_for(lambda: len(opened.study.get_trials(deepcopy=False)) == 8
                      and all(t.params for t in opened.study.get_trials(deepcopy=False)))
            time.sleep(0.2)  # its last writes (the batch attribute)
            raise KeyboardInterrupt

    backend = SleepyBackend(on_run=interrupt_third_batch)
    with pytest.raises(KeyboardInterrupt):
        _search(opened, backend, trials=12, in_flight=2)
    states = _by_state(opened.study)
    assert states == {TrialState.COMPLETE: [0, 1, 2, 3], TrialState.FAIL: [4, 5, 6, 7]}
    for t in opened.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        assert t.user_attrs["fail_reason"] == "interrupted by Ctrl-C (SIGINT)"
    assert backend.batches == [[0, 1], [2, 3], [4, 5]]  # trials 6 and 7 never ran


def test_an_interrupt_while_the_next_batch_is_sampled_stops_the_sampling_and_fails_it(tmp_path):
    opened = _open(tmp_path, trials=12)
    sampling = threading.Event()
    interrupted = threading.Event()

    def slow_sample(number: int) -> None:
        if number == 2:  # the first trial of the prefetched batch: still sampling when Ctrl-C comes
            sampling.set()
            interrupted.wait(10)
            time.sleep(0.3)

    def interrupt(index: int, numbers: list[int]) -> None:
        sampling.wait(10)
        interrupted.set()
        raise KeyboardInterrupt

    backend = SleepyBackend(on_run=interrupt, on_suggest=slow_sample)
    with pytest.raises(KeyboardInterrupt):
        _search(opened, backend, trials=12, in_flight=2)
    trials = opened.study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.FAIL] * 4
    assert "depth" in trials[2].params and not trials[3].params  # the helper stopped before sampling trial 3


def test_a_failure_while_prefetching_tells_the_batch_that_trained_and_fails_the_prefetched_one(tmp_path):
    opened = _open(tmp_path, trials=12)

    def broken(number: int) -> None:
        if number == 3:
            raise RuntimeError("the sampler broke")

    backend = SleepyBackend(sleep_s=0.2, on_suggest=broken)
    with pytest.raises(RuntimeError, match="the sampler broke"):
        _search(opened, backend, trials=12, in_flight=2)
    states = _by_state(opened.study)
    assert states == {TrialState.COMPLETE: [0, 1], TrialState.FAIL: [2, 3]}
    reason = opened.study.trials[3].user_attrs["fail_reason"]
    assert reason.startswith("asked ahead for the next batch and never run: the search stopped on RuntimeError")


def test_a_seed_gives_the_same_study_every_run_whatever_the_timing(tmp_path):
    """Past the sampler's random start-up (10 complete trials): TPE's choices depend on what
    it has been told when it samples, and the prefetch is joined before each tell."""

    def run(name: str) -> list[tuple[int, str, dict[str, Any], float | None]]:
        opened = _open(tmp_path, name, seed=3, trials=18)
        _search(opened, SleepyBackend(sleep_s=0.01, jitter_s=0.08), trials=18, in_flight=2)
        return [(t.number, t.state.name, t.params, t.value) for t in opened.study.get_trials(deepcopy=False)]

    first, second = run("a"), run("b")
    assert len(first) == 18
    assert first == second


@pytest.mark.parametrize("pruner", ["none", "median"])
def test_a_trained_batch_is_told_while_the_next_trains_unless_a_pruner_reads_the_study(tmp_path, pruner):
    """Without a pruner the helper thread tells batch n while batch n+1 trains; a pruner's
    verdicts on batch n+1 read the told trials, so with one the loop tells batch n itself,
    before batch n+1 starts. The last batch (nothing prefetched after it) is told by the loop."""
    opened = _open(tmp_path, trials=6)
    told_by: dict[int, str] = {}
    complete_at_start: list[int] = []

    def note_start(index: int, numbers: list[int]) -> None:
        complete_at_start.append(len(opened.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))

    backend = SleepyBackend(sleep_s=0.2, on_run=note_start)
    plan = SearchPlan(trials_in_flight=2, fuse_folds=False, fuse_trials=False, source="test", pruner=pruner)
    run_search(opened, backend, plan, SearchGoal(complete=6, new_trials=6, poll_s=0.05),
               lambda study, trial: told_by.setdefault(trial.number, threading.current_thread().name))
    assert len(opened.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))) == 6
    assert backend.batches == [[0, 1], [2, 3], [4, 5]]
    if pruner == "none":
        assert told_by == {0: "step5-prefetch", 1: "step5-prefetch", 2: "step5-prefetch", 3: "step5-prefetch",
                           4: "MainThread", 5: "MainThread"}
    else:
        assert set(told_by.values()) == {"MainThread"} and complete_at_start == [0, 2, 4]


def test_a_batch_the_database_refused_is_settled_without_optunas_already_reported_noise(tmp_path, monkeypatch):
    """A database that stops taking writes as a trial is told (a full disk): the run ends in the
    StorageError, and telling the batch again on the way out repeats no Optuna warning."""
    opened = _open(tmp_path, trials=2)
    real = optuna.storages.RDBStorage.set_trial_state_values

    def full(self, trial_id, state, values=None):
        if state == TrialState.COMPLETE:
            error = sqlite3.OperationalError("database or disk is full")
            error.sqlite_errorcode = 13  # type: ignore[attr-defined] - SQLITE_FULL, as sqlite3 sets it
            raise sa_exc.OperationalError("UPDATE trials", {}, error)
        return real(self, trial_id, state, values)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", full)
    with warnings.catch_warnings(record=True) as said, pytest.raises(StorageError, match="database or disk is full"):
        warnings.simplefilter("always")
        _search(opened, SleepyBackend(sleep_s=0.0), trials=2, in_flight=2)
    assert [str(w.message) for w in said if issubclass(w.category, UserWarning)] == []
