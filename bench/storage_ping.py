"""What checking each pooled connection before use (SQLAlchemy ``pool_pre_ping``) costs a trial.

    .venv/bin/python -m bench.storage_ping [--trials 40] [--rounds 5]

The study storage pings every connection it takes from the pool (step5.optimizer.study
``_engine_kwargs``), so that one the server dropped is replaced instead of failing a call.
This times the storage traffic of one trial, as the search loop makes it (ask with the
owner, suggest ten params, the user attributes the loop and ``record_trial`` write, five
fold reports, tell), through the retrying storage with and without the ping, against one
throwaway PostgreSQL on loopback; the two run in alternating rounds, side by side, and the
median per-trial time of each is printed with their ratio. Loopback is the best case for
a ping; across a network each ping costs a round trip, as does every other statement.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from typing import Any, Sequence

import optuna

from step5.optimizer import study as study_module
from step5.optimizer.study import open_storage
from step5.policy import TrainingPolicy
from step5.testing.postgres import TemporaryPostgres


def one_trial(study: optuna.Study) -> None:
    trial = study.ask()
    for i in range(10):
        trial.suggest_float(f"p{i}", 0.0, 1.0)
    for key in ("owner", "params", "model_type", "batch", "cv", "cv_val_r2_mean", "cv_val_r2_std",
                "cv_train_r2_mean", "overfit_gap", "folds", "wall_s"):
        trial.set_user_attr(key, 0.5)
    for step in range(5):
        trial.report(0.5, step)
    study.tell(trial, 0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storage_ping")
    parser.add_argument("--trials", type=int, default=40, help="trials per round and setting")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")  # the loop beats itself
    real_kwargs = study_module._engine_kwargs
    per_trial_ms: dict[bool, list[float]] = {True: [], False: []}
    with TemporaryPostgres() as pg:
        studies: dict[bool, Any] = {}
        for ping in (True, False):
            url = pg.create_database(f"ping_{int(ping)}")
            study_module._engine_kwargs = lambda u, p=ping: {**real_kwargs(u), "pool_pre_ping": p}  # type: ignore[misc]
            storage = open_storage(url, TrainingPolicy())
            studies[ping] = optuna.create_study(storage=storage, study_name="s", direction="maximize")
        study_module._engine_kwargs = real_kwargs
        for _ in range(args.rounds):
            for ping in (True, False):
                start = time.perf_counter()
                for _ in range(args.trials):
                    one_trial(studies[ping])
                per_trial_ms[ping].append((time.perf_counter() - start) / args.trials * 1000)
    on, off = statistics.median(per_trial_ms[True]), statistics.median(per_trial_ms[False])
    print(f"storage traffic of one trial (median of {args.rounds} rounds x {args.trials} trials, PostgreSQL on loopback)")
    print(f"  pool_pre_ping on : {on:7.1f} ms")
    print(f"  pool_pre_ping off: {off:7.1f} ms")
    print(f"  ratio on/off     : {on / off:7.2f}x  (+{on - off:.1f} ms per trial)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
