"""Scale-out simulation: P optimizer processes ("hosts") on one PostgreSQL study.

    .venv/bin/python -m bench.cluster_sim [--processes 1,2,4,8,16,32] [--trials-per-process 8]
        [--job-sleep-s 2.0] [--k-folds 3] [--out bench/results]

Each process is the real optimizer CLI (``--search-only``, one CPU slot, one trial in
flight) with a fake fold runner whose jobs sleep (:mod:`step5.testing.fake_search`), so
everything but the training is real: the study lock, the count before each ask, heartbeats,
the sampler, every storage write. All runs share one throwaway PostgreSQL 15 server on
loopback (:mod:`step5.testing.postgres`), a fresh database per process count.

Per process count it reports: trials per second in the steady state (trials told between
the moment every process has asked its first trial and the moment the first one is done;
processes start together after their imports), end to end (all trials over the time from
the common start to the last tell, start-up and tail included), the speed-up
over one process, the coordination cost per trial (the locked ask: waiting for the lock,
counting, asking, claiming; and the tell) as p50/p99, and checks that the study holds exactly
``P * trials-per-process`` complete trials, none left running, no configuration twice, each
trial told once. Exit 0 when every check held, 3 when one did not, 1 on an error.

Jobs sleep rather than compute so that the 2 shared CPU cores of the machine this was
written on are not what limits the rate; the sleep must stay long against the per-trial
CPU cost (sampler, ORM) times the process count.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from step5.jsonio import read_json_file, write_json_atomic

logger = logging.getLogger("bench.cluster_sim")
REPO_ROOT = Path(__file__).resolve().parent.parent


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000.0 if values else float("nan")


def run_one(pg: Any, n_procs: int, args: argparse.Namespace, inputs: tuple[Path, Path], work: Path) -> dict[str, Any]:
    """Run ``n_procs`` processes on a fresh study; return the figures and the checks."""
    from optuna.trial import TrialState

    from step5.testing import stored_trials

    url = pg.create_database(f"sim_{n_procs}")
    n_trials = n_procs * args.trials_per_process
    folder = work / f"p{n_procs}"
    folder.mkdir()
    (folder / "policy.json").write_text("{}")
    go = folder / "go"
    procs = []
    for i in range(n_procs):
        cmd = [sys.executable, "-m", "step5.testing.fake_search", "--job-sleep-s", str(args.job_sleep_s),
               "--timings-out", str(folder / f"timings{i}.json"), "--ready-file", str(folder / f"ready{i}"),
               "--go-file", str(go), "--",
               "--survivors", str(inputs[0]), "--lottery-data", str(inputs[1]), "--model-type", "neural_net",
               "--trials", str(n_trials), "--k-folds", str(args.k_folds), "--cpu-workers", "1",
               "--trials-in-flight", "1", "--seed", "1", "--policy", str(folder / "policy.json"),
               "--storage", url, "--study-name", "sim", "--search-only", "--log-level", "WARNING",
               "--output-dir", str(folder / f"out{i}")]
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TMPDIR": str(folder)}
        with open(folder / f"stderr{i}.log", "w") as stderr:
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr))
    while not all((folder / f"ready{i}").exists() for i in range(n_procs)):
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.1)
    start = time.time()
    go.touch()
    codes = [p.wait(timeout=args.timeout_s) for p in procs]

    timings = [read_json_file(folder / f"timings{i}.json", "timings") for i in range(n_procs)]
    asks = [t[0] for tm in timings for t in tm["ask"]]
    tells = [t[0] for tm in timings for t in tm["tell"]]
    last_tell = max((t[1] for tm in timings for t in tm["tell"]), default=start)
    trials = stored_trials(url, "sim")
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    params = {tuple(sorted(t.params.items())) for t in complete}
    checks = {
        "exit_codes_0": all(c == 0 for c in codes),
        "exactly_n_complete": len(complete) == n_trials,
        "none_running": not any(t.state == TrialState.RUNNING for t in trials),
        "no_duplicate_params": len(params) == len(complete),
        "each_trial_told_once": len(tells) == len(trials),
    }
    # Steady state: from when every process has asked its first trial to when the first
    # one told its last; start-up (reading the data, opening the study) and the tail (the
    # last trials, when fewer processes are left than trials) are left out.
    first_asks = [tm["ask"][0][1] for tm in timings if tm["ask"]]
    last_tells = [tm["tell"][-1][1] for tm in timings if tm["tell"]]
    window = (max(first_asks), min(last_tells)) if first_asks and last_tells else (start, last_tell)
    told_in_window = sum(1 for tm in timings for t in tm["tell"] if window[0] < t[1] <= window[1])
    rate = told_in_window / max(1e-9, window[1] - window[0])
    ideal = n_procs / (args.k_folds * args.job_sleep_s)
    return {
        "processes": n_procs, "trials": n_trials, "wall_s": last_tell - start, "trials_per_s": rate,
        "end_to_end_trials_per_s": len(complete) / max(1e-9, last_tell - start),
        "window_s": window[1] - window[0], "ideal_trials_per_s": ideal, "efficiency": rate / ideal,
        "ask_p50_ms": _percentile(asks, 50), "ask_p99_ms": _percentile(asks, 99),
        "tell_p50_ms": _percentile(tells, 50), "tell_p99_ms": _percentile(tells, 99),
        "polls": sum(len(tm["poll"]) for tm in timings), "checks": checks,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    base = rows[0]["trials_per_s"] if rows else float("nan")
    lines = ["| processes | trials | wall s | trials/s (steady) | speed-up | of ideal | trials/s (end to end) | "
             "ask p50 / p99 ms | tell p50 / p99 ms | checks |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---|"]
    for r in rows:
        ok = "all hold" if all(r["checks"].values()) else "FAILED: " + ", ".join(k for k, v in r["checks"].items() if not v)
        lines.append(
            f"| {r['processes']} | {r['trials']} | {r['wall_s']:.1f} | {r['trials_per_s']:.2f} | "
            f"{r['trials_per_s'] / base:.2f}x | {r['efficiency']:.0%} | {r['end_to_end_trials_per_s']:.2f} | "
            f"{r['ask_p50_ms']:.0f} / {r['ask_p99_ms']:.0f} | "
            f"{r['tell_p50_ms']:.0f} / {r['tell_p99_ms']:.0f} | {ok} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster_sim", description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4,8,16,32", help="process counts to run, comma-separated")
    parser.add_argument("--trials-per-process", type=int, default=8)
    parser.add_argument("--job-sleep-s", type=float, default=2.0, help="how long each fake fold job sleeps")
    parser.add_argument("--k-folds", type=int, default=3)
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per process count")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # SIGTERM unwinds like Ctrl-C, so the PostgreSQL server and the temp folder are removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    counts = [int(c) for c in args.processes.split(",") if c.strip()]

    from step5.data.sample import write_sample
    from step5.testing.postgres import TemporaryPostgres

    rows = []
    with tempfile.TemporaryDirectory(prefix="step5-cluster-sim-") as tmp, TemporaryPostgres(max_connections=500) as pg:
        work = Path(tmp)
        inputs = write_sample(work / "data", n_survivors=300, n_features=12, seed=3)
        for n in counts:
            logger.info("%d process(es), %d trials each ...", n, args.trials_per_process)
            row = run_one(pg, n, args, inputs, work)
            logger.info("%d process(es): %.2f trials/s, checks %s", n, row["trials_per_s"], row["checks"])
            rows.append(row)
    table = format_table(rows)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "cluster_sim.json", {"settings": vars(args) | {"out": str(args.out)}, "rows": rows})
    (args.out / "cluster_sim.md").write_text(table + "\n")
    return 0 if all(all(r["checks"].values()) for r in rows) else 3


if __name__ == "__main__":
    sys.exit(main())
