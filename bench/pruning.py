"""Pruned vs not: the same Optuna search with each ``--pruner``, side by side in one run.

    .venv/bin/python -m bench.pruning [--pruners none,median,successive_halving]
        [--trials 20 --folds 5 --survivors 2000 --features 90 --nn-max-epochs 40 --cpu-workers 2]

The benchmark's data (generated sample survivors, 2000 x 90 by default, as
``bench.run_benchmark``), the real optimizer command line with persistent workers, one
fresh study per pruner, the same seed. Prints per pruner: search wall time, trials per
minute, folds trained, trials pruned, the best objective and the final model's test R².
Unlike the fold-runner benchmark the trials differ between rows after the first pruned
one (the sampler learns from what was pruned), which is the point: a pruner is judged by
what the search finds per minute, not by identical jobs. See docs/optimizer.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import optuna
from optuna.trial import TrialState

from step5 import artifacts
from step5.data.sample import write_sample
from step5.testing import stored_trials

REPO_ROOT = Path(__file__).resolve().parents[1]


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.pruning", description=__doc__.split("\n\n")[0])
    p.add_argument("--pruners", default="none,median,successive_halving", help="comma-separated [all three]")
    p.add_argument("--trials", type=int, default=20, help="--trials of each search [20]")
    p.add_argument("--folds", type=int, default=5, help="--k-folds [5]")
    p.add_argument("--survivors", type=int, default=2000, help="generated survivor records [2000]")
    p.add_argument("--features", type=int, default=90, help="features per record [90]")
    p.add_argument("--nn-max-epochs", type=int, default=40, help="--nn-max-epochs [40]")
    p.add_argument("--cpu-workers", type=int, default=2, help="--cpu-workers [2]")
    p.add_argument("--gpus", default="none", help="--gpus [none]")
    p.add_argument("--seed", type=int, default=42, help="data and search seed [42]")
    return p.parse_args(argv)


def run_one(pruner: str, inputs: tuple[Path, Path], tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    out = tmp / f"out_{pruner}"
    cmd = [
        sys.executable, str(REPO_ROOT / "meta_prediction_optimizer_anti_overfit.py"),
        "--survivors", str(inputs[0]), "--lottery-data", str(inputs[1]), "--model-type", "neural_net",
        "--trials", str(args.trials), "--k-folds", str(args.folds), "--nn-max-epochs", str(args.nn_max_epochs),
        "--cpu-workers", str(args.cpu_workers), "--gpus", args.gpus, "--seed", str(args.seed),
        "--pruner", pruner, "--output-dir", str(out), "--policy", str(REPO_ROOT / "watcher_policies.json"),
        "--log-level", "WARNING",
    ]
    proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"--pruner {pruner} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    sidecar = json.loads((out / artifacts.SIDECAR_NAME).read_text())
    trials = stored_trials(f"sqlite:///{(out / 'optuna_step5.db').resolve()}", sidecar["optuna"]["study_name"])
    folds = sum(args.folds if t.state == TrialState.COMPLETE else int(t.user_attrs.get("pruned_after_folds", 0))
                for t in trials)
    search_s = float(sidecar["execution"]["timings"]["search_s"])
    return {
        "pruner": pruner, "search_s": search_s, "trials": len(trials),
        "trials_per_min": 60.0 * len(trials) / search_s,
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "folds": folds, "best": sidecar["optuna"]["best_value"],
        "test_r2": sidecar["training_metrics"]["test_r2"],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="step5_pruning_") as name:
        tmp = Path(name)
        inputs = write_sample(tmp / "data", n_survivors=args.survivors, n_features=args.features, seed=args.seed)
        rows = [run_one(p.strip(), inputs, tmp, args) for p in args.pruners.split(",") if p.strip()]
    print(f"{args.trials} trials x {args.folds} folds, {args.survivors} x {args.features} rows, "
          f"--nn-max-epochs {args.nn_max_epochs}, --cpu-workers {args.cpu_workers}, load {os.getloadavg()[0]:.1f}")
    print(f"{'pruner':<20} {'search s':>9} {'trials/min':>10} {'folds':>6} {'pruned':>6} {'best':>8} {'test R2':>8}")
    for r in rows:
        print(f"{r['pruner']:<20} {r['search_s']:>9.1f} {r['trials_per_min']:>10.2f} {r['folds']:>6d} "
              f"{r['pruned']:>6d} {r['best']:>8.4f} {r['test_r2']:>8.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
