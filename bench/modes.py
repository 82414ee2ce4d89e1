"""The mode table: every way the benchmark runs the workload, one entry each.

A mode takes the :class:`BenchContext` (workload, device slots, limits) and returns a
:class:`ModeRun`: the timed wall, the untimed startup (starting processes and one warm-up
round, so that every mode is measured warm), and one result dict per job. The report
compares the results across modes job by job, so a mode cannot quietly train something
else.

Adding a mode is one :class:`Mode` entry in :data:`MODES`.

Modes run in rounds (``--rounds``), interleaved — limit1, limit, s96b, loky, then again —
so that a disturbance from outside (a shared machine) falls on every mode alike; each
mode's row is its median round. S96A is too slow to repeat and its ratios are far from
any threshold, so it runs once, after the rounds.

How the runner modes submit work: exactly as the optimizer's ask/tell loop does. The
trials go in batches of ``--trials-in-flight`` B (default: one per process, the
optimizer's default); each batch becomes groups by the optimizer's own
:func:`~step5.optimizer.backends.plan_groups` (fold by fold, fused folds or fused trials)
and is one ``runner.run(groups)`` call. The limit gets the same batches, with a barrier
between them, since the loop cannot ask batch b+1 before batch b was told.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from step5.devices import DeviceSlot
from step5.protocol import TrainRequest

from bench.workload import Workload

logger = logging.getLogger(__name__)


@dataclass
class BenchContext:
    """What a mode needs to run the workload."""

    workload: Workload
    slots: list[DeviceSlot]  # the runners' processes: one per GPU, or the CPU workers
    job_timeout_s: float = 600.0
    ready_timeout_s: float = 300.0
    python: str = sys.executable
    trials_in_flight: int = 0  # B, trials per run() call; 0: the optimizer's default for these slots

    @property
    def in_flight(self) -> int:
        from step5.optimizer.backends import default_trials_in_flight

        return self.trials_in_flight or default_trials_in_flight(len(self.slots))

    def groups(self, fuse: str | None = None) -> list[list[list[TrainRequest]]]:
        """Per batch of B trials, the groups the optimizer would send (``fuse``: None,
        "folds" or "trials")."""
        from step5.optimizer.backends import plan_groups

        trials = self.workload.trials
        rows = {r.data_path: self.workload.n_train for t in trials for r in t}  # every fold has n_train rows
        out = []
        for start in range(0, len(trials), self.in_flight):
            batch = {t[0].trial_number: list(t) for t in trials[start:start + self.in_flight]}
            out.append(plan_groups(batch, fuse_folds=fuse is not None, fuse_trials=fuse == "trials",
                                   capacity=len(self.slots), n_train=rows))
        return out

    @property
    def batches(self) -> list[list[TrainRequest]]:
        """Per batch, its requests in the order the runners get them (longest first)."""
        return [[r for g in groups for r in g] for groups in self.groups()]


@dataclass
class ModeRun:
    """One mode's measurements."""

    name: str
    processes: int
    wall_s: float  # the timed section: first job submitted -> last result back
    startup_s: float  # untimed: processes started and warmed up
    results: list[dict[str, Any]]  # one per job (any order; keyed by job_id)
    extra: dict[str, Any] = field(default_factory=dict)  # runner summary, process info


