"""The one ask/tell loop: B trials in flight, run together, told in the order asked
(docs/optimizer-internals.md#search, docs/optimizer.md "The search loop"); fold-level values and pruning
(``--pruner``, docs/optimizer-internals.md#pruning); the per-trial progress line."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from step5.errors import JobError, Step5Error, StorageError, TooManyFailedTrials, interrupt_reason
from step5.execution.summary import SearchRecord
from step5.interrupts import delivered, raise_if_interrupted
from step5.optimizer.backends import FoldGate, ModelBackend, Pruned, TrialOutcome
from step5.optimizer.objective import anti_overfit_score, record_trial
from step5.optimizer.study import (
    OpenedStudy, TrialHeartbeats, best_complete_trial, claim_trial, count_states, reclaim_dead_trials, study_lock
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchPlan:
    """How the loop runs: trials per batch and how their folds are grouped."""

    trials_in_flight: int  # B: trials asked, run and told together
    fuse_folds: bool  # a trial's K folds share one pass
    fuse_trials: bool  # same-shape trials of a batch share one pass
    source: str  # what decided, for the log
    pruner: str = "none"  # step5.policy.PRUNER_NAMES: "none" runs every fold of every trial
    max_consecutive_failures: int = 10  # failed trials in a row that stop the run (policy)


def log_failed_trial(trial: optuna.Trial, reason: str) -> None:
    # Optuna's own failure line, as study.optimize would log it.
    logger.warning("Trial %d failed with parameters: %s because of the following error: %s.",
                   trial.number, trial.params, reason)


@dataclass(frozen=True)
class SearchGoal:
    """The loop stops when the study holds ``complete`` COMPLETE trials, or when this process asked its
    ``new_trials`` and nothing of others' is left in flight."""

    complete: int  # --trials
    new_trials: int  # fresh trials this process may ask (re-runs of dead processes' trials are extra)
    poll_s: float = 1.0  # how often a process with nothing to ask looks at the study again
    reclaim_every_s: float = 10.0  # how often a busy process looks for dead processes' trials


@dataclass
class Batch:
    """Trials asked under one study lock, then claimed, sampled, run and told together; filled in place,
    so whatever stops the asking midway leaves the trials it made where the caller can fail them."""

    index: int  # this process's batch number (the trials' ``batch`` attribute)
    trials: list[optuna.Trial] = field(default_factory=list)
    params: list[dict[str, Any]] = field(default_factory=list)  # one per trial, once sampled
    counts: dict[str, int] = field(default_factory=dict)  # the study's states as counted before the ask
    room: int = 0  # --trials - complete - running, when counted
    goal_reached: bool = False  # the study held --trials COMPLETE trials: nothing was asked
    given_back: bool = False  # the lock was lost and every trial asked under it was released

    @property
    def numbers(self) -> list[int]:
        return [t.number for t in self.trials]


