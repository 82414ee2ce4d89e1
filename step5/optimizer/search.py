"""The one ask/tell loop: B trials in flight, run together, told in the order asked.

::

    ┌─▶ ask B trials (TPE, constant liar: the pending ones steer it away from themselves)
    │     each: suggest params, record them on the trial
    │   backend.run_trials([(number, params), ...])    NN: plan_groups -> runner.run(groups)
    │     per trial: its K fold results, or the JobError that failed it
    │   tell each trial exactly once, in ask order: COMPLETE with its objective, or FAIL
    └── until n_new trials are COMPLETE: a failed trial is replaced by the next ask; after
        ``max_consecutive_failures`` failed trials in a row (ask order) the run stops
        (:class:`TooManyFailedTrials`, exit 1) instead of replacing them forever

Every mode runs this loop: fold by fold, fused folds and fused trials differ only in how
the backend groups a batch (:mod:`step5.optimizer.grouping`). It is deterministic for a
given seed and B: the sampler sees the same trials in the same states at every ask, and
fold results do not depend on which slot trained them or when (nor on a worker killed
under them: the runner re-runs such a job with the same request and seed).

No code path leaves a trial RUNNING: whatever escapes a batch (an exception, Ctrl-C,
SIGTERM) first tells FAIL to every trial of the batch not yet told, then propagates.
While a batch runs, its trials get storage heartbeats, so a batch killed with SIGKILL is
failed by the next run.
"""
from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from step5.errors import JobError, Step5Error, interrupt_reason
from step5.execution.summary import SearchRecord
from step5.optimizer.objective import fail_reason, record_trial
from step5.optimizer.study import OpenedStudy, trial_heartbeats

logger = logging.getLogger(__name__)

#: What a backend returns per trial: its fold results in fold order, or why it failed.
TrialOutcome = list[dict[str, Any]] | JobError


class TrialBackend(Protocol):
    model_type: str

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]: ...

    def run_trials(self, trials: Sequence[tuple[int, dict[str, Any]]]) -> list[TrialOutcome]: ...


@dataclass(frozen=True)
class SearchPlan:
    """How the loop runs: trials per batch and how their folds are grouped."""

    trials_in_flight: int  # B: trials asked, run and told together
    fuse_folds: bool  # a trial's K folds share one pass
    fuse_trials: bool  # same-shape trials of a batch share one pass
    source: str  # what decided, for the log
    max_consecutive_failures: int = 10  # failed trials in a row that stop the run (policy)

    def record(self) -> SearchRecord:
        return SearchRecord(trials_in_flight=self.trials_in_flight, fuse_folds=self.fuse_folds,
                            fuse_trials=self.fuse_trials)


class TooManyFailedTrials(Step5Error):
    """Raised when so many trials failed in a row that replacing them looks endless."""


@dataclass
class FailureStreak:
    """Failed trials in a row, in ask order; past the limit the search stops."""

    limit: int
    count: int = 0
    last_reason: str = ""

    def note(self, trial: FrozenTrial) -> None:
        if trial.state == TrialState.COMPLETE:
            self.count, self.last_reason = 0, ""
        else:
            self.count += 1
            self.last_reason = str(trial.user_attrs.get("fail_reason", "unknown"))

    def check(self, complete: int, wanted: int) -> None:
        if self.count >= self.limit:
            raise TooManyFailedTrials(
                f"{self.count} trials failed in a row (training.max_consecutive_failed_trials = {self.limit}), "
                f"so the search stops instead of replacing them: {complete} of the {wanted} complete trials "
                f"asked for were reached. The last failure: {self.last_reason}"
            )


def log_failed_trial(trial: optuna.Trial, reason: str) -> None:
    """Optuna's own failure line ("Trial N failed with parameters ... because ...")."""
    logger.warning("Trial %d failed with parameters: %s because of the following error: %s.",
                   trial.number, trial.params, reason)