def median_round(rounds: Sequence[ModeRun]) -> ModeRun:
    """The round with the median wall (the lower middle for an even count); every
    round's wall is kept in ``extra["rounds_wall_s"]``, in the order they ran."""
    if not rounds:
        raise ValueError("median_round() needs at least one round")
    ranked = sorted(rounds, key=lambda r: r.wall_s)
    chosen = ranked[(len(ranked) - 1) // 2]
    chosen.extra["rounds_wall_s"] = [r.wall_s for r in rounds]
    return chosen


@dataclass(frozen=True)
class Mode:
    """One row of the benchmark."""

    name: str
    summary: str  # one line for the table's legend and the docs
    processes: Callable[[BenchContext], int]
    run: Callable[[BenchContext], ModeRun]
    single_process: bool = False  # compared with the single-process limit, not the N-process one
    repeat: bool = True  # runs in every round (--rounds); False: first round only (too slow to repeat)


def _n_slots(ctx: BenchContext) -> int:
    return len(ctx.slots)


def _one(ctx: BenchContext) -> int:
    return 1


def _run_batches(runner: Any, ctx: BenchContext, fuse: str | None = None) -> tuple[float, list[dict[str, Any]]]:
    """The timed section shared by the runner modes: one ``run(groups)`` per batch."""
    from step5.execution.pool import raise_first_job_error

    calls = ctx.groups(fuse)
    results: list[dict[str, Any]] = []
    start = time.perf_counter()
    for groups in calls:
        # Outcomes hold a JobError in a failed job's place; the benchmark's jobs must all train.
        results.extend(raise_first_job_error([o for outcomes in runner.run(groups) for o in outcomes]))
    return time.perf_counter() - start, results


def _warm(runner: Any, ctx: BenchContext) -> None:
    from step5.execution.pool import raise_first_job_error

    raise_first_job_error([o for (o,) in runner.run([[r] for r in _warm_round(ctx)])])


def _warm_round(ctx: BenchContext) -> list[TrainRequest]:
    """One warm-up job per process (distinct job ids; the warm-up fold file)."""
    w = ctx.workload.warmup
    return [
        TrainRequest(
            data_path=w.data_path, params=w.params, trial_number=w.trial_number, fold_idx=i,
            seed=w.seed, job_id=f"warmup-{i}",
        )
        for i in range(len(ctx.slots))
    ]


def run_s96a(ctx: BenchContext) -> ModeRun:
    """One fresh ``train_single_trial.py`` process per fold, one at a time per slot."""
    from step5.execution.pool import WorkerPool
    from step5.policy import TrainingPolicy

    start = time.perf_counter()
    policy = TrainingPolicy(worker_job_timeout_s=ctx.job_timeout_s, max_job_reruns=0)
    with WorkerPool(ctx.slots, policy, persistent=False, python=ctx.python) as runner:
        # No process outlives a job, so nothing stays warm; this round only warms the
        # OS page cache for the interpreter and torch libraries, as for every mode.
        _warm(runner, ctx)
        startup_s = time.perf_counter() - start
        wall_s, results = _run_batches(runner, ctx)
        summary = dataclasses.asdict(runner.summary())
    return ModeRun("s96a", len(ctx.slots), wall_s, startup_s, results, {"runner": summary})


def _run_pool(ctx: BenchContext, name: str, fused: str | None = None) -> ModeRun:
    """Persistent workers, each job alone (``fused=None``) or fused ("folds" / "trials")."""
    from step5.execution.pool import WorkerPool
    from step5.policy import TrainingPolicy

    start = time.perf_counter()
    policy = TrainingPolicy(worker_job_timeout_s=ctx.job_timeout_s, worker_ready_timeout_s=ctx.ready_timeout_s,
                            max_worker_restarts=0)
    with WorkerPool(ctx.slots, policy, python=ctx.python) as pool:
        _warm(pool, ctx)
        startup_s = time.perf_counter() - start
        wall_s, results = _run_batches(pool, ctx, fused)
        summary = dataclasses.asdict(pool.summary())
    fallbacks = summary.get("fallbacks") or []
    if fallbacks:
        # A worker fell back to one-shot subprocesses: the row would not measure S96B.
        raise RuntimeError(f"{name}: workers fell back to subprocesses during the benchmark: {fallbacks}")
    return ModeRun(name, len(ctx.slots), wall_s, startup_s, results, {"runner": summary})


def run_s96b(ctx: BenchContext) -> ModeRun:
    """Persistent workers: boot once, then fold after fold over NDJSON pipes."""
    return _run_pool(ctx, "s96b")


def run_s96b_fused_folds(ctx: BenchContext) -> ModeRun:
    """Persistent workers, each trial's K folds trained as one batched pass (train_folds)."""
    return _run_pool(ctx, "s96b-ff", fused="folds")


def run_s96b_fused_trials(ctx: BenchContext) -> ModeRun:
    """Persistent workers, same-shape trials of a batch trained as one batched pass."""
    return _run_pool(ctx, "s96b-ft", fused="trials")


def run_loky(ctx: BenchContext) -> ModeRun:
    """joblib's reusable loky process pool: what a user would reach for instead.

    The executor is used directly, not through ``joblib.Parallel``: with ``n_jobs=1`` (one
    GPU) Parallel runs tasks sequentially in the calling process, which would import torch
    in the benchmark's parent and measure no pool at all.
    """
    from joblib.externals.loky import get_reusable_executor

    from bench.inproc import loky_train, loky_warmup

    n = len(ctx.slots)
    threads = ctx.slots[0].torch_threads
    # loky workers cannot be pinned one per GPU: on a GPU machine they all train on the
    # first slot's GPU (a fair peer on one GPU; on several it would use only one of them).
    visible = ctx.slots[0].cuda_visible_devices
    start = time.perf_counter()
    executor: Any = None
    try:
        executor = get_reusable_executor(max_workers=n)
        # Warm every worker: torch imported and one dry job each (repeat until each of
        # the n processes has answered, since loky hands tasks to whoever is free).
        warm = ctx.workload.warmup.to_dict()
        pids: set[int] = set()
        for _ in range(5):
            pids |= set(executor.map(loky_warmup, *zip(*[(warm, threads, visible, 0.5)] * n)))
            if len(pids) >= n:
                break
        startup_s = time.perf_counter() - start
        results: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        for batch in ctx.batches:
            futures = [executor.submit(loky_train, r.to_dict(), threads, visible) for r in batch]
            results.extend(f.result() for f in futures)
        wall_s = time.perf_counter() - t0
    finally:
        shutdown_loky(executor)
    return ModeRun("loky", n, wall_s, startup_s, results, {"worker_pids": sorted(pids)})


def shutdown_loky(executor: Any) -> None:
    """End the reusable loky executor (its workers stopped); the resource trackers are
    stopped at the end of the run (:func:`stop_resource_trackers`)."""
    if executor is not None:
        executor.shutdown(wait=True)


def stop_resource_trackers() -> None:
    """Stop the resource-tracker processes loky and multiprocessing started for us.

    They would exit with the benchmark anyway (they read a pipe until EOF); stopping them
    here means no helper process outlives the run itself, in-process callers included.
    Private APIs of both libraries, hence best effort.
    """
    import gc

    gc.collect()  # finalize queues/barriers first so their semaphores are unregistered
    for module in ("joblib.externals.loky.backend.resource_tracker", "multiprocessing.resource_tracker"):
        mod = sys.modules.get(module)
        tracker = getattr(mod, "_resource_tracker", None)
        if tracker is None:
            continue
        try:
            tracker._stop()
        except Exception as exc:  # noqa: BLE001 - best effort, see above
            logger.debug("could not stop %s: %s", module, exc)


def _limit(ctx: BenchContext, slots: Sequence[DeviceSlot], name: str) -> ModeRun:
    from bench.limit import run_limit

    sync = len(ctx.batches) > 1
    trials = [[r.to_dict() for r in batch] for batch in ctx.batches]
    out = run_limit(
        trials, ctx.workload.warmup.to_dict(), slots, sync_trials=sync, ready_timeout_s=ctx.ready_timeout_s,
        run_timeout_s=ctx.job_timeout_s * max(1, ctx.workload.n_jobs),
    )
    return ModeRun(name, len(slots), out["wall_s"], out["startup_s"], out["results"],
                   {"processes": out["processes"], "sync_trials": sync})


def run_limit_n(ctx: BenchContext) -> ModeRun:
    """The limit with the runners' process count: N warm processes, no IPC while timed."""
    return _limit(ctx, ctx.slots, "limit")


def run_limit_1(ctx: BenchContext) -> ModeRun:
    """The single-process limit: every fold in one warm process, one after another."""
    return _limit(ctx, ctx.slots[:1], "limit1")


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("limit1", "every fold in one already-warm process, no IPC (single-process limit)", _one, run_limit_1,
             single_process=True),
        Mode("limit", "N already-warm processes share the folds, no IPC while timed (the bar)", _n_slots, run_limit_n),
        Mode("s96b", "persistent workers (nn_gpu_worker.py) over NDJSON pipes", _n_slots, run_s96b),
        Mode("s96b-ff", "persistent workers, each trial's folds in one fused pass (--fuse-folds)", _n_slots,
             run_s96b_fused_folds),
        Mode("s96b-ft", "persistent workers, same-shape trials fused per call (--fuse-trials)", _n_slots,
             run_s96b_fused_trials),
        Mode("loky", "joblib's reusable loky executor (process pool)", _n_slots, run_loky),
        Mode("s96a", "one train_single_trial.py subprocess per fold", _n_slots, run_s96a, repeat=False),
    )
}

#: The order modes run and print in (cheapest first).
DEFAULT_MODES = tuple(MODES)