class BatchAsker:
    """Asks, claims and samples one batch, for the loop or for the :class:`Prefetch` helper; never both at
    once (the loop joins the helper before it asks or tells again)."""

    def __init__(self, opened: OpenedStudy, backend: ModelBackend, plan: SearchPlan, goal: SearchGoal,
                 heartbeats: TrialHeartbeats) -> None:
        self.opened, self.backend, self.plan, self.goal, self.heartbeats = opened, backend, plan, goal, heartbeats
        self.fresh_asked = 0
        self.replaced = 0  # trials this process told FAIL or PRUNED: each may be replaced by a fresh one
        self.reclaimed_at = time.monotonic()  # open_study has just reclaimed

    def ask(self, batch: Batch, *, in_flight: bool, waiting: bool = False,
            cancelled: threading.Event | None = None) -> None:
        """Under the study lock, count and ask as many trials as fit; then claim and sample them.
        ``in_flight``: a batch of this process trains meanwhile (its RUNNING trials are no orphans);
        ``cancelled``: the loop is stopping, what was asked is left unsampled for it to fail."""
        study, goal = self.opened.study, self.goal
        # Dead processes show on the time scale of heartbeats; looking once per poll
        # period (and whenever this process waits) keeps the storage queries per trial low.
        if waiting or time.monotonic() - self.reclaimed_at >= goal.reclaim_every_s:
            # Safe without the lock: each trial is failed once, by one process.
            reclaim_dead_trials(study, nothing_in_flight=not in_flight)
            self.reclaimed_at = time.monotonic()
        if cancelled is not None and cancelled.is_set():
            return
        with study_lock(self.opened.storage, self.opened.study_name) as lock:
            counts = batch.counts = count_states(study)
            if counts["complete"] >= goal.complete:
                batch.goal_reached = True
                return
            batch.room = goal.complete - counts["complete"] - counts["running"]
            size = min(self.plan.trials_in_flight, batch.room,
                       counts["waiting"] + goal.new_trials + self.replaced - self.fresh_asked)
            for _ in range(max(0, size)):
                batch.trials.append(study.ask())
        if lock.lost and batch.trials:
            batch.trials[:] = keep_within_goal(self.opened, batch.trials, goal.complete)
            batch.given_back = not batch.trials
        for trial in batch.trials:  # outside the lock: the lock guards only the count and the asks
            claim_trial(self.opened, trial)
            self.heartbeats.add(trial)
        self.fresh_asked += max(0, len(batch.trials) - counts["waiting"])  # ask() takes the queued re-runs first
        # Suggest trial by trial in ask order: the sampler sees the same sequence of
        # calls whatever B is, so its start-up (random) trials are identical.
        for trial in batch.trials:
            if cancelled is not None and cancelled.is_set():
                return
            p = self.backend.suggest(trial)
            trial.set_user_attr("params", p)
            trial.set_user_attr("model_type", self.backend.model_type)
            batch.params.append(p)
        for trial in batch.trials:
            trial.set_user_attr("batch", {"index": batch.index, "trials": batch.numbers})


class Prefetch:
    """While batch n trains, a helper thread tells batch n-1 (``before``) and then asks, claims and samples
    batch n+1, so the slots go from batch to batch without waiting; joined before batch n is told, so the
    sampler sees the same sequence every run (thread safety: docs/optimizer-internals.md#search)."""

    def __init__(self, asker: BatchAsker, index: int, before: Callable[[], None] | None = None) -> None:
        self.batch = Batch(index=index)
        self._asker = asker
        self._before = before  # first, in the helper: tell the batch that trained before the running one
        self._cancelled = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="step5-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._before is not None:
                self._before()  # not cancelled: these trials have results, they are told whatever happens
            if not self._cancelled.is_set():
                self._asker.ask(self.batch, in_flight=True, cancelled=self._cancelled)
        except BaseException as exc:  # noqa: BLE001 - handed to the loop by result()
            self._error = exc

    def result(self) -> tuple[Batch | None, BaseException | None]:
        """Wait for the helper: the batch ready to run (None: nothing asked), and the error that stopped it."""
        self._thread.join()
        if self._error is not None:
            return None, self._error
        if not self.batch.trials:
            return None, None
        if len(self.batch.params) != len(self.batch.trials):  # not cancelled, so a bug: say so, fail them
            return None, Step5Error(f"the prefetched batch {self.batch.numbers} was left without params")
        return self.batch, None

    def stop(self) -> list[optuna.Trial]:
        self._cancelled.set()
        self._thread.join()
        return list(self.batch.trials)


@dataclass
class Trained:
    """A batch that has trained: its outcomes, to be told (once each, in ask order)."""

    batch: Batch
    outcomes: list[TrialOutcome]
    wall_s: float
    gated: bool  # a fold gate reported its folds as they came (a pruner)
    told: set[int] = field(default_factory=set)


