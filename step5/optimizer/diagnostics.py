"""Per-run diagnostics (``--enable-diagnostics``), the pipeline health check's report and the run's pictures
(docs/optimizer-internals.md#diagnostics); a write error or a failure to draw is only logged."""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from optuna.trial import FrozenTrial, TrialState

from step5.artifacts import COMPARE_SUMMARY_NAME
from step5.fsutil import atomic_output
from step5.jsonio import write_json_atomic
from step5.policy import DiagnosticsPolicy, bound_breaches
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


def retire(folder: Path, name: str) -> Path | None:
    """Rename ``folder/name`` (an earlier run's file) to ``<stem>_<its UTC mtime><suffix>`` (the existing
    optimizer's per-run name) and return the new path; None when there is none. The pipeline's health
    check reads the compare summary's winner as the model type of whatever ``training_diagnostics.json``
    beside it holds: a report and a summary from two different runs make it judge the wrong model
    (docs/compatibility.md), so a run that writes one retires the other's stale copy."""
    src, stem, suffix = folder / name, Path(name).stem, Path(name).suffix
    try:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(src.stat().st_mtime))
    except FileNotFoundError:
        return None
    dst, n = folder / f"{stem}_{stamp}{suffix}", 1
    while dst.exists():  # two runs in the same second: keep both
        dst, n = folder / f"{stem}_{stamp}_{n}{suffix}", n + 1
    try:
        os.rename(src, dst)
    except FileNotFoundError:  # another run retired it first
        return None
    logger.info("%s described an earlier run: kept as %s", src, dst.name)
    return dst


def write_health_report(diagnostics_dir: Path, report: Mapping[str, Any], *, model_type: str | None) -> Path | None:
    """Write the health check's ``training_diagnostics.json`` (and, for one model's report, also
    ``<model_type>_diagnostics.json``); a write error is only logged."""
    folder = Path(diagnostics_dir)
    try:
        if model_type is not None:
            write_json_atomic(folder / f"{model_type}_diagnostics.json", report)
            # Before the report that replaces a compare run's: never the new report beside the old winner.
            retire(folder, COMPARE_SUMMARY_NAME)
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


@contextlib.contextmanager
def drawing(what: str, path: Path, figsize: tuple[float, float] = (8, 4.5)) -> Iterator[Any]:
    """A matplotlib Figure to draw on; any error inside is logged as not drawing ``what``, and swallowed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no display

        yield Figure(figsize=figsize)
    except Exception as exc:  # noqa: BLE001 - a picture must never fail a run
        logger.warning("could not draw %s %s: %s: %s", what, path, type(exc).__name__, exc)


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically: readers never see half a picture."""
    fig.tight_layout()
    with atomic_output(path, keep_suffix=True) as tmp:  # savefig picks the format by suffix
        fig.savefig(tmp, dpi=110)
    return path


def plot_optimization_history(trials: Sequence[FrozenTrial], path: Path, *, title: str) -> Path | None:
    """Objective per trial (dots; failed trials as red x on the axis floor) and the best so far."""
    with drawing("the optimisation history", path) as fig:
        ax = fig.subplots()
        done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
        failed = [t for t in trials if t.state == TrialState.FAIL]
        xs = [t.number for t in done]
        ys = [float(t.value) for t in done]  # type: ignore[arg-type]
        ax.scatter(xs, ys, s=18, color="tab:blue", label="objective (complete trial)", zorder=3)
        if ys:
            ax.step(xs, [max(ys[: i + 1]) for i in range(len(ys))], where="post", color="tab:orange",
                    label="best so far", zorder=2)
        if failed:
            ax.scatter([t.number for t in failed], [min(ys) if ys else 0.0] * len(failed), marker="x",
                       color="tab:red", label="failed trial", zorder=3)
        ax.set(xlabel="trial number", ylabel="anti-overfit objective", title=title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        return save_figure(fig, path)
    return None


def plot_trial_timings(records: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path | None:
    """Per trial: wall-clock seconds (bar) and the summed fold compute seconds (dot); the gap is what
    process management cost (boot, imports, transfers), less what concurrency across folds won back."""
    with drawing("the timings plot", path) as fig:
        ax = fig.subplots()
        rows = [r for r in records if r.get("wall_s") is not None]
        xs = [r["number"] for r in rows]
        ax.bar(xs, [r["wall_s"] for r in rows], color="tab:gray", alpha=0.6, label="trial wall-clock (s)")
        compute = [sum(float(f.get("duration", 0.0)) for f in r.get("folds", [])) for r in rows]
        ax.scatter(xs, compute, color="tab:green", zorder=3, label="sum of fold compute (s)")
        ax.set(xlabel="trial number", ylabel="seconds", title=title)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper right")
        return save_figure(fig, path)
    return None
