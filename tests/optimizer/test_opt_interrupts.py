"""Ctrl-C and SIGTERM: one line, no traceback, and the interrupted trial says why it failed."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from step5.errors import Terminated
from step5.optimizer.search import fail_untold
from step5.testing.processes import signal_after_line


@pytest.mark.parametrize("interrupt, reason", [(Terminated, "interrupted by SIGTERM"),
                                               (KeyboardInterrupt, "interrupted by Ctrl-C (SIGINT)")])
def test_an_interrupted_trial_is_failed_with_a_reason(interrupt, reason, caplog):
    """What the ask/tell loop does with the trials of a batch an interrupt stopped: each is failed with its
    reason, and no "Trial N failed ..." line is logged (the run ends with one line from the CLI)."""
    study = optuna.create_study()
    asked = [study.ask() for _ in range(2)]
    with caplog.at_level(logging.DEBUG):
        fail_untold(study, asked, interrupt())
    assert len(study.trials) == 2
    for trial in study.trials:
        assert trial.state == TrialState.FAIL and trial.user_attrs["fail_reason"] == reason
    assert not [r for r in caplog.records if " failed with" in r.getMessage()]


def test_a_trial_failed_by_another_error_keeps_its_failure_line(caplog):
    study = optuna.create_study()
    with caplog.at_level(logging.WARNING):
        fail_untold(study, [study.ask()], RuntimeError("keeps its line"))
    assert [r for r in caplog.records if r.getMessage().startswith("Trial 0 failed with parameters")]


@pytest.mark.slow
def test_ctrl_c_mid_search_prints_one_line_and_fails_the_trial_with_a_reason(sample_inputs, tmp_path, repo_root):
    survivors, history = sample_inputs
    out = tmp_path / "out"
    cmd = [sys.executable, str(repo_root / "meta_prediction_optimizer_anti_overfit.py"),
           "--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "xgboost",
           "--trials", "500", "--k-folds", "3", "--cpu-workers", "1", "--output-dir", str(out)]
    # A terminal's Ctrl-C signals the whole foreground process group.
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)

    def ctrl_c() -> None:
        time.sleep(0.3)  # into the next trial
        os.killpg(proc.pid, signal.SIGINT)

    _, rest, rc = signal_after_line(proc, "[2/500]", ctrl_c)
    assert rc == 130, rest[-2000:]
    assert "Traceback" not in rest and " failed" not in rest
    assert [line for line in rest.splitlines() if "interrupted" in line] == [
        next(line for line in rest.splitlines() if "interrupted (Ctrl-C)" in line)]
    storage = f"sqlite:///{(out / 'optuna_step5.db').resolve()}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert TrialState.RUNNING not in {t.state for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL:
            assert t.user_attrs["fail_reason"] == "interrupted by Ctrl-C (SIGINT)"


class _DropsCtrlC:
    """A finalizer that presses Ctrl-C: CPython runs the handler inside ``__del__``, prints
    "Exception ignored in ..." and drops the KeyboardInterrupt (what the helper saw under load)."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)


def test_a_ctrl_c_the_interpreter_drops_still_stops_the_search_before_the_next_batch(
        sample_inputs, tmp_path, monkeypatch, capfd):
    from step5.optimizer import backends
    from step5.optimizer.cli import main

    survivors, history = sample_inputs
    run_trials = backends.TreeBackend.run_trials

    def run_then_drop_ctrl_c(self, trials, gate=None):
        if [number for number, _ in trials] == [1]:
            _DropsCtrlC()  # collected at once: the interrupt is raised and dropped right here
        return run_trials(self, trials, gate)

    # In the batch's run: the main thread's code (the next batch is sampled in a helper
    # thread meanwhile, where no signal handler runs).
    monkeypatch.setattr(backends.TreeBackend, "run_trials", run_then_drop_ctrl_c)
    dropped: list[type[BaseException]] = []  # what CPython reports as "Exception ignored in ..."
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: dropped.append(unraisable.exc_type))
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    before = signal.getsignal(signal.SIGINT)  # the suite's (tests/conftest.py: sigint_is_ctrl_c)
    rc = main(["--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "xgboost",
               "--trials", "6", "--k-folds", "2", "--cpu-workers", "1", "--output-dir", str(out)])
    err = capfd.readouterr().err
    assert dropped == [KeyboardInterrupt]  # the interrupt really was dropped
    assert rc == 130, err[-2000:]
    assert "interrupted (Ctrl-C)" in err
    storage = f"sqlite:///{(out / 'optuna_step5.db').resolve()}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    # Trial 1's batch finished (the drop happened inside it); the next check stopped the run
    # before trial 2, asked ahead while trial 1 trained, ran: it is failed unrun.
    assert [(t.number, t.state) for t in trials] == [(0, TrialState.COMPLETE), (1, TrialState.COMPLETE),
                                                     (2, TrialState.FAIL)]
    assert trials[2].user_attrs["fail_reason"] == "interrupted by Ctrl-C (SIGINT)"
    assert signal.getsignal(signal.SIGINT) is before  # the handlers were put back


def test_a_sigterm_a_library_reraises_as_a_plain_keyboard_interrupt_is_still_sigterm(
        sample_inputs, tmp_path, monkeypatch, capfd):
    # catboost's fit replaces whatever a signal handler raised inside it with a KeyboardInterrupt of
    # its own: a SIGTERM there (the WATCHER's timeout, a scheduler) was reported as Ctrl-C, exit 130,
    # and its trials failed as "interrupted by Ctrl-C (SIGINT)".
    from step5.optimizer import backends
    from step5.optimizer.cli import main

    survivors, history = sample_inputs
    run_trials = backends.TreeBackend.run_trials

    def sigterm_inside_a_library(self, trials, gate=None):
        if [number for number, _ in trials] == [1]:
            try:
                os.kill(os.getpid(), signal.SIGTERM)  # the handler raises Terminated right here
            except KeyboardInterrupt:
                raise KeyboardInterrupt() from None  # as catboost's fit does
        return run_trials(self, trials, gate)

    monkeypatch.setattr(backends.TreeBackend, "run_trials", sigterm_inside_a_library)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    rc = main(["--survivors", str(survivors), "--lottery-data", str(history), "--model-type", "xgboost",
               "--trials", "4", "--k-folds", "2", "--cpu-workers", "1", "--output-dir", str(out)])
    err = capfd.readouterr().err
    assert rc == 143, err[-2000:]
    assert "terminated by SIGTERM" in err and "Ctrl-C" not in err
    storage = f"sqlite:///{(out / 'optuna_step5.db').resolve()}"
    (summary,) = optuna.get_all_study_summaries(storage)
    trials = optuna.load_study(study_name=summary.study_name, storage=storage).trials
    assert [t.state for t in trials][:2] == [TrialState.COMPLETE, TrialState.FAIL]
    assert {t.user_attrs["fail_reason"] for t in trials[1:]} == {"interrupted by SIGTERM"}
    assert TrialState.RUNNING not in {t.state for t in trials}
