"""Pictures of a run (matplotlib, Agg, imported lazily); a failure to draw is logged, never fatal."""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Sequence

from optuna.trial import FrozenTrial, TrialState

from step5.fsutil import atomic_output

logger = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as a PNG atomically: readers never see half a picture."""
    with atomic_output(path, keep_suffix=True) as tmp:  # savefig picks the format by suffix
        fig.savefig(tmp, dpi=110)
    return path


def plot_optimization_history(trials: Sequence[FrozenTrial], path: Path, *, title: str) -> Path | None:
    """Objective per trial (dots; failed trials as red x on the axis floor) and the best so far."""
    try:
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(8, 4.5))
        try:
            done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
            failed = [t for t in trials if t.state == TrialState.FAIL]
            xs = [t.number for t in done]
            ys = [float(t.value) for t in done]  # type: ignore[arg-type]
            ax.scatter(xs, ys, s=18, color="tab:blue", label="objective (complete trial)", zorder=3)
            if ys:
                best, best_line = -math.inf, []
                for y in ys:
                    best = max(best, y)
                    best_line.append(best)
                ax.step(xs, best_line, where="post", color="tab:orange", label="best so far", zorder=2)
            if failed:
                floor = min(ys) if ys else 0.0
                ax.scatter([t.number for t in failed], [floor] * len(failed), marker="x", color="tab:red",
                           label="failed trial", zorder=3)
            ax.set_xlabel("trial number")
            ax.set_ylabel("anti-overfit objective")
            ax.set_title(title)
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right")
            fig.tight_layout()
            return save_figure(fig, path)
        finally:
            plt.close(fig)
    except Exception as exc:  # noqa: BLE001 - a picture must never fail a run
        logger.warning("could not draw the optimisation history %s: %s", path, exc)
        return None


def plot_trial_timings(records: Sequence[dict[str, Any]], path: Path, *, title: str) -> Path | None:
    """Per trial: wall-clock seconds (bar) and the summed fold compute seconds (dot).

    The gap between the two is what process management cost (boot, imports, transfers),
    less whatever concurrency across folds won back.
    """
    try:
        plt = _pyplot()
        rows = [r for r in records if r.get("wall_s") is not None]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        try:
            xs = [r["number"] for r in rows]
            ax.bar(xs, [r["wall_s"] for r in rows], color="tab:gray", alpha=0.6, label="trial wall-clock (s)")
            compute = [sum(float(f.get("duration", 0.0)) for f in r.get("folds", [])) for r in rows]
            ax.scatter(xs, compute, color="tab:green", zorder=3, label="sum of fold compute (s)")
            ax.set_xlabel("trial number")
            ax.set_ylabel("seconds")
            ax.set_title(title)
            ax.grid(alpha=0.3, axis="y")
            ax.legend(loc="upper right")
            fig.tight_layout()
            return save_figure(fig, path)
        finally:
            plt.close(fig)
    except Exception as exc:  # noqa: BLE001
        logger.warning("could not draw the timings plot %s: %s", path, exc)
        return None
