"""Judge and present the runs: metric cross-check, per-mode figures, targets, outputs.

Definitions used in the table (all from measurements of this run):

* ``wall s``: the timed section, first job submitted -> last result back (processes
  already started and warmed; that part is ``startup s``), of the mode's median round;
* ``rounds min-max``: the fastest and slowest round's wall (how noisy the machine was);
* ``x limit``: wall / the limit's wall with the same number of processes (``limit1`` for
  one process);
* ``compute s``: the sum over jobs of the job's own in-process time (``duration``: load +
  train + score, measured by the training core in whichever process ran it);
* ``overhead/fold ms``: (processes x wall - compute) / jobs: everything a fold cost beyond
  its own work, idle waiting included (spawn, import, IPC, stragglers at trial ends);
* ``max rel diff``: the largest relative difference of r2 / val_mse / train_mse from the
  reference mode over all jobs (0 means bit-identical).
"""
from __future__ import annotations

import importlib.metadata
import logging
import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from bench.modes import MODES, ModeRun

logger = logging.getLogger(__name__)

METRIC_KEYS = ("r2", "val_mse", "train_mse")
EXACT_KEYS = ("epochs_run",)


# -- metrics -------------------------------------------------------------------------------


def _rel(a: float, b: float) -> float:
    if a == b:
        return 0.0
    if not (math.isfinite(a) and math.isfinite(b)):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare_metrics(runs: Sequence[ModeRun], rtol: float) -> dict[str, Any]:
    """Every run against the first one, job by job; mismatches listed (at most 10).

    Several runs may share a name (a mode's rounds): the mode's figure is its worst run.
    """
    if not runs:
        return {"reference": None, "max_rel_diff": {}, "ok": True, "mismatches": []}
    ref = runs[0]
    ref_by_id = {r["job_id"]: r for r in ref.results}
    out: dict[str, float] = {}
    mismatches: list[str] = []
    for run in runs:
        by_id = {r["job_id"]: r for r in run.results}
        missing = sorted(set(ref_by_id) ^ set(by_id))
        if missing:
            mismatches.append(f"{run.name}: jobs differ from {ref.name}: {missing[:5]}")
            out[run.name] = math.inf
            continue
        worst = 0.0
        for job_id, a in ref_by_id.items():
            b = by_id[job_id]
            for key in METRIC_KEYS:
                d = _rel(float(a[key]), float(b[key]))
                worst = max(worst, d)
                if d > rtol and len(mismatches) < 10:
                    mismatches.append(f"{run.name} {job_id} {key}: {b[key]!r} vs {ref.name} {a[key]!r} (rel {d:.2e})")
            for key in EXACT_KEYS:
                if key in a and a.get(key) != b.get(key):
                    worst = math.inf
                    if len(mismatches) < 10:
                        mismatches.append(f"{run.name} {job_id} {key}: {b.get(key)!r} vs {ref.name} {a[key]!r}")
        out[run.name] = max(out.get(run.name, 0.0), worst)  # a mode's rounds: the worst one counts
    ok = all(v <= rtol for v in out.values())
    return {"reference": ref.name, "rtol": rtol, "max_rel_diff": out, "ok": ok, "mismatches": mismatches}


# -- per-mode figures ----------------------------------------------------------------------


def mode_row(run: ModeRun, runs: Mapping[str, ModeRun]) -> dict[str, Any]:
    """The figures of one mode's row (see the module docstring)."""
    jobs = len(run.results)
    compute = sum(float(r.get("duration", 0.0)) for r in run.results)
    train = sum(float(r.get("train_s", 0.0)) for r in run.results)
    mode = MODES.get(run.name)
    single = run.processes == 1 or (mode is not None and mode.single_process)
    limit = runs.get("limit1") if single else runs.get("limit")
    if limit is None:
        # With one process (one GPU) `limit` is itself a one-process limit: either serves.
        limit = next((runs[name] for name in ("limit1", "limit")
                      if name in runs and runs[name].processes == run.processes), None)
    ratio = run.wall_s / limit.wall_s if limit is not None and limit.wall_s > 0 else None
    r2 = [float(r["r2"]) for r in run.results if "r2" in r]
    return {
        "mode": run.name,
        "processes": run.processes,
        "wall_s": run.wall_s,
        "wall_rounds_s": list(run.extra.get("rounds_wall_s", [run.wall_s])),
        "x_limit": ratio,
        "limit_ref": limit.name if limit is not None else None,
        "startup_s": run.startup_s,
        "compute_s": compute,
        "train_s": train,
        "overhead_per_fold_ms": (run.processes * run.wall_s - compute) / jobs * 1e3 if jobs else None,
        "jobs": jobs,
        "mean_r2": sum(r2) / len(r2) if r2 else None,
    }


