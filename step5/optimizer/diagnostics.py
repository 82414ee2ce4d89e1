"""Per-run diagnostics (``--enable-diagnostics``) and the pipeline health check's report
(docs/optimizer-internals.md#diagnostics); a write error is only logged."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from optuna.trial import FrozenTrial

from step5.jsonio import write_json_atomic
from step5.policy import DiagnosticsPolicy, bound_breaches
from step5.optimizer.plots import plot_trial_timings
from step5.values import utc_timestamp

logger = logging.getLogger(__name__)


def trial_record(trial: FrozenTrial, *, first_new_number: int) -> dict[str, Any]:
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


def write_run_diagnostics(diagnostics_dir: Path, *, model_type: str, run_id: str, trials: Sequence[FrozenTrial],
                          first_new_number: int, execution: dict[str, Any], final_metrics: dict[str, Any] | None,
                          extra: dict[str, Any] | None = None) -> Path | None:
    folder = Path(diagnostics_dir) / f"step5_{model_type}_{run_id}"
    try:
        records = [trial_record(t, first_new_number=first_new_number) for t in trials]
        write_json_atomic(folder / "trials.json", {"run_id": run_id, "model_type": model_type, **(extra or {}),
                                                    "execution": execution, "final_model": final_metrics,
                                                    "trials": records})
        plot_trial_timings([r for r in records if r["this_run"]], folder / "timings.png",
                           title=f"Step 5 {model_type}: trial timings (run {run_id[:8]})")
    except OSError as exc:
        logger.warning("could not write diagnostics under %s: %s", folder, exc)
        return None
    logger.info("diagnostics written to %s", folder)
    return folder


#: The pipeline's file names: the health check reads HEALTH_FILE.
HEALTH_FILE = "training_diagnostics.json"
HEALTH_SCHEMA_VERSION = "1.1.0"  # the existing diagnostics writer's schema, which the health check reads


def model_health_report(model_type: str, metrics: Mapping[str, Any], diagnostics: DiagnosticsPolicy) -> dict[str, Any]:
    """One model's report in the pipeline's diagnostics schema, from its sidecar's ``training_metrics``
    (``rounds_captured`` 0 without a training curve: the health check reads "no early-stop data")."""
    breaches = bound_breaches(metrics, diagnostics)
    levels = {level for level, _ in breaches}
    severity = "critical" if "critical" in levels else "warning" if "warning" in levels else "ok"
    train_loss, val_loss = metrics.get("cv_train_mse_mean"), metrics.get("cv_val_mse_mean")
    rounds, best = metrics.get("rounds_trained"), metrics.get("best_round")
    summary = {
        "rounds_captured": rounds if rounds is not None and best is not None else 0,
        "best_round": best if rounds is not None and best is not None else 0,
        "final_train_loss": train_loss,
        "final_val_loss": val_loss,
        "best_val_loss": val_loss,
        "overfit_gap": val_loss - train_loss if train_loss is not None and val_loss is not None else None,
        "overfit_ratio": metrics.get("overfit_ratio"),
        "early_stop_ratio": metrics.get("early_stop_ratio"),
        "loss": "MSE of the best trial's CV folds (train rows / validation rows)",
    }
    summary["best_val_round"] = summary["best_round"]
    return {
        "schema_version": HEALTH_SCHEMA_VERSION,
        "model_type": model_type,
        "status": "complete",
        "generated_at": utc_timestamp(),
        "generated_by": "step5",
        "training_summary": summary,
        "diagnosis": {
            "severity": severity,
            "issues": [description for _, description in breaches],
            "suggested_fixes": [],
            "confidence": 0.9,
        },
        "model_specific": {},
        "metrics": {k: metrics.get(k) for k in ("cv_r2_mean", "cv_r2_std", "test_r2", "train_r2")},
    }


def write_health_report(diagnostics_dir: Path, report: Mapping[str, Any], *, model_type: str | None) -> Path | None:
    folder = Path(diagnostics_dir)
    try:
        if model_type is not None:
            write_json_atomic(folder / f"{model_type}_diagnostics.json", report)
        path = write_json_atomic(folder / HEALTH_FILE, report)
    except OSError as exc:
        logger.warning("could not write the health diagnostics under %s: %s", folder, exc)
        return None
    logger.info("health diagnostics written to %s (severity %s)", path,
                report.get("diagnosis", {}).get("severity", "see models"))
    return path


def compare_health_report(reports: Mapping[str, Mapping[str, Any]], *, winner: str | None, criterion: str,
                          winner_value: float | None, ranking: Sequence[str]) -> dict[str, Any]:
    return {
        "schema_version": HEALTH_SCHEMA_VERSION,
        "generated_at": utc_timestamp(),
        "generated_by": "step5",
        "mode": "compare_models",
        "models": dict(reports),
        "comparison": {"winner": winner, "winner_metric": criterion, "winner_value": winner_value,
                       "ranking": list(ranking)},
    }
