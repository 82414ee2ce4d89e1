"""The one ask/tell loop: B trials in flight, run together, told in the order asked.

::

    ┌─▶ every few seconds, fail trials of dead processes (queue their re-runs); under the study lock,
    │   count the study's COMPLETE + RUNNING trials (every process's), and ask as many
    │   trials as fit: min(B, --trials - complete - running); re-runs are asked first
    │     none fit: others' trials are in flight; wait for them and look again
    │   suggest params for each (outside the lock: the sampler's cost is not serialised)
    │   backend.run_trials([(number, params), ...], gate)  NN: plan_groups -> runner.run(groups)
    │     per trial: its K fold results, the JobError that failed it, or Pruned
    │     (with a pruner, folds run in waves and the gate reports each and may prune;
    │     step5.optimizer.pruning)
    │   tell each trial exactly once, in ask order: COMPLETE with its objective, FAIL or PRUNED
    └── until the study holds --trials COMPLETE trials (or this process may ask no more
        and nothing is in flight). A trial this process saw fail or pruned is replaced: it
        may ask one more fresh trial for each; after ``max_consecutive_failures`` failed
        trials in a row (ask order) the run stops (:class:`TooManyFailedTrials`, exit 1)
        instead of replacing them forever

Every mode runs this loop: fold by fold, fused folds and fused trials differ only in how
the backend groups a batch (:mod:`step5.optimizer.grouping`). One process alone is
deterministic for a given seed and B: the sampler sees the same trials in the same states
at every ask, and fold results do not depend on which slot trained them or when (nor on a
worker killed under them: the runner re-runs such a job with the same request and seed). Several
processes share a study the same way (docs/cluster.md): the count before each ask keeps
them from overshooting ``--trials``, and a trial of a process that died is re-run.

No code path leaves a trial RUNNING: whatever escapes a batch (an exception, Ctrl-C,
SIGTERM) first tells FAIL to every trial of the batch not yet told, then propagates.
Each trial records its owner and gets storage heartbeats from its ask on, so a batch
killed with SIGKILL is failed and re-run by the next process that looks.
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

from step5.errors import JobError, Step5Error, StorageError, TooManyFailedTrials, interrupt_reason
from step5.execution.summary import SearchRecord
from step5.interrupts import raise_if_interrupted
from step5.optimizer.backends import FoldGate, Pruned, TrialOutcome
from step5.optimizer.objective import fail_reason, record_trial
from step5.optimizer.pruning import fold_gate, make_pruner, report_folds
from step5.optimizer.study import (
    OpenedStudy,
    claim_trial,
    count_states,
    reclaim_dead_trials,
    study_lock,
    trial_heartbeats,
)

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
    max_consecutive_failures: int = 10  # failed trials in a row that stop the run (policy)

    def record(self) -> SearchRecord:
        return SearchRecord(trials_in_flight=self.trials_in_flight, fuse_folds=self.fuse_folds,
                            fuse_trials=self.fuse_trials)


@dataclass
class FailureStreak:
    """Failed trials in a row, in ask order; past the limit the search stops."""

    limit: int
    count: int = 0
    last_reason: str = ""

    def note(self, trial: FrozenTrial) -> None:
        if trial.state == TrialState.PRUNED:
            return  # the pruner's verdict on a hopeless trial, not a failure
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


@dataclass(frozen=True)
class SearchGoal:
    """When the loop stops: the study holds ``complete`` COMPLETE trials, or this process
    has asked ``new_trials`` fresh trials and nothing of others' is left in flight."""

    complete: int  # --trials
    new_trials: int  # fresh trials this process may ask (re-runs of dead processes' trials are extra)
    poll_s: float = 1.0  # how often a process with nothing to ask looks at the study again
    reclaim_every_s: float = 10.0  # how often a busy process looks for dead processes' trials


