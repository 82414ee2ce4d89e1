"""Run the fold-runner benchmark: the same neural-net folds through every mode.

    .venv/bin/python -m bench.run_benchmark [--trials 20 --folds 5 --survivors 2000]
        [--workers N | --gpus auto|none|0,1] [--modes limit1,limit,s96b,loky,s96a]
        [--trials-in-flight B] [--big-survivors 200000] [--out bench/results]

Prints the table, the targets (HOLDS / MISSED) and the data-path timings on stdout; logs
go to stderr. Writes ``benchmark.json``, ``benchmark.png`` and ``benchmark.txt`` (the
printed report) into ``--out``. Exit 0 when the run completed (a missed target included),
3 when the modes' metrics differ, 1 on any error (2: bad command line). See ``docs/benchmark.md``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import logging
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Sequence

from step5.devices import DeviceSlot, parse_gpu_list, plan_slots
from step5.errors import Step5Error
from step5.jsonio import write_json_atomic

from bench.datapath import handoff_stats, survivors_datapath
from bench.modes import DEFAULT_MODES, MODES, BenchContext, ModeRun, median_round, stop_resource_trackers
from bench.report import (
    compare_metrics,
    describe_machine,
    format_datapath,
    format_table,
    format_targets,
    judge_targets,
    mode_row,
    write_png,
)
from bench.workload import build_workload

logger = logging.getLogger("bench")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_METRIC_MISMATCH = 3


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.run_benchmark",
        description="Time the same neural-net folds through S96A, S96B, a loky pool and the warm in-process limit.",
    )
    p.add_argument("--trials", type=int, default=20, help="trials in the fixed params sequence [20]")
    p.add_argument("--folds", type=int, default=5, help="CV folds per trial [5]")
    p.add_argument("--survivors", type=int, default=2000, help="generated survivor records [2000]")
    p.add_argument("--features", type=int, default=90, help="features per record [90]")
    p.add_argument("--seed", type=int, default=42, help="data, split, params and training seed [42]")
    p.add_argument("--workers", type=int, default=None,
                   help="CPU worker processes when there is no GPU [one per core, at most 8]")
    p.add_argument("--gpus", default="auto",
                   help="'auto' (detect, as Step 5 does), 'none' (CPU workers) or a list like '0,1' [auto]")
    p.add_argument("--modes", default=",".join(DEFAULT_MODES),
                   help=f"comma-separated subset of {','.join(MODES)} [{','.join(DEFAULT_MODES)}]")
    p.add_argument("--rounds", type=int, default=3,
                   help="interleaved rounds of the repeatable modes; each row is the mode's median round [3]")
    p.add_argument("--trials-in-flight", type=int, default=0,
                   help="trials per run() call, as the optimizer's --trials-in-flight [0: one per process, "
                        "the optimizer's default]")
    p.add_argument("--big-survivors", type=int, default=200_000,
                   help="records in the json.dump indent=2 survivors file whose reading is timed against "
                        "json.load (one round; `python -m bench.datapath` for more); 0 skips it [200000]")
    p.add_argument("--rtol", type=float, default=1e-6,
                   help="largest relative metric difference between modes that still counts as a match [1e-6]")
    p.add_argument("--job-timeout", type=float, default=600.0, help="per-job timeout, seconds [600]")
    p.add_argument("--ready-timeout", type=float, default=300.0, help="worker boot timeout, seconds [300]")
    p.add_argument("--profile", default=None, metavar="MODE",
                   help="run MODE under cProfile in the parent; writes profile_MODE.txt to --out")
    p.add_argument("--fold-dir", default=None, help="where the fold NPZs go [$TMPDIR]")
    p.add_argument("--out", default="bench/results", help="output folder [bench/results]")
    p.add_argument("--table-out", default=None, help="also write the printed report to this file")
    p.add_argument("--log-level", default="INFO", help="logging level for stderr [INFO]")
    args = p.parse_args(argv)
    args.mode_list = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown or not args.mode_list:
        p.error(f"--modes: unknown mode(s) {unknown}; choose from {list(MODES)}")
    for flag, value, lo in (("--trials", args.trials, 1), ("--folds", args.folds, 2),
                            ("--survivors", args.survivors, 10), ("--features", args.features, 1),
                            ("--big-survivors", args.big_survivors, 0), ("--rounds", args.rounds, 1)):
        if value < lo:
            p.error(f"{flag} must be >= {lo}, got {value}")
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1, got {args.workers}")
    if args.profile is not None and args.profile not in args.mode_list:
        p.error(f"--profile {args.profile!r} must be one of the modes run: {args.mode_list}")
    return args


def _slots(args: argparse.Namespace) -> list[DeviceSlot]:
    if args.gpus == "auto":
        gpus = None  # plan_slots detects, without importing torch
    elif args.gpus == "none":
        gpus = []
    else:
        gpus = parse_gpu_list(args.gpus)
    return plan_slots(gpus, args.workers)


def _run_mode(name: str, ctx: BenchContext, profile_dir: Path | None) -> ModeRun:
    mode = MODES[name]
    logger.info("mode %s: %s", name, mode.summary)
    if profile_dir is None:
        return mode.run(ctx)
    prof = cProfile.Profile()
    prof.enable()
    try:
        return mode.run(ctx)
    finally:
        prof.disable()
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(25)
        path = profile_dir / f"profile_{name}.txt"
        path.write_text(buf.getvalue())
        logger.info("cProfile of mode %s written to %s", name, path)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = describe_machine()
    load_before = os.getloadavg()
    slots = _slots(args)
    logger.info("slots: %s", ", ".join(f"{s.label} (threads={s.torch_threads})" for s in slots))
    started = time.time()
    with build_workload(
        n_trials=args.trials, k_folds=args.folds, n_survivors=args.survivors, n_features=args.features,
        seed=args.seed, data_dir=out / "data", fold_dir=args.fold_dir,
    ) as workload:
        ctx = BenchContext(
            workload=workload, slots=slots, job_timeout_s=args.job_timeout, ready_timeout_s=args.ready_timeout,
            trials_in_flight=args.trials_in_flight,
        )
        rounds: dict[str, list[ModeRun]] = {name: [] for name in args.mode_list}
        # The repeatable modes' rounds back to back (minutes apart at most, so they see the
        # same machine), then the slow once-only modes (S96A takes minutes).
        schedule = [(r, n) for r in range(args.rounds) for n in args.mode_list if MODES[n].repeat]
        schedule += [(0, n) for n in args.mode_list if not MODES[n].repeat]
        for r, name in schedule:
            run_ = _run_mode(name, ctx, out if args.profile == name and r == 0 else None)
            rounds[name].append(run_)
            logger.info("round %d/%d, mode %s: wall %.2fs (startup %.2fs), %d jobs", r + 1, args.rounds, name,
                        run_.wall_s, run_.startup_s, len(run_.results))
        runs = {name: median_round(rs) for name, rs in rounds.items()}
        handed = [n for n in runs if n in ("s96b", "s96a", "loky")]
        handoff = handoff_stats(
            workload, {n: runs[n].results for n in handed},
            {n: runs[n].extra["runner"]["timings"] for n in handed if "runner" in runs[n].extra},
        )
        workload_info = workload.describe()
    load_after_modes = os.getloadavg()
    survivors_read = (
        survivors_datapath(out / "data", args.big_survivors, args.features, args.seed, rounds=1)
        if args.big_survivors else None
    )

    # Reference for the metric check: the single-process limit when it ran. Every round of
    # every mode is checked, not only the median one.
    every = [run_ for rs in rounds.values() for run_ in rs]
    every.sort(key=lambda r: 0 if r.name == "limit1" else 1)  # stable: limit1's first round leads
    metrics = compare_metrics(every, args.rtol)
    rows = [mode_row(r, runs) for r in runs.values()]
    targets = judge_targets(runs)
    torch_in_parent = "torch" in sys.modules  # the parent must stay torch-free, like Step 5's

    # The 1-minute load average: before we start it is someone else's; after the modes it
    # also counts our own processes (one per slot), so only what exceeds that is foreign.
    cores = machine["cpu_cores"] or 1
    busy = load_before[0] > 0.5 * cores or load_after_modes[0] > len(slots) + 0.5 * cores
    busy_note = " — BUSY: other processes competed for the cores; rerun on a quiet machine" if busy else ""
    title = (
        f"{workload_info['trials']} trials x {workload_info['folds']} folds, {workload_info['survivors']} survivors x "
        f"{workload_info['features']} features, {len(slots)} {'GPU' if slots[0].kind == 'cuda' else 'CPU'} "
        f"process(es), {ctx.in_flight} trial(s) in flight, median of {args.rounds} round(s) — {machine['cpu_model']}, {machine['cpu_cores']} cores, "
        f"torch {machine['torch']}" + (f", GPU {machine['gpus'][0]}" if machine["gpus"] else "")
    )
    report = "\n".join(
        [
            title,
            f"load average before {load_before[0]:.2f}, after the modes {load_after_modes[0]:.2f} "
            f"({machine['cpu_cores']} cores)" + busy_note,
            "",
            format_table(rows, metrics),
            "",
            "targets:",
            format_targets(targets),
            "",
            f"metrics: {'MATCH' if metrics['ok'] else 'MISMATCH'} across modes (reference {metrics['reference']}, "
            f"rtol {args.rtol:g})",
            *(f"  {m}" for m in metrics["mismatches"]),
            "",
            "data path:",
            format_datapath({"survivors": survivors_read, "handoff": handoff}),
        ]
    )
    print(report, flush=True)
    (out / "benchmark.txt").write_text(report + "\n")
    if args.table_out:
        Path(args.table_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.table_out).write_text(report + "\n")
    write_json_atomic(
        out / "benchmark.json",
        {
            "started_unix": started,
            "command": [sys.executable, "-m", "bench.run_benchmark", *sys.argv[1:]],
            "machine": machine,
            "load_average": {"before": load_before, "after_modes": load_after_modes, "end": os.getloadavg()},
            "slots": [{"label": s.label, "kind": s.kind, "torch_threads": s.torch_threads} for s in slots],
            "trials_in_flight": ctx.in_flight,
            "workload": workload_info,
            "rows": rows,
            "targets": targets,
            "metrics": metrics,
            "data_path": {"survivors": survivors_read, "handoff": handoff},
            "torch_imported_in_parent": torch_in_parent,
            "rounds": args.rounds,
            "modes": {
                n: {"wall_s": r.wall_s, "startup_s": r.startup_s, "rounds_wall_s": [x.wall_s for x in rounds[n]],
                    "extra": r.extra}
                for n, r in runs.items()
            },
            "results": {n: sorted(r.results, key=lambda x: str(x.get("job_id"))) for n, r in runs.items()},
        },
    )
    try:
        write_png(out / "benchmark.png", rows, title)
    except Exception as exc:  # noqa: BLE001 - the table and JSON are the result; the picture is a view
        logger.warning("could not write benchmark.png: %s", exc)
    logger.info("wrote %s, %s, %s", out / "benchmark.txt", out / "benchmark.json", out / "benchmark.png")
    if torch_in_parent:
        logger.error("torch was imported in the benchmark's parent process; the measurement is not Step 5's shape")
        return EXIT_ERROR
    if not metrics["ok"]:
        logger.error("metrics differ across modes: the modes did not train the same thing")
        return EXIT_METRIC_MISMATCH
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except (Step5Error, RuntimeError, OSError, ValueError) as exc:
        logger.error("benchmark failed: %s", exc, exc_info=logger.isEnabledFor(logging.DEBUG))
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        stop_resource_trackers()


if __name__ == "__main__":
    sys.exit(main())