def run_search(opened: OpenedStudy, backend: ModelBackend, plan: SearchPlan, goal: SearchGoal,
               on_told: Callable[[optuna.Study, FrozenTrial], None]) -> SearchRecord:
    """Ask, run and tell trials, ``plan.trials_in_flight`` at a time, until ``goal`` is met. With a pruner the
    tells stay in the loop, between batches: its verdicts must not depend on when trials were told."""
    study = opened.study
    study.pruner = PRUNERS[plan.pruner]()
    record = SearchRecord(trials_in_flight=plan.trials_in_flight, fuse_folds=plan.fuse_folds,
                          fuse_trials=plan.fuse_trials)
    streak: list[str] = []  # the fail reasons of the trials failed in a row, in ask order (PRUNED: not a failure)
    tell_behind = plan.pruner == "none"
    waiting = False  # nothing to ask, and others' trials in flight: polling the study
    # Optuna warns at each ask that heartbeats are meant for study.optimize; this loop records them itself.
    # Filtered here, for the whole search: warning filters are global, and a catch_warnings block per ask
    # in the helper thread could restore them under the loop's feet.
    with warnings.catch_warnings(), TrialHeartbeats(opened) as heartbeats:
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        # A batch the database failed is told again on the way out (settle): Optuna keeps the folds it has.
        warnings.filterwarnings("ignore", message="The reported value is ignored because this `step=")
        asker = BatchAsker(opened, backend, plan, goal, heartbeats)

        def tell_batch(trained: Trained) -> None:
            for trial, outcome in zip(trained.batch.trials, trained.outcomes):
                if trial.number in trained.told:
                    continue
                frozen = tell(study, trial, outcome, wall_s=trained.wall_s, gated=trained.gated)
                trained.told.add(trial.number)
                record.trials += 1
                heartbeats.discard(trial)
                if frozen.state == TrialState.COMPLETE:
                    streak.clear()
                else:  # a FAIL or PRUNED trial may be replaced by a fresh one
                    asker.replaced += 1
                if frozen.state == TrialState.FAIL:
                    record.failed_trials += 1
                    streak.append(str(frozen.user_attrs.get("fail_reason", "unknown")))
                on_told(study, frozen)
            record.replaced_trials = record.failed_trials  # the loop goes on: every failure so far is replaced
            if len(streak) >= plan.max_consecutive_failures:
                raise TooManyFailedTrials(
                    f"{len(streak)} trials failed in a row (training.max_consecutive_failed_trials = "
                    f"{plan.max_consecutive_failures}), so the search stops instead of replacing them: "
                    f"{trained.batch.counts['complete']} of the {goal.complete} complete trials asked for were "
                    f"reached. The last failure: {streak[-1]}"
                )

        def settle(trained: Trained, error: BaseException) -> None:
            with contextlib.suppress(Exception):
                tell_batch(trained)  # results that exist are kept (the streak's verdict does not matter now)
            fail_untold(study, [t for t in trained.batch.trials if t.number not in trained.told], error)

        ready: Batch | None = None  # the next batch, prefetched
        pending: Trained | None = None  # a trained batch the next helper tells (tell_behind)
        while True:
            batch, ready = ready, None
            prefetch: Prefetch | None = None
            handed: Trained | None = None  # the trained batch a helper is telling
            trained: Trained | None = None
            try:
                raise_if_interrupted()  # one the interpreter dropped (step5.interrupts) stops the run here
                if batch is None:
                    if pending is not None:  # nothing was prefetched: tell it before counting again
                        tell_batch(pending)
                        pending = None
                    batch = Batch(index=record.batches)
                    asker.ask(batch, in_flight=False, waiting=waiting)
                    if batch.goal_reached:
                        break
                    if batch.given_back:
                        continue  # all given back: count again
                    if not batch.trials:
                        counts = batch.counts
                        if counts["running"] == 0 and batch.room > 0:
                            logger.warning(
                                "study %r holds %d of %d complete trials; this process asked its %d new trial(s) "
                                "and no other trial is in flight", opened.study_name, counts["complete"],
                                goal.complete, goal.new_trials)
                            break
                        if not waiting:
                            waiting = True
                            logger.info("waiting for %d trial(s) in flight in other processes (%d of %d complete)",
                                        counts["running"], counts["complete"], goal.complete)
                        time.sleep(goal.poll_s)
                        continue
                waiting = False
                numbers = batch.numbers
                if len(numbers) > 1:
                    logger.info("batch %d: trials %s in flight", record.batches, numbers)
                handed, pending = pending, None
                prefetch = Prefetch(asker, record.batches + 1,
                                    before=None if handed is None else functools.partial(tell_batch, handed))
                start = time.perf_counter()
                gate = fold_gate(batch.trials) if plan.pruner != "none" else None
                outcomes = backend.run_trials(list(zip(numbers, batch.params)), gate)
                wall_s = time.perf_counter() - start
                if len(outcomes) != len(numbers):
                    raise Step5Error(f"the backend returned {len(outcomes)} outcomes for a batch of "
                                     f"{len(numbers)} trials")
                trained, batch = Trained(batch, outcomes, wall_s, gated=gate is not None), None
                record.batches += 1
                ready, prefetch_error = prefetch.result()  # before this batch is told: the sampler's sequence is fixed
                if tell_behind and ready is not None and prefetch_error is None:
                    pending, trained = trained, None  # told by the next helper, while the next batch trains
                    continue
                tell_batch(trained)
                if prefetch_error is not None:
                    raise prefetch_error  # this batch is told; the prefetched trials are failed below
            except BaseException as caught:
                exc = delivered(caught)  # the trials' reason names the signal that came, whatever a library raised
                unrun = prefetch.stop() if prefetch is not None else []
                for done in (handed, pending, trained):
                    if done is not None:
                        settle(done, exc)
                if batch is not None:  # asked, not trained
                    fail_untold(study, list(batch.trials), exc)
                fail_untold(study, unrun, exc, unrun=True)
                raise
    return record


