"""The limit: the same folds in already-warm processes, with no IPC while the clock runs.

::

    parent (no torch)                    N spawned processes (torch imported)
    ─────────────────                    ─────────────────────────────────────
    start procs ──────────────────────▶  boot, warm-up job, parse the job list
                ◀── ("ready", rank) ───  (multiprocessing.Queue, before the clock)
    start_barrier ═══════ t0 ═════════   start_barrier
                                         loop: claim (trial, fold) from a shared
                                         counter, train it in-process; optional
                                         per-trial barrier between the N processes
    end_barrier   ═══════ t1 ═════════   end_barrier
                ◀── ("done", results) ─  results travel only after t1

The wall is ``t1 - t0``: what training the folds costs when there is nothing else to pay
for. With one process it is the single-process limit; with N processes (the runners'
count) it is the bar for the runners. The barrier between the lists handed in (the
optimizer's batches of B trials) is on by default because batches are sequential (batch
b+1's parameters depend on batch b's scores): no runner can start them early, so neither
may the limit.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
import time
from typing import Any, Sequence

from step5.devices import DeviceSlot

from bench.inproc import limit_process_main

logger = logging.getLogger(__name__)


class LimitError(RuntimeError):
    """Raised when a limit process fails to start, warm up or train."""


def run_limit(
    trials: Sequence[Sequence[dict[str, Any]]],
    warmup: dict[str, Any],
    slots: Sequence[DeviceSlot],
    *,
    sync_trials: bool = True,
    ready_timeout_s: float = 300.0,
    run_timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """Train ``trials`` (lists of request dicts) in ``len(slots)`` warm processes.

    Returns ``{"wall_s", "startup_s", "results" (unordered), "processes": [...]}``.
    """
    n = len(slots)
    if n < 1:
        raise ValueError("run_limit needs at least one slot")
    # spawn: a fresh interpreter, like every other mode's processes (no fork of the parent).
    ctx = mp.get_context("spawn")
    counters = ctx.Array("i", len(trials), lock=True)
    trial_barrier = ctx.Barrier(n) if sync_trials and n > 1 else None
    start_barrier = ctx.Barrier(n + 1)
    end_barrier = ctx.Barrier(n + 1)
    out: Any = ctx.Queue()
    trials_list = [list(t) for t in trials]
    procs = [
        ctx.Process(
            target=limit_process_main,
            args=(rank, slot.torch_threads, slot.cuda_visible_devices, trials_list, warmup,
                  counters, trial_barrier, start_barrier, end_barrier, out),
            name=f"limit-{rank}",
            daemon=True,  # never outlive the benchmark
        )
        for rank, slot in enumerate(slots)
    ]
    boot = time.perf_counter()
    for p in procs:
        p.start()
    try:
        ready: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + ready_timeout_s
        while len(ready) < n:
            kind, rank, payload = _get(out, procs, deadline)
            if kind != "ready":
                raise LimitError(f"limit process {rank} failed before the start: {payload}")
            ready[rank] = payload
        startup_s = time.perf_counter() - boot
        start_barrier.wait(timeout=ready_timeout_s)
        t0 = time.perf_counter()
        t1 = _wait_barrier(end_barrier, procs, run_timeout_s)
        results: list[dict[str, Any]] = []
        errors: list[str] = []
        deadline = time.monotonic() + ready_timeout_s
        for _ in range(n):
            kind, rank, payload = _get(out, procs, deadline)
            if kind == "done":
                results.extend(payload)
            else:
                errors.append(f"process {rank}: {payload}")
        if errors:
            raise LimitError("limit run failed: " + "; ".join(errors))
        for p in procs:
            p.join(timeout=30)
        return {
            "wall_s": t1 - t0,
            "startup_s": startup_s,
            "results": results,
            "processes": [ready[r] for r in sorted(ready)],
        }
    finally:
        for b in (start_barrier, end_barrier, trial_barrier):
            if b is not None:
                b.abort()  # releases anyone still waiting, so nothing hangs
        for p in procs:
            if p.is_alive():
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        out.close()
        out.join_thread()


def _get(out: Any, procs: Sequence[Any], deadline: float) -> tuple[str, int, Any]:
    """Next message from the limit processes; a dead process or the deadline is an error."""
    while True:
        try:
            return out.get(timeout=0.2)
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                raise LimitError(f"limit process {dead[0].name} died with exit code {dead[0].exitcode}") from None
            if time.monotonic() > deadline:
                raise LimitError("timed out waiting for the limit processes") from None


def _wait_barrier(barrier: Any, procs: Sequence[Any], timeout_s: float) -> float:
    """``barrier.wait()``, but give up (abort it) if a process dies or time runs out.

    The wait runs in a helper thread so the parent can watch the processes meanwhile; that
    thread reads the clock the moment the barrier opens, so the watching adds nothing to
    the timed section. Returns that ``time.perf_counter()`` reading.
    """
    done = threading.Event()
    failure: list[BaseException] = []
    opened: list[float] = []

    def waiter() -> None:
        try:
            barrier.wait()
            opened.append(time.perf_counter())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failure.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=waiter, name="limit-end-barrier", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(0.05):
        dead = [p for p in procs if p.exitcode is not None]
        if dead or time.monotonic() > deadline:
            barrier.abort()
            done.wait(5)
            why = f"{dead[0].name} exited with {dead[0].exitcode}" if dead else f"{timeout_s:g}s timeout"
            raise LimitError(f"limit run aborted: {why}")
    if failure:
        raise LimitError(f"limit run aborted: {failure[0]!r}")
    return opened[0]