def run_search(
    opened: OpenedStudy,
    backend: TrialBackend,
    plan: SearchPlan,
    goal: SearchGoal,
    on_told: Callable[[optuna.Study, FrozenTrial], None],
) -> SearchRecord:
    """Ask, run and tell trials, ``plan.trials_in_flight`` at a time, until ``goal`` is met
    (failed and pruned trials are replaced; :class:`FailureStreak` bounds that)."""
    study = opened.study
    study.pruner = make_pruner(plan.pruner)
    record = plan.record()
    fresh_asked = 0
    replaced = 0  # trials this process told FAIL or PRUNED: each may be replaced by a fresh one
    streak = FailureStreak(plan.max_consecutive_failures)
    waited_since: float | None = None
    reclaimed_at = time.monotonic()  # open_study has just reclaimed
    while True:
        raise_if_interrupted()  # one the interpreter dropped (step5.interrupts) stops the run here
        trials: list[optuna.Trial] = []
        told: set[int] = set()
        try:
            # Dead processes show on the time scale of heartbeats; looking once per poll
            # period (and whenever this process waits) keeps the storage queries per trial low.
            if waited_since is not None or time.monotonic() - reclaimed_at >= goal.reclaim_every_s:
                # Safe without the lock: each trial is failed once, by one process.
                reclaim_dead_trials(study, nothing_in_flight=True)
                reclaimed_at = time.monotonic()
            with study_lock(opened.storage, opened.study_name) as lock:
                counts = count_states(study)
                if counts["complete"] >= goal.complete:
                    break
                room = goal.complete - counts["complete"] - counts["running"]
                size = min(plan.trials_in_flight, room, counts["waiting"] + goal.new_trials + replaced - fresh_asked)
                for _ in range(max(0, size)):
                    with warnings.catch_warnings():
                        # Optuna warns that heartbeats are meant for study.optimize; this loop
                        # records them itself (claim_trial, trial_heartbeats).
                        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
                        trials.append(study.ask())
            if lock.lost and trials:
                trials = keep_within_goal(opened, trials, goal.complete)
                if not trials:
                    continue  # all given back: count again
            for trial in trials:  # outside the lock: the lock guards only the count and the asks
                claim_trial(opened, trial)
            if not trials:
                if counts["running"] == 0 and room > 0:
                    logger.warning(
                        "study %r holds %d of %d complete trials; this process asked its %d new trial(s) "
                        "and no other trial is in flight", opened.study_name, counts["complete"], goal.complete,
                        goal.new_trials)
                    break
                if waited_since is None:
                    waited_since = time.perf_counter()
                    logger.info("waiting for %d trial(s) in flight in other processes (%d of %d complete)",
                                counts["running"], counts["complete"], goal.complete)
                time.sleep(goal.poll_s)
                continue
            waited_since = None
            fresh_asked += max(0, len(trials) - counts["waiting"])  # ask() takes the queued re-runs first
            # Suggest trial by trial in ask order: the sampler sees the same sequence of
            # calls whatever B is, so its start-up (random) trials are identical.
            params: list[dict[str, Any]] = []
            for trial in trials:
                p = backend.suggest(trial)
                trial.set_user_attr("params", p)
                trial.set_user_attr("model_type", backend.model_type)
                params.append(p)
            numbers = [t.number for t in trials]
            for t in trials:
                t.set_user_attr("batch", {"index": record.batches, "trials": numbers})
            if len(trials) > 1:
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
                replaced += count_outcome(record, streak, frozen)
                on_told(study, frozen)
            record.replaced_trials = record.failed_trials  # the loop goes on: every failure so far is replaced
            streak.check(counts["complete"], goal.complete)
        except BaseException as exc:
            fail_untold(study, [t for t in trials if t.number not in told], exc)
            raise
        finally:
            record.trials += len(told)
        record.batches += 1
    return record


