"""The one ask/tell loop: B trials in flight, run together, told in the order asked.

::

    ┌─▶ ask B trials (TPE, constant liar: the pending ones steer it away from themselves)
    │     each: suggest params, record them on the trial
    │   backend.run_trials([(number, params), ...], gate)  NN: plan_groups -> runner.run(groups)
    │     per trial: its K fold results, the JobError that failed it, or Pruned
    │     (with a pruner, folds run in waves and the gate reports each and may prune;
    │     step5.optimizer.pruning)
    │   tell each trial exactly once, in ask order: COMPLETE with its objective, FAIL or PRUNED
    └── until n_new trials were told

Every mode runs this loop: fold by fold, fused folds and fused trials differ only in how
the backend groups a batch (:mod:`step5.optimizer.grouping`). It is deterministic for a
given seed and B: the sampler sees the same trials in the same states at every ask, and
fold results do not depend on which slot trained them or when.

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
from step5.optimizer.objective import FoldGate, Pruned, TrialOutcome, fail_reason, record_trial
from step5.optimizer.pruning import fold_gate, make_pruner, report_folds
from step5.optimizer.study import OpenedStudy, trial_heartbeats

logger = logging.getLogger(__name__)


class TrialBackend(Protocol):
    model_type: str

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]: ...

    def run_trials(
        self, trials: Sequence[tuple[int, dict[str, Any]]], gate: FoldGate | None = None,
    ) -> list[TrialOutcome]: ...


@dataclass(frozen=True)
class SearchPlan:
    """How the loop runs: trials per batch and how their folds are grouped."""

    trials_in_flight: int  # B: trials asked, run and told together
    fuse_folds: bool  # a trial's K folds share one pass
    fuse_trials: bool  # same-shape trials of a batch share one pass
    source: str  # what decided, for the log
    pruner: str = "none"  # step5.policy.PRUNER_NAMES: "none" runs every fold of every trial

    def record(self) -> SearchRecord:
        return SearchRecord(trials_in_flight=self.trials_in_flight, fuse_folds=self.fuse_folds,
                            fuse_trials=self.fuse_trials)


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
    """Ask, run and tell ``n_new`` trials, ``plan.trials_in_flight`` at a time."""
    study = opened.study
    study.pruner = make_pruner(plan.pruner)
    record = plan.record()
    told_total = 0
    while told_total < n_new:
        size = min(plan.trials_in_flight, n_new - told_total)
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
            gate = fold_gate(trials, prune=True) if plan.pruner != "none" else None
            with trial_heartbeats(opened, numbers):
                outcomes = backend.run_trials(list(zip(numbers, params)), gate)
            wall_s = time.perf_counter() - start
            if len(outcomes) != len(trials):
                raise Step5Error(f"the backend returned {len(outcomes)} outcomes for a batch of {len(trials)} trials")
            for trial, outcome in zip(trials, outcomes):
                frozen = tell(study, trial, outcome, wall_s=wall_s, gated=gate is not None)
                told.add(trial.number)
                on_told(study, frozen)
        except BaseException as exc:
            fail_untold(study, [t for t in trials if t.number not in told], exc)
            raise
        finally:
            told_total += len(trials)
            record.trials += len(told)
        record.batches += 1
    return record


def tell(
    study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, *, wall_s: float, gated: bool = False,
) -> FrozenTrial:
    """Tell Optuna how one trial ended; returns the finished trial.

    ``gated``: a fold gate already reported every fold but the last (see
    :mod:`step5.optimizer.pruning`); otherwise every fold is reported here, in fold order.
    """
    if isinstance(outcome, Pruned):
        return tell_pruned(study, trial, outcome, wall_s=wall_s)
    if isinstance(outcome, JobError):
        reason = fail_reason(outcome)
        trial.set_user_attr("fail_reason", reason)
    else:
        report_folds(trial, outcome, first_step=len(outcome) - 1 if gated else 0)
        summary = record_trial(trial, outcome, wall_s=wall_s)
        if math.isfinite(summary.value):
            return study.tell(trial, summary.value)
        reason = trial.user_attrs.get("fail_reason", "the objective is not finite")
    log_failed_trial(trial, reason)
    return study.tell(trial, state=TrialState.FAIL)


def tell_pruned(study: optuna.Study, trial: optuna.Trial, outcome: Pruned, *, wall_s: float) -> FrozenTrial:
    """Tell PRUNED (its value is its last reported step, and it is never the best trial)."""
    trial.set_user_attr("pruned_after_folds", len(outcome.folds))
    trial.set_user_attr("wall_s", round(wall_s, 4))
    return study.tell(trial, state=TrialState.PRUNED)


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