def keep_within_goal(opened: OpenedStudy, trials: list[optuna.Trial], complete: int) -> list[optuna.Trial]:
    """The trials of an ask whose study lock was lost that still fit ``--trials``: counted again under the
    lock, the study's surplus (COMPLETE + RUNNING - ``--trials``) is told FAIL, unrun, from the end of this ask."""
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


def tell(study: optuna.Study, trial: optuna.Trial, outcome: TrialOutcome, *, wall_s: float,
         gated: bool = False) -> FrozenTrial:
    """Tell Optuna how one trial ended (``gated``: a fold gate reported every fold but the last). A trial
    another process failed meanwhile (late heartbeats) keeps that verdict: its re-run stands for it."""
    try:
        if isinstance(outcome, Pruned):  # its value is its last reported step; it is never the best trial
            trial.set_user_attr("pruned_after_folds", len(outcome.folds))
            trial.set_user_attr("wall_s", round(wall_s, 4))
            return study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        if isinstance(outcome, JobError):
            where = f" (fold {outcome.fold_idx})" if outcome.fold_idx is not None else ""
            reason = f"{outcome.error_type}{where}: {outcome.message}"
            trial.set_user_attr("fail_reason", reason)
            value = None
        else:
            report_folds(trial, outcome, first_step=len(outcome) - 1 if gated else 0)
            summary = record_trial(trial, outcome, wall_s=wall_s)
            value = summary["value"] if math.isfinite(summary["value"]) else None
            reason = trial.user_attrs.get("fail_reason", "the objective is not finite")
        if value is not None:
            frozen = study.tell(trial, value, skip_if_finished=True)
        else:
            log_failed_trial(trial, reason)
            frozen = study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
    except optuna.exceptions.UpdateFinishedTrialError:  # failed elsewhere, before this tell or during it
        return _finished_elsewhere(study, trial)
    if frozen.state == TrialState.FAIL and value is not None:
        return _finished_elsewhere(study, trial)
    return frozen


def _finished_elsewhere(study: optuna.Study, trial: optuna.Trial) -> FrozenTrial:
    logger.warning("trial %d was failed by another process meanwhile (its heartbeats were late); its result is "
                   "dropped and its re-run counts instead", trial.number)
    return study._storage.get_trial(trial._trial_id)