# -- targets -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A ratio of two modes' walls and the bound it must meet."""

    name: str
    text: str
    needs: tuple[str, ...]
    value: Callable[[Mapping[str, float], Mapping[str, int]], float]  # (walls, processes) -> ratio
    op: str  # ">=" or "<="
    bound: float

    def judge(self, walls: Mapping[str, float], processes: Mapping[str, int] | None = None) -> dict[str, Any]:
        if not all(n in walls for n in self.needs):
            return {"name": self.name, "text": self.text, "value": None, "bound": self.bound, "op": self.op,
                    "held": None}
        v = self.value(walls, processes or {})
        held = v >= self.bound if self.op == ">=" else v <= self.bound
        return {"name": self.name, "text": self.text, "value": v, "bound": self.bound, "op": self.op, "held": held}


TARGETS = (
    Target("s96b_speedup_vs_s96a", "S96B at least 5x faster than S96A (s96a wall / s96b wall)",
           ("s96a", "s96b"), lambda w, n: w["s96a"] / w["s96b"], ">=", 5.0),
    Target("s96b_vs_ideal", "S96B within 1.05x of the ideal parallel limit (s96b / (limit1 / N processes))",
           ("s96b", "limit1"), lambda w, n: w["s96b"] / (w["limit1"] / n["s96b"]), "<=", 1.05),
    Target("s96b_vs_limit", "S96B within 1.15x of the limit with the same processes (s96b / limit)",
           ("s96b", "limit"), lambda w, n: w["s96b"] / w["limit"], "<=", 1.15),
    Target("s96b_vs_loky", "S96B no slower than the loky peer (s96b / loky)",
           ("s96b", "loky"), lambda w, n: w["s96b"] / w["loky"], "<=", 1.0),
)


def judge_targets(runs: Mapping[str, ModeRun]) -> list[dict[str, Any]]:
    walls = {name: run.wall_s for name, run in runs.items()}
    processes = {name: run.processes for name, run in runs.items()}
    return [t.judge(walls, processes) for t in TARGETS]


# -- machine -------------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    """CPU model, cores, memory, GPUs and library versions — without importing torch."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem_gib = None
    try:
        import psutil

        mem_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:  # noqa: BLE001 - optional detail
        pass
    gpus: list[str] = []
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            proc = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                                  text=True, timeout=10, check=False)
            gpus = [g.strip() for g in proc.stdout.splitlines() if g.strip()]
        except (OSError, subprocess.TimeoutExpired):
            pass

    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "cpu_model": model,
        "cpu_cores": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpus": gpus,
        "python": platform.python_version(),
        "torch": version("torch"),
        "joblib": version("joblib"),
        "numpy": version("numpy"),
        "os": f"{platform.system()} {platform.release()}",
    }


# -- output --------------------------------------------------------------------------------


def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-" if v is None else "inf"
    return format(v, spec)


def format_table(rows: Sequence[Mapping[str, Any]], metrics: Mapping[str, Any]) -> str:
    """The per-mode table as fixed-width text."""
    header = ("mode", "procs", "wall s", "rounds min-max", "x limit", "startup s", "compute s", "overhead/fold ms", "jobs",
              "mean R2", "max rel diff")
    diffs = metrics.get("max_rel_diff", {})
    body = [
        (
            r["mode"],
            str(r["processes"]),
            _fmt(r["wall_s"], ".2f"),
            f"{min(r['wall_rounds_s']):.2f}-{max(r['wall_rounds_s']):.2f}" if len(r["wall_rounds_s"]) > 1 else "-",
            _fmt(r["x_limit"], ".2f"),
            _fmt(r["startup_s"], ".2f"),
            _fmt(r["compute_s"], ".2f"),
            _fmt(r["overhead_per_fold_ms"], ".1f"),
            str(r["jobs"]),
            _fmt(r["mean_r2"], ".4f"),
            _fmt(diffs.get(r["mode"]), ".1e"),
        )
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(header, widths)))]
    lines.append("  ".join("-" * w for w in widths))
    for b in body:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths))))
    return "\n".join(lines)


def format_targets(targets: Sequence[Mapping[str, Any]]) -> str:
    lines = []
    for t in targets:
        if t["held"] is None:
            lines.append(f"  n/a     {t['text']}: mode(s) not run")
        else:
            word = "HOLDS " if t["held"] else "MISSED"
            lines.append(f"  {word}  {t['text']}: {t['value']:.2f} (target {t['op']} {t['bound']:g})")
    return "\n".join(lines)


