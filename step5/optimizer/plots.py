"""Pictures of a run (matplotlib, Agg, imported lazily); a failure to draw is logged, never fatal."""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

from optuna.trial import FrozenTrial, TrialState

from step5.fsutil import atomic_output

logger = logging.getLogger(__name__)


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