def keep_within_goal(opened: OpenedStudy, trials: list[optuna.Trial], complete: int) -> list[optuna.Trial]:
    """The trials of an ask whose study lock was lost (its connection died: the database
    restarted or cut it) that still fit ``--trials``; the rest are told FAIL, unrun.

    Without the lock another process may have counted the study, and asked, before these
    trials existed; together they may then be more than ``--trials`` can take. Counted
    again under the lock, the study's surplus (COMPLETE + RUNNING - ``--trials``) is
    released from the end of this ask. A process that lost no lock counted these trials
    when it asked, so the surplus is this ask's to give back; if several processes lost
    theirs, each gives back what is left, one after the other under the lock.
    """
    study = opened.study
    with study_lock(opened.storage, opened.study_name):
        counts = count_states(study)
        surplus = min(len(trials), counts["complete"] + counts["running"] - complete)
        released = trials[len(trials) - surplus:] if surplus > 0 else []
        for trial in released:
            trial.set_user_attr("fail_reason", "released unrun: asked while the study lock was lost to a database "
                                               "fault, and the study had no room left for it")
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    if released:
        logger.warning("the study lock was lost while trials %s were asked; %d of them released unrun to keep the "
                       "study at --trials %d", [t.number for t in trials], len(released), complete)
    return trials[: len(trials) - len(released)]


def count_outcome(record: SearchRecord, streak: FailureStreak, trial: FrozenTrial) -> int:
    """Count a told trial in the record and the streak; 1 if it will be replaced (FAIL, PRUNED)."""
    streak.note(trial)
    if trial.state == TrialState.COMPLETE:
        return 0
    if trial.state == TrialState.FAIL:
        record.failed_trials += 1
    return 1


def tell(
    study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, *, wall_s: float, gated: bool = False,
) -> FrozenTrial:
    """Tell Optuna how one trial ended; returns the finished trial.

    ``gated``: a fold gate already reported every fold but the last (see
    :mod:`step5.optimizer.pruning`); otherwise every fold is reported here, in fold order.

    A trial another process already failed (its heartbeats were late past the grace
    period, so it was taken for dead and queued for a re-run) keeps that verdict: the
    re-run stands for it, and counting this result too would count the trial twice.
    """
    try:
        if isinstance(outcome, Pruned):
            return tell_pruned(study, trial, outcome, wall_s=wall_s)
        if isinstance(outcome, JobError):
            reason = fail_reason(outcome)
            trial.set_user_attr("fail_reason", reason)
            value = None
        else:
            report_folds(trial, outcome, first_step=len(outcome) - 1 if gated else 0)
            summary = record_trial(trial, outcome, wall_s=wall_s)
            value = summary.value if math.isfinite(summary.value) else None
            reason = trial.user_attrs.get("fail_reason", "the objective is not finite")
    except optuna.exceptions.UpdateFinishedTrialError:
        return _finished_elsewhere(study, trial)
    try:
        if value is not None:
            frozen = study.tell(trial, value, skip_if_finished=True)
        else:
            log_failed_trial(trial, reason)
            frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:  # failed elsewhere between tell's read and its write
        return _finished_elsewhere(study, trial)
    if frozen.state == TrialState.FAIL and value is not None:
        return _finished_elsewhere(study, trial)
    return frozen


def _finished_elsewhere(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    logger.warning("trial %d was failed by another process meanwhile (its heartbeats were late); its result is "
                   "dropped and its re-run counts instead", trial.number)
    return study._storage.get_trial(trial._trial_id)


def tell_pruned(study: optuna.Study, trial: optuna.Trial, outcome: Pruned, *, wall_s: float) -> FrozenTrial:
    """Tell PRUNED (its value is its last reported step, and it is never the best trial)."""
    trial.set_user_attr("pruned_after_folds", len(outcome.folds))
    trial.set_user_attr("wall_s", round(wall_s, 4))
    return study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)


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
        except StorageError:  # the database is gone (the error that ends the run says so): one line each
            logger.warning("trial %d could not be recorded as FAILED: the study database is unreachable; it stays "
                           "RUNNING until its heartbeat goes stale, then the next process that looks fails it and "
                           "re-runs it", trial.number)
        except Exception:  # noqa: BLE001 - keep failing the others; the original error propagates
            logger.exception("could not record trial %d as FAILED", trial.number)
