"""The runner interface, ``run(groups) -> outcomes``, and its one-shot implementation (S96A).

::

    optimizer ──run([[req], [req], [r0, r1, r2]])──▶ SubprocessRunner
                                                      │  one thread per device slot
                                                      ├─▶ python -m step5.nn.oneshot ... (slot CPU-0)
                                                      └─▶ python -m step5.nn.oneshot ... (slot CPU-1)
                                                             │ one JSON line on stdout, exit 0 / 1
    optimizer ◀──per group, each job's result or JobError ───┘

Every runner has one entry point: :meth:`FoldRunner.run` takes *groups* of train
requests — a group of one is an unfused job, a larger group asks for one fused pass — and
returns, per group and in request order, each job's result dict or the
:class:`~step5.errors.JobError` it failed with, in its place. So the optimizer learns every
trial's fate from one call, and one failing fold costs no other fold anything.

A one-shot process trains one fold, so this runner is the null object of fusion: a group
of several jobs runs job by job (the outcomes equal a fused pass's: bit for bit on a CPU,
up to cuBLAS rounding on a GPU), and it says so once. A crashed trainer is retried, a
timed-out one once (:class:`~step5.execution.oneshot.OneshotTrainer`, the same path the
pool's fallback uses). Anything else that reaches ``run`` (Ctrl-C, SIGTERM turned into
``KeyboardInterrupt``, a bug) kills every running trainer, reaps it and propagates at
once; the runner is closed after that.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import sys
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol, Sequence

from step5.devices import DeviceSlot
from step5.errors import JobError, RunnerClosed
from step5.execution.oneshot import OneshotTrainer
from step5.execution.process import reap_killed
from step5.policy import TrainingPolicy
from step5.execution.slot import FaultBudget
from step5.execution.summary import FaultRecord, FusionRecord, RunnerStats, Timings, recovery_record
from step5.protocol import TrainRequest

logger = logging.getLogger(__name__)

#: What one job came to: its result, or the JobError it failed with.
JobOutcome = dict[str, Any] | JobError


class FoldRunner(Protocol):
    """What the optimizer needs from whatever trains its neural-net folds."""

    mode: str  # "persistent_workers" | "subprocess", recorded in the sidecar

    @property
    def capacity(self) -> int:
        """How many groups can train at the same time (device slots)."""
        ...

    def run(self, groups: Sequence[Sequence[TrainRequest]]) -> list[list[JobOutcome]]:
        """Train every group; per group, each job's result or JobError, in request order."""
        ...

    def summary(self) -> RunnerStats:
        ...

    def close(self) -> None:
        """Release every process; idempotent."""
        ...


def check_groups(groups: Sequence[Sequence[TrainRequest]]) -> list[list[TrainRequest]]:
    """``groups`` as lists; an empty group is a caller's bug."""
    out = [list(g) for g in groups]
    if any(not g for g in out):
        raise ValueError("run() got an empty group; a lone job is a group of one")
    return out


def raise_first_job_error(outcomes: Sequence[JobOutcome]) -> list[dict[str, Any]]:
    """The results of jobs whose outcomes hold no error; else raise the first JobError."""
    for outcome in outcomes:
        if isinstance(outcome, JobError):
            raise outcome
    return list(outcomes)  # type: ignore[arg-type]


class _Aborted(Exception):
    """Raised inside a runner thread whose batch was aborted (never reaches a caller)."""