def fail_untold(study: optuna.Study, trials: list[optuna.Trial], error: BaseException, *, unrun: bool = False) -> None:
    """Tell FAIL to trials asked but never finished; ``unrun``: asked ahead (:class:`Prefetch`), never trained."""
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C, or SIGTERM turned into Terminated
        reason = interrupt_reason(error)
    elif unrun:
        reason = f"asked ahead for the next batch and never run: the search stopped on {error!r}"
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


#: The pruners by ``--pruner`` name (step5.policy.PRUNER_NAMES). The median is the complete trials' values at the
#: same fold, and decides from fold 0 on, once MEDIAN_STARTUP_TRIALS trials are complete.
MEDIAN_STARTUP_TRIALS = 5
PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "none": optuna.pruners.NopPruner,
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0),
    "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2),
}


def report_folds(trial: optuna.Trial, results: Sequence[dict[str, Any]], first_step: int = 0) -> None:
    """Report steps ``first_step ..``, in fold order; a diverged fold's step is not (the trial fails when told)."""
    for step in range(first_step, len(results)):
        done = results[: step + 1]
        value = anti_overfit_score([r["r2"] for r in done], [r["train_r2"] for r in done])
        if math.isfinite(value):
            trial.report(value, step)


def fold_gate(trials: Sequence[optuna.Trial]) -> FoldGate:
    """The gate a backend calls after each fold of a trial: report it, then ask the pruner."""
    by_number = {t.number: t for t in trials}

    def gate(number: int, results: Sequence[dict[str, Any]]) -> bool:
        trial = by_number[number]
        report_folds(trial, results, first_step=len(results) - 1)
        return not trial.should_prune()

    return gate


def elapsed_and_eta(elapsed_s: float, done: int, total: int) -> str:
    """``"elapsed 1m05s, ETA 2m10s"``: the remaining trials at the mean so far."""
    def clock(seconds: float) -> str:
        minutes, secs = divmod(int(round(seconds)), 60)
        hours, minutes = divmod(minutes, 60)
        return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"

    eta = elapsed_s / done * (total - done) if done > 0 else float("nan")
    return f"elapsed {clock(elapsed_s)}, ETA {clock(eta) if math.isfinite(eta) else '?'}"


class TrialProgress:
    """Called by the search loop with each told trial; counts and logs it. ``[i/n]``: this process's COMPLETE
    trials of the ``n`` it must add, so a replaced trial never pushes ``i`` past ``n``."""

    def __init__(self, n_new: int) -> None:
        self.n_new = n_new
        self.completed = 0
        self._start = time.perf_counter()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.completed += trial.state == TrialState.COMPLETE
        done, n_new = self.completed, self.n_new
        best = best_complete_trial(study)
        best_txt = f"best {best.value:.4f} (trial {best.number})" if best is not None else "no complete trial yet"
        best_txt += "; " + elapsed_and_eta(time.perf_counter() - self._start, done, n_new)
        if trial.state == TrialState.COMPLETE:
            cvm = trial.user_attrs.get("cv", {})
            logger.info("[%d/%d] trial %d: objective %.4f (val R² %.4f ± %.4f, train R² %.4f) in %.1fs; %s", done,
                        n_new, trial.number, trial.value, cvm.get("val_r2_mean", float("nan")),
                        cvm.get("val_r2_std", float("nan")), cvm.get("train_r2_mean", float("nan")),
                        trial.user_attrs.get("wall_s", 0.0), best_txt)
        elif trial.state == TrialState.PRUNED:
            logger.info("[%d/%d] trial %d pruned after %d fold(s) (running objective %.4f), replaced; %s", done, n_new,
                        trial.number, trial.user_attrs.get("pruned_after_folds", 0),
                        trial.value if trial.value is not None else float("nan"), best_txt)
        else:
            logger.warning("[%d/%d] trial %d %s, replaced: %s; %s", done, n_new, trial.number, trial.state.name,
                           trial.user_attrs.get("fail_reason", "see the error above"), best_txt)