def run_search(
    opened: OpenedStudy,
    backend: TrialBackend,
    plan: SearchPlan,
    n_new: int,
    on_told: Callable[[optuna.Study, FrozenTrial], None],
) -> SearchRecord:
    """Ask, run and tell trials, ``plan.trials_in_flight`` at a time, until ``n_new`` of them
    are COMPLETE (failed ones are replaced; :class:`FailureStreak` bounds that)."""
    study = opened.study
    record = plan.record()
    complete = 0
    streak = FailureStreak(plan.max_consecutive_failures)
    while complete < n_new:
        record.replaced_trials = record.failed_trials  # the loop goes on: every failure so far is replaced
        size = min(plan.trials_in_flight, n_new - complete)
        # What study.optimize does before each trial: fail trials a killed run left RUNNING.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials: list[optuna.Trial] = []
        told: set[int] = set()
        try:
            # Ask and suggest trial by trial: the sampler sees the same sequence of calls
            # whatever B is, so its start-up (random) trials are identical.
            params: list[dict[str, Any]] = []
            for _ in range(size):
                with warnings.catch_warnings():
                    # Optuna warns that heartbeats are meant for study.optimize; this loop
                    # records them itself (trial_heartbeats below).
                    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                    trial = study.ask()
                trials.append(trial)
                p = backend.suggest(trial)
                trial.set_user_attr("params", p)
                trial.set_user_attr("model_type", backend.model_type)
                params.append(p)
            numbers = [t.number for t in trials]
            for t in trials:
                t.set_user_attr("batch", {"index": record.batches, "trials": numbers})
            if size > 1:
                logger.info("batch %d: trials %s in flight", record.batches, numbers)
            start = time.perf_counter()
            with trial_heartbeats(opened, numbers):
                outcomes = backend.run_trials(list(zip(numbers, params)))
            wall_s = time.perf_counter() - start
            if len(outcomes) != len(trials):
                raise Step5Error(f"the backend returned {len(outcomes)} outcomes for a batch of {len(trials)} trials")
            for trial, outcome in zip(trials, outcomes):
                frozen = tell(study, trial, outcome, wall_s=wall_s)
                told.add(trial.number)
                complete += count_outcome(record, streak, frozen)
                on_told(study, frozen)
            streak.check(complete, n_new)
        except BaseException as exc:
            fail_untold(study, [t for t in trials if t.number not in told], exc)
            raise
        finally:
            record.trials += len(told)
        record.batches += 1
    return record


def count_outcome(record: SearchRecord, streak: FailureStreak, trial: FrozenTrial) -> int:
    """Count a told trial in the record and the streak; 1 if it is COMPLETE."""
    streak.note(trial)
    if trial.state == TrialState.COMPLETE:
        return 1
    record.failed_trials += 1
    return 0


def tell(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, *, wall_s: float) -> FrozenTrial:
    """Tell Optuna how one trial ended; returns the finished trial."""
    if isinstance(outcome, JobError):
        reason = fail_reason(outcome)
        trial.set_user_attr("fail_reason", reason)
    else:
        summary = record_trial(trial, outcome, wall_s=wall_s)
        if math.isfinite(summary.value):
            return study.tell(trial, summary.value)
        reason = trial.user_attrs.get("fail_reason", "the objective is not finite")
    log_failed_trial(trial, reason)
    return study.tell(trial, state=TrialState.FAIL)


def fail_untold(study: optuna.Study, trials: list[optuna.Trial], error: BaseException) -> None:
    """Tell FAIL to trials a batch asked but never finished (the batch was interrupted)."""
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or SIGTERM turned into Terminated
        reason = interrupt_reason(error)
    else:
        reason = f"the batch was interrupted before this trial was told: {error!r}"
    for trial in trials:
        try:
            trial.set_user_attr("fail_reason", reason)
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            if not isinstance(error, KeyboardInterrupt):  # an interrupt is reported in one line by the CLI
                log_failed_trial(trial, reason)
        except Exception:  # noqa: BLE001 - keep failing the others; the original error propagates
            logger.exception("could not record trial %d as FAILED", trial.number)