class SubprocessRunner:
    """S96A: every job in a fresh ``train_single_trial.py`` process, one per free slot."""

    mode = "subprocess"

    def __init__(
        self,
        slots: Sequence[DeviceSlot],
        *,
        job_timeout_s: float = TrainingPolicy.worker_job_timeout_s,
        max_job_reruns: int = TrainingPolicy.max_job_reruns,
        max_fault_reruns: int = TrainingPolicy.max_fault_reruns,
        python: str = sys.executable,
        script: str | Path | None = None,
    ) -> None:
        """``script`` replaces ``train_single_trial.py`` (tests pass a fake trainer); a crashed
        trainer's job is re-run up to ``max_job_reruns`` times, ``max_fault_reruns`` in all."""
        if not slots:
            raise ValueError("SubprocessRunner needs at least one device slot")
        self.slots = list(slots)
        self.job_timeout_s = job_timeout_s
        self._free: queue.Queue[DeviceSlot] = queue.Queue()
        for slot in self.slots:
            self._free.put(slot)
        self._executor = ThreadPoolExecutor(max_workers=len(self.slots), thread_name_prefix="oneshot")
        self._lock = threading.Lock()
        self._faults: list[FaultRecord] = []
        self._fusion = FusionRecord()
        self._timings = Timings()
        self._job_wall_s = 0.0
        self._warned_no_fusion = False
        self._closed = False
        self._budget = FaultBudget(max_fault_reruns)
        self._trainer = OneshotTrainer(
            timeout_s=job_timeout_s, budget=self._budget, max_job_reruns=max_job_reruns,
            check_open=self._check_not_aborted, record=self._record_fault, python=python, script=script,
        )

    def __enter__(self) -> "SubprocessRunner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def _check_not_aborted(self) -> None:
        if self._trainer.live.aborted:  # we killed it: not a crash, and not to be retried
            raise _Aborted()

    def _record_fault(self, record: FaultRecord) -> None:
        with self._lock:
            self._faults.append(record)

    def _run_one(self, request: TrainRequest) -> JobOutcome:
        slot = self._free.get()
        start = time.perf_counter()
        try:
            result = self._trainer.run(request, slot)
        except JobError as exc:
            return exc
        finally:
            elapsed = time.perf_counter() - start
            with self._lock:
                self._job_wall_s += elapsed
            self._free.put(slot)
        with self._lock:
            self._timings.jobs += 1
            self._timings.compute_s += float(result.get("duration", 0.0))
        return result

    def run(self, groups: Sequence[Sequence[TrainRequest]]) -> list[list[JobOutcome]]:
        """Every job across the slots; per group, each job's outcome (see the module doc).

        A bug in a runner thread or Ctrl-C while waiting aborts the batch: every running
        trainer is killed and reaped, queued jobs are dropped, the runner is closed, and
        the exception propagates without waiting for the other jobs.
        """
        if self._closed:
            raise RunnerClosed("the one-shot runner is closed")
        groups = check_groups(groups)
        fused = [g for g in groups if len(g) > 1]
        if fused and not self._warned_no_fusion:
            self._warned_no_fusion = True
            logger.warning(
                "fused training asked for, but one-shot subprocesses (S96A) train one fold per process and "
                "cannot fuse: every fused group runs fold by fold (same results; use persistent workers to fuse)"
            )
        with self._lock:
            self._fusion.groups += len(groups)
            self._fusion.jobs += sum(len(g) for g in groups)
            self._fusion.unfused_groups += len(fused)
            self._fusion.largest_group = max([self._fusion.largest_group, *(len(g) for g in groups)])
        start = time.perf_counter()
        try:
            futures = [self._executor.submit(self._run_one, r) for g in groups for r in g]
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for fut in done:
                    exc = fut.exception()
                    if exc is not None:
                        raise exc
        except BaseException:
            self._abort()
            raise
        finally:
            self._timings.wall_s += time.perf_counter() - start
        flat = iter([f.result() for f in futures])
        return [[next(flat) for _ in g] for g in groups]

    def summary(self) -> RunnerStats:
        with self._lock:
            timings = dataclasses.replace(self._timings)
            # Everything a job cost beyond training in its process: boot, imports, CUDA
            # init, spawn/wait -- the overhead S96B removes.
            timings.overhead_s = max(0.0, self._job_wall_s - timings.compute_s)
            return RunnerStats(mode=self.mode, devices=[s.label for s in self.slots], faults=list(self._faults),
                               fusion=dataclasses.replace(self._fusion), timings=timings,
                               recovery=recovery_record(self._faults, self._budget))

    def _abort(self) -> None:
        """Kill and reap every running trainer, drop queued jobs, close the runner."""
        self._closed = True
        killed = self._trainer.live.abort()
        if killed:
            logger.warning("interrupted: killed %d running one-shot trainer(s)", len(killed))
        for proc in killed:
            reap_killed(proc, "one-shot trainer")
        # The threads see their trainer die (or the abort flag) and end at once; waiting for
        # them means no thread can start a process after we return.
        self._executor.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._executor.shutdown(wait=True, cancel_futures=True)
