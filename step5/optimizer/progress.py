"""The per-trial progress line the search loop logs as each trial is told
(docs/optimizer-internals.md#progress)."""
from __future__ import annotations

import logging
import math
import time

import optuna
from optuna.trial import FrozenTrial, TrialState

from step5.optimizer.study import best_complete_trial

logger = logging.getLogger(__name__)


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
        self.told = 0  # trials (any end state) this process told
        self.completed = 0
        self._start = time.perf_counter()

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.told += 1
        self.completed += trial.state == TrialState.COMPLETE
        done, n_new = self.completed, self.n_new
        best = best_complete_trial(study)
        best_txt = f"best {best.value:.4f} (trial {best.number})" if best is not None else "no complete trial yet"
        best_txt += "; " + elapsed_and_eta(time.perf_counter() - self._start, done, n_new)
        if trial.state == TrialState.COMPLETE:
            cvm = trial.user_attrs.get("cv", {})
            logger.info(
                "[%d/%d] trial %d: objective %.4f (val R² %.4f ± %.4f, train R² %.4f) in %.1fs; %s",
                done, n_new, trial.number, trial.value, cvm.get("val_r2_mean", float("nan")),
                cvm.get("val_r2_std", float("nan")), cvm.get("train_r2_mean", float("nan")),
                trial.user_attrs.get("wall_s", 0.0), best_txt,
            )
        elif trial.state == TrialState.PRUNED:
            logger.info(
                "[%d/%d] trial %d pruned after %d fold(s) (running objective %.4f), replaced; %s", done, n_new,
                trial.number, trial.user_attrs.get("pruned_after_folds", 0),
                trial.value if trial.value is not None else float("nan"), best_txt,
            )
        else:
            logger.warning(
                "[%d/%d] trial %d %s, replaced: %s; %s", done, n_new, trial.number, trial.state.name,
                trial.user_attrs.get("fail_reason", "see the error above"), best_txt,
            )
