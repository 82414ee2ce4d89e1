"""Per-run diagnostics (``--enable-diagnostics``): every trial's folds, as JSON and a picture.

Written under ``<diagnostics_dir>/step5_<model_type>_<run_id>/``:

* ``trials.json``: the run's identity, the execution summary, the final model's metrics,
  and one record per trial of the study (``this_run`` tells resumed history from new
  trials): number, state, value, params, CV means, per-fold metrics (R², MSE, durations,
  device, epochs run), wall-clock seconds and, for a failed trial, why;
* ``timings.png``: per-trial wall-clock against summed fold compute.

Diagnostics never fail a run: a write error is logged as a warning.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

from optuna.trial import FrozenTrial

from step5.jsonio import write_json_atomic
from step5.optimizer.plots import plot_trial_timings

logger = logging.getLogger(__name__)


def trial_record(trial: FrozenTrial, *, first_new_number: int) -> dict[str, Any]:
    """One trial as plain JSON data."""
    attrs = trial.user_attrs
    duration = trial.duration.total_seconds() if trial.duration is not None else None
    return {
        "number": trial.number,
        "state": trial.state.name,
        "value": trial.value,
        "this_run": trial.number >= first_new_number,
        "params": attrs.get("params", trial.params),
        "cv": attrs.get("cv"),
        "folds": attrs.get("folds", []),
        "wall_s": attrs.get("wall_s", duration),
        "fail_reason": attrs.get("fail_reason"),
        "datetime_start": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "datetime_complete": trial.datetime_complete.isoformat() if trial.datetime_complete else None,
    }


def write_run_diagnostics(
    diagnostics_dir: Path,
    *,
    model_type: str,
    run_id: str,
    trials: Sequence[FrozenTrial],
    first_new_number: int,
    execution: dict[str, Any],
    final_metrics: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> Path | None:
    """Write ``trials.json`` and ``timings.png`` for one run; returns the run's folder."""
    folder = Path(diagnostics_dir) / f"step5_{model_type}_{run_id}"
    try:
        records = [trial_record(t, first_new_number=first_new_number) for t in trials]
        write_json_atomic(
            folder / "trials.json",
            {
                "run_id": run_id,
                "model_type": model_type,
                **(extra or {}),
                "execution": execution,
                "final_model": final_metrics,
                "trials": records,
            },
        )
        plot_trial_timings(
            [r for r in records if r["this_run"]], folder / "timings.png",
            title=f"Step 5 {model_type}: trial timings (run {run_id[:8]})",
        )
    except OSError as exc:
        logger.warning("could not write diagnostics under %s: %s", folder, exc)
        return None
    logger.info("diagnostics written to %s", folder)
    return folder