def format_survivors_datapath(data: Mapping[str, Any]) -> list[str]:
    """The data-path report lines for :func:`survivors_datapath`'s result."""
    k = data["kinds"]
    lines = [
        f"  survivors file: {data['records']} records x {data['features']} features, json.dump indent=2, "
        f"{data['file_mib']} MiB; median of {data['rounds']} round(s) (ratios: median of each round's ratio), "
        f"each kind in a fresh process; "
        f"load average {data['load_average'][0]:.2f} before, {data['load_average'][1]:.2f} after "
        f"({data['cpu_cores']} cores)",
        f"    {'reader':<18} {'seconds':>8} {'x json.load':>12} {'CPU s':>7} {'x json.load':>12} {'peak MiB':>9} "
        f"{'x file':>7}   rounds (s)",
    ]
    labels = {"json_load": "json.load", "load_survivors": "load_survivors", "predictor_reader": "predictor reader"}
    for kind, v in k.items():
        x = "1.00" if kind == "json_load" else f"{v['x_json_load']:.2f}"
        cx = "1.00" if kind == "json_load" else f"{v['cpu_x_json_load']:.2f}"
        rounds = ", ".join(f"{s:.2f}" for s in v["seconds_rounds"])
        lines.append(
            f"    {labels[kind]:<18} {v['seconds']:>8.2f} {x:>12} {v['cpu_seconds']:>7.2f} {cx:>12} "
            f"{v['peak_mib']:>9.0f} {v['peak_x_file']:>7.2f}   {rounds}"
        )
    for t in data["targets"]:
        word = "HOLDS " if t["held"] else "MISSED"
        lines.append(f"  {word}  {t['text']}: {t['value']:.2f} (target {t['op']} {t['bound']:g})")
    cores = data["cpu_cores"] or 1
    if max(data["load_average"]) > 0.5 * cores:
        lines.append(
            "  BUSY: other processes competed for the cores, so wall times are inflated and noisy; "
            "the CPU-second columns show each reader's own work"
        )
    return lines


def format_datapath(data: Mapping[str, Any]) -> str:
    lines = []
    big = data.get("survivors")
    if big:
        lines += format_survivors_datapath(big)
    h = data.get("handoff")
    if h:
        lines.append(
            f"  fold hand-off: parent writes NPZ {h['npz_write_ms_median']:.2f} ms/fold ({h['npz_kb']} KB, "
            f"{h['fold_dir_fs']}), request line {h['request_line_bytes_median']} B"
        )
        for name, w in h["worker_load"].items():
            miss = "-" if w["load_ms_miss_median"] is None else f"{w['load_ms_miss_median']:.2f} ms"
            hit = "-" if w["load_ms_hit_median"] is None else f"{w['load_ms_hit_median']:.3f} ms"
            line = f"    {name:<7} NPZ load: miss {miss} (x{w['misses']}), cache hit {hit} (x{w['hits']})"
            if w.get("runner_overhead_ms_per_job") is not None:
                line += f"; per job beyond its own work, as the runner saw it: {w['runner_overhead_ms_per_job']:.1f} ms"
            lines.append(line)
    return "\n".join(lines)


def write_png(path: Path, rows: Sequence[Mapping[str, Any]], title: str) -> None:
    """Two panels: wall per mode (mean busy time per process vs the rest), overhead per fold."""
    import matplotlib

    matplotlib.use("Agg")  # headless; never opens a window
    import matplotlib.pyplot as plt

    names = [r["mode"] for r in rows]
    walls = [r["wall_s"] for r in rows]
    busy = [min(r["wall_s"], r["compute_s"] / max(1, r["processes"])) for r in rows]
    rest = [w - b for w, b in zip(walls, busy)]
    over = [max(1e-3, r["overhead_per_fold_ms"] or 0.0) for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 0.6 * len(rows) + 2.2))
    y = list(range(len(rows)))
    ax1.barh(y, busy, color="#4c72b0", label="training compute (per process)")
    ax1.barh(y, rest, left=busy, color="#dd8452", label="everything else")
    for yi, r in zip(y, rows):
        label = f"{r['wall_s']:.1f}s" + (f"  ({r['x_limit']:.2f}x limit)" if r["x_limit"] is not None else "")
        ax1.text(r["wall_s"], yi, " " + label, va="center", fontsize=8)
    ax1.set_yticks(y, names)
    ax1.invert_yaxis()
    ax1.set_xlabel("wall time, s")
    ax1.set_xlim(0, max(walls) * 1.45 if walls else 1)
    ax1.legend(loc="upper right", fontsize=8)  # the slow modes sit at the bottom
    ax1.set_title("wall time of the workload")
    ax2.barh(y, over, color="#55a868")
    ax2.set_xscale("log")
    ax2.set_yticks(y, names)
    ax2.invert_yaxis()
    ax2.set_xlabel("overhead per fold, ms (log)")
    ax2.set_title("per-fold overhead")
    for yi, o in zip(y, over):
        ax2.text(o, yi, f" {o:.1f}", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
