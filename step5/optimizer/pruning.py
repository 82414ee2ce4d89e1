"""Fold-level intermediate values and pruning (``--pruner``, policy ``training.pruner``;
docs/optimizer-internals.md#pruning)."""
from __future__ import annotations

import math
from typing import Any, Sequence

import optuna

from step5.optimizer.backends import FoldGate
from step5.optimizer.objective import anti_overfit_score
from step5.policy import PRUNER_NAMES

#: MedianPruner's start-up: trials that must be complete before any is pruned.
MEDIAN_STARTUP_TRIALS = 5


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "none":
        return optuna.pruners.NopPruner()
    if name == "median":
        # Median of the complete trials' values at the same fold; decides from fold 0 on.
        return optuna.pruners.MedianPruner(n_startup_trials=MEDIAN_STARTUP_TRIALS, n_warmup_steps=0)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    raise ValueError(f"unknown pruner {name!r}; expected one of {list(PRUNER_NAMES)}")


def running_value(results: Sequence[dict[str, Any]]) -> float:
    return anti_overfit_score([r["r2"] for r in results], [r["train_r2"] for r in results])


def report_folds(trial: optuna.Trial, results: Sequence[dict[str, Any]], first_step: int = 0) -> None:
    """Report steps ``first_step ..``, in fold order; a diverged fold's step is not (the trial fails when told)."""
    for step in range(first_step, len(results)):
        value = running_value(results[: step + 1])
        if math.isfinite(value):
            trial.report(value, step)


def fold_gate(trials: Sequence[optuna.Trial], *, prune: bool) -> FoldGate:
    """The gate a backend calls after each fold of a trial: report it, then ask the pruner."""
    by_number = {t.number: t for t in trials}

    def gate(number: int, results: Sequence[dict[str, Any]]) -> bool:
        trial = by_number[number]
        report_folds(trial, results, first_step=len(results) - 1)
        return not (prune and trial.should_prune())

    return gate
