"""The epoch loops side by side, in one process, on the benchmark's workload.

Issue 17 asks whether the fixed-shape epoch loop, replayed as a CUDA graph
(:mod:`step5.nn.device_loop`), trains the default workload (20 trials x 5 folds) in at
most 0.2x the wall of the fused path that came before it (the host loop, one sync per
epoch), with metrics within 1e-3 relative. This script measures exactly that, with
nothing but training in the timed section: the same fold NPZs and requests as
``bench.run_benchmark`` (``bench.workload``), the groups the optimizer would send
(``BenchContext.groups``), each trained through ``step5.nn.job.run_fold_group`` -- what a
persistent worker runs for a fused group -- in this process, on ``cuda:0`` (or the CPU,
where it is only a functional check: there the graph loop does not capture).

Modes (``--modes``; the loop is chosen per mode through ``STEP5_TRAIN_LOOP``):

* ``host-1``: the host loop, each fold alone (the reference for the metric check);
* ``host-ff``: the host loop, each trial's folds fused: the fused path before issue 17;
* ``graph-ff``: the graph loop, each trial's folds fused;
* ``graph-ft``: the graph loop, same-shape trials of a batch fused as well.

Per mode it prints the median wall over ``--rounds`` (each after one untimed warm-up
round), the kernel time over wall (device time that ``torch.profiler`` records in one
profiled run of the first batches, over the same batches' unprofiled wall: the share of
the wall the GPU was busy), the speedup over ``host-ff``, and the largest relative difference of each job's
metrics from the reference mode. Writes ``gpu_loop.json`` and ``gpu_loop.png`` to ``--out``.

Usage::

    python -m bench.gpu_loop [--trials 20 --folds 5 --rounds 3 --modes host-ff,graph-ff,graph-ft --out DIR]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from step5.devices import TRAIN_LOOP_ENV, DeviceSlot

from bench.modes import BenchContext
from bench.workload import build_workload

logger = logging.getLogger("bench.gpu_loop")

#: mode -> (epoch loop, fusion as BenchContext.groups takes it)
MODES: dict[str, tuple[str, str | None]] = {
    "host-1": ("host", None),
    "host-ff": ("host", "folds"),
    "graph-ff": ("graph", "folds"),
    "graph-ft": ("graph", "trials"),
}
BASELINE = "host-ff"  # the fused path before the graph loop: the speedup's denominator
METRIC_KEYS = ("r2", "val_mse", "train_r2", "train_mse")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_loop", description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--survivors", type=int, default=2000)
    ap.add_argument("--features", type=int, default=90)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per mode (the median is reported)")
    ap.add_argument("--trials-in-flight", type=int, default=0,
                    help="trials per batch, as the optimizer's --trials-in-flight [its default for one GPU]")
    ap.add_argument("--modes", default="host-1,host-ff,graph-ff,graph-ft",
                    help=f"comma-separated, from {','.join(MODES)}; the first is the metric reference")
    ap.add_argument("--profile-trials", type=int, default=4,
                    help="kernel time is profiled over the batches of the first N trials (0: none) [4]; "
                         "profiling every kernel of the whole workload costs minutes")
    ap.add_argument("--rtol", type=float, default=1e-3, help="metric tolerance, relative [1e-3]")
    ap.add_argument("--out", default="bench/results", help="folder for gpu_loop.json / gpu_loop.png")
    ap.add_argument("--data-dir", default=None, help="where the generated sample is kept [OUT/data]")
    args = ap.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown or not args.mode_list:
        ap.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    return args


def _train_round(groups: list[list[list[Any]]], device: Any, cache: Any) -> tuple[float, list[dict[str, Any]]]:
    import torch

    from step5.nn.job import run_fold_group

    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for batch in groups:
        for group in batch:
            results.extend(run_fold_group(group, device=device, cache=cache))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, results


def _device_time_s(prof: Any) -> float:
    """Seconds of device activity (kernels, copies) a torch.profiler run recorded."""
    total_us = 0.0
    for evt in prof.key_averages():
        total_us += float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)))
    return total_us / 1e6


def run_mode(name: str, ctx: BenchContext, device: Any, rounds: int, profile_trials: int,
             ops_table: Path | None = None) -> dict[str, Any]:
    from step5.nn.job import DataCache

    loop, fuse = MODES[name]
    os.environ[TRAIN_LOOP_ENV] = loop
    groups = ctx.groups(fuse)
    cache = DataCache()
    _train_round(groups[:1], device, cache)  # warm-up: data cache, kernels, allocator
    walls, results = [], []
    for _ in range(1 if name == "host-1" else rounds):  # the slow reference: one round
        wall, results = _train_round(groups, device, cache)
        walls.append(wall)
    out: dict[str, Any] = {
        "mode": name, "loop": loop, "fuse": fuse or "none", "passes": sum(len(b) for b in groups),
        "wall_s": sorted(walls)[(len(walls) - 1) // 2], "rounds_wall_s": walls,
        "results": {r["job_id"]: r for r in results},
    }
    if profile_trials > 0 and device.type == "cuda" and name != "host-1":
        from torch.profiler import ProfilerActivity, profile as torch_profile

        # The first batches only, timed unprofiled and then profiled: device time over
        # that wall is the share of the wall the GPU was busy.
        part = groups[: max(1, -(-profile_trials // ctx.in_flight))]
        part_wall, _ = _train_round(part, device, cache)
        with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
            _train_round(part, device, cache)
        out["profiled_trials"] = sum(len({r.trial_number for g in b for r in g}) for b in part)
        out["device_s"] = _device_time_s(prof)
        out["profiled_part_wall_s"] = part_wall
        out["kernel_over_wall"] = out["device_s"] / part_wall
        if ops_table is not None:  # where the device time goes, op by op
            ops_table.write_text(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25))
    logger.info("%s: wall %.3fs (rounds %s)", name, out["wall_s"], ", ".join(f"{w:.3f}" for w in walls))
    return out


def max_rel_diff(a: dict[str, dict[str, Any]], b: dict[str, dict[str, Any]]) -> tuple[float, int]:
    """Largest relative metric difference over the jobs both ran, and how many jobs'
    epoch counts differ (early stopping flipped by rounding)."""
    worst, flips = 0.0, 0
    for job_id, ra in a.items():
        rb = b[job_id]
        for k in METRIC_KEYS:
            x, y = float(ra[k]), float(rb[k])
            worst = max(worst, abs(x - y) / max(abs(y), 1e-12))
        flips += int(ra["epochs_run"] != rb["epochs_run"])
    return worst, flips


def report(runs: list[dict[str, Any]], rtol: float) -> tuple[str, bool]:
    ref = runs[0]
    base = next((r for r in runs if r["mode"] == BASELINE), None)
    lines = [
        f"{'mode':<9} {'passes':>6} {'wall s':>8} {'rounds min-max':>15} {'kernel/wall':>11} "
        f"{'x ' + BASELINE:>10} {'max rel diff':>12} {'epoch flips':>11}"
    ]
    ok = True
    for r in runs:
        diff, flips = max_rel_diff(r["results"], ref["results"])
        ok &= diff <= rtol
        speed = f"{r['wall_s'] / base['wall_s']:.3f}" if base else "-"
        kw = f"{r['kernel_over_wall']:.2f}" if "kernel_over_wall" in r else "-"
        lo, hi = min(r["rounds_wall_s"]), max(r["rounds_wall_s"])
        lines.append(f"{r['mode']:<9} {r['passes']:>6} {r['wall_s']:>8.3f} {f'{lo:.3f}-{hi:.3f}':>15} {kw:>11} "
                     f"{speed:>10} {diff:>12.1e} {flips:>11}")
    graph = [r for r in runs if r["loop"] == "graph"]
    if base and graph:
        best = min(graph, key=lambda r: r["wall_s"])
        ratio = best["wall_s"] / base["wall_s"]
        lines.append(f"target: the graph loop ({best['mode']}) in <= 0.2x the {BASELINE} wall: {ratio:.3f}x "
                     f"({base['wall_s'] / best['wall_s']:.1f}x faster) {'HOLDS' if ratio <= 0.2 else 'MISSED'}")
    lines.append(f"metrics within {rtol:g} relative of {ref['mode']}: {'MATCH' if ok else 'DIFFER'}")
    return "\n".join(lines), ok


def plot(runs: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = [r["mode"] for r in runs]
    walls = [r["wall_s"] for r in runs]
    ax.barh(names, walls, color=["#888" if r["loop"] == "host" else "#2a7" for r in runs], label="wall")
    busy = [r["kernel_over_wall"] * r["wall_s"] if "kernel_over_wall" in r else 0.0 for r in runs]
    if any(busy):
        ax.barh(names, busy, height=0.35, color="#135", label="device busy (kernel/wall x wall)")
        ax.legend(loc="lower right", fontsize=8)
    for y, w in enumerate(walls):
        ax.text(w, y, f" {w:.2f}s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("seconds")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    import torch

    device = torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cpu":
        logger.warning("no GPU: the graph loop runs without capture; timings say nothing about issue 17")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_loop_") as tmp, build_workload(
        n_trials=args.trials, k_folds=args.folds, n_survivors=args.survivors, n_features=args.features,
        seed=args.seed, data_dir=Path(args.data_dir) if args.data_dir else out / "data", fold_dir=Path(tmp),
    ) as workload:
        # One slot, as one GPU (only its count matters here: the optimizer's default B).
        slot = DeviceSlot(label=f"{device.type.upper()}-0", kind=device.type, cuda_visible_devices="0")
        ctx = BenchContext(workload=workload, slots=[slot], trials_in_flight=args.trials_in_flight)
        runs = [run_mode(m, ctx, device, args.rounds, args.profile_trials, out / f"gpu_ops_{m}.txt")
                for m in args.mode_list]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    title = (f"{args.trials} trials x {args.folds} folds, {args.survivors} survivors x {args.features} features, "
             f"torch {torch.__version__}, {gpu}")
    table, ok = report(runs, args.rtol)
    print(title)
    print(table)
    (out / "gpu_loop.json").write_text(json.dumps(
        {"title": title, "runs": [{k: v for k, v in r.items() if k != "results"} for r in runs],
         "results": {r["mode"]: r["results"] for r in runs}}, indent=1, default=str))
    plot(runs, out / "gpu_loop.png", title)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
